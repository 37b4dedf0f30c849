"""GPU state metrics (throttllem_gpu_*) through a stand-in pb_utils, and the read-only sources
behind them: the twin's GPUs and NVML through a stand-in pynvml (the real pynvml against the C
test double of libnvidia-ml is in tests/unit/gpu/test_backend_gpu_state.py)."""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest

from throttllem.backend.engines.base import EngineRequest, GpuReading
from throttllem.backend.engines.gpu_state import (
    ControlGpuState,
    NvmlGpuState,
    gpu_state_source,
)
from throttllem.backend.engines.twin import build_twin_engine
from throttllem.backend.params import Parameters
from throttllem.backend.triton_model.gpu_metrics import ENERGY, POWER, SM_CLOCK, GpuMetrics
from throttllem.backend.twin.hardware import default_catalog


class Metric:
    """pb_utils.Metric: a gauge accepts set, a counter only increment (as in Triton)."""

    def __init__(self, kind: str, labels: dict[str, str]) -> None:
        self.kind, self.labels, self.value = kind, labels, 0.0

    def set(self, v: float) -> None:
        assert self.kind == "gauge", "Triton refuses set() on a counter"
        self.value = v

    def increment(self, v: float) -> None:
        assert v >= 0, "a counter only goes up"
        self.value += v


class Family:
    GAUGE, COUNTER, HISTOGRAM = "gauge", "counter", "histogram"
    created: ClassVar[list[Family]] = []

    def __init__(self, name: str, description: str, kind: str) -> None:
        self.name, self.kind = name, kind
        self.metrics: list[Metric] = []
        Family.created.append(self)

    def Metric(self, labels: dict[str, str]) -> Metric:
        m = Metric(self.kind, labels)
        self.metrics.append(m)
        return m


PB_UTILS = SimpleNamespace(MetricFamily=Family)


class ListSource:
    def __init__(self) -> None:
        self.next: list[GpuReading] | Exception = []
        self.closed = False

    def readings(self) -> list[GpuReading]:
        if isinstance(self.next, Exception):
            raise self.next
        return self.next

    def close(self) -> None:
        self.closed = True


def reading(index: int, clock: int, power_mw: int, energy_mj: int) -> GpuReading:
    return GpuReading(index, clock, None, power_mw, energy_mj, 400_000)


def families() -> dict[str, Family]:
    return {f.name: f for f in Family.created}


def series(name: str, gpu: str) -> Metric:
    (m,) = [m for m in families()[name].metrics if m.labels["gpu"] == gpu]
    return m


@pytest.fixture(autouse=True)
def fresh_families() -> None:
    Family.created = []


def test_families_kinds_labels_and_values() -> None:
    source = ListSource()
    metrics = GpuMetrics(PB_UTILS, source, "tensorrt_llm_0_0")
    assert {n: f.kind for n, f in families().items()} == {
        "throttllem_gpu_sm_clock_mhz": "gauge",
        "throttllem_gpu_power_w": "gauge",
        "throttllem_gpu_energy_joules_total": "counter",
    }
    source.next = [reading(0, 1410, 250_500, 7_000_000), reading(3, 210, 60_000, 1_000)]
    metrics.sample()
    assert series(SM_CLOCK, "0").value == 1410.0
    assert series(POWER, "0").value == 250.5
    assert series(ENERGY, "0").value == 7000.0  # the counter starts at the GPU's total
    assert series(SM_CLOCK, "3").value == 210.0 and series(ENERGY, "3").value == 1.0
    for family in families().values():
        assert [m.labels for m in family.metrics] == [
            {"gpu": "0", "model_instance": "tensorrt_llm_0_0"},
            {"gpu": "3", "model_instance": "tensorrt_llm_0_0"},
        ]

    source.next = [reading(0, 1005, 180_000, 7_002_500), reading(3, 210, 60_000, 1_000)]
    metrics.sample()
    assert series(SM_CLOCK, "0").value == 1005.0 and series(POWER, "0").value == 180.0
    assert series(ENERGY, "0").value == pytest.approx(7002.5)
    assert series(ENERGY, "3").value == 1.0
    assert len(families()[SM_CLOCK].metrics) == 2  # series are created once per GPU


