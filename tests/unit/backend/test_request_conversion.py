"""Triton request -> engine requests: the reference inputs, and errors that name the field."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from throttllem.backend.triton_model.convert import (
    Converted,
    Limits,
    RequestValidationError,
    convert_request,
    is_stop_request,
    parse_parameters,
    parse_slo,
)

LIMITS = Limits(max_input_len=100, max_seq_len=200, max_output_len=64, max_beam_width=1)


def inputs(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "input_ids": np.array([[11, 12, 13, 14]], np.int32),
        "input_lengths": np.array([[4]], np.int32),
        "request_output_len": np.array([[8]], np.int32),
    }
    for name, value in overrides.items():
        if value is None:
            base.pop(name, None)
        else:
            base[name] = value
    return base


def convert(
    tensors: dict[str, Any],
    params: dict[str, Any] | None = None,
    *,
    decoupled: bool = True,
    exclude: bool = False,
    limits: Limits = LIMITS,
) -> Converted:
    return convert_request(
        tensors.get, params or {}, decoupled=decoupled, default_exclude_input=exclude, limits=limits
    )


def rejected(field: str, tensors: dict[str, Any], **kw: Any) -> str:
    with pytest.raises(RequestValidationError) as info:
        convert(tensors, **kw)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
    return str(info.value)


def test_a_plain_request() -> None:
    out = convert(inputs(streaming=np.array([[True]]), end_id=np.array([[2]], np.int32)))
    (row,) = out.rows
    req = row.request
    assert list(req.input_token_ids) == [11, 12, 13, 14] and req.max_tokens == 8
    assert req.streaming and req.end_id == 2 and req.pad_id is None
    assert row.prompt_tokens == 4 and out.batch_size == 1


def test_input_lengths_trims_the_padded_ids() -> None:
    (row,) = convert(inputs(input_lengths=np.array([[2]], np.int32))).rows
    assert list(row.request.input_token_ids) == [11, 12]


def test_sampling_inputs_are_passed_through() -> None:
    (row,) = convert(
        inputs(
            temperature=np.array([[0.5]], np.float32),
            runtime_top_k=np.array([[40]], np.int32),
            runtime_top_p=np.array([[0.0]], np.float32),  # <= 0: unset (reference rule)
            random_seed=np.array([[7]], np.uint64),
            min_length=np.array([[3]], np.int32),
            len_penalty=np.array([[1.1]], np.float32),
        )
    ).rows
    s = row.request.sampling
    assert s.temperature == pytest.approx(0.5) and s.top_k == 40 and s.top_p is None
    assert s.seed == 7 and s.min_tokens == 3 and s.length_penalty == pytest.approx(1.1)


def test_exclude_input_uses_the_request_value_else_the_model_default() -> None:
    assert convert(inputs(), exclude=True).rows[0].request.exclude_input_from_output
    forced = inputs(exclude_input_in_output=np.array([[False]]))
    assert not convert(forced, exclude=True).rows[0].request.exclude_input_from_output


def test_word_lists_are_decoded() -> None:
    words = np.array([[[5, 6, 7, 0], [2, 3, -1, -1]]], np.int32)
    (row,) = convert(inputs(stop_words_list=words)).rows
    assert row.request.stop_words == [[5, 6], [7]]


def test_batched_rows_become_separate_requests() -> None:
    out = convert(
        {
            "input_ids": np.array([[1, 2, 3], [4, 5, 0]], np.int32),
            "input_lengths": np.array([[3], [2]], np.int32),
            "request_output_len": np.array([[4], [6]], np.int32),
        }
    )
    assert out.batch_size == 2
    assert [list(r.request.input_token_ids) for r in out.rows] == [[1, 2, 3], [4, 5]]
    assert [r.request.max_tokens for r in out.rows] == [4, 6]
    assert [r.batch_index for r in out.rows] == [0, 1]


@pytest.mark.parametrize("missing", ["input_ids", "input_lengths", "request_output_len"])
def test_required_inputs(missing: str) -> None:
    assert "required" in rejected(missing, inputs(**{missing: None}))


def test_input_lengths_larger_than_the_ids() -> None:
    msg = rejected("input_lengths", inputs(input_lengths=np.array([[9]], np.int32)))
    assert "9" in msg and "4 ids" in msg


@pytest.mark.parametrize("value", [0, -3])
def test_non_positive_output_length(value: int) -> None:
    rejected("request_output_len", inputs(request_output_len=np.array([[value]], np.int32)))


def test_output_length_over_the_limit() -> None:
    assert "limit of 64" in rejected(
        "request_output_len", inputs(request_output_len=np.array([[65]], np.int32))
    )
    # The sequence limit counts the prompt: 200 - 150 leaves 50.
    long_prompt = np.arange(150, dtype=np.int32)[np.newaxis]
    rejected(
        "request_output_len",
        inputs(input_ids=long_prompt, input_lengths=np.array([[150]], np.int32),
               request_output_len=np.array([[51]], np.int32)),
        limits=Limits(max_seq_len=200),
    )  # fmt: skip


def test_empty_prompt() -> None:
    rejected("input_ids", inputs(input_ids=np.zeros((1, 0), np.int32),
                                 input_lengths=np.array([[0]], np.int32)))  # fmt: skip
    rejected("input_ids", inputs(input_lengths=np.array([[0]], np.int32)))


def test_prompt_longer_than_the_engine_accepts() -> None:
    ids = np.arange(101, dtype=np.int32)[np.newaxis]
    msg = rejected("input_ids", inputs(input_ids=ids, input_lengths=np.array([[101]], np.int32)))
    assert "101" in msg and "100" in msg


def test_wrong_dtype() -> None:
    assert "INT32" in rejected("input_ids", inputs(input_ids=np.array([[1.5, 2.0]], np.float32)))


def test_streaming_needs_a_decoupled_model() -> None:
    rejected("streaming", inputs(streaming=np.array([[True]])), decoupled=False)


def test_unsupported_inputs_are_refused_unless_empty() -> None:
    convert(inputs(embedding_bias=np.zeros((1, 0), np.float32)))
    rejected("lora_weights", inputs(lora_weights=np.ones((1, 2, 2), np.float16)))


def test_beam_width_beyond_the_engine() -> None:
    rejected("beam_width", inputs(beam_width=np.array([[4]], np.int32)))


def test_slo_parameters() -> None:
    slo, hint = parse_slo({"slo_ttft_ms": 250, "slo_tbt_ms": "40.5", "output_length_hint": 12})
    assert (slo.ttft_ms, slo.tbt_ms, slo.e2e_ms, hint) == (250.0, 40.5, None, 12)
    (row,) = convert(inputs(), {"output_length_hint": 100}).rows
    assert row.output_length_hint == 8  # clipped to request_output_len


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("slo_ttft_ms", "abc"),
        ("slo_tbt_ms", -5),
        ("slo_e2e_ms", 0),
        ("slo_e2e_ms", "nan"),
        ("slo_ttft_ms", True),
        ("output_length_hint", 2.5),
        ("output_length_hint", "many"),
    ],
)
def test_malformed_slo_parameters(name: str, value: Any) -> None:
    rejected(name, inputs(), params={name: value})


def test_parameters_arrive_as_json() -> None:
    assert parse_parameters('{"slo_ttft_ms": 5}') == {"slo_ttft_ms": 5}
    assert parse_parameters("") == {} and parse_parameters(None) == {}
    with pytest.raises(RequestValidationError, match="parameters"):
        parse_parameters("[1, 2]")


def test_stop_requests() -> None:
    assert is_stop_request(inputs(stop=np.array([[True]])).get)
    assert not is_stop_request(inputs(stop=np.array([[False]])).get)
    assert not is_stop_request(inputs().get)


@given(
    prompt=st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=60),
    pad=st.integers(0, 5),
    out_len=st.integers(1, 64),
)
def test_any_valid_request_round_trips(prompt: list[int], pad: int, out_len: int) -> None:
    ids = np.array([prompt + [0] * pad], np.int32)
    (row,) = convert(
        inputs(input_ids=ids, input_lengths=np.array([[len(prompt)]], np.int32),
               request_output_len=np.array([[out_len]], np.int32))
    ).rows  # fmt: skip
    assert list(row.request.input_token_ids) == prompt
    assert row.request.max_tokens == out_len and row.prompt_tokens == len(prompt)


def test_return_emit_time_parameter() -> None:
    assert convert(inputs(), {"return_emit_time": True}).rows[0].return_emit_time
    assert convert(inputs(), {"return_emit_time": "false"}).rows[0].return_emit_time is False
    assert not convert(inputs()).rows[0].return_emit_time
    rejected("return_emit_time", inputs(), params={"return_emit_time": "sometimes"})
