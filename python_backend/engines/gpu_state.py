"""Read-only GPU state for the backend's own metrics (triton_model/gpu_metrics.py).

The twin's GPUs are read through their GpuControl surface; a real GPU (engine `tensorrtllm`)
through NVML, read-only: `NvmlGpuState` only ever reads the SM clock, the power draw and the
energy counter, and never sets anything (clocks are the controller's business). pynvml is
imported on first use, so the backend loads where it is missing; there, or when NVML fails,
the failure is logged once and nothing is exported, and the model keeps serving.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

from .base import Engine, GpuControl, GpuReading

logger = logging.getLogger(__name__)


class GpuStateSource(Protocol):
    def readings(self) -> list[GpuReading]:
        """The GPUs that could be read now; a GPU that cannot be read is left out."""
        ...

    def close(self) -> None: ...


class ControlGpuState:
    """The readings of an engine's GpuControl (the twin's GPUs); closing leaves the control,
    which belongs to the engine, alone."""

    def __init__(self, control: GpuControl) -> None:
        self._control = control

    def readings(self) -> list[GpuReading]:
        return self._control.readings()

    def close(self) -> None:
        pass


def _import_pynvml() -> Any:
    import pynvml

    return pynvml


class NvmlGpuState:
    """SM clock, power and energy of `indices` through NVML (pynvml), read-only.

    NVML is initialised on the first `readings()` call (from the metrics thread, so that a slow
    or broken driver never delays the model's start). When pynvml or the NVML library is
    missing, or nvmlInit fails, the error is logged once and `readings()` returns nothing from
    then on; a GPU whose handle or a read fails is logged once and left out from then on.
    Readings carry no locked range (None) and no power limit (0): neither is read.
    """

    def __init__(self, indices: Sequence[int], nvml: Any | None = None) -> None:
        self._indices = list(dict.fromkeys(indices))
        self._nvml: Any = nvml
        self._handles: dict[int, Any] = {}
        self._initialised = False
        self._disabled = False

    @property
    def disabled(self) -> bool:
        return self._disabled

    def _init(self) -> None:
        self._initialised = True
        try:
            nvml = self._nvml if self._nvml is not None else _import_pynvml()
        except ImportError as e:
            self._disable(f"pynvml cannot be imported ({e})")
            return
        self._nvml = nvml
        try:
            nvml.nvmlInit()
        except Exception as e:  # pynvml.NVMLError, or the library missing
            self._disable(f"NVML initialisation failed ({e})")
            return
        errors: dict[int, str] = {}
        for index in self._indices:
            try:
                self._handles[index] = nvml.nvmlDeviceGetHandleByIndex(index)
            except Exception as e:
                errors[index] = str(e)
        if not self._handles:
            self._shutdown()
            self._disable(f"no NVML handle for GPU(s) {self._indices} ({errors})")
            return
        for index, error in errors.items():
            logger.warning("GPU %d: no NVML handle (%s): its state is not exported", index, error)

    def _disable(self, why: str) -> None:
        self._disabled = True
        logger.warning("%s: GPU clock, power and energy metrics are not exported", why)

    def readings(self) -> list[GpuReading]:
        if not self._initialised:
            self._init()
        if self._disabled:
            return []
        nvml = self._nvml
        out: list[GpuReading] = []
        for index, handle in list(self._handles.items()):
            try:
                reading = GpuReading(
                    index=index,
                    sm_clock_mhz=int(nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM)),
                    locked_range_mhz=None,
                    power_mw=int(nvml.nvmlDeviceGetPowerUsage(handle)),
                    total_energy_mj=int(nvml.nvmlDeviceGetTotalEnergyConsumption(handle)),
                    power_limit_mw=0,
                )
            except Exception as e:
                del self._handles[index]
                logger.warning("GPU %d: NVML read failed (%s): its state is no longer exported",
                               index, e)  # fmt: skip
                continue
            out.append(reading)
        return out

    def _shutdown(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except Exception as e:
            logger.debug("nvmlShutdown: %s", e)

    def close(self) -> None:
        """Release NVML (once); later `readings()` return nothing."""
        if self._initialised and not self._disabled:
            self._shutdown()
        self._initialised = True
        self._disabled = True
        self._handles.clear()


def gpu_state_source(engine: Engine) -> GpuStateSource | None:
    """Where this engine's GPU state is read: the twin's GPUs, or NVML for a real engine."""
    control = engine.gpu_control()
    if control is not None:
        return ControlGpuState(control)
    facts = engine.facts()
    if facts.engine_kind == "tensorrtllm":
        return NvmlGpuState(facts.gpu_indices)
    return None
