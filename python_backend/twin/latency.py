"""Iteration latency from first principles: the model's architecture, the board's specs, the SM
clock, and the engine runtime's overhead.

Per GPU of a tensor-parallel group of size `tp`, for one iteration (see docs/twin-physics.md):

- Dense (linear layers, per layer): the weight shard is streamed from HBM once per iteration and
  every row (token) costs 2 FLOP per weight. A GEMM is limited by whichever is slower, joined by
  a smooth maximum (a kernel near the ridge point reaches neither roof):
      t_gemm = ((W / B(f))^p + (F / C(f))^p)^(1/p),   p = ROOFLINE_SHARPNESS
  Element-wise kernels (norms, rotary, SiLU, residual adds) are memory-bound on the activations.
- Compute rate C(f) = peak_fp16 * compute_efficiency * f / f_max: tensor cores are SM-clocked.
- Memory rate B(f) = mem_bandwidth * mem_efficiency * issue(f): HBM runs on its own clock, so the
  rate does not depend on f until the SMs can no longer issue loads fast enough to keep HBM busy:
      issue(f) = (1 + (issue_knee / f)^q)^(-1/q)    (~1 above the knee, ~f/knee well below)
- Kernel floor: every kernel costs at least its launch, ramp-up and tail, kernel_floor_us at max
  clock, scaled by f_max / f (block scheduling and the tail run on the SM clock).
- Attention: generation reads each request's K and V (memory-bound); context computes causal
  QK^T and PV over (query, key) pairs (compute-bound, attention_efficiency).
- Tensor parallelism: two all-reduces per layer (after attention and after the MLP) of the
  activations, ring algorithm over NVLink: 2 (tp-1)/tp * bytes / nvlink + fixed latency.
- LM head: logits only for the last position of each scheduled request.
- Overhead: the engine profile (CPU runtime), added on top of the GPU time.

`sm_activity` and `dram_activity` are averages over the GPU time (gpu_ms), not over the CPU
overhead: the power model charges the overhead as time at the loaded clock without kernels.
"""

from __future__ import annotations

import math

from .engine_profile import EngineProfile
from .hardware import GpuSpec, ModelSpec
from .iteration import IterationWork, LatencyBreakdown

# Exponent of the smooth maximum joining the memory and compute roofs of a GEMM: 2 makes a GEMM
# at its ridge point ~40% slower than either roof alone, about what cuBLAS shows there.
ROOFLINE_SHARPNESS = 2.0
# Exponent of the issue limit: sharp enough that memory-bound time is flat (< 1.5% slower) from
# 1.5x the knee upwards, smooth enough to have no kink.
ISSUE_SHARPNESS = 6.0
# Element-wise activation traffic per token per layer, in elements of the hidden size and of the
# (per-GPU) MLP width: 2 RMSNorms (read x, write y: 4h), 2 residual adds (read 2, write 1: 6h),
# rotary on q and k (read + write: 2h), SiLU * gate (read 2, write 1: 3 I/tp).
ACT_HIDDEN_PER_TOKEN = 12
ACT_MLP_PER_TOKEN = 3
# Attention launches one kernel for the context requests and one for the generation requests;
# the rest of physics.kernels_per_layer (12: 2 norms, QKV, rotary, O, gate/up, act, down, 2 adds)
# are the dense part's.
ATTENTION_KERNELS_PER_PHASE = 1
# FLOPs per (query, key) pair per head dimension: QK^T (2) and PV (2).
ATTENTION_FLOP_PER_PAIR_DIM = 4
_MAX_CACHED_CLOCKS = 1024


def _smooth_max(a: float, b: float, p: float) -> float:
    if a <= 0.0:
        return b
    if b <= 0.0:
        return a
    if p == 2.0:
        return math.sqrt(a * a + b * b)
    return float((a**p + b**p) ** (1.0 / p))


def issue_factor(gpu: GpuSpec, sm_clock_mhz: float) -> float:
    """Share of the memory rate the SMs can sustain at this clock (1 well above the knee)."""
    knee = gpu.physics.issue_knee_mhz
    if knee <= 0.0:
        return 1.0
    return float((1.0 + (knee / sm_clock_mhz) ** ISSUE_SHARPNESS) ** (-1.0 / ISSUE_SHARPNESS))


