"""An `Engine` over anything with TensorRT-LLM's executor API: the real bindings or the twin.

The adapter takes the executor object and the module that holds its types (`api`: the real
`tensorrt_llm.bindings.executor`, or `throttllem.backend.twin.executor_api`), so the same code
path runs on a GPU, against the twin, and against the stand-in executor of the unit tests.
Fields that vary between TensorRT-LLM versions are read with getattr and a default.
"""

from __future__ import annotations

import datetime
import logging
import threading
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

from .base import (
    EngineError,
    EngineFacts,
    EngineRequest,
    EngineResponse,
    FinishReason,
    GpuControl,
    IterationStat,
    PerfMetrics,
    SamplingParams,
)

logger = logging.getLogger(__name__)

TIMESTAMP_FORMAT = "%m-%d-%Y %H:%M:%S.%f"
_US = datetime.timedelta(microseconds=1)

# SamplingConfig keyword names that changed between TensorRT-LLM versions: new -> old.
_SAMPLING_ALIASES = {"seed": "random_seed", "min_tokens": "min_length"}


def timedelta_ns(value: Any) -> int:
    """A bindings time (datetime.timedelta, or a number of seconds) in integer nanoseconds."""
    if value is None:
        return 0
    if isinstance(value, datetime.timedelta):
        return (value // _US) * 1000
    try:
        return int(float(value) * 1e9)
    except (TypeError, ValueError):
        return 0


def parse_timestamp_ns(value: Any) -> int:
    """IterationStats.timestamp ("%m-%d-%Y %H:%M:%S.%f", local time) as Unix ns; 0 if empty or
    unreadable (one TensorRT-LLM version left it empty)."""
    if not value or not isinstance(value, str):
        return 0
    try:
        when = datetime.datetime.strptime(value, TIMESTAMP_FORMAT)
    except ValueError:
        return 0
    return int(when.timestamp() * 1_000_000) * 1000


def _int(obj: Any, name: str, default: int = 0) -> int:
    value = getattr(obj, name, None) if obj is not None else None
    return default if value is None else int(value)


def _opt_int(obj: Any, name: str) -> int | None:
    value = getattr(obj, name, None) if obj is not None else None
    return None if value is None else int(value)


def construct(cls: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
    """Build a bindings object, retrying with older keyword names, then attribute by attribute
    on a default instance (dropping, with a warning, what this version does not have)."""
    try:
        return cls(*args, **kwargs)
    except TypeError:
        pass
    renamed = {_SAMPLING_ALIASES.get(k, k): v for k, v in kwargs.items()}
    if renamed != dict(kwargs):
        try:
            return cls(*args, **renamed)
        except TypeError:
            pass
    obj = cls(*args)
    for name, value in kwargs.items():
        for candidate in (name, _SAMPLING_ALIASES.get(name)):
            if candidate and hasattr(obj, candidate):
                setattr(obj, candidate, value)
                break
        else:
            logger.warning("%s has no field %r in this version: ignored", cls, name)
    return obj


def sampling_kwargs(params: SamplingParams) -> dict[str, Any]:
    """SamplingConfig keywords for the set fields (beam_width always)."""
    out: dict[str, Any] = {}
    for name, value in vars(params).items():
        if name == "beam_width" or value is None:
            continue
        out[name] = value
    return out


def convert_iteration_stats(stats: Any) -> IterationStat:
    """One bindings IterationStats as an IterationStat (defensive about missing fields)."""
    kv = getattr(stats, "kv_cache_stats", None)
    ifb = getattr(stats, "inflight_batching_stats", None)
    latency = getattr(stats, "iter_latency_ms", None)
    return IterationStat(
        iter=_int(stats, "iter"),
        timestamp_unix_ns=parse_timestamp_ns(getattr(stats, "timestamp", "")),
        iter_latency_ms=None if latency is None else float(latency),
        num_active_requests=_int(stats, "num_active_requests"),
        num_queued_requests=_opt_int(stats, "num_queued_requests"),
        num_new_active_requests=_int(stats, "num_new_active_requests"),
        num_completed_requests=_opt_int(stats, "num_completed_requests"),
        max_num_active_requests=_int(stats, "max_num_active_requests"),
        num_scheduled_requests=_int(ifb, "num_scheduled_requests"),
        num_context_requests=_int(ifb, "num_context_requests"),
        num_gen_requests=_int(ifb, "num_gen_requests"),
        num_paused_requests=_int(ifb, "num_paused_requests"),
        num_ctx_tokens=_int(ifb, "num_ctx_tokens"),
        kv_used_blocks=_int(kv, "used_num_blocks"),
        kv_free_blocks=_int(kv, "free_num_blocks"),
        kv_max_blocks=_int(kv, "max_num_blocks"),
        kv_tokens_per_block=_int(kv, "tokens_per_block"),
        gpu_mem_usage_bytes=_int(stats, "gpu_mem_usage"),
        cpu_mem_usage_bytes=_int(stats, "cpu_mem_usage"),
        pinned_mem_usage_bytes=_int(stats, "pinned_mem_usage"),
        micro_batch_id=_int(ifb, "micro_batch_id"),
    )


def convert_perf(result: Any) -> PerfMetrics | None:
    perf = getattr(result, "request_perf_metrics", None)
    if perf is None:
        return None
    timing = getattr(perf, "timing_metrics", None)
    kv = getattr(perf, "kv_cache_metrics", None)
    return PerfMetrics(
        arrival_time_ns=timedelta_ns(getattr(timing, "arrival_time", None)),
        first_scheduled_time_ns=timedelta_ns(getattr(timing, "first_scheduled_time", None)),
        first_token_time_ns=timedelta_ns(getattr(timing, "first_token_time", None)),
        last_token_time_ns=timedelta_ns(getattr(timing, "last_token_time", None)),
        kv_total_allocated_blocks=_int(kv, "num_total_allocated_blocks"),
        kv_new_allocated_blocks=_int(kv, "num_new_allocated_blocks"),
        kv_reused_blocks=_int(kv, "num_reused_blocks"),
    )


def convert_response(response: Any) -> EngineResponse:
    """One bindings Response as an EngineResponse. Error responses are final."""
    request_id = int(response.request_id)
    if response.has_error():
        return EngineResponse(request_id=request_id, is_final=True, error=str(response.error_msg))
    result = response.result
    reasons = [FinishReason(int(r)) for r in (getattr(result, "finish_reasons", None) or [])]
    cum = getattr(result, "cum_log_probs", None)
    return EngineResponse(
        request_id=request_id,
        is_final=bool(result.is_final),
        output_token_ids=[list(beam) for beam in result.output_token_ids],
        finish_reasons=reasons,
        sequence_index=_int(result, "sequence_index"),
        perf=convert_perf(result),
        cum_log_probs=None if cum is None else [float(x) for x in cum],
    )


class ExecutorAdapter:
    """The Engine interface over an executor object with the TensorRT-LLM API."""

    def __init__(
        self,
        executor: Any,
        api: ModuleType | Any,
        facts: EngineFacts,
        *,
        gpu_control: GpuControl | None = None,
        on_shutdown: Callable[[], None] | None = None,
    ) -> None:
        self._executor = executor
        self._api = api
        self._facts = facts
        self._facts_lock = threading.Lock()
        self._gpu_control = gpu_control
        self._on_shutdown = on_shutdown
        self._shut = False

    @property
    def executor(self) -> Any:
        return self._executor

    def build_request(self, request: EngineRequest) -> Any:
        """The bindings Request for an EngineRequest."""
        api = self._api
        sampling = construct(
            api.SamplingConfig, (request.sampling.beam_width,), sampling_kwargs(request.sampling)
        )
        output = api.OutputConfig()
        output.exclude_input_from_output = bool(request.exclude_input_from_output)
        if request.return_perf_metrics and hasattr(output, "return_perf_metrics"):
            output.return_perf_metrics = True
        kwargs: dict[str, Any] = {
            "streaming": bool(request.streaming),
            "sampling_config": sampling,
            "output_config": output,
        }
        for name in ("end_id", "pad_id", "stop_words", "bad_words"):
            value = getattr(request, name)
            if value is not None:
                kwargs[name] = value
        return api.Request(
            input_token_ids=list(request.input_token_ids), max_tokens=request.max_tokens, **kwargs
        )

    def enqueue(self, request: EngineRequest) -> int:
        return int(self._executor.enqueue_request(self.build_request(request)))

    def await_responses(self, timeout_s: float) -> list[EngineResponse]:
        raw = self._executor.await_responses(timeout=datetime.timedelta(seconds=timeout_s))
        return [convert_response(r) for r in raw]

    def cancel(self, request_id: int) -> None:
        self._executor.cancel_request(request_id)

    def drain_iteration_stats(self) -> list[IterationStat]:
        stats = [convert_iteration_stats(s) for s in self._executor.get_latest_iteration_stats()]
        if stats:
            last = stats[-1]
            with self._facts_lock:
                if last.kv_max_blocks:
                    self._facts.kv_max_blocks = last.kv_max_blocks
                if last.kv_tokens_per_block:
                    self._facts.kv_tokens_per_block = last.kv_tokens_per_block
        return stats

    def facts(self) -> EngineFacts:
        with self._facts_lock:
            return EngineFacts(**vars(self._facts))

    def gpu_control(self) -> GpuControl | None:
        return self._gpu_control

    def can_enqueue(self) -> bool:
        check = getattr(self._executor, "can_enqueue_requests", None)
        return True if check is None else bool(check())

    def shutdown(self) -> None:
        if self._shut:
            return
        self._shut = True
        try:
            self._executor.shutdown()
        except Exception as e:  # the executor's own failure: report it, but finish the shutdown
            raise EngineError(f"executor shutdown failed: {e}") from e
        finally:
            if self._on_shutdown is not None:
                self._on_shutdown()
