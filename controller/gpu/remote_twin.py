"""`GpuDevices` over the backend's GpuControl gRPC service: the twin GPUs of a served model.

The twin lives inside the Triton model's process, so the controller reaches its clocks the way
it reaches its telemetry: over gRPC on the instance's endpoint. gRPC failures become the same
errors an NVML call gives (a refused peer is NoPermission, an unreachable one GpuLost).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

import grpc

from throttllem.v1 import telemetry_pb2 as pb
from throttllem.v1 import telemetry_pb2_grpc as pb_grpc

from .errors import GpuError, GpuLost, InvalidArgument, NoPermission
from .guarded import GuardedClockDriver

CALL_TIMEOUT_S = 2.0
# The backend lets a lock lapse 1.5 s after the last set call (engines/twin.py); renewing
# well within that keeps it while this process lives, and only while it lives.
LEASE_RENEW_S = 0.4
T = TypeVar("T")
log = logging.getLogger(__name__)


def _error(e: grpc.RpcError, context: str) -> GpuError:
    code = e.code() if hasattr(e, "code") else None
    detail = e.details() if hasattr(e, "details") else str(e)
    message = f"{context}: {detail}"
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return NoPermission(message, None)
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE):
        return InvalidArgument(message, None)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return GpuLost(message, None)
    return GpuError(message, None)


class RemoteTwinDevices:
    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self._channel = grpc.insecure_channel(endpoint)
        self._stub = pb_grpc.GpuControlStub(self._channel)
        state = self._call(
            "read GPU state",
            lambda: self._stub.GetGpuState(pb.GetGpuStateRequest(), timeout=CALL_TIMEOUT_S),
        )
        self._indices = tuple(g.index for g in state.gpus)
        self._clocks = tuple(state.supported_clocks_mhz)
        if not self._indices or not self._clocks:
            raise GpuError(f"{endpoint}: the backend reports no twin GPUs", None)
        self._held: pb.SetLockedClocksRequest | None = None
        self._stop = threading.Event()
        self._renewer = threading.Thread(target=self._renew, name=f"lease {endpoint}", daemon=True)
        self._renewer.start()

    def _renew(self) -> None:
        while not self._stop.wait(LEASE_RENEW_S):
            held = self._held
            if held is None:
                continue
            try:
                self._stub.SetLockedClocks(held, timeout=CALL_TIMEOUT_S)
            except grpc.RpcError as e:
                log.debug("%s: lease renewal failed: %s", self.endpoint, e)

    def _call(self, context: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except grpc.RpcError as e:
            raise _error(e, f"{self.endpoint}: {context}") from e

    def _reading(self, gpu: int) -> pb.GpuReading:
        state = self._call(
            "read GPU state",
            lambda: self._stub.GetGpuState(pb.GetGpuStateRequest(), timeout=CALL_TIMEOUT_S),
        )
        for reading in state.gpus:
            if reading.index == gpu:
                return reading
        raise InvalidArgument(f"{self.endpoint}: no twin GPU {gpu}", None)

    def gpu_indices(self) -> tuple[int, ...]:
        return self._indices

    def supported_clocks_mhz(self, gpu: int) -> tuple[int, ...]:
        return self._clocks

    def set_locked_clocks(self, gpus: Sequence[int], min_mhz: int, max_mhz: int) -> None:
        request = pb.SetLockedClocksRequest(
            min_mhz=min_mhz, max_mhz=max_mhz, gpu_indices=list(gpus)
        )
        self._call(
            "set locked clocks", lambda: self._stub.SetLockedClocks(request, timeout=CALL_TIMEOUT_S)
        )
        self._held = request

    def reset_locked_clocks(self, gpus: Sequence[int]) -> None:
        self._held = None
        request = pb.ResetLockedClocksRequest(gpu_indices=list(gpus))
        self._call(
            "reset locked clocks",
            lambda: self._stub.ResetLockedClocks(request, timeout=CALL_TIMEOUT_S),
        )

    def sm_clock_mhz(self, gpu: int) -> int:
        return int(self._reading(gpu).sm_clock_mhz)

    def power_usage_mw(self, gpu: int) -> int:
        return int(self._reading(gpu).power_mw)

    def total_energy_mj(self, gpu: int) -> int:
        return int(self._reading(gpu).total_energy_mj)

    def enforced_power_limit_mw(self, gpu: int) -> int:
        return int(self._reading(gpu).power_limit_mw)

    def close(self) -> None:
        self._stop.set()
        self._renewer.join(timeout=2.0)
        self._channel.close()


class RemoteTwinDriver(GuardedClockDriver):
    """The clock driver of a served twin engine, reached at its telemetry endpoint."""

    def __init__(self, endpoint: str, *, observe_only: bool = False) -> None:
        super().__init__(
            RemoteTwinDevices(endpoint), name=f"twin at {endpoint}", observe_only=observe_only
        )
