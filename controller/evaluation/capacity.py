"""What an engine can carry, and the paper's SLO preset derived from it.

Capacity: the highest request rate at which the engine, at maximum clock, keeps up with a
workload's length mix arriving as a Poisson process: the queue stays bounded (p99 TTFT <=
CAPACITY_TTFT_S) and the mean time between tokens stays under the TBT target. Found by
bisection over short virtual-time runs.

A trace whose bursts are far above its mean (the Azure code trace: inter-arrival CV ~13, ten
seconds with 13x the mean rate) overloads an engine at any fraction of that steady capacity, so
fractions of it say nothing. Its burst-aware capacity is the same bisection on the trace's own
arrival pattern, rescaled: the highest mean rate at which the engine at maximum clock serves the
whole trace within the same bounds.

The paper's E2E target is "the p99 E2E of the engine at maximum clock under saturating load":
here, the p99 E2E of a run at the capacity rate. Results are cached on disk per engine, workload
kind and seed (a burst-aware one per engine and trace content), since every evaluation needs
them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable
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
CACHE_VERSION = 4  # 4: requests carry the client's max_tokens, not their true length


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


def _serves(setup: EngineSetup, work: Workload) -> tuple[bool, float, float]:
    """Whether max clock serves `work` within the capacity bounds; its p99 E2E and mean TBT."""
    r = simulate(work, setup, MaxClock(), Slo())
    ttft = r.first_token_s - r.arrival_s
    gaps = np.maximum(r.output_tokens - 1, 1)
    tbt = np.where(r.output_tokens > 1, (r.finish_s - r.first_token_s) / gaps, np.nan)
    p99_ttft = float(np.nanpercentile(ttft, 99))
    mean_tbt = float(np.nanmean(tbt))
    ok = p99_ttft <= CAPACITY_TTFT_S and mean_tbt <= PAPER_TBT_S
    return ok, float(np.nanpercentile(r.finish_s - r.arrival_s, 99)), mean_tbt


def _keeps_up(setup: EngineSetup, kind: str, rate: float, seed: int) -> tuple[bool, float, float]:
    _, model = setup.specs()
    # Poisson arrivals with the kind's lengths: a capacity is a sustained rate.
    work = synthetic(kind, rate, CAPACITY_RUN_S, seed=seed, steady=True).clipped(model.max_context)
    return _serves(setup, work)


def _bisect(keeps_up: Callable[[float], bool], lo: float, hi: float) -> float:
    """The highest rate `keeps_up` accepts, to 1/128 of the bracket found from [lo, hi]."""
    while keeps_up(hi):
        lo, hi = hi, hi * 2
    for _ in range(7):
        mid = (lo + hi) / 2
        if keeps_up(mid):
            lo = mid
        else:
            hi = mid
    return lo


def _cached(key: str, compute: Callable[[], Capacity]) -> Capacity:
    path = cache_dir() / "capacity.json"
    cache = json.loads(path.read_text()) if path.is_file() else {}
    if key in cache:
        return Capacity(**cache[key])
    cap = compute()
    cache = json.loads(path.read_text()) if path.is_file() else {}  # another run may have added
    cache[key] = asdict(cap)
    path.write_text(json.dumps(cache, indent=2))
    log.info("capacity of %s: %.3f req/s", key, cap.rate_per_s)
    return cap


def _setup_key(setup: EngineSetup) -> str:
    return (
        f"v{CACHE_VERSION}_{setup.gpu}_{setup.model}_tp{setup.tp}_b{setup.max_batch_size}"
        f"_m{setup.client_max_tokens}"
    )


def find_capacity(setup: EngineSetup, kind: str = "conv", seed: int = 0) -> Capacity:
    """Bisection on the request rate (synthetic `kind` lengths), cached on disk."""

    # Memoised: the bisection has already run the rate it settles on (and a halving bracket
    # the rate it starts from); each run is a simulation.
    at = functools.cache(lambda rate: _keeps_up(setup, kind, rate, seed))

    def compute() -> Capacity:
        rate = _bisect(lambda r: at(r)[0], 0.05, 1.0)
        _, p99_e2e, tbt = at(rate)
        return Capacity(rate, p99_e2e, tbt)

    return _cached(f"{_setup_key(setup)}_{kind}_s{seed}", compute)


def trace_fingerprint(trace: Workload) -> str:
    """Identifies a trace's content (not its file name) for the cache."""
    h = hashlib.sha256()
    for r in trace.requests:
        h.update(f"{r.arrival_s:.6f},{r.prompt_tokens},{r.output_tokens};".encode())
    return h.hexdigest()[:16]


def find_trace_capacity(setup: EngineSetup, trace: Workload, steady: Capacity) -> Capacity:
    """Burst-aware capacity: the highest mean rate at which max clock serves the whole `trace`
    (its own arrival pattern, rescaled) within the capacity bounds. `steady` (the Poisson
    capacity for the trace's length mix) starts the search. Cached per trace content."""
    if not trace.requests:
        raise ValueError("the trace has no requests")
    _, model = setup.specs()
    clipped = trace.clipped(model.max_context)

    @functools.cache
    def at(rate: float) -> tuple[bool, float, float]:
        return _serves(setup, clipped.scaled_to_rate(rate))

    def compute() -> Capacity:
        # Bracket by halving first: a bursty trace's capacity can be a small share of the
        # steady one, and bisection's precision is relative to the bracket.
        hi = steady.rate_per_s
        lo = hi / 2
        while not at(lo)[0]:
            hi, lo = lo, lo / 2
            if lo < steady.rate_per_s / 1024:
                raise ValueError("the engine cannot serve this trace's bursts at any rate")
        rate = _bisect(lambda r: at(r)[0], lo, hi)
        _, p99_e2e, tbt = at(rate)
        return Capacity(rate, p99_e2e, tbt)

    return _cached(f"{_setup_key(setup)}_trace_{trace_fingerprint(trace)}", compute)


def paper_slo(capacity: Capacity) -> Slo:
    """The paper's preset: mean TBT <= 200 ms; E2E <= p99 E2E at max clock at capacity."""
    return Slo(ttft_s=None, tbt_s=PAPER_TBT_S, e2e_s=capacity.p99_e2e_s)


def scale_to_load(workload: Workload, capacity: Capacity, load: float) -> Workload:
    """The workload's arrivals rescaled to `load` x the engine's capacity (as the paper does)."""
    if not load > 0:
        raise ValueError(f"load must be positive, got {load}")
    return workload.scaled_to_rate(load * capacity.rate_per_s)
