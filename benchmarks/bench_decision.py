"""Cost of one clock decision (scoreboard -> projection -> clock policy), issue goal p99 <= 1 ms
with 256 requests, a 2,000-iteration horizon and all A100 clocks as candidates.

Baseline, in the same run: the same decision evaluating the performance model directly at every
step of the clock search instead of through the compiled table (what a naive controller does;
the paper reports ~3 ms per model call and ~35 ms per decision).

Run: `python benchmarks/bench_decision.py`.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from throttllem.backend.twin.hardware import default_catalog
from throttllem.controller.decision_bench import (
    TOKENS_PER_BLOCK,
    WAITING,
    build_loaded_scoreboard,
    run_decision_bench,
)
from throttllem.controller.oracle_model import TwinOracleModel
from throttllem.controller.projection import EngineLimits, project

GOAL_P99_MS = 1.0


def naive_decision_ms(requests: int, horizon: int, repeat: int) -> float:
    """Binary search over clocks, the model called on the whole horizon at every step."""
    catalog = default_catalog()
    gpu, model = catalog.gpu("A100-SXM4-40GB"), catalog.model("llama-3-8b")
    oracle = TwinOracleModel(gpu, model, 1, TOKENS_PER_BLOCK)
    board = build_loaded_scoreboard(requests, horizon, waiting=WAITING)
    clocks = sorted(gpu.supported_clocks_mhz())
    limits = EngineLimits(requests, 10**7, TOKENS_PER_BLOCK)
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        inputs = board.decision_inputs()
        proj = project(inputs.running, inputs.queued, limits)
        lo, hi = 0, len(clocks) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            x = np.column_stack(
                [
                    np.full(proj.horizon, clocks[mid]),
                    proj.batch,
                    proj.kv_blocks,
                    proj.ctx_tokens,
                    np.ones(proj.horizon),
                ]
            ).astype(np.float64)
            finish = np.cumsum(1.0 / oracle.predict_ips(x))[proj.running_last_iter]
            if np.all(finish <= inputs.deadlines.running_e2e_deadline_s - 1.0):
                hi = mid
            else:
                lo = mid + 1
        times.append(time.perf_counter() - started)
    return float(np.percentile(np.array(times) * 1000.0, 50))


def main() -> dict[str, Any]:
    result = run_decision_bench("A100-SXM4-40GB", 256, 2000, 500)
    naive = naive_decision_ms(256, 2000, 3)
    out = {
        **result,
        "naive_p50_ms": naive,
        "speedup_vs_naive": naive / result["p50_ms"],
        "goal_p99_ms": GOAL_P99_MS,
        "meets_goal": result["p99_ms"] <= GOAL_P99_MS,
    }
    print(
        f"clock decision, {result['requests']} requests, horizon {result['horizon']}, "
        f"{result['clocks']} clocks:"
    )
    print(
        f"  compiled table:  p50 {result['p50_ms']:.3f} ms, p99 {result['p99_ms']:.3f} ms "
        f"(goal p99 <= {GOAL_P99_MS} ms): {'met' if out['meets_goal'] else 'MISSED'}"
    )
    print(
        f"  direct model calls (baseline): p50 {naive:.1f} ms "
        f"-> {out['speedup_vs_naive']:.0f}x faster"
    )
    return out


if __name__ == "__main__":
    main()
