"""Clock choice over a projection, with an analytic performance model standing in for CatBoost."""

from __future__ import annotations

import numpy as np
import pytest

from throttllem.controller.backlog_check import ArrivalForecast
from throttllem.controller.clock_governor import ClockGovernor, GovernorConfig
from throttllem.controller.clock_policy import (
    EFFECTIVE_MAX_SPEED_SHARE,
    ChoiceKind,
    ClockChoice,
    choose_clock,
    stream_output_tokens,
)
from throttllem.controller.ips_table import IpsTable
from throttllem.controller.perf_model import FEATURES
from throttllem.controller.projection import (
    EngineLimits,
    Projection,
    QueuedRequests,
    RunningRequests,
    project,
)
from throttllem.controller.slo_slack import Margin, RequestDeadlines

CLOCKS = list(range(1410, 209, -15))
COL = {name: i for i, name in enumerate(FEATURES)}


class AnalyticModel:
    """Iteration time = memory part (clock-free) + compute part (1/f) + prefill: like decode."""

    def predict_ips(self, x: np.ndarray) -> np.ndarray:
        f = x[:, COL["sm_clock_mhz"]]
        ms = (
            8.0
            + 0.02 * x[:, COL["kv_blocks"]] / 64
            + (2.0 + 0.05 * x[:, COL["batch_size"]] + 0.01 * x[:, COL["ctx_tokens"]]) * (1410.0 / f)
        )
        return 1000.0 / ms


LIMITS = EngineLimits(max_batch_size=64, kv_capacity_blocks=2000, tokens_per_block=64)
TABLE = IpsTable(AnalyticModel(), CLOCKS, tp=1, max_batch=64, kv_capacity_blocks=2000)
EXACT = Margin(fraction=0.0, seconds=0.0)


def _scenario(
    e2e_s: float,
    n: int = 16,
    remaining: int = 100,
    tbt_s: float = np.inf,
    queued: int = 0,
    ttft_s: float = np.inf,
):
    running = RunningRequests(
        np.full(n, 600, np.int64), np.full(n, remaining, np.int64), np.full(n, 20, np.int64)
    )
    q = QueuedRequests(
        np.full(queued, 500, np.int64), np.full(queued, 50, np.int64), np.full(queued, 10, np.int64)
    )
    proj = project(running, q, LIMITS)
    dl = RequestDeadlines(
        running_ids=tuple(f"r{i}" for i in range(n)),
        running_e2e_deadline_s=np.full(n, e2e_s),
        running_tbt_target_s=np.full(n, tbt_s),
        running_first_token_s=np.zeros(n),
        running_generated=np.full(n, 10, np.int64),
        queued_ids=tuple(f"q{i}" for i in range(queued)),
        queued_ttft_deadline_s=np.full(queued, ttft_s),
        queued_e2e_deadline_s=np.full(queued, np.inf),
        queued_tbt_target_s=np.full(queued, np.inf),
    )
    return proj, dl


def _time_to_finish(clock: int, proj) -> float:
    x = np.column_stack(
        [
            np.full(proj.horizon, clock),
            np.maximum(proj.batch, 1),
            proj.kv_blocks,
            proj.ctx_tokens,
            np.ones(proj.horizon),
        ]
    ).astype(float)
    busy = proj.batch > 0
    return float((1.0 / AnalyticModel().predict_ips(x))[busy].sum())


def test_loose_deadlines_choose_the_lowest_clock() -> None:
    proj, dl = _scenario(e2e_s=1000.0)
    choice = choose_clock(0.0, proj, dl, TABLE)
    assert choice.clock_mhz == 210
    assert choice.min_slack_s > 0 and not choice.lost_requests


def test_the_choice_is_the_lowest_clock_that_meets_the_deadline() -> None:
    proj, dl = _scenario(e2e_s=1.5)
    choice = choose_clock(0.0, proj, dl, TABLE, margin=EXACT)
    assert 210 < choice.clock_mhz < 1410
    # Feasible at the chosen clock, infeasible one step lower (by the model itself, no table).
    assert _time_to_finish(choice.clock_mhz, proj) <= 1.5 + 1e-9
    assert _time_to_finish(choice.clock_mhz - 15, proj) > 1.5


