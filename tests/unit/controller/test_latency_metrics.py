"""The controller's per-request latency histograms, SLO target gauges and the time under each
kind of clock choice (dashboard contract)."""

from __future__ import annotations

from prometheus_client import generate_latest

from throttllem.controller.control_loop import Decision
from throttllem.controller.metrics import (
    E2E_BUCKETS_S,
    TBT_BUCKETS_S,
    TTFT_BUCKETS_S,
    ControllerMetrics,
)


def sample(m: ControllerMetrics, name: str, labels: dict[str, str]) -> float | None:
    value = m.registry.get_sample_value(name, labels)
    return None if value is None else float(value)


def test_record_request_observes_each_latency_in_its_histogram() -> None:
    m = ControllerMetrics()
    m.record_request("llm_0_0", 0.3, 0.04, 12.0)
    m.record_request("llm_0_0", 1.5, 0.25, 70.0)
    inst = {"instance": "llm_0_0"}
    assert sample(m, "throttllem_ttft_seconds_count", inst) == 2
    assert sample(m, "throttllem_ttft_seconds_sum", inst) == 1.8
    assert sample(m, "throttllem_tbt_seconds_bucket", {**inst, "le": "0.05"}) == 1
    assert sample(m, "throttllem_tbt_seconds_bucket", {**inst, "le": "0.3"}) == 2
    assert sample(m, "throttllem_e2e_seconds_bucket", {**inst, "le": "60.0"}) == 1
    assert sample(m, "throttllem_e2e_seconds_bucket", {**inst, "le": "+Inf"}) == 2


def test_missing_latencies_are_skipped_per_kind() -> None:
    m = ControllerMetrics()
    # A request that ended before its first token, and one that generated a single token.
    m.record_request("i", None, None, 3.0)
    m.record_request("i", 0.2, None, 0.2)
    assert sample(m, "throttllem_ttft_seconds_count", {"instance": "i"}) == 1
    assert sample(m, "throttllem_tbt_seconds_count", {"instance": "i"}) in (None, 0.0)
    assert sample(m, "throttllem_e2e_seconds_count", {"instance": "i"}) == 2


def test_instances_are_separate_series() -> None:
    m = ControllerMetrics()
    m.record_request("a", 0.1, 0.01, 1.0)
    m.record_request("b", 0.1, 0.01, 1.0)
    m.record_request("b", 0.1, 0.01, 1.0)
    assert sample(m, "throttllem_e2e_seconds_count", {"instance": "a"}) == 1
    assert sample(m, "throttllem_e2e_seconds_count", {"instance": "b"}) == 2


def test_slo_targets_set_and_removed() -> None:
    m = ControllerMetrics()
    m.set_slo_targets("i", None, 0.2, 68.0)
    assert sample(m, "throttllem_slo_target_seconds", {"instance": "i", "kind": "tbt"}) == 0.2
    assert sample(m, "throttllem_slo_target_seconds", {"instance": "i", "kind": "e2e"}) == 68.0
    assert sample(m, "throttllem_slo_target_seconds", {"instance": "i", "kind": "ttft"}) is None
    m.set_slo_targets("i", 1.0, 0.2, None)
    assert sample(m, "throttllem_slo_target_seconds", {"instance": "i", "kind": "ttft"}) == 1.0
    assert sample(m, "throttllem_slo_target_seconds", {"instance": "i", "kind": "e2e"}) is None


def test_exposition_names_and_buckets() -> None:
    m = ControllerMetrics()
    m.record_request("i", 0.1, 0.01, 1.0)
    m.set_slo_targets("i", 1.0, 0.2, 60.0)
    text = generate_latest(m.registry).decode()
    for family in ("throttllem_ttft_seconds", "throttllem_tbt_seconds", "throttllem_e2e_seconds"):
        assert f"# TYPE {family} histogram" in text
    assert "# TYPE throttllem_slo_target_seconds gauge" in text
    for buckets in (TTFT_BUCKETS_S, TBT_BUCKETS_S, E2E_BUCKETS_S):
        assert list(buckets) == sorted(buckets) and len(set(buckets)) == len(buckets)
    # The paper's mean-TBT target (200 ms) is a bucket edge, so "share under target" is exact.
    assert 0.2 in TBT_BUCKETS_S


def _decision(t: float, kind: str) -> Decision:
    return Decision(t, 900, None, kind, 1.0, None, None, 0, 1, 0, "period", kind)


def test_time_under_each_kind_of_choice_is_credited_to_the_choice_in_force() -> None:
    m = ControllerMetrics()
    for t, kind in ((0.0, "slo"), (2.0, "max_prefill"), (2.5, "idle"), (4.0, "slo")):
        m.record("i", _decision(t, kind), 0.0005)

    def seconds(why: str) -> float | None:
        return sample(m, "throttllem_clock_choice_seconds_total", {"instance": "i", "why": why})

    assert (seconds("slo"), seconds("max_prefill"), seconds("idle")) == (2.0, 0.5, 1.5)
    # An instance that went away and came back: the gap is nobody's.
    m.forget_instance("i")
    m.record("i", _decision(100.0, "backlog"), 0.0005)
    m.record("i", _decision(101.0, "slo"), 0.0005)
    assert (seconds("slo"), seconds("backlog")) == (2.0, 1.0)
