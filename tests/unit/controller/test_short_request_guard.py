"""The guard for short requests: the mean TBT at the shortest length a request plausibly has.

A prediction errs long on purpose, so a request that ends early has fewer gaps to spread a
prefill stall over. The guard binds like an SLO where some clock keeps it; where even the maximum
clock cannot, the maximum clock gives the request its best chance, unless it is lost anyway.
"""

from __future__ import annotations

import numpy as np
from test_clock_policy import CLOCKS, LIMITS, TABLE

from throttllem.controller.clock_policy import ChoiceKind, choose_clock
from throttllem.controller.projection import QueuedRequests, RunningRequests, project
from throttllem.controller.slo_slack import RequestDeadlines

TBT_S = 0.2


def _one_request_and_a_prompt(prompt: int, shortest: int, e2e_deadline_s: float = 1e6) -> tuple:
    """r0 has just produced its first token (at t=0, now); a `prompt`-token request waits to
    enter the next iteration. r0 is predicted to run 100 more tokens but may end after
    `shortest`."""
    running = RunningRequests(
        np.array([600], np.int64), np.array([100], np.int64), np.array([20], np.int64)
    )
    queued = QueuedRequests(
        np.array([prompt], np.int64), np.array([50], np.int64), np.array([200], np.int64)
    )
    dl = RequestDeadlines(
        running_ids=("r0",),
        running_e2e_deadline_s=np.array([e2e_deadline_s]),
        running_tbt_target_s=np.array([TBT_S]),
        running_first_token_s=np.zeros(1),
        running_generated=np.ones(1, np.int64),
        running_shortest_remaining=np.array([shortest], np.int64),
        queued_ids=("q0",),
        queued_ttft_deadline_s=np.array([np.inf]),
        queued_e2e_deadline_s=np.array([np.inf]),
        queued_tbt_target_s=np.array([np.inf]),
    )
    return project(running, queued, LIMITS), dl


def test_a_request_likely_to_run_long_leaves_the_clock_low() -> None:
    proj, dl = _one_request_and_a_prompt(prompt=8000, shortest=60)
    choice = choose_clock(0.0, proj, dl, TABLE)
    assert choice.clock_mhz == min(CLOCKS)


def test_a_request_that_may_end_soon_raises_the_clock_for_a_prefill_stall() -> None:
    # Ending after 2 more tokens, r0 has 2 gaps (0.4 s) for the 8,000-token prefill and one
    # decoding iteration: the analytic model takes ~0.29 s for them near 400 MHz.
    proj, dl = _one_request_and_a_prompt(prompt=8000, shortest=2)
    choice = choose_clock(0.0, proj, dl, TABLE)
    assert 390 <= choice.clock_mhz < max(CLOCKS)
    assert choice.tightest_request == "r0"


def test_a_guard_even_max_cannot_keep_sends_the_clock_to_max() -> None:
    # Ending after its next token, r0 has one gap (0.2 s): the 16,000-token prefill takes
    # ~0.17 s at max clock, too long with the margin; any lower clock only makes it longer.
    proj, dl = _one_request_and_a_prompt(prompt=16000, shortest=1)
    choice = choose_clock(0.0, proj, dl, TABLE)
    assert choice.clock_mhz == max(CLOCKS)
    assert "r0" in choice.reason and choice.lost_requests == ()
    assert choice.kind is ChoiceKind.MAX_GUARD


def test_a_request_lost_anyway_does_not_hold_the_clock_at_max() -> None:
    # Its end-to-end deadline passed long ago: no clock saves it, so its guard is no reason
    # for the maximum clock (it would hold it there for the rest of its life).
    proj, dl = _one_request_and_a_prompt(prompt=16000, shortest=1, e2e_deadline_s=-100.0)
    choice = choose_clock(0.0, proj, dl, TABLE)
    assert choice.lost_requests == ("r0",)
    assert choice.clock_mhz == min(CLOCKS)
