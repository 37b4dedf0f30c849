"""`GuardedClockDriver`: the `ClockDriver` every backend shares, over a backend's `GpuDevices`.

It owns the behaviour that must not differ between NVML, the twin and the clock daemon:
argument checks before anything is written, idempotent writes, observe-only mode after a
permission error (reported once, with the fix), write timing, and resetting on close.

Closing resets every GPU a lock was ever sent to and whose reset was not confirmed since, not
only the locks known to be in force: a write that fails half-way (GPU lost, daemon gone) leaves
its GPUs in an unknown state, possibly locked.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from types import TracebackType

from .driver import CallLatency, GpuDevices, LatencyRecorder, WriteOutcome
from .errors import GpuError, InvalidArgument, LeaseConflict, NoPermission

log = logging.getLogger(__name__)

PERMISSION_HELP = (
    "locking GPU clocks needs root or CAP_SYS_ADMIN. Fix one of: run the privileged clock "
    "daemon (`sudo throttllem clockd --group $(id -gn)`) and point the controller at its "
    "socket; run with CAP_SYS_ADMIN (docker: --cap-add SYS_ADMIN); or run as root"
)

Lock = tuple[int, int] | None


class GuardedClockDriver:
    """A `ClockDriver` over any `GpuDevices`. Thread-safe: writes are serialised."""

    def __init__(
        self,
        devices: GpuDevices,
        *,
        name: str,
        observe_only: bool = False,
        perf_counter_s: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._devices = devices
        self._name = name
        self._perf_counter_s = perf_counter_s
        self._indices = devices.gpu_indices()
        self._clocks = {gpu: devices.supported_clocks_mhz(gpu) for gpu in self._indices}
        # Re-entrant: a backend may report a lost lease (-> forget) from inside a write.
        self._mutex = threading.RLock()
        # gpu -> lock known to be in force (None: reset). A missing key means "unknown" (never
        # written, or a write failed half-way), which always gets written.
        self._known: dict[int, Lock] = {}
        # GPUs a lock was sent to (whether or not the write succeeded) and that no reset has
        # been confirmed for since: what close() must reset.
        self._attempted: set[int] = set()
        self._observe_only_reason = "observe-only by configuration" if observe_only else None
        self._refused_writes = 0
        self._latency = LatencyRecorder()
        self._closed = False

    # ---- reads --------------------------------------------------------------------------------

    def gpu_indices(self) -> tuple[int, ...]:
        return self._indices

    def supported_clocks_mhz(self, gpu: int) -> tuple[int, ...]:
        self._check_index(gpu)
        return self._clocks[gpu]

    def can_actuate(self) -> bool:
        return self._observe_only_reason is None

    @property
    def observe_only_reason(self) -> str | None:
        """Why writes are refused (None while the driver can actuate)."""
        return self._observe_only_reason

    @property
    def refused_writes(self) -> int:
        """Writes refused in observe-only mode (each would have changed a lock)."""
        return self._refused_writes

    def locked_clocks_mhz(self, gpu: int) -> tuple[int, int] | None:
        self._check_index(gpu)
        return self._known.get(gpu)

    def sm_clock_mhz(self, gpu: int) -> int:
        self._check_index(gpu)
        return self._devices.sm_clock_mhz(gpu)

    def power_usage_mw(self, gpu: int) -> int:
        self._check_index(gpu)
        return self._devices.power_usage_mw(gpu)

    def total_energy_mj(self, gpu: int) -> int:
        self._check_index(gpu)
        return self._devices.total_energy_mj(gpu)

    def enforced_power_limit_mw(self, gpu: int) -> int:
        self._check_index(gpu)
        return self._devices.enforced_power_limit_mw(gpu)

    def set_latency(self) -> CallLatency:
        return self._latency.snapshot()

    # ---- writes -------------------------------------------------------------------------------

    def set_locked_clocks(self, gpus: Sequence[int], min_mhz: int, max_mhz: int) -> WriteOutcome:
        for gpu in gpus:
            self._check_index(gpu)
            self._check_clocks(gpu, min_mhz, max_mhz)
        return self._write(gpus, (min_mhz, max_mhz))

    def reset_locked_clocks(self, gpus: Sequence[int]) -> WriteOutcome:
        for gpu in gpus:
            self._check_index(gpu)
        return self._write(gpus, None)

    def enter_observe_only(self, reason: str) -> None:
        """Write nothing from now on (reads go on; writes return REFUSED and are counted), e.g.
        when another client of the clock daemon holds these GPUs. Locks already sent are still
        reset on close."""
        with self._mutex:
            if self._observe_only_reason is None:
                self._observe_only_reason = reason

    def forget(self, gpus: Sequence[int]) -> None:
        """Mark the GPUs' locks unknown, so the next write goes through (someone else, e.g. the
        clock daemon on a lapsed lease, may have changed them)."""
        with self._mutex:
            for gpu in gpus:
                self._known.pop(gpu, None)

    def close(self) -> None:
        """Reset every GPU this driver tried to lock and did not see reset since (locks known
        to be in force, and GPUs a failed write left unknown), then release the backend.
        Each GPU is reset on its own, so one lost GPU does not keep the others locked.
        Never raises: failures are logged."""
        with self._mutex:
            if self._closed:
                return
            self._closed = True
            for gpu in sorted(self._attempted):
                try:
                    self._devices.reset_locked_clocks([gpu])
                except Exception as e:
                    log.error(
                        "%s: could not reset the clocks of GPU %d on close: %s", self._name, gpu, e
                    )
                else:
                    self._attempted.discard(gpu)
                    self._known[gpu] = None
            try:
                self._devices.close()
            except Exception as e:
                log.warning("%s: closing the backend failed: %s", self._name, e)

    def __enter__(self) -> GuardedClockDriver:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ---- internals ----------------------------------------------------------------------------

    def _write(self, gpus: Sequence[int], target: Lock) -> WriteOutcome:
        with self._mutex:
            if self._closed:
                raise GpuError(f"{self._name}: driver is closed")
            todo = [
                gpu
                for gpu in dict.fromkeys(gpus)
                if gpu not in self._known or self._known[gpu] != target
            ]
            if not todo:
                return WriteOutcome.UNCHANGED
            if self._observe_only_reason is not None:
                self._refused_writes += 1
                log.debug("%s: observe-only, not writing %s to GPUs %s", self._name, target, todo)
                return WriteOutcome.REFUSED
            start_s = self._perf_counter_s()
            newly_attempted = [
                gpu for gpu in todo if target is not None and gpu not in self._attempted
            ]
            self._attempted.update(newly_attempted)
            try:
                if target is None:
                    self._devices.reset_locked_clocks(todo)
                else:
                    self._devices.set_locked_clocks(todo, target[0], target[1])
            except NoPermission as e:
                # Refused for lack of privilege: nothing was written, nothing new to reset.
                self._attempted.difference_update(newly_attempted)
                self._enter_observe_only(e)
                return WriteOutcome.REFUSED
            except LeaseConflict:
                # The clock daemon checks every lease before it touches a clock: nothing changed.
                self._attempted.difference_update(newly_attempted)
                raise
            except GpuError:
                # Some GPUs may have changed before the failure: make all of them unknown (they
                # stay in _attempted, so close() resets them).
                for gpu in todo:
                    self._known.pop(gpu, None)
                raise
            self._latency.record((self._perf_counter_s() - start_s) * 1000.0)
            for gpu in todo:
                self._known[gpu] = target
            if target is None:
                self._attempted.difference_update(todo)
            return WriteOutcome.APPLIED

    def _enter_observe_only(self, error: NoPermission) -> None:
        # Reported once: every later write is refused quietly, counted in refused_writes.
        self._observe_only_reason = str(error)
        self._refused_writes += 1
        log.warning(
            "%s: cannot change GPU clocks (%s); continuing in observe-only mode: clocks are "
            "read but never changed. %s",
            self._name,
            error,
            PERMISSION_HELP,
        )

    def _check_index(self, gpu: int) -> None:
        if gpu not in self._clocks:
            raise InvalidArgument(f"{self._name}: no GPU {gpu}; this driver has {self._indices}")

    def _check_clocks(self, gpu: int, min_mhz: int, max_mhz: int) -> None:
        clocks = self._clocks[gpu]
        lowest, highest = clocks[-1], clocks[0]
        if min_mhz > max_mhz:
            raise InvalidArgument(f"GPU {gpu}: min clock {min_mhz} MHz > max {max_mhz} MHz")
        if min_mhz < lowest or max_mhz > highest:
            raise InvalidArgument(
                f"GPU {gpu}: lock [{min_mhz}, {max_mhz}] MHz outside the supported "
                f"{lowest}..{highest} MHz"
            )