def test_a_tighter_deadline_needs_a_higher_clock() -> None:
    loose = choose_clock(0.0, *_scenario(e2e_s=1.8), TABLE, margin=EXACT)
    tight = choose_clock(0.0, *_scenario(e2e_s=1.3), TABLE, margin=EXACT)
    assert tight.clock_mhz > loose.clock_mhz


def test_the_default_margin_keeps_slack_in_proportion_to_the_time_left() -> None:
    proj, dl = _scenario(e2e_s=1.5)
    exact = choose_clock(0.0, proj, dl, TABLE, margin=EXACT)
    safe = choose_clock(0.0, proj, dl, TABLE)
    assert safe.clock_mhz > exact.clock_mhz
    assert _time_to_finish(safe.clock_mhz, proj) * 1.1 + 0.05 <= 1.5 + 1e-9


def test_a_lost_request_sends_the_clock_to_maximum_under_the_paper_rule() -> None:
    choice = choose_clock(0.0, *_scenario(e2e_s=0.1), TABLE, lost_fallback="max")
    assert choice.clock_mhz == 1410
    assert choice.min_slack_s < 0
    assert set(choice.lost_requests) == {f"r{i}" for i in range(16)}
    assert choice.reason.startswith("max:") and choice.kind is ChoiceKind.MAX_LOST


def test_by_default_a_lost_request_is_left_out_and_the_rest_still_throttle() -> None:
    proj, dl = _scenario(e2e_s=1000.0)
    late = np.array(dl.running_e2e_deadline_s)
    late[3] = -0.5  # past its deadline: hopeless however soon it ends
    dl = RequestDeadlines(**{**dl.__dict__, "running_e2e_deadline_s": late})
    choice = choose_clock(0.0, proj, dl, TABLE)
    assert choice.lost_requests == ("r3",)
    assert choice.clock_mhz == 210
    assert "left out" in choice.reason and choice.kind is ChoiceKind.SLO
    with pytest.raises(ValueError, match="lost_fallback"):
        choose_clock(0.0, proj, dl, TABLE, lost_fallback="pray")


def test_a_request_lost_only_at_its_predicted_length_is_not_given_up() -> None:
    """Its predicted 100 tokens miss the deadline even at max clock, but if it ended within
    its shortest plausible 5 it would make it: the maximum clock, not abandonment (a
    prediction errs long on purpose)."""
    proj, dl = _scenario(e2e_s=1000.0)
    late = np.array(dl.running_e2e_deadline_s)
    late[3] = 0.3  # ~100 iterations of >= 10 ms do not fit; 5 do
    shortest = np.full(16, 5, np.int64)
    kept = RequestDeadlines(
        **{**dl.__dict__, "running_e2e_deadline_s": late, "running_shortest_remaining": shortest}
    )
    choice = choose_clock(0.0, proj, kept, TABLE, forecast=LEARNED)
    assert choice.lost_requests == ("r3",)
    assert choice.clock_mhz == _effective_max(proj) and choice.kind is ChoiceKind.MAX_LOST
    # Even its shortest plausible end is too late: given up, the rest throttle.
    shortest[3] = 60
    given_up = RequestDeadlines(
        **{**dl.__dict__, "running_e2e_deadline_s": late, "running_shortest_remaining": shortest}
    )
    choice = choose_clock(0.0, proj, given_up, TABLE)
    assert choice.lost_requests == ("r3",)
    assert choice.clock_mhz == 210 and "left out" in choice.reason


def test_tbt_target_binds_like_a_deadline() -> None:
    # 110 tokens, first token at t=0: a mean TBT of 13 ms allows 109 gaps x 13 ms = 1.42 s.
    free = choose_clock(0.0, *_scenario(e2e_s=1000.0), TABLE)
    bound = choose_clock(0.0, *_scenario(e2e_s=1000.0, tbt_s=0.013), TABLE)
    assert bound.clock_mhz > free.clock_mhz


