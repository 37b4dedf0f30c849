"""The twin driver: the same ClockDriver behaviour over in-process twin GPUs."""

from __future__ import annotations

import logging

import pynvml
import pytest

from throttllem.backend.twin.errors import (
    NVML_ERROR_INVALID_ARGUMENT,
    NVML_ERROR_NO_PERMISSION,
    NVML_ERROR_NOT_SUPPORTED,
    TwinNvmlError,
)
from throttllem.backend.twin.gpu import TwinGpu
from throttllem.backend.twin.hardware import GpuSpec, default_catalog
from throttllem.backend.twin.time_source import VirtualTime
from throttllem.controller.gpu.driver import ClockDriver, WriteOutcome
from throttllem.controller.gpu.errors import (
    GpuError,
    GpuLost,
    InvalidArgument,
    NoPermission,
    NotSupported,
    translate,
)
from throttllem.controller.gpu.twin_driver import TwinDevices, TwinDriver

CHANGE_S = 0.01  # the twin's clock-change latency below


@pytest.fixture
def spec() -> GpuSpec:
    return default_catalog().gpu("A100-SXM4-40GB")


class CountingTwinGpu(TwinGpu):
    """A twin GPU that counts the lock writes reaching it."""

    writes = 0

    def set_locked_clocks(self, min_mhz: int, max_mhz: int) -> None:
        self.writes += 1
        super().set_locked_clocks(min_mhz, max_mhz)

    def reset_locked_clocks(self) -> None:
        self.writes += 1
        super().reset_locked_clocks()


def make_gpus(
    spec: GpuSpec, time: VirtualTime, n: int = 2, *, privileged: bool = True
) -> list[CountingTwinGpu]:
    return [
        CountingTwinGpu(
            spec, time, index=i, clock_change_latency_ms=CHANGE_S * 1000, privileged=privileged
        )
        for i in range(n)
    ]


def test_locks_reach_the_twin_gpus(spec: GpuSpec) -> None:
    time = VirtualTime()
    gpus = make_gpus(spec, time)
    with TwinDriver(gpus) as driver:
        assert isinstance(driver, ClockDriver)
        assert driver.gpu_indices() == (0, 1)
        assert driver.supported_clocks_mhz(0) == tuple(spec.supported_clocks_mhz())
        assert driver.set_locked_clocks([0, 1], 900, 1005) is WriteOutcome.APPLIED
        time.advance_to(2 * CHANGE_S)
        assert [g.locked_clocks_mhz() for g in gpus] == [(900, 1005), (900, 1005)]
        assert driver.reset_locked_clocks([1]) is WriteOutcome.APPLIED
        time.advance_to(4 * CHANGE_S)
        assert gpus[1].locked_clocks_mhz() is None
        assert driver.sm_clock_mhz(0) == gpus[0].sm_clock_mhz()
        assert driver.enforced_power_limit_mw(0) == round(spec.power_limit_w * 1000)
        assert driver.power_usage_mw(0) > 0
        assert driver.total_energy_mj(0) >= 0


def test_unchanged_writes_do_not_reach_the_twin(spec: GpuSpec) -> None:
    gpus = make_gpus(spec, VirtualTime(), 1)
    with TwinDriver(gpus[0]) as driver:  # a single GPU is accepted as is
        driver.set_locked_clocks([0], 1005, 1005)
        assert driver.set_locked_clocks([0], 1005, 1005) is WriteOutcome.UNCHANGED
        assert gpus[0].writes == 1
        driver.reset_locked_clocks([0])
        assert driver.reset_locked_clocks([0]) is WriteOutcome.UNCHANGED
        assert gpus[0].writes == 2


def test_close_resets_the_locks_it_applied(spec: GpuSpec) -> None:
    time = VirtualTime()
    gpus = make_gpus(spec, time)
    driver = TwinDriver(gpus)
    driver.set_locked_clocks([1], 600, 600)
    driver.close()
    time.advance_to(2 * CHANGE_S)
    assert gpus[1].locked_clocks_mhz() is None
    assert gpus[0].writes == 0  # never locked, not touched


def test_unprivileged_twin_gives_observe_only_warned_once(
    spec: GpuSpec, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    gpus = make_gpus(spec, VirtualTime(), privileged=False)
    with TwinDriver(gpus) as driver:
        assert driver.set_locked_clocks([0], 900, 900) is WriteOutcome.REFUSED
        assert driver.set_locked_clocks([0, 1], 705, 705) is WriteOutcome.REFUSED
        assert not driver.can_actuate()
        assert driver.sm_clock_mhz(1) > 0
    assert len([r for r in caplog.records if "observe-only" in r.getMessage()]) == 1


def test_twin_errors_are_translated_with_their_nvml_codes(spec: GpuSpec) -> None:
    devices = TwinDevices(make_gpus(spec, VirtualTime(), 1))
    with pytest.raises(InvalidArgument) as info:
        devices.set_locked_clocks([0], 1005, 900)  # past the guard: the twin itself refuses
    assert info.value.code == NVML_ERROR_INVALID_ARGUMENT
    assert isinstance(info.value.__cause__, TwinNvmlError)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (TwinNvmlError(NVML_ERROR_NO_PERMISSION, "x"), NoPermission),
        (TwinNvmlError(NVML_ERROR_NOT_SUPPORTED, "x"), NotSupported),
        (TwinNvmlError(15, "x"), GpuLost),
        (pynvml.NVMLError(pynvml.NVML_ERROR_NO_PERMISSION), NoPermission),
        (pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST), GpuLost),
        (RuntimeError("boom"), GpuError),
    ],
)
def test_one_translation_for_both_vendors(error: Exception, expected: type[GpuError]) -> None:
    translated = translate(error, "GPU 3: lock")
    assert type(translated) is expected
    assert str(translated).startswith("GPU 3: lock: ")


