"""The telemetry endpoint of a real model instance, checked against what the clients saw."""

from __future__ import annotations

import os
import time
import urllib.request
from collections.abc import Callable

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from triton_support import LLM, WAIT_S, Stream, Telemetry, endpoints, llm_inputs, wait_drained

from throttllem.backend.twin.hardware import default_catalog
from throttllem.controller.triton_launcher import TritonServer
from throttllem.v1 import telemetry_pb2 as pb

pytestmark = pytest.mark.integration


def test_info_describes_the_engine(triton: TritonServer, telemetry: Telemetry) -> None:
    (entry,) = endpoints(triton, LLM)
    info = telemetry.stub.GetInfo(pb.GetInfoRequest())
    assert info.protocol == "throttllem.v1" and info.engine_kind == "twin"
    assert info.model_name == LLM and info.instance_name == entry.instance_name
    assert info.endpoint == entry.endpoint and info.endpoint.startswith("127.0.0.1:")
    assert info.llm == "llama-3-8b" and info.gpu_name == "A100-SXM4-40GB" and info.tp_size == 1
    assert info.kv_max_blocks > 0 and info.kv_tokens_per_block == 64
    assert info.max_input_len == 512 and info.decoupled and info.gpu_control
    assert info.twin_speedup == 5.0 and info.pid == entry.pid != os.getpid()


