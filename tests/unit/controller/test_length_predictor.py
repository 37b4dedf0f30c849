"""Length predictor: conservative quantiles, conditioning, fallbacks and its error report."""

from __future__ import annotations

import math

import numpy as np
import pytest

from throttllem.controller.length_predictor import (
    MIN_SAMPLES,
    MIN_TAIL_SAMPLES,
    LengthPredictor,
)


def _trained(lengths: list[int], prompt: int = 500, quantile: float = 0.9) -> LengthPredictor:
    p = LengthPredictor(quantile=quantile)
    for n in lengths:
        p.observe(prompt, n, predicted_at_arrival=n)
    return p


def test_cold_start_uses_the_prior_and_respects_max_tokens() -> None:
    p = LengthPredictor(quantile=0.5)
    assert p.predict(500, max_tokens=4096) == 129  # the prior's median
    assert p.predict(500, max_tokens=50) == 50


def test_learned_quantile_is_conservative() -> None:
    lengths = list(range(1, 1001))
    p = _trained(lengths, quantile=0.9)
    assert p.predict(500, max_tokens=4096) == pytest.approx(900, abs=2)


def test_a_request_that_outlives_its_prediction_gets_a_longer_one() -> None:
    p = _trained(list(range(1, 1001)), quantile=0.5)
    first = p.predict(500, 4096)
    later = p.predict(500, 4096, generated=first + 10)
    assert later > first + 10
    # Past every length seen: it runs on as the longest lengths seen did beyond the 32nd
    # longest (969..1000: their median is 985 = 985/969 of it), within max_tokens.
    assert p.predict(500, 4096, generated=1000) == math.ceil(1000 * 985 / 969) + 1 == 1018
    assert p.predict(500, 1010, generated=1000) == 1010


def test_conditioned_on_prompt_length() -> None:
    p = LengthPredictor(quantile=0.5)
    for _ in range(MIN_SAMPLES * 2):
        p.observe(100, 20, 20)
        p.observe(3000, 400, 400)
    assert p.predict(100, 4096) == 20
    assert p.predict(3000, 4096) == 400


def _with_hints(lengths: list[int], hints: str) -> LengthPredictor:
    p = LengthPredictor(hints=hints)
    for n in lengths:
        p.observe(500, n, predicted_at_arrival=n)
    return p


def test_a_trusted_hint_wins_but_is_bounded() -> None:
    p = _with_hints([10] * 100, "trust")
    assert p.predict(500, 4096, hint=300) == 300
    assert p.predict(500, 200, hint=300) == 200
    assert p.predict(500, 4096, generated=299, hint=300) == 300


def test_by_default_a_hint_shortens_the_plan_and_never_lengthens_it() -> None:
    # Lengths 1..1000 seen: unhinted, a new request is planned at ~900 (their 90% quantile).
    p = _with_hints(list(range(1, 1001)), "cap")
    assert p.hints == LengthPredictor().hints == "cap"
    unhinted = p.predict(500, 4096)
    assert 850 < unhinted < 950
    assert p.predict(500, 4096, hint=40) == 40
    assert p.predict(500, 4096, hint=3000) == unhinted
    assert p.predict(500, 4096, generated=500, hint=600) == 600
    assert p.predict(500, 4096, generated=500, hint=3000) == p.predict(500, 4096, generated=500)


def test_an_ignored_hint_changes_nothing() -> None:
    p = _with_hints(list(range(1, 1001)), "ignore")
    assert p.predict(500, 4096, hint=40) == p.predict(500, 4096)
    many = p.predict_many(np.array([500]), np.array([4096]), np.array([0]), np.array([40]))
    assert many.tolist() == [p.predict(500, 4096)]


def test_an_unknown_use_of_hints_is_refused() -> None:
    with pytest.raises(ValueError, match="hints must be one of cap, trust, ignore"):
        LengthPredictor(hints="always")


