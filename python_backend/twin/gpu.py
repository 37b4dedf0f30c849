"""A twin GPU seen through an NVML-like surface: clocks, locks, power, a cumulative energy counter.

The engine asks it to run iterations (`run_iteration`, given the latency as a function of the SM
clock); a controller locks clocks (`set_locked_clocks`) from another thread. Energy integrates
power over time given by the caller (virtual or wall), idle gaps included.

Clock rules the twin follows (and that the real GPUs follow closely enough for control):
- Loaded and unlocked, the GPU runs at its max boost clock; idle and unlocked, it drops to its
  idle clock (the board's lowest clock).
- Locked to [min, max]: loaded, it runs at max; idle, at min (a lock keeps the clock up, which is
  why an idle GPU locked high draws more, see power.py).
- A lock (or reset) takes effect `clock_change_latency_ms` after the call, also in the middle
  of an iteration (DVFS does not wait for kernels to end): the work done by then ran at the
  old clock, the rest at the new one. An iteration reports the clock it started at.
- Over the power limit the board lowers its own clock one step at a time until it is under the
  limit, and raises it back one step per iteration once there is headroom again.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .errors import NVML_ERROR_INVALID_ARGUMENT, NVML_ERROR_NO_PERMISSION, TwinNvmlError
from .hardware import GpuSpec
from .iteration import LatencyBreakdown
from .power import PowerModel, idle_clock_mhz
from .time_source import TimeSource

# After its last kernel a GPU keeps its loaded clock for a moment before dropping to idle;
# short gaps between iterations (scheduling, sampling) are spent at the loaded clock.
LOADED_CLOCK_HOLD_S = 0.05

LatencyAt = Callable[[int], LatencyBreakdown]


@dataclass(frozen=True)
class ExecutedIteration:
    """One iteration as the GPU(s) ran it."""

    start_s: float
    end_s: float
    sm_clock_mhz: int
    breakdown: LatencyBreakdown
    power_w: float  # mean per GPU over [start_s, end_s]


class _Planned:
    """An iteration timed at one clock (plain slotted class: built once or twice per iteration)."""

    __slots__ = ("breakdown", "clock_mhz", "kernel_power_w", "power_w")

    def __init__(
        self, clock_mhz: int, breakdown: LatencyBreakdown, power_w: float, kernel_power_w: float
    ) -> None:
        self.clock_mhz = clock_mhz
        self.breakdown = breakdown
        self.power_w = power_w  # mean over the iteration, CPU overhead included
        self.kernel_power_w = kernel_power_w  # while kernels run: what the power controller limits


class TwinGpu:
    """One GPU board. Thread-safe: every public method holds the instance lock."""

    def __init__(
        self,
        spec: GpuSpec,
        time: TimeSource,
        *,
        index: int = 0,
        clock_change_latency_ms: float = 10.0,
        privileged: bool = True,
    ) -> None:
        if clock_change_latency_ms < 0:
            raise ValueError(f"clock_change_latency_ms must be >= 0, got {clock_change_latency_ms}")
        self.spec = spec
        self.index = index
        self._time = time
        self._change_latency_s = clock_change_latency_ms / 1000.0
        self._privileged = privileged
        self._mutex = threading.Lock()
        self._clocks = spec.supported_clocks_mhz()  # highest first
        # Lock in force, and requested changes not yet in force: (effective_at_s, lock or None).
        self._lock_range: tuple[int, int] | None = None
        self._pending: list[tuple[float, tuple[int, int] | None]] = []
        self._power_limit_w = spec.power_limit_w
        self._cap_clock_mhz = spec.max_sm_clock_mhz  # ceiling set by the power controller
        self._energy_mj = 0.0
        self._integrated_to_s = time.now_s()
        self._last_end_s = float("-inf")
        self._power = PowerModel(spec)
        self._last_power_w = self._power.idle_w(idle_clock_mhz(spec))
        self._last_kernel_w = 0.0  # power while kernels ran, last iteration (power controller)

    # ---- clocks -------------------------------------------------------------------------------

    @property
    def clock_change_latency_s(self) -> float:
        """Delay between a lock (or reset) call and the clock it sets taking effect."""
        return self._change_latency_s

    def supported_clocks_mhz(self) -> list[int]:
        return list(self._clocks)

    def max_sm_clock_mhz(self) -> int:
        return self.spec.max_sm_clock_mhz

    def default_sm_clock_mhz(self) -> int:
        return self.spec.max_sm_clock_mhz

    def set_locked_clocks(self, min_mhz: int, max_mhz: int) -> None:
        """nvmlDeviceSetGpuLockedClocks. Each bound is rounded to the nearest supported clock
        (a value exactly between two steps goes to the lower one); rounding is monotonic so
        min <= max survives it."""
        self._check_permission("set_locked_clocks")
        lo_clock, hi_clock = self.spec.min_sm_clock_mhz, self.spec.max_sm_clock_mhz
        if min_mhz > max_mhz:
            raise TwinNvmlError(
                NVML_ERROR_INVALID_ARGUMENT,
                f"GPU {self.index}: min clock {min_mhz} MHz > max {max_mhz} MHz",
            )
        for value in (min_mhz, max_mhz):
            if not lo_clock <= value <= hi_clock:
                raise TwinNvmlError(
                    NVML_ERROR_INVALID_ARGUMENT,
                    f"GPU {self.index}: clock {value} MHz outside {lo_clock}..{hi_clock} MHz",
                )
        new = (self.round_clock_mhz(min_mhz), self.round_clock_mhz(max_mhz))
        with self._mutex:
            self._request_locked(new)

    def reset_locked_clocks(self) -> None:
        """nvmlDeviceResetGpuLockedClocks."""
        self._check_permission("reset_locked_clocks")
        with self._mutex:
            self._request_locked(None)

    def locked_clocks_mhz(self) -> tuple[int, int] | None:
        """The lock in force now (a requested change shows once it has taken effect)."""
        with self._mutex:
            return self._lock_at(self._time.now_s())

    def round_clock_mhz(self, mhz: float) -> int:
        """Nearest supported clock; ties go to the lower clock."""
        step = self.spec.clock_step_mhz
        base = self.spec.min_sm_clock_mhz
        k_low = int((mhz - base) // step)
        low = base + k_low * step
        rounded = low if mhz - low <= step / 2 else low + step
        return max(base, min(self.spec.max_sm_clock_mhz, rounded))

    def sm_clock_mhz(self) -> int:
        """The clock the GPU runs at now."""
        with self._mutex:
            now = self._time.now_s()
            return self._clock_at(now, loaded=now <= self._last_end_s + LOADED_CLOCK_HOLD_S)

    # ---- power and energy ---------------------------------------------------------------------

    def power_usage_mw(self) -> int:
        """Mean power of the last interval the GPU accounted (an iteration or an idle gap)."""
        with self._mutex:
            # A reader must see an idle GPU as idle, not as its last iteration.
            self._idle_to(self._time.now_s())
            return round(self._last_power_w * 1000.0)

    def total_energy_mj(self) -> int:
        """Energy since creation in mJ, idle time included up to now."""
        with self._mutex:
            self._idle_to(self._time.now_s())
            return int(self._energy_mj)

    def enforced_power_limit_mw(self) -> int:
        with self._mutex:
            return round(self._power_limit_w * 1000.0)

    def set_power_limit_mw(self, limit_mw: int) -> None:
        """nvmlDeviceSetPowerManagementLimit: within the board's [min, default] limits."""
        self._check_permission("set_power_limit_mw")
        lo_mw = int(self.spec.min_power_limit_w * 1000)
        hi_mw = int(self.spec.power_limit_w * 1000)
        if not lo_mw <= limit_mw <= hi_mw:
            raise TwinNvmlError(
                NVML_ERROR_INVALID_ARGUMENT,
                f"GPU {self.index}: power limit {limit_mw} mW outside {lo_mw}..{hi_mw} mW",
            )
        with self._mutex:
            self._power_limit_w = limit_mw / 1000.0

    def idle_until(self, t_s: float) -> None:
        """Account idle power from the last accounted time up to `t_s` (no-op if already there)."""
        with self._mutex:
            self._idle_to(t_s)

    # ---- iterations ---------------------------------------------------------------------------

    def run_iteration(self, latency_at: LatencyAt, start_s: float) -> ExecutedIteration:
        """Run one iteration starting at `start_s` and account its energy."""
        with self._mutex:
            self._idle_to(start_s)
            plan = self._plan(latency_at, start_s)
            end_s = start_s + plan.breakdown.total_ms / 1000.0
            self._account_busy(start_s, end_s, plan.power_w)
            return ExecutedIteration(start_s, end_s, plan.clock_mhz, plan.breakdown, plan.power_w)

    # ---- internals (caller holds the mutex) ---------------------------------------------------

    def _check_permission(self, call: str) -> None:
        if not self._privileged:
            raise TwinNvmlError(
                NVML_ERROR_NO_PERMISSION,
                f"GPU {self.index}: {call} needs root (or the clock daemon): insufficient "
                "permissions",
            )

    def _request_locked(self, new: tuple[int, int] | None) -> None:
        at = self._time.now_s() + self._change_latency_s
        # A later request supersedes pending ones that would take effect after it.
        self._pending = [(t, v) for (t, v) in self._pending if t <= at]
        self._pending.append((at, new))

    def _lock_at(self, t_s: float) -> tuple[int, int] | None:
        """Lock in force at `t_s`, folding requests that are due into the current lock."""
        while self._pending and self._pending[0][0] <= t_s:
            self._lock_range = self._pending.pop(0)[1]
        return self._lock_range

    def _clock_at(self, t_s: float, *, loaded: bool) -> int:
        lock = self._lock_at(t_s)
        if not loaded:
            return lock[0] if lock is not None else idle_clock_mhz(self.spec)
        target = lock[1] if lock is not None else self.spec.max_sm_clock_mhz
        return min(target, self._cap_clock_mhz)

    def _plan(self, latency_at: LatencyAt, start_s: float) -> _Planned:
        """Pick the clock (lock, pending change, power cap), time the iteration at it.

        The board's power controller steps the clock down until power is under the limit, and
        tries one step up per iteration while it is below its target, keeping it if it fits.
        """
        spec = self.spec
        step = spec.clock_step_mhz
        lock = self._lock_at(start_s)
        target = lock[1] if lock is not None else spec.max_sm_clock_mhz
        limit_w = self._power_limit_w
        clock = min(target, self._cap_clock_mhz)
        if clock < target and self._headroom_for_step_up(clock, clock + step):
            up = self._time_at(latency_at, clock + step)
            if up.kernel_power_w <= limit_w:
                self._cap_clock_mhz = min(clock + step, spec.max_sm_clock_mhz)
                self._last_kernel_w = up.kernel_power_w
                return self._changed_midway(latency_at, start_s, up)
        plan = self._under_limit(latency_at, clock)
        self._last_kernel_w = plan.kernel_power_w
        return self._changed_midway(latency_at, start_s, plan)

    def _under_limit(self, latency_at: LatencyAt, clock_mhz: int) -> _Planned:
        """Timed at `clock_mhz`, or as many steps lower as the power limit needs."""
        step, floor = self.spec.clock_step_mhz, self.spec.min_sm_clock_mhz
        plan = self._time_at(latency_at, clock_mhz)
        while plan.kernel_power_w > self._power_limit_w and plan.clock_mhz - step >= floor:
            plan = self._time_at(latency_at, plan.clock_mhz - step)
            self._cap_clock_mhz = plan.clock_mhz
        return plan

    def _changed_midway(self, latency_at: LatencyAt, start_s: float, plan: _Planned) -> _Planned:
        """`plan` with the rest of its work at the new clock when a requested change takes
        effect before it ends (a long prefill at a low clock is not held there to its end)."""
        if not self._pending:
            return plan
        at_s, lock = self._pending[0]
        done_s = at_s - start_s
        total_s = plan.breakdown.total_ms / 1000.0
        if not 0.0 < done_s < total_s:
            return plan
        target = lock[1] if lock is not None else self.spec.max_sm_clock_mhz
        clock = min(target, self._cap_clock_mhz)
        if clock == plan.clock_mhz:
            return plan
        rest = self._under_limit(latency_at, clock)
        share = done_s / total_s  # of the work, done at the old clock
        rest_s = (1.0 - share) * rest.breakdown.total_ms / 1000.0
        a, b = plan.breakdown, rest.breakdown
        w1, w2 = done_s / (done_s + rest_s), rest_s / (done_s + rest_s)
        blended = LatencyBreakdown(
            sm_clock_mhz=a.sm_clock_mhz,
            dense_ms=share * a.dense_ms + (1.0 - share) * b.dense_ms,
            attention_ms=share * a.attention_ms + (1.0 - share) * b.attention_ms,
            communication_ms=share * a.communication_ms + (1.0 - share) * b.communication_ms,
            overhead_ms=share * a.overhead_ms + (1.0 - share) * b.overhead_ms,
            sm_activity=w1 * a.sm_activity + w2 * b.sm_activity,
            dram_activity=w1 * a.dram_activity + w2 * b.dram_activity,
        )
        power_w = w1 * plan.power_w + w2 * rest.power_w
        self._last_kernel_w = rest.kernel_power_w
        return _Planned(plan.clock_mhz, blended, power_w, rest.kernel_power_w)

    def _headroom_for_step_up(self, clock_mhz: int, up_mhz: int) -> bool:
        """Would one step up stay under the limit, judging by the last measured power? Scales
        the power above idle by the switching factor: a slight overestimate (memory power does
        not scale), so the controller never steps up into a certain overshoot."""
        pm = self._power
        idle_w = self.spec.idle_power_w
        s_now = pm.switching_scale(clock_mhz)
        if s_now <= 0.0:
            return True
        est_w = idle_w + (self._last_kernel_w - idle_w) * pm.switching_scale(up_mhz) / s_now
        return est_w <= self._power_limit_w

    def _time_at(self, latency_at: LatencyAt, clock_mhz: int) -> _Planned:
        b = latency_at(clock_mhz)
        mean_w, kernel_w = self._power.iteration_w(
            clock_mhz, b.sm_activity, b.dram_activity, b.gpu_ms, b.overhead_ms
        )
        return _Planned(clock_mhz, b, mean_w, kernel_w)

    def _idle_to(self, t_s: float) -> None:
        if t_s <= self._integrated_to_s:
            return
        start = self._integrated_to_s
        # Right after an iteration the clock stays up for LOADED_CLOCK_HOLD_S, then drops.
        hold_end = min(t_s, max(start, self._last_end_s + LOADED_CLOCK_HOLD_S))
        energy_j = 0.0
        if hold_end > start:
            held = self._clock_at(start, loaded=True)
            energy_j += self._power.idle_w(held) * (hold_end - start)
        if t_s > hold_end:
            idle = self._clock_at(hold_end, loaded=False)
            energy_j += self._power.idle_w(idle) * (t_s - hold_end)
            # Idle far under the limit, the power controller releases its clock ceiling.
            self._cap_clock_mhz = self.spec.max_sm_clock_mhz
        self._energy_mj += energy_j * 1000.0
        self._last_power_w = energy_j / (t_s - start)
        self._integrated_to_s = t_s

    def _account_busy(self, start_s: float, end_s: float, power_w: float) -> None:
        if end_s > start_s:
            self._energy_mj += power_w * (end_s - start_s) * 1000.0
        self._last_power_w = power_w
        self._integrated_to_s = max(self._integrated_to_s, end_s)
        self._last_end_s = max(self._last_end_s, end_s)


