"""The small interface every engine behind the Triton model implements, and its records.

An engine is an in-flight-batching LLM executor: TensorRT-LLM's (`trtllm.py`) on a GPU, the
digital twin (`twin.py`) elsewhere. The Triton model and the telemetry server only ever see the
records below, never an engine's own types: adapters convert at the boundary.

Units: times in Unix nanoseconds (`*_unix_ns`) or milliseconds (`*_ms`), clocks in MHz, power in
mW, energy in mJ.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol


class FinishReason(enum.IntEnum):
    """Why a beam stopped, with the executor's numbering (apis.md §1)."""

    NOT_FINISHED = 0
    END_ID = 1
    STOP_WORDS = 2
    LENGTH = 3
    TIMED_OUT = 4
    CANCELLED = 5


class EngineError(RuntimeError):
    """An engine could not be built or refused an operation (the message says which)."""


@dataclass(frozen=True)
class SamplingParams:
    """Sampling inputs passed through to the engine unchanged; None means "engine default"."""

    beam_width: int = 1
    top_k: int | None = None
    top_p: float | None = None
    top_p_min: float | None = None
    top_p_decay: float | None = None
    top_p_reset_ids: int | None = None
    temperature: float | None = None
    seed: int | None = None
    min_tokens: int | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    length_penalty: float | None = None
    early_stopping: int | None = None
    beam_search_diversity_rate: float | None = None
    num_return_sequences: int | None = None


@dataclass(frozen=True)
class EngineRequest:
    """One generation request, already validated."""

    input_token_ids: Sequence[int]
    max_tokens: int
    streaming: bool = False
    end_id: int | None = None
    pad_id: int | None = None
    stop_words: list[list[int]] | None = None
    bad_words: list[list[int]] | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    exclude_input_from_output: bool = False
    return_perf_metrics: bool = False


@dataclass(frozen=True)
class PerfMetrics:
    """Per-request timings (the engine's own clock, in ns) and KV-cache block counts."""

    arrival_time_ns: int = 0
    first_scheduled_time_ns: int = 0
    first_token_time_ns: int = 0
    last_token_time_ns: int = 0
    kv_total_allocated_blocks: int = 0
    kv_new_allocated_blocks: int = 0
    kv_reused_blocks: int = 0


@dataclass(frozen=True)
class EngineResponse:
    """Tokens (or an error) for one request. With streaming, `output_token_ids` holds only the
    tokens new since the previous response; otherwise the whole output (with the prompt unless
    excluded)."""

    request_id: int
    is_final: bool
    output_token_ids: list[list[int]] = field(default_factory=list)  # one list per beam
    finish_reasons: list[FinishReason] = field(default_factory=list)
    error: str | None = None
    sequence_index: int = 0
    perf: PerfMetrics | None = None
    cum_log_probs: list[float] | None = None


@dataclass(frozen=True)
class IterationStat:
    """One engine iteration (TensorRT-LLM IterationStats); None where the engine lacks a field."""

    iter: int
    timestamp_unix_ns: int  # end of the iteration; 0 when the engine left it empty
    iter_latency_ms: float | None
    num_active_requests: int
    num_queued_requests: int | None
    num_new_active_requests: int
    num_completed_requests: int | None
    max_num_active_requests: int
    num_scheduled_requests: int
    num_context_requests: int
    num_gen_requests: int
    num_paused_requests: int
    num_ctx_tokens: int
    kv_used_blocks: int
    kv_free_blocks: int
    kv_max_blocks: int
    kv_tokens_per_block: int
    gpu_mem_usage_bytes: int = 0
    cpu_mem_usage_bytes: int = 0
    pinned_mem_usage_bytes: int = 0
    micro_batch_id: int = 0


@dataclass
class EngineFacts:
    """What the engine is: reported by the telemetry Info call and used for validation."""

    engine_kind: str  # "twin" | "tensorrtllm"
    llm: str
    gpu_name: str = ""
    tp_size: int = 1
    gpu_indices: list[int] = field(default_factory=lambda: [0])
    max_batch_size: int = 0
    max_num_tokens: int = 0
    max_input_len: int = 0  # 0: unknown
    max_seq_len: int = 0  # 0: unknown
    kv_max_blocks: int = 0
    kv_tokens_per_block: int = 0
    scheduler_policy: str = ""
    max_beam_width: int = 1
    twin_speedup: float = 0.0


@dataclass(frozen=True)
class GpuReading:
    index: int
    sm_clock_mhz: int
    locked_range_mhz: tuple[int, int] | None
    power_mw: int
    total_energy_mj: int
    power_limit_mw: int


class GpuControlError(RuntimeError):
    """A clock call the GPU refused; `permission` tells "not allowed" from "bad value", and
    `nvml_code` is the NVML return code the GPU (or twin) gave, when known."""

    def __init__(
        self, message: str, *, permission: bool = False, nvml_code: int | None = None
    ) -> None:
        super().__init__(message)
        self.permission = permission
        self.nvml_code = nvml_code


class GpuControl(Protocol):
    """The NVML-like clock surface of an engine's GPUs (the twin's; None for a real GPU, whose
    clocks the controller drives through NVML directly)."""

    def gpu_indices(self) -> list[int]: ...

    def supported_clocks_mhz(self) -> list[int]: ...  # highest first

    def max_sm_clock_mhz(self) -> int: ...

    def default_sm_clock_mhz(self) -> int: ...

    def set_locked_clocks(self, min_mhz: int, max_mhz: int, indices: Sequence[int]) -> None: ...

    def reset_locked_clocks(self, indices: Sequence[int]) -> None: ...

    def readings(self) -> list[GpuReading]: ...


class Engine(Protocol):
    """An in-flight-batching engine. Thread-safe: enqueue/cancel from request threads,
    await_responses from one response thread, drain_iteration_stats from one stats thread."""

    def enqueue(self, request: EngineRequest) -> int:
        """Queue a request; returns its id (unique within the engine)."""
        ...

    def await_responses(self, timeout_s: float) -> list[EngineResponse]:
        """Responses ready now, waiting up to `timeout_s` for the first one."""
        ...

    def cancel(self, request_id: int) -> None:
        """Ask the engine to stop a request; a final CANCELLED response follows. Unknown or
        finished ids are ignored."""
        ...

    def drain_iteration_stats(self) -> list[IterationStat]:
        """Every iteration since the previous call (a bounded queue: the oldest may be lost)."""
        ...

    def facts(self) -> EngineFacts: ...

    def gpu_control(self) -> GpuControl | None: ...

    def shutdown(self) -> None:
        """Stop the engine; blocks until every request has ended."""
        ...
