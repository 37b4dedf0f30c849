"""A performance model compiled into a lookup table, so a decision costs microseconds.

A tree model is piecewise constant anyway; sampling it once on a grid of (clock, batch, KV) and
rounding KV UP to the next grid point (more KV is never faster) keeps the prediction conservative
and turns each decision's thousands of model calls into one numpy gather. Iterations that carry
a prefill (prompt tokens) are rare in a projection; they use a second, coarser table with a
prompt-token axis.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .perf_model import FEATURES, PerformanceModel, PowerPredictor

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

CTX_LEVELS = (0, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
COARSE_BATCH_POINTS = 17


@dataclass(frozen=True)
class PreparedWork:
    flat: IntArray  # per iteration: position in the (batch, KV) grid
    prefill: IntArray  # iterations that carry prompt tokens
    ctx_flat: IntArray  # their position in the (batch, KV, prompt tokens) grid


class IpsTable:
    """Seconds per iteration by clock index (clocks ascending), batch, KV blocks, prompt tokens."""

    def __init__(
        self,
        model: PerformanceModel,
        clocks_mhz: Sequence[int],
        *,
        tp: int,
        max_batch: int,
        kv_capacity_blocks: int,
        kv_points: int = 64,
        tokens_per_block: int = 64,
        idle_power_w: float = 0.0,
    ) -> None:
        self.tokens_per_block = tokens_per_block
        # A GPU draws this much anyway while the engine waits for work: only power above it
        # is the cost of running an iteration. Per GPU; the power model predicts the whole
        # engine's power (all `tp` GPUs), so an iteration's idle share is tp x this.
        self.idle_power_w = idle_power_w
        self.tp = tp
        self.clocks_mhz = np.array(sorted(clocks_mhz), dtype=np.int64)
        self.max_batch = max_batch
        self.kv_capacity = max(kv_capacity_blocks, 1)
        self.kv_grid = np.unique(
            np.ceil(np.linspace(0, self.kv_capacity, kv_points)).astype(np.int64)
        )
        # Every batch size up to 64, then every 4th: rounded up, so never optimistic.
        self.batch_grid = np.unique(
            np.concatenate([np.arange(min(max_batch, 64) + 1), np.arange(64, max_batch + 4, 4)])
        ).astype(np.int64)
        self.batch_grid = self.batch_grid[self.batch_grid <= max(max_batch, 0)]
        if self.batch_grid[-1] != max_batch:
            self.batch_grid = np.append(self.batch_grid, max_batch)
        self._gen = self._sample(model, tp, self.batch_grid, self.kv_grid, np.array([0]))[..., 0]
        self.coarse_batch = np.unique(
            np.ceil(np.linspace(0, max_batch, COARSE_BATCH_POINTS)).astype(np.int64)
        )
        self.coarse_kv = self.kv_grid[:: max(1, len(self.kv_grid) // 16)]
        if self.coarse_kv[-1] != self.kv_grid[-1]:
            self.coarse_kv = np.append(self.coarse_kv, self.kv_grid[-1])
        self.ctx_grid = np.array(CTX_LEVELS, dtype=np.int64)
        self._ctx = self._sample(model, tp, self.coarse_batch, self.coarse_kv, self.ctx_grid)
        self._power: FloatArray | None = None
        if isinstance(model, PowerPredictor) and model.has_power():
            self._power = self._sample_power(model, tp)
        n_clocks = len(self.clocks_mhz)
        self._gen_flat = np.ascontiguousarray(self._gen.reshape(n_clocks, -1))
        self._ctx_flat = np.ascontiguousarray(self._ctx.reshape(n_clocks, -1))

    def _sample(
        self, model: PerformanceModel, tp: int, batches: IntArray, kvs: IntArray, ctxs: IntArray
    ) -> FloatArray:
        grid = np.meshgrid(self.clocks_mhz, batches, kvs, ctxs, indexing="ij")
        columns = {
            "sm_clock_mhz": grid[0],
            "batch_size": np.maximum(grid[1], 1),
            "kv_blocks": grid[2],
            "ctx_tokens": grid[3],
            "tp": np.full_like(grid[0], tp),
        }
        x = np.column_stack([columns[name].ravel() for name in FEATURES]).astype(np.float64)
        ips = model.predict_ips(x).reshape(grid[0].shape)
        # Enforce monotonicity in the clock even if a model is slightly off: never predict a
        # higher clock to be slower than a lower one.
        ips = np.maximum.accumulate(ips, axis=0)
        return 1.0 / np.maximum(ips, 1e-9)

    def _sample_power(self, model: PowerPredictor, tp: int) -> FloatArray:
        grid = np.meshgrid(self.clocks_mhz, self.batch_grid, self.kv_grid, indexing="ij")
        columns = {
            "sm_clock_mhz": grid[0],
            "batch_size": np.maximum(grid[1], 1),
            "kv_blocks": grid[2],
            "ctx_tokens": np.zeros_like(grid[0]),
            "tp": np.full_like(grid[0], tp),
        }
        x = np.column_stack([columns[name].ravel() for name in FEATURES]).astype(np.float64)
        return model.predict_power_w(x).reshape(grid[0].shape)

    @property
    def has_power(self) -> bool:
        return self._power is not None

    def energy_per_iteration_j(self, batch: int, kv: int, above_idle: bool = True) -> FloatArray:
        """Energy one decoding iteration costs at every clock (clocks ascending), the whole
        engine; with `above_idle`, only what its GPUs draw above idle over that time (the time
        saved by a faster clock is then spent idle); needs power."""
        if self._power is None:
            raise ValueError("this performance model does not predict power")
        b = int(np.searchsorted(self.batch_grid, min(batch, self.max_batch)))
        k = int(self._kv_index(self.kv_grid, np.array([kv]))[0])
        idle = self.idle_power_w * self.tp if above_idle else 0.0
        return (self._power[:, b, k] - idle) * self._gen[:, b, k]

    def prefill_seconds(self, batch: int, kv: int, prompt_tokens: float) -> FloatArray:
        """What carrying a prompt of `prompt_tokens` adds to an iteration, at every clock:
        read in one (batch, KV) cell of the prefill table, so its rounding cancels out, and
        interpolated between prompt-token levels (rounding up to the next level would count
        up to twice the prefill)."""
        b = min(int(np.searchsorted(self.coarse_batch, min(batch, self.max_batch))),
                len(self.coarse_batch) - 1)  # fmt: skip
        k = int(self._kv_index(self.coarse_kv, np.array([kv]))[0])
        cell = self._ctx[:, b, k, :]  # (clocks, prompt-token levels)
        levels = self.ctx_grid.astype(np.float64)
        p = min(max(prompt_tokens, 0.0), float(levels[-1]))
        hi = min(int(np.searchsorted(levels, p)), len(levels) - 1)
        lo = max(hi - 1, 0)
        w = 0.0 if hi == lo else (p - levels[lo]) / (levels[hi] - levels[lo])
        with_prompt = cell[:, lo] * (1.0 - w) + cell[:, hi] * w
        return np.maximum(with_prompt - cell[:, 0], 0.0)

    def _kv_index(self, grid: IntArray, kv: IntArray) -> IntArray:
        return np.minimum(np.searchsorted(grid, kv, side="left"), len(grid) - 1)

    def prepare(self, batch: IntArray, kv: IntArray, ctx: IntArray) -> PreparedWork:
        """Grid positions of a projection, computed once and reused for every clock tried."""
        b = np.minimum(batch, self.max_batch)
        flat = np.searchsorted(self.batch_grid, b) * len(self.kv_grid) + self._kv_index(
            self.kv_grid, kv
        )
        prefill = np.nonzero(ctx)[0]
        bi = np.minimum(np.searchsorted(self.coarse_batch, b[prefill]), len(self.coarse_batch) - 1)
        ki = self._kv_index(self.coarse_kv, kv[prefill])
        ci = np.minimum(np.searchsorted(self.ctx_grid, ctx[prefill]), len(self.ctx_grid) - 1)
        ctx_flat = (bi * len(self.coarse_kv) + ki) * len(self.ctx_grid) + ci
        return PreparedWork(flat, prefill, ctx_flat)

    def seconds_prepared(self, clock_index: int, work: PreparedWork) -> FloatArray:
        out: FloatArray = self._gen_flat[clock_index].take(work.flat)
        if work.prefill.size:
            out[work.prefill] = self._ctx_flat[clock_index].take(work.ctx_flat)
        return out

    def seconds(self, clock_index: int, batch: IntArray, kv: IntArray, ctx: IntArray) -> FloatArray:
        """Duration of each projected iteration at clocks_mhz[clock_index]."""
        return self.seconds_prepared(clock_index, self.prepare(batch, kv, ctx))

    def seconds_all_clocks(self, batch: IntArray, kv: IntArray, ctx: IntArray) -> FloatArray:
        """The same for every clock at once: shape (clocks, iterations)."""
        work = self.prepare(batch, kv, ctx)
        out: FloatArray = self._gen_flat[:, work.flat]
        if work.prefill.size:
            out[:, work.prefill] = self._ctx_flat[:, work.ctx_flat]
        return out
