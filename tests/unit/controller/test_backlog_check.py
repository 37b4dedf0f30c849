"""The backlog check: with requests waiting for admission, the clock serves the arrivals within
their E2E target (keeps up with them, or lets the queue grow only as far as the target absorbs)."""

from __future__ import annotations

import numpy as np
from test_clock_policy import CLOCKS, COL, TABLE, AnalyticModel, PoweredModel

from throttllem.controller.backlog_check import (
    DRAIN_BUDGET_SHARE,
    DRAIN_LOOKAHEAD_S,
    ArrivalForecast,
    backlog,
    lowest_sustaining_clock,
)
from throttllem.controller.clock_policy import (
    FLAT_ENERGY_SHARE,
    ChoiceKind,
    _top_of_the_flat,
    choose_clock,
)
from throttllem.controller.ips_table import IpsTable
from throttllem.controller.projection import (
    EngineLimits,
    QueuedRequests,
    RunningRequests,
    project,
)
from throttllem.controller.slo_slack import RequestDeadlines

FULL = EngineLimits(max_batch_size=16, kv_capacity_blocks=2000, tokens_per_block=64)
FULL_TABLE = IpsTable(AnalyticModel(), CLOCKS, tp=1, max_batch=16, kv_capacity_blocks=2000)


def _full_engine(queued: int) -> tuple:
    """16 running requests fill the batch; `queued` more wait for a slot. Loose deadlines."""
    n = 16
    running = RunningRequests(
        np.full(n, 600, np.int64), np.arange(20, 20 + 10 * n, 10, dtype=np.int64),
        np.full(n, 20, np.int64),
    )  # fmt: skip
    q = QueuedRequests(
        np.full(queued, 500, np.int64), np.full(queued, 50, np.int64), np.full(queued, 10, np.int64)
    )
    proj = project(running, q, FULL)
    dl = RequestDeadlines(
        running_ids=tuple(f"r{i}" for i in range(n)),
        running_e2e_deadline_s=np.full(n, 1e6),
        running_tbt_target_s=np.full(n, np.inf),
        running_first_token_s=np.zeros(n),
        running_generated=np.full(n, 10, np.int64),
        queued_ids=tuple(f"q{i}" for i in range(queued)),
        queued_ttft_deadline_s=np.full(queued, np.inf),
        queued_e2e_deadline_s=np.full(queued, 1e6),
        queued_tbt_target_s=np.full(queued, np.inf),
    )
    return proj, dl


def _costs(clock: int, batch: int, kv: int, f: ArrivalForecast) -> tuple[float, float]:
    """The same arithmetic, from the analytic model itself (no table): the engine seconds a
    request costs (what its prompt adds to an iteration, plus its tokens' share of decoding
    iterations) and its own time in service (its prefill and all its decoding iterations)."""
    model = AnalyticModel()

    def seconds(ctx: float) -> float:
        x = np.zeros((1, 5))
        for name, value in (("sm_clock_mhz", clock), ("batch_size", batch), ("kv_blocks", kv),
                            ("ctx_tokens", ctx), ("tp", 1)):  # fmt: skip
            x[0, COL[name]] = value
        return float(1.0 / model.predict_ips(x)[0])

    prefill = seconds(f.mean_prompt_tokens) - seconds(0)
    tokens = f.finished_output_tokens
    return prefill + tokens * seconds(0) / batch, prefill + tokens * seconds(0)


def _utilisation(clock: int, batch: int, kv: int, f: ArrivalForecast) -> float:
    return (f.sustained_rate_per_s or f.rate_per_s) * _costs(clock, batch, kv, f)[0]


def _wait_then_and_service(
    clock: int, batch: int, kv: int, f: ArrivalForecast, waiting: int
) -> tuple[float, float]:
    """A request arriving DRAIN_LOOKAHEAD_S from now, with the queue grown at the arrival rate
    minus the clock's service rate: its wait, and its own time in service."""
    per_request, service = _costs(clock, batch, kv, f)
    rate = f.sustained_rate_per_s or f.rate_per_s
    queue = waiting + (rate - 1.0 / per_request) * DRAIN_LOOKAHEAD_S
    return queue * per_request, service


def test_a_full_batch_with_requests_waiting_is_a_backlog() -> None:
    assert backlog(_full_engine(queued=3)[0]) == 3
    assert backlog(_full_engine(queued=0)[0]) == 0
    # A request that enters in the next iteration is only arriving, not waiting.
    running = RunningRequests(np.full(2, 600, np.int64), np.full(2, 50, np.int64),
                              np.full(2, 20, np.int64))  # fmt: skip
    q = QueuedRequests(np.array([500]), np.array([50]), np.array([10]))
    assert backlog(project(running, q, FULL)) == 0


