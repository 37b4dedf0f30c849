"""One real tritonserver (CPU bundle) for the integration suite, always torn down."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from triton_support import (
    LLM,
    Stream,
    Telemetry,
    endpoints,
    llm_inputs,
    llm_server,
    wait_drained,
    wait_idle,
)

from throttllem.controller.triton_launcher import TritonServer
from throttllem.v1 import telemetry_pb2_grpc as pb_grpc


@pytest.fixture(scope="session")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    tmp: Path = tmp_path_factory.mktemp("triton")
    with llm_server(tmp) as server:
        yield server


@pytest.fixture
def stream(triton: TritonServer) -> Iterator[Stream]:
    s = Stream(triton.grpc_url)
    try:
        yield s
    finally:
        s.close(cancel=True)


@pytest.fixture(scope="session")
def telemetry_stub(triton: TritonServer) -> pb_grpc.TelemetryStub:
    (entry,) = endpoints(triton, LLM)
    return pb_grpc.TelemetryStub(grpc.insecure_channel(entry.endpoint))


@pytest.fixture
def drained(telemetry_stub: pb_grpc.TelemetryStub, stream: Stream) -> Iterator[None]:
    """After the test: once nothing is in flight, a probe request still works, and at its last
    iteration the engine holds no KV block (a block leaked by the test would still be held)."""
    yield
    wait_idle(telemetry_stub)
    probe = stream.call("probe-after", llm_inputs(4, 2))
    assert probe.error is None and probe.tokens and probe.finals == 1
    wait_drained(telemetry_stub)


@pytest.fixture
def telemetry(triton: TritonServer) -> Iterator[Telemetry]:
    """A subscriber on the (single) tensorrt_llm instance, for the test's duration."""
    (entry,) = endpoints(triton, LLM)
    sub = Telemetry(entry.endpoint)
    try:
        sub.wait_until(lambda: sub.snapshot is not None)
        yield sub
    finally:
        sub.close()
