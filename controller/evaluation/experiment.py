"""One `simulate` invocation: policies by name, all on the same arrivals, summarised together."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from ..events import Slo
from ..length_memory import LearnedLengths
from ..perf_model import CatBoostPerformanceModel, split_indices
from ..profiler import default_plan, profile_twin
from .capacity import cache_dir
from .policies import MaxClock, PidClock, StaticClock, ThrottllemPolicy
from .report import PolicySummary, summarise, write_choices, write_requests
from .simulator import EngineSetup, Policy, SimResult, simulate
from .workload import Workload

log = logging.getLogger(__name__)

POLICY_NAMES = (
    "max",
    "static:MHZ",
    "static-best",
    "pid",
    "throttllem",
    "hinted",
    "hinted:SIGMA",
    "oracle",
)


class PolicyError(ValueError):
    """A policy name that is not one of POLICY_NAMES."""


@dataclass
class Comparison:
    results: dict[str, SimResult]
    summaries: dict[str, PolicySummary]
    static_best_mhz: int | None = None  # the clock static-best found, when it ran


def trained_model(
    setup: EngineSetup, progress: Callable[[str], None] | None = None
) -> CatBoostPerformanceModel:
    """The CatBoost model for this engine, profiled on the twin and trained once, then cached."""
    path = cache_dir() / "models" / f"{setup.gpu}_{setup.model}_tp{setup.tp}_s{setup.seed}.cbm"
    if path.is_file():
        return CatBoostPerformanceModel.load(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if progress:
        progress(f"profiling {setup.model} TP{setup.tp} on {setup.gpu} (once; cached in {path})")
    gpu, model = setup.specs()
    plan = default_plan(gpu, model, setup.max_batch_size, clock_stride=2)
    x, ips, power = profile_twin(gpu, model, setup.tp, seed=setup.seed, plan=plan)
    train, _ = split_indices(len(ips), 0.2, setup.seed)
    train = train[:150_000]
    if progress:
        progress("training the performance model")
    trained = CatBoostPerformanceModel.fit(
        x[train], ips[train], power_w=power[train], seed=setup.seed
    )
    trained.save(path)
    return trained


def parse_policies(spec: str, supported_mhz: Sequence[int] | None = None) -> list[str]:
    names = [p.strip() for p in spec.split(",") if p.strip()]
    if not names:
        raise PolicyError("no policy given; valid: " + ", ".join(POLICY_NAMES))
    for name in names:
        if name in POLICY_NAMES and ":" not in name:
            continue
        if name.startswith("hinted:"):
            hint_error(name)
            continue
        if name.startswith("static:") and name[7:].isdigit():
            if supported_mhz is not None and int(name[7:]) not in supported_mhz:
                lo, hi = min(supported_mhz), max(supported_mhz)
                raise PolicyError(
                    f"'{name}': the GPU does not support {name[7:]} MHz; supported: {lo}..{hi} "
                    "MHz (see `throttllem twin clocks` or nvidia-smi -q -d SUPPORTED_CLOCKS)"
                )
            continue
        raise PolicyError(f"unknown policy '{name}'; valid: {', '.join(POLICY_NAMES)}")
    return names


def hint_error(name: str) -> float:
    """SIGMA of `hinted:SIGMA` (0 for `hinted`): the log-normal spread of the clients' hints."""
    if name == "hinted":
        return 0.0
    text = name.removeprefix("hinted:")
    try:
        sigma = float(text)
    except ValueError:
        sigma = -1.0
    if not (0.0 <= sigma <= 5.0):
        raise PolicyError(
            f"'{name}': SIGMA must be a number from 0 to 5, the log-normal spread of the "
            "clients' length hints (0.5: most hints within a factor 1.65 of the true length)"
        )
    return sigma


def _build(
    name: str,
    setup: EngineSetup,
    progress: Callable[[str], None] | None,
    prefill_clock: str = "auto",
    lengths: LearnedLengths | None = None,
    length_hints: str = "cap",
) -> Policy:
    """`lengths`: what throttllem, hinted and the oracle start knowing of output lengths (a
    controller restarted with its lengths file); None: nothing, as a new controller.
    `length_hints`: how throttllem and hinted use clients' hints (length_predictor.HINT_USES);
    the oracle trusts its own, the true lengths."""
    if name == "max":
        return MaxClock()
    if name.startswith("static:"):
        return StaticClock(int(name[7:]))
    if name == "pid":
        return PidClock()
    if name == "throttllem":
        return ThrottllemPolicy(
            trained_model(setup, progress),
            prefill_clock=prefill_clock,
            lengths=lengths,
            length_hints=length_hints,
        )
    if name == "hinted" or name.startswith("hinted:"):
        return ThrottllemPolicy(
            trained_model(setup, progress),
            name=name,
            true_lengths=True,
            hint_error=hint_error(name),
            prefill_clock=prefill_clock,
            lengths=lengths,
            length_hints=length_hints,
        )
    if name == "oracle":
        return ThrottllemPolicy(
            None,
            name="oracle",
            true_lengths=True,
            prefill_clock=prefill_clock,
            lengths=lengths,
            length_hints="trust",
        )
    raise PolicyError(f"unknown policy '{name}'")