def test_events_match_what_the_clients_saw(triton: TritonServer, telemetry: Telemetry) -> None:
    lengths = {f"t{i}": 5 + 3 * i for i in range(5)}
    streams = {rid: Stream(triton.grpc_url) for rid in lengths}
    try:
        for i, (rid, n) in enumerate(lengths.items()):
            slo = {"slo_ttft_ms": 500 + i, "slo_tbt_ms": 50.5, "output_length_hint": n - 1}
            streams[rid].send(rid, llm_inputs(10 + i, n, streaming=i % 2 == 0), parameters=slo)
        seen = {rid: streams[rid].collect(rid) for rid in lengths}
    finally:
        for s in streams.values():
            s.close()
    assert {rid: len(o.tokens) for rid, o in seen.items()} == lengths

    def all_finished() -> bool:
        return len(telemetry.of_kind("finished")) >= len(lengths)

    telemetry.wait_until(all_finished)
    arrived = {a.triton_request_id: a for a in telemetry.of_kind("arrived")}
    assert set(arrived) == set(lengths)
    by_engine_id = {a.request_id: rid for rid, a in arrived.items()}
    for i, (rid, n) in enumerate(lengths.items()):
        a = arrived[rid]
        assert (a.prompt_tokens, a.max_tokens, a.streaming) == (10 + i, n, i % 2 == 0)
        assert a.slo.ttft_ms == 500 + i and a.slo.tbt_ms == 50.5 and not a.slo.HasField("e2e_ms")
        assert a.output_length_hint == n - 1
    finished = {by_engine_id[f.request_id]: f for f in telemetry.of_kind("finished")}
    assert {rid: f.output_tokens for rid, f in finished.items()} == lengths
    assert {f.finish_reason for f in finished.values()} == {pb.FINISH_REASON_LENGTH}
    firsts = {by_engine_id[f.request_id] for f in telemetry.of_kind("first_token")}
    assert firsts == set(lengths)
    # Every event, in order, none lost.
    seqs = [e.seq for e in telemetry.events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    assert telemetry.of_kind("gap") == []
    assert seqs[0] == telemetry.snapshot.last_seq + 1
    # Iterations: batch composition and KV blocks, back to zero at the end.
    iterations = telemetry.of_kind("iteration")
    assert max(it.num_active_requests for it in iterations) >= 2
    assert max(it.kv_used_blocks for it in iterations) >= 2
    assert all(it.kv_tokens_per_block == 64 and it.kv_max_blocks > 0 for it in iterations)
    assert all(it.HasField("iter_latency_ms") for it in iterations)
    assert wait_drained(telemetry.stub).last_iteration.kv_used_blocks == 0


def test_snapshot_shows_a_request_in_flight(triton: TritonServer, telemetry: Telemetry) -> None:
    s = Stream(triton.grpc_url)
    try:
        s.send("long-1", llm_inputs(12, 1000, streaming=True))
        assert s._inbox.get(timeout=30).request_id == "long-1"
        snap = telemetry.stub.GetSnapshot(pb.GetSnapshotRequest())
        (req,) = snap.requests
        assert req.triton_request_id == "long-1" and req.prompt_tokens == 12
        assert req.max_tokens == 1000 and req.output_tokens >= 1
        assert req.phase == pb.REQUEST_PHASE_GENERATING and req.first_token_unix_ns > 0
    finally:
        s.close(cancel=True)


def test_twin_clock_control(telemetry: Telemetry) -> None:
    state = telemetry.gpu.GetGpuState(pb.GetGpuStateRequest())
    (gpu,) = state.gpus
    clocks = list(state.supported_clocks_mhz)
    assert clocks == sorted(clocks, reverse=True) and state.max_sm_clock_mhz == clocks[0]
    assert not gpu.locked and gpu.power_limit_mw > 0
    low = clocks[len(clocks) // 2]
    locked = telemetry.gpu.SetLockedClocks(pb.SetLockedClocksRequest(min_mhz=low, max_mhz=low))
    assert locked.gpus[0].index == 0
    telemetry.wait_until(
        lambda: telemetry.gpu.GetGpuState(pb.GetGpuStateRequest()).gpus[0].locked_max_mhz == low
    )
    with pytest.raises(grpc.RpcError) as info:
        telemetry.gpu.SetLockedClocks(pb.SetLockedClocksRequest(min_mhz=5, max_mhz=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(info.value.trailing_metadata())["throttllem-nvml-return"] == "2"
    with pytest.raises(grpc.RpcError) as info:
        telemetry.gpu.ResetLockedClocks(pb.ResetLockedClocksRequest(gpu_indices=[7]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    telemetry.gpu.ResetLockedClocks(pb.ResetLockedClocksRequest())
    telemetry.wait_until(
        lambda: not telemetry.gpu.GetGpuState(pb.GetGpuStateRequest()).gpus[0].locked
    )
    energy = telemetry.gpu.GetGpuState(pb.GetGpuStateRequest()).gpus[0].total_energy_mj
    assert energy > 0


GPU_FAMILIES = {
    "throttllem_gpu_sm_clock_mhz": "gauge",
    "throttllem_gpu_power_w": "gauge",
    "throttllem_gpu_energy_joules_total": "counter",
}


def gpu_metrics(triton: TritonServer, instance: str) -> dict[str, float]:
    """The throttllem_gpu_* samples of GPU 0 of `instance`, scraped from Triton's metrics port."""
    url = f"http://{triton.host}:{triton.ports.metrics}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name
            if name in GPU_FAMILIES and sample.labels.get("model_instance") == instance:
                assert family.type == GPU_FAMILIES[name], (name, family.type)
                assert sample.labels["gpu"] == "0", sample.labels
                out[name] = sample.value
    return out


def scrape_until(
    triton: TritonServer, instance: str, check: Callable[[dict[str, float]], bool]
) -> dict[str, float]:
    deadline = time.monotonic() + WAIT_S
    while True:
        seen = gpu_metrics(triton, instance)
        if check(seen):
            return seen
        if time.monotonic() > deadline:
            raise AssertionError(f"metrics of {instance}: condition not met in time: {seen}")
        time.sleep(0.05)


def test_gpu_state_on_the_metrics_port(
    triton: TritonServer, telemetry: Telemetry, stream: Stream
) -> None:
    (entry,) = endpoints(triton, LLM)
    instance = entry.instance_name
    clocks = default_catalog().gpu("A100-SXM4-40GB").supported_clocks_mhz()
    first = scrape_until(triton, instance, lambda m: set(m) == set(GPU_FAMILIES))
    assert first["throttllem_gpu_sm_clock_mhz"] in clocks
    assert first["throttllem_gpu_power_w"] > 0
    assert first["throttllem_gpu_energy_joules_total"] > 0

    # A request costs energy: the counter grows.
    outcome = stream.call("gpu-energy", llm_inputs(64, 64))
    assert outcome.error is None and len(outcome.tokens) == 64
    scrape_until(
        triton,
        instance,
        lambda m: (
            m["throttllem_gpu_energy_joules_total"] > first["throttllem_gpu_energy_joules_total"]
        ),
    )

    # The exported clock is the GPU's: a lock (renewed, as a controller does) shows up.
    mid = clocks[len(clocks) // 2]
    lock = pb.SetLockedClocksRequest(min_mhz=mid, max_mhz=mid)
    assert mid not in (clocks[0], clocks[-1])  # neither the loaded nor the idle clock

    def locked(m: dict[str, float]) -> bool:
        telemetry.gpu.SetLockedClocks(lock)
        return m["throttllem_gpu_sm_clock_mhz"] == mid

    try:
        scrape_until(triton, instance, locked)
    finally:
        telemetry.gpu.ResetLockedClocks(pb.ResetLockedClocksRequest())
    back = scrape_until(triton, instance, lambda m: m["throttllem_gpu_sm_clock_mhz"] != mid)
    assert back["throttllem_gpu_sm_clock_mhz"] in clocks
