"""Burst-aware capacity: the rate at which max clock serves a trace's own arrival pattern."""

from __future__ import annotations

from pathlib import Path

import pytest

from throttllem.controller.evaluation import capacity as cap_mod
from throttllem.controller.evaluation.capacity import (
    Capacity,
    find_trace_capacity,
    trace_fingerprint,
)
from throttllem.controller.evaluation.simulator import EngineSetup
from throttllem.controller.evaluation.workload import TraceRequest, Workload

SETUP = EngineSetup(model="llama-3-8b", tp=1)
START = Capacity(rate_per_s=8.0, p99_e2e_s=60.0, mean_tbt_s=0.05)  # where the search starts


def _trace(bursty: bool) -> Workload:
    """600 requests over ~600 s: evenly spaced, or the same requests in six bursts of 100."""
    reqs = []
    for i in range(600):
        t = float(i) if not bursty else 100.0 * (i // 100) + 0.01 * (i % 100)
        reqs.append(TraceRequest(t, 1500 + 10 * (i % 7), 40 + (i % 5) * 10))
    return Workload("t", tuple(reqs))


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("THROTTLLEM_CACHE", str(tmp_path))


def test_bursts_lower_the_capacity_and_max_clock_holds_the_bounds_exactly_there() -> None:
    even = find_trace_capacity(SETUP, _trace(False), START)
    bursty = find_trace_capacity(SETUP, _trace(True), START)
    assert 0 < bursty.rate_per_s < 0.7 * even.rate_per_s
    work = _trace(True).scaled_to_rate(bursty.rate_per_s)
    ok, p99_e2e, _ = cap_mod._serves(SETUP, work)
    assert ok and p99_e2e == pytest.approx(bursty.p99_e2e_s)
    # A little faster and the bursts are no longer served within the bounds.
    too_fast = _trace(True).scaled_to_rate(bursty.rate_per_s * 1.05)
    ok, _, _ = cap_mod._serves(SETUP, too_fast)
    assert not ok


def test_the_result_is_cached_by_the_trace_content(monkeypatch: pytest.MonkeyPatch) -> None:
    first = find_trace_capacity(SETUP, _trace(True), START)

    def no_simulation(*_: object) -> None:
        raise AssertionError("simulated although cached")

    monkeypatch.setattr(cap_mod, "simulate", no_simulation)
    renamed = Workload("another name", _trace(True).requests)
    assert find_trace_capacity(SETUP, renamed, START) == first
    assert trace_fingerprint(renamed) != trace_fingerprint(_trace(False))
    with pytest.raises(AssertionError, match="cached"):
        find_trace_capacity(SETUP, _trace(False), START)


def test_an_empty_trace_is_refused() -> None:
    with pytest.raises(ValueError, match="no requests"):
        find_trace_capacity(SETUP, Workload("empty", ()), START)
