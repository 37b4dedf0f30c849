"""Prometheus metrics through `pb_utils.MetricFamily`, named and labelled as the reference
tensorrtllm_backend model's `nv_trt_llm_*` families, so existing dashboards keep working.

Families (labels `model`, `version` plus the one below):
    nv_trt_llm_request_metrics           request_type: active, max, scheduled, context, waiting
    nv_trt_llm_runtime_memory_metrics    memory_type: cpu, gpu, pinned
    nv_trt_llm_kv_cache_block_metrics    kv_cache_block_type: max, free, used, tokens_per, fraction
    nv_trt_llm_inflight_batcher_metrics  inflight_batcher_specific_metric: total_context_tokens,
                                         generation_requests, micro_batch_id, paused_requests
    nv_trt_llm_general_metrics           general_type: timestamp, iteration_counter
    nv_llm_input_token_len / nv_llm_output_token_len (histograms, response_metric_type)
As with the reference model, every instance of a model writes the same gauges (the labels do
not name the instance); per-instance detail is in the telemetry stream.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from ..engines.base import IterationStat

logger = logging.getLogger(__name__)

# Every metric call of a Python-backend model is an IPC exchange with the Triton process.
# The stub's metric API is only ever driven from one thread by Triton's own examples; this
# process drives it from several (statistics, responses, GPU sampling, the router's relays),
# so all of them take this lock: concurrent metric messages are a suspect in tritonserver
# crashes seen under load (docs/operator-guide.md, section 6).
METRIC_IPC_LOCK = threading.Lock()


def buckets_1_5(max_value: int) -> list[float]:
    """10, 50, 100, 500, ... up to max_value (the reference model's token-length buckets)."""
    out: list[float] = []
    exponent = 1
    while True:
        for mantissa in (1, 5):
            value = mantissa * 10**exponent
            if value > max_value:
                return out
            out.append(float(value))
        exponent += 1


class TritonMetrics:
    """The gauges and histograms, fed by the serving core."""

    def __init__(
        self,
        pb_utils: Any,
        model: str,
        version: str,
        *,
        min_interval_s: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._min_interval_s = min_interval_s
        self._clock = clock
        self._published_s = float("-inf")
        self._pending: IterationStat | None = None
        self._last: dict[str, float] = {}
        family = pb_utils.MetricFamily
        gauge = family.GAUGE
        common = {"model": model, "version": version}

        # Triton requires every MetricFamily to outlive its Metrics: keep them all.
        self._families: list[Any] = []

        def fam(name: str, description: str, kind: Any = gauge) -> Any:
            created = family(name=name, description=description, kind=kind)
            self._families.append(created)
            return created

        requests = fam("nv_trt_llm_request_metrics", "TRT LLM request metrics")
        memory = fam("nv_trt_llm_runtime_memory_metrics", "TRT LLM runtime memory metrics")
        kv = fam("nv_trt_llm_kv_cache_block_metrics", "TRT LLM KV cache block metrics")
        ifb = fam(
            "nv_trt_llm_inflight_batcher_metrics", "TRT LLM inflight_batcher-specific metrics"
        )
        general = fam("nv_trt_llm_general_metrics", "General TRT LLM metrics")

        def metric(f: Any, label: str, value: str) -> Any:
            return f.Metric(labels={label: value, **common})

        self._gauges: dict[str, Any] = {
            "active": metric(requests, "request_type", "active"),
            "max": metric(requests, "request_type", "max"),
            "scheduled": metric(requests, "request_type", "scheduled"),
            "context": metric(requests, "request_type", "context"),
            "waiting": metric(requests, "request_type", "waiting"),
            "cpu": metric(memory, "memory_type", "cpu"),
            "gpu": metric(memory, "memory_type", "gpu"),
            "pinned": metric(memory, "memory_type", "pinned"),
            "kv_max": metric(kv, "kv_cache_block_type", "max"),
            "kv_free": metric(kv, "kv_cache_block_type", "free"),
            "kv_used": metric(kv, "kv_cache_block_type", "used"),
            "kv_tokens_per": metric(kv, "kv_cache_block_type", "tokens_per"),
            "kv_fraction": metric(kv, "kv_cache_block_type", "fraction"),
            "ctx_tokens": metric(ifb, "inflight_batcher_specific_metric", "total_context_tokens"),
            "gen_requests": metric(ifb, "inflight_batcher_specific_metric", "generation_requests"),
            "micro_batch_id": metric(ifb, "inflight_batcher_specific_metric", "micro_batch_id"),
            "paused": metric(ifb, "inflight_batcher_specific_metric", "paused_requests"),
            "timestamp": metric(general, "general_type", "timestamp"),
            "iter": metric(general, "general_type", "iteration_counter"),
        }
        self._input_len: Any = None
        self._output_len: Any = None
        histogram = getattr(family, "HISTOGRAM", None)
        if histogram is not None:
            try:
                buckets = buckets_1_5(1000)
                self._input_len = fam(
                    "nv_llm_input_token_len", "TRT LLM response metrics", histogram
                ).Metric(
                    labels={"response_metric_type": "total_input_tokens", **common},
                    buckets=buckets,
                )
                self._output_len = fam(
                    "nv_llm_output_token_len", "TRT LLM response metrics", histogram
                ).Metric(
                    labels={"response_metric_type": "total_output_tokens", **common},
                    buckets=buckets,
                )
            except Exception as e:  # an older Python backend without histogram buckets
                logger.info("token-length histograms unavailable: %s", e)

    def on_iteration(self, stat: IterationStat) -> None:
        """Publish the latest iteration, at most once per `min_interval_s`; the rest waits for
        the next call or `flush`. Each gauge write is an IPC round trip to the Triton process,
        and an engine runs tens of iterations a second: only changed gauges are written."""
        now = self._clock()
        if now - self._published_s < self._min_interval_s:
            self._pending = stat
            return
        with METRIC_IPC_LOCK:
            self._publish(stat, now)

    def flush(self) -> None:
        if self._pending is not None:
            with METRIC_IPC_LOCK:
                self._publish(self._pending, self._clock())

    def _publish(self, stat: IterationStat, now: float) -> None:
        self._pending = None
        self._published_s = now
        g = self._gauges
        values = {
            "active": stat.num_active_requests,
            "max": stat.max_num_active_requests,
            "scheduled": stat.num_scheduled_requests,
            "context": stat.num_context_requests,
            "waiting": stat.num_active_requests - stat.num_scheduled_requests,
            "cpu": stat.cpu_mem_usage_bytes,
            "gpu": stat.gpu_mem_usage_bytes,
            "pinned": stat.pinned_mem_usage_bytes,
            "kv_max": stat.kv_max_blocks,
            "kv_free": stat.kv_free_blocks,
            "kv_used": stat.kv_used_blocks,
            "kv_tokens_per": stat.kv_tokens_per_block,
            "kv_fraction": stat.kv_used_blocks / stat.kv_max_blocks if stat.kv_max_blocks else 0.0,
            "ctx_tokens": stat.num_ctx_tokens,
            "gen_requests": stat.num_gen_requests,
            "micro_batch_id": stat.micro_batch_id,
            "paused": stat.num_paused_requests,
            "timestamp": stat.timestamp_unix_ns // 1_000_000_000,
            "iter": stat.iter,
        }
        last = self._last
        for key, value in values.items():
            number = float(value)
            if last.get(key) != number:
                g[key].set(number)
                last[key] = number

    def on_request_done(self, input_tokens: int, output_tokens: int) -> None:
        if self._input_len is not None:
            with METRIC_IPC_LOCK:
                self._input_len.observe(float(input_tokens))
                self._output_len.observe(float(output_tokens))
