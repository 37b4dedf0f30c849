"""ArrivalRateMeter: sliding-window arrival rate and queue length per model, injected clock."""

from __future__ import annotations

import threading

import pytest

from throttllem.controller.scaling.rate_meter import MIN_SPAN_S, ArrivalRateMeter


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


def test_registered_model_has_rate_zero_and_unknown_model_none() -> None:
    meter = ArrivalRateMeter(clock=FakeClock(), models=["llama"])
    assert meter.request_rate_rps("llama") == 0.0
    assert meter.queued("llama") == 0
    assert meter.request_rate_rps("other") is None
    assert meter.queued("other") == 0
    assert meter.models() == ["llama"]


def test_rate_over_a_full_window() -> None:
    clock = FakeClock()
    meter = ArrivalRateMeter(window_s=10.0, clock=clock, models=["m"])
    clock.advance(20.0)
    for _ in range(50):  # 5 rps for 10 s
        clock.advance(0.2)
        meter.record_arrival("m")
    assert meter.request_rate_rps("m") == pytest.approx(5.0)


def test_old_arrivals_leave_the_window() -> None:
    clock = FakeClock()
    meter = ArrivalRateMeter(window_s=10.0, clock=clock, models=["m"])
    clock.advance(20.0)
    for _ in range(30):
        meter.record_arrival("m")
    assert meter.request_rate_rps("m") == pytest.approx(3.0)
    clock.advance(9.9)
    assert meter.request_rate_rps("m") == pytest.approx(3.0)
    clock.advance(0.1)  # exactly one window later: out
    assert meter.request_rate_rps("m") == 0.0


def test_a_young_meter_averages_over_its_age_not_the_whole_window() -> None:
    clock = FakeClock()
    meter = ArrivalRateMeter(window_s=30.0, clock=clock, models=["m"])
    for _ in range(4):
        clock.advance(0.5)
        meter.record_arrival("m")
    assert meter.request_rate_rps("m") == pytest.approx(4 / 2.0)  # 2 s old, not 30
    one = ArrivalRateMeter(window_s=30.0, clock=clock)
    one.record_arrival("x")  # first sight of a model is its first arrival
    assert one.request_rate_rps("x") == pytest.approx(1 / MIN_SPAN_S)


def test_explicit_times_out_of_order_and_ahead_of_now() -> None:
    clock = FakeClock(100.0)
    meter = ArrivalRateMeter(window_s=10.0, clock=clock, models=["m"])
    clock.advance(50.0)
    now = clock()
    meter.record_arrival("m", now - 1.0)
    meter.record_arrival("m", now - 5.0)  # reported late by another thread
    meter.record_arrival("m", now - 11.0)  # already outside the window
    meter.record_arrival("m", now + 3.0)  # stamped ahead of the clock: counted once reached
    assert meter.request_rate_rps("m") == pytest.approx(2 / 10.0)
    clock.advance(3.0)
    assert meter.request_rate_rps("m") == pytest.approx(3 / 10.0)
    clock.advance(3.0)  # now - 5.0 has left
    assert meter.request_rate_rps("m") == pytest.approx(2 / 10.0)


def test_models_are_separate() -> None:
    clock = FakeClock()
    meter = ArrivalRateMeter(window_s=10.0, clock=clock, models=["a", "b"])
    clock.advance(10.0)
    for _ in range(20):
        meter.record_arrival("a")
    meter.record_arrival("b")
    meter.set_queued("b", 7)
    assert meter.request_rate_rps("a") == pytest.approx(2.0)
    assert meter.request_rate_rps("b") == pytest.approx(0.1)
    assert (meter.queued("a"), meter.queued("b")) == (0, 7)


def test_queue_length_follows_set_queued() -> None:
    meter = ArrivalRateMeter(clock=FakeClock())
    meter.set_queued("m", 3)  # registers the model
    assert meter.request_rate_rps("m") == 0.0
    assert meter.queued("m") == 3
    meter.set_queued("m", 0)
    assert meter.queued("m") == 0


@pytest.mark.parametrize("window", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_window_is_refused(window: float) -> None:
    with pytest.raises(ValueError, match="window_s"):
        ArrivalRateMeter(window_s=window)


def test_bad_inputs_are_refused() -> None:
    meter = ArrivalRateMeter(clock=FakeClock())
    with pytest.raises(ValueError, match="queued"):
        meter.set_queued("m", -1)
    for call in (lambda: meter.register(""), lambda: meter.record_arrival("")):
        with pytest.raises(ValueError, match="empty"):
            call()


def test_register_twice_keeps_the_history() -> None:
    clock = FakeClock()
    meter = ArrivalRateMeter(window_s=10.0, clock=clock, models=["m"])
    clock.advance(10.0)
    meter.record_arrival("m")
    meter.register("m")
    assert meter.request_rate_rps("m") == pytest.approx(0.1)


def test_concurrent_writers_lose_no_arrival() -> None:
    clock = FakeClock()
    meter = ArrivalRateMeter(window_s=100.0, clock=clock, models=["m"])
    clock.advance(100.0)

    def feed() -> None:
        for _ in range(2000):
            meter.record_arrival("m")

    threads = [threading.Thread(target=feed) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert meter.request_rate_rps("m") == pytest.approx(8000 / 100.0)
