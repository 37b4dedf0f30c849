"""Bad input through the real server: each gets one clear error naming the field, exactly one
final response, the server keeps serving, and the engine ends holding no KV block."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from triton_support import LLM_SYNC, MAX_INPUT_LEN, MAX_OUTPUT_LEN, Stream, llm_inputs, tensor
from tritonclient.utils import InferenceServerException

from throttllem.controller.triton_launcher import TritonServer

pytestmark = pytest.mark.integration


def without(name: str, inputs: list[Any]) -> list[Any]:
    return [t for t in inputs if t.name() != name]


def replaced(name: str, new: Any, inputs: list[Any]) -> list[Any]:
    return [new if t.name() == name else t for t in inputs]


CASES: dict[str, tuple[list[Any], dict[str, Any] | None, str]] = {
    "missing input_ids": (without("input_ids", llm_inputs()), None, "input_ids"),
    "missing request_output_len": (
        without("request_output_len", llm_inputs()), None, "request_output_len"
    ),
    "input_lengths beyond the ids": (
        replaced("input_lengths", tensor("input_lengths", np.array([[99]], np.int32)),
                 llm_inputs(8)),
        None, "input_lengths",
    ),
    "zero output length": (llm_inputs(8, 0), None, "request_output_len"),
    "negative output length": (llm_inputs(8, -4), None, "request_output_len"),
    "output length over the limit": (llm_inputs(8, MAX_OUTPUT_LEN + 1), None, "request_output_len"),
    "empty prompt": (
        [tensor("input_ids", np.zeros((1, 0), np.int32)),
         tensor("input_lengths", np.array([[0]], np.int32)),
         tensor("request_output_len", np.array([[4]], np.int32))],
        None, "input_ids",
    ),
    "prompt longer than the engine's maximum input": (
        llm_inputs(MAX_INPUT_LEN + 1), None, "input_ids"
    ),
    "wrong dtype": (
        replaced("input_ids", tensor("input_ids", np.array([[1.0, 2.0]], np.float32)),
                 llm_inputs(2)),
        None, "input_ids",
    ),
    "malformed slo_ttft_ms": (llm_inputs(), {"slo_ttft_ms": "soon"}, "slo_ttft_ms"),
    "negative slo_e2e_ms": (llm_inputs(), {"slo_e2e_ms": -100}, "slo_e2e_ms"),
    "fractional length hint": (llm_inputs(), {"output_length_hint": "2.5"}, "output_length_hint"),
    "stop of an unknown request": (llm_inputs(stop=True), None, "stop"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gets_one_clear_final_error(stream: Stream, drained: None, case: str) -> None:
    inputs, parameters, field = CASES[case]
    out = stream.call(f"bad-{case}", inputs, parameters=parameters)
    assert out.finals == 1 and len(out.messages) == 1
    assert out.error is not None and field in out.error, out.error
    # The stream still serves, and nothing more arrives for the bad request.
    ok = stream.call("after-bad", llm_inputs(4, 3, streaming=True))
    assert ok.error is None and len(ok.tokens) == 3
    assert stream.stray == []


def test_stop_of_a_finished_request(stream: Stream, drained: None) -> None:
    assert stream.call("finished-1", llm_inputs(4, 2)).error is None
    out = stream.call("finished-1", llm_inputs(stop=True))
    assert out.finals == 1 and out.error is not None
    assert "stop" in out.error and "finished-1" in out.error


def test_streaming_on_a_non_decoupled_model(triton: TritonServer, drained: None) -> None:
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    with pytest.raises(InferenceServerException, match="streaming"):
        client.infer(LLM_SYNC, llm_inputs(4, 2, streaming=True))
    assert client.infer(LLM_SYNC, llm_inputs(4, 2)).as_numpy("output_ids").shape == (1, 1, 2)
