"""Tokens through a real tritonserver: streaming, non-streaming, cancellation, stop."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from triton_support import LLM_SYNC, Stream, Telemetry, llm_inputs, tensor

from throttllem.controller.triton_launcher import TritonServer
from throttllem.v1 import telemetry_pb2 as pb

pytestmark = pytest.mark.integration


def test_streaming_sends_one_token_per_response_and_one_final(
    stream: Stream, drained: None
) -> None:
    out = stream.call("s1", llm_inputs(16, 12, streaming=True))
    assert out.error is None
    assert len(out.tokens) == 12 and out.finals == 1 and out.messages[-1].final
    assert all(len(m.tokens) == 1 for m in out.messages)


def test_non_streaming_over_the_decoupled_model(stream: Stream, drained: None) -> None:
    out = stream.call("n1", llm_inputs(16, 7))
    assert out.error is None and len(out.messages) == 1 and out.finals == 1
    assert len(out.tokens) == 7  # exclude_input_in_output: the prompt is not repeated


def test_non_decoupled_model_answers_a_plain_infer(triton: TritonServer) -> None:
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    inputs = [*llm_inputs(5, 6), tensor("exclude_input_in_output", np.array([[False]]))]
    result = client.infer(LLM_SYNC, inputs)
    ids = result.as_numpy("output_ids")
    assert ids.shape == (1, 1, 11) and ids[0, 0, :5].tolist() == [1, 2, 3, 4, 5]
    assert result.as_numpy("sequence_length").tolist() == [[11]]


def test_concurrent_streams_each_get_all_their_tokens(triton: TritonServer, drained: None) -> None:
    streams = [Stream(triton.grpc_url) for _ in range(6)]
    try:
        for i, s in enumerate(streams):
            s.send(f"c{i}", llm_inputs(8 + i, 10 + i, streaming=True))
        outcomes = [s.collect(f"c{i}") for i, s in enumerate(streams)]
    finally:
        for s in streams:
            s.close()
    assert [len(o.tokens) for o in outcomes] == [10 + i for i in range(6)]
    assert all(o.finals == 1 and o.error is None for o in outcomes)


def test_client_cancellation_stops_the_engine_request(
    triton: TritonServer, telemetry: Telemetry, drained: None
) -> None:
    s = Stream(triton.grpc_url)
    s.send("cancel-me", llm_inputs(8, 1000, streaming=True))
    first = s._inbox.get(timeout=30)
    assert first.request_id == "cancel-me" and not first.final
    s.close(cancel=True)  # cancels every request of the stream

    def arrivals() -> list[pb.RequestArrived]:
        return [a for a in telemetry.of_kind("arrived") if a.triton_request_id == "cancel-me"]

    telemetry.wait_until(lambda: bool(arrivals()))
    rid = arrivals()[0].request_id

    def ended() -> bool:
        return any(f.request_id == rid for f in telemetry.of_kind("finished"))

    telemetry.wait_until(ended)
    (cancel,) = [c for c in telemetry.of_kind("cancelled") if c.request_id == rid]
    assert cancel.cause == pb.CANCEL_CAUSE_CLIENT
    (finished,) = [f for f in telemetry.of_kind("finished") if f.request_id == rid]
    assert finished.finish_reason == pb.FINISH_REASON_CANCELLED
    assert 1 <= finished.output_tokens < 1000


def test_stop_request_cancels_by_id(triton: TritonServer, stream: Stream, drained: None) -> None:
    victim = Stream(triton.grpc_url)
    try:
        victim.send("victim-1", llm_inputs(8, 1000, streaming=True))
        first = victim._inbox.get(timeout=30)
        assert first.request_id == "victim-1"
        stopped = stream.call("victim-1", llm_inputs(8, 1, stop=True))
        assert stopped.error is None and stopped.finals == 1
        rest = victim.collect("victim-1")
        assert rest.finals == 1 and rest.error is None
        assert 1 + len(rest.tokens) < 1000
    finally:
        victim.close()


def test_perf_outputs_are_returned_on_request(stream: Stream) -> None:
    out = stream.call("perf", llm_inputs(8, 3, streaming=True, perf=True))
    with_tokens = [m for m in out.messages if m.tokens]
    assert len(with_tokens) == 3
    assert all(0 < m.emit_ns <= m.received_ns for m in with_tokens)
