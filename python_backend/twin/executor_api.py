"""The public types of TensorRT-LLM's executor (`tensorrt_llm.bindings.executor`), twin edition.

Names, defaults and semantics follow the real bindings (apis.md §1), so code written against the
twin runs unchanged against the real executor. What the real types carry and the twin does not
model (logits, LoRA, speculative decoding, ...) is left out rather than faked. Twin-only extras
are marked as such: `Request.twin_output_len` (the hidden true output length) and
`IterationStats.twin` (clock, power, energy and latency breakdown of the iteration).

Times in `TimingMetrics` are `datetime.timedelta`s, as in the bindings; the twin counts them from
its own time zero (simulated seconds), where the real executor uses a steady clock.
"""

from __future__ import annotations

import datetime
import enum
from dataclasses import KW_ONLY, dataclass, field
from typing import Any


class ModelType(enum.Enum):
    DECODER_ONLY = 0
    ENCODER_ONLY = 1
    ENCODER_DECODER = 2


class BatchingType(enum.Enum):
    STATIC = 0
    INFLIGHT = 1


class CapacitySchedulerPolicy(enum.Enum):
    """How the capacity scheduler admits requests into the running batch."""

    MAX_UTILIZATION = 0  # admit greedily; pause requests when KV blocks run out
    GUARANTEED_NO_EVICT = 1  # admit only when blocks for the whole max length are free
    STATIC_BATCH = 2  # not modelled by the twin


class FinishReason(enum.IntEnum):
    NOT_FINISHED = 0
    END_ID = 1
    STOP_WORDS = 2
    LENGTH = 3
    TIMED_OUT = 4
    CANCELLED = 5


class RequestStage(enum.Enum):
    QUEUED = 0
    ENCODER_IN_PROGRESS = 1
    CONTEXT_IN_PROGRESS = 2
    GENERATION_IN_PROGRESS = 3
    GENERATION_COMPLETE = 4


# ----------------------------------------------------------------------------- configuration


@dataclass
class SchedulerConfig:
    capacity_scheduler_policy: CapacitySchedulerPolicy = CapacitySchedulerPolicy.GUARANTEED_NO_EVICT


@dataclass
class KvCacheConfig:
    enable_block_reuse: bool = True
    max_tokens: int | None = None  # cap on the cache size in tokens
    free_gpu_memory_fraction: float | None = None  # None: 0.9, TensorRT-LLM's default


@dataclass
class ExecutorConfig:
    max_beam_width: int = 1
    scheduler_config: SchedulerConfig = field(default_factory=SchedulerConfig)
    kv_cache_config: KvCacheConfig = field(default_factory=KvCacheConfig)
    enable_chunked_context: bool = False
    normalize_log_probs: bool = True
    iter_stats_max_iterations: int = 1000
    request_stats_max_iterations: int = 0
    batching_type: BatchingType = BatchingType.INFLIGHT
    max_batch_size: int | None = None  # None: the engine's build-time value
    max_num_tokens: int | None = None  # None: the engine's build-time value
    parallel_config: Any = None
    max_queue_size: int | None = None  # None or <= 0: unbounded


@dataclass
class SamplingConfig:
    beam_width: int = 1
    top_k: int | None = None
    top_p: float | None = None
    temperature: float | None = None
    seed: int | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    length_penalty: float | None = None
    min_tokens: int | None = None


@dataclass
class OutputConfig:
    return_log_probs: bool = False
    return_context_logits: bool = False
    return_generation_logits: bool = False
    exclude_input_from_output: bool = False
    return_encoder_output: bool = False
    return_perf_metrics: bool = False


