"""A performance model that asks the twin's own latency and power functions: the clairvoyant
bound.

Used by the `oracle` evaluation policy and by benchmarks that need a model without training
one. Not for real GPUs: it knows the twin's physics exactly.
"""

from __future__ import annotations

import numpy as np

from throttllem.backend.twin.engine_profile import engine_profile
from throttllem.backend.twin.hardware import GpuSpec, ModelSpec
from throttllem.backend.twin.iteration import IterationWork
from throttllem.backend.twin.latency import LatencyModel
from throttllem.backend.twin.power import PowerModel

from .perf_model import FEATURES, FloatArray

_COL = {name: i for i, name in enumerate(FEATURES)}


class TwinOracleModel:
    def __init__(
        self,
        gpu: GpuSpec,
        model: ModelSpec,
        tp: int,
        tokens_per_block: int,
        profile: str = "tensorrt-llm",
    ) -> None:
        self.latency = LatencyModel(gpu, model, tp, engine_profile(profile))
        self.power = PowerModel(gpu)
        self.tp = tp
        self.tokens_per_block = tokens_per_block

    def predict_ips(self, features: FloatArray) -> FloatArray:
        return self._predict(features)[0]

    def has_power(self) -> bool:
        return True

    def predict_power_w(self, features: FloatArray) -> FloatArray:
        """Mean power of the engine (all its GPUs) during such an iteration."""
        return self._predict(features)[1]

    def _predict(self, features: FloatArray) -> tuple[FloatArray, FloatArray]:
        out = np.empty(features.shape[0])
        power = np.empty(features.shape[0])
        tpb = self.tokens_per_block
        for i, row in enumerate(features):
            batch = max(int(row[_COL["batch_size"]]), 1)
            ctx = int(row[_COL["ctx_tokens"]])
            ctx_requests = 1 if ctx else 0
            gen = max(batch - ctx_requests, 0)
            # KV blocks are full but for the last one of each request: half a block short each.
            kv_tokens = max(int(row[_COL["kv_blocks"]]) * tpb - batch * tpb // 2, 0)
            work = IterationWork(
                ctx_requests=ctx_requests,
                ctx_tokens=ctx,
                ctx_attention_pairs=ctx * (ctx + 1) // 2,
                gen_requests=gen,
                gen_kv_tokens=kv_tokens if gen else 0,
            )
            clock = float(row[_COL["sm_clock_mhz"]])
            b = self.latency.at(work, clock)
            out[i] = 1000.0 / b.total_ms
            power[i] = (
                self.tp
                * self.power.iteration_w(
                    clock, b.sm_activity, b.dram_activity, b.gpu_ms, b.overhead_ms
                )[0]
            )
        return out, power
