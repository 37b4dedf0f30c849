"""Scoreboard: event bookkeeping, snapshot rebuild, SLO outcomes and the arrays it hands on."""

from __future__ import annotations

import math

import pytest

from throttllem.controller.events import (
    Arrived,
    Finish,
    Finished,
    FirstToken,
    InFlight,
    Iteration,
    Slo,
)
from throttllem.controller.length_predictor import LengthPredictor
from throttllem.controller.scoreboard import Scoreboard

DEFAULT = Slo(ttft_s=1.0, tbt_s=0.2, e2e_s=30.0)


def _board() -> Scoreboard:
    return Scoreboard(LengthPredictor(quantile=0.5), DEFAULT, tokens_per_block=64)


def _iteration(t: float, n: int = 0) -> Iteration:
    return Iteration(n, t, 0.01, 1, 0, 0, 1, 0, 1, 100, 64)


def test_lifecycle_counts_tokens_and_splits_running_from_queued() -> None:
    sb = _board()
    sb.on_arrived(Arrived(1, 0.0, prompt_tokens=100, max_tokens=500))
    sb.on_arrived(Arrived(2, 0.5, prompt_tokens=50, max_tokens=20, slo=Slo(e2e_s=5.0)))
    sb.on_first_token(FirstToken(1, 0.2))
    for k in range(1, 4):
        sb.on_iteration(_iteration(0.2 + 0.01 * k, k))
    inputs = sb.decision_inputs()
    assert inputs.deadlines.running_ids == ("1",)
    assert inputs.deadlines.queued_ids == ("2",)
    assert inputs.running.context_tokens.tolist() == [100 + 4]
    assert inputs.deadlines.running_e2e_deadline_s.tolist() == [30.0]
    # Per-request override of the deployment default, relative to arrival.
    assert inputs.deadlines.queued_e2e_deadline_s.tolist() == [5.5]
    assert inputs.deadlines.queued_ttft_deadline_s.tolist() == [1.5]
    # Reservation for GUARANTEED_NO_EVICT: ceil((100 + 500) / 64) blocks.
    assert inputs.running.reserved_blocks.tolist() == [10]
    # The prior median (129) bounded by max_tokens for request 2.
    assert inputs.queued.output_tokens.tolist() == [20]


def test_finished_request_reports_its_slo_outcome_and_trains_the_predictor() -> None:
    sb = _board()
    sb.on_arrived(Arrived(7, 0.0, 100, 500))
    sb.on_first_token(FirstToken(7, 0.5))
    outcome = sb.on_finished(Finished(7, 20.5, output_tokens=101, reason=Finish.END_ID))
    assert outcome is not None
    assert outcome.ttft_s == 0.5 and outcome.e2e_s == 20.5
    assert outcome.mean_tbt_s == pytest.approx(0.2)
    assert outcome.met
    assert len(sb) == 0 and sb.attainment() == 1.0
    assert sb.predictor.error().count == 1


def test_a_late_request_counts_against_attainment() -> None:
    sb = _board()
    sb.on_arrived(Arrived(1, 0.0, 100, 500))
    sb.on_first_token(FirstToken(1, 2.0))  # TTFT 2 s > 1 s
    outcome = sb.on_finished(Finished(1, 3.0, 5, Finish.END_ID))
    assert outcome is not None and not outcome.met
    assert sb.attainment() == 0.0


def test_cancelled_requests_neither_train_nor_count() -> None:
    sb = _board()
    sb.on_arrived(Arrived(1, 0.0, 100, 500))
    assert sb.on_finished(Finished(1, 1.0, 3, Finish.CANCELLED)) is None
    assert sb.outcomes_total == 0 and sb.predictor.error().count == 0


def test_unknown_requests_are_ignored() -> None:
    sb = _board()
    sb.on_first_token(FirstToken(99, 1.0))
    assert sb.on_finished(Finished(99, 2.0, 1, Finish.END_ID)) is None
    assert len(sb) == 0