def test_queued_ttft_binds() -> None:
    proj, dl = _scenario(e2e_s=1000.0, n=64, remaining=30, queued=2, ttft_s=0.4)
    choice = choose_clock(0.0, proj, dl, TABLE, margin=EXACT)
    assert choice.clock_mhz > 210
    assert choice.tightest_request in {"q0", "q1"}


def test_margin_raises_the_clock() -> None:
    plain = choose_clock(0.0, *_scenario(e2e_s=2.0), TABLE, margin=EXACT)
    margin = choose_clock(0.0, *_scenario(e2e_s=2.0), TABLE, margin=Margin(0.0, 0.4))
    assert margin.clock_mhz > plain.clock_mhz


def test_table_is_conservative_against_the_model() -> None:
    proj, _ = _scenario(e2e_s=1.0)
    for index in (0, 40, 80):
        table_s = TABLE.seconds(index, proj.batch, proj.kv_blocks, proj.ctx_tokens).sum()
        assert table_s >= _time_to_finish(int(TABLE.clocks_mhz[index]), proj) * 0.999


def _choice(mhz: int) -> ClockChoice:
    return ClockChoice(mhz, "test", 1.0, None, 10.0)


def test_governor_skips_unchanged_and_rate_limits_lowering_but_not_raising() -> None:
    gov = ClockGovernor(GovernorConfig(min_interval_s=1.0, hysteresis_mhz=30))
    assert gov.apply(0.0, _choice(1200)) == 1200
    assert gov.apply(0.1, _choice(1200)) is None  # unchanged
    assert gov.apply(0.2, _choice(900)) is None  # lowering too soon
    assert gov.apply(0.3, _choice(1410)) == 1410  # raising: at once
    assert gov.apply(1.5, _choice(1395)) is None  # within hysteresis
    assert gov.apply(1.6, _choice(900)) == 900
    assert gov.changes == 3
    gov.forget()
    assert gov.apply(1.7, _choice(900)) == 900


@pytest.mark.parametrize("n", [1, 64])
def test_idle_or_busy_choices_are_reasoned(n: int) -> None:
    proj, dl = _scenario(e2e_s=1000.0, n=n)
    busy = choose_clock(0.0, proj, dl, TABLE)
    assert "SLO" in busy.reason and busy.kind is ChoiceKind.SLO


def test_nothing_in_flight_is_an_idle_choice() -> None:
    idle = choose_clock(0.0, *_scenario(e2e_s=1000.0, n=0), TABLE)
    assert idle.kind is ChoiceKind.IDLE and idle.reason.startswith("idle")


# Lengths learned (a median of 301 tokens), no arrivals expected.
LEARNED = ArrivalForecast(median_output_tokens=301)


def _effective_max(proj: Projection) -> int:
    """The lowest clock at which the next iteration is within the share of its max-clock speed."""
    seconds = np.array(
        [TABLE.seconds(i, proj.batch[:1], proj.kv_blocks[:1], proj.ctx_tokens[:1])[0]
         for i in range(len(TABLE.clocks_mhz))]
    )  # fmt: skip
    within = np.nonzero(seconds * EFFECTIVE_MAX_SPEED_SHARE <= seconds[-1])[0]
    return int(TABLE.clocks_mhz[within[0]])


