"""The state of the GPUs a model instance runs on, on Triton's metrics port, so that anyone can
see the clocks whether or not the controller is alive.

Families (through `pb_utils.MetricFamily`; labels `gpu` = the engine's GPU index and
`model_instance` = the Triton model instance, e.g. `tensorrt_llm_0_0`):
    throttllem_gpu_sm_clock_mhz           gauge    current SM clock, MHz
    throttllem_gpu_power_w                gauge    power draw, W (NVML's average)
    throttllem_gpu_energy_joules_total    counter  energy since the driver loaded (the twin: since
                                                   it started), J

Each instance samples its GPUs on its own thread every `period_s`. The instance is a label
because Triton merges identically-labelled metrics across the stub processes of all
instances: a counter fed by increments from several processes would count the GPU's energy
once per instance, and the twin's GPUs belong to one instance each. Several instances on one
real GPU therefore export the same values: aggregate with `max by (gpu)`.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

from ..engines.base import GpuReading
from ..engines.gpu_state import GpuStateSource
from .metrics import METRIC_IPC_LOCK

logger = logging.getLogger(__name__)

SM_CLOCK = "throttllem_gpu_sm_clock_mhz"
POWER = "throttllem_gpu_power_w"
ENERGY = "throttllem_gpu_energy_joules_total"
DEFAULT_PERIOD_S = 1.0


@dataclass
class _GpuSeries:
    clock: Any
    power: Any
    energy: Any
    energy_mj: int  # the counter's value, in the source's unit


class GpuMetrics:
    """Gauges and the energy counter of one instance's GPUs, fed from a `GpuStateSource`.

    A GPU's series are created at its first reading, so a GPU that cannot be read exports
    nothing. The energy counter starts at the source's total and follows its increases; a total
    that goes backwards (a driver reload) only moves the base.
    """

    def __init__(
        self,
        pb_utils: Any,
        source: GpuStateSource,
        instance: str,
        period_s: float = DEFAULT_PERIOD_S,
    ) -> None:
        family = pb_utils.MetricFamily
        self._source = source
        self._instance = instance
        self._period_s = period_s
        # Triton requires every MetricFamily to outlive its Metrics: keep them.
        self._clock_family = family(
            name=SM_CLOCK, description="GPU SM clock (MHz)", kind=family.GAUGE
        )
        self._power_family = family(name=POWER, description="GPU power draw (W)", kind=family.GAUGE)
        self._energy_family = family(
            name=ENERGY, description="GPU energy consumed (J)", kind=family.COUNTER
        )
        self._series: dict[int, _GpuSeries] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failed = False

    def _new_series(self, reading: GpuReading) -> _GpuSeries:
        labels = {"gpu": str(reading.index), "model_instance": self._instance}
        return _GpuSeries(
            clock=self._clock_family.Metric(labels=labels),
            power=self._power_family.Metric(labels=labels),
            energy=self._energy_family.Metric(labels=labels),
            energy_mj=0,
        )

    def _update(self, readings: Any) -> None:
        for reading in readings:
            series = self._series.get(reading.index)
            if series is None:
                series = self._series[reading.index] = self._new_series(reading)
            series.clock.set(float(reading.sm_clock_mhz))
            series.power.set(reading.power_mw / 1000.0)
            if reading.total_energy_mj > series.energy_mj:
                series.energy.increment((reading.total_energy_mj - series.energy_mj) / 1000.0)
            series.energy_mj = reading.total_energy_mj

    def sample(self) -> None:
        """Read the GPUs once and update their series; never raises (a failure is logged)."""
        try:
            readings = self._source.readings()
            with METRIC_IPC_LOCK:
                self._update(readings)
            self._failed = False
        except Exception:
            if not self._failed:
                logger.exception("updating the GPU metrics failed")
            self._failed = True

    def start(self) -> None:
        """Sample now, then every `period_s` on a daemon thread."""
        self.sample()
        self._thread = threading.Thread(target=self._run, name="throttllem-gpu-metrics",
                                        daemon=True)  # fmt: skip
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._period_s):
            self.sample()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        self._source.close()
