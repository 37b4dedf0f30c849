"""The pictures people look at: clock and power over time, latency CDFs, energy bars."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..events import Slo

if TYPE_CHECKING:
    from .experiment import Comparison


def plot_all(comparison: Comparison, out: Path, slo: Slo) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, (ax_clock, ax_power) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    for name, r in comparison.results.items():
        ax_clock.plot(r.timeline_t, r.timeline_clock, label=name, linewidth=0.8)
        ax_power.plot(r.timeline_t, r.timeline_power, label=name, linewidth=0.8)
    ax_clock.set_ylabel("SM clock (MHz)")
    ax_power.set_ylabel("power (W)")
    ax_power.set_xlabel("time (s)")
    ax_clock.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    written.append(out / "clock_power.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for name, r in comparison.results.items():
        gaps = np.maximum(r.output_tokens - 1, 1)
        series = {
            "TTFT (s)": r.first_token_s - r.arrival_s,
            "mean TBT (ms)": (r.finish_s - r.first_token_s) / gaps * 1000.0,
            "E2E (s)": r.finish_s - r.arrival_s,
        }
        for ax, (label, values) in zip(axes, series.items(), strict=True):
            v = np.sort(values[np.isfinite(values)])
            ax.plot(v, np.linspace(0, 1, len(v)), label=name)
            ax.set_xlabel(label)
    targets = [slo.ttft_s, None if slo.tbt_s is None else slo.tbt_s * 1000.0, slo.e2e_s]
    for ax, target in zip(axes, targets, strict=True):
        if target is not None:
            ax.axvline(target, color="black", linestyle="--", linewidth=0.8)
    axes[0].set_ylabel("share of requests")
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    written.append(out / "latency_cdf.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(comparison.summaries)
    ax.bar(names, [comparison.summaries[n].energy_j / 1000.0 for n in names])
    ax.set_ylabel("energy (kJ)")
    for i, n in enumerate(names):
        s = comparison.summaries[n]
        ax.text(
            i,
            s.energy_j / 1000.0,
            f"{s.tokens_per_joule:.2f} tok/J",
            ha="center",
            va="bottom",
            fontsize=8,
        )
    fig.tight_layout()
    written.append(out / "energy.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    return written