def test_the_sustaining_clock_is_the_lowest_whose_utilisation_stays_at_most_one() -> None:
    clocks = FULL_TABLE.clocks_mhz
    for f in (
        ArrivalForecast(rate_per_s=6.0, mean_prompt_tokens=800, finished_output_tokens=120),
        ArrivalForecast(
            rate_per_s=9.0,
            mean_prompt_tokens=800,
            finished_output_tokens=120,
            sustained_rate_per_s=6.0,
        ),
    ):
        # KV 0 is a grid point, and the model is linear in prompt tokens: the table is exact.
        i = lowest_sustaining_clock(FULL_TABLE, 16, 0, f)
        assert 0 < i < len(clocks) - 1
        assert _utilisation(clocks[i], 16, 0, f) <= 1.0
        assert _utilisation(clocks[i - 1], 16, 0, f) > 1.0


def test_a_burst_above_the_sustained_rate_does_not_raise_the_sustaining_clock() -> None:
    """The queued requests' deadlines speak for a burst; the backlog check for the load."""
    steady = ArrivalForecast(rate_per_s=6.0, mean_prompt_tokens=800, finished_output_tokens=120)
    burst = ArrivalForecast(
        rate_per_s=9.0, mean_prompt_tokens=800, finished_output_tokens=120, sustained_rate_per_s=6.0
    )
    busy = ArrivalForecast(rate_per_s=9.0, mean_prompt_tokens=800, finished_output_tokens=120)
    assert lowest_sustaining_clock(FULL_TABLE, 16, 0, burst) == lowest_sustaining_clock(
        FULL_TABLE, 16, 0, steady
    )
    assert lowest_sustaining_clock(FULL_TABLE, 16, 0, busy) > lowest_sustaining_clock(
        FULL_TABLE, 16, 0, steady
    )


def test_more_arrivals_need_a_higher_clock_and_too_many_need_the_maximum() -> None:
    def clock(rate: float) -> int:
        f = ArrivalForecast(rate_per_s=rate, mean_prompt_tokens=800, finished_output_tokens=120)
        return lowest_sustaining_clock(FULL_TABLE, 16, 400, f)

    assert clock(3.0) == 0  # even the lowest clock keeps up
    assert 0 < clock(5.0) < clock(7.0) < clock(9.0)
    assert clock(100.0) == len(CLOCKS) - 1


def test_with_a_backlog_the_clock_keeps_up_with_the_arrivals() -> None:
    """Deadlines alone allow the lowest clock; the arrivals do not, once requests wait."""
    forecast = ArrivalForecast(rate_per_s=6.0, mean_prompt_tokens=800, finished_output_tokens=120)
    proj, dl = _full_engine(queued=4)
    kept_up = choose_clock(0.0, proj, dl, FULL_TABLE, forecast=forecast)
    floor = lowest_sustaining_clock(
        FULL_TABLE, int(proj.batch[0]), int(proj.kv_blocks[0]), forecast
    )
    assert kept_up.clock_mhz == int(FULL_TABLE.clocks_mhz[floor]) > min(CLOCKS)
    assert "backlog" in kept_up.reason and kept_up.kind is ChoiceKind.BACKLOG
    # The same arrivals without a backlog: nothing waits, the deadlines decide alone.
    proj, dl = _full_engine(queued=0)
    assert choose_clock(0.0, proj, dl, FULL_TABLE, forecast=forecast).clock_mhz == min(CLOCKS)


def test_without_finished_requests_the_predicted_output_length_sizes_the_demand() -> None:
    predicted = ArrivalForecast(rate_per_s=6.0, mean_prompt_tokens=800, mean_output_tokens=120)
    measured = ArrivalForecast(rate_per_s=6.0, mean_prompt_tokens=800, finished_output_tokens=120)
    assert lowest_sustaining_clock(TABLE, 16, 400, predicted) == lowest_sustaining_clock(
        TABLE, 16, 400, measured
    )


def test_the_cost_of_a_prompt_is_interpolated_between_prompt_levels() -> None:
    """Rounding 1100 prompt tokens up to the 2048 level would count almost twice the prefill;
    the analytic model is linear in prompt tokens, so interpolation is exact."""
    for prompt in (100.0, 800.0, 1100.0, 3000.0):
        extra = FULL_TABLE.prefill_seconds(16, 0, prompt)
        # AnalyticModel: a prompt adds 0.01 ms per token x (1410 / f).
        expected = 0.01e-3 * prompt * 1410.0 / FULL_TABLE.clocks_mhz
        assert np.allclose(extra, expected, rtol=1e-6)


def test_all_clocks_at_once_equal_each_clock_in_turn() -> None:
    """The backlog check reads every clock in one gather; it must be the per-clock lookup."""
    batch, kv, ctx = np.array([3, 16, 5]), np.array([10, 400, 0]), np.array([0, 900, 0])
    at_once = FULL_TABLE.seconds_all_clocks(batch, kv, ctx)
    in_turn = [FULL_TABLE.seconds(i, batch, kv, ctx) for i in range(len(FULL_TABLE.clocks_mhz))]
    assert np.array_equal(at_once, np.stack(in_turn))


