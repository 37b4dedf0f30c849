"""Every SLO as slack over the projected iteration times: the per-request deadlines, the
margin each must keep, and the arithmetic that says, at one clock, which requests make it.

A constraint is `slack = base - T[end] + T[start]`, T[i] the projected time at which iteration
i-1 ends: built once per decision (`constraints`), evaluated once per clock tried (`slack_at`),
so the clock search in clock_policy.py costs one cumulative sum per clock.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .ips_table import IpsTable, PreparedWork
from .projection import Projection

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

# A request late even at max clock by more than this share of the time it still needs is given
# up (left out of the choice); one late by less is still worth the maximum clock.
HOPELESS_FRACTION = 0.1


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


@dataclass(frozen=True)
class Margin:
    """Slack every request must keep: a fraction of the time still to run (the projection and
    the model err in proportion to it) plus a fixed part."""

    fraction: float = 0.1
    seconds: float = 0.05


@dataclass(frozen=True)
class Check:
    min_slack_s: float
    tightest: str | None
    negative: tuple[str, ...]
    first_iteration_s: float
    hopeless: tuple[str, ...] = ()  # late even at this clock by more than HOPELESS_FRACTION


@dataclass(frozen=True)
class Constraints:
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

    def subset(self, keep: npt.NDArray[np.bool_]) -> Constraints:
        return Constraints(
            self.base_s[keep],
            self.end[keep],
            self.start[keep],
            tuple(i for i, k in zip(self.ids, keep, strict=True) if k),
            self.guard[keep],
        )


def constraints(
    now_s: float, proj: Projection, dl: RequestDeadlines, e2e_at_earliest: bool = False
) -> Constraints:
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
        return Constraints(np.zeros(0), empty, empty, (), np.zeros(0, dtype=bool))
    return Constraints(
        np.concatenate(bases).astype(np.float64),
        np.concatenate(ends).astype(np.int64),
        np.concatenate(starts).astype(np.int64),
        tuple(ids),
        np.concatenate(guards),
    )


def slack_at(
    table: IpsTable, clock_index: int, margin: Margin, work: PreparedWork, cons: Constraints
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


def hopeless_at_max(
    now_s: float, proj: Projection, deadlines: RequestDeadlines, table: IpsTable, margin: Margin
) -> set[str]:
    """The requests late at max clock by more than HOPELESS_FRACTION even on `proj` (the work
    already arrived) and with every running request ending as early as it plausibly can."""
    if not proj.horizon:
        return set()
    work = table.prepare(proj.batch, proj.kv_blocks, proj.ctx_tokens)
    cons = constraints(now_s, proj, deadlines, e2e_at_earliest=True)
    if not cons.ids:
        return set()
    cons = cons.subset(~cons.guard)
    top = len(table.clocks_mhz) - 1
    return set(verdict(*slack_at(table, top, margin, work, cons), cons, True).hopeless)


def check(
    proj: Projection,
    table: IpsTable,
    clock_index: int,
    margin: Margin,
    work: PreparedWork,
    cons: Constraints,
    name_losses: bool = False,
) -> Check:
    if proj.horizon == 0 or not cons.ids:
        return Check(float("inf"), None, (), 0.0)
    return verdict(*slack_at(table, clock_index, margin, work, cons), cons, name_losses)


def verdict(
    slack: FloatArray, span: FloatArray, first_s: float, cons: Constraints, name_losses: bool
) -> Check:
    if not cons.ids:
        return Check(float("inf"), None, (), first_s)
    worst = int(np.argmin(slack))
    negative: tuple[str, ...] = ()
    hopeless: tuple[str, ...] = ()
    if name_losses:
        negative = tuple(dict.fromkeys(cons.ids[i] for i in np.nonzero(slack < 0)[0]))
        far = slack < -HOPELESS_FRACTION * span
        hopeless = tuple(dict.fromkeys(cons.ids[i] for i in np.nonzero(far)[0]))
    return Check(float(slack[worst]), cons.ids[worst], negative, first_s, hopeless)
