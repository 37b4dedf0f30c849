"""The backlog check: with requests waiting for admission, the clock must keep the wait that
the arrivals build within what their E2E target leaves (docs/controller.md, item 5); and the
arrival forecast it and the projection read.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .ips_table import IpsTable
from .projection import Projection


@dataclass(frozen=True)
class ArrivalForecast:
    """Requests expected to arrive while those in flight run: their prefills will stall the
    decoding of everyone in flight, and more so at a low clock (prefill is compute-bound)."""

    rate_per_s: float = 0.0
    mean_prompt_tokens: float = 0.0
    # The predictor's (conservative) length for the mean prompt: how long the expected arrivals
    # stay in the projected batch until lengths are learned, and where prompts dominate
    # (clock_policy.stream_output_tokens).
    mean_output_tokens: float = 0.0
    iteration_s: float = 0.0  # recent mean iteration time: turns the rate into per iteration
    # Mean tokens the recently finished requests generated (0: none finished yet): what the
    # arrivals will ask of the engine on average, for the backlog check, and the length of the
    # expected arrivals once lengths are learned and decoding dominates.
    finished_output_tokens: float = 0.0
    # The predictor's median length for the mean prompt (0: not learned yet): how many gaps a
    # typical request spreads a prefill stall over (clock_policy.prefill_stalls_dominate).
    median_output_tokens: float = 0.0
    # The arrival rate over scoreboard.SUSTAIN_WINDOW_S (0: use rate_per_s): what a backlog
    # must be served at. A queue may absorb a burst the E2E targets leave room for (the queued
    # requests' own deadlines are checked); it must not outgrow the load of the last minutes
    # by more than the E2E target absorbs (lowest_sustaining_clock).
    sustained_rate_per_s: float = 0.0
    # The deployment's E2E target (inf: none): how long a backlog may make a new request wait.
    e2e_target_s: float = float("inf")

    @property
    def per_iteration(self) -> float:
        return self.rate_per_s * self.iteration_s


# A queued request the projection cannot admit within this many iterations waits for a slot or
# for KV blocks: the engine is at its limit and its throughput is set by the clock.
BACKLOG_AFTER_ITERATIONS = 2


def backlog(proj: Projection) -> int:
    """Requests waiting for admission (a full batch or KV cache), not just for the next
    iteration."""
    first = proj.queued_first_iter
    return int(np.count_nonzero((first < 0) | (first > BACKLOG_AFTER_ITERATIONS)))


# How long the sustained rate is assumed to last: the span it was measured over
# (scoreboard.SUSTAIN_WINDOW_S). A queue may grow at that rate for this long if a request
# arriving at its end still meets the E2E target.
DRAIN_LOOKAHEAD_S = 120.0
# Share of the E2E target a request may spend in the queue and in service: the rest is margin
# for the projection's and the rate's errors.
DRAIN_BUDGET_SHARE = 0.8


def lowest_sustaining_clock(
    table: IpsTable, batch: int, kv_blocks: int, forecast: ArrivalForecast, waiting: int = 0
) -> int:
    """The lowest clock index at which a full engine serves the sustained arrivals within their
    E2E target.

    Each request costs its prefill (what an iteration carrying its prompt takes beyond a
    decoding one) and its output tokens' share of decoding iterations at the current batch:
    a clock keeps up when rate x (prefill + tokens x iteration / batch) <= 1, at the rate of
    the last SUSTAIN_WINDOW_S (scoreboard). A slower clock lets the queue grow, and that is
    allowed while the queue would stay short enough: `waiting` requests now, grown at the
    arrival rate minus the clock's service rate for DRAIN_LOOKAHEAD_S, must leave a request
    arriving then DRAIN_BUDGET_SHARE of the E2E target for its wait and its service. Power is
    convex in the clock, so riding a burst on the E2E budget at one moderate clock costs less
    than keeping pace with it (docs/evaluation.md, 2026-12-07). Without an E2E target the
    clock keeps up. The top index when no clock manages it.
    """
    batch = max(batch, 1)
    one = np.ones(1, dtype=np.int64)
    decode = table.seconds_all_clocks(one * batch, one * kv_blocks, one * 0)[:, 0]
    prefill = table.prefill_seconds(batch, kv_blocks, forecast.mean_prompt_tokens)
    tokens = forecast.finished_output_tokens or forecast.mean_output_tokens
    rate = forecast.sustained_rate_per_s or forecast.rate_per_s
    per_request = prefill + tokens * decode / batch  # engine seconds each request takes
    utilisation = rate * per_request
    ok = utilisation <= 1.0
    if np.isfinite(forecast.e2e_target_s):
        # The queue then, (waiting + (rate - 1 / per_request) x lookahead), in seconds of
        # engine time: what a request arriving then waits.
        wait_then = waiting * per_request + (utilisation - 1.0) * DRAIN_LOOKAHEAD_S
        service = prefill + tokens * decode
        ok |= wait_then + service <= DRAIN_BUDGET_SHARE * forecast.e2e_target_s
    index = np.nonzero(ok)[0]
    return int(index[0]) if index.size else len(table.clocks_mhz) - 1