def test_duplicate_or_missing_twin_gpus_are_refused(spec: GpuSpec) -> None:
    time = VirtualTime()
    with pytest.raises(InvalidArgument, match="share index 0"):
        TwinDriver([TwinGpu(spec, time, index=0), TwinGpu(spec, time, index=0)])
    with pytest.raises(InvalidArgument):
        TwinDriver([])


# ---- close after a failed write ----------------------------------------------------------------


class FailingTwinGpu(CountingTwinGpu):
    """A twin GPU that can be made to fail its lock or reset calls (NVML "GPU is lost")."""

    fail_set: Exception | None = None
    fail_reset: Exception | None = None

    def set_locked_clocks(self, min_mhz: int, max_mhz: int) -> None:
        if self.fail_set is not None:
            raise self.fail_set
        super().set_locked_clocks(min_mhz, max_mhz)

    def reset_locked_clocks(self) -> None:
        if self.fail_reset is not None:
            raise self.fail_reset
        super().reset_locked_clocks()


def failing_gpus(spec: GpuSpec, time: VirtualTime, n: int = 2) -> list[FailingTwinGpu]:
    return [FailingTwinGpu(spec, time, index=i, clock_change_latency_ms=0.0) for i in range(n)]


GPU_LOST = TwinNvmlError(15, "GPU is lost")


def test_close_resets_the_gpus_a_half_failed_write_left_locked(spec: GpuSpec) -> None:
    gpus = failing_gpus(spec, VirtualTime())
    driver = TwinDriver(gpus)
    gpus[1].fail_set = GPU_LOST
    with pytest.raises(GpuLost):
        driver.set_locked_clocks([0, 1], 900, 900)  # GPU 0 locked, then GPU 1 lost
    assert gpus[0].locked_clocks_mhz() == (900, 900)
    assert driver.locked_clocks_mhz(0) is None  # unknown to the driver
    driver.close()
    assert gpus[0].locked_clocks_mhz() is None


def test_close_resets_every_gpu_it_tried_even_when_one_reset_fails(
    spec: GpuSpec, caplog: pytest.LogCaptureFixture
) -> None:
    gpus = failing_gpus(spec, VirtualTime(), 3)
    driver = TwinDriver(gpus)
    assert driver.set_locked_clocks([0, 1, 2], 1005, 1005) is WriteOutcome.APPLIED
    gpus[1].fail_set = GPU_LOST
    gpus[1].fail_reset = GPU_LOST
    with pytest.raises(GpuLost):
        driver.set_locked_clocks([0, 1, 2], 600, 600)  # GPU 0 at 600, GPU 1 lost, GPU 2 at 1005
    caplog.set_level(logging.ERROR)
    driver.close()  # never raises
    assert gpus[0].locked_clocks_mhz() is None
    assert gpus[2].locked_clocks_mhz() is None  # the lost GPU before it does not stop it
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "GPU 1" in errors[0] and "lost" in errors[0]
    driver.close()  # idempotent: nothing more written
    assert gpus[0].writes == 3


def test_close_leaves_gpus_whose_reset_was_confirmed(spec: GpuSpec) -> None:
    gpus = failing_gpus(spec, VirtualTime())
    driver = TwinDriver(gpus)
    driver.set_locked_clocks([0, 1], 900, 900)
    driver.reset_locked_clocks([0, 1])
    gpus[1].fail_set = GPU_LOST
    with pytest.raises(GpuLost):
        driver.set_locked_clocks([1], 600, 600)
    driver.close()
    assert [g.writes for g in gpus] == [2, 3]  # GPU 0 untouched; GPU 1 reset once more


def test_close_after_a_refused_write_writes_nothing(spec: GpuSpec) -> None:
    gpus = [
        CountingTwinGpu(spec, VirtualTime(), index=i, privileged=False, clock_change_latency_ms=0)
        for i in (0, 1)
    ]
    driver = TwinDriver(gpus)
    assert driver.set_locked_clocks([0, 1], 900, 900) is WriteOutcome.REFUSED
    driver.close()
    assert [g.writes for g in gpus] == [1, 0]  # the refused call only: no reset on close