@pytest.mark.parametrize("hints", ["cap", "trust"])
def test_a_request_that_outlives_its_hint_is_predicted_from_the_lengths_seen(hints: str) -> None:
    # A wrong hint must not plan the request to end at every next token: from the lengths seen,
    # one that has generated 350 runs on to about 900 (the 90% quantile of 351..1000).
    p = _with_hints(list(range(1, 1001)), hints)
    unhinted = p.predict(500, 4096, generated=350)
    assert unhinted > 800
    assert p.predict(500, 4096, generated=350, hint=300) == unhinted
    assert p.predict(500, 4096, generated=300, hint=300) == p.predict(500, 4096, generated=300)
    many = p.predict_many(
        np.array([500, 500, 500]),
        np.array([4096, 4096, 4096]),
        np.array([350, 299, 350]),
        np.array([300, 300, 0]),
    )
    assert many.tolist() == [unhinted, 300, unhinted]


def test_error_report_counts_under_predictions() -> None:
    p = LengthPredictor()
    p.observe(100, 100, predicted_at_arrival=150)
    p.observe(100, 100, predicted_at_arrival=50)
    err = p.error()
    assert err.count == 2
    assert err.mean_abs_pct_error == pytest.approx(0.5)
    assert err.under_predicted_share == pytest.approx(0.5)


def test_window_forgets_old_traffic() -> None:
    p = LengthPredictor(quantile=0.5, window=64)
    for _ in range(64):
        p.observe(500, 1000, 1000)
    for _ in range(64):
        p.observe(500, 10, 10)
    assert p.predict(500, 4096) == 10


def test_a_request_outliving_the_prior_is_not_predicted_to_end_at_its_next_token() -> None:
    """Before its bucket has learned, a request past the prior's 90% quantile is planned at
    the prior's median among longer lengths, growing as it generates; below that, and for the
    low quantile that says how short it may still be, the prior is unchanged."""
    p = LengthPredictor()
    at_arrival = p.predict(1000, 4096)
    assert p.predict(1000, 4096, generated=at_arrival - 2) == at_arrival
    past = [p.predict(1000, 4096, generated=g) for g in (at_arrival, 600, 1000)]
    assert past[0] > 1.3 * at_arrival and past[0] < past[1] < past[2]
    assert p.predict(1000, 700, generated=600) == 700  # never above max_tokens
    assert p.predict(1000, 4096, generated=600, quantile=0.1) == 601
    many = p.predict_many(
        np.array([1000, 1000]), np.array([4096, 4096]), np.array([10, 600]), np.array([0, 0])
    )
    assert list(many) == [at_arrival, past[1]]


def test_prior_quantile_matches_a_lognormal_sample() -> None:
    rng = np.random.default_rng(0)
    sample = rng.lognormal(np.log(129), 0.99, 200_000)
    p = LengthPredictor(quantile=0.9)
    assert p.predict(500, 100_000) == pytest.approx(np.quantile(sample, 0.9), rel=0.02)


def test_bad_quantile_is_rejected() -> None:
    with pytest.raises(ValueError, match="quantile"):
        LengthPredictor(quantile=1.0)


@pytest.mark.parametrize("hints", ["cap", "trust", "ignore"])
def test_predict_many_agrees_with_predict(hints: str) -> None:
    rng = np.random.default_rng(3)
    p = LengthPredictor(quantile=0.8, hints=hints)
    for _ in range(500):
        p.observe(int(rng.integers(1, 5000)), int(rng.integers(1, 900)), 100)
    n = 400
    prompts = rng.integers(1, 9000, n)
    maxes = rng.integers(1, 2048, n)
    generated = np.minimum(rng.integers(0, 1200, n), maxes - 1)
    hints = np.where(rng.random(n) < 0.3, rng.integers(1, 3000, n), 0)
    many = p.predict_many(prompts, maxes, generated, hints)
    one = [
        p.predict(int(a), int(b), int(c), int(d) or None)
        for a, b, c, d in zip(prompts, maxes, generated, hints, strict=True)
    ]
    assert many.tolist() == one
    # Cold buckets (the prior) agree too.
    cold = LengthPredictor(quantile=0.9)
    assert cold.predict_many(prompts[:50], maxes[:50], generated[:50], hints[:50] * 0).tolist() == [
        cold.predict(int(a), int(b), int(c))
        for a, b, c in zip(prompts[:50], maxes[:50], generated[:50], strict=True)
    ]


