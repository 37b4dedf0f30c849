"""Several instances of the model: each its own process and telemetry endpoint, found without
per-instance configuration (registry and fixed-port schemes)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from triton_support import LLM, Stream, Telemetry, endpoints, llm_inputs, llm_server

from throttllem.controller.triton_launcher import TritonServer, free_port
from throttllem.v1 import telemetry_pb2 as pb
from throttllem.v1 import telemetry_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration

INSTANCES = 3


@pytest.fixture(scope="module")
def base_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def multi(tmp_path_factory: pytest.TempPathFactory, base_port: int) -> Iterator[TritonServer]:
    tmp: Path = tmp_path_factory.mktemp("multi")
    extra = {"telemetry_port": str(base_port)}
    with llm_server(tmp, instances=INSTANCES, extra=extra, text=False) as server:
        yield server


def test_every_instance_registers_its_own_endpoint(multi: TritonServer, base_port: int) -> None:
    found = endpoints(multi, LLM)
    assert [e.instance_name for e in found] == [f"{LLM}_0_{i}" for i in range(INSTANCES)]
    assert len({e.pid for e in found}) == INSTANCES  # one stub process each
    # Fixed ports: instance k listens on base + k.
    assert [e.endpoint for e in found] == [f"127.0.0.1:{base_port + i}" for i in range(INSTANCES)]
    for e in found:
        info = pb_grpc.TelemetryStub(grpc.insecure_channel(e.endpoint)).GetInfo(pb.GetInfoRequest())
        assert info.instance_name == e.instance_name and info.pid == e.pid


def test_requests_spread_over_instances_are_all_accounted_for(multi: TritonServer) -> None:
    subs = [Telemetry(e.endpoint) for e in endpoints(multi, LLM)]
    streams = [Stream(multi.grpc_url) for _ in range(8)]
    try:
        for i, s in enumerate(streams):
            s.send(f"m{i}", llm_inputs(6, 20, streaming=True))
        outcomes = [s.collect(f"m{i}") for i, s in enumerate(streams)]
        assert all(len(o.tokens) == 20 and o.finals == 1 for o in outcomes)

        def finished() -> int:
            return sum(len(t.of_kind("finished")) for t in subs)

        subs[0].wait_until(lambda: finished() == 8)
        served = sorted(a.triton_request_id for t in subs for a in t.of_kind("arrived"))
        assert served == sorted(f"m{i}" for i in range(8))
        totals = [f.output_tokens for t in subs for f in t.of_kind("finished")]
        assert totals == [20] * 8
    finally:
        for s in streams:
            s.close()
        for t in subs:
            t.close()
