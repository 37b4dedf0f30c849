"""Iteration latency: roofline behaviour over the SM clock, monotonicity, TP, overhead profiles."""

from __future__ import annotations

import itertools
import time

import pytest

from throttllem.backend.twin.engine_profile import (
    DEFAULT_PROFILE_NAME,
    NO_OVERHEAD,
    EngineProfile,
    engine_profile,
)
from throttllem.backend.twin.errors import SpecError
from throttllem.backend.twin.hardware import default_catalog
from throttllem.backend.twin.iteration import IterationWork
from throttllem.backend.twin.latency import LatencyModel, issue_factor, iteration_latency

CATALOG = default_catalog()
H100 = CATALOG.gpu("H100-SXM5-80GB")
A100 = CATALOG.gpu("A100-SXM4-80GB")
LLAMA3_8B = CATALOG.model("llama-3-8b")
LLAMA2_70B = CATALOG.model("llama-2-70b")


def decode(batch: int, kv_each: int = 1000) -> IterationWork:
    return IterationWork(gen_requests=batch, gen_kv_tokens=batch * kv_each)


def prefill(tokens: int) -> IterationWork:
    return IterationWork(
        ctx_requests=1, ctx_tokens=tokens, ctx_attention_pairs=tokens * (tokens + 1) // 2
    )


@pytest.fixture(params=[H100, A100], ids=lambda g: g.name)
def lm(request: pytest.FixtureRequest) -> LatencyModel:
    return LatencyModel(request.param, LLAMA3_8B, 1, NO_OVERHEAD)


def test_compute_bound_prefill_scales_with_one_over_clock(lm: LatencyModel) -> None:
    f_max = lm.gpu.max_sm_clock_mhz
    fast = lm.at(prefill(4096), f_max)
    slow = lm.at(prefill(4096), f_max / 2)
    # Dense GEMMs at 4096 rows are compute-bound: half the clock, about twice the time.
    assert slow.dense_ms / fast.dense_ms == pytest.approx(2.0, rel=0.12)
    assert slow.attention_ms / fast.attention_ms == pytest.approx(2.0, rel=0.05)


def test_memory_bound_decode_nearly_clock_independent_above_knee(lm: LatencyModel) -> None:
    f_max = lm.gpu.max_sm_clock_mhz
    f_mid = 1.5 * lm.gpu.physics.issue_knee_mhz
    fast = lm.at(decode(8), f_max)
    mid = lm.at(decode(8), f_mid)
    assert f_mid < 0.8 * f_max
    # Weights stream at HBM speed; only kernel floors and the issue limit's tail move with f.
    assert mid.gpu_ms / fast.gpu_ms < 1.12
    # ... whereas a compute-bound iteration slows in proportion to the clock drop.
    assert lm.at(prefill(4096), f_mid).gpu_ms / lm.at(prefill(4096), f_max).gpu_ms > 1.25


def test_memory_bound_becomes_issue_limited_below_knee(lm: LatencyModel) -> None:
    knee = lm.gpu.physics.issue_knee_mhz
    assert issue_factor(lm.gpu, lm.gpu.max_sm_clock_mhz) > 0.99
    assert issue_factor(lm.gpu, knee / 2) < 0.55
    slow = lm.at(decode(8), knee / 2)
    fast = lm.at(decode(8), lm.gpu.max_sm_clock_mhz)
    assert slow.gpu_ms > 1.6 * fast.gpu_ms


def test_latency_monotonic_in_clock_batch_tokens_and_kv(lm: LatencyModel) -> None:
    clocks = lm.gpu.supported_clocks_mhz()
    times = [lm.at(decode(32), c).gpu_ms for c in clocks]  # highest clock first
    assert all(a <= b for a, b in itertools.pairwise(times))
    f = clocks[0]
    by_batch = [lm.at(decode(b), f).total_ms for b in (1, 2, 8, 32, 128, 256)]
    assert all(a < b for a, b in itertools.pairwise(by_batch))
    by_tokens = [lm.at(prefill(t), f).total_ms for t in (1, 64, 512, 2048, 8192)]
    assert all(a < b for a, b in itertools.pairwise(by_tokens))
    by_kv = [lm.at(decode(32, kv), f).attention_ms for kv in (16, 256, 2048, 8192)]
    assert all(a < b for a, b in itertools.pairwise(by_kv))


def test_decode_attention_linear_in_kv_prefill_attention_quadratic_in_prompt(
    lm: LatencyModel,
) -> None:
    f = lm.gpu.max_sm_clock_mhz
    a1 = lm.at(decode(64, 2000), f).attention_ms
    a2 = lm.at(decode(64, 4000), f).attention_ms
    assert a2 / a1 == pytest.approx(2.0, rel=0.1)
    p1 = lm.at(prefill(4096), f).attention_ms
    p2 = lm.at(prefill(8192), f).attention_ms
    assert p2 / p1 == pytest.approx(4.0, rel=0.1)


