"""The routing model: one client-facing name in front of the sized variants of an LLM.

With instance scaling, the same model runs at several sizes (`tensorrt_llm_tp1`,
`tensorrt_llm_tp2`, ...), loaded and unloaded through Triton's model-control API. Clients keep
calling `tensorrt_llm`: this decoupled Python model forwards each request, inputs and
parameters unchanged, to the variant named in its routing file, through BLS
(`pb_utils.InferenceRequest.exec(decoupled=True)`), and relays every response.

The controller's switcher (controller/scaling/switcher.py) moves traffic by rewriting the
routing file (atomically) once the new variant is ready. A request keeps the variant it started
on, so requests in flight finish where they began while new ones go to the new size.

Parameters (config.pbtxt):
    routing_file     JSON file {"target": "<variant model name>"} (required)
    router_threads   requests relayed at once (default 256: one thread per streaming request)
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import triton_python_backend_utils as pb_utils

from ..params import Parameters
from .routing_file import RoutingTable

logger = logging.getLogger(__name__)


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

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            sender = request.get_response_sender()
            target = self._table.target()
            if target is None:
                _fail(sender, f"router: request '{request.request_id()}': no target model yet "
                      "(routing file missing or empty)")  # fmt: skip
                continue
            self._pool.submit(self._relay, request, sender, target)
        return None

    def _relay(self, request: Any, sender: Any, target: str) -> None:
        try:
            forwarded = self._forward(request, sender, target)
            if forwarded is None:  # the target went away before answering: the new one
                retry = self._table.target()
                if retry is not None and retry != target:
                    forwarded = self._forward(request, sender, retry)
            if forwarded is None:
                _fail(sender, f"router: request '{request.request_id()}': model {target} is "
                      "unavailable")  # fmt: skip
                return
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception as e:  # one final response whatever happens
            logger.exception("relaying a request to %s", target)
            _fail(sender, f"router: request '{request.request_id()}': {e}")

    def _forward(self, request: Any, sender: Any, target: str) -> int | None:
        """Relay the responses of `target`; the count relayed, or None when the target refused
        the request before answering (unloaded), so that it can go elsewhere."""
        bls = pb_utils.InferenceRequest(
            model_name=target,
            inputs=request.inputs(),
            requested_output_names=self._outputs,
            parameters=json.loads(request.parameters() or "{}"),
        )
        relayed = 0
        responses = bls.exec(decoupled=True)
        for response in responses:
            if sender.is_cancelled():
                cancel = getattr(responses, "cancel", None)
                if cancel is not None:
                    cancel()
                continue
            if response.has_error():
                message = response.error().message()
                if relayed == 0 and ("unavailable" in message or "not found" in message):
                    return None
                sender.send(pb_utils.InferenceResponse(output_tensors=[],
                                                       error=response.error()))  # fmt: skip
                relayed += 1
                continue
            tensors = response.output_tensors()
            if tensors:
                sender.send(pb_utils.InferenceResponse(output_tensors=tensors))
                relayed += 1
        return relayed

    def finalize(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=False)


def _fail(sender: Any, message: str) -> None:
    sender.send(
        pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message)),
        flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
    )