def test_energy_total_going_backwards_only_moves_the_base() -> None:
    source = ListSource()
    metrics = GpuMetrics(PB_UTILS, source, "i")
    for total_mj in (5_000, 2_000, 3_500):  # a driver reload between the first two
        source.next = [reading(0, 1410, 1, total_mj)]
        metrics.sample()
    assert series(ENERGY, "0").value == pytest.approx(6.5)  # 5 J, then +1.5 J after the reset


def test_unreadable_gpus_export_nothing_and_errors_do_not_escape(
    caplog: pytest.LogCaptureFixture,
) -> None:
    source = ListSource()
    metrics = GpuMetrics(PB_UTILS, source, "i")
    metrics.sample()  # nothing readable yet
    assert all(not f.metrics for f in families().values())
    source.next = RuntimeError("boom")
    with caplog.at_level(logging.ERROR):
        metrics.sample()
        metrics.sample()
    assert [r.getMessage() for r in caplog.records].count("updating the GPU metrics failed") == 1
    source.next = [reading(1, 1110, 100_000, 0)]
    metrics.sample()
    assert series(SM_CLOCK, "1").value == 1110.0
    assert [m.labels["gpu"] for m in families()[ENERGY].metrics] == ["1"]


def test_thread_samples_periodically_and_close_releases_the_source() -> None:
    source = ListSource()
    source.next = [reading(0, 1410, 1000, 0)]
    metrics = GpuMetrics(PB_UTILS, source, "i", period_s=0.01)
    metrics.start()
    try:
        assert series(SM_CLOCK, "0").value == 1410.0  # start() samples at once
        source.next = [reading(0, 810, 1000, 0)]
        deadline = time.monotonic() + 5.0
        while series(SM_CLOCK, "0").value != 810.0:
            assert time.monotonic() < deadline, "the metrics thread never sampled again"
            time.sleep(0.005)
    finally:
        metrics.close()
    assert source.closed
    assert not [t for t in threading.enumerate() if t.name == "throttllem-gpu-metrics"]


# ---- sources ----------------------------------------------------------------------------------


@pytest.fixture
def twin() -> Iterator[Any]:
    engine = build_twin_engine(
        Parameters({"twin_speedup": "50", "twin_output_len": "20", "twin_max_input_len": "64"})
    )
    yield engine
    engine.shutdown()


