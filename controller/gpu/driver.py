"""The clock-driver interface the controller programs against, and the raw device seam under it.

Two layers, so every backend gets the same safety behaviour for free:

- `GpuDevices`: one backend's raw NVML-like calls (real NVML, in-process twin GPUs, the clock
  daemon's socket, later the twin's gRPC GpuControl). It only talks to the hardware and raises
  `errors.GpuError`; no caching, no policy.
- `ClockDriver`: what the controller sees. `GuardedClockDriver` (guarded.py) builds one over any
  `GpuDevices`: validates indices and clocks, skips writes that change nothing, turns a
  permission error into observe-only mode (warned once), and times every write.

Units: clocks in MHz, power in mW, energy in mJ, latency in ms. GPU indices are NVML indices
(nvidia-smi order), not CUDA's (CUDA_VISIBLE_DEVICES renumbers).
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


class WriteOutcome(enum.Enum):
    """What a set or reset call did."""

    APPLIED = "applied"  # the hardware (or the daemon) was asked to change the lock
    UNCHANGED = "unchanged"  # skipped: the requested lock is already in force
    REFUSED = "refused"  # observe-only: no permission to change clocks, nothing written


@dataclass(frozen=True)
class CallLatency:
    """Wall time of the clock writes a driver made (skipped and refused writes not counted)."""

    count: int = 0
    last_ms: float = 0.0
    mean_ms: float = 0.0
    max_ms: float = 0.0


class LatencyRecorder:
    """Thread-safe running count, last, mean and max of call durations."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._count = 0
        self._total_ms = 0.0
        self._last_ms = 0.0
        self._max_ms = 0.0

    def record(self, elapsed_ms: float) -> None:
        with self._mutex:
            self._count += 1
            self._total_ms += elapsed_ms
            self._last_ms = elapsed_ms
            self._max_ms = max(self._max_ms, elapsed_ms)

    def snapshot(self) -> CallLatency:
        with self._mutex:
            if self._count == 0:
                return CallLatency()
            return CallLatency(
                self._count, self._last_ms, self._total_ms / self._count, self._max_ms
            )


@runtime_checkable
class ClockDriver(Protocol):
    """Clock control and power readings for a fixed set of GPUs.

    Writes are idempotent (a lock already in force is not written again) and never raise for
    lack of permission: the driver reports it once and returns `WriteOutcome.REFUSED` from then
    on (`can_actuate()` turns False). Other failures raise `errors.GpuError` subclasses.
    """

    def gpu_indices(self) -> tuple[int, ...]:
        """The GPUs this driver controls (NVML indices), fixed at start."""
        ...

    def supported_clocks_mhz(self, gpu: int) -> tuple[int, ...]:
        """SM clocks the GPU can be locked to, highest first; read once at start."""
        ...

    def can_actuate(self) -> bool:
        """False in observe-only mode: reads work, writes are refused."""
        ...

    def set_locked_clocks(self, gpus: Sequence[int], min_mhz: int, max_mhz: int) -> WriteOutcome:
        """Lock the SM clock of each GPU in `gpus` to [min_mhz, max_mhz]."""
        ...

    def reset_locked_clocks(self, gpus: Sequence[int]) -> WriteOutcome:
        """Give the GPUs back their default clock behaviour."""
        ...

    def locked_clocks_mhz(self, gpu: int) -> tuple[int, int] | None:
        """The lock this driver last applied to `gpu`; None after a reset or before any write."""
        ...

    def sm_clock_mhz(self, gpu: int) -> int:
        """The SM clock the GPU runs at now."""
        ...

    def power_usage_mw(self, gpu: int) -> int:
        """Board power (NVML averages it over ~1 s on Ampere and newer, except GA100)."""
        ...

    def total_energy_mj(self, gpu: int) -> int:
        """Energy counter since the driver (or twin) started; only differences mean anything."""
        ...

    def enforced_power_limit_mw(self, gpu: int) -> int: ...

    def set_latency(self) -> CallLatency:
        """Durations of the writes that reached the hardware (or the clock daemon)."""
        ...

    def close(self) -> None:
        """Reset the locks this driver applied and release the backend. Idempotent."""
        ...


class GpuDevices(Protocol):
    """One backend's raw calls. Implementations raise `errors.GpuError` subclasses only."""

    def gpu_indices(self) -> tuple[int, ...]: ...

    def supported_clocks_mhz(self, gpu: int) -> tuple[int, ...]:
        """Highest first, as read when the backend was opened."""
        ...

    def set_locked_clocks(self, gpus: Sequence[int], min_mhz: int, max_mhz: int) -> None: ...

    def reset_locked_clocks(self, gpus: Sequence[int]) -> None: ...

    def sm_clock_mhz(self, gpu: int) -> int: ...

    def power_usage_mw(self, gpu: int) -> int: ...

    def total_energy_mj(self, gpu: int) -> int: ...

    def enforced_power_limit_mw(self, gpu: int) -> int: ...

    def close(self) -> None:
        """Release the backend (no clock writes here: the guard resets before calling it)."""
        ...
