"""The NVML driver through the real pynvml, against the C test double of libnvidia-ml."""

from __future__ import annotations

import logging

import pynvml
import pytest
from gpu_test_support import FakeNvml

from throttllem.controller.gpu.driver import ClockDriver, WriteOutcome
from throttllem.controller.gpu.errors import (
    GpuError,
    GpuLost,
    InvalidArgument,
    LibraryNotFound,
    NoPermission,
    NotSupported,
)
from throttllem.controller.gpu.nvml_driver import NvmlDriver

A100_CLOCKS = tuple(range(1410, 209, -15))


def test_open_reads_gpus_and_clocks_at_the_highest_memory_clock(fake_nvml: FakeNvml) -> None:
    fake_nvml.configure(gpu_count=2, mem_clocks="405,1215")  # unsorted: the driver takes the max
    with NvmlDriver.open() as driver:
        assert isinstance(driver, ClockDriver)
        assert driver.gpu_indices() == (0, 1)
        assert driver.supported_clocks_mhz(1) == A100_CLOCKS
        assert driver.can_actuate()


def test_open_a_subset_and_reject_unknown_gpus(fake_nvml: FakeNvml) -> None:
    fake_nvml.configure(gpu_count=4)
    with NvmlDriver.open([2]) as driver:
        assert driver.gpu_indices() == (2,)
        with pytest.raises(InvalidArgument):
            driver.sm_clock_mhz(0)
    with pytest.raises(InvalidArgument, match="no GPU 4"):
        NvmlDriver.open([4])
    assert fake_nvml.init_count() == 0  # the failed open shut NVML down again


def test_set_lock_read_back_and_reset(fake_nvml: FakeNvml) -> None:
    fake_nvml.configure(gpu_count=2)
    with NvmlDriver.open() as driver:
        assert driver.set_locked_clocks([0, 1], 900, 1005) is WriteOutcome.APPLIED
        assert fake_nvml.locks() == {0: (900, 1005), 1: (900, 1005)}
        assert driver.locked_clocks_mhz(1) == (900, 1005)
        assert driver.sm_clock_mhz(0) == 1005  # the double runs loaded: at the lock's top
        low_power_mw = driver.power_usage_mw(0)
        assert driver.reset_locked_clocks([1]) is WriteOutcome.APPLIED
        assert fake_nvml.locks()[1] is None
        assert driver.sm_clock_mhz(1) == 1410
        assert driver.power_usage_mw(1) > low_power_mw
        assert driver.enforced_power_limit_mw(0) == 400_000
        first_mj = driver.total_energy_mj(0)
        assert driver.total_energy_mj(0) >= first_mj


def test_writes_are_skipped_when_nothing_changes(fake_nvml: FakeNvml) -> None:
    with NvmlDriver.open() as driver:
        start_writes = fake_nvml.writes(0)  # the reset at start
        assert start_writes == 1
        assert driver.reset_locked_clocks([0]) is WriteOutcome.UNCHANGED
        assert driver.set_locked_clocks([0], 1005, 1005) is WriteOutcome.APPLIED
        assert driver.set_locked_clocks([0], 1005, 1005) is WriteOutcome.UNCHANGED
        assert fake_nvml.writes(0) == start_writes + 1
        assert driver.set_locked_clocks([0], 1005, 1110) is WriteOutcome.APPLIED
        assert driver.reset_locked_clocks([0]) is WriteOutcome.APPLIED
        assert driver.reset_locked_clocks([0]) is WriteOutcome.UNCHANGED
        assert fake_nvml.writes(0) == start_writes + 3


def test_open_resets_locks_a_crashed_run_left(fake_nvml: FakeNvml) -> None:
    fake_nvml.configure(gpu_count=2)
    fake_nvml.seed_locks({0: (600, 600), 1: (210, 1410)})
    with NvmlDriver.open():
        assert fake_nvml.locks() == {0: None, 1: None}


