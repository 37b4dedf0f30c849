"""Per-policy figures from a simulation, the comparison table and the JSON keys tools read."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from ..events import Slo
from .simulator import SimResult


@dataclass(frozen=True)
class PolicySummary:
    energy_j: float
    tokens_per_joule: float
    energy_saving_vs_max: float | None
    slo_attainment: float
    p50_ttft_ms: float
    p99_ttft_ms: float
    mean_tbt_ms: float
    p99_tbt_ms: float
    p99_e2e_ms: float
    clock_changes: int
    requests: int
    output_tokens: int
    span_s: float

    def to_json(self) -> dict[str, float | int | None]:
        return asdict(self)


def _pct(values: npt.NDArray[np.float64], q: float) -> float:
    values = values[np.isfinite(values)]
    return float(np.percentile(values, q)) if values.size else math.nan


def attainment_mask(r: SimResult, slo: Slo) -> npt.NDArray[np.bool_]:
    """Per request: met every SLO it has (a request that never finished met none)."""
    finished = np.isfinite(r.finish_s)
    ttft = r.first_token_s - r.arrival_s
    e2e = r.finish_s - r.arrival_s
    gaps = np.maximum(r.output_tokens - 1, 1)
    tbt = np.where(r.output_tokens > 1, (r.finish_s - r.first_token_s) / gaps, 0.0)
    ok = finished.copy()
    if slo.ttft_s is not None:
        ok &= ttft <= slo.ttft_s
    if slo.tbt_s is not None:
        ok &= tbt <= slo.tbt_s
    if slo.e2e_s is not None:
        ok &= e2e <= slo.e2e_s
    return ok


def summarise(r: SimResult, slo: Slo, baseline_energy_j: float | None) -> PolicySummary:
    tokens = int(r.output_tokens.sum())
    ttft_ms = (r.first_token_s - r.arrival_s) * 1000.0
    e2e_ms = (r.finish_s - r.arrival_s) * 1000.0
    gaps = np.maximum(r.output_tokens - 1, 1)
    tbt_ms = np.where(r.output_tokens > 1, (r.finish_s - r.first_token_s) / gaps * 1000.0, np.nan)
    # p99 over every token gap: an iteration's latency is the gap of each request it decodes.
    weights = r.iter_gen.astype(np.float64)
    if weights.sum() > 0:
        order = np.argsort(r.iter_latency_s)
        cum = np.cumsum(weights[order]) / weights.sum()
        p99_tbt = float(r.iter_latency_s[order][np.searchsorted(cum, 0.99)]) * 1000.0
    else:
        p99_tbt = math.nan
    return PolicySummary(
        energy_j=r.energy_j,
        tokens_per_joule=tokens / r.energy_j if r.energy_j > 0 else math.nan,
        energy_saving_vs_max=(1.0 - r.energy_j / baseline_energy_j if baseline_energy_j else None),
        slo_attainment=float(attainment_mask(r, slo).mean()) if len(r.arrival_s) else 1.0,
        p50_ttft_ms=_pct(ttft_ms, 50),
        p99_ttft_ms=_pct(ttft_ms, 99),
        mean_tbt_ms=float(np.nanmean(tbt_ms)) if np.isfinite(tbt_ms).any() else math.nan,
        p99_tbt_ms=p99_tbt,
        p99_e2e_ms=_pct(e2e_ms, 99),
        clock_changes=r.clock_changes,
        requests=len(r.arrival_s),
        output_tokens=tokens,
        span_s=r.span_s,
    )


def format_table(summaries: dict[str, PolicySummary]) -> str:
    head = (
        f"{'policy':<16}{'energy J':>12}{'tok/J':>8}{'saving':>8}{'SLO att.':>9}"
        f"{'TTFT p50':>10}{'p99':>9}{'TBT mean':>10}{'p99':>8}{'E2E p99':>10}{'changes':>8}"
    )
    lines = [head, "-" * len(head)]
    for name, s in summaries.items():
        saving = "-" if s.energy_saving_vs_max is None else f"{s.energy_saving_vs_max:+.1%}"
        lines.append(
            f"{name:<16}{s.energy_j:>12.0f}{s.tokens_per_joule:>8.3f}{saving:>8}"
            f"{s.slo_attainment:>9.2%}{s.p50_ttft_ms:>10.0f}{s.p99_ttft_ms:>9.0f}"
            f"{s.mean_tbt_ms:>10.1f}{s.p99_tbt_ms:>8.1f}{s.p99_e2e_ms:>10.0f}{s.clock_changes:>8}"
        )
    lines.append(
        "times in ms; saving = energy saved against max; SLO att. = share of requests "
        "meeting all their SLOs"
    )
    return "\n".join(lines)


# Below this attainment at maximum clock the engine is overloaded, not throttled.
OVERLOADED_AT_MAX = 0.9


def overload_note(summaries: dict[str, PolicySummary]) -> str | None:
    """A line for when even the maximum clock misses the SLOs for many requests: the load,
    not the clock policy, decides the outcome then, and the comparison says little."""
    top = summaries.get("max")
    if top is None or top.slo_attainment >= OVERLOADED_AT_MAX:
        return None
    return (
        f"note: at maximum clock only {top.slo_attainment:.1%} of requests meet their SLOs: "
        "the engine is overloaded at this load (bursty arrivals overload it at any share of "
        "its steady capacity; for a trace file, --capacity trace). Lower --load."
    )


def format_choices(results: dict[str, SimResult]) -> str:
    """Why each controller policy's clock was where it was: its share of time under each kind
    of choice, largest first (the dashboard's panel, for a simulation). Empty if none says."""
    lines = []
    for name, r in results.items():
        total = sum(r.choice_seconds.values())
        if total <= 0:
            continue
        ranked = sorted(r.choice_seconds.items(), key=lambda kv: -kv[1])
        shares = ", ".join(f"{kind} {seconds / total:.0%}" for kind, seconds in ranked)
        lines.append(f"{name} clock choices (share of time): {shares}")
    return "\n".join(lines)


def write_choices(path: Path, results: dict[str, SimResult]) -> None:
    """One CSV row per policy and kind of clock choice: engine seconds under it."""
    with path.open("w") as f:
        f.write("policy,why,seconds\n")
        for name, r in results.items():
            for kind, seconds in sorted(r.choice_seconds.items()):
                f.write(f"{name},{kind},{seconds:.3f}\n")


def write_requests(path: Path, r: SimResult) -> None:
    """One CSV row per request, times in engine seconds from the start (nan: never)."""
    with path.open("w") as f:
        f.write("arrival_s,first_token_s,finish_s,output_tokens\n")
        for row in zip(r.arrival_s, r.first_token_s, r.finish_s, r.output_tokens, strict=True):
            f.write(f"{row[0]:.6f},{row[1]:.6f},{row[2]:.6f},{row[3]}\n")
