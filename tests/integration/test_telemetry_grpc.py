"""The telemetry gRPC server in-process on 127.0.0.1: batching, gaps a slow subscriber can see,
subscriber limits, and the loopback guard of the clock calls."""

from __future__ import annotations

import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from throttllem.backend.engines.base import EngineFacts, GpuControlError, GpuReading, IterationStat
from throttllem.backend.telemetry.hub import Slo, TelemetryHub
from throttllem.backend.telemetry.server import (
    GpuControlServicer,
    InstanceIdentity,
    TelemetryServer,
    engine_info,
    is_loopback_peer,
)
from throttllem.v1 import telemetry_pb2 as pb
from throttllem.v1 import telemetry_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration


def stat(i: int) -> IterationStat:
    return IterationStat(
        iter=i, timestamp_unix_ns=i, iter_latency_ms=1.0, num_active_requests=1,
        num_queued_requests=0, num_new_active_requests=0, num_completed_requests=0,
        max_num_active_requests=8, num_scheduled_requests=1, num_context_requests=0,
        num_gen_requests=1, num_paused_requests=0, num_ctx_tokens=0, kv_used_blocks=1,
        kv_free_blocks=9, kv_max_blocks=10, kv_tokens_per_block=64,
    )  # fmt: skip


class FakeControl:
    def __init__(self) -> None:
        self.lock: tuple[int, int] | None = None

    def gpu_indices(self) -> list[int]:
        return [0, 1]

    def supported_clocks_mhz(self) -> list[int]:
        return [1410, 1000, 210]

    def max_sm_clock_mhz(self) -> int:
        return 1410

    def default_sm_clock_mhz(self) -> int:
        return 1410

    def set_locked_clocks(self, lo: int, hi: int, indices: Any) -> None:
        if lo > hi:
            raise GpuControlError("min > max", nvml_code=2)
        if lo == 1:
            raise GpuControlError("needs root", permission=True, nvml_code=4)
        self.lock = (lo, hi)

    def reset_locked_clocks(self, indices: Any) -> None:
        self.lock = None

    def readings(self) -> list[GpuReading]:
        return [GpuReading(i, 1410, self.lock, 250_000, 1000, 400_000) for i in (0, 1)]


@pytest.fixture
def served() -> Iterator[tuple[TelemetryHub, Any, Any]]:
    hub = TelemetryHub(subscriber_buffer=64)
    identity = InstanceIdentity(
        model_name="m", model_version="1", instance_name="m_0_0", decoupled=True,
        default_slo=Slo(tbt_ms=200.0), pid=1, started_unix_ns=2,
    )  # fmt: skip
    facts = EngineFacts(engine_kind="twin", llm="llama-3-8b")
    server = TelemetryServer(hub, lambda: engine_info(identity, facts, True),
                             gpu_control=FakeControl(), max_subscribers=2)  # fmt: skip
    identity.endpoint = server.start()
    channel = grpc.insecure_channel(identity.endpoint)
    try:
        yield hub, pb_grpc.TelemetryStub(channel), pb_grpc.GpuControlStub(channel)
    finally:
        channel.close()
        server.stop(0.1)


def test_binds_loopback_and_reports_info(served: Any) -> None:
    _, stub, _ = served
    info = stub.GetInfo(pb.GetInfoRequest())
    assert info.endpoint.startswith("127.0.0.1:") and info.default_slo.tbt_ms == 200.0


def test_events_arrive_in_batches(served: Any) -> None:
    hub, stub, _ = served
    call = stub.Subscribe(pb.SubscribeRequest(max_batch_events=10, snapshot_first=True))
    first = next(call)
    assert first.HasField("snapshot") and first.snapshot.last_seq == 0
    hub.iterations([stat(i) for i in range(25)])
    got: list[Any] = []
    sizes = []
    while len(got) < 25:
        batch = next(call)
        sizes.append(len(batch.events))
        got += batch.events
    call.cancel()
    assert [e.seq for e in got] == list(range(1, 26)) and max(sizes) <= 10


