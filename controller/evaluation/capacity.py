"""What an engine can carry, and the paper's SLO preset derived from it.

Capacity: the highest request rate at which the engine, at maximum clock, keeps up with a
workload's length mix arriving as a Poisson process: the queue stays bounded (p99 TTFT <=
CAPACITY_TTFT_S) and the mean time between tokens stays under the TBT target. Found by
bisection over short virtual-time runs.

The paper's E2E target is "the p99 E2E of the engine at maximum clock under saturating load":
here, the p99 E2E of a run at the capacity rate. Results are cached on disk per engine, workload
kind and seed, since every evaluation needs them.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..events import Slo
from .policies import MaxClock
from .simulator import EngineSetup, simulate
from .workload import Workload, synthetic

log = logging.getLogger(__name__)

PAPER_TBT_S = 0.2  # reading speed of ~250 words per minute
CAPACITY_TTFT_S = 5.0
CAPACITY_RUN_S = 240.0
CACHE_VERSION = 3


@dataclass(frozen=True)
class Capacity:
    rate_per_s: float
    p99_e2e_s: float  # at max clock, at the capacity rate: the paper's E2E target
    mean_tbt_s: float


def cache_dir() -> Path:
    root = os.environ.get("THROTTLLEM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "throttllem"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _keeps_up(setup: EngineSetup, kind: str, rate: float, seed: int) -> tuple[bool, float, float]:
    _, model = setup.specs()
    # Poisson arrivals with the kind's lengths: a capacity is a sustained rate, and the code
    # trace's bursts (CV ~13) would otherwise make any rate look unsustainable.
    work = synthetic(kind, rate, CAPACITY_RUN_S, seed=seed, steady=True).clipped(model.max_context)
    r = simulate(work, setup, MaxClock(), Slo())
    ttft = r.first_token_s - r.arrival_s
    gaps = np.maximum(r.output_tokens - 1, 1)
    tbt = np.where(r.output_tokens > 1, (r.finish_s - r.first_token_s) / gaps, np.nan)
    p99_ttft = float(np.nanpercentile(ttft, 99))
    mean_tbt = float(np.nanmean(tbt))
    ok = p99_ttft <= CAPACITY_TTFT_S and mean_tbt <= PAPER_TBT_S
    return ok, float(np.nanpercentile(r.finish_s - r.arrival_s, 99)), mean_tbt


def find_capacity(setup: EngineSetup, kind: str = "conv", seed: int = 0) -> Capacity:
    """Bisection on the request rate (synthetic `kind` lengths), cached on disk."""
    key = (
        f"v{CACHE_VERSION}_{setup.gpu}_{setup.model}_tp{setup.tp}"
        f"_b{setup.max_batch_size}_{kind}_s{seed}"
    )
    path = cache_dir() / "capacity.json"
    cache = json.loads(path.read_text()) if path.is_file() else {}
    if key in cache:
        return Capacity(**cache[key])
    lo, hi = 0.05, 1.0
    while _keeps_up(setup, kind, hi, seed)[0]:
        lo, hi = hi, hi * 2
    for _ in range(7):
        mid = (lo + hi) / 2
        if _keeps_up(setup, kind, mid, seed)[0]:
            lo = mid
        else:
            hi = mid
    _, p99_e2e, tbt = _keeps_up(setup, kind, lo, seed)
    cap = Capacity(lo, p99_e2e, tbt)
    cache[key] = asdict(cap)
    path.write_text(json.dumps(cache, indent=2))
    log.info("capacity of %s: %.3f req/s", key, lo)
    return cap


def paper_slo(capacity: Capacity) -> Slo:
    """The paper's preset: mean TBT <= 200 ms; E2E <= p99 E2E at max clock at capacity."""
    return Slo(ttft_s=None, tbt_s=PAPER_TBT_S, e2e_s=capacity.p99_e2e_s)


def scale_to_load(workload: Workload, capacity: Capacity, load: float) -> Workload:
    """The workload's arrivals rescaled to `load` x the engine's capacity (as the paper does)."""
    if not load > 0:
        raise ValueError(f"load must be positive, got {load}")
    return workload.scaled_to_rate(load * capacity.rate_per_s)