def test_rebuild_from_snapshot_replaces_state() -> None:
    sb = _board()
    sb.on_arrived(Arrived(1, 0.0, 100, 500))
    sb.rebuild(
        [
            InFlight(2, 1.0, 300, 400, output_tokens=50, first_token_s=1.5),
            InFlight(3, 2.0, 30, 40, output_tokens=0, first_token_s=None, slo=Slo(ttft_s=0.1)),
        ]
    )
    inputs = sb.decision_inputs()
    assert inputs.deadlines.running_ids == ("2",)
    assert inputs.running.context_tokens.tolist() == [350]
    assert inputs.deadlines.running_generated.tolist() == [50]
    assert inputs.deadlines.queued_ttft_deadline_s.tolist() == [pytest.approx(2.1)]


def test_no_slo_means_infinite_deadlines() -> None:
    sb = Scoreboard(LengthPredictor(), Slo(), tokens_per_block=64)
    sb.on_arrived(Arrived(1, 0.0, 10, 10))
    d = sb.decision_inputs().deadlines
    assert all(math.isinf(v) for v in d.queued_e2e_deadline_s.tolist())


def test_the_forecast_measures_arrival_rate_prompts_and_finished_lengths_over_its_window() -> None:
    sb = _board()
    assert sb.forecast(0.0).rate_per_s == 0.0
    for i in range(10):
        sb.on_arrived(Arrived(i, float(i), prompt_tokens=100 * (i + 1), max_tokens=500))
    for i, tokens in ((0, 40), (1, 80)):
        sb.on_finished(Finished(i, 9.0, output_tokens=tokens, reason=Finish.END_ID))
    # A cancelled request's length says nothing about what arrivals will ask for.
    sb.on_finished(Finished(2, 9.0, output_tokens=3, reason=Finish.CANCELLED))
    f = sb.forecast(10.0)
    assert f.rate_per_s == pytest.approx(10 / 10.0)
    assert f.mean_prompt_tokens == pytest.approx(550.0)
    assert f.finished_output_tokens == pytest.approx(60.0)
    # 40 s later the window (30 s) has forgotten all of it.
    later = sb.forecast(50.0)
    assert later.rate_per_s == 0.0 and later.finished_output_tokens == 0.0


def test_the_forecast_carries_the_deployments_e2e_target_for_the_backlog_check() -> None:
    sb = _board()
    sb.on_arrived(Arrived(1, 0.0, prompt_tokens=100, max_tokens=500))
    assert sb.forecast(1.0).e2e_target_s == 30.0
    none = Scoreboard(LengthPredictor(), Slo(tbt_s=0.2), tokens_per_block=64)
    none.on_arrived(Arrived(1, 0.0, prompt_tokens=100, max_tokens=500))
    assert math.isinf(none.forecast(1.0).e2e_target_s)


def test_the_sustained_rate_remembers_a_burst_longer_than_the_forecast_does() -> None:
    """A backlog keeps up with the load of the last SUSTAIN_WINDOW_S, not the last 30 s: a
    10 s burst at 5/s after 100 s at 1/s is 1.33/s sustained, 3.33/s by the forecast."""
    sb = _board()
    t = 0.0
    while t < 100.0:
        sb.on_arrived(Arrived(int(t * 10), t, prompt_tokens=100, max_tokens=500))
        t += 1.0
    while t < 110.0:
        sb.on_arrived(Arrived(int(t * 10), t, prompt_tokens=100, max_tokens=500))
        t += 0.2
    f = sb.forecast(110.0)
    assert f.rate_per_s == pytest.approx((20 + 50) / 30.0, rel=0.05)
    assert f.sustained_rate_per_s == pytest.approx((100 + 50) / 110.0, rel=0.05)


