"""The clock driver over in-process twin GPUs: the same `ClockDriver` the NVML driver gives, so
policy code cannot tell them apart.

The twin GPU reproduces NVML's return codes (`TwinNvmlError.code`), so its errors go through the
same translation as NVML's. A twin built with `privileged=False` refuses writes like a GPU
without root, which exercises observe-only mode without hardware.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import TypeVar

from throttllem.backend.twin.errors import TwinNvmlError
from throttllem.backend.twin.gpu import TwinGpu

from .errors import InvalidArgument, translate
from .guarded import GuardedClockDriver

T = TypeVar("T")


def _twin(context: str, fn: Callable[[], T]) -> T:
    try:
        return fn()
    except TwinNvmlError as e:
        raise translate(e, context) from e


class TwinDevices:
    """`GpuDevices` over twin GPUs, addressed by their `index`."""

    def __init__(self, gpus: Iterable[TwinGpu]) -> None:
        self._gpus: dict[int, TwinGpu] = {}
        for gpu in gpus:
            if gpu.index in self._gpus:
                raise InvalidArgument(f"two twin GPUs share index {gpu.index}")
            self._gpus[gpu.index] = gpu
        if not self._gpus:
            raise InvalidArgument("a twin driver needs at least one twin GPU")
        # Read once, like NVML's list at start.
        self._clocks_mhz = {
            i: tuple(sorted(set(g.supported_clocks_mhz()), reverse=True))
            for i, g in self._gpus.items()
        }

    def gpu_indices(self) -> tuple[int, ...]:
        return tuple(self._gpus)

    def supported_clocks_mhz(self, gpu: int) -> tuple[int, ...]:
        return self._clocks_mhz[gpu]

    def set_locked_clocks(self, gpus: Sequence[int], min_mhz: int, max_mhz: int) -> None:
        for i in gpus:
            _twin(
                f"twin GPU {i}: lock clocks to [{min_mhz}, {max_mhz}] MHz",
                partial(self._gpus[i].set_locked_clocks, min_mhz, max_mhz),
            )

    def reset_locked_clocks(self, gpus: Sequence[int]) -> None:
        for i in gpus:
            _twin(f"twin GPU {i}: reset locked clocks", self._gpus[i].reset_locked_clocks)

    def sm_clock_mhz(self, gpu: int) -> int:
        return _twin(f"twin GPU {gpu}: SM clock", self._gpus[gpu].sm_clock_mhz)

    def power_usage_mw(self, gpu: int) -> int:
        return _twin(f"twin GPU {gpu}: power", self._gpus[gpu].power_usage_mw)

    def total_energy_mj(self, gpu: int) -> int:
        return _twin(f"twin GPU {gpu}: energy", self._gpus[gpu].total_energy_mj)

    def enforced_power_limit_mw(self, gpu: int) -> int:
        return _twin(f"twin GPU {gpu}: power limit", self._gpus[gpu].enforced_power_limit_mw)

    def close(self) -> None:
        """The twin GPUs belong to the engine that made them: nothing to release."""


class TwinDriver(GuardedClockDriver):
    """The `ClockDriver` over one or more in-process twin GPUs."""

    def __init__(self, gpus: TwinGpu | Iterable[TwinGpu], *, observe_only: bool = False) -> None:
        devices = TwinDevices([gpus] if isinstance(gpus, TwinGpu) else gpus)
        super().__init__(devices, name="twin", observe_only=observe_only)
