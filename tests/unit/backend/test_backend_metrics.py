"""Metrics through a stand-in pb_utils: the reference families, names and labels."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, ClassVar

from throttllem.backend.engines.base import IterationStat
from throttllem.backend.triton_model.metrics import TritonMetrics, buckets_1_5


class Metric:
    def __init__(self, labels: dict[str, str], buckets: list[float] | None = None) -> None:
        self.labels, self.buckets, self.value, self.observed = labels, buckets, None, []

    def set(self, v: float) -> None:
        self.value = v
        self.writes = getattr(self, "writes", 0) + 1

    def observe(self, v: float) -> None:
        self.observed.append(v)


class Family:
    GAUGE, COUNTER, HISTOGRAM = "gauge", "counter", "histogram"
    created: ClassVar[list[Family]] = []

    def __init__(self, name: str, description: str, kind: str) -> None:
        self.name, self.kind, self.metrics = name, kind, []
        Family.created.append(self)

    def Metric(self, labels: dict[str, str], buckets: Any = None) -> Metric:
        m = Metric(labels, buckets)
        self.metrics.append(m)
        return m


def test_reference_families_and_labels() -> None:
    Family.created = []
    metrics = TritonMetrics(SimpleNamespace(MetricFamily=Family), "tensorrt_llm", "1")
    stat = IterationStat(
        iter=42, timestamp_unix_ns=3_000_000_000, iter_latency_ms=1.0, num_active_requests=5,
        num_queued_requests=1, num_new_active_requests=0, num_completed_requests=0,
        max_num_active_requests=64, num_scheduled_requests=4, num_context_requests=1,
        num_gen_requests=3, num_paused_requests=0, num_ctx_tokens=100, kv_used_blocks=25,
        kv_free_blocks=75, kv_max_blocks=100, kv_tokens_per_block=64,
    )  # fmt: skip
    metrics.on_iteration(stat)
    metrics.on_request_done(10, 20)
    by_name = {f.name: f for f in Family.created}
    assert set(by_name) == {
        "nv_trt_llm_request_metrics", "nv_trt_llm_runtime_memory_metrics",
        "nv_trt_llm_kv_cache_block_metrics", "nv_trt_llm_inflight_batcher_metrics",
        "nv_trt_llm_general_metrics", "nv_llm_input_token_len", "nv_llm_output_token_len",
    }  # fmt: skip

    def value(family: str, **labels: str) -> Any:
        for m in by_name[family].metrics:
            if all(m.labels.get(k) == v for k, v in labels.items()):
                assert m.labels["model"] == "tensorrt_llm" and m.labels["version"] == "1"
                return m
        raise AssertionError(f"{family} {labels}")

    assert value("nv_trt_llm_request_metrics", request_type="waiting").value == 1
    assert value("nv_trt_llm_kv_cache_block_metrics", kv_cache_block_type="fraction").value == 0.25
    assert value("nv_trt_llm_general_metrics", general_type="iteration_counter").value == 42
    assert value("nv_trt_llm_general_metrics", general_type="timestamp").value == 3
    hist = value("nv_llm_output_token_len", response_metric_type="total_output_tokens")
    assert hist.observed == [20] and hist.buckets == buckets_1_5(1000)


def _stat(iteration: int, kv_used: int) -> IterationStat:
    return IterationStat(
        iter=iteration, timestamp_unix_ns=3_000_000_000, iter_latency_ms=1.0,
        num_active_requests=5, num_queued_requests=0, num_new_active_requests=0,
        num_completed_requests=0, max_num_active_requests=64, num_scheduled_requests=5,
        num_context_requests=0, num_gen_requests=5, num_paused_requests=0, num_ctx_tokens=0,
        kv_used_blocks=kv_used, kv_free_blocks=100 - kv_used, kv_max_blocks=100,
        kv_tokens_per_block=64,
    )  # fmt: skip


def test_gauges_written_at_most_once_per_interval_changed_only_and_flushed() -> None:
    """Each gauge write is an IPC round trip: tens of iterations a second must not become
    hundreds of writes, yet the last iteration is always what the gauges end up showing."""
    Family.created = []
    now = [0.0]
    metrics = TritonMetrics(SimpleNamespace(MetricFamily=Family), "m", "1",
                            min_interval_s=0.25, clock=lambda: now[0])  # fmt: skip
    gauges = [m for f in Family.created if f.kind == "gauge" for m in f.metrics]

    def writes() -> int:
        return sum(getattr(m, "writes", 0) for m in gauges)

    def kv_used() -> Any:
        (m,) = [m for m in gauges if m.labels.get("kv_cache_block_type") == "used"]
        return m.value

    metrics.on_iteration(_stat(1, 10))
    first = writes()
    assert first == len(gauges)  # everything once
    for i in range(2, 12):  # 10 iterations within 0.1 s: held back
        now[0] += 0.01
        metrics.on_iteration(_stat(i, 10 + i))
    assert writes() == first and kv_used() == 10
    metrics.flush()  # the engine went quiet: the latest one is published
    assert kv_used() == 21
    # Only what changed was written: iteration counter and the KV gauges.
    assert writes() - first == 4
    before = writes()
    metrics.flush()  # nothing pending: nothing written
    assert writes() == before


def test_buckets() -> None:
    assert buckets_1_5(1000) == [10, 50, 100, 500, 1000]