def static_best(
    workload: Workload, setup: EngineSetup, slo: Slo, target: float
) -> tuple[SimResult, int]:
    """The lowest fixed clock whose SLO attainment reaches `target` (an offline-tuned
    operator's best), by bisection over the supported clocks."""
    gpu, _ = setup.specs()
    clocks = sorted(gpu.supported_clocks_mhz())
    lo, hi = 0, len(clocks) - 1
    best = simulate(workload, setup, StaticClock(clocks[hi]), slo)
    while lo < hi:
        mid = (lo + hi) // 2
        r = simulate(workload, setup, StaticClock(clocks[mid]), slo)
        if summarise(r, slo, None).slo_attainment >= target:
            hi, best = mid, r
        else:
            lo = mid + 1
    best.policy = "static-best"
    return best, clocks[lo]


def _simulate_one(
    name: str,
    workload: Workload,
    setup: EngineSetup,
    slo: Slo,
    prefill_clock: str,
    lengths: LearnedLengths | None,
    length_hints: str,
) -> SimResult:
    """One policy's run, in a worker process (compare's `jobs`)."""
    policy = _build(name, setup, None, prefill_clock, lengths, length_hints)
    return simulate(workload, setup, policy, slo)


def compare(
    workload: Workload,
    setup: EngineSetup,
    policies: list[str],
    slo: Slo,
    progress: Callable[[str], None] | None = None,
    prefill_clock: str = "auto",
    jobs: int = 1,
    lengths: LearnedLengths | None = None,
    length_hints: str = "cap",
) -> Comparison:
    """Run every policy on the same arrivals; `max` always runs (it is the baseline).
    `prefill_clock` is throttllem's and the oracle's (prefill_clock.PREFILL_CLOCKS). `jobs` > 1
    runs the policies in that many processes at once: each run is seeded by `setup` alone, so
    the results are the same as one after the other. `progress` hears "finished NAME" once per
    policy run, `max` included. `lengths` and `length_hints`: see _build."""
    order = ["max", *[p for p in policies if p != "max"]]
    results: dict[str, SimResult] = {}
    # static-best searches for max's attainment, so it runs after the others.
    independent = [n for n in order if n != "static-best"]
    if jobs > 1 and len(independent) > 1:
        if any(n == "throttllem" or n.startswith("hinted") for n in independent):
            # Profiled and trained here, once and with progress, if not cached yet: the worker
            # then loads it from the cache.
            trained_model(setup, progress)
        workers = min(jobs, len(independent))
        if progress:
            progress(f"simulating {', '.join(independent)} in {workers} processes")
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = {
                pool.submit(
                    _simulate_one,
                    n,
                    workload,
                    setup,
                    slo,
                    prefill_clock,
                    lengths,
                    length_hints,
                ): n
                for n in independent
            }
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                if progress:
                    progress(f"finished {futures[future]}")
    else:
        for name in independent:
            if progress:
                progress(f"simulating {name}")
            policy = _build(name, setup, progress, prefill_clock, lengths, length_hints)
            results[name] = simulate(workload, setup, policy, slo)
            if progress:
                progress(f"finished {name}")
    mhz = None
    if "static-best" in order:
        if progress:
            progress("simulating static-best")
        target = summarise(results["max"], slo, None).slo_attainment
        results["static-best"], mhz = static_best(workload, setup, slo, min(target, 0.99))
        log.info("static-best: %d MHz", mhz)
        if progress:
            progress("finished static-best")
    results = {n: results[n] for n in order}
    base = results["max"].energy_j
    summaries = {n: summarise(r, slo, base) for n, r in results.items() if n in policies}
    return Comparison({n: results[n] for n in summaries}, summaries, mhz)


def write_outputs(comparison: Comparison, out: Path, slo: Slo) -> list[Path]:
    """Per-request records, a clock/power timeline per policy, and the plots."""
    from .plots import plot_all

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, r in comparison.results.items():
        safe = name.replace(":", "_")
        path = out / f"requests_{safe}.csv"
        write_requests(path, r)
        written.append(path)
        path = out / f"timeline_{safe}.csv"
        with path.open("w") as f:
            f.write("time_s,sm_clock_mhz,power_w\n")
            for t, c, p in zip(r.timeline_t, r.timeline_clock, r.timeline_power, strict=True):
                f.write(f"{t:.3f},{c:.0f},{p:.1f}\n")
        written.append(path)
    if any(r.choice_seconds for r in comparison.results.values()):
        path = out / "clock_choices.csv"
        write_choices(path, comparison.results)
        written.append(path)
    written += plot_all(comparison, out, slo)
    return written