def test_a_nearly_saved_request_gets_the_maximum_speed_not_the_maximum_clock() -> None:
    """Decoding is bound by memory: the top few hundred MHz buy a few percent of speed for much
    more power. A request lost at max clock on its predicted length (but not on its shortest)
    is served within EFFECTIVE_MAX_SPEED_SHARE of the maximum's speed, at the lowest clock
    that gives it, where decoding makes the requests' time."""
    proj, dl = _scenario(e2e_s=1000.0, tbt_s=0.2)
    late = np.array(dl.running_e2e_deadline_s)
    late[3] = 0.3
    nearly = RequestDeadlines(
        **{**dl.__dict__, "running_e2e_deadline_s": late,
           "running_shortest_remaining": np.full(16, 5, np.int64)}
    )  # fmt: skip
    choice = choose_clock(0.0, proj, nearly, TABLE, forecast=LEARNED)
    assert choice.kind is ChoiceKind.MAX_LOST and "nearly saved" in choice.reason
    chosen = int(np.searchsorted(TABLE.clocks_mhz, choice.clock_mhz))
    at = [TABLE.seconds(i, proj.batch[:1], proj.kv_blocks[:1], proj.ctx_tokens[:1])[0]
          for i in (chosen - 1, chosen, len(CLOCKS) - 1)]  # fmt: skip
    assert at[1] * EFFECTIVE_MAX_SPEED_SHARE <= at[2] < at[0] * EFFECTIVE_MAX_SPEED_SHARE
    assert 210 < choice.clock_mhz < 1410
    assert choice.predicted_ips == pytest.approx(1.0 / at[1])
    # The paper's rule keeps the maximum clock itself; so do traffic not learned yet and
    # traffic whose prompts, compute-bound, make the requests' time (short answers to long
    # prompts: prefill_stalls_dominate).
    paper = choose_clock(0.0, proj, nearly, TABLE, lost_fallback="max", forecast=LEARNED)
    unknown = choose_clock(0.0, proj, nearly, TABLE)
    prompts = ArrivalForecast(median_output_tokens=3, mean_prompt_tokens=16000.0)
    prompt_bound = choose_clock(0.0, proj, nearly, TABLE, forecast=prompts)
    assert paper.clock_mhz == unknown.clock_mhz == prompt_bound.clock_mhz == 1410
    assert prompt_bound.kind is unknown.kind is ChoiceKind.MAX_LOST


def test_many_lost_requests_mean_overload_and_maximum_clock() -> None:
    """Overloaded, throughput is what is scarce: every later request waits in the queue a
    slower clock lengthens, so here the maximum clock itself."""
    proj, dl = _scenario(e2e_s=1000.0)
    late = np.array(dl.running_e2e_deadline_s)
    late[:4] = 0.1  # 4 of 16 hopeless: far more than the odd one triage is for
    dl = RequestDeadlines(**{**dl.__dict__, "running_e2e_deadline_s": late})
    choice = choose_clock(0.0, proj, dl, TABLE)
    assert choice.clock_mhz == 1410
    assert len(choice.lost_requests) == 4 and choice.kind is ChoiceKind.MAX_LOST


class PoweredModel(AnalyticModel):
    """Per-GPU power: 60 W idle floor + static 40 W + dynamic rising with f^2.5 (voltage)."""

    def has_power(self) -> bool:
        return True

    def predict_power_w(self, x: np.ndarray) -> np.ndarray:
        f = x[:, COL["sm_clock_mhz"]] / 1410.0
        return 100.0 + 300.0 * f**2.5


def test_the_energy_floor_weighs_only_power_above_idle() -> None:
    """With loose deadlines the SLOs allow the lowest clock; the floor stops where running
    slower costs more than it saves. Counting the idle power a GPU draws anyway (marginal
    energy) puts that floor lower than counting whole iteration energy."""
    proj, dl = _scenario(e2e_s=1e6)
    whole = IpsTable(PoweredModel(), CLOCKS, tp=1, max_batch=64, kv_capacity_blocks=2000)
    marginal = IpsTable(PoweredModel(), CLOCKS, tp=1, max_batch=64, kv_capacity_blocks=2000,
                        idle_power_w=60.0)  # fmt: skip
    by_whole = choose_clock(0.0, proj, dl, whole, margin=EXACT)
    by_marginal = choose_clock(0.0, proj, dl, marginal, margin=EXACT)
    no_floor = choose_clock(0.0, proj, dl, whole, margin=EXACT, energy_floor=False)
    assert no_floor.clock_mhz == min(CLOCKS) and no_floor.kind is ChoiceKind.SLO
    assert min(CLOCKS) < by_marginal.clock_mhz < by_whole.clock_mhz
    assert by_marginal.kind is by_whole.kind is ChoiceKind.ENERGY_FLOOR
    for table, choice in ((whole, by_whole), (marginal, by_marginal)):
        energy = table.energy_per_iteration_j(16, 16 * 11)
        assert table.clocks_mhz[int(np.argmin(energy))] == choice.clock_mhz


