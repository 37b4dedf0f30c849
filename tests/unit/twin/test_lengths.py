from __future__ import annotations

import statistics

import pytest
from engine_builders import make_request

from throttllem.backend.twin.lengths import (
    AZURE_CONV_MEAN_TOKENS,
    AZURE_CONV_MEDIAN_TOKENS,
    FixedLengths,
    LognormalLengths,
    true_output_len,
    uniform01,
)


def test_default_lognormal_matches_the_azure_conversation_trace() -> None:
    sampler = LognormalLengths(seed=0)
    draws = [sampler.sample(i) for i in range(40_000)]
    assert statistics.median(draws) == pytest.approx(AZURE_CONV_MEDIAN_TOKENS, rel=0.03)
    assert statistics.fmean(draws) == pytest.approx(AZURE_CONV_MEAN_TOKENS, rel=0.05)
    assert min(draws) >= 1


def test_draws_depend_only_on_seed_and_request_id() -> None:
    a, b = LognormalLengths(seed=5), LognormalLengths(seed=5)
    assert [a.sample(i) for i in (3, 1, 2)] == [b.sample(i) for i in (3, 1, 2)]
    assert a.sample(7) == a.sample(7)
    other = LognormalLengths(seed=6)
    assert [a.sample(i) for i in range(20)] != [other.sample(i) for i in range(20)]
    assert all(0.0 < uniform01(s, i) < 1.0 for s in range(3) for i in range(100))


def test_cap_fixed_and_median_mean_constructors() -> None:
    assert max(LognormalLengths(1, max_len=50).sample(i) for i in range(500)) == 50
    assert FixedLengths(9).sample(123) == 9
    fitted = LognormalLengths.from_median_mean(100, 150, seed=2)
    draws = [fitted.sample(i) for i in range(20_000)]
    assert statistics.median(draws) == pytest.approx(100, rel=0.04)
    with pytest.raises(ValueError):
        LognormalLengths.from_median_mean(200, 100)
    with pytest.raises(ValueError):
        FixedLengths(0)


def test_the_request_s_own_length_wins() -> None:
    sampler = FixedLengths(9)
    assert true_output_len(make_request(out_len=3), 1, sampler) == 3
    assert true_output_len(make_request(), 1, sampler) == 9
