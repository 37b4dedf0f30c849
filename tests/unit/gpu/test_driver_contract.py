"""One behaviour, every backend: the NVML driver (real pynvml over the C double), the twin driver,
and the clock daemon's client (over a daemon driving the twin) answer the same calls the same
way, so policy code cannot tell which one it has."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from gpu_test_support import FakeNvml, short_socket_dir

from throttllem.backend.twin.gpu import TwinGpu
from throttllem.backend.twin.hardware import default_catalog
from throttllem.backend.twin.time_source import VirtualTime
from throttllem.controller.gpu.clockd import ClockDaemon
from throttllem.controller.gpu.clockd_client import ClockdClient
from throttllem.controller.gpu.driver import ClockDriver, WriteOutcome
from throttllem.controller.gpu.errors import InvalidArgument
from throttllem.controller.gpu.nvml_driver import NvmlDriver
from throttllem.controller.gpu.twin_driver import TwinDriver

Lock = tuple[int, int] | None


@dataclass
class Backend:
    driver: ClockDriver
    hardware_lock: Callable[[int], Lock]  # what the GPU (or double) itself holds


def _twin_gpus() -> list[TwinGpu]:
    spec = default_catalog().gpu("A100-SXM4-40GB")
    return [TwinGpu(spec, VirtualTime(), index=i, clock_change_latency_ms=0.0) for i in (0, 1)]


@pytest.fixture(params=["nvml", "twin", "clockd"])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    if request.param == "nvml":
        fake: FakeNvml = request.getfixturevalue("fake_nvml")
        fake.configure(gpu_count=2)
        with NvmlDriver.open() as nvml:
            yield Backend(nvml, lambda gpu: fake.locks().get(gpu))
    elif request.param == "twin":
        gpus = _twin_gpus()
        with TwinDriver(gpus) as twin:
            yield Backend(twin, lambda gpu: gpus[gpu].locked_clocks_mhz())
    else:
        gpus = _twin_gpus()
        with short_socket_dir() as d, TwinDriver(gpus) as twin:
            daemon = ClockDaemon(twin, d / "clockd.sock")
            ready = threading.Event()
            thread = threading.Thread(target=daemon.serve_forever, args=(ready.set,))
            thread.start()
            try:
                assert ready.wait(10)
                with ClockdClient.connect(daemon.socket_path) as client:
                    yield Backend(client, lambda gpu: gpus[gpu].locked_clocks_mhz())
            finally:
                daemon.stop()
                thread.join(10)


def test_is_a_clock_driver_with_a100_clocks(backend: Backend) -> None:
    d = backend.driver
    assert isinstance(d, ClockDriver)
    assert d.gpu_indices() == (0, 1)
    clocks = d.supported_clocks_mhz(0)
    assert (clocks[0], clocks[-1], len(clocks)) == (1410, 210, 81)
    assert d.can_actuate()


def test_set_reset_and_skip_unchanged(backend: Backend) -> None:
    d = backend.driver
    writes_before = d.set_latency().count  # the NVML driver's reset at start counts
    assert d.set_locked_clocks([0, 1], 900, 1005) is WriteOutcome.APPLIED
    assert backend.hardware_lock(1) == (900, 1005)
    assert d.locked_clocks_mhz(1) == (900, 1005)
    assert d.set_locked_clocks([1, 0], 900, 1005) is WriteOutcome.UNCHANGED
    assert d.reset_locked_clocks([0]) is WriteOutcome.APPLIED
    assert backend.hardware_lock(0) is None
    assert d.locked_clocks_mhz(0) is None
    assert d.set_latency().count == writes_before + 2


def test_close_resets_what_was_locked(backend: Backend) -> None:
    backend.driver.set_locked_clocks([1], 600, 600)
    backend.driver.close()
    assert backend.hardware_lock(1) is None


@pytest.mark.parametrize(("gpus", "lo", "hi"), [([0], 1005, 900), ([0], 105, 900), ([2], 900, 900)])
def test_bad_arguments(backend: Backend, gpus: list[int], lo: int, hi: int) -> None:
    with pytest.raises(InvalidArgument):
        backend.driver.set_locked_clocks(gpus, lo, hi)
    assert backend.hardware_lock(0) is None


def test_reads(backend: Backend) -> None:
    d = backend.driver
    assert 210 <= d.sm_clock_mhz(0) <= 1410
    assert d.power_usage_mw(0) > 0
    assert d.enforced_power_limit_mw(0) >= 100_000
    assert d.total_energy_mj(1) >= 0
    with pytest.raises(InvalidArgument):
        d.power_usage_mw(5)
