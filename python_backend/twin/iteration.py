"""Records that cross the boundary between the twin's scheduler and its physics.

The scheduler decides WHAT an iteration computes (`IterationWork`); latency.py says how long it
takes at a given SM clock (`LatencyBreakdown`); the GPU turns that into power and energy.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class IterationWork:
    """What one engine iteration computes, summed over its scheduled requests."""

    ctx_requests: int = 0  # requests with a context (prefill) chunk in this iteration
    ctx_tokens: int = 0  # prompt tokens processed, all chunks together
    ctx_attention_pairs: int = 0  # causal (query, key) pairs over the context chunks
    gen_requests: int = 0  # requests generating one token each
    gen_kv_tokens: int = 0  # KV positions the generation requests attend to, summed

    @property
    def tokens(self) -> int:
        """Rows through the dense layers: every context token plus one per generation request."""
        return self.ctx_tokens + self.gen_requests

    @property
    def scheduled_requests(self) -> int:
        return self.ctx_requests + self.gen_requests


@dataclass(frozen=True)
class LatencyBreakdown:
    """Time of one iteration at one SM clock, by part, and how busy it keeps the GPU."""

    sm_clock_mhz: float
    dense_ms: float  # linear layers, norms, activations (per-GPU shard)
    attention_ms: float  # context and generation attention
    communication_ms: float  # tensor-parallel all-reduces
    overhead_ms: float  # engine runtime: scheduling, launches, sampling (engine profile)
    sm_activity: float  # 0..1: share of the GPU time the tensor/SM pipes are busy computing
    dram_activity: float  # 0..1: share of peak HBM bandwidth used, averaged over the iteration

    @property
    def gpu_ms(self) -> float:
        return self.dense_ms + self.attention_ms + self.communication_ms

    @property
    def total_ms(self) -> float:
        return self.gpu_ms + self.overhead_ms
