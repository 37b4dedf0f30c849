"""Triton request -> engine requests, with validation errors that name the field.

Inputs follow tensorrtllm_backend's `tensorrt_llm` model (apis.md §2): `input_ids` [B, L],
`input_lengths` and `request_output_len` [B, 1] (required), optional scalars [B, 1] (`end_id`,
`pad_id`, `streaming`, `stop`, `exclude_input_in_output`, `return_perf_metrics`, sampling
inputs) and word lists [B, 2, L]. Each of the B rows becomes one engine request.

Optional Triton request parameters: `slo_ttft_ms`, `slo_tbt_ms`, `slo_e2e_ms` (positive numbers,
milliseconds), `output_length_hint` (a positive integer: the client's predicted output length,
clipped to `request_output_len`) and `return_emit_time` (true: every response carries
`emit_time_ns`, see outputs.py).

Nothing here imports Triton: the caller passes a function that returns an input as a numpy
array (or None when absent), so the unit tests drive it directly.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ..engines.base import EngineRequest, SamplingParams
from ..telemetry.hub import Slo

GetInput = Callable[[str], "np.ndarray[Any, Any] | None"]

SLO_PARAMETERS = {"slo_ttft_ms": "ttft_ms", "slo_tbt_ms": "tbt_ms", "slo_e2e_ms": "e2e_ms"}
LENGTH_HINT_PARAMETER = "output_length_hint"
# Request parameter: add only the `emit_time_ns` output (what return_perf_metrics adds, minus
# the nine reference perf tensors) to every response; for latency measurements.
EMIT_TIME_PARAMETER = "return_emit_time"

# Sampling inputs: Triton input name -> (SamplingParams field, kind).
_SAMPLING_INPUTS: dict[str, tuple[str, str]] = {
    "beam_width": ("beam_width", "int"),
    "runtime_top_k": ("top_k", "int"),
    "runtime_top_p": ("top_p", "float"),
    "runtime_top_p_min": ("top_p_min", "float"),
    "runtime_top_p_decay": ("top_p_decay", "float"),
    "runtime_top_p_reset_ids": ("top_p_reset_ids", "int"),
    "temperature": ("temperature", "float"),
    "random_seed": ("seed", "int"),
    "min_length": ("min_tokens", "int"),
    "repetition_penalty": ("repetition_penalty", "float"),
    "presence_penalty": ("presence_penalty", "float"),
    "frequency_penalty": ("frequency_penalty", "float"),
    "len_penalty": ("length_penalty", "float"),
    "early_stopping": ("early_stopping", "int"),
    "beam_search_diversity_rate": ("beam_search_diversity_rate", "float"),
    "num_return_sequences": ("num_return_sequences", "int"),
}


# Inputs the reference model declares that this backend does not implement: accepted when empty
# (the reference preprocessing always sends an empty embedding_bias), refused otherwise.
UNSUPPORTED_INPUTS = (
    "embedding_bias", "prompt_embedding_table", "lora_task_id", "lora_weights", "lora_config",
    "draft_input_ids", "draft_logits", "return_log_probs", "return_context_logits",
    "return_generation_logits",
)  # fmt: skip


class RequestValidationError(ValueError):
    """A request the model refuses; the message starts with the field it is about."""

    def __init__(self, field_name: str, problem: str) -> None:
        super().__init__(f"{field_name}: {problem}")
        self.field = field_name


@dataclass(frozen=True)
class Limits:
    """What the engine accepts (0: unknown, not checked)."""

    max_input_len: int = 0
    max_seq_len: int = 0
    max_output_len: int = 0
    max_beam_width: int = 1


@dataclass(frozen=True)
class ConvertedRow:
    """One engine request with what the backend keeps beside it."""

    request: EngineRequest
    batch_index: int
    prompt_tokens: int
    slo: Slo = field(default_factory=Slo)
    output_length_hint: int | None = None
    return_emit_time: bool = False


@dataclass(frozen=True)
class Converted:
    rows: list[ConvertedRow]
    batch_size: int


def _scalar(get: GetInput, name: str, row: int, batch: int) -> Any:
    """Row `row` of a [B, 1] (or [B], or [1] shared by every row) input as a Python scalar;
    None when the input is absent."""
    arr = get(name)
    if arr is None:
        return None
    flat = np.asarray(arr).reshape(-1)
    if flat.size == batch:
        return flat[row].item()
    if flat.size == 1:
        return flat[0].item()
    raise RequestValidationError(
        name, f"expected one value per batch row ([{batch}, 1]), got shape {list(np.shape(arr))}"
    )


def _integer_array(name: str, arr: np.ndarray[Any, Any]) -> None:
    if arr.dtype.kind not in "iu":
        raise RequestValidationError(name, f"expected INT32 values, got {arr.dtype}")


def _word_list(get: GetInput, name: str, row: int, batch: int) -> list[list[int]] | None:
    """A [B, 2, L] word list (flattened ids, then cumulative end offsets padded with -1)."""
    arr = get(name)
    if arr is None:
        return None
    arr = np.asarray(arr)
    _integer_array(name, arr)
    if arr.ndim == 2:
        arr = arr[np.newaxis]
    if arr.ndim != 3 or arr.shape[0] != batch or arr.shape[1] != 2:
        raise RequestValidationError(name, f"expected shape [{batch}, 2, L], got {list(arr.shape)}")
    ids, offsets = arr[row][0].tolist(), arr[row][1].tolist()
    words: list[list[int]] = []
    start = 0
    for end in offsets:
        if end < 0:
            break
        if end < start or end > len(ids):
            raise RequestValidationError(name, f"offset {end} outside 0..{len(ids)} or decreasing")
        words.append(ids[start:end])
        start = end
    return [w for w in words if w] or None


def parse_slo(parameters: Mapping[str, Any]) -> tuple[Slo, int | None]:
    """SLO targets and the output length hint from the Triton request parameters."""
    values: dict[str, float] = {}
    for name, attr in SLO_PARAMETERS.items():
        if name in parameters:
            values[attr] = _positive_number(name, parameters[name])
    hint: int | None = None
    if LENGTH_HINT_PARAMETER in parameters:
        raw = parameters[LENGTH_HINT_PARAMETER]
        number = _positive_number(LENGTH_HINT_PARAMETER, raw)
        if number != int(number):
            raise RequestValidationError(
                LENGTH_HINT_PARAMETER, f"expected a whole number of tokens, got {raw!r}"
            )
        hint = int(number)
    return Slo(**values), hint


def _flag(name: str, raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.lower() in ("true", "false", "1", "0"):
        return raw.lower() in ("true", "1")
    raise RequestValidationError(name, f"expected true or false, got {raw!r}")


def _positive_number(name: str, raw: Any) -> float:
    if isinstance(raw, bool):
        raise RequestValidationError(name, f"expected a positive number, got {raw!r}")
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise RequestValidationError(name, f"expected a positive number, got {raw!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise RequestValidationError(name, f"expected a positive number, got {raw!r}")
    return value


def parse_parameters(raw: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """Triton request parameters (the Python backend hands them over as a JSON string)."""
    if raw is None or raw == "":
        return {}
    if isinstance(raw, Mapping):
        return dict(raw)
    try:
        value = json.loads(raw)
    except ValueError:
        raise RequestValidationError("parameters", f"not a JSON object: {raw[:80]!r}") from None
    if not isinstance(value, dict):
        raise RequestValidationError("parameters", "not a JSON object")
    return value


def _sampling(get: GetInput, row: int, batch: int, limits: Limits) -> SamplingParams:
    kwargs: dict[str, Any] = {}
    for input_name, (attr, kind) in _SAMPLING_INPUTS.items():
        value = _scalar(get, input_name, row, batch)
        if value is None:
            continue
        if kind == "int":
            if isinstance(value, float) and not value.is_integer():
                raise RequestValidationError(input_name, f"expected an integer, got {value}")
            value = int(value)
        else:
            value = float(value)
            if not math.isfinite(value):
                raise RequestValidationError(input_name, f"expected a finite number, got {value}")
        kwargs[attr] = value
    if kwargs.get("top_p") is not None and kwargs["top_p"] <= 0:
        kwargs["top_p"] = None  # the reference model's rule: top_p <= 0 means "not set"
    beam = int(kwargs.get("beam_width", 1))
    if beam < 1 or (limits.max_beam_width and beam > limits.max_beam_width):
        raise RequestValidationError(
            "beam_width", f"must be between 1 and {limits.max_beam_width}, got {beam}"
        )
    return SamplingParams(**kwargs)


def convert_request(
    get: GetInput,
    parameters: Mapping[str, Any],
    *,
    decoupled: bool,
    default_exclude_input: bool,
    limits: Limits,
) -> Converted:
    """Validate and convert one Triton request (every batch row) or raise
    RequestValidationError naming the first bad field."""
    ids = get("input_ids")
    if ids is None:
        raise RequestValidationError("input_ids", "a value is required")
    ids = np.asarray(ids)
    _integer_array("input_ids", ids)
    if ids.ndim == 1:
        ids = ids[np.newaxis]
    if ids.ndim != 2:
        raise RequestValidationError("input_ids", f"expected shape [B, L], got {list(ids.shape)}")
    batch = int(ids.shape[0])
    if batch == 0:
        raise RequestValidationError("input_ids", "the batch is empty")
    for name in UNSUPPORTED_INPUTS:
        value = get(name)
        if value is not None and np.asarray(value).size and np.asarray(value).any():
            raise RequestValidationError(name, "not supported by this backend")
    slo, hint = parse_slo(parameters)
    emit = _flag(EMIT_TIME_PARAMETER, parameters.get(EMIT_TIME_PARAMETER, False))
    rows: list[ConvertedRow] = []
    for row in range(batch):
        converted = _convert_row(
            get, ids[row], row, batch, decoupled, default_exclude_input, limits, slo, hint
        )
        rows.append(replace(converted, return_emit_time=emit) if emit else converted)
    return Converted(rows=rows, batch_size=batch)


def _convert_row(
    get: GetInput,
    row_ids: np.ndarray[Any, Any],
    row: int,
    batch: int,
    decoupled: bool,
    default_exclude_input: bool,
    limits: Limits,
    slo: Slo,
    hint: int | None,
) -> ConvertedRow:
    tokens = row_ids.tolist()
    length = _scalar(get, "input_lengths", row, batch)
    if length is None:
        raise RequestValidationError("input_lengths", "a value is required")
    length = int(length)
    if length > len(tokens):
        raise RequestValidationError(
            "input_lengths", f"{length} is larger than the {len(tokens)} ids in input_ids"
        )
    if length < 0:
        raise RequestValidationError("input_lengths", f"must not be negative, got {length}")
    tokens = tokens[:length]
    if not tokens:
        raise RequestValidationError("input_ids", "the prompt is empty")
    if limits.max_input_len and len(tokens) > limits.max_input_len:
        raise RequestValidationError(
            "input_ids",
            f"the prompt has {len(tokens)} tokens, more than the engine's maximum input "
            f"length {limits.max_input_len}",
        )
    max_tokens = _scalar(get, "request_output_len", row, batch)
    if max_tokens is None:
        raise RequestValidationError("request_output_len", "a value is required")
    max_tokens = int(max_tokens)
    if max_tokens <= 0:
        raise RequestValidationError("request_output_len", f"must be positive, got {max_tokens}")
    limit = limits.max_output_len
    if limits.max_seq_len:
        room = limits.max_seq_len - len(tokens)
        limit = min(limit, room) if limit else room
    if limit and max_tokens > limit:
        raise RequestValidationError(
            "request_output_len",
            f"{max_tokens} is over the limit of {limit} tokens for a {len(tokens)}-token prompt",
        )
    streaming = bool(_scalar(get, "streaming", row, batch) or False)
    if streaming and not decoupled:
        raise RequestValidationError(
            "streaming", "streaming needs a decoupled model (model_transaction_policy)"
        )
    exclude = _scalar(get, "exclude_input_in_output", row, batch)
    end_id = _scalar(get, "end_id", row, batch)
    pad_id = _scalar(get, "pad_id", row, batch)
    request = EngineRequest(
        input_token_ids=tokens,
        max_tokens=max_tokens,
        streaming=streaming,
        end_id=None if end_id is None else int(end_id),
        pad_id=None if pad_id is None else int(pad_id),
        stop_words=_word_list(get, "stop_words_list", row, batch),
        bad_words=_word_list(get, "bad_words_list", row, batch),
        sampling=_sampling(get, row, batch, limits),
        exclude_input_from_output=default_exclude_input if exclude is None else bool(exclude),
        return_perf_metrics=bool(_scalar(get, "return_perf_metrics", row, batch) or False),
    )
    return ConvertedRow(
        request=request,
        batch_index=row,
        prompt_tokens=len(tokens),
        slo=slo,
        output_length_hint=None if hint is None else min(hint, max_tokens),
    )


def is_stop_request(get: GetInput) -> bool:
    """A request whose `stop` input is true cancels the in-flight request with its id."""
    arr = get("stop")
    return arr is not None and bool(np.asarray(arr).reshape(-1)[:1].any())
