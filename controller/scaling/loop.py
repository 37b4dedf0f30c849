"""The scaler in real time: every period, measured demand -> scaler -> switcher.

Runs on its own thread beside the clock controller; the sidecar (or a test) feeds the
ArrivalRateMeter. A failed switch is logged and retried at the next look; the router keeps
traffic on the size that serves it, so nothing is lost while a load fails.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .rate_meter import ArrivalRateMeter
from .scaler import InstanceScaler, ScaleDecision
from .scaler_metrics import ScalerMetrics
from .switcher import SwitchReport, TritonSwitcher

log = logging.getLogger(__name__)


@dataclass
class ScalingLoop:
    scaler: InstanceScaler
    switcher: TritonSwitcher
    meter: ArrivalRateMeter
    demand_model: str  # the name the meter counts arrivals under (the router's)
    variant_of: Callable[[str], str]  # size name -> Triton model name
    clock: Callable[[], float] = time.monotonic
    on_decision: Callable[[ScaleDecision], None] | None = None
    metrics: ScalerMetrics | None = None
    # Live instances of a Triton model (telemetry registry): a size with fewer than Triton's
    # configured count lost a process and is reloaded. None: no repair.
    live_instances: Callable[[str], int] | None = None
    decisions: list[ScaleDecision] = field(default_factory=list)
    switches: list[SwitchReport] = field(default_factory=list)
    repairs: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def look(self) -> ScaleDecision | None:
        """One periodic look; repairs the serving size, then switches when the scaler says so."""
        self._repair()
        rate = self.meter.request_rate_rps(self.demand_model) or 0.0
        decision = self.scaler.update(self.clock(), rate, self.meter.queued(self.demand_model))
        if self.metrics is not None:
            cfg, largest = self.scaler.config, self.scaler.sizes[-1]
            gpus = self.scaler.current_size.gpus
            self.metrics.record_look(
                self.demand_model, rate, gpus, largest.total_capacity_rps, cfg.margin
            )
        if decision is None:
            return None
        self.decisions.append(decision)
        if self.metrics is not None:
            self.metrics.record_decision(self.demand_model, decision)
        if self.on_decision is not None:
            self.on_decision(decision)
        try:
            self.switches.append(self.switcher.switch(self.variant_of(decision.to_size)))
        except Exception as e:  # SwitchError, or Triton refusing a load
            # Whatever the switch got to, the scaler follows the size the router serves.
            log.error("switch %s -> %s failed: %s", decision.from_size, decision.to_size, e)
            serving = self.switcher.current
            names = [s.name for s in self.scaler.sizes]
            matches = [i for i, n in enumerate(names) if self.variant_of(n) == serving]
            self.scaler.current = matches[0] if matches else names.index(decision.from_size)
        return decision

    def _repair(self) -> None:
        current = self.switcher.current
        if self.live_instances is None or current is None:
            return
        try:
            expected = self.switcher.expected_instances(current)
            alive = self.live_instances(current)
            if alive < expected:
                log.warning("%s: %d of %d instances alive: reloading it", current, alive, expected)
                self.switcher.repair(current)
                self.repairs += 1
        except Exception as e:
            log.error("repairing %s failed: %s", current, e)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="throttllem-scaler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.scaler.config.period_s / 4):
            if self.scaler.due(self.clock()):
                self.look()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30.0)
