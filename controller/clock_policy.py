"""The SLO-aware clock choice: the lowest clock under which every request still meets its SLOs.

`choose_clock` is pure: projected future work + per-request deadlines + a compiled performance
model -> a `ClockChoice` that says why. Feasibility is monotone in the clock (the model is), so a
binary search over the supported clocks finds the lowest feasible one in log2(N) evaluations.
What a real GPU needs on top (hysteresis, rate limits) is clock_governor.py's.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .backlog_check import ArrivalForecast, backlog, lowest_sustaining_clock
from .ips_table import IpsTable
from .prefill_clock import PREFILL_CLOCKS, prefill_stalls_dominate, prompts_at_max
from .projection import Projection, with_expected_arrivals
from .slo_slack import (
    Check,
    Margin,
    RequestDeadlines,
    check,
    constraints,
    hopeless_at_max,
    slack_at,
    verdict,
)

FloatArray = npt.NDArray[np.float64]


class ChoiceKind(str, enum.Enum):
    """What decided the clock, in a few values a dashboard can count (`reason` says it in words)."""

    IDLE = "idle"  # nothing in flight
    SLO = "slo"  # the lowest clock meeting every SLO
    ENERGY_FLOOR = "energy_floor"  # the SLOs allow less, the energy-optimal clock is higher
    BACKLOG = "backlog"  # serving the arrivals within their E2E target while requests wait
    MAX_LOST = "max_lost"  # requests miss an SLO even at max clock (nearly saved, overload)
    MAX_GUARD = "max_guard"  # a short request's guard even max clock cannot keep
    MAX_PREFILL = "max_prefill"  # prompts enter while requests decode (prefill_clock)


@dataclass(frozen=True)
class ClockChoice:
    clock_mhz: int
    reason: str
    min_slack_s: float  # at the chosen clock; negative when requests are lost anyway
    tightest_request: str | None
    predicted_ips: float  # for the next iteration at the chosen clock
    lost_requests: tuple[str, ...] = ()
    kind: ChoiceKind = ChoiceKind.SLO


# More lost requests than this share of those in flight means overload: maximum clock.
OVERLOAD_LOST_SHARE = 0.05


# Near its optimum, energy per iteration hardly changes with the clock (fixed clocks, conv
# Llama-2-13B TP2 on the A100 twin at 0.9 load: 41.6% saved at 705 MHz, 40.1% at 900, 34.1% at
# 1005; docs/controller.md item 9). With a backlog the highest clock within this share of the
# optimum's energy is taken: the time it saves is work not left for a later, faster clock,
# which costs more because power is convex in the clock.
FLAT_ENERGY_SHARE = 0.02


# Decoding is bound by memory bandwidth: above ~1,100 MHz a faster clock buys 1-2% more speed
# for up to a third more energy per iteration (A100 twin, 13B TP2). So a request nearly saved
# gets the lowest clock within this share of the maximum clock's speed on the next iteration,
# not the maximum clock itself, where decoding makes the requests' time. Overload (throughput
# is what every queued request lacks), a short request's guard, prompts entering (a stall
# every decoding request waits through, compute-bound) and traffic whose prefill stalls
# dominate keep the maximum clock: there each percent of speed did save requests.
EFFECTIVE_MAX_SPEED_SHARE = 0.95


def _effective_max(table: IpsTable, proj: Projection) -> int:
    """The lowest clock index at which the projection's next iteration takes at most
    1 / EFFECTIVE_MAX_SPEED_SHARE of its time at the maximum clock."""
    first = table.seconds_all_clocks(proj.batch[:1], proj.kv_blocks[:1], proj.ctx_tokens[:1])
    seconds = first[:, 0]
    return int(np.argmax(seconds <= seconds[-1] / EFFECTIVE_MAX_SPEED_SHARE))


def stream_output_tokens(forecast: ArrivalForecast, stalls_dominate: bool | None) -> float:
    """How many tokens each request of the expected-arrivals stream generates in the projection.

    The stream stands for many requests at once, and a sum of many lengths is near their mean,
    not near each one's conservative quantile (the same reasoning as the median planning of
    running requests while others wait, docs/controller.md item 8): so the mean of the lengths
    just finished, once the lengths are learned and decoding makes the requests' time
    (`stalls_dominate` False). Otherwise the predictor's conservative length: before the lengths
    are learned nothing better is known, and where prompts dominate, a short answer's few gaps
    cannot absorb what a heavier stream hedges against."""
    if stalls_dominate is False and forecast.finished_output_tokens > 0:
        return forecast.finished_output_tokens
    return forecast.mean_output_tokens


def _top_of_the_flat(energy: FloatArray, optimal: int) -> int:
    """The highest clock index above `optimal` up to which every clock's energy per iteration
    stays within FLAT_ENERGY_SHARE of the optimum's."""
    within = energy[optimal:] <= (1.0 + FLAT_ENERGY_SHARE) * energy[optimal]
    beyond = np.nonzero(~within)[0]
    return optimal + (int(beyond[0]) - 1 if beyond.size else len(within) - 1)