def test_tensor_parallelism_splits_dense_and_adds_communication() -> None:
    f = H100.max_sm_clock_mhz
    work = decode(32)
    tp1 = LatencyModel(H100, LLAMA2_70B, 1, NO_OVERHEAD).at(work, f)
    tp4 = LatencyModel(H100, LLAMA2_70B, 4, NO_OVERHEAD).at(work, f)
    tp8 = LatencyModel(H100, LLAMA2_70B, 8, NO_OVERHEAD).at(work, f)
    assert tp1.communication_ms == 0.0
    assert tp4.communication_ms > 0.0
    assert tp4.dense_ms < tp1.dense_ms / 3
    assert tp8.dense_ms < tp4.dense_ms
    # Big prefill all-reduces carry real bytes: communication grows with the tokens.
    big = LatencyModel(H100, LLAMA2_70B, 4, NO_OVERHEAD).at(prefill(4096), f)
    assert big.communication_ms > 5 * tp4.communication_ms


def test_overhead_comes_from_the_engine_profile() -> None:
    profile = EngineProfile("test", fixed_ms=1.0, per_seq_ms=0.5)
    b = LatencyModel(H100, LLAMA3_8B, 1, profile).at(decode(10), 1980)
    assert b.overhead_ms == pytest.approx(1.0 + 0.5 * 10)
    assert b.total_ms == pytest.approx(b.gpu_ms + b.overhead_ms)
    gpu_only = LatencyModel(H100, LLAMA3_8B, 1, NO_OVERHEAD).at(decode(10), 1980)
    assert gpu_only.overhead_ms == 0.0
    assert gpu_only.gpu_ms == pytest.approx(b.gpu_ms)


def test_default_profile_is_tensorrt_llm_and_lookup_names_valid_profiles() -> None:
    assert DEFAULT_PROFILE_NAME == "tensorrt-llm"
    trt = engine_profile()
    assert 0 < trt.fixed_ms < 1.0 and 0 < trt.per_seq_ms < 0.05
    with pytest.raises(SpecError, match=r"valid: .*tensorrt-llm"):
        engine_profile("vllm-2019")
    with pytest.raises(SpecError, match="fixed_ms"):
        EngineProfile("bad", fixed_ms=-1.0, per_seq_ms=0.0)


def test_activities_tell_memory_bound_from_compute_bound(lm: LatencyModel) -> None:
    f = lm.gpu.max_sm_clock_mhz
    dec = lm.at(decode(8), f)
    pre = lm.at(prefill(4096), f)
    for b in (dec, pre):
        assert 0.0 <= b.sm_activity <= 1.0 and 0.0 <= b.dram_activity <= 1.0
    assert dec.dram_activity > 0.5 > dec.sm_activity
    assert pre.sm_activity > 0.6 > pre.dram_activity


def test_pure_function_matches_model_and_is_deterministic() -> None:
    work = IterationWork(
        ctx_requests=2,
        ctx_tokens=700,
        ctx_attention_pairs=150_000,
        gen_requests=50,
        gen_kv_tokens=40_000,
    )
    profile = engine_profile()
    a = iteration_latency(A100, LLAMA2_70B, 4, work, 1200, profile)
    b = LatencyModel(A100, LLAMA2_70B, 4, profile).at(work, 1200)
    assert a == b
    assert iteration_latency(A100, LLAMA2_70B, 4, work, 1200, profile) == a


def test_vidur_shape_flat_then_compute_bound() -> None:
    """Dense time per layer: flat while weights stream, linear in tokens once compute-bound."""
    lm7 = LatencyModel(A100, CATALOG.model("llama-2-7b"), 1, NO_OVERHEAD)
    f = A100.max_sm_clock_mhz
    assert lm7.dense_layer_ms(32, f) / lm7.dense_layer_ms(1, f) < 1.15
    assert lm7.dense_layer_ms(4096, f) / lm7.dense_layer_ms(2048, f) == pytest.approx(2, rel=0.1)


def test_empty_iteration_costs_only_overhead() -> None:
    b = LatencyModel(H100, LLAMA3_8B, 2, engine_profile()).at(IterationWork(), 1980)
    assert b.gpu_ms == 0.0 and b.sm_activity == 0.0 and b.dram_activity == 0.0
    assert b.overhead_ms == pytest.approx(engine_profile().fixed_ms)


def test_latency_model_is_fast() -> None:
    lm = LatencyModel(H100, LLAMA3_8B, 1, engine_profile())
    work = IterationWork(
        ctx_requests=1,
        ctx_tokens=256,
        ctx_attention_pairs=33_000,
        gen_requests=127,
        gen_kv_tokens=127 * 800,
    )
    n = 20_000
    t0 = time.perf_counter()
    for _ in range(n):
        lm.at(work, 1980)
    per_s = n / (time.perf_counter() - t0)
    # Measured ~200k calls/s; the engine needs >= 20k iterations/s in total.
    assert per_s > 40_000