class TwoGpuPoweredModel(PoweredModel):
    """The same GPUs, two of them: the power model predicts the whole engine's power."""

    def predict_power_w(self, x: np.ndarray) -> np.ndarray:
        return 2.0 * super().predict_power_w(x)


def test_the_idle_share_of_a_multi_gpu_engine_is_every_gpus_idle_power() -> None:
    """Engine power covers all `tp` GPUs, the idle power is per GPU: above idle means above
    tp x idle. Subtracting one GPU's idle only would charge slow clocks for idle power the
    other GPU draws anyway, and put the floor too high (it cost Llama-2-13B TP2 ~9 points of
    saving against a fixed clock)."""
    one = IpsTable(PoweredModel(), CLOCKS, tp=1, max_batch=64, kv_capacity_blocks=2000,
                   idle_power_w=60.0)  # fmt: skip
    two = IpsTable(TwoGpuPoweredModel(), CLOCKS, tp=2, max_batch=64, kv_capacity_blocks=2000,
                   idle_power_w=60.0)  # fmt: skip
    # AnalyticModel's speed does not depend on tp: the two engines differ only in power.
    assert np.allclose(two.energy_per_iteration_j(16, 176), 2 * one.energy_per_iteration_j(16, 176))
    proj, dl = _scenario(e2e_s=1e6)
    by_one = choose_clock(0.0, proj, dl, one, margin=EXACT)
    by_two = choose_clock(0.0, proj, dl, two, margin=EXACT)
    assert by_two.clock_mhz == by_one.clock_mhz


POWERED = IpsTable(PoweredModel(), CLOCKS, tp=1, max_batch=64, kv_capacity_blocks=2000,
                   idle_power_w=60.0)  # fmt: skip


def _floor(proj: Projection, above_idle: bool) -> int:
    energy = POWERED.energy_per_iteration_j(
        int(proj.batch[0]), int(proj.kv_blocks[0]), above_idle=above_idle
    )
    return int(POWERED.clocks_mhz[int(np.argmin(energy))])


def test_a_request_entering_at_the_next_iteration_keeps_the_floor_marginal() -> None:
    """It waits for nothing: a faster clock's time saved would be spent idle, not on it. (The
    whole-energy floor for any queued request held ~700 MHz for every arrival on conversation
    traffic: a quarter of the time at 0.25 load.)"""
    proj, dl = _scenario(e2e_s=1e6, queued=4, ttft_s=1e6)
    assert proj.queued_first_iter.max() == 0  # admitted at once
    known = ArrivalForecast(median_output_tokens=301)  # lengths learned, no TBT stall at stake
    entering = choose_clock(0.0, proj, dl, POWERED, margin=EXACT, forecast=known)
    assert entering.clock_mhz == _floor(proj, above_idle=True) < _floor(proj, above_idle=False)
    # Until the traffic's lengths are learned nothing says its prompts are cheap: whole energy.
    unknown = choose_clock(0.0, proj, dl, POWERED, margin=EXACT)
    assert unknown.clock_mhz == _floor(proj, above_idle=False)


def test_with_requests_waiting_for_admission_the_floor_weighs_whole_iteration_energy() -> None:
    """Time a faster clock saves goes to the requests a full batch keeps waiting: the floor
    counts the whole energy of an iteration (and takes the top of its flat optimum)."""
    proj, dl = _scenario(e2e_s=1e6, n=64, queued=4, ttft_s=1e6)
    assert (proj.queued_first_iter > 2).all()  # a backlog: they wait for slots
    waiting = choose_clock(0.0, proj, dl, POWERED, margin=EXACT)
    assert waiting.clock_mhz >= _floor(proj, above_idle=False) > _floor(proj, above_idle=True)


