"""The instance-scaling decision: smallest size with margin, up at once, down after a grace."""

from __future__ import annotations

import pytest

from throttllem.controller.scaling.scaler import (
    EngineSize,
    InstanceScaler,
    ScalerConfig,
    demand_rps,
    order_sizes,
    smallest_fitting,
)

SIZES = [EngineSize("tp4", 4, 8.0), EngineSize("tp1", 1, 1.0), EngineSize("tp2", 2, 4.0)]


def test_sizes_are_ordered_by_capacity_and_checked() -> None:
    assert [s.name for s in order_sizes(SIZES)] == ["tp1", "tp2", "tp4"]
    with pytest.raises(ValueError, match="unique"):
        order_sizes([EngineSize("a", 1, 1.0), EngineSize("a", 2, 2.0)])
    with pytest.raises(ValueError, match="size b: capacity"):
        order_sizes([EngineSize("b", 1, 0.0)])


def test_smallest_fitting_keeps_the_margin() -> None:
    ordered = order_sizes(SIZES)
    assert smallest_fitting(ordered, 0.8, 0.2) == 0  # 0.8 <= 1.0 * 0.8
    assert smallest_fitting(ordered, 0.81, 0.2) == 1
    assert smallest_fitting(ordered, 6.4, 0.2) == 2
    assert smallest_fitting(ordered, 100.0, 0.2) == 2  # nothing carries it: the largest


def test_queue_adds_demand() -> None:
    cfg = ScalerConfig(queue_per_capacity_s=10.0)
    assert demand_rps(1.0, 20, cfg) == pytest.approx(3.0)


def test_up_at_once_down_after_grace() -> None:
    s = InstanceScaler(SIZES, ScalerConfig(period_s=10, margin=0.2, grace_s=30), start="tp1")
    assert s.update(0.0, 0.5) is None
    assert s.update(5.0, 5.0) is None  # not due yet: one look per period
    up = s.update(10.0, 5.0)
    assert up is not None and (up.from_size, up.to_size, up.reason) == ("tp1", "tp4", "up")
    # Load falls: tp1 is enough from t=20, but the move waits for the grace period.
    assert s.update(20.0, 0.5) is None
    assert s.update(30.0, 0.5) is None
    assert s.update(40.0, 0.5) is None
    down = s.update(50.0, 0.5)
    assert down is not None and (down.to_size, down.reason) == ("tp1", "down")
    assert s.current_size.name == "tp1"


def test_a_blip_of_load_resets_the_grace() -> None:
    s = InstanceScaler(SIZES, ScalerConfig(period_s=10, grace_s=25), start="tp4")
    assert s.update(0.0, 0.5) is None  # enough since 0
    assert s.update(10.0, 7.0) is None  # tp4 needed again: the clock restarts
    assert s.update(20.0, 0.5) is None
    assert s.update(30.0, 0.5) is None
    assert s.update(40.0, 0.5) is None
    decision = s.update(50.0, 0.5)
    assert decision is not None and decision.to_size == "tp1"


def test_bad_configuration_is_named() -> None:
    with pytest.raises(ValueError, match="margin"):
        ScalerConfig(margin=1.0)
    with pytest.raises(ValueError, match="period_s"):
        ScalerConfig(period_s=0)
    with pytest.raises(ValueError, match="unknown start size 'tp8'"):
        InstanceScaler(SIZES, start="tp8")


def test_a_rising_demand_scales_up_ahead_of_the_limit() -> None:
    """0.2 -> 0.4 req/s in 10 s: 0.4 now is within tp1's 0.8 (with margin), but 30 s ahead
    along that rise it is 1.0: up now, not after the overload."""
    ahead = InstanceScaler(SIZES, ScalerConfig(period_s=10, lookahead_s=30.0), start="tp1")
    blind = InstanceScaler(SIZES, ScalerConfig(period_s=10, lookahead_s=0.0), start="tp1")
    for s in (ahead, blind):
        assert s.update(0.0, 0.2) is None
    decision = ahead.update(10.0, 0.4)
    assert decision is not None and decision.to_size == "tp2"
    assert blind.update(10.0, 0.4) is None


def test_flat_demand_does_not_look_ahead() -> None:
    s = InstanceScaler(SIZES, ScalerConfig(period_s=10, lookahead_s=30.0), start="tp1")
    for k in range(5):
        assert s.update(10.0 * k, 0.7) is None
    assert s.trend() == 0.0


def test_no_move_down_while_demand_is_still_rising() -> None:
    """Demand fits tp1 now, but it keeps climbing: stay on tp2 whatever the grace."""
    rising = InstanceScaler(SIZES, ScalerConfig(period_s=10, grace_s=25), start="tp2")
    for k, rate in enumerate((0.5, 0.6, 0.7, 0.8, 0.85, 0.88)):
        assert rising.update(10.0 * k, rate) is None  # tp1 carries 0.9: not for long
    assert rising.current_size.name == "tp2"
    flat = InstanceScaler(SIZES, ScalerConfig(period_s=10, grace_s=25), start="tp2")
    decisions = [flat.update(10.0 * k, 0.5) for k in range(4)]
    assert decisions[-1] is not None and decisions[-1].to_size == "tp1"