class _Rates:
    """Per-clock rates, in units per millisecond."""

    __slots__ = ("attn_flop_per_ms", "bytes_per_ms", "flop_per_ms", "kernel_floor_ms")

    def __init__(self, gpu: GpuSpec, sm_clock_mhz: float) -> None:
        ph = gpu.physics
        f_rel = sm_clock_mhz / gpu.max_sm_clock_mhz
        peak_flop_per_ms = gpu.peak_fp16_tflops * 1e9
        self.flop_per_ms = peak_flop_per_ms * ph.compute_efficiency * f_rel
        self.attn_flop_per_ms = peak_flop_per_ms * ph.attention_efficiency * f_rel
        self.bytes_per_ms = (
            gpu.mem_bandwidth_gb_s * 1e6 * ph.mem_efficiency * issue_factor(gpu, sm_clock_mhz)
        )
        self.kernel_floor_ms = ph.kernel_floor_us / 1000.0 / f_rel


class LatencyModel:
    """Iteration latency of one (GPU, model, TP, engine profile); constants precomputed.

    `at(work, clock)` is the hot path (one call per simulated iteration): plain float arithmetic
    and a per-clock cache of rates. Not meant to be mutated after construction.
    """

    __slots__ = (
        "_act_bytes_per_token",
        "_allreduce_bytes_per_token",
        "_allreduce_ms_fixed",
        "_attn_flop_per_pair",
        "_attn_io_bytes_per_token",
        "_dense_kernels",
        "_head_flop_per_row",
        "_head_weight_bytes",
        "_kv_bytes_per_token_layer",
        "_layer_flop_per_token",
        "_layer_weight_bytes",
        "_layers",
        "_nvlink_bytes_per_ms",
        "_rates",
        "gpu",
        "model",
        "profile",
        "tp",
    )

    def __init__(self, gpu: GpuSpec, model: ModelSpec, tp: int, profile: EngineProfile) -> None:
        if tp < 1:
            raise ValueError(f"tp must be >= 1, got {tp}")
        self.gpu = gpu
        self.model = model
        self.tp = tp
        self.profile = profile
        self._rates: dict[float, _Rates] = {}
        b = model.dtype_bytes
        h = model.hidden_size
        self._layers = model.num_layers
        self._dense_kernels = max(
            1, gpu.physics.kernels_per_layer - 2 * ATTENTION_KERNELS_PER_PHASE
        )
        self._layer_weight_bytes = model.layer_params() * b / tp
        self._layer_flop_per_token = 2.0 * model.layer_params() / tp
        self._act_bytes_per_token = (
            ACT_HIDDEN_PER_TOKEN * h + ACT_MLP_PER_TOKEN * model.intermediate_size / tp
        ) * b
        # With GQA and tp > kv heads, each GPU keeps a replica of one KV head group.
        kv_heads_per_gpu = max(1.0, model.num_kv_heads / tp)
        self._kv_bytes_per_token_layer = 2.0 * kv_heads_per_gpu * model.head_dim * b
        heads_per_gpu = model.num_heads / tp
        self._attn_flop_per_pair = ATTENTION_FLOP_PER_PAIR_DIM * model.head_dim * heads_per_gpu
        # Context attention reads q, k, v and writes o once per token.
        self._attn_io_bytes_per_token = (2.0 * heads_per_gpu + 2.0 * kv_heads_per_gpu) * (
            model.head_dim * b
        )
        self._head_weight_bytes = model.vocab_size * h * b / tp
        self._head_flop_per_row = 2.0 * model.vocab_size * h / tp
        self._allreduce_bytes_per_token = 2.0 * (tp - 1) / tp * h * b if tp > 1 else 0.0
        self._allreduce_ms_fixed = gpu.physics.allreduce_latency_us / 1000.0 if tp > 1 else 0.0
        self._nvlink_bytes_per_ms = gpu.nvlink_gb_s * 1e6

    def rates(self, sm_clock_mhz: float) -> _Rates:
        r = self._rates.get(sm_clock_mhz)
        if r is None:
            if len(self._rates) >= _MAX_CACHED_CLOCKS:  # callers passing arbitrary floats
                self._rates.clear()
            r = self._rates[sm_clock_mhz] = _Rates(self.gpu, sm_clock_mhz)
        return r

    def dense_layer_ms(self, tokens: int, sm_clock_mhz: float) -> float:
        """GPU time of one layer's non-attention kernels for `tokens` rows (no LM head, no
        communication, no overhead): what Vidur's per-layer operator sums measure."""
        r = self.rates(sm_clock_mhz)
        gemm = _smooth_max(
            self._layer_weight_bytes / r.bytes_per_ms,
            tokens * self._layer_flop_per_token / r.flop_per_ms,
            ROOFLINE_SHARPNESS,
        )
        elementwise = tokens * self._act_bytes_per_token / r.bytes_per_ms
        return gemm + elementwise + self._dense_kernels * r.kernel_floor_ms

    def at(self, work: IterationWork, sm_clock_mhz: float) -> LatencyBreakdown:
        """Latency of one iteration at `sm_clock_mhz`."""
        r = self.rates(sm_clock_mhz)
        layers = self._layers
        tokens = work.ctx_tokens + work.gen_requests
        rows = work.ctx_requests + work.gen_requests
        bytes_per_ms = r.bytes_per_ms
        flop_per_ms = r.flop_per_ms

        # Dense: per layer, then the LM head once (nothing runs for an empty iteration).
        dense_ms = flop_total = bytes_total = 0.0
        if tokens:
            layer_flop = tokens * self._layer_flop_per_token
            act_bytes = tokens * self._act_bytes_per_token
            gemm_ms = _smooth_max(
                self._layer_weight_bytes / bytes_per_ms,
                layer_flop / flop_per_ms,
                ROOFLINE_SHARPNESS,
            )
            dense_ms = layers * (
                gemm_ms + act_bytes / bytes_per_ms + self._dense_kernels * r.kernel_floor_ms
            )
            head_flop = rows * self._head_flop_per_row
            dense_ms += (
                _smooth_max(
                    self._head_weight_bytes / bytes_per_ms,
                    head_flop / flop_per_ms,
                    ROOFLINE_SHARPNESS,
                )
                + r.kernel_floor_ms
            )
            flop_total = layers * layer_flop + head_flop
            bytes_total = layers * (self._layer_weight_bytes + act_bytes) + self._head_weight_bytes

        # Attention, per layer: generation is KV reads, context is causal FLOPs.
        attn_layer_ms = 0.0
        if work.gen_requests:
            kv_bytes = work.gen_kv_tokens * self._kv_bytes_per_token_layer
            gen_flop = work.gen_kv_tokens * self._attn_flop_per_pair
            attn_layer_ms += (
                _smooth_max(
                    kv_bytes / bytes_per_ms, gen_flop / r.attn_flop_per_ms, ROOFLINE_SHARPNESS
                )
                + ATTENTION_KERNELS_PER_PHASE * r.kernel_floor_ms
            )
            bytes_total += layers * kv_bytes
            flop_total += layers * gen_flop
        if work.ctx_tokens:
            ctx_flop = work.ctx_attention_pairs * self._attn_flop_per_pair
            io_bytes = work.ctx_tokens * self._attn_io_bytes_per_token
            attn_layer_ms += (
                _smooth_max(
                    io_bytes / bytes_per_ms, ctx_flop / r.attn_flop_per_ms, ROOFLINE_SHARPNESS
                )
                + ATTENTION_KERNELS_PER_PHASE * r.kernel_floor_ms
            )
            bytes_total += layers * io_bytes
            # Attention runs at attention_efficiency: count its tensor time as busy time.
            flop_total += layers * ctx_flop * (flop_per_ms / r.attn_flop_per_ms)
        attention_ms = layers * attn_layer_ms

        # Tensor parallelism: two ring all-reduces per layer.
        comm_ms = 0.0
        if self.tp > 1 and tokens:
            one = self._allreduce_ms_fixed + (
                tokens * self._allreduce_bytes_per_token / self._nvlink_bytes_per_ms
            )
            comm_ms = 2 * layers * one

        gpu_ms = dense_ms + attention_ms + comm_ms
        if gpu_ms > 0.0:
            sm_activity = min(1.0, flop_total / flop_per_ms / gpu_ms)
            peak_bytes_per_ms = self.gpu.mem_bandwidth_gb_s * 1e6
            dram_activity = min(1.0, bytes_total / peak_bytes_per_ms / gpu_ms)
        else:
            sm_activity = dram_activity = 0.0
        p = self.profile
        overhead_ms = p.fixed_ms + p.per_seq_ms * (work.ctx_requests + work.gen_requests)
        return LatencyBreakdown(
            sm_clock_mhz=sm_clock_mhz,
            dense_ms=dense_ms,
            attention_ms=attention_ms,
            communication_ms=comm_ms,
            overhead_ms=overhead_ms,
            sm_activity=sm_activity,
            dram_activity=dram_activity,
        )


def iteration_latency(
    gpu: GpuSpec,
    model: ModelSpec,
    tp: int,
    work: IterationWork,
    sm_clock_mhz: float,
    profile: EngineProfile,
) -> LatencyBreakdown:
    """Pure-function form of `LatencyModel(gpu, model, tp, profile).at(work, sm_clock_mhz)`."""
    return LatencyModel(gpu, model, tp, profile).at(work, sm_clock_mhz)
