"""Board power of a twin GPU from its SM clock and how busy an iteration keeps it.

    idle:  P = P_idle + P_clock(f)
    busy:  P = P_idle + P_static * s(f) + P_core * a_sm * s(f) + P_mem * a_dram

    V(f) = v_floor                                          f <= f_knee
         = v_floor + (1 - v_floor) * (f - f_knee) / (f_max - f_knee)   above  (V(f_max) = 1)
    s(f) = (f / f_max) * V(f)^2        CMOS switching power relative to max clock

- `P_idle` (gpu.idle_power_w) is what the board draws at its idle clock with nothing running:
  HBM refresh, VRMs, fans/board logic, leakage at the floor voltage.
- `P_clock(f)`: a GPU whose clock is locked high but has no work keeps its clock tree toggling
  and its rails at V(f), so it draws a little more than at the idle clock:
  physics.locked_idle_w at max clock, scaled by (s(f) - s(f_idle)) / (1 - s(f_idle)). The one
  public data point: an A100-80GB with a context resident at 1155 MHz and 0% utilisation drew
  68.4 W against 62.1 W at idle (gpu_facts.csv), i.e. ~12 W at max clock.
  When kernels run, this part is inside `P_static` (which includes the clock tree).
- `P_static` (physics.static_active_w) is the extra power of a GPU that executes kernels, even
  memory-bound ones: warp schedulers, L2, crossbar and register files toggle at the SM clock. It
  is switching power, so it scales with s(f): this is why a memory-bound decode at max clock
  still draws hundreds of watts, and why lowering its clock saves energy.
- `P_core` (physics.core_dynamic_w) is the tensor/ALU switching power at full compute activity.
- `P_mem` (physics.mem_dynamic_w): HBM and memory-path power at full bandwidth. The memory clock
  is fixed, so it depends on the bytes moved, not on the SM clock.

Because V rises with f above the knee, s(f) grows faster than linearly in f: at max clock a step
down in clock saves more power than the time it costs, which is the premise of clock throttling.
The power cap is not applied here; gpu.py lowers the clock until this function is under it.
"""

from __future__ import annotations

from .hardware import GpuSpec


def voltage_ratio(gpu: GpuSpec, sm_clock_mhz: float) -> float:
    """Core voltage relative to the voltage at max clock: flat below the knee, linear above."""
    ph = gpu.physics
    knee = ph.voltage_knee_mhz
    f_max = gpu.max_sm_clock_mhz
    if sm_clock_mhz <= knee or f_max <= knee:
        return ph.voltage_floor_ratio
    rise = (min(sm_clock_mhz, f_max) - knee) / (f_max - knee)
    return ph.voltage_floor_ratio + (1.0 - ph.voltage_floor_ratio) * rise


def switching_scale(gpu: GpuSpec, sm_clock_mhz: float) -> float:
    """f * V(f)^2 relative to max clock: how dynamic (switching) power scales with the clock."""
    v = voltage_ratio(gpu, sm_clock_mhz)
    return (sm_clock_mhz / gpu.max_sm_clock_mhz) * v * v


def idle_clock_mhz(gpu: GpuSpec) -> int:
    """The clock an unlocked GPU drops to with no work (the board's lowest clock)."""
    return gpu.min_sm_clock_mhz


def iteration_power_w(
    gpu: GpuSpec,
    sm_clock_mhz: float,
    sm_activity: float,
    dram_activity: float,
    gpu_ms: float,
    overhead_ms: float,
) -> tuple[float, float]:
    """(mean power over the whole iteration, power while kernels run) in watts.

    Kernels run for `gpu_ms` with the given activities; during the engine's CPU `overhead_ms` the
    GPU waits at the same (held) clock with no kernels.
    """
    kernel_w = gpu_power_w(gpu, sm_clock_mhz, sm_activity, dram_activity, busy=True)
    total_ms = gpu_ms + overhead_ms
    if overhead_ms <= 0.0 or total_ms <= 0.0:
        return kernel_w, kernel_w
    waiting_w = gpu_power_w(gpu, sm_clock_mhz, 0.0, 0.0, busy=False)
    return (kernel_w * gpu_ms + waiting_w * overhead_ms) / total_ms, kernel_w


def gpu_power_w(
    gpu: GpuSpec,
    sm_clock_mhz: float,
    sm_activity: float,
    dram_activity: float,
    busy: bool,
) -> float:
    """Mean board power in watts over an interval at one SM clock (uncapped).

    `sm_activity` and `dram_activity` are 0..1 averages over the interval (see LatencyBreakdown);
    `busy` is False for idle gaps, where only the idle and clock-tree parts remain.
    """
    ph = gpu.physics
    s = switching_scale(gpu, sm_clock_mhz)
    if not busy:
        s_idle = switching_scale(gpu, idle_clock_mhz(gpu))
        held = max(0.0, s - s_idle) / (1.0 - s_idle) if s_idle < 1.0 else 0.0
        return gpu.idle_power_w + ph.locked_idle_w * held
    a_sm = min(max(sm_activity, 0.0), 1.0)
    a_dram = min(max(dram_activity, 0.0), 1.0)
    return (
        gpu.idle_power_w
        + (ph.static_active_w + ph.core_dynamic_w * a_sm) * s
        + ph.mem_dynamic_w * a_dram
    )


class PowerModel:
    """`gpu_power_w` for one board with the per-clock terms cached: the GPU calls it once or
    twice per simulated iteration. Gives the same numbers as the pure functions above."""

    __slots__ = ("_by_clock", "gpu")

    def __init__(self, gpu: GpuSpec) -> None:
        self.gpu = gpu
        self._by_clock: dict[float, tuple[float, float]] = {}

    def _terms(self, sm_clock_mhz: float) -> tuple[float, float]:
        """(s(f), idle power at f) for one clock."""
        terms = self._by_clock.get(sm_clock_mhz)
        if terms is None:
            if len(self._by_clock) >= 1024:  # callers passing arbitrary floats
                self._by_clock.clear()
            terms = (
                switching_scale(self.gpu, sm_clock_mhz),
                gpu_power_w(self.gpu, sm_clock_mhz, 0.0, 0.0, busy=False),
            )
            self._by_clock[sm_clock_mhz] = terms
        return terms

    def switching_scale(self, sm_clock_mhz: float) -> float:
        return self._terms(sm_clock_mhz)[0]

    def idle_w(self, sm_clock_mhz: float) -> float:
        return self._terms(sm_clock_mhz)[1]

    def iteration_w(
        self,
        sm_clock_mhz: float,
        sm_activity: float,
        dram_activity: float,
        gpu_ms: float,
        overhead_ms: float,
    ) -> tuple[float, float]:
        """Same as `iteration_power_w`."""
        s, waiting_w = self._terms(sm_clock_mhz)
        gpu = self.gpu
        ph = gpu.physics
        a_sm = 0.0 if sm_activity < 0.0 else (1.0 if sm_activity > 1.0 else sm_activity)
        a_dram = 0.0 if dram_activity < 0.0 else (1.0 if dram_activity > 1.0 else dram_activity)
        kernel_w = (
            gpu.idle_power_w
            + (ph.static_active_w + ph.core_dynamic_w * a_sm) * s
            + ph.mem_dynamic_w * a_dram
        )
        total_ms = gpu_ms + overhead_ms
        if overhead_ms <= 0.0 or total_ms <= 0.0:
            return kernel_w, kernel_w
        return (kernel_w * gpu_ms + waiting_w * overhead_ms) / total_ms, kernel_w
