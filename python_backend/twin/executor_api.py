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
import json
from collections.abc import Iterable
from dataclasses import KW_ONLY, dataclass, field, fields
from typing import Any

from .iteration import LatencyBreakdown

# The real executor formats IterationStats.timestamp with this pattern.
TIMESTAMP_FORMAT = "%m-%d-%Y %H:%M:%S.%f"
# JSON keys are the C++ member names: camelCase, units in capitals (iter_latency_ms ->
# iterLatencyMS); the twin's own keys follow the same rule (sm_clock_mhz -> smClockMHz).
_UNIT_PARTS = {"ms": "MS", "mhz": "MHz", "mj": "MJ", "w": "W", "s": "S"}


def camel_key(name: str) -> str:
    """The executor's JSON key for a Python attribute name."""
    first, *rest = name.split("_")
    return first + "".join(_UNIT_PARTS.get(part) or part.capitalize() for part in rest)


def _json_fields(obj: Any, names: Iterable[str]) -> dict[str, Any]:
    return {camel_key(name): getattr(obj, name) for name in names}


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


# ----------------------------------------------------------------------------- statistics


@dataclass(slots=True)
class KvCacheStats:
    max_num_blocks: int = 0
    free_num_blocks: int = 0
    used_num_blocks: int = 0
    tokens_per_block: int = 0
    alloc_total_blocks: int = 0  # cumulative, as the block manager counts them
    alloc_new_blocks: int = 0  # cumulative: allocations not served from reused blocks
    reused_blocks: int = 0
    missed_blocks: int = 0
    cache_hit_rate: float = 0.0

    def to_json_dict(self) -> dict[str, Any]:
        return _json_fields(self, (f.name for f in fields(self)))


@dataclass(slots=True)
class InflightBatchingStats:
    num_scheduled_requests: int = 0
    num_context_requests: int = 0
    num_gen_requests: int = 0
    num_paused_requests: int = 0
    num_ctx_tokens: int = 0
    micro_batch_id: int = 0
    avg_num_decoded_tokens_per_iter: float = 0.0

    def to_json_dict(self) -> dict[str, Any]:
        return _json_fields(self, (f.name for f in fields(self)))


@dataclass(slots=True)
class TwinIterationInfo:
    """Twin-only: what the simulated GPUs did during one iteration."""

    start_s: float  # simulated seconds since the twin's time zero
    end_s: float
    sm_clock_mhz: int
    power_w: float  # board power during the iteration, summed over the engine's GPUs
    energy_mj: float  # energy of this iteration, all GPUs (the cumulative counter: the GPUs')
    breakdown: LatencyBreakdown

    def to_json_dict(self) -> dict[str, Any]:
        out = _json_fields(self, ("start_s", "end_s", "sm_clock_mhz", "power_w", "energy_mj"))
        b = self.breakdown
        out.update(_json_fields(b, (f.name for f in fields(b) if f.name != "sm_clock_mhz")))
        return out


_ITERATION_FIELDS = (
    "iter",
    "iter_latency_ms",
    "new_active_requests_queue_latency_ms",
    "num_new_active_requests",
    "num_active_requests",
    "num_queued_requests",
    "num_completed_requests",
    "max_num_active_requests",
    "max_batch_size_static",
    "max_num_tokens_static",
    "gpu_mem_usage",
    "cpu_mem_usage",
    "pinned_mem_usage",
)


