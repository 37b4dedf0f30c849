"""Whether an iteration that carries prompts runs at maximum clock (`prefill_clock`): for
short-answer, prompt-heavy traffic a slow prefill stalls everyone decoding.
"""

from __future__ import annotations

import numpy as np

from .backlog_check import ArrivalForecast
from .ips_table import IpsTable
from .projection import Projection
from .slo_slack import RequestDeadlines

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


def prompts_at_max(
    setting: str, arrived: Projection, deadlines: RequestDeadlines, stalls_dominate: bool
) -> bool:
    """Whether the next iteration carries prompts while requests decode and `setting` runs
    such an iteration at maximum clock. `arrived`: the projection of the requests in flight
    only (the forecast's expected prompts fill every iteration; they are no prefill now).
    `stalls_dominate`: prefill_stalls_dominate's answer for this decision ("auto")."""
    if not (arrived.horizon and int(arrived.ctx_tokens[0]) > 0 and deadlines.running_ids):
        return False
    return setting == "max" or (setting == "auto" and stalls_dominate)