def choose_clock(
    now_s: float,
    proj: Projection,
    deadlines: RequestDeadlines,
    table: IpsTable,
    *,
    margin: Margin | None = None,
    lost_fallback: str = "ignore",
    forecast: ArrivalForecast | None = None,
    energy_floor: bool = True,
    prefill_clock: str = "auto",
    room: int | None = None,
) -> ClockChoice:
    """The lowest supported clock meeting every SLO that can still be met.

    A request that misses an SLO even at maximum clock is lost whatever the clock. With
    `lost_fallback="max"` (the paper's rule) its presence sends the clock to maximum. With
    "ignore" (the default) only a request that is nearly saved keeps the clock at maximum; one
    late by more than HOPELESS_FRACTION of its remaining time is left out of the choice, so a
    hopeless request does not hold every other request at maximum clock for its whole life.
    `prefill_clock="max"` runs an iteration that carries prompts at maximum clock whenever
    requests are decoding; "auto" (the default) does so while prefill stalls dominate
    (PREFILL_CLOCKS). `room` (projection.engine_room) caps the forecast's expected arrivals at
    what the batch holds; None: uncapped.
    """
    if lost_fallback not in ("ignore", "max"):
        raise ValueError(f"lost_fallback must be 'ignore' or 'max', got {lost_fallback!r}")
    if prefill_clock not in PREFILL_CLOCKS:
        raise ValueError(
            f"prefill_clock must be one of {', '.join(PREFILL_CLOCKS)}, got {prefill_clock!r}"
        )
    arrived = proj  # before the forecast adds its expected arrivals

    @functools.cache
    def stalls_dominate() -> bool | None:
        # Whether prompts are most of a request's service (None: lengths not learned yet).
        # Read by the prefill clock, the energy floor and the maximum speed; asked once at most.
        if forecast is None or forecast.median_output_tokens <= 1:
            return None
        return prefill_stalls_dominate(table, arrived, deadlines, forecast)

    queued = bool(deadlines.queued_ids)  # only a queued request brings a prompt
    margin = margin or Margin()
    # With a backlog, time not spent serving is never recovered while arrivals keep pace: the
    # wait grows for every later request, including those not yet arrived whose deadlines no
    # check below can see. So the clock must serve the sustained arrivals within their E2E
    # target.
    sustain = 0
    waiting = backlog(proj)
    if forecast is not None and forecast.rate_per_s > 0 and waiting:
        sustain = lowest_sustaining_clock(
            table, int(proj.batch[0]), int(proj.kv_blocks[0]), forecast, waiting
        )
    if forecast is not None and forecast.per_iteration > 0:
        proj = with_expected_arrivals(
            proj,
            forecast.per_iteration,
            forecast.mean_prompt_tokens,
            stream_output_tokens(forecast, stalls_dominate()),
            table.tokens_per_block,
            room,
        )
    clocks = table.clocks_mhz
    top = len(clocks) - 1
    work = table.prepare(proj.batch, proj.kv_blocks, proj.ctx_tokens)
    cons = constraints(now_s, proj, deadlines)
    at_max = Check(float("inf"), None, (), 0.0)
    at_risk: list[str] = []  # guards even the maximum clock cannot keep
    if proj.horizon and cons.ids:
        slack, span, first_s = slack_at(table, top, margin, work, cons)
        failed_guard = cons.guard & (slack < 0)
        if failed_guard.any():
            at_risk = [cons.ids[i] for i in np.nonzero(failed_guard)[0]]
            keep = ~failed_guard
            cons, slack, span = cons.subset(keep), slack[keep], span[keep]
        at_max = verdict(slack, span, first_s, cons, name_losses=True)
    lost = at_max.negative
    hopeless = set(at_max.hopeless)
    if hopeless:
        # Giving a request up is final: left out, it runs at whatever clock the others allow
        # and is lost for certain. So only when it is hopeless at max clock on what is certain:
        # the work already arrived (the forecast's expected prompts are a hedge) and its own
        # shortest plausible length (the predicted one errs long on purpose; on heavy-tailed
        # traffic a request outliving its prediction is predicted much longer at once).
        hopeless &= hopeless_at_max(now_s, arrived, deadlines, table, margin)
    nearly = tuple(r for r in lost if r not in hopeless)
    # Triage is for the odd hopeless request. When many are lost the engine is overloaded: a
    # slower clock would only lengthen the queue every later request waits in.
    in_flight = len(deadlines.running_ids) + len(deadlines.queued_ids)
    overloaded = len(lost) > max(1, OVERLOAD_LOST_SHARE * in_flight)

    def maximum(
        reason: str, tightest: str | None, kind: ChoiceKind, effective: bool
    ) -> ClockChoice:
        index = _effective_max(table, proj) if proj.horizon and effective else top
        first = table.seconds_prepared(index, work)[0] if proj.horizon else at_max.first_iteration_s
        ips = 1.0 / max(float(first), 1e-9)
        return ClockChoice(
            int(clocks[index]), reason, at_max.min_slack_s, tightest, ips, lost, kind
        )

    if (lost and lost_fallback == "max") or nearly or overloaded:
        return maximum(
            f"max: {len(lost)} request(s) miss an SLO even at max clock"
            + (f" ({len(nearly)} nearly saved)" if nearly and lost_fallback != "max" else ""),
            at_max.tightest,
            ChoiceKind.MAX_LOST,
            # Only where the lengths are learned and decoding, not prompts (compute-bound),
            # makes the requests' time.
            effective=not (overloaded or lost_fallback == "max") and stalls_dominate() is False,
        )
    # A short request is at stake: every second of stall the maximum clock saves is one it
    # may need (in a burst, more prompts are coming). Not for a request lost anyway: that
    # would hold the maximum clock for the rest of its life.
    lost_set = set(lost)
    guarded = next((r for r in at_risk if r not in lost_set), None)
    if guarded is not None:
        return maximum(
            f"max: {guarded} would miss its mean TBT even at max clock if it ended as early "
            "as it plausibly can",
            guarded,
            ChoiceKind.MAX_GUARD,
            effective=False,
        )
    if prompts_at_max(prefill_clock, arrived, deadlines, queued and stalls_dominate() is True):
        reason = f"max: prompts enter while requests decode (prefill_clock={prefill_clock})"
        return maximum(reason, None, ChoiceKind.MAX_PREFILL, effective=False)
    if lost:
        cons = cons.subset(np.array([i not in lost_set for i in cons.ids], dtype=bool))
        at_max = check(proj, table, top, margin, work, cons)
    lo, hi, best = 0, top, at_max
    while lo < hi:
        mid = (lo + hi) // 2
        result = check(proj, table, mid, margin, work, cons)
        if result.min_slack_s >= 0:
            hi, best = mid, result
        else:
            lo = mid + 1
    if sustain > lo:
        lo = sustain
        best = check(proj, table, lo, margin, work, cons)
    chosen, kind = lo, ChoiceKind.SLO
    if proj.horizon == 0:
        reason, kind = "idle: nothing in flight", ChoiceKind.IDLE
    else:
        reason = f"lowest clock meeting every SLO; tightest {best.tightest}"
        if sustain == lo and sustain > 0:
            reason = (
                "backlog: lowest clock serving the arrivals within their E2E target; "
                f"tightest {best.tightest}"
            )
            kind = ChoiceKind.BACKLOG
        if energy_floor and table.has_power:
            # Below the energy-optimal clock a run lasts longer than it saves: never go there.
            # Time a faster clock saves is spent idle (idle power is paid anyway) unless
            # requests wait for it (a backlog, or prompts that are most of their service):
            # then it goes to them, and whole iteration energy is the cost (item 4).
            # A queued request gains the time saved when its prompt is most of its service,
            # or when the traffic is not known yet (the cautious answer).
            prompt_service = queued and stalls_dominate() is not False
            energy = table.energy_per_iteration_j(
                int(proj.batch[0]),
                int(proj.kv_blocks[0]),
                above_idle=not (waiting or prompt_service),
            )
            optimal = lo + int(np.argmin(energy[lo:]))
            if waiting:
                optimal = _top_of_the_flat(energy, optimal)
            if optimal > lo:
                chosen, kind = optimal, ChoiceKind.ENERGY_FLOOR
                reason = (
                    f"energy-optimal clock (SLOs allow {int(clocks[lo])} MHz); "
                    f"tightest {best.tightest}"
                )
        if lost:
            reason += f"; {len(lost)} request(s) lost even at max clock, left out"
    if not in_flight:  # the projection still has its one empty iteration, floored as any other
        reason, kind = "idle: nothing in flight", ChoiceKind.IDLE
    return ClockChoice(
        int(clocks[chosen]),
        reason,
        best.min_slack_s,
        best.tightest,
        1.0 / max(best.first_iteration_s, 1e-9) if proj.horizon else 0.0,
        lost,
        kind,
    )
