"""Small, fixed experiments on the twin: what `throttllem twin run` measures.

B requests of P prompt tokens arrive together and each generates exactly O tokens, with the
GPUs locked at one clock, in virtual time. The numbers are those a person would read off a
power meter and a stopwatch: iterations per second, tokens per second, mean power, energy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .executor_api import Request
from .factory import build_twin_engine
from .hardware import GpuSpec, ModelSpec


@dataclass(frozen=True)
class LatencySummary:
    mean: float
    p50: float
    p99: float


@dataclass(frozen=True)
class FixedBatchResult:
    iterations: int
    duration_s: float
    output_tokens: int
    ips: float  # mean iterations per second while busy
    tokens_per_s: float
    avg_power_w: float  # all GPUs of the engine together
    energy_j: float
    tokens_per_joule: float
    iter_latency_ms: LatencySummary

    def to_json(self) -> dict[str, object]:
        return {
            "ips": self.ips,
            "tokens_per_s": self.tokens_per_s,
            "avg_power_w": self.avg_power_w,
            "energy_j": self.energy_j,
            "tokens_per_joule": self.tokens_per_joule,
            "iter_latency_ms": {
                "mean": self.iter_latency_ms.mean,
                "p50": self.iter_latency_ms.p50,
                "p99": self.iter_latency_ms.p99,
            },
            "iterations": self.iterations,
            "duration_s": self.duration_s,
            "output_tokens": self.output_tokens,
        }


def run_fixed_batch(
    *,
    gpu: GpuSpec,
    model: ModelSpec,
    tp: int,
    clock_mhz: int,
    batch: int,
    prompt_tokens: int,
    output_tokens: int,
    seed: int = 0,
) -> FixedBatchResult:
    engine = build_twin_engine(gpu, model, tp, mode="virtual", seed=seed)
    ex, gpus = engine.executor, engine.gpus
    for g in gpus.gpus:
        g.set_locked_clocks(clock_mhz, clock_mhz)
    # A lock takes effect after the clock-change latency: start the clock once it holds.
    ex.run_until(max(g.clock_change_latency_s for g in gpus.gpus) + 1e-6)
    start_s, start_mj = ex.time.now_s(), gpus.total_energy_mj()
    prompt = [(i % 1000) + 1 for i in range(prompt_tokens)]
    ex.enqueue_requests(
        Request(prompt, max_tokens=output_tokens, twin_output_len=output_tokens)
        for _ in range(batch)
    )
    latencies = []
    while (stats := ex.step()) is not None:
        latencies.append(stats.iter_latency_ms)
    tokens = sum(
        len(r.result.output_token_ids[0]) - prompt_tokens
        for r in ex.await_responses()
        if r.result.is_final and not r.has_error()
    )
    ex.shutdown()
    duration = ex.time.now_s() - start_s
    energy_j = (gpus.total_energy_mj() - start_mj) / 1000.0
    lat = np.array(latencies, dtype=np.float64)
    return FixedBatchResult(
        iterations=len(latencies),
        duration_s=duration,
        output_tokens=tokens,
        ips=1000.0 / float(lat.mean()),
        tokens_per_s=tokens / duration,
        avg_power_w=energy_j / duration,
        energy_j=energy_j,
        tokens_per_joule=tokens / energy_j,
        iter_latency_ms=LatencySummary(
            float(lat.mean()), float(np.percentile(lat, 50)), float(np.percentile(lat, 99))
        ),
    )