def test_the_iteration_time_is_right_from_the_first_iteration() -> None:
    """Started from zero, a plain moving average would read 1% of the truth after one
    iteration, and the forecast would expect a hundredth of the prefills of a busy start."""
    sb = _board()
    sb.on_arrived(Arrived(1, 0.0, 100, 500))
    sb.on_iteration(Iteration(0, 0.05, 0.05, 1, 0, 1, 0, 100, 2, 100, 64))
    assert sb.forecast(1.0).iteration_s == pytest.approx(0.05)
    for k in range(1, 400):
        sb.on_iteration(Iteration(k, 0.05 + 0.02 * k, 0.02, 1, 0, 0, 1, 0, 2, 100, 64))
    # Then it follows the recent iterations (~100 of them).
    assert sb.forecast(9.0).iteration_s == pytest.approx(0.02, rel=0.05)


def test_running_requests_carry_their_shortest_plausible_remaining_length() -> None:
    sb = Scoreboard(LengthPredictor(quantile=0.9), DEFAULT, tokens_per_block=64)
    for k in range(200):  # finished requests of 1..200 tokens teach the predictor
        sb.predictor.observe(100, k + 1, k + 1)
    sb.on_arrived(Arrived(1, 0.0, prompt_tokens=100, max_tokens=500))
    sb.on_first_token(FirstToken(1, 0.2))
    inputs = sb.decision_inputs()
    shortest = inputs.deadlines.running_shortest_remaining
    assert shortest is not None
    # One generated: among the lengths 2..200, the 2% quantile leaves a few tokens to go; the
    # prediction the projection uses (the 90% quantile) leaves far more.
    assert 1 <= int(shortest[0]) <= 6
    assert int(inputs.running.remaining_tokens[0]) > 150


def test_while_requests_wait_the_running_ones_are_planned_at_a_likelier_length() -> None:
    """Alone, a running request is planned at the predictor's 90% quantile; once another
    waits for admission, at the median (scoreboard.WAITING_QUANTILE), and back when it enters."""
    sb = Scoreboard(LengthPredictor(quantile=0.9), DEFAULT, tokens_per_block=64)
    for k in range(200):
        sb.predictor.observe(100, k + 1, k + 1)
    sb.on_arrived(Arrived(1, 0.0, prompt_tokens=100, max_tokens=500))
    sb.on_first_token(FirstToken(1, 0.2))
    alone = int(sb.decision_inputs().running.remaining_tokens[0])
    sb.on_arrived(Arrived(2, 0.3, prompt_tokens=100, max_tokens=500))
    inputs = sb.decision_inputs()
    waiting = int(inputs.running.remaining_tokens[0])
    assert 170 <= alone <= 190 and 90 <= waiting <= 110  # of the lengths 2..200
    # The waiting request's own length stays the long one: its deadlines are its own.
    assert int(inputs.queued.output_tokens[0]) >= 170
    sb.on_first_token(FirstToken(2, 0.4))
    assert int(sb.decision_inputs().running.remaining_tokens[0]) == alone


def test_the_forecast_gives_the_median_length_for_its_prompts_once_learned() -> None:
    sb = _board()
    sb.on_arrived(Arrived(0, 0.0, prompt_tokens=3000, max_tokens=500))
    assert sb.forecast(1.0).median_output_tokens == 0.0  # nothing learned, nothing finished
    # 40 answers to prompts of the same size (one predictor bucket): 10, 11, ..., 49 tokens.
    for i in range(1, 41):
        sb.on_arrived(Arrived(i, 1.0, prompt_tokens=3000, max_tokens=500))
        sb.on_finished(Finished(i, 2.0, output_tokens=9 + i, reason=Finish.END_ID))
        if i == 8:  # before the predictor has learned: the median of those just finished
            assert sb.forecast(2.5).median_output_tokens == 13.5
    median = sb.forecast(3.0).median_output_tokens
    assert 29 <= median <= 31
    # Long after, the forecast window is empty of finishes, but the predictor remembers.
    sb.on_arrived(Arrived(99, 100.0, prompt_tokens=3000, max_tokens=500))
    assert 29 <= sb.forecast(101.0).median_output_tokens <= 31