STEADY = ArrivalForecast(rate_per_s=6.0, mean_prompt_tokens=800, finished_output_tokens=120)


def _with_target(f: ArrivalForecast, e2e_s: float) -> ArrivalForecast:
    return ArrivalForecast(**{**f.__dict__, "e2e_target_s": e2e_s})


def test_a_queue_the_e2e_target_absorbs_lets_the_clock_fall_below_keeping_up() -> None:
    keep_up = lowest_sustaining_clock(FULL_TABLE, 16, 0, STEADY, waiting=4)
    assert keep_up > 0
    roomy = lowest_sustaining_clock(FULL_TABLE, 16, 0, _with_target(STEADY, 100.0), waiting=4)
    assert roomy < keep_up
    # A target that leaves no room for waiting, or a queue that already fills it: keep up.
    tight = _with_target(STEADY, 1.0)
    assert lowest_sustaining_clock(FULL_TABLE, 16, 0, tight, waiting=4) == keep_up
    full = lowest_sustaining_clock(FULL_TABLE, 16, 0, _with_target(STEADY, 100.0), waiting=2000)
    assert full == keep_up
    # More waiting now: less room for the queue to grow, a clock at least as high.
    assert (
        roomy
        <= lowest_sustaining_clock(FULL_TABLE, 16, 0, _with_target(STEADY, 100.0), waiting=300)
        <= keep_up
    )


def test_below_keeping_up_the_clock_is_the_lowest_leaving_a_late_arrival_its_e2e_budget() -> None:
    clocks = FULL_TABLE.clocks_mhz
    f = _with_target(STEADY, 60.0)
    i = lowest_sustaining_clock(FULL_TABLE, 16, 0, f, waiting=20)
    keep_up = lowest_sustaining_clock(FULL_TABLE, 16, 0, STEADY, waiting=20)
    assert 0 < i < keep_up
    wait, service = _wait_then_and_service(clocks[i], 16, 0, f, 20)
    assert wait > 0 and wait + service <= DRAIN_BUDGET_SHARE * 60.0
    wait, service = _wait_then_and_service(clocks[i - 1], 16, 0, f, 20)
    assert wait + service > DRAIN_BUDGET_SHARE * 60.0
    assert _utilisation(clocks[i - 1], 16, 0, f) > 1.0


def test_with_a_backlog_and_an_e2e_target_the_choice_rides_the_queue() -> None:
    proj, dl = _full_engine(queued=4)
    kept_up = choose_clock(0.0, proj, dl, FULL_TABLE, forecast=STEADY)
    rides = choose_clock(0.0, proj, dl, FULL_TABLE, forecast=_with_target(STEADY, 40.0))
    assert rides.kind is ChoiceKind.BACKLOG and kept_up.kind is ChoiceKind.BACKLOG
    assert min(CLOCKS) < rides.clock_mhz < kept_up.clock_mhz
    assert "E2E target" in rides.reason


POWERED = IpsTable(PoweredModel(), CLOCKS, tp=1, max_batch=16, kv_capacity_blocks=2000)


def test_with_a_backlog_the_energy_floor_takes_the_top_of_its_flat_optimum() -> None:
    """Near the optimum a faster clock costs almost nothing per iteration, and with requests
    waiting the time it saves is work not left for a later, costlier clock."""
    none = ArrivalForecast()  # no rate: only the energy floor speaks
    proj, dl = _full_engine(queued=0)
    alone = choose_clock(0.0, proj, dl, POWERED, forecast=none)
    proj, dl = _full_engine(queued=4)
    waiting = choose_clock(0.0, proj, dl, POWERED, forecast=none)
    assert alone.kind is waiting.kind is ChoiceKind.ENERGY_FLOOR
    energy = POWERED.energy_per_iteration_j(int(proj.batch[0]), int(proj.kv_blocks[0]), False)
    best = int(np.argmin(energy))
    chosen = int(np.searchsorted(POWERED.clocks_mhz, waiting.clock_mhz))
    assert chosen > best
    assert energy[chosen] <= (1 + FLAT_ENERGY_SHARE) * energy[best] < energy[chosen + 1]
    # With nobody waiting for a slot, the floor stays at the optimum of marginal energy.
    marginal = POWERED.energy_per_iteration_j(16, int(_full_engine(0)[0].kv_blocks[0]), True)
    assert alone.clock_mhz == POWERED.clocks_mhz[int(np.argmin(marginal))]


def test_the_top_of_the_flat_stops_at_the_first_clock_above_it() -> None:
    energy = np.array([5.0, 1.0, 1.01, 1.015, 1.05, 1.0, 2.0])
    assert _top_of_the_flat(energy, 1) == 3  # 1.0 at index 5 is past a rise: not reached
    assert _top_of_the_flat(np.array([3.0, 1.0, 1.01]), 1) == 2  # flat to the top
    assert _top_of_the_flat(np.array([1.0, 2.0]), 0) == 0