@dataclass
class Request:
    """One generation request. Pass `max_tokens` by keyword: every version accepts that."""

    input_token_ids: list[int]
    max_tokens: int
    _: KW_ONLY
    streaming: bool = False
    sampling_config: SamplingConfig = field(default_factory=SamplingConfig)
    output_config: OutputConfig = field(default_factory=OutputConfig)
    end_id: int | None = None
    pad_id: int | None = None
    stop_words: list[list[int]] | None = None
    bad_words: list[list[int]] | None = None
    client_id: int | None = None
    priority: float = 0.5
    # Twin-only: how many tokens the "model" would generate before its end token, which a real
    # engine only learns by running it. None: the twin samples one (see lengths.py).
    twin_output_len: int | None = None


# ----------------------------------------------------------------------------- responses


@dataclass
class TimingMetrics:
    arrival_time: datetime.timedelta = datetime.timedelta(0)
    first_scheduled_time: datetime.timedelta = datetime.timedelta(0)
    first_token_time: datetime.timedelta = datetime.timedelta(0)
    last_token_time: datetime.timedelta = datetime.timedelta(0)  # 0 until the request ends


@dataclass
class KvCacheMetrics:
    num_total_allocated_blocks: int = 0
    num_new_allocated_blocks: int = 0
    num_reused_blocks: int = 0
    num_missed_blocks: int = 0
    kv_cache_hit_rate: float = 0.0


@dataclass
class RequestPerfMetrics:
    timing_metrics: TimingMetrics = field(default_factory=TimingMetrics)
    kv_cache_metrics: KvCacheMetrics = field(default_factory=KvCacheMetrics)
    first_iter: int | None = None
    last_iter: int | None = None
    iter: int | None = None


@dataclass
class Result:
    is_final: bool
    output_token_ids: list[list[int]]  # one list per beam
    finish_reasons: list[FinishReason]  # one per beam
    request_perf_metrics: RequestPerfMetrics | None = None
    sequence_index: int = 0
    is_sequence_final: bool = False
    cum_log_probs: list[float] | None = None
    log_probs: list[list[float]] | None = None


class Response:
    """A result or an error for one request. Like the bindings, reading `result` of an error
    response or `error_msg` of a good one raises."""

    __slots__ = ("_error_msg", "_result", "client_id", "request_id")

    def __init__(
        self,
        request_id: int,
        result: Result | None = None,
        *,
        error_msg: str | None = None,
        client_id: int | None = None,
    ) -> None:
        if (result is None) == (error_msg is None):
            raise ValueError("a Response carries exactly one of result and error_msg")
        self.request_id = request_id
        self._result = result
        self._error_msg = error_msg
        self.client_id = client_id

    def has_error(self) -> bool:
        return self._error_msg is not None

    @property
    def error_msg(self) -> str:
        if self._error_msg is None:
            raise RuntimeError("Cannot get error message: the response has no error")
        return self._error_msg

    @property
    def result(self) -> Result:
        if self._result is None:
            raise RuntimeError(f"Cannot get the result of an error response: {self._error_msg}")
        return self._result

    def __repr__(self) -> str:
        body = f"error={self._error_msg!r}" if self._error_msg is not None else repr(self._result)
        return f"Response(request_id={self.request_id}, {body})"


# The statistics records live in executor_stats.py; the bindings expose them in this namespace.
from .executor_stats import (  # noqa: E402
    TIMESTAMP_FORMAT,
    InflightBatchingStats,
    IterationStats,
    KvCacheStats,
    RequestStats,
    RequestStatsPerIteration,
    TwinIterationInfo,
)

__all__ = [
    "TIMESTAMP_FORMAT",
    "BatchingType",
    "CapacitySchedulerPolicy",
    "ExecutorConfig",
    "FinishReason",
    "InflightBatchingStats",
    "IterationStats",
    "KvCacheConfig",
    "KvCacheMetrics",
    "KvCacheStats",
    "ModelType",
    "OutputConfig",
    "Request",
    "RequestPerfMetrics",
    "RequestStage",
    "RequestStats",
    "RequestStatsPerIteration",
    "Response",
    "Result",
    "SamplingConfig",
    "SchedulerConfig",
    "TimingMetrics",
    "TwinIterationInfo",
]
