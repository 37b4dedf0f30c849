"""The engine runtime's own cost per iteration: CPU scheduling, input preparation, kernel launches
and output processing that the GPU physics does not see.

An `EngineProfile` is two numbers: a fixed part per iteration and a part per scheduled sequence.
The GPU time of an iteration comes from latency.py; the profile adds the runtime on top, so the
same physics can be compared with measurements taken on different engines (a Python engine, vLLM,
TensorRT-LLM) by swapping only the profile.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import SpecError


@dataclass(frozen=True)
class EngineProfile:
    """Runtime overhead of one engine iteration: `fixed_ms + per_seq_ms * scheduled sequences`."""

    name: str
    fixed_ms: float
    per_seq_ms: float

    def __post_init__(self) -> None:
        if self.fixed_ms < 0 or self.per_seq_ms < 0:
            raise SpecError(
                f"engine profile '{self.name}': overheads must be >= 0, "
                f"got fixed_ms={self.fixed_ms}, per_seq_ms={self.per_seq_ms}"
            )

    def overhead_ms(self, scheduled_sequences: int) -> float:
        return self.fixed_ms + self.per_seq_ms * scheduled_sequences


TENSORRT_LLM = EngineProfile("tensorrt-llm", fixed_ms=0.20, per_seq_ms=0.004)
"""TensorRT-LLM's C++ executor with CUDA graphs (the default).

Why these values: the batch manager, scheduler and sampling setup run in C++ and the whole
forward pass is replayed as a CUDA graph, so the per-iteration cost is a few hundred microseconds
and the per-request bookkeeping (KV block tables, stop checks, response objects) a few
microseconds. An upper bound comes from a Python engine measured on A100
(../shared/data/calibration/vidur/cpu_overheads_a100.csv): schedule + prepare inputs + sampler +
output processing sums to about 1.2 ms at batch 8 and 6.2 ms at batch 128 for Llama-2-7B, i.e.
about 0.8 ms fixed + 0.042 ms per sequence. We take roughly a quarter of the fixed part (no Python
interpreter, no per-kernel launches thanks to CUDA graphs) and a tenth of the per-sequence part:
0.20 ms + 0.004 ms per sequence, i.e. 0.23 ms at batch 8 and 0.71 ms at batch 128.
"""

NO_OVERHEAD = EngineProfile("none", fixed_ms=0.0, per_seq_ms=0.0)
"""GPU time only: for comparing kernel times (e.g. Vidur's per-operator profiles)."""

PROFILES: dict[str, EngineProfile] = {p.name: p for p in (TENSORRT_LLM, NO_OVERHEAD)}
DEFAULT_PROFILE_NAME = TENSORRT_LLM.name


def engine_profile(name: str = DEFAULT_PROFILE_NAME) -> EngineProfile:
    """The named profile; SpecError naming the valid names otherwise."""
    try:
        return PROFILES[name]
    except KeyError:
        raise SpecError(
            f"unknown engine profile '{name}'; valid: {', '.join(sorted(PROFILES))}"
        ) from None
