"""A stand-in for `tensorrt_llm.bindings.executor`: the names, keyword arguments and semantics
the adapter relies on (apis.md §1), and nothing it does not.

- `Executor(engine_dir, ModelType.DECODER_ONLY, ExecutorConfig)`, `enqueue_request`,
  `await_responses(timeout=timedelta)`, `cancel_request`, `can_enqueue_requests`, `shutdown`;
- `get_latest_iteration_stats()` DRAINS a queue bounded by `iter_stats_max_iterations`, the
  newest kept;
- responses: `request_id`, `has_error()`, `error_msg`, `result` (`is_final`, `output_token_ids`
  per beam, `finish_reasons`), reading `result` of an error response raises;
- `IterationStats` with nested `kv_cache_stats` / `inflight_batching_stats` and a string
  `timestamp`. `make_old_version()` builds the module as a 0.1x version spells it (no
  `iter_latency_ms`, `num_queued_requests`; SamplingConfig's `random_seed` / `min_length`).
The test drives iterations by hand with `Executor.step()`.
"""

from __future__ import annotations

import datetime
import enum
from collections import deque
from types import SimpleNamespace
from typing import Any, ClassVar


class ModelType(enum.Enum):
    DECODER_ONLY = 0


class BatchingType(enum.Enum):
    STATIC = 0
    INFLIGHT = 1


class CapacitySchedulerPolicy(enum.Enum):
    MAX_UTILIZATION = 0
    GUARANTEED_NO_EVICT = 1


class FinishReason(enum.IntEnum):
    NOT_FINISHED = 0
    END_ID = 1
    STOP_WORDS = 2
    LENGTH = 3
    TIMED_OUT = 4
    CANCELLED = 5


class _Kw:
    """A bindings object that accepts exactly the keywords it was declared with."""

    FIELDS: ClassVar[dict[str, Any]] = {}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        names = list(self.FIELDS)
        if len(args) > len(names):
            raise TypeError(f"{type(self).__name__}: too many positional arguments")
        values = dict(self.FIELDS)
        values.update(zip(names, args, strict=False))
        for key, value in kwargs.items():
            if key not in self.FIELDS:
                raise TypeError(f"{type(self).__name__}() got an unexpected keyword '{key}'")
            values[key] = value
        self.__dict__.update(values)


class SchedulerConfig(_Kw):
    FIELDS: ClassVar[dict[str, Any]] = {
        "capacity_scheduler_policy": CapacitySchedulerPolicy.GUARANTEED_NO_EVICT
    }


class KvCacheConfig(_Kw):
    FIELDS: ClassVar[dict[str, Any]] = {
        "enable_block_reuse": True,
        "max_tokens": None,
        "sink_token_length": None,
        "free_gpu_memory_fraction": None,
        "host_cache_size": None,
        "onboard_blocks": True,
        "max_attention_window": None,
        "cross_kv_cache_fraction": None,
    }


class ExecutorConfig(_Kw):
    FIELDS: ClassVar[dict[str, Any]] = {
        "max_beam_width": 1,
        "scheduler_config": None,
        "kv_cache_config": None,
        "enable_chunked_context": False,
        "normalize_log_probs": True,
        "iter_stats_max_iterations": 1000,
        "request_stats_max_iterations": 0,
        "batching_type": BatchingType.INFLIGHT,
        "max_batch_size": None,
        "max_num_tokens": None,
        "parallel_config": None,
        "peft_cache_config": None,
        "decoding_config": None,
        "max_queue_size": None,
    }


class SamplingConfig(_Kw):
    FIELDS: ClassVar[dict[str, Any]] = {
        "beam_width": 1, "top_k": None, "top_p": None, "top_p_min": None, "top_p_reset_ids": None,
        "top_p_decay": None, "seed": None, "temperature": None, "min_tokens": None,
        "beam_search_diversity_rate": None, "repetition_penalty": None, "presence_penalty": None,
        "frequency_penalty": None, "length_penalty": None, "early_stopping": None,
        "num_return_sequences": None,
    }  # fmt: skip


class OutputConfig(_Kw):
    FIELDS: ClassVar[dict[str, Any]] = {
        "return_log_probs": False,
        "return_context_logits": False,
        "return_generation_logits": False,
        "exclude_input_from_output": False,
        "return_perf_metrics": False,
    }


class Request(_Kw):
    FIELDS: ClassVar[dict[str, Any]] = {
        "input_token_ids": None, "max_tokens": None, "streaming": False, "sampling_config": None,
        "output_config": None, "end_id": None, "pad_id": None, "stop_words": None,
        "bad_words": None, "client_id": None,
    }  # fmt: skip


class Result:
    def __init__(self, is_final: bool, tokens: list[list[int]], reasons: list[FinishReason]):
        self.is_final = is_final
        self.output_token_ids = tokens
        self.finish_reasons = reasons
        self.request_perf_metrics = None


class Response:
    def __init__(self, request_id: int, result: Result | None = None, error: str | None = None):
        self.request_id = request_id
        self._result = result
        self._error = error

    def has_error(self) -> bool:
        return self._error is not None

    @property
    def error_msg(self) -> str:
        if self._error is None:
            raise RuntimeError("no error")
        return self._error

    @property
    def result(self) -> Result:
        if self._result is None:
            raise RuntimeError(f"error response: {self._error}")
        return self._result


