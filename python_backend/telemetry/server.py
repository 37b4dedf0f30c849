"""The gRPC endpoint of one model instance: Telemetry (events, snapshot, info) and, for twin
engines, GpuControl (the twin GPUs' clock surface).

Binds 127.0.0.1 unless told otherwise. GpuControl's state-changing calls (SetLockedClocks,
ResetLockedClocks) are refused with PERMISSION_DENIED for any peer that is not on the loopback
interface, whatever address the server binds.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from typing import Any

import grpc

from throttllem.v1 import PROTOCOL
from throttllem.v1 import telemetry_pb2 as pb
from throttllem.v1 import telemetry_pb2_grpc as pb_grpc

from ..engines.base import EngineFacts, GpuControl, GpuControlError
from .hub import Slo, TelemetryHub

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_MAX_BATCH_EVENTS = 512
MAX_SUBSCRIBERS = 16
# Trailing metadata key of a refused GpuControl call: the NVML return code the GPU gave.
NVML_CODE_METADATA = "throttllem-nvml-return"
_POLL_S = 0.25


def is_loopback_peer(peer: str) -> bool:
    """True for gRPC peer strings of the local host: ipv4:127.x.x.x:port, ipv6:[::1]:port,
    unix:... (a local socket)."""
    if peer.startswith("unix:") or peer.startswith("unix-abstract:"):
        return True
    if peer.startswith("ipv4:"):
        host = peer[5:].rsplit(":", 1)[0]
    elif peer.startswith("ipv6:"):
        host = peer[5:].rsplit(":", 1)[0].strip("[]")
    else:
        return False
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return bool(address.is_loopback or (mapped is not None and mapped.is_loopback))


class InstanceIdentity:
    """Who this endpoint is (filled by the Triton model; reported by GetInfo)."""

    def __init__(
        self,
        *,
        model_name: str,
        model_version: str,
        instance_name: str,
        decoupled: bool,
        default_slo: Slo,
        pid: int,
        started_unix_ns: int,
    ) -> None:
        self.model_name = model_name
        self.model_version = model_version
        self.instance_name = instance_name
        self.decoupled = decoupled
        self.default_slo = default_slo
        self.pid = pid
        self.started_unix_ns = started_unix_ns
        self.endpoint = ""


def engine_info(identity: InstanceIdentity, facts: EngineFacts, gpu_control: bool) -> Any:
    return pb.EngineInfo(
        protocol=PROTOCOL,
        model_name=identity.model_name,
        model_version=identity.model_version,
        instance_name=identity.instance_name,
        engine_kind=facts.engine_kind,
        llm=facts.llm,
        gpu_name=facts.gpu_name,
        tp_size=facts.tp_size,
        gpu_indices=facts.gpu_indices,
        max_batch_size=facts.max_batch_size,
        max_num_tokens=facts.max_num_tokens,
        max_input_len=facts.max_input_len,
        max_seq_len=facts.max_seq_len,
        kv_max_blocks=facts.kv_max_blocks,
        kv_tokens_per_block=facts.kv_tokens_per_block,
        scheduler_policy=facts.scheduler_policy,
        decoupled=identity.decoupled,
        default_slo=identity.default_slo.to_proto(),
        gpu_control=gpu_control,
        twin_speedup=facts.twin_speedup,
        pid=identity.pid,
        endpoint=identity.endpoint,
        started_unix_ns=identity.started_unix_ns,
    )


class TelemetryServicer(pb_grpc.TelemetryServicer):  # type: ignore[misc]
    def __init__(
        self,
        hub: TelemetryHub,
        info: Callable[[], Any],
        *,
        max_subscribers: int = MAX_SUBSCRIBERS,
    ) -> None:
        self._hub = hub
        self._info = info
        self._max_subscribers = max_subscribers
        self._stopping = False

    def stop(self) -> None:
        self._stopping = True

    def Subscribe(self, request: Any, context: Any) -> Iterator[Any]:
        if self._hub.subscriber_count() >= self._max_subscribers:
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"at most {self._max_subscribers} telemetry subscribers per instance",
            )
        max_events = int(request.max_batch_events) or DEFAULT_MAX_BATCH_EVENTS
        sub = self._hub.subscribe(
            snapshot_first=bool(request.snapshot_first),
            skip_iterations=bool(request.skip_iterations),
        )
        context.add_callback(sub.close)
        try:
            if sub.snapshot is not None:
                yield pb.EventBatch(snapshot=sub.snapshot)
            while not self._stopping and not sub.closed and context.is_active():
                events = sub.get(max_events, _POLL_S)
                if events:
                    yield pb.EventBatch(events=events)
        finally:
            self._hub.unsubscribe(sub)

    def GetSnapshot(self, request: Any, context: Any) -> Any:
        return self._hub.snapshot()

    def GetInfo(self, request: Any, context: Any) -> Any:
        return self._info()


def gpu_state(control: GpuControl) -> Any:
    readings = [
        pb.GpuReading(
            index=r.index,
            sm_clock_mhz=r.sm_clock_mhz,
            locked=r.locked_range_mhz is not None,
            locked_min_mhz=r.locked_range_mhz[0] if r.locked_range_mhz else 0,
            locked_max_mhz=r.locked_range_mhz[1] if r.locked_range_mhz else 0,
            power_mw=r.power_mw,
            total_energy_mj=r.total_energy_mj,
            power_limit_mw=r.power_limit_mw,
        )
        for r in control.readings()
    ]
    return pb.GpuState(
        time_unix_ns=time.time_ns(),
        gpus=readings,
        supported_clocks_mhz=control.supported_clocks_mhz(),
        max_sm_clock_mhz=control.max_sm_clock_mhz(),
        default_sm_clock_mhz=control.default_sm_clock_mhz(),
    )


class GpuControlServicer(pb_grpc.GpuControlServicer):  # type: ignore[misc]
    def __init__(self, control: GpuControl) -> None:
        self._control = control

    def _indices(self, requested: Sequence[int], context: Any) -> list[int]:
        known = self._control.gpu_indices()
        chosen = [int(i) for i in requested] or known
        unknown = sorted(set(chosen) - set(known))
        if unknown:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"gpu_indices {unknown} are not GPUs of this engine (it has {known})",
            )
        return chosen

    def _guard(self, context: Any, call: str) -> None:
        peer = context.peer()
        if not is_loopback_peer(peer):
            logger.warning("refused %s from non-loopback peer %s", call, peer)
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED, f"{call} is only accepted from the loopback"
            )

    def _apply(self, context: Any, action: Callable[[], None]) -> Any:
        try:
            action()
        except GpuControlError as e:
            if e.nvml_code is not None:
                context.set_trailing_metadata(((NVML_CODE_METADATA, str(e.nvml_code)),))
            code = (
                grpc.StatusCode.PERMISSION_DENIED
                if e.permission
                else (grpc.StatusCode.INVALID_ARGUMENT)
            )
            context.abort(code, str(e))
        return gpu_state(self._control)

    def GetGpuState(self, request: Any, context: Any) -> Any:
        return gpu_state(self._control)

    def SetLockedClocks(self, request: Any, context: Any) -> Any:
        self._guard(context, "SetLockedClocks")
        indices = self._indices(request.gpu_indices, context)
        lo, hi = int(request.min_mhz), int(request.max_mhz)
        return self._apply(context, lambda: self._control.set_locked_clocks(lo, hi, indices))

    def ResetLockedClocks(self, request: Any, context: Any) -> Any:
        self._guard(context, "ResetLockedClocks")
        indices = self._indices(request.gpu_indices, context)
        return self._apply(context, lambda: self._control.reset_locked_clocks(indices))


class TelemetryServer:
    """A gRPC server for one instance. `start()` binds and returns the endpoint (host:port)."""

    def __init__(
        self,
        hub: TelemetryHub,
        info: Callable[[], Any],
        *,
        gpu_control: GpuControl | None = None,
        host: str = DEFAULT_HOST,
        port: int = 0,
        max_subscribers: int = MAX_SUBSCRIBERS,
    ) -> None:
        self._host = host
        self._port = port
        self._telemetry = TelemetryServicer(hub, info, max_subscribers=max_subscribers)
        # Subscribers each hold a worker thread; keep some for the unary calls.
        self._server = grpc.server(
            futures.ThreadPoolExecutor(
                max_workers=max_subscribers + 4, thread_name_prefix="throttllem-telemetry"
            ),
            maximum_concurrent_rpcs=max_subscribers + 64,
            # gRPC sets SO_REUSEPORT by default: two instances configured onto one port would
            # then share it silently. Refuse instead.
            options=[("grpc.so_reuseport", 0)],
        )
        pb_grpc.add_TelemetryServicer_to_server(self._telemetry, self._server)
        if gpu_control is not None:
            pb_grpc.add_GpuControlServicer_to_server(GpuControlServicer(gpu_control), self._server)
        self.endpoint = ""

    def start(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        try:
            port = self._server.add_insecure_port(f"{host}:{self._port}")
        except RuntimeError as e:
            raise OSError(f"telemetry server cannot bind {host}:{self._port}: {e}") from e
        if port == 0:
            raise OSError(f"telemetry server cannot bind {host}:{self._port}")
        self._server.start()
        self.endpoint = f"{host}:{port}"
        logger.info("telemetry endpoint %s", self.endpoint)
        return self.endpoint

    def stop(self, grace_s: float = 1.0) -> None:
        self._telemetry.stop()
        self._server.stop(grace_s).wait(grace_s + 1.0)
