"""The routing model: one client-facing name in front of the sized variants of an LLM.

With instance scaling, the same model runs at several sizes (`tensorrt_llm_tp1`,
`tensorrt_llm_tp2`, ...), loaded and unloaded through Triton's model-control API. Clients keep
calling `tensorrt_llm`: this decoupled Python model forwards each request, inputs and
parameters unchanged, to the variant named in its routing file, through BLS
(`pb_utils.InferenceRequest.exec(decoupled=True)`), and relays every response.

The controller's switcher (controller/scaling/switcher.py) moves traffic by rewriting the
routing file (atomically) once the new variant is ready. A request keeps the variant it started
on, so requests in flight finish where they began while new ones go to the new size.

A relay whose variant instance died is ended with an error by the watchdog
(relay_watchdog.py), so each request gets exactly one final response whatever happens to the
instance serving it; new requests wait while the variant has a dead instance (until the
controller repairs it), since Triton can abort when it dispatches to a freshly killed stub.
Outcomes are counted on Triton's metrics port as
`throttllem_router_requests_total{model, outcome=completed|error|cancelled}`.

Parameters (config.pbtxt):
    routing_file             JSON file {"target": "<variant model name>"} (required)
    router_threads           requests relayed at once (default 256: one thread per request)
    relay_stall_s            seconds without a response after which a relay whose instance
                             died is ended, and the longest a new request waits for a model
                             with a dead instance to be repaired (default 10)
    telemetry_registry_dir   where the variants' instances register their pids (default: the
                             telemetry default, as the variants)
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import triton_python_backend_utils as pb_utils

from ..params import Parameters
from ..telemetry.discovery import discover, pid_alive
from .metrics import METRIC_IPC_LOCK
from .relay_watchdog import InstanceLiveness, Relay, RelayWatchdog
from .routing_file import RoutingTable

logger = logging.getLogger(__name__)

OUTCOMES = ("completed", "error", "cancelled")


class RouterModel:
    def initialize(self, args: dict[str, str]) -> None:
        config: dict[str, Any] = json.loads(args["model_config"])
        params = Parameters.from_model_config(config)
        routing = params.get_str("routing_file")
        if not routing:
            raise pb_utils.TritonModelException("router: parameter 'routing_file' is required")
        self._table = RoutingTable(Path(routing))
        threads = params.get_int("router_threads", 256, minimum=1) or 256
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="throttllem-route")
        self._outputs = [o["name"] for o in config.get("output", [])]
        registry = params.get_str("telemetry_registry_dir")
        registry_dir = Path(registry) if registry else None

        def entries(model: str) -> list[int]:
            return [e.pid for e in discover(registry_dir, model, check_pid=False)]

        self._liveness = InstanceLiveness(entries, pid_alive)
        self._stall_s = params.get_float("relay_stall_s", 10.0, minimum=0.001) or 10.0
        self._watchdog = RelayWatchdog(self._stall_s, self._liveness.pids, pid_alive, self._fail)
        self._watchdog.start()
        self._counters = _outcome_counters(args.get("model_name", config.get("name", "")))

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            sender = request.get_response_sender()
            rid = request.request_id()
            target = self._table.target()
            if target is None:
                relay = Relay(rid, "", frozenset(), sender, 0.0)
                self._fail(relay, f"router: request '{rid}': no target model yet (routing file "
                           "missing or empty)")  # fmt: skip
                continue
            relay = self._watchdog.open(rid, target, sender)
            self._pool.submit(self._relay, request, relay)
        return None

    def _relay(self, request: Any, relay: Relay) -> None:
        try:
            if not self._await_healthy(relay):
                return
            first = relay.target
            forwarded = self._forward(request, relay)
            if forwarded is None:  # the target went away before answering: the new one
                retry = self._table.target()
                if retry is not None and retry != first:
                    self._watchdog.retarget(relay, retry)
                    forwarded = self._forward(request, relay)
            if forwarded is None:
                self._fail(relay, f"router: request '{relay.request_id}': model {first} is "
                           "unavailable")  # fmt: skip
                return
            if relay.send(final=True, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL):
                self._count(relay.outcome)
        except Exception as e:  # one final response whatever happens
            logger.exception("relaying a request to %s", relay.target)
            self._fail(relay, f"router: request '{relay.request_id}': {e}")
        finally:
            self._watchdog.close(relay)

    def _await_healthy(self, relay: Relay) -> bool:
        """Hold a request while its target has a dead instance (see relay_watchdog.py): until
        the target is repaired or replaced, or `relay_stall_s` passes (then it fails, named)."""
        if all(pid_alive(p) for p in relay.pids):
            return True  # the common case: the registry was read when the relay opened
        deadline = time.monotonic() + self._stall_s
        while not relay.closed and (dead := self._liveness.dead(relay.target)):
            if time.monotonic() > deadline:
                self._fail(relay, f"router: request '{relay.request_id}': model {relay.target} "
                           f"lost instance process {', '.join(map(str, dead))} and was not "
                           f"repaired within {self._stall_s:.0f} s")  # fmt: skip
                return False
            time.sleep(0.05)  # polling the registry while the controller repairs the model
            target = self._table.target()
            if target is not None and target != relay.target:
                self._watchdog.retarget(relay, target)
        if relay.closed:  # the watchdog ended it meanwhile
            return False
        self._watchdog.heard(relay)  # the wait is not a stall of the target
        return True

    def _forward(self, request: Any, relay: Relay) -> int | None:
        """Relay the responses of the relay's target; the count relayed, or None when the
        target refused the request before answering (unloaded), so that it can go elsewhere."""
        bls = pb_utils.InferenceRequest(
            model_name=relay.target,
            inputs=request.inputs(),
            requested_output_names=self._outputs,
            parameters=json.loads(request.parameters() or "{}"),
        )
        relayed = 0
        responses = bls.exec(decoupled=True)
        for response in responses:
            self._watchdog.heard(relay)
            if relay.closed or relay.outcome == "cancelled":
                # Ended by the watchdog (its instance is gone: nothing to cancel there) or
                # already cancelled once: drain what is left without touching the request.
                continue
            if relay.is_cancelled():
                relay.outcome = "cancelled"
                cancel = getattr(responses, "cancel", None)
                if cancel is not None:
                    cancel()
                continue
            if response.has_error():
                message = response.error().message()
                if relayed == 0 and ("unavailable" in message or "not found" in message):
                    return None
                # An error ends the request (the variant sends its errors as final): the
                # client gets it as the one final response, named, as the router's own errors
                # (a streaming client sees no request id); whatever follows is drained.
                relay.outcome = "error"
                text = f"router: request '{relay.request_id}': {message}"
                code = getattr(response.error(), "code", None)
                named = (
                    pb_utils.TritonError(text)
                    if code is None
                    else pb_utils.TritonError(text, code())
                )
                response_out = pb_utils.InferenceResponse(output_tensors=[], error=named)
                if relay.send(response_out, final=True,
                              flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL):  # fmt: skip
                    self._count("error")
                relayed += 1
                continue
            tensors = response.output_tensors()
            if tensors:
                relay.send(pb_utils.InferenceResponse(output_tensors=tensors))
                relayed += 1
        return relayed

    def _fail(self, relay: Relay, message: str) -> None:
        response = pb_utils.InferenceResponse(
            output_tensors=[], error=pb_utils.TritonError(message)
        )
        if relay.send(response, final=True, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL):
            self._count("error")

    def _count(self, outcome: str) -> None:
        counter = self._counters.get(outcome)
        if counter is not None:
            try:
                with METRIC_IPC_LOCK:
                    counter.increment(1)
            except Exception:
                logger.exception("counting a %s request", outcome)

    def finalize(self) -> None:
        self._watchdog.stop()
        self._pool.shutdown(wait=True, cancel_futures=False)


def _outcome_counters(model: str) -> dict[str, Any]:
    """One counter per outcome; empty (counting off) on a Python backend without metrics."""
    try:
        family = pb_utils.MetricFamily(
            name="throttllem_router_requests_total",
            description="Requests the router ended, by outcome (each has exactly one final "
            "response)",
            kind=pb_utils.MetricFamily.COUNTER,
        )
    except Exception as e:
        logger.info("router request counters unavailable: %s", e)
        return {}
    counters = {o: family.Metric(labels={"model": model, "outcome": o}) for o in OUTCOMES}
    counters["_family"] = family  # the family must outlive its metrics
    return counters