def test_close_resets_what_the_driver_locked_and_shuts_nvml_down(fake_nvml: FakeNvml) -> None:
    driver = NvmlDriver.open()
    driver.set_locked_clocks([0], 800, 800)
    assert fake_nvml.init_count() == 1
    driver.close()
    driver.close()  # idempotent
    assert fake_nvml.locks()[0] is None
    assert fake_nvml.init_count() == 0
    with pytest.raises(GpuError, match="closed"):
        driver.set_locked_clocks([0], 800, 800)


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (pynvml.NVML_ERROR_INVALID_ARGUMENT, InvalidArgument),
        (pynvml.NVML_ERROR_NOT_SUPPORTED, NotSupported),
        (pynvml.NVML_ERROR_NO_PERMISSION, NoPermission),
        (pynvml.NVML_ERROR_GPU_IS_LOST, GpuLost),
        (pynvml.NVML_ERROR_RESET_REQUIRED, GpuLost),
        (pynvml.NVML_ERROR_DRIVER_NOT_LOADED, LibraryNotFound),
        (pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, LibraryNotFound),
        (pynvml.NVML_ERROR_UNKNOWN, GpuError),
    ],
)
@pytest.mark.parametrize(
    ("symbol", "call"),
    [
        ("nvmlDeviceGetPowerUsage", lambda d: d.power_usage_mw(0)),
        ("nvmlDeviceGetTotalEnergyConsumption", lambda d: d.total_energy_mj(0)),
        ("nvmlDeviceGetClockInfo", lambda d: d.sm_clock_mhz(0)),
        ("nvmlDeviceGetEnforcedPowerLimit", lambda d: d.enforced_power_limit_mw(0)),
    ],
)
def test_every_nvml_error_code_is_translated_on_reads(
    fake_nvml: FakeNvml, code: int, expected: type[GpuError], symbol: str, call: object
) -> None:
    with NvmlDriver.open() as driver:
        fake_nvml.fail(f"{symbol}={code}")
        with pytest.raises(expected) as info:
            call(driver)  # type: ignore[operator]
        fake_nvml.fail("")
    assert type(info.value) is expected
    assert info.value.code == code
    assert isinstance(info.value.__cause__, pynvml.NVMLError)  # raised `from` the NVML error
    assert "GPU 0" in str(info.value)


@pytest.mark.parametrize(
    ("code", "expected"),
    [(9, LibraryNotFound), (12, LibraryNotFound), (15, GpuLost), (3, NotSupported)],
)
def test_errors_while_opening_are_translated_and_leave_nvml_shut(
    fake_nvml: FakeNvml, code: int, expected: type[GpuError]
) -> None:
    symbol = "nvmlInitWithFlags" if code in (9, 12) else "nvmlDeviceGetSupportedMemoryClocks"
    fake_nvml.fail(f"{symbol}={code}")
    with pytest.raises(expected):
        NvmlDriver.open()
    assert fake_nvml.init_count() == 0


def test_gpu_lost_during_a_write_raises_and_forgets_the_half_written_locks(
    fake_nvml: FakeNvml,
) -> None:
    fake_nvml.configure(gpu_count=2)
    with NvmlDriver.open() as driver:
        fake_nvml.fail("nvmlDeviceSetGpuLockedClocks@1=15")
        with pytest.raises(GpuLost):
            driver.set_locked_clocks([0, 1], 705, 705)
        assert fake_nvml.locks()[0] == (705, 705)  # GPU 0 changed before GPU 1 failed
        fake_nvml.fail("")
        writes_0 = fake_nvml.writes(0)
        # Not skipped although GPU 0 already has this lock: after a failure nothing is assumed.
        assert driver.set_locked_clocks([0, 1], 705, 705) is WriteOutcome.APPLIED
        assert fake_nvml.writes(0) == writes_0 + 1
        assert fake_nvml.locks() == {0: (705, 705), 1: (705, 705)}


def test_close_after_a_gpu_is_lost_resets_the_gpus_the_failed_write_locked(
    fake_nvml: FakeNvml, caplog: pytest.LogCaptureFixture
) -> None:
    """The failed write leaves GPU 0 locked and unknown to the driver: closing resets it, and
    the lost GPU's failing reset is logged, not raised."""
    fake_nvml.configure(gpu_count=2)
    driver = NvmlDriver.open()
    fake_nvml.fail("nvmlDeviceSetGpuLockedClocks@1=15,nvmlDeviceResetGpuLockedClocks@1=15")
    with pytest.raises(GpuLost):
        driver.set_locked_clocks([0, 1], 705, 705)
    assert fake_nvml.locks()[0] == (705, 705)
    driver.close()
    assert fake_nvml.locks()[0] is None
    assert fake_nvml.init_count() == 0  # NVML released all the same
    assert any("GPU 1" in r.getMessage() for r in caplog.records if r.levelname == "ERROR")