def iteration_stats(iteration: int, *, active: int, used_blocks: int, old: bool = False) -> Any:
    kv = SimpleNamespace(
        max_num_blocks=100, free_num_blocks=100 - used_blocks, used_num_blocks=used_blocks,
        tokens_per_block=64, alloc_total_blocks=0, alloc_new_blocks=0, reused_blocks=0,
    )  # fmt: skip
    ifb = SimpleNamespace(
        num_scheduled_requests=active, num_context_requests=0, num_gen_requests=active,
        num_paused_requests=0, num_ctx_tokens=0, micro_batch_id=0,
    )  # fmt: skip
    stats = SimpleNamespace(
        timestamp="" if old else "01-02-2025 03:04:05.250000", iter=iteration,
        num_active_requests=active, num_new_active_requests=0, max_num_active_requests=64,
        gpu_mem_usage=1 << 30, cpu_mem_usage=0, pinned_mem_usage=0,
        kv_cache_stats=kv, inflight_batching_stats=ifb, static_batching_stats=None,
    )  # fmt: skip
    if not old:
        stats.iter_latency_ms = 12.5
        stats.num_queued_requests = 3
        stats.num_completed_requests = 1
    return stats


class Executor:
    """Requests generate one token per `step()`, up to max_tokens."""

    def __init__(self, engine_dir: str, model_type: ModelType, config: ExecutorConfig) -> None:
        if model_type is not ModelType.DECODER_ONLY:
            raise TypeError("decoder-only only")
        self.engine_dir = engine_dir
        self.config = config
        self.leader = True
        self.requests: dict[int, Any] = {}
        self.generated: dict[int, int] = {}
        self.cancelled: set[int] = set()
        self.ready: list[Response] = []
        self.stats: deque[Any] = deque(maxlen=config.iter_stats_max_iterations)
        self.iteration = 0
        self.shut_down = False
        self.await_timeouts: list[datetime.timedelta] = []

    def can_enqueue_requests(self) -> bool:
        return self.leader and not self.shut_down

    def enqueue_request(self, request: Request) -> int:
        if not request.input_token_ids:
            raise ValueError("input_token_ids: empty")
        rid = len(self.requests) + 1
        self.requests[rid] = request
        self.generated[rid] = 0
        return rid

    def cancel_request(self, request_id: int) -> None:
        if request_id in self.requests and request_id not in self.cancelled:
            self.cancelled.add(request_id)

    def step(self) -> None:
        """One iteration: every live request gets a token (or its cancellation)."""
        self.iteration += 1
        live = [r for r in self.requests if self.generated[r] >= 0]
        for rid in live:
            req = self.requests[rid]
            if rid in self.cancelled:
                self.ready.append(Response(rid, Result(True, [[]], [FinishReason.CANCELLED])))
                self.generated[rid] = -1
                continue
            self.generated[rid] += 1
            n = self.generated[rid]
            done = n >= req.max_tokens
            token = [[1000 + n]]
            if req.streaming:
                reason = FinishReason.LENGTH if done else FinishReason.NOT_FINISHED
                self.ready.append(Response(rid, Result(done, token, [reason])))
            elif done:
                out = list(range(1001, 1001 + n))
                if not req.output_config.exclude_input_from_output:
                    out = list(req.input_token_ids) + out
                self.ready.append(Response(rid, Result(True, [out], [FinishReason.LENGTH])))
            if done:
                self.generated[rid] = -1
        used = sum(1 for r in self.requests if self.generated[r] >= 0)
        self.stats.append(iteration_stats(self.iteration, active=len(live), used_blocks=used))

    def fail(self, request_id: int, message: str) -> None:
        self.ready.append(Response(request_id, error=message))
        self.generated[request_id] = -1

    def await_responses(self, timeout: datetime.timedelta | None = None) -> list[Response]:
        if timeout is not None:
            self.await_timeouts.append(timeout)
        out, self.ready = self.ready, []
        return out

    def get_latest_iteration_stats(self) -> list[Any]:
        out = list(self.stats)
        self.stats.clear()
        return out

    def shutdown(self) -> None:
        self.shut_down = True


def module(*, old: bool = False) -> SimpleNamespace:
    """The stand-in as a bindings module (`old`: a 0.1x version's SamplingConfig names)."""
    sampling: type[Any] = SamplingConfig
    if old:

        class OldSamplingConfig(_Kw):
            FIELDS: ClassVar[dict[str, Any]] = {
                k.replace("seed", "random_seed").replace("min_tokens", "min_length"): v
                for k, v in SamplingConfig.FIELDS.items()
            }

        sampling = OldSamplingConfig
    return SimpleNamespace(
        ModelType=ModelType, BatchingType=BatchingType,
        CapacitySchedulerPolicy=CapacitySchedulerPolicy, FinishReason=FinishReason,
        SchedulerConfig=SchedulerConfig, KvCacheConfig=KvCacheConfig,
        ExecutorConfig=ExecutorConfig, SamplingConfig=sampling, OutputConfig=OutputConfig,
        Request=Request, Executor=Executor, ParallelConfig=None,
    )  # fmt: skip
