"""`throttllem simulate --scaling`: instance-scaling policies compared on the same arrivals.

- `fixed:tpN`: size N at maximum clock (what a deployment runs today; the largest size is the
  baseline every saving is measured against, and always runs);
- `scaling-only`: sizes switch with the load, clocks at maximum;
- `clocks-only:tpN`: size N, the product's clock controller;
- `throttllem`: sizes switch and every active engine runs the clock controller.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..events import Slo
from ..perf_model import CatBoostPerformanceModel
from ..scaling.scaler import EngineSize, ScaleDecision, ScalerConfig
from .capacity import Capacity, find_capacity
from .experiment import PolicyError, trained_model
from .policies import MaxClock, ThrottllemPolicy
from .report import PolicySummary, summarise
from .scaling_sim import DEFAULT_COLD_START_S, ScalingSimulation
from .simulator import EngineSetup, Policy, SimResult
from .workload import Workload

SCALING_POLICIES = ("fixed:tpN", "scaling-only", "clocks-only:tpN", "throttllem")


@dataclass
class ScalingComparison:
    results: dict[str, SimResult]
    summaries: dict[str, PolicySummary]
    decisions: dict[str, list[ScaleDecision]]
    baseline: str


def parse_scaling_policies(spec: str, tps: Sequence[int]) -> list[str]:
    names = [p.strip() for p in spec.split(",") if p.strip()]
    valid = ", ".join(SCALING_POLICIES).replace("N", "N (N in " + "/".join(map(str, tps)) + ")")
    if not names:
        raise PolicyError(f"no policy given; valid: {valid}")
    for name in names:
        if name in ("scaling-only", "throttllem"):
            continue
        prefix = "fixed:tp" if name.startswith("fixed:tp") else "clocks-only:tp"
        size = name[len(prefix) :]
        if name.startswith(prefix) and size.isdigit() and int(size) in tps:
            continue
        raise PolicyError(f"unknown policy '{name}'; valid: {valid}")
    return names


def engine_sizes(
    setups: dict[str, EngineSetup], kind: str, seed: int
) -> tuple[list[EngineSize], dict[str, Capacity]]:
    caps = {name: find_capacity(s, kind, seed) for name, s in setups.items()}
    sizes = [EngineSize(name, setups[name].tp, caps[name].rate_per_s) for name in setups]
    return sizes, caps


def compare_scaling(
    workload: Workload,
    setups: dict[str, EngineSetup],
    sizes: list[EngineSize],
    policies: list[str],
    slo: Slo,
    *,
    cold_start_s: float = DEFAULT_COLD_START_S,
    scaler: ScalerConfig | None = None,
    progress: Callable[[str], None] | None = None,
) -> ScalingComparison:
    largest = max(sizes, key=lambda s: s.total_capacity_rps).name
    baseline = f"fixed:{largest}"
    order = [baseline, *[p for p in policies if p != baseline]]
    models: dict[str, CatBoostPerformanceModel] = {}

    def throttllem_for(size: EngineSize) -> Policy:
        if size.name not in models:
            models[size.name] = trained_model(setups[size.name], progress)
        return ThrottllemPolicy(models[size.name])

    def max_for(size: EngineSize) -> Policy:
        return MaxClock()

    results: dict[str, SimResult] = {}
    decisions: dict[str, list[ScaleDecision]] = {}
    for name in order:
        if progress:
            progress(f"simulating {name}")
        scaling = name in ("scaling-only", "throttllem")
        clocks = name == "throttllem" or name.startswith("clocks-only:")
        start = None if scaling else name.split(":", 1)[1]
        sim = ScalingSimulation(
            setups,
            sizes,
            throttllem_for if clocks else max_for,
            slo,
            scaling=scaling,
            start=start,
            cold_start_s=cold_start_s,
            scaler_config=scaler,
            name=name,
        )
        out = sim.run(workload)
        results[name], decisions[name] = out.result, out.decisions
    base = results[baseline].energy_j
    summaries = {
        n: summarise(r, slo, base) for n, r in results.items() if n in policies or n == baseline
    }
    return ScalingComparison(results, summaries, decisions, baseline)
