"""The real clock driver: NVML through pynvml.

`NvmlDevices` is the raw backend (one pynvml call per GPU per operation, errors translated);
`NvmlDriver.open()` wraps it in the shared guard (idempotent writes, observe-only on a
permission error, timed writes). Locked clocks outlive this process: use the clock daemon
(`throttllem clockd`) when the controller may die without running its cleanup.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import pynvml

from .errors import GpuError, InvalidArgument, NotSupported, translate
from .guarded import GuardedClockDriver

log = logging.getLogger(__name__)

T = TypeVar("T")


def _nvml(context: str, fn: Callable[..., T], *args: Any) -> T:
    """Call pynvml, turning its errors into ours (the NVML error stays as the cause)."""
    try:
        return fn(*args)
    except pynvml.NVMLError as e:
        raise translate(e, context) from e


class NvmlDevices:
    """`GpuDevices` over pynvml. Open with `NvmlDevices.open()`; holds one nvmlInit reference."""

    def __init__(self, handles: dict[int, Any], clocks_mhz: dict[int, tuple[int, ...]]) -> None:
        self._handles = handles
        self._clocks_mhz = clocks_mhz
        self._open = True

    @classmethod
    def open(cls, gpus: Sequence[int] | None = None) -> NvmlDevices:
        """Initialise NVML, take handles for `gpus` (default: every GPU) and read their clocks."""
        _nvml("initialise NVML", pynvml.nvmlInit)
        try:
            count: int = _nvml("count GPUs", pynvml.nvmlDeviceGetCount)
            indices = tuple(range(count)) if gpus is None else tuple(dict.fromkeys(gpus))
            for gpu in indices:
                if not 0 <= gpu < count:
                    raise InvalidArgument(f"no GPU {gpu}: NVML sees {count} GPU(s)")
            handles = {
                gpu: _nvml(f"GPU {gpu}: get handle", pynvml.nvmlDeviceGetHandleByIndex, gpu)
                for gpu in indices
            }
            clocks = {gpu: _read_supported_clocks_mhz(gpu, h) for gpu, h in handles.items()}
            version = _nvml("driver version", pynvml.nvmlSystemGetDriverVersion)
        except BaseException:
            _shutdown_quietly()
            raise
        for gpu, c in clocks.items():
            log.info(
                "NVML (driver %s): GPU %d supports %d SM clocks, %d..%d MHz",
                version,
                gpu,
                len(c),
                c[-1],
                c[0],
            )
        return cls(handles, clocks)

    def gpu_indices(self) -> tuple[int, ...]:
        return tuple(self._handles)

    def supported_clocks_mhz(self, gpu: int) -> tuple[int, ...]:
        return self._clocks_mhz[gpu]

    def set_locked_clocks(self, gpus: Sequence[int], min_mhz: int, max_mhz: int) -> None:
        for gpu in gpus:
            _nvml(
                f"GPU {gpu}: lock clocks to [{min_mhz}, {max_mhz}] MHz",
                pynvml.nvmlDeviceSetGpuLockedClocks,
                self._handles[gpu],
                min_mhz,
                max_mhz,
            )

    def reset_locked_clocks(self, gpus: Sequence[int]) -> None:
        for gpu in gpus:
            _nvml(
                f"GPU {gpu}: reset locked clocks",
                pynvml.nvmlDeviceResetGpuLockedClocks,
                self._handles[gpu],
            )

    def sm_clock_mhz(self, gpu: int) -> int:
        return int(
            _nvml(
                f"GPU {gpu}: SM clock",
                pynvml.nvmlDeviceGetClockInfo,
                self._handles[gpu],
                pynvml.NVML_CLOCK_SM,
            )
        )

    def power_usage_mw(self, gpu: int) -> int:
        return int(_nvml(f"GPU {gpu}: power", pynvml.nvmlDeviceGetPowerUsage, self._handles[gpu]))

    def total_energy_mj(self, gpu: int) -> int:
        return int(
            _nvml(
                f"GPU {gpu}: energy", pynvml.nvmlDeviceGetTotalEnergyConsumption, self._handles[gpu]
            )
        )

    def enforced_power_limit_mw(self, gpu: int) -> int:
        return int(
            _nvml(
                f"GPU {gpu}: power limit",
                pynvml.nvmlDeviceGetEnforcedPowerLimit,
                self._handles[gpu],
            )
        )

    def close(self) -> None:
        if self._open:
            self._open = False
            _nvml("shut NVML down", pynvml.nvmlShutdown)


def _read_supported_clocks_mhz(gpu: int, handle: Any) -> tuple[int, ...]:
    """SM clocks at the highest memory clock (the one an inference server runs at), highest
    first. Lower memory clocks offer fewer graphics clocks."""
    mem: list[int] = _nvml(
        f"GPU {gpu}: memory clocks", pynvml.nvmlDeviceGetSupportedMemoryClocks, handle
    )
    if not mem:
        raise NotSupported(f"GPU {gpu}: NVML lists no memory clocks")
    top_mem = max(mem)
    graphics: list[int] = _nvml(
        f"GPU {gpu}: graphics clocks at {top_mem} MHz memory",
        pynvml.nvmlDeviceGetSupportedGraphicsClocks,
        handle,
        top_mem,
    )
    if not graphics:
        raise NotSupported(f"GPU {gpu}: NVML lists no graphics clocks at {top_mem} MHz memory")
    return tuple(sorted(set(graphics), reverse=True))


def _shutdown_quietly() -> None:
    try:
        pynvml.nvmlShutdown()
    except pynvml.NVMLError as e:
        log.debug("nvmlShutdown after a failed open: %s", e)


class NvmlDriver(GuardedClockDriver):
    """The `ClockDriver` over real NVML."""

    @classmethod
    def open(
        cls,
        gpus: Sequence[int] | None = None,
        *,
        observe_only: bool = False,
        reset_at_start: bool = True,
    ) -> NvmlDriver:
        """Open NVML for `gpus` (default: all).

        With `reset_at_start` (the default unless `observe_only`), every GPU's locked clocks are
        reset now: that clears locks a crashed earlier run left behind and probes the privilege
        once, so a missing permission is reported at start, not at the first decision.
        `observe_only` never writes (for readers such as a metrics exporter).
        """
        devices = NvmlDevices.open(gpus)
        driver = cls(devices, name="nvml", observe_only=observe_only)
        if reset_at_start and not observe_only:
            try:
                driver.reset_locked_clocks(driver.gpu_indices())
            except GpuError:
                driver.close()
                raise
        return driver
