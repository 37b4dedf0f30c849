"""Moving a model between sizes inside one Triton server, without losing a request.

Shadow instancing through Triton's model-control API (explicit mode):
1. load the new size (`load_model`) and wait until Triton reports it ready;
2. point the router (python_backend/triton_model/router.py) at it: new requests go there;
3. wait until the old size has nothing in flight (its telemetry snapshot is empty), so the
   requests it holds finish where they started;
4. unload the old size; its GPUs are no longer the controller's, whose link to that engine
   ends and leaves them at default clocks (docs/controller.md).

Also data-parallel replicas: `set_instances` reloads a model with a config override whose
instance_group count differs (Triton keeps the old instances serving until the new are ready).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from throttllem.backend.triton_model.routing_file import write_routing_file

log = logging.getLogger(__name__)


class ModelControl(Protocol):
    """What the switcher needs of tritonclient's InferenceServerClient (grpc or http)."""

    def load_model(
        self, model_name: str, headers: Any = None, config: str | None = None
    ) -> None: ...

    def unload_model(self, model_name: str) -> None: ...

    def is_model_ready(self, model_name: str) -> bool: ...

    def get_model_config(self, model_name: str, as_json: bool = False) -> Any: ...


class SwitchError(RuntimeError):
    pass


@dataclass(frozen=True)
class SwitchReport:
    from_model: str | None
    to_model: str
    ready_s: float  # load call to ready
    drained_s: float  # routing flip to the old size empty
    unloaded: bool


class TritonSwitcher:
    def __init__(
        self,
        control: ModelControl,
        routing_file: Path,
        in_flight: Callable[[str], int],
        *,
        ready_timeout_s: float = 600.0,
        drain_timeout_s: float = 600.0,
        poll_s: float = 0.05,
        clock: Callable[[], float] = time.monotonic,
        wait: Callable[[float], None] = time.sleep,
    ) -> None:
        self.control = control
        self.routing_file = routing_file
        self.in_flight = in_flight
        self.ready_timeout_s = ready_timeout_s
        self.drain_timeout_s = drain_timeout_s
        self.poll_s = poll_s
        self._clock, self._wait = clock, wait
        self.current: str | None = None

    def start(self, model: str) -> None:
        """The first size: loaded if needed and routed to."""
        self._load_and_wait(model)
        write_routing_file(self.routing_file, model)
        self.current = model

    def switch(self, to_model: str) -> SwitchReport:
        old = self.current
        t0 = self._clock()
        self._load_and_wait(to_model)
        ready_s = self._clock() - t0
        write_routing_file(self.routing_file, to_model)
        self.current = to_model
        t1 = self._clock()
        unloaded = False
        if old is not None and old != to_model:
            self._until(lambda: self.in_flight(old) == 0, self.drain_timeout_s,
                        f"{old} still has requests in flight")  # fmt: skip
            self.control.unload_model(old)
            unloaded = True
        report = SwitchReport(old, to_model, ready_s, self._clock() - t1, unloaded)
        log.info("switched %s -> %s (ready in %.1f s, drained in %.1f s)", old, to_model,
                 report.ready_s, report.drained_s)  # fmt: skip
        return report

    def set_instances(self, model: str, count: int, config: dict[str, Any]) -> None:
        """Data-parallel replicas: reload `model` (its current config, `config`) with `count`
        instances; Triton serves with the old instances until the new ones are ready."""
        if count < 1:
            raise ValueError(f"instance count must be >= 1, got {count}")
        groups = [dict(g) for g in config.get("instance_group", [])] or [{"kind": "KIND_CPU"}]
        groups[0]["count"] = count
        override = {**config, "instance_group": groups[:1]}
        self.control.load_model(model, config=json.dumps(override))
        self._until(lambda: self.control.is_model_ready(model), self.ready_timeout_s,
                    f"{model} not ready with {count} instances")  # fmt: skip

    def expected_instances(self, model: str) -> int:
        config = self.control.get_model_config(model, as_json=True)
        groups = config.get("config", config).get("instance_group", [])
        return sum(int(g.get("count", 1)) for g in groups) or 1

    def repair(self, model: str) -> None:
        """Reload `model` (Triton starts fresh instances; requests on live ones finish there):
        the way back from an instance whose process died, which Triton does not restart."""
        self.control.load_model(model)
        self._until(lambda: self.control.is_model_ready(model), self.ready_timeout_s,
                    f"{model} not ready after a reload")  # fmt: skip

    def _load_and_wait(self, model: str) -> None:
        if not self.control.is_model_ready(model):
            self.control.load_model(model)
        self._until(lambda: self.control.is_model_ready(model), self.ready_timeout_s,
                    f"{model} not ready")  # fmt: skip

    def _until(self, condition: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = self._clock() + timeout_s
        while not condition():
            if self._clock() >= deadline:
                raise SwitchError(f"{what} after {timeout_s:.0f} s")
            self._wait(self.poll_s)


def live_instances(registry_dir: Path) -> Callable[[str], int]:
    """Instances of a model whose process is alive (telemetry registry, pid checked)."""
    from throttllem.backend.telemetry.discovery import discover

    return lambda model: len(discover(registry_dir, model))


def telemetry_in_flight(registry_dir: Path) -> Callable[[str], int]:
    """Requests in flight in every instance of a model, from their telemetry snapshots."""
    import grpc

    from throttllem.backend.telemetry.discovery import discover
    from throttllem.v1 import telemetry_pb2 as pb
    from throttllem.v1 import telemetry_pb2_grpc as pb_grpc

    def count(model: str) -> int:
        total = 0
        for entry in discover(registry_dir, model):
            with grpc.insecure_channel(entry.endpoint) as channel:
                snap = pb_grpc.TelemetryStub(channel).GetSnapshot(
                    pb.GetSnapshotRequest(), timeout=5.0
                )
                total += len(snap.requests)
        return total

    return count
