"""Engine responses -> the reference model's output tensors."""

from __future__ import annotations

import numpy as np

from throttllem.backend.engines.base import EngineResponse, PerfMetrics
from throttllem.backend.triton_model.outputs import response_outputs, stack_rows


def test_beams_are_padded_with_minus_one() -> None:
    out = response_outputs(EngineResponse(request_id=1, is_final=True,
                                          output_token_ids=[[1, 2, 3], [4]]))  # fmt: skip
    assert out["output_ids"].dtype == np.int32
    assert out["output_ids"].tolist() == [[[1, 2, 3], [4, -1, -1]]]
    assert out["sequence_length"].tolist() == [[3, 1]]
    assert "batch_index" not in out and "emit_time_ns" not in out


def test_batch_index_and_perf_outputs() -> None:
    perf = PerfMetrics(arrival_time_ns=5, first_token_time_ns=9, kv_new_allocated_blocks=2)
    out = response_outputs(
        EngineResponse(request_id=1, is_final=False, output_token_ids=[[7]], perf=perf),
        batch_index=3, batch_size=4, return_perf_metrics=True, emit_time_ns=123,
    )  # fmt: skip
    assert out["batch_index"].tolist() == [[3]]
    assert out["arrival_time_ns"].tolist() == [[5]] and out["first_token_time_ns"].tolist() == [[9]]
    assert out["kv_cache_alloc_new_blocks"].tolist() == [[2]]
    assert out["emit_time_ns"].tolist() == [[123]]


def test_empty_final_response_has_a_zero_length_beam() -> None:
    out = response_outputs(EngineResponse(request_id=1, is_final=True, output_token_ids=[[]]))
    assert out["output_ids"].shape == (1, 1, 0) and out["sequence_length"].tolist() == [[0]]


def test_rows_stack_into_one_batch() -> None:
    a = response_outputs(EngineResponse(request_id=1, is_final=True, output_token_ids=[[1]]))
    b = response_outputs(EngineResponse(request_id=2, is_final=True, output_token_ids=[[2, 3]]))
    out = stack_rows([a, b])
    assert out["output_ids"].tolist() == [[[1, -1]], [[2, 3]]]
    assert out["sequence_length"].tolist() == [[1], [2]]
