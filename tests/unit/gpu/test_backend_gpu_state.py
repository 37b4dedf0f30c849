"""The backend's read-only GPU state (engines/gpu_state.py) through the real pynvml, against the
C test double of libnvidia-ml: what a TensorRT-LLM instance exports as throttllem_gpu_*."""

from __future__ import annotations

import logging

import pytest
from gpu_test_support import FakeNvml, wait_until

from throttllem.backend.engines.gpu_state import NvmlGpuState

A100_CLOCKS = tuple(range(1410, 209, -15))
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_LIBRARY_NOT_FOUND = 12


def test_reads_clock_power_and_energy_and_never_writes(fake_nvml: FakeNvml) -> None:
    fake_nvml.configure(gpu_count=4)
    fake_nvml.seed_locks({2: (1005, 1005)})  # what a controller left on GPU 2
    state = NvmlGpuState([0, 2])
    try:
        first = state.readings()
        assert [r.index for r in first] == [0, 2]
        assert [r.sm_clock_mhz for r in first] == [1410, 1005]  # the lock shows, read as is
        assert all(r.sm_clock_mhz in A100_CLOCKS for r in first)
        assert first[0].power_mw > first[1].power_mw > 0
        wait_until(
            lambda: state.readings()[0].total_energy_mj > first[0].total_energy_mj,
            5.0,
            "the energy counter to grow",
        )
        assert fake_nvml.locks() == {2: (1005, 1005)}  # untouched
        assert fake_nvml.writes(0) == fake_nvml.writes(2) == 0
    finally:
        state.close()
    assert fake_nvml.init_count() == 0 and state.readings() == []


def test_a_lost_gpu_is_logged_once_and_left_out(
    fake_nvml: FakeNvml, caplog: pytest.LogCaptureFixture
) -> None:
    fake_nvml.configure(gpu_count=2)
    state = NvmlGpuState([0, 1])
    try:
        assert len(state.readings()) == 2
        fake_nvml.fail(f"nvmlDeviceGetTotalEnergyConsumption@1={NVML_ERROR_GPU_IS_LOST}")
        with caplog.at_level(logging.WARNING):
            for _ in range(3):
                assert [r.index for r in state.readings()] == [0]
        lost = [r for r in caplog.records if "GPU 1: NVML read failed" in r.getMessage()]
        assert len(lost) == 1 and "GPU is lost" in lost[0].getMessage()
    finally:
        state.close()


def test_nvml_init_failure_exports_nothing(
    fake_nvml: FakeNvml, caplog: pytest.LogCaptureFixture
) -> None:
    fake_nvml.fail(f"nvmlInitWithFlags={NVML_ERROR_LIBRARY_NOT_FOUND}")
    state = NvmlGpuState([0])
    with caplog.at_level(logging.WARNING):
        assert state.readings() == [] and state.readings() == []
    assert state.disabled
    assert sum("NVML initialisation failed" in r.getMessage() for r in caplog.records) == 1
    state.close()
    assert fake_nvml.init_count() == 0


def test_a_gpu_nvml_does_not_see_is_left_out(fake_nvml: FakeNvml) -> None:
    fake_nvml.configure(gpu_count=1)
    state = NvmlGpuState([0, 5])
    try:
        assert [r.index for r in state.readings()] == [0]
    finally:
        state.close()
