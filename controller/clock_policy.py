"""The SLO-aware clock choice: the lowest clock under which every request still meets its SLOs.

`choose_clock` is pure: projected future work + per-request deadlines + a compiled performance
model -> a `ClockChoice` that says why. Feasibility is monotone in the clock (the model is), so a
binary search over the supported clocks finds the lowest feasible one in log2(N) evaluations.
What a real GPU needs on top (hysteresis, rate limits) is clock_governor.py's.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .backlog_check import ArrivalForecast, backlog, lowest_sustaining_clock
from .ips_table import IpsTable, PreparedWork
from .projection import Projection, with_expected_arrivals

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class RequestDeadlines:
    """Per-request targets, aligned with the projection's running and queued arrays.

    Absolute times in seconds (the caller's time base); `inf` where a request has no such SLO.
    """

    running_ids: tuple[str, ...]
    running_e2e_deadline_s: FloatArray
    running_tbt_target_s: FloatArray
    running_first_token_s: FloatArray
    running_generated: IntArray
    queued_ids: tuple[str, ...]
    queued_ttft_deadline_s: FloatArray
    queued_e2e_deadline_s: FloatArray
    queued_tbt_target_s: FloatArray
    # Tokens each running request may still generate if it turns out as short as plausible
    # (a low quantile of its length); None: one, i.e. it might end after the next iteration.
    running_shortest_remaining: IntArray | None = None


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


@dataclass(frozen=True)
class _Check:
    min_slack_s: float
    tightest: str | None
    negative: tuple[str, ...]
    first_iteration_s: float
    hopeless: tuple[str, ...] = ()  # late even at this clock by more than HOPELESS_FRACTION


@dataclass(frozen=True)
class _Constraints:
    """Every SLO as `slack = base - T[end] + T[start]`, T[i] the projected time at which
    iteration i-1 ends (T[0] = 0). Built once per decision, evaluated once per clock tried."""

    base_s: FloatArray
    end: IntArray
    start: IntArray
    ids: tuple[str, ...]
    # Guards are not SLOs but caution: the mean TBT if a request ended as early as it
    # plausibly can. One that even the maximum clock cannot keep loses no request: it sends
    # the clock to maximum (choose_clock).
    guard: npt.NDArray[np.bool_]

    def subset(self, keep: npt.NDArray[np.bool_]) -> _Constraints:
        return _Constraints(
            self.base_s[keep],
            self.end[keep],
            self.start[keep],
            tuple(i for i, k in zip(self.ids, keep, strict=True) if k),
            self.guard[keep],
        )


def _constraints(
    now_s: float, proj: Projection, dl: RequestDeadlines, e2e_at_earliest: bool = False
) -> _Constraints:
    """`e2e_at_earliest`: each running request's E2E deadline as if it ended as early as it
    plausibly can (the triage's question: could it still make it?)."""
    bases, ends, starts, ids, guards = [], [], [], [], []
    if dl.running_ids:
        last = proj.running_last_iter + 1
        zero = np.zeros_like(last)
        gaps = np.maximum(dl.running_generated + proj.running_last_iter, 1)
        # The mean TBT must hold however long the request turns out to be: at its predicted
        # end, and at its shortest plausible end (a prediction errs long on purpose, and a
        # prefill stall hurts a short request most: few gaps to spread it over).
        shortest = dl.running_shortest_remaining
        early = np.minimum(last, 1 if shortest is None else np.maximum(shortest, 1))
        early_gaps = np.maximum(dl.running_generated + early - 1, 1)
        bases += [
            dl.running_e2e_deadline_s - now_s,
            dl.running_tbt_target_s * gaps + dl.running_first_token_s - now_s,
            dl.running_tbt_target_s * early_gaps + dl.running_first_token_s - now_s,
        ]
        ends += [early if e2e_at_earliest else last, last, early]
        starts += [zero, zero, zero]
        ids += list(dl.running_ids) * 3
        n = len(dl.running_ids)
        guards += [np.zeros(2 * n, dtype=bool), np.ones(n, dtype=bool)]
    if dl.queued_ids:
        beyond_first = proj.queued_first_iter < 0
        beyond_last = proj.queued_last_iter < 0
        first = np.maximum(proj.queued_first_iter, 0) + 1
        last = np.where(beyond_last, proj.horizon, proj.queued_last_iter + 1)
        zero = np.zeros_like(first)
        gaps = np.maximum(last - first, 1)
        # Not served within the horizon: any finite target counts as missed.
        ttft = np.where(beyond_first, -np.inf, dl.queued_ttft_deadline_s - now_s)
        e2e = np.where(beyond_last, -np.inf, dl.queued_e2e_deadline_s - now_s)
        tbt = np.where(beyond_last, -np.inf, dl.queued_tbt_target_s * gaps)
        for targets, base in (
            (dl.queued_ttft_deadline_s, ttft),
            (dl.queued_e2e_deadline_s, e2e),
            (dl.queued_tbt_target_s, tbt),
        ):
            bases.append(np.where(np.isinf(targets), np.inf, base))
        ends += [first, last, last]
        starts += [zero, zero, first]
        ids += list(dl.queued_ids) * 3
        guards.append(np.zeros(3 * len(dl.queued_ids), dtype=bool))
    if not bases:
        empty = np.zeros(0, dtype=np.int64)
        return _Constraints(np.zeros(0), empty, empty, (), np.zeros(0, dtype=bool))
    return _Constraints(
        np.concatenate(bases).astype(np.float64),
        np.concatenate(ends).astype(np.int64),
        np.concatenate(starts).astype(np.int64),
        tuple(ids),
        np.concatenate(guards),
    )


def _slack(
    table: IpsTable, clock_index: int, margin: Margin, work: PreparedWork, cons: _Constraints
) -> tuple[FloatArray, FloatArray, float]:
    """Each constraint's slack at a clock, the time span it covers, and the next iteration's
    duration."""
    tau = table.seconds_prepared(clock_index, work)
    t = np.empty(tau.shape[0] + 1)
    t[0] = 0.0
    np.cumsum(tau, out=t[1:])
    span = t.take(cons.end) - t.take(cons.start)
    slack = cons.base_s - span * (1.0 + margin.fraction) - margin.seconds
    return slack, span, float(tau[0])


def _hopeless_at_max(
    now_s: float, proj: Projection, deadlines: RequestDeadlines, table: IpsTable, margin: Margin
) -> set[str]:
    """The requests late at max clock by more than HOPELESS_FRACTION even on `proj` (the work
    already arrived) and with every running request ending as early as it plausibly can."""
    if not proj.horizon:
        return set()
    work = table.prepare(proj.batch, proj.kv_blocks, proj.ctx_tokens)
    cons = _constraints(now_s, proj, deadlines, e2e_at_earliest=True)
    if not cons.ids:
        return set()
    cons = cons.subset(~cons.guard)
    top = len(table.clocks_mhz) - 1
    return set(_verdict(*_slack(table, top, margin, work, cons), cons, True).hopeless)


def _check(
    proj: Projection,
    table: IpsTable,
    clock_index: int,
    margin: Margin,
    work: PreparedWork,
    cons: _Constraints,
    name_losses: bool = False,
) -> _Check:
    if proj.horizon == 0 or not cons.ids:
        return _Check(float("inf"), None, (), 0.0)
    return _verdict(*_slack(table, clock_index, margin, work, cons), cons, name_losses)


def _verdict(
    slack: FloatArray, span: FloatArray, first_s: float, cons: _Constraints, name_losses: bool
) -> _Check:
    if not cons.ids:
        return _Check(float("inf"), None, (), first_s)
    worst = int(np.argmin(slack))
    negative: tuple[str, ...] = ()
    hopeless: tuple[str, ...] = ()
    if name_losses:
        negative = tuple(dict.fromkeys(cons.ids[i] for i in np.nonzero(slack < 0)[0]))
        far = slack < -HOPELESS_FRACTION * span
        hopeless = tuple(dict.fromkeys(cons.ids[i] for i in np.nonzero(far)[0]))
    return _Check(float(slack[worst]), cons.ids[worst], negative, first_s, hopeless)


# More lost requests than this share of those in flight means overload: maximum clock.
OVERLOAD_LOST_SHARE = 0.05
# A request late even at max clock by more than this share of the time it still needs is given
# up (left out of the choice); one late by less is still worth the maximum clock.
HOPELESS_FRACTION = 0.1


# "optimal": an iteration carrying prompts runs at the clock the SLOs and the energy floor
# pick, like any other. "max": at maximum clock while requests decode. For short-answer,
# prompt-heavy traffic: every prefill stalls everyone decoding, a few-token answer has few
# gaps to spread the stall over, and a slow prefill pushes those in flight into the next
# burst's prompts. It buys attainment with energy (docs/controller.md, item 7). "auto": "max"
# while prefill stalls dominate the traffic (prefill_stalls_dominate), else "optimal".
PREFILL_CLOCKS = ("auto", "optimal", "max")
# Prefill stalls dominate when one mean prompt's prefill, even at maximum clock, takes this
# share of a typical request's mean-TBT budget ((median length - 1) x TBT target). Measured at
# the decisions of matrix runs on the Azure traces: code 0.02-0.1 (10th-90th percentile, median
# ~0.05), conversation below 0.008 (99th percentile).
STALL_SHARE = 0.01


def prefill_stalls_dominate(
    table: IpsTable, proj: Projection, deadlines: RequestDeadlines, forecast: ArrivalForecast
) -> bool:
    """Whether the traffic is short answers to long prompts: a typical request's mean TBT is
    decided by the prefills it sits through rather than by the decoding clock."""
    targets = np.concatenate([deadlines.running_tbt_target_s, deadlines.queued_tbt_target_s])
    targets = targets[np.isfinite(targets)]
    if forecast.median_output_tokens <= 1 or not targets.size or not proj.horizon:
        return False
    batch, kv = int(proj.batch[0]), int(proj.kv_blocks[0])
    stall = float(table.prefill_seconds(batch, kv, forecast.mean_prompt_tokens)[-1])
    budget = (forecast.median_output_tokens - 1) * float(np.median(targets))
    return stall >= STALL_SHARE * budget


def _prompts_at_max(
    setting: str,
    table: IpsTable,
    arrived: Projection,
    deadlines: RequestDeadlines,
    forecast: ArrivalForecast | None,
) -> bool:
    """Whether the next iteration carries prompts while requests decode and `setting` runs
    such an iteration at maximum clock. `arrived`: the projection of the requests in flight
    only (the forecast's expected prompts fill every iteration; they are no prefill now)."""
    if not (arrived.horizon and int(arrived.ctx_tokens[0]) > 0 and deadlines.running_ids):
        return False
    if setting == "max":
        return True
    return (
        setting == "auto"
        and forecast is not None
        and prefill_stalls_dominate(table, arrived, deadlines, forecast)
    )


@dataclass(frozen=True)
class Margin:
    """Slack every request must keep: a fraction of the time still to run (the projection and
    the model err in proportion to it) plus a fixed part."""

    fraction: float = 0.1
    seconds: float = 0.05


# Near its optimum, energy per iteration hardly changes with the clock (fixed clocks, conv
# Llama-2-13B TP2 on the A100 twin at 0.9 load: 41.6% saved at 705 MHz, 40.1% at 900, 34.1% at
# 1005; docs/controller.md item 9). With a backlog the highest clock within this share of the
# optimum's energy is taken: the time it saves is work not left for a later, faster clock,
# which costs more because power is convex in the clock.
FLAT_ENERGY_SHARE = 0.02


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
) -> ClockChoice:
    """The lowest supported clock meeting every SLO that can still be met.

    A request that misses an SLO even at maximum clock is lost whatever the clock. With
    `lost_fallback="max"` (the paper's rule) its presence sends the clock to maximum. With
    "ignore" (the default) only a request that is nearly saved keeps the clock at maximum; one
    late by more than HOPELESS_FRACTION of its remaining time is left out of the choice, so a
    hopeless request does not hold every other request at maximum clock for its whole life.
    `prefill_clock="max"` runs an iteration that carries prompts at maximum clock whenever
    requests are decoding; "auto" (the default) does so while prefill stalls dominate
    (PREFILL_CLOCKS).
    """
    if lost_fallback not in ("ignore", "max"):
        raise ValueError(f"lost_fallback must be 'ignore' or 'max', got {lost_fallback!r}")
    if prefill_clock not in PREFILL_CLOCKS:
        raise ValueError(
            f"prefill_clock must be one of {', '.join(PREFILL_CLOCKS)}, got {prefill_clock!r}"
        )
    arrived = proj  # before the forecast adds its expected arrivals
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
            forecast.mean_output_tokens,
            table.tokens_per_block,
        )
    clocks = table.clocks_mhz
    top = len(clocks) - 1
    work = table.prepare(proj.batch, proj.kv_blocks, proj.ctx_tokens)
    cons = _constraints(now_s, proj, deadlines)
    at_max = _Check(float("inf"), None, (), 0.0)
    at_risk: list[str] = []  # guards even the maximum clock cannot keep
    if proj.horizon and cons.ids:
        slack, span, first_s = _slack(table, top, margin, work, cons)
        failed_guard = cons.guard & (slack < 0)
        if failed_guard.any():
            at_risk = [cons.ids[i] for i in np.nonzero(failed_guard)[0]]
            keep = ~failed_guard
            cons, slack, span = cons.subset(keep), slack[keep], span[keep]
        at_max = _verdict(slack, span, first_s, cons, name_losses=True)
    lost = at_max.negative
    hopeless = set(at_max.hopeless)
    if hopeless:
        # Giving a request up is final: left out, it runs at whatever clock the others allow
        # and is lost for certain. So only when it is hopeless at max clock on what is certain:
        # the work already arrived (the forecast's expected prompts are a hedge) and its own
        # shortest plausible length (the predicted one errs long on purpose; on heavy-tailed
        # traffic a request outliving its prediction is predicted much longer at once).
        hopeless &= _hopeless_at_max(now_s, arrived, deadlines, table, margin)
    nearly = tuple(r for r in lost if r not in hopeless)
    # Triage is for the odd hopeless request. When many are lost the engine is overloaded: a
    # slower clock would only lengthen the queue every later request waits in.
    in_flight = len(deadlines.running_ids) + len(deadlines.queued_ids)
    overloaded = len(lost) > max(1, OVERLOAD_LOST_SHARE * in_flight)

    def maximum(reason: str, tightest: str | None, kind: ChoiceKind) -> ClockChoice:
        ips = 1.0 / max(at_max.first_iteration_s, 1e-9)
        top_mhz = int(clocks[top])
        return ClockChoice(top_mhz, reason, at_max.min_slack_s, tightest, ips, lost, kind)

    if (lost and lost_fallback == "max") or nearly or overloaded:
        return maximum(
            f"max: {len(lost)} request(s) miss an SLO even at max clock"
            + (f" ({len(nearly)} nearly saved)" if nearly and lost_fallback != "max" else ""),
            at_max.tightest,
            ChoiceKind.MAX_LOST,
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
        )
    if _prompts_at_max(prefill_clock, table, arrived, deadlines, forecast):
        reason = f"max: prompts enter while requests decode (prefill_clock={prefill_clock})"
        return maximum(reason, None, ChoiceKind.MAX_PREFILL)
    if lost:
        cons = cons.subset(np.array([i not in lost_set for i in cons.ids], dtype=bool))
        at_max = _check(proj, table, top, margin, work, cons)
    lo, hi, best = 0, top, at_max
    while lo < hi:
        mid = (lo + hi) // 2
        result = _check(proj, table, mid, margin, work, cons)
        if result.min_slack_s >= 0:
            hi, best = mid, result
        else:
            lo = mid + 1
    if sustain > lo:
        lo = sustain
        best = _check(proj, table, lo, margin, work, cons)
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
            # requests wait: then it goes to them, and whole iteration energy is the cost.
            energy = table.energy_per_iteration_j(
                int(proj.batch[0]), int(proj.kv_blocks[0]), above_idle=not deadlines.queued_ids
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
