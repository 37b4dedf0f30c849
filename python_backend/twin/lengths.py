"""The hidden true output length of each request: what the "model" would generate before its end
token. A real engine learns it only by running the request; the twin decides it at enqueue.

`Request.twin_output_len` wins when set (a trace replay knows it). Otherwise a `LengthSampler`
draws one, deterministically from (seed, request id), so a run does not depend on the order in
which threads enqueue. The engine then stops a request at min(true length, max_tokens): END_ID
when the true length fits, LENGTH when max_tokens cuts it.
"""

from __future__ import annotations

import math
from typing import Protocol

from .executor_api import Request

# Output lengths of the Azure LLM inference trace, conversation service (2023, 19,366 requests):
# median 129 and mean 211 tokens. A lognormal with the same median and mean has
# mu = ln(median) and sigma^2 = 2 ln(mean / median). (Its tail is heavier than the trace's,
# whose p99 is 601 and maximum 1000; max_tokens bounds it in practice.)
AZURE_CONV_MEDIAN_TOKENS = 129.0
AZURE_CONV_MEAN_TOKENS = 211.0
AZURE_CONV_MU = math.log(AZURE_CONV_MEDIAN_TOKENS)
AZURE_CONV_SIGMA = math.sqrt(2.0 * math.log(AZURE_CONV_MEAN_TOKENS / AZURE_CONV_MEDIAN_TOKENS))

_MASK64 = (1 << 64) - 1
_TWO_PI = 2.0 * math.pi


class LengthSampler(Protocol):
    def sample(self, request_id: int) -> int:
        """A true output length (>= 1 token) for the request with this id."""
        ...


def _splitmix64(x: int) -> int:
    """A well-mixed 64-bit hash: independent-looking draws from consecutive ids."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def uniform01(seed: int, request_id: int) -> float:
    """A deterministic draw in (0, 1) for one (seed, request id) pair."""
    h = _splitmix64((seed * 0x100000001B3 + request_id) & _MASK64)
    return ((h >> 11) + 0.5) / float(1 << 53)


class LognormalLengths:
    """Lengths from a lognormal, by default the one fitted to the Azure conversation trace."""

    def __init__(
        self,
        seed: int = 0,
        *,
        mu: float = AZURE_CONV_MU,
        sigma: float = AZURE_CONV_SIGMA,
        max_len: int | None = None,
    ) -> None:
        if sigma < 0:
            raise ValueError(f"sigma must be non-negative, got {sigma}")
        if max_len is not None and max_len < 1:
            raise ValueError(f"max_len must be at least 1, got {max_len}")
        self.seed = seed
        self.mu = mu
        self.sigma = sigma
        self.max_len = max_len

    @classmethod
    def from_median_mean(cls, median: float, mean: float, seed: int = 0) -> LognormalLengths:
        if not 0 < median <= mean:
            raise ValueError(f"need 0 < median <= mean, got median={median}, mean={mean}")
        return cls(seed, mu=math.log(median), sigma=math.sqrt(2.0 * math.log(mean / median)))

    def sample(self, request_id: int) -> int:
        # Box-Muller from two independent draws of the same (seed, id): a standard normal.
        u1 = uniform01(self.seed, request_id)
        u2 = uniform01(self.seed ^ 0x2545F4914F6CDD1D, request_id)
        z = math.sqrt(-2.0 * math.log(u1)) * math.cos(_TWO_PI * u2)
        n = max(1, round(math.exp(self.mu + self.sigma * z)))
        return n if self.max_len is None else min(n, self.max_len)


class FixedLengths:
    """Every request generates exactly `tokens` tokens (benchmarks, `twin run`)."""

    def __init__(self, tokens: int) -> None:
        if tokens < 1:
            raise ValueError(f"tokens must be at least 1, got {tokens}")
        self.tokens = tokens

    def sample(self, request_id: int) -> int:
        return self.tokens


def true_output_len(request: Request, request_id: int, sampler: LengthSampler) -> int:
    """The request's hidden output length: its own `twin_output_len`, else a sampled one."""
    if request.twin_output_len is not None:
        return request.twin_output_len
    return sampler.sample(request_id)


__all__ = [
    "AZURE_CONV_MEAN_TOKENS",
    "AZURE_CONV_MEDIAN_TOKENS",
    "AZURE_CONV_MU",
    "AZURE_CONV_SIGMA",
    "FixedLengths",
    "LengthSampler",
    "LognormalLengths",
    "true_output_len",
    "uniform01",
]