def test_expected_arrivals_alone_never_make_a_request_hopeless() -> None:
    """Prompts the forecast expects slow every projected iteration; a request that misses its
    deadline only because of them is still worth the maximum clock (they may not come)."""
    proj, dl = _scenario(e2e_s=1000.0)
    late = np.array(dl.running_e2e_deadline_s)
    shortest = np.full(16, 100, np.int64)  # no shorter end is plausible
    at_max_s = _time_to_finish(1410, proj)
    late[3] = at_max_s * 1.3  # makes it at max on what has arrived, with the 10% margin
    dl = RequestDeadlines(
        **{**dl.__dict__, "running_e2e_deadline_s": late, "running_shortest_remaining": shortest}
    )
    quiet = choose_clock(0.0, proj, dl, TABLE)
    assert quiet.lost_requests == ()
    busy = ArrivalForecast(
        rate_per_s=400.0, mean_prompt_tokens=2000.0, mean_output_tokens=100.0, iteration_s=0.01
    )
    choice = choose_clock(0.0, proj, dl, TABLE, forecast=busy)
    assert "r3" in choice.lost_requests
    assert choice.kind is ChoiceKind.MAX_LOST


def test_expected_arrivals_generate_the_mean_length_once_decoding_is_known_to_dominate() -> None:
    """The stream stands for many requests: their lengths add up to about their mean, not to
    each one's conservative quantile. Before lengths are learned, and where prompts dominate,
    the conservative length stays."""
    finished_mean = ArrivalForecast(mean_output_tokens=400.0, finished_output_tokens=120.0)
    assert stream_output_tokens(finished_mean, False) == 120.0
    assert stream_output_tokens(finished_mean, True) == 400.0
    assert stream_output_tokens(finished_mean, None) == 400.0
    nothing_finished = ArrivalForecast(mean_output_tokens=400.0)
    assert stream_output_tokens(nothing_finished, False) == 400.0
    # In the choice: a stream that stays for 120 tokens slows the requests in flight less than
    # one that stays for 400, so a lower clock meets the same deadline.
    proj, dl = _scenario(e2e_s=12.0, remaining=500)
    stream = {"rate_per_s": 20.0, "iteration_s": 0.012, "mean_prompt_tokens": 600.0}
    decoding = ArrivalForecast(
        **stream, mean_output_tokens=400.0, finished_output_tokens=120.0, median_output_tokens=301
    )
    unlearned = ArrivalForecast(**stream, mean_output_tokens=400.0, finished_output_tokens=120.0)
    by_mean = choose_clock(0.0, proj, dl, TABLE, forecast=decoding, energy_floor=False)
    by_quantile = choose_clock(0.0, proj, dl, TABLE, forecast=unlearned, energy_floor=False)
    assert by_mean.kind is by_quantile.kind is ChoiceKind.SLO
    assert by_mean.clock_mhz < by_quantile.clock_mhz < 1410


def test_expected_arrivals_beyond_the_engines_room_do_not_raise_the_clock() -> None:
    """Arrivals the batch has no room for wait for admission: they do not slow the requests
    running (the backlog check, not the projection, speaks for a queue that grows). Their
    prompts still enter as slots free up, so the capped stream still costs some clock."""
    proj, dl = _scenario(e2e_s=10.0, remaining=500)  # 16 running, all ending together
    busy = ArrivalForecast(
        rate_per_s=20.0, iteration_s=0.012, mean_prompt_tokens=600.0, mean_output_tokens=300.0
    )
    unbounded = choose_clock(0.0, proj, dl, TABLE, forecast=busy, energy_floor=False)
    full = choose_clock(0.0, proj, dl, TABLE, forecast=busy, energy_floor=False, room=16)
    roomy = choose_clock(0.0, proj, dl, TABLE, forecast=busy, energy_floor=False, room=10_000)
    quiet = choose_clock(0.0, proj, dl, TABLE, energy_floor=False)
    assert unbounded.kind is full.kind is ChoiceKind.SLO
    assert quiet.clock_mhz < full.clock_mhz < unbounded.clock_mhz < 1410
    assert roomy.clock_mhz == unbounded.clock_mhz  # a room never reached changes nothing