@pytest.mark.parametrize(
    ("gpus", "lo", "hi", "match"),
    [
        ([0], 1005, 900, "min clock"),
        ([0], 100, 900, "outside"),
        ([0], 900, 1500, "outside"),
        ([3], 900, 900, "no GPU 3"),
    ],
)
def test_bad_arguments_are_refused_before_anything_is_written(
    fake_nvml: FakeNvml, gpus: list[int], lo: int, hi: int, match: str
) -> None:
    with NvmlDriver.open() as driver:
        writes = fake_nvml.writes(0)
        with pytest.raises(InvalidArgument, match=match):
            driver.set_locked_clocks(gpus, lo, hi)
        assert fake_nvml.writes(0) == writes


def _permission_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "observe-only" in r.getMessage()]


def test_no_permission_at_start_means_observe_only_warned_once(
    fake_nvml: FakeNvml, caplog: pytest.LogCaptureFixture
) -> None:
    fake_nvml.configure(privileged=0)
    fake_nvml.seed_locks({0: (1200, 1200)})
    caplog.set_level(logging.WARNING)
    with NvmlDriver.open() as driver:
        assert not driver.can_actuate()
        assert driver.observe_only_reason is not None
        assert driver.set_locked_clocks([0], 900, 900) is WriteOutcome.REFUSED
        assert driver.reset_locked_clocks([0]) is WriteOutcome.REFUSED
        assert driver.sm_clock_mhz(0) == 1200  # reads still work
        assert driver.refused_writes == 3  # the probe at start and the two writes
    assert fake_nvml.locks() == {0: (1200, 1200)}  # nothing written, not even on close
    warnings = _permission_warnings(caplog)
    assert len(warnings) == 1
    text = warnings[0].getMessage()
    assert "CAP_SYS_ADMIN" in text and "throttllem clockd" in text and "root" in text


def test_permission_lost_later_switches_to_observe_only_once(
    fake_nvml: FakeNvml, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    with NvmlDriver.open() as driver:
        fake_nvml.fail("nvmlDeviceSetGpuLockedClocks=4")
        assert driver.set_locked_clocks([0], 900, 900) is WriteOutcome.REFUSED
        fake_nvml.fail("")  # even once writes would work again, the driver stays observe-only
        assert driver.set_locked_clocks([0], 1005, 1005) is WriteOutcome.REFUSED
        assert not driver.can_actuate()
    assert fake_nvml.locks()[0] is None
    assert len(_permission_warnings(caplog)) == 1


def test_observe_only_by_choice_never_writes_nor_warns(
    fake_nvml: FakeNvml, caplog: pytest.LogCaptureFixture
) -> None:
    fake_nvml.seed_locks({0: (1200, 1200)})
    caplog.set_level(logging.WARNING)
    with NvmlDriver.open(observe_only=True) as driver:
        assert driver.set_locked_clocks([0], 900, 900) is WriteOutcome.REFUSED
    assert fake_nvml.writes(0) == 0
    assert _permission_warnings(caplog) == []


def test_set_latency_is_measured_per_write(fake_nvml: FakeNvml) -> None:
    fake_nvml.configure(set_delay_us=20_000, gpu_count=2)  # 20 ms per GPU, like a real GPU
    with NvmlDriver.open(reset_at_start=False) as driver:
        assert driver.set_latency().count == 0
        driver.set_locked_clocks([0, 1], 900, 900)
        driver.set_locked_clocks([0, 1], 900, 900)  # skipped: not timed
        latency = driver.set_latency()
    assert latency.count == 1
    assert 40.0 <= latency.last_ms < 1000.0  # two GPUs, one NVML call each
    assert latency.mean_ms == latency.max_ms == latency.last_ms