class TwinGpuGroup:
    """The tensor-parallel GPUs of one engine. Collectives synchronise them every layer, so the
    slowest GPU (lowest clock) paces the group; faster GPUs spend the difference waiting in the
    collective at low activity."""

    def __init__(self, gpus: Sequence[TwinGpu]) -> None:
        if not gpus:
            raise ValueError("a GPU group needs at least one GPU")
        self.gpus = list(gpus)

    def run_iteration(self, latency_at: LatencyAt, start_s: float) -> ExecutedIteration:
        if len(self.gpus) == 1:
            return self.gpus[0].run_iteration(latency_at, start_s)
        # Take every GPU's lock in index order (a fixed order, so no deadlock between groups).
        ordered = sorted(self.gpus, key=lambda g: g.index)
        for g in ordered:
            g._mutex.acquire()
        try:
            # GPUs of a group usually run at the same clock: time each clock once.
            memo: dict[int, LatencyBreakdown] = {}

            def memo_at(clock_mhz: int) -> LatencyBreakdown:
                b = memo.get(clock_mhz)
                if b is None:
                    b = memo[clock_mhz] = latency_at(clock_mhz)
                return b

            plans = []
            for g in self.gpus:
                g._idle_to(start_s)
                plans.append(g._plan(memo_at, start_s))
            slowest = max(plans, key=lambda p: p.breakdown.total_ms)
            end_s = start_s + slowest.breakdown.total_ms / 1000.0
            powers = []
            for g, p in zip(self.gpus, plans, strict=True):
                power = _paced_power_w(g, p, slowest.breakdown.total_ms)
                g._account_busy(start_s, end_s, power)
                powers.append(power)
            return ExecutedIteration(
                start_s, end_s, slowest.clock_mhz, slowest.breakdown, sum(powers) / len(powers)
            )
        finally:
            for g in reversed(ordered):
                g._mutex.release()

    def idle_until(self, t_s: float) -> None:
        for g in self.gpus:
            g.idle_until(t_s)

    def total_energy_mj(self) -> int:
        return sum(g.total_energy_mj() for g in self.gpus)


def _paced_power_w(gpu: TwinGpu, plan: _Planned, paced_ms: float) -> float:
    """Mean power of a GPU that finished its share in plan time but waits for the group: the
    wait is spent spinning in the collective at its clock with no useful activity."""
    own_ms = plan.breakdown.total_ms
    if paced_ms <= own_ms or paced_ms <= 0:
        return plan.power_w
    waiting_w = gpu._power.iteration_w(plan.clock_mhz, 0.0, 0.0, 1.0, 0.0)[1]
    return (plan.power_w * own_ms + waiting_w * (paced_ms - own_ms)) / paced_ms