def test_a_slow_subscriber_sees_a_gap_not_a_stall(served: Any) -> None:
    hub, stub, _ = served
    call = stub.Subscribe(pb.SubscribeRequest(max_batch_events=1000))
    deadline = time.monotonic() + 5
    while hub.subscriber_count() == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    # 64-event buffer; publish far more before the client reads anything.
    start = time.perf_counter()
    hub.iterations([stat(i) for i in range(5000)])
    assert time.perf_counter() - start < 2.0
    events: list[Any] = []
    while not events or events[-1].iteration.iter != 4999:
        events += next(call).events
    call.cancel()
    gaps = [e.gap for e in events if e.WhichOneof("kind") == "gap"]
    assert gaps and sum(g.dropped_events for g in gaps) + len(events) - len(gaps) == 5000


def test_subscriber_limit(served: Any) -> None:
    _, stub, _ = served
    calls = [stub.Subscribe(pb.SubscribeRequest(snapshot_first=True)) for _ in range(2)]
    for c in calls:
        next(c)
    with pytest.raises(grpc.RpcError) as info:
        next(stub.Subscribe(pb.SubscribeRequest(snapshot_first=True)))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    for c in calls:
        c.cancel()


def test_clock_calls_and_their_errors(served: Any) -> None:
    _, _, gpu = served
    state = gpu.SetLockedClocks(pb.SetLockedClocksRequest(min_mhz=1000, max_mhz=1000))
    assert [g.locked_max_mhz for g in state.gpus] == [1000, 1000]
    with pytest.raises(grpc.RpcError) as info:
        gpu.SetLockedClocks(pb.SetLockedClocksRequest(min_mhz=1, max_mhz=5))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert dict(info.value.trailing_metadata())["throttllem-nvml-return"] == "4"
    with pytest.raises(grpc.RpcError) as info:
        gpu.SetLockedClocks(pb.SetLockedClocksRequest(min_mhz=1400, max_mhz=5))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert not gpu.ResetLockedClocks(pb.ResetLockedClocksRequest()).gpus[0].locked


class AbortedError(Exception):
    pass


def test_state_changes_are_refused_from_outside_the_host() -> None:
    servicer = GpuControlServicer(FakeControl())

    def abort(code: Any, message: str) -> None:
        raise AbortedError(code, message)

    remote = SimpleNamespace(peer=lambda: "ipv4:10.1.2.3:5555", abort=abort)
    with pytest.raises(AbortedError) as info:
        servicer.SetLockedClocks(pb.SetLockedClocksRequest(min_mhz=1000, max_mhz=1000), remote)
    assert info.value.args[0] == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(AbortedError):
        servicer.ResetLockedClocks(pb.ResetLockedClocksRequest(), remote)
    assert servicer.GetGpuState(pb.GetGpuStateRequest(), remote).gpus  # reads stay open


@pytest.mark.parametrize(
    ("peer", "local"),
    [("ipv4:127.0.0.1:5", True), ("ipv4:127.9.9.9:5", True), ("ipv6:[::1]:5", True),
     ("ipv6:[::ffff:127.0.0.1]:5", True), ("unix:/tmp/s", True), ("ipv4:10.0.0.1:5", False),
     ("ipv6:[fe80::1]:5", False), ("garbage", False)],
)  # fmt: skip
def test_loopback_peers(peer: str, local: bool) -> None:
    assert is_loopback_peer(peer) is local


def test_a_taken_port_is_refused_not_shared(served: Any) -> None:
    _, stub, _ = served
    port = int(stub.GetInfo(pb.GetInfoRequest()).endpoint.rsplit(":", 1)[1])
    second = TelemetryServer(TelemetryHub(), lambda: pb.EngineInfo(), port=port)
    with pytest.raises(OSError, match=str(port)):
        second.start()
