"""Profiling sweeps: the training data of the performance model.

A sweep locks the GPUs at a clock, runs a batch of requests of one prompt length to completion,
and keeps one row per engine iteration: (locked clock, scheduled requests, KV blocks in use,
prompt tokens in the iteration, TP) -> iterations per second. Requests keep arriving during a
run, so iterations that mix a prefill with decoding are sampled too. The feature is the LOCKED
clock, the knob the controller turns, not the clock the GPU ran at after its power cap.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from throttllem.backend.twin.executor_api import Request
from throttllem.backend.twin.factory import build_twin_engine
from throttllem.backend.twin.hardware import GpuSpec, ModelSpec

log = logging.getLogger(__name__)
FloatArray = npt.NDArray[np.float64]

BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
PROMPT_TOKENS = (128, 512, 1536, 3072)
OUTPUT_TOKENS = 160
# Realistic per-iteration noise: the model must learn through it, as on a real GPU.
PROFILE_JITTER = 0.02


@dataclass(frozen=True)
class SweepPlan:
    clocks_mhz: tuple[int, ...]
    batch_sizes: tuple[int, ...]
    prompt_tokens: tuple[int, ...]
    output_tokens: int = OUTPUT_TOKENS

    def runs(self) -> Iterator[tuple[int, int, int]]:
        for clock in self.clocks_mhz:
            for batch in self.batch_sizes:
                for prompt in self.prompt_tokens:
                    yield clock, batch, prompt

    @property
    def size(self) -> int:
        return len(self.clocks_mhz) * len(self.batch_sizes) * len(self.prompt_tokens)


def default_plan(
    gpu: GpuSpec, model: ModelSpec, max_batch: int, clock_stride: int = 2
) -> SweepPlan:
    """Every `clock_stride`-th supported clock (always the max and the min), batch sizes up to
    the engine's maximum, prompts up to what the model's context allows."""
    clocks = gpu.supported_clocks_mhz()
    chosen = sorted(set(clocks[::clock_stride]) | {clocks[0], clocks[-1]}, reverse=True)
    prompts = tuple(p for p in PROMPT_TOKENS if p + OUTPUT_TOKENS <= model.max_context)
    return SweepPlan(tuple(chosen), tuple(b for b in BATCH_SIZES if b <= max_batch), prompts)


def profile_twin(
    gpu: GpuSpec,
    model: ModelSpec,
    tp: int,
    *,
    seed: int = 0,
    plan: SweepPlan | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Run the sweep on a twin engine in virtual time: rows of perf_model.FEATURES, IPS, and the
    engine's mean power in each iteration (on a real GPU: from NVML's energy counter)."""
    engine = build_twin_engine(
        gpu, model, tp, mode="virtual", seed=seed, latency_jitter=PROFILE_JITTER
    )
    ex, gpus = engine.executor, engine.gpus
    plan = plan or default_plan(gpu, model, ex.limits.max_batch_size)
    rng = np.random.default_rng(seed)
    rows: list[tuple[float, float, float, float, float, float, float]] = []
    settle_s = max(g.clock_change_latency_s for g in gpus.gpus) + 1e-6
    for clock, batch, prompt in plan.runs():
        for g in gpus.gpus:
            g.set_locked_clocks(clock, clock)
        ex.run_until(ex.time.now_s() + settle_s)
        ids = [(i % 1000) + 1 for i in range(prompt)]
        ex.enqueue_requests(
            Request(ids, max_tokens=plan.output_tokens, twin_output_len=plan.output_tokens)
            for _ in range(batch)
        )
        late = max(1, batch // 8)
        iteration = 0
        while (stats := ex.step()) is not None:
            iteration += 1
            ib, kv = stats.inflight_batching_stats, stats.kv_cache_stats
            rows.append(
                (
                    float(clock),
                    float(ib.num_scheduled_requests),
                    float(kv.used_num_blocks),
                    float(ib.num_ctx_tokens),
                    float(tp),
                    1000.0 / stats.iter_latency_ms,
                    stats.twin.power_w if stats.twin is not None else float("nan"),
                )
            )
            # Late arrivals during the first half: prefills mixed into decoding batches.
            if iteration % (plan.output_tokens // 4) == 0 and iteration < plan.output_tokens:
                late_prompt = int(rng.integers(64, max(prompt, 128)))
                ex.enqueue_requests(
                    Request([1] * late_prompt, max_tokens=32, twin_output_len=32)
                    for _ in range(late)
                )
        ex.await_responses()  # drop the responses: only the iteration stats matter here
        ex.get_latest_iteration_stats()
        if progress is not None:
            progress(1)
    ex.shutdown()
    data = np.array(rows, dtype=np.float64)
    return data[:, :5], data[:, 5], data[:, 6]
