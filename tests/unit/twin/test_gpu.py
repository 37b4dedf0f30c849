"""The twin GPU's NVML-like surface: clocks, locks, latency of a change, power cap, energy."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from throttllem.backend.twin.engine_profile import engine_profile
from throttllem.backend.twin.errors import (
    NVML_ERROR_INVALID_ARGUMENT,
    NVML_ERROR_NO_PERMISSION,
    TwinNvmlError,
)
from throttllem.backend.twin.gpu import LOADED_CLOCK_HOLD_S, TwinGpu, TwinGpuGroup
from throttllem.backend.twin.hardware import GpuSpec, default_catalog
from throttllem.backend.twin.iteration import IterationWork, LatencyBreakdown
from throttllem.backend.twin.latency import LatencyModel
from throttllem.backend.twin.power import gpu_power_w
from throttllem.backend.twin.time_source import VirtualTime

CATALOG = default_catalog()
A100 = CATALOG.gpu("A100-SXM4-80GB")
H100 = CATALOG.gpu("H100-SXM5-80GB")
LM_H100 = LatencyModel(H100, CATALOG.model("llama-3-8b"), 1, engine_profile())
DECODE = IterationWork(gen_requests=16, gen_kv_tokens=16 * 800)
PREFILL = IterationWork(ctx_requests=1, ctx_tokens=4096, ctx_attention_pairs=4096 * 4097 // 2)


def decode_at(clock: int) -> LatencyBreakdown:
    return LM_H100.at(DECODE, clock)


def prefill_at(clock: int) -> LatencyBreakdown:
    return LM_H100.at(PREFILL, clock)


def make(spec: GpuSpec = H100, **kw: Any) -> tuple[TwinGpu, VirtualTime]:
    t = VirtualTime()
    return TwinGpu(spec, t, **kw), t


def test_supported_clocks_like_nvml() -> None:
    gpu, _ = make(A100)
    clocks = gpu.supported_clocks_mhz()
    assert clocks[0] == 1410 and clocks[-1] == 210 and len(clocks) == 81
    assert clocks == sorted(clocks, reverse=True)
    assert gpu.max_sm_clock_mhz() == gpu.default_sm_clock_mhz() == 1410


def test_clock_idle_loaded_and_locked() -> None:
    gpu, t = make()
    assert gpu.sm_clock_mhz() == H100.min_sm_clock_mhz  # idle, unlocked
    it = gpu.run_iteration(decode_at, 0.0)
    assert it.sm_clock_mhz == 1980
    t.advance_to(it.end_s)
    assert gpu.sm_clock_mhz() == 1980  # loaded
    gpu.set_locked_clocks(1005, 1200)
    t.advance_to(it.end_s + 0.02)
    it2 = gpu.run_iteration(decode_at, t.now_s())
    assert it2.sm_clock_mhz == 1200  # a loaded GPU runs at the top of the locked range
    t.advance_to(it2.end_s + 10.0)
    assert gpu.sm_clock_mhz() == 1005  # idle but locked: the bottom of the range
    gpu.reset_locked_clocks()
    t.advance_to(t.now_s() + 0.02)
    assert gpu.locked_clocks_mhz() is None
    assert gpu.sm_clock_mhz() == H100.min_sm_clock_mhz


def test_clock_change_takes_effect_after_the_latency() -> None:
    gpu, t = make(clock_change_latency_ms=10.0)
    gpu.set_locked_clocks(900, 900)
    assert gpu.locked_clocks_mhz() is None  # not yet
    early = gpu.run_iteration(decode_at, 0.005)
    assert early.sm_clock_mhz == 1980
    late = gpu.run_iteration(decode_at, max(early.end_s, 0.0101))
    assert late.sm_clock_mhz == 900
    t.advance_to(0.011)
    assert gpu.locked_clocks_mhz() == (900, 900)


def test_a_change_that_takes_effect_mid_iteration_applies_to_the_rest_of_its_work() -> None:
    """A long prefill does not run to its end at the clock it started at: DVFS does not wait
    for kernels. The work done before the change ran at the old clock, the rest at the new."""
    low = make(clock_change_latency_ms=0.0)[0]
    low.set_locked_clocks(600, 600)
    high = make(clock_change_latency_ms=0.0)[0]
    high.set_locked_clocks(1800, 1800)  # power-capped below 1800 for a prefill: as it would be
    slow, fast = low.run_iteration(prefill_at, 0.0), high.run_iteration(prefill_at, 0.0)
    slow_s, fast_s = slow.end_s - slow.start_s, fast.end_s - fast.start_s
    assert slow_s > 0.05  # long enough for a change 10 ms in to matter
    gpu, t = make(clock_change_latency_ms=10.0)
    gpu.set_locked_clocks(600, 600)
    t.advance_to(0.02)
    gpu.set_locked_clocks(1800, 1800)  # in force at 0.03 s
    it = gpu.run_iteration(prefill_at, 0.02)
    assert it.sm_clock_mhz == 600  # the clock it started at
    expected_s = 0.010 + (1.0 - 0.010 / slow_s) * fast_s
    assert it.end_s - it.start_s == pytest.approx(expected_s, rel=1e-9)
    assert slow.power_w < it.power_w < fast.power_w  # a time-weighted mean of the two


def test_a_later_request_supersedes_a_pending_one() -> None:
    gpu, t = make(clock_change_latency_ms=10.0)
    gpu.set_locked_clocks(600, 600)
    t.advance_to(0.004)
    gpu.set_locked_clocks(1200, 1200)
    t.advance_to(0.012)
    assert gpu.locked_clocks_mhz() == (600, 600)
    t.advance_to(0.015)
    assert gpu.locked_clocks_mhz() == (1200, 1200)


def test_nvml_errors() -> None:
    gpu, _ = make(privileged=False)
    calls: list[Callable[[], None]] = [
        lambda: gpu.set_locked_clocks(900, 900),
        gpu.reset_locked_clocks,
    ]
    for call in calls:
        with pytest.raises(TwinNvmlError) as e:
            call()
        assert e.value.code == NVML_ERROR_NO_PERMISSION
    assert gpu.locked_clocks_mhz() is None  # reading needs no privilege
    gpu, _ = make()
    for lo, hi in ((1200, 900), (100, 900), (900, 2500)):
        with pytest.raises(TwinNvmlError) as e:
            gpu.set_locked_clocks(lo, hi)
        assert e.value.code == NVML_ERROR_INVALID_ARGUMENT
    with pytest.raises(TwinNvmlError) as e:
        gpu.set_power_limit_mw(50_000)
    assert e.value.code == NVML_ERROR_INVALID_ARGUMENT


def test_rounding_to_the_nearest_supported_clock() -> None:
    gpu, _t = make(A100, clock_change_latency_ms=0.0)
    assert gpu.round_clock_mhz(1000) == 1005  # steps 990, 1005: 1005 is nearer
    assert gpu.round_clock_mhz(996) == 990
    assert gpu.round_clock_mhz(997.5) == 990  # a tie goes to the lower clock
    assert gpu.round_clock_mhz(1410) == 1410 and gpu.round_clock_mhz(210) == 210
    gpu.set_locked_clocks(1000, 1001)
    assert gpu.locked_clocks_mhz() == (1005, 1005)
    for clock in gpu.supported_clocks_mhz():
        assert gpu.round_clock_mhz(clock) == clock


def test_energy_integrates_idle_gaps_and_iterations() -> None:
    gpu, _ = make()
    gpu.idle_until(10.0)
    assert gpu.total_energy_mj() == pytest.approx(H100.idle_power_w * 10.0 * 1000, abs=1.0)
    it = gpu.run_iteration(decode_at, 20.0)  # idle from 10 s to 20 s first
    expected_mj = H100.idle_power_w * 20.0 * 1000 + it.power_w * (it.end_s - it.start_s) * 1000
    assert gpu.total_energy_mj() == pytest.approx(expected_mj, abs=1.0)
    assert gpu.power_usage_mw() == round(it.power_w * 1000)
    before = gpu.total_energy_mj()
    gpu.idle_until(it.end_s + 1.0)
    # The clock is held LOADED_CLOCK_HOLD_S after the last kernel, then drops to idle.
    held_w = gpu_power_w(H100, 1980, 0.0, 0.0, busy=False)
    expected = (held_w * LOADED_CLOCK_HOLD_S + H100.idle_power_w * (1 - LOADED_CLOCK_HOLD_S)) * 1e3
    assert gpu.total_energy_mj() - before == pytest.approx(expected, abs=1.0)
    gpu.idle_until(5.0)  # the past is already accounted: no-op
    assert gpu.total_energy_mj() - before == pytest.approx(expected, abs=1.0)


def test_idle_gpu_locked_high_uses_more_energy_than_unlocked() -> None:
    free, _ = make(clock_change_latency_ms=0.0)
    locked, _ = make(clock_change_latency_ms=0.0)
    locked.set_locked_clocks(1980, 1980)
    free.idle_until(60.0)
    locked.idle_until(60.0)
    assert locked.total_energy_mj() > free.total_energy_mj() * 1.05


def test_power_cap_lowers_the_clock_step_by_step_and_recovers() -> None:
    gpu, _ = make(clock_change_latency_ms=0.0)
    gpu.set_power_limit_mw(400_000)
    assert gpu.enforced_power_limit_mw() == 400_000
    t = 0.0
    first = gpu.run_iteration(prefill_at, t)
    # One iteration is long enough for the controller to find a clock under the limit.
    assert first.sm_clock_mhz < 1980
    assert (
        gpu_power_w(
            H100,
            first.sm_clock_mhz,
            first.breakdown.sm_activity,
            first.breakdown.dram_activity,
            busy=True,
        )
        <= 400.0
    )
    assert (1980 - first.sm_clock_mhz) % H100.clock_step_mhz == 0
    t = first.end_s
    capped = first.sm_clock_mhz
    gpu.set_power_limit_mw(700_000)
    clocks = []
    for _ in range(5):
        it = gpu.run_iteration(decode_at, t)
        clocks.append(it.sm_clock_mhz)
        t = it.end_s
    # Back under a high limit the board raises its clock one step per iteration.
    assert clocks == [capped + H100.clock_step_mhz * (i + 1) for i in range(5)]


def test_uncapped_prefill_on_h100_settles_under_700_w() -> None:
    gpu, _ = make()
    t = 0.0
    for _ in range(20):
        it = gpu.run_iteration(prefill_at, t)
        t = it.end_s
    assert 1200 < it.sm_clock_mhz < 1980
    assert it.power_w <= 700.0


def test_group_is_paced_by_its_slowest_gpu_and_sums_energy() -> None:
    t = VirtualTime()
    gpus = [TwinGpu(H100, t, index=i, clock_change_latency_ms=0.0) for i in range(4)]
    group = TwinGpuGroup(gpus)
    gpus[2].set_locked_clocks(900, 900)
    it = group.run_iteration(decode_at, 0.0)
    assert it.sm_clock_mhz == 900
    assert it.end_s - it.start_s == pytest.approx(decode_at(900).total_ms / 1000)
    assert group.total_energy_mj() == sum(g.total_energy_mj() for g in gpus)
    group.idle_until(it.end_s + 1.0)
    assert all(g.total_energy_mj() > 0 for g in gpus)


def test_deterministic() -> None:
    def run() -> tuple[int, list[int]]:
        gpu, _ = make(clock_change_latency_ms=5.0)
        clocks, t = [], 0.0
        for i in range(50):
            if i == 10:
                gpu.set_locked_clocks(1200, 1500)
            work = prefill_at if i % 7 == 0 else decode_at
            it = gpu.run_iteration(work, t + 0.001)
            clocks.append(it.sm_clock_mhz)
            t = it.end_s
        return gpu.total_energy_mj(), clocks

    assert run() == run()


def test_controller_thread_and_engine_thread_together() -> None:
    gpu, _ = make(clock_change_latency_ms=0.0)
    stop = threading.Event()
    errors: list[BaseException] = []

    def controller() -> None:
        try:
            clocks = gpu.supported_clocks_mhz()
            i = 0
            while not stop.is_set():
                gpu.set_locked_clocks(clocks[-1], clocks[i % len(clocks)])
                gpu.sm_clock_mhz()
                gpu.total_energy_mj()
                i += 1
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    th = threading.Thread(target=controller)
    th.start()
    t = 0.0
    try:
        for _ in range(2000):
            it = gpu.run_iteration(decode_at, t)
            assert H100.min_sm_clock_mhz <= it.sm_clock_mhz <= 1980
            t = it.end_s
    finally:
        stop.set()
        th.join()
    assert not errors


def test_power_cap_ceiling_is_released_after_an_idle_gap() -> None:
    gpu, _ = make()
    it = gpu.run_iteration(prefill_at, 0.0)
    assert it.sm_clock_mhz < 1980  # capped at 700 W
    again = gpu.run_iteration(decode_at, it.end_s + 1.0)
    assert again.sm_clock_mhz == 1980
