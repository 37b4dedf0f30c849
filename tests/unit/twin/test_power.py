"""Power model: idle, clock-held idle, superlinear dynamic power, clock-independent memory power."""

from __future__ import annotations

import itertools

import pytest

from throttllem.backend.twin.engine_profile import NO_OVERHEAD
from throttllem.backend.twin.hardware import GpuSpec, default_catalog
from throttllem.backend.twin.iteration import IterationWork
from throttllem.backend.twin.latency import LatencyModel
from throttllem.backend.twin.power import (
    PowerModel,
    gpu_power_w,
    idle_clock_mhz,
    iteration_power_w,
    switching_scale,
    voltage_ratio,
)

CATALOG = default_catalog()
BOARDS = [CATALOG.gpu(n) for n in ("A100-SXM4-40GB", "A100-SXM4-80GB", "H100-SXM5-80GB")]


@pytest.fixture(params=BOARDS, ids=lambda g: g.name)
def gpu(request: pytest.FixtureRequest) -> GpuSpec:
    spec: GpuSpec = request.param
    return spec


def test_idle_power_at_idle_clock_is_the_measured_idle(gpu: GpuSpec) -> None:
    assert gpu_power_w(gpu, idle_clock_mhz(gpu), 0.0, 0.0, busy=False) == gpu.idle_power_w


def test_idle_gpu_held_at_max_clock_draws_a_bit_more(gpu: GpuSpec) -> None:
    held = gpu_power_w(gpu, gpu.max_sm_clock_mhz, 0.0, 0.0, busy=False)
    assert gpu.idle_power_w < held < gpu.idle_power_w + 30.0


def test_power_monotonic_in_clock_and_activity(gpu: GpuSpec) -> None:
    clocks = sorted(gpu.supported_clocks_mhz())
    for busy in (True, False):
        powers = [gpu_power_w(gpu, f, 0.5, 0.5, busy=busy) for f in clocks]
        assert all(a <= b for a, b in itertools.pairwise(powers))
    f = gpu.max_sm_clock_mhz
    by_sm = [gpu_power_w(gpu, f, a, 0.3, busy=True) for a in (0.0, 0.25, 0.5, 1.0)]
    by_dram = [gpu_power_w(gpu, f, 0.3, a, busy=True) for a in (0.0, 0.25, 0.5, 1.0)]
    assert all(a < b for a, b in itertools.pairwise(by_sm))
    assert all(a < b for a, b in itertools.pairwise(by_dram))


def test_dynamic_power_grows_faster_than_linearly_with_clock(gpu: GpuSpec) -> None:
    f_max = gpu.max_sm_clock_mhz
    knee = gpu.physics.voltage_knee_mhz
    assert voltage_ratio(gpu, f_max) == pytest.approx(1.0)
    assert voltage_ratio(gpu, knee) == voltage_ratio(gpu, idle_clock_mhz(gpu))
    # Above the voltage knee, f * V(f)^2 rises faster than f.
    assert switching_scale(gpu, f_max) / switching_scale(gpu, knee) > 1.5 * f_max / knee

    def dynamic(f: float) -> float:
        return gpu_power_w(gpu, f, 1.0, 0.0, busy=True) - gpu.idle_power_w

    assert dynamic(f_max) / dynamic(knee) > f_max / knee


def test_memory_power_does_not_depend_on_sm_clock(gpu: GpuSpec) -> None:
    deltas = {
        round(
            gpu_power_w(gpu, f, 0.2, 0.8, busy=True) - gpu_power_w(gpu, f, 0.2, 0.0, busy=True), 9
        )
        for f in (gpu.max_sm_clock_mhz, 1200, 600)
    }
    assert len(deltas) == 1


def test_power_model_matches_the_pure_functions(gpu: GpuSpec) -> None:
    pm = PowerModel(gpu)
    for f in (gpu.max_sm_clock_mhz, 1005, 600, idle_clock_mhz(gpu)):
        assert pm.idle_w(f) == pytest.approx(gpu_power_w(gpu, f, 0.0, 0.0, busy=False))
        assert pm.iteration_w(f, 0.3, 0.6, 10.0, 2.0) == pytest.approx(
            iteration_power_w(gpu, f, 0.3, 0.6, 10.0, 2.0)
        )


def test_cpu_overhead_is_charged_at_held_idle_power() -> None:
    h100 = CATALOG.gpu("H100-SXM5-80GB")
    mean_w, kernel_w = iteration_power_w(h100, 1980, 0.5, 0.5, 5.0, 5.0)
    held = gpu_power_w(h100, 1980, 0.0, 0.0, busy=False)
    assert mean_w == pytest.approx((kernel_w + held) / 2)


def _decode_point(gpu: GpuSpec, clock: float) -> tuple[float, float]:
    """(iteration ms, mean W) of a batch-8 Llama-3-8B decode, GPU time only."""
    lm = LatencyModel(gpu, CATALOG.model("llama-3-8b"), 1, NO_OVERHEAD)
    b = lm.at(IterationWork(gen_requests=8, gen_kv_tokens=8 * 600), clock)
    return b.total_ms, gpu_power_w(gpu, clock, b.sm_activity, b.dram_activity, busy=True)


def test_memory_bound_decode_draws_substantial_power_at_max_clock() -> None:
    # ML.ENERGY: Llama-3.1-8B on one H100 draws ~486 W at batch 8; Splitwise: A100 decode 250 W.
    _, h100_w = _decode_point(CATALOG.gpu("H100-SXM5-80GB"), 1980)
    _, a100_w = _decode_point(CATALOG.gpu("A100-SXM4-80GB"), 1410)
    assert 400 < h100_w < 560
    assert 200 < a100_w < 330


@pytest.mark.parametrize("name", ["A100-SXM4-80GB", "H100-SXM5-80GB"])
def test_throttling_memory_bound_decode_saves_energy_for_little_time(name: str) -> None:
    gpu = CATALOG.gpu(name)
    t_max, p_max = _decode_point(gpu, gpu.max_sm_clock_mhz)
    low = 1.5 * gpu.physics.issue_knee_mhz
    t_low, p_low = _decode_point(gpu, low)
    assert t_low / t_max < 1.12
    assert (t_low * p_low) / (t_max * p_max) < 0.8


def test_prefill_at_max_clock_would_exceed_the_h100_power_limit() -> None:
    h100 = CATALOG.gpu("H100-SXM5-80GB")
    lm = LatencyModel(h100, CATALOG.model("llama-3-8b"), 1, NO_OVERHEAD)
    b = lm.at(IterationWork(ctx_requests=1, ctx_tokens=4096, ctx_attention_pairs=8_390_656), 1980)
    # Large GEMMs pull H100 boards into their 700 W limit, where they lower their clock.
    assert gpu_power_w(h100, 1980, b.sm_activity, b.dram_activity, busy=True) > 700
