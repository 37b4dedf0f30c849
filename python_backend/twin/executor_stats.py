"""Iteration and request statistics of TensorRT-LLM's executor, twin edition: the drained
records (`get_latest_iteration_stats`, `get_latest_request_stats`) with the real attribute names
and the real `to_json_str()` keys, plus the twin-only `IterationStats.twin` extra.

Re-exported by executor_api, which mirrors the bindings' single namespace.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from .iteration import LatencyBreakdown

if TYPE_CHECKING:
    from .executor_api import RequestStage

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