def test_predict_many_mixes_learned_and_cold_buckets_and_sees_new_lengths() -> None:
    # Short prompts learned, long ones not: one call answers both; and lengths learned after a
    # call are seen by the next (the stacked buckets are rebuilt).
    rng = np.random.default_rng(5)
    p = LengthPredictor(quantile=0.9)
    for _ in range(300):
        p.observe(int(rng.integers(1, 500)), int(rng.integers(1, 400)), 100)
    prompts = np.array([10, 200, 300, 4000, 8000], dtype=np.int64)
    maxes = np.full(5, 2000, dtype=np.int64)
    generated = np.array([0, 50, 390, 0, 10], dtype=np.int64)
    none = np.zeros(5, dtype=np.int64)

    def one_by_one() -> list[int]:
        return [p.predict(int(a), 2000, int(g)) for a, g in zip(prompts, generated, strict=True)]

    assert p.predict_many(prompts, maxes, generated, none).tolist() == one_by_one()
    before = p.predict_many(prompts, maxes, generated, none).tolist()
    for _ in range(100):
        p.observe(4000, 1500, 100)
    after = p.predict_many(prompts, maxes, generated, none).tolist()
    assert after == one_by_one()
    assert after[3] > before[3]  # the long-prompt bucket has learned long answers


def test_a_low_quantile_says_how_short_a_request_may_still_turn_out() -> None:
    p = _trained(list(range(1, 1001)), quantile=0.9)
    one = np.array([500]), np.array([4096]), np.array([100]), np.array([0])
    shortest = int(p.predict_many(*one, quantile=0.02)[0])
    # Among the lengths above the 100 generated (101..1000), the 2% quantile, not the 90%.
    assert shortest == pytest.approx(101 + 0.02 * 900, abs=2)
    assert int(p.predict_many(*one)[0]) == pytest.approx(101 + 0.9 * 900, abs=2)
    # Before it has learned, the prior's low quantile: shorter than its median.
    cold = LengthPredictor(quantile=0.9)
    assert cold.predict_many(*one[:2], np.array([0]), one[3], quantile=0.02)[0] < 129
    with pytest.raises(ValueError, match="quantile"):
        p.predict_many(*one, quantile=0.0)


def test_a_thin_tail_in_its_bucket_is_read_from_every_buckets_lengths() -> None:
    """A request that outlived nearly every length its own bucket has seen: a quantile of the
    few longer ones would name the longest seen; the lengths of all prompts say more."""
    p = _trained([10] * 200 + [40] * 4, prompt=500)  # 4 answers over 30 tokens, 16 needed
    for n in range(1, 401):
        p.observe(3000, n, predicted_at_arrival=n)  # another bucket: a long tail
    pooled = p.predict(500, 4096, generated=30)
    # The 90% quantile of the pooled lengths above 30 (31..400 and the four 40s), not 40.
    tail = sorted([*range(31, 401), 40, 40, 40, 40])
    assert pooled == tail[int(0.9 * len(tail))] == 363
    one = np.array([500]), np.array([4096]), np.array([30]), np.array([0])
    assert int(p.predict_many(*one)[0]) == pooled
    # The bucket's own tail when it holds enough.
    for _ in range(MIN_TAIL_SAMPLES):
        p.observe(500, 50, predicted_at_arrival=50)
    assert p.predict(500, 4096, generated=30) == 50


def test_past_nearly_every_length_seen_the_quantile_grows_as_the_longest_seen_did() -> None:
    """Fewer than 16 lengths seen anywhere are longer than the 995 generated: a quantile of
    them would be the longest seen. A tail has no scale but a shape: the longest lengths
    relative to the 32nd longest say how far beyond g a length known to exceed g goes."""
    heavy = _trained([10] * 400 + [100 * 2**i for i in range(6)] * 6)  # up to 3,200
    light = _trained(list(range(1, 1001)))  # ends by 1,000
    one = np.array([500]), np.array([8192]), np.array([995]), np.array([0])
    assert int(heavy.predict_many(*one)[0]) > 2 * int(light.predict_many(*one)[0])
    assert light.predict(500, 8192, generated=995) == math.ceil(995 * 997 / 969) + 1
    # How short it may still be: about the next token, whatever the tail.
    for p in (heavy, light):
        assert int(p.predict_many(*one, quantile=0.02)[0]) == 996