class IterationStats:
    """Statistics of one engine iteration, with the attribute names of the bindings.

    Built once per simulated iteration, so it is cheap to make and costs only when read: the
    `timestamp` string (the END of the iteration) and the nested records are built on first
    access. The nested records may be given as tuples of their fields in declaration order.
    """

    __slots__ = (
        "_epoch",
        "_ifb",
        "_kv",
        "_timestamp",
        "_twin",
        "cpu_mem_usage",
        "end_s",
        "gpu_mem_usage",
        "iter",
        "iter_latency_ms",
        "max_batch_size_static",
        "max_num_active_requests",
        "max_num_tokens_static",
        "new_active_requests_queue_latency_ms",
        "num_active_requests",
        "num_completed_requests",
        "num_new_active_requests",
        "num_queued_requests",
        "pinned_mem_usage",
    )

    static_batching_stats = None  # in-flight batching only
    spec_decoding_stats = None  # no speculative decoding

    def __init__(
        self,
        end_s: float,
        epoch: datetime.datetime,
        iter: int,
        iter_latency_ms: float,
        new_active_requests_queue_latency_ms: float,
        num_new_active_requests: int,
        num_active_requests: int,
        num_queued_requests: int,
        num_completed_requests: int,
        max_num_active_requests: int,
        max_batch_size_static: int,
        max_num_tokens_static: int,
        gpu_mem_usage: int,
        kv_cache_stats: KvCacheStats | tuple[Any, ...],
        inflight_batching_stats: InflightBatchingStats | tuple[Any, ...],
        twin: TwinIterationInfo | tuple[Any, ...] | None = None,
        cpu_mem_usage: int = 0,
        pinned_mem_usage: int = 0,
    ) -> None:
        self.end_s = end_s  # twin-only: simulated seconds at the end of the iteration
        self._epoch = epoch
        self._timestamp: str | None = None
        self.iter = iter
        self.iter_latency_ms = iter_latency_ms
        self.new_active_requests_queue_latency_ms = new_active_requests_queue_latency_ms
        self.num_new_active_requests = num_new_active_requests
        self.num_active_requests = num_active_requests
        self.num_queued_requests = num_queued_requests
        self.num_completed_requests = num_completed_requests
        self.max_num_active_requests = max_num_active_requests
        self.max_batch_size_static = max_batch_size_static
        self.max_num_tokens_static = max_num_tokens_static
        self.gpu_mem_usage = gpu_mem_usage
        self.cpu_mem_usage = cpu_mem_usage
        self.pinned_mem_usage = pinned_mem_usage
        self._kv = kv_cache_stats
        self._ifb = inflight_batching_stats
        self._twin = twin

    @property
    def kv_cache_stats(self) -> KvCacheStats:
        kv = self._kv
        if isinstance(kv, tuple):
            kv = self._kv = KvCacheStats(*kv)
        return kv

    @property
    def inflight_batching_stats(self) -> InflightBatchingStats:
        ifb = self._ifb
        if isinstance(ifb, tuple):
            ifb = self._ifb = InflightBatchingStats(*ifb)
        return ifb

    @property
    def twin(self) -> TwinIterationInfo | None:
        """Twin-only: clock, power, energy and latency breakdown of the iteration."""
        twin = self._twin
        if isinstance(twin, tuple):
            twin = self._twin = TwinIterationInfo(*twin)
        return twin

    @property
    def timestamp(self) -> str:
        if self._timestamp is None:
            when = self._epoch + datetime.timedelta(seconds=self.end_s)
            self._timestamp = when.strftime(TIMESTAMP_FORMAT)
        return self._timestamp

    def to_json_dict(self, *, include_twin: bool = True) -> dict[str, Any]:
        out = {"timestamp": self.timestamp, **_json_fields(self, _ITERATION_FIELDS)}
        out["kvCacheStats"] = self.kv_cache_stats.to_json_dict()
        out["inflightBatchingStats"] = self.inflight_batching_stats.to_json_dict()
        # Fixed batch limits: the runtime and the tuner's values are the static ones.
        for kind in ("maxBatchSize", "maxNumTokens"):
            for variant in ("TunerRecommended", "Runtime"):
                out[kind + variant] = out[kind + "Static"]
        out["staticBatchingStats"] = out["specDecodingStats"] = None
        if include_twin and self.twin is not None:
            out["twin"] = self.twin.to_json_dict()
        return out

    def to_json_str(self, *, include_twin: bool = True) -> str:
        """The record as JSON with the executor's camelCase keys (plus a twin-only "twin" key)."""
        return json.dumps(self.to_json_dict(include_twin=include_twin))

    def __repr__(self) -> str:
        return f"IterationStats({self.to_json_str(include_twin=False)})"


@dataclass(slots=True)
class RequestStats:
    id: int
    stage: RequestStage
    context_prefill_position: int
    num_generated_tokens: int
    avg_num_decoded_tokens_per_iter: float
    scheduled: bool
    paused: bool
    alloc_total_blocks_per_request: int = 0
    alloc_new_blocks_per_request: int = 0
    reused_blocks_per_request: int = 0
    missed_blocks_per_request: int = 0
    kv_cache_hit_rate_per_request: float = 0.0


@dataclass(slots=True)
class RequestStatsPerIteration:
    iter: int
    request_stats: list[RequestStats]


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
