"""The backlog check: with requests waiting for admission, the clock must keep up with the
arrivals and clear the wait (docs/controller.md, item 5); and the arrival forecast it and the
projection read.
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
    mean_output_tokens: float = 0.0  # predicted (conservative): sizes the projected load
    iteration_s: float = 0.0  # recent mean iteration time: turns the rate into per iteration
    # Mean tokens the recently finished requests generated (0: none finished yet): what the
    # arrivals will ask of the engine on average, for the backlog check.
    finished_output_tokens: float = 0.0
    # The predictor's median length for the mean prompt (0: not learned yet): how many gaps a
    # typical request spreads a prefill stall over (clock_policy.prefill_stalls_dominate).
    median_output_tokens: float = 0.0
    # The arrival rate over scoreboard.SUSTAIN_WINDOW_S (0: use rate_per_s): what a backlog
    # must keep up with. A queue may absorb a burst the E2E targets leave room for (the queued
    # requests' own deadlines are checked); it must not outgrow the load of the last minutes.
    sustained_rate_per_s: float = 0.0

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


def lowest_sustaining_clock(
    table: IpsTable, batch: int, kv_blocks: int, forecast: ArrivalForecast
) -> int:
    """The lowest clock index at which a full engine keeps up with the sustained arrivals.

    Each request costs its prefill (what an iteration carrying its prompt takes beyond a
    decoding one) and its output tokens' share of decoding iterations at the current batch:
    rate x (prefill + tokens x iteration / batch) must not exceed 1, at the rate of the last
    SUSTAIN_WINDOW_S (scoreboard). What already waits is not drained on a schedule of its own:
    the queued requests' deadlines are in the projection, and they raise the clock when the
    wait threatens them. The top index when no clock manages it.
    """
    batch = max(batch, 1)
    one = np.ones(1, dtype=np.int64)
    decode = table.seconds_all_clocks(one * batch, one * kv_blocks, one * 0)[:, 0]
    prefill = table.prefill_seconds(batch, kv_blocks, forecast.mean_prompt_tokens)
    tokens = forecast.finished_output_tokens or forecast.mean_output_tokens
    rate = forecast.sustained_rate_per_s or forecast.rate_per_s
    utilisation = rate * (prefill + tokens * decode / batch)
    ok = np.nonzero(utilisation <= 1.0)[0]
    return int(ok[0]) if ok.size else len(table.clocks_mhz) - 1