def test_twin_source_reads_the_twin_gpus(twin: Any) -> None:
    source = gpu_state_source(twin)
    assert isinstance(source, ControlGpuState)
    clocks = default_catalog().gpu("A100-SXM4-40GB").supported_clocks_mhz()
    (first,) = source.readings()
    assert first.index == 0 and first.sm_clock_mhz in clocks and first.power_mw > 0

    control = twin.gpu_control()
    mid = clocks[len(clocks) // 2]  # neither the idle (lowest) nor the loaded (highest) clock
    control.set_locked_clocks(mid, mid, [])
    rid = twin.enqueue(EngineRequest(input_token_ids=[1, 2, 3], max_tokens=20))
    deadline = time.monotonic() + 10.0
    while not any(r.is_final and r.request_id == rid for r in twin.await_responses(0.05)):
        assert time.monotonic() < deadline, "the twin request never ended"
    (after,) = source.readings()
    assert after.sm_clock_mhz == mid  # the lock shows
    assert after.total_energy_mj > first.total_energy_mj
    source.close()  # leaves the engine's control alone
    assert control.readings()[0].sm_clock_mhz == mid


class FakeNvmlError(Exception):
    pass


class FakePynvml:
    """The read calls NvmlGpuState may make; any other attribute (a setter) fails the test."""

    NVML_CLOCK_SM = 1
    ALLOWED: ClassVar[set[str]] = {
        "NVML_CLOCK_SM", "nvmlInit", "nvmlShutdown", "nvmlDeviceGetHandleByIndex",
        "nvmlDeviceGetClockInfo", "nvmlDeviceGetPowerUsage",
        "nvmlDeviceGetTotalEnergyConsumption",
    }  # fmt: skip

    def __init__(self, fail: dict[str, set[int]] | None = None) -> None:
        self.fail = fail or {}
        self.calls: list[str] = []
        self.inits = 0

    def __getattribute__(self, name: str) -> Any:
        if name.startswith("nvml") and name not in FakePynvml.ALLOWED:
            raise AssertionError(f"NvmlGpuState called {name}")
        return object.__getattribute__(self, name)

    def _check(self, name: str, gpu: int = -1) -> None:
        self.calls.append(name)
        if gpu in self.fail.get(name, set()) or -1 in self.fail.get(name, set()):
            raise FakeNvmlError(f"{name} failed")

    def nvmlInit(self) -> None:
        self._check("nvmlInit")
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self.inits -= 1

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        self._check("nvmlDeviceGetHandleByIndex", i)
        return i

    def nvmlDeviceGetClockInfo(self, h: int, kind: int) -> int:
        assert kind == self.NVML_CLOCK_SM
        self._check("nvmlDeviceGetClockInfo", h)
        return 1410 - 15 * h

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:
        self._check("nvmlDeviceGetPowerUsage", h)
        return 300_000 + h

    def nvmlDeviceGetTotalEnergyConsumption(self, h: int) -> int:
        self._check("nvmlDeviceGetTotalEnergyConsumption", h)
        return 1_000 * (len(self.calls) + h)


def test_nvml_source_reads_only_and_drops_a_failing_gpu(caplog: pytest.LogCaptureFixture) -> None:
    nvml = FakePynvml()
    state = NvmlGpuState([0, 1, 1], nvml=nvml)
    assert nvml.inits == 0  # NVML is opened on the first read, not at construction
    first = state.readings()
    assert [(r.index, r.sm_clock_mhz, r.power_mw) for r in first] == [
        (0, 1410, 300_000), (1, 1395, 300_001)
    ]  # fmt: skip
    assert nvml.inits == 1
    nvml.fail = {"nvmlDeviceGetPowerUsage": {1}}
    with caplog.at_level(logging.WARNING):
        assert [r.index for r in state.readings()] == [0]
        nvml.fail = {}
        assert [r.index for r in state.readings()] == [0]  # a failed GPU stays out
    assert sum("GPU 1: NVML read failed" in r.getMessage() for r in caplog.records) == 1
    second = state.readings()[0]
    assert second.total_energy_mj > first[0].total_energy_mj
    state.close()
    assert nvml.inits == 0 and state.readings() == []


@pytest.mark.parametrize("broken", ["init", "handles", "import"])
def test_nvml_source_unavailable_logs_once_and_exports_nothing(
    broken: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    nvml: FakePynvml | None = FakePynvml(
        {"nvmlInit": {-1}} if broken == "init" else {"nvmlDeviceGetHandleByIndex": {-1}}
    )
    if broken == "import":
        monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
        nvml = None
    state = NvmlGpuState([0], nvml=nvml)
    metrics = GpuMetrics(PB_UTILS, state, "i")
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            metrics.sample()
    assert state.disabled
    assert all(not f.metrics for f in families().values())
    warnings = [r.getMessage() for r in caplog.records if "not exported" in r.getMessage()]
    assert len(warnings) == 1, warnings
    if nvml is not None:
        assert nvml.inits == 0  # nothing left initialised
        assert "nvmlDeviceGetClockInfo" not in nvml.calls
    metrics.close()


def test_real_engines_read_nvml_and_others_nothing() -> None:
    facts = SimpleNamespace(engine_kind="tensorrtllm", gpu_indices=[1, 3])
    real = SimpleNamespace(gpu_control=lambda: None, facts=lambda: facts)
    source = gpu_state_source(real)
    assert isinstance(source, NvmlGpuState) and source._indices == [1, 3]
    other = SimpleNamespace(
        gpu_control=lambda: None, facts=lambda: SimpleNamespace(engine_kind="other")
    )
    assert gpu_state_source(other) is None
