"""`throttllem controller`: the sidecar that runs beside Triton, one controller per instance.

Finds every instance of the served model in the discovery registry, subscribes to its telemetry,
keeps a scoreboard, decides clocks, and actuates through the instance's clock driver (the twin's
GpuControl, NVML, or the clock daemon). Whatever ends it, the GPUs go back to default clocks:
on exit the drivers reset; when an instance's telemetry is lost for longer than
`telemetry_timeout_s`, its GPUs are reset until it comes back.
"""

from __future__ import annotations

import gc
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from throttllem.backend.telemetry.discovery import discover

from .control_loop import ControllerConfig, DriverActuator, InstanceController
from .events import Arrived, Finished, Iteration, Slo
from .gpu.driver import ClockDriver
from .gpu.errors import GpuLost, LeaseConflict
from .gpu.guarded import GuardedClockDriver
from .ips_table import IpsTable
from .length_keeper import LengthKeeper
from .length_predictor import LengthPredictor
from .max_clock_estimate import MaxClockEnergyEstimate
from .metrics import ControllerMetrics
from .perf_model import PerformanceModel
from .projection import Admission, EngineLimits
from .scaling.rate_meter import ArrivalRateMeter
from .scoreboard import Scoreboard
from .telemetry_client import Delivery, InstanceLink, slo_from_pb

log = logging.getLogger(__name__)

ModelSource = Callable[[InstanceLink], PerformanceModel | None]
DriverSource = Callable[[InstanceLink], ClockDriver]


@dataclass
class SidecarConfig:
    # The model whose instances are controlled, and the name arrivals are counted under (the
    # meter, the scalers). With instance scaling it is the router model, which has no engine.
    model_name: str = "tensorrt_llm"
    # More models whose instances are controlled the same way, their arrivals counted under
    # model_name: the sized variants behind the router (tensorrt_llm_tp1, tensorrt_llm_tp2...).
    watch_models: tuple[str, ...] = ()
    registry_dir: Path | None = None
    default_slo: Slo = field(default_factory=Slo)
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    telemetry_timeout_s: float = 3.0
    tick_s: float = 0.01
    discover_every_s: float = 1.0
    # Per-GPU idle power for the energy floor (ips_table.py); None: the preset's for a twin,
    # else 0 (the floor then weighs whole iteration energy: conservative, higher clocks).
    idle_power_w: float | None = None
    # Where each LLM's learned output lengths are kept across restarts (length_memory.py);
    # None: every start learns afresh.
    lengths_dir: Path | None = None
    lengths_save_every_s: float = 60.0
    # How clients' length hints are used (length_predictor.HINT_USES).
    length_hints: str = "cap"


@dataclass
class ManagedInstance:
    link: InstanceLink
    driver: ClockDriver
    controller: InstanceController | None  # None: observe only (no performance model)
    energy_start_mj: int
    tokens: int = 0
    reset_for_silence: bool = False
    # Energy at maximum clock for the saving ratio; None: not estimated (no power model, or
    # no idle power to weigh the span with).
    estimate: MaxClockEnergyEstimate | None = None


class Sidecar:
    def __init__(
        self,
        config: SidecarConfig,
        models: ModelSource,
        drivers: DriverSource,
        metrics: ControllerMetrics | None = None,
        meter: ArrivalRateMeter | None = None,
    ) -> None:
        self.config = config
        # Demand for the scalers (KEDA's external scaler, the in-node scaler): arrivals on the
        # meter's own wall clock, never the engines' (a sped-up twin would inflate the rate).
        self.meter = meter
        self._queued: dict[str, int] = {}
        self._models = models
        self._drivers = drivers
        self.metrics = metrics or ControllerMetrics()
        self.instances: dict[str, ManagedInstance] = {}
        self._inbox: queue.Queue[Delivery] = queue.Queue()
        self._next_discovery = 0.0
        # Learned output lengths kept across restarts: seeded, saved every so often, off the loop.
        self.lengths = LengthKeeper(
            config.lengths_dir,
            config.lengths_save_every_s,
            time.monotonic(),
            hints=config.length_hints,
        )

    # ---- set-up -------------------------------------------------------------------------------

    def _attach(self, endpoint: str) -> None:
        try:
            link = InstanceLink(endpoint, self._inbox)
        except Exception as e:
            log.warning("cannot attach to %s: %s", endpoint, e)
            return
        try:
            self._attach_link(endpoint, link)
        except GpuLost as e:  # it died between its registration and now: nothing locked yet
            log.warning("%s went away while attaching (%s): skipped", endpoint, e)
            link.close()

    def _attach_link(self, endpoint: str, link: InstanceLink) -> None:
        info = link.info
        driver = self._drivers(link)
        model = self._models(link)
        controller = None
        table: IpsTable | None = None
        slo = self.config.default_slo
        if info.HasField("default_slo"):
            slo = slo.overridden_by(slo_from_pb(info.default_slo))
        self.metrics.set_slo_targets(info.instance_name, slo.ttft_s, slo.tbt_s, slo.e2e_s)
        if model is not None:
            clocks = list(driver.supported_clocks_mhz(driver.gpu_indices()[0]))
            limits = EngineLimits(
                info.max_batch_size,
                int(info.kv_max_blocks),
                info.kv_tokens_per_block,
                Admission.MAX_UTILIZATION
                if info.scheduler_policy == "MAX_UTILIZATION"
                else Admission.GUARANTEED_NO_EVICT,
                max_num_tokens=info.max_num_tokens,
            )
            table = IpsTable(
                model,
                clocks,
                tp=info.tp_size,
                max_batch=info.max_batch_size,
                kv_capacity_blocks=int(info.kv_max_blocks),
                tokens_per_block=info.kv_tokens_per_block,
                idle_power_w=self._idle_power_w(info.engine_kind, info.gpu_name),
            )
            predictor = self.lengths.new_predictor(
                info.llm, info.instance_name, self._predictors(info.llm)
            )
            board = Scoreboard(predictor, slo, info.kv_tokens_per_block)
            controller = InstanceController(
                board, table, limits, DriverActuator(driver), self.config.controller
            )
        else:
            log.warning("%s: no performance model: observing only", info.instance_name)
        # The table and the rest of the set-up live as long as the instance: keep them out of
        # the garbage collector's scans so they do not stretch decision latency.
        gc.collect()
        gc.freeze()
        total = sum(driver.total_energy_mj(g) for g in driver.gpu_indices())
        estimate = None
        if table is not None and table.has_power:
            if table.idle_power_w > 0:
                gpus = len(driver.gpu_indices())
                estimate = MaxClockEnergyEstimate(table, gpus, link.clock.now_s())
            else:
                log.info(
                    "%s: no idle power for its GPUs (--gpu-idle-power-w): the energy saving "
                    "against maximum clock is not estimated",
                    info.instance_name,
                )
        self.instances[endpoint] = ManagedInstance(
            link, driver, controller, total, estimate=estimate
        )
        log.info(
            "controlling %s (%s, %s TP%d) at %s",
            info.instance_name,
            info.engine_kind,
            info.llm,
            info.tp_size,
            endpoint,
        )

    def _predictors(self, llm: str) -> list[LengthPredictor]:
        return [
            inst.controller.scoreboard.predictor
            for inst in self.instances.values()
            if inst.controller is not None and inst.link.info.llm == llm
        ]

    def _llms(self) -> list[str]:
        return [inst.link.info.llm for inst in self.instances.values()]

    def save_lengths(self) -> None:
        """Save every LLM's learned lengths now (length_keeper.py; with a lengths folder)."""
        self.lengths.save(self._llms(), self._predictors)

    def _idle_power_w(self, engine_kind: str, gpu_name: str) -> float:
        if self.config.idle_power_w is not None:
            return self.config.idle_power_w
        if engine_kind != "twin":
            return 0.0
        from throttllem.backend.twin.hardware import default_catalog

        try:
            return default_catalog().gpu(gpu_name).idle_power_w
        except Exception:
            return 0.0

    def watched_models(self) -> tuple[str, ...]:
        """model_name and every name in watch_models, once each."""
        return tuple(dict.fromkeys((self.config.model_name, *self.config.watch_models)))

    def discover(self) -> None:
        seen = set()
        for model in self.watched_models():
            for entry in discover(self.config.registry_dir, model):
                seen.add(entry.endpoint)
                if entry.endpoint not in self.instances:
                    self._attach(entry.endpoint)
        for endpoint in list(self.instances):
            if endpoint not in seen and not self.instances[endpoint].link.connected:
                self._detach(endpoint)

    def _detach(self, endpoint: str, save_lengths: bool = True) -> None:
        if save_lengths:  # before it goes: what it learned stays in the file
            self.lengths.save([self.instances[endpoint].link.info.llm], self._predictors)
        inst = self.instances.pop(endpoint)
        self._queued.pop(endpoint, None)
        self.metrics.forget_instance(inst.link.info.instance_name)
        try:
            inst.link.close()
        except Exception as e:  # the GPUs must be reset whatever the link does
            log.info("closing the telemetry link of %s: %s", endpoint, e)
        try:
            inst.driver.close()
        except Exception as e:
            log.info("closing the driver of %s: %s", endpoint, e)
        # Closing reset this instance's GPUs. Another instance on any of them (a variant loaded
        # beside it on the same GPUs) must write its clock again, not skip it as unchanged.
        gone = set(inst.driver.gpu_indices())
        for other in self.instances.values():
            shared = sorted(gone.intersection(other.driver.gpu_indices()))
            if shared and isinstance(other.driver, GuardedClockDriver):
                other.driver.forget(shared)
                if other.controller is not None:
                    other.controller.governor.forget()

    # ---- the loop -----------------------------------------------------------------------------

    def step(self) -> None:
        """One tick: take in telemetry, decide where due, guard against silence."""
        now_wall = time.monotonic()
        if now_wall >= self._next_discovery:
            self.discover()
            self._next_discovery = now_wall + self.config.discover_every_s
        while True:
            try:
                delivery = self._inbox.get_nowait()
            except queue.Empty:
                break
            inst = self.instances.get(delivery.endpoint)
            if inst is None or inst.controller is None:
                continue
            if delivery.snapshot is not None:
                inst.controller.rebuild(delivery.snapshot)
            for ev in delivery.events:
                inst.controller.observe(ev)
                if isinstance(ev, Finished):
                    inst.tokens += ev.output_tokens
                elif isinstance(ev, Arrived) and self.meter is not None:
                    self.meter.record_arrival(self.config.model_name)
                elif isinstance(ev, Iteration):
                    self._queued[delivery.endpoint] = ev.queued_requests
                    if inst.estimate is not None:
                        scheduled = ev.context_requests + ev.generation_requests
                        inst.estimate.add_iteration(
                            scheduled or ev.active_requests, ev.kv_used_blocks, ev.ctx_tokens
                        )
        for inst in self.instances.values():
            if inst.controller is not None:  # drained every step: the list must not grow
                name = inst.link.info.instance_name
                for o in inst.controller.take_outcomes():
                    self.metrics.record_request(name, o.ttft_s, o.mean_tbt_s, o.e2e_s)
        if self.meter is not None:
            live = sum(n for e, n in self._queued.items() if e in self.instances)
            self.meter.set_queued(self.config.model_name, live)
        for inst in list(self.instances.values()):  # a tick may detach its instance
            self._tick(inst, now_wall)
        self.lengths.tick(now_wall, self._llms(), self._predictors)

    def _tick(self, inst: ManagedInstance, now_wall: float) -> None:
        name = inst.link.info.instance_name
        silent = now_wall - inst.link.last_heard_monotonic > self.config.telemetry_timeout_s
        if silent and not inst.link.connected:
            if not inst.reset_for_silence:
                log.warning(
                    "%s: telemetry lost for %.1f s: GPUs back to default clocks",
                    name,
                    self.config.telemetry_timeout_s,
                )
                try:
                    inst.driver.reset_locked_clocks(inst.driver.gpu_indices())
                except Exception as e:
                    log.warning("%s: reset failed: %s", name, e)
                if inst.controller is not None:
                    inst.controller.governor.forget()
                inst.reset_for_silence = True
            return
        inst.reset_for_silence = False
        if inst.controller is None:
            return
        started = time.perf_counter()
        try:
            decision = inst.controller.maybe_decide(inst.link.clock.now_s())
        except LeaseConflict as e:
            # Another client of the clock daemon holds this instance's GPUs: nothing was
            # written. Observe this instance only; the others (and the controller) go on.
            log.warning(
                "%s: %s: another client of the clock daemon holds its GPUs; observing this "
                "instance only (its clocks are not changed)",
                name,
                e,
            )
            self._observe_only(inst, f"lease conflict: {e}")
            return
        except GpuLost as e:
            # The instance's GPUs are gone (its process died, taking the twin's GPU control
            # with it, or the board fell off the bus): so is its engine. Drop the instance,
            # keep controlling the others; discovery brings it back if it returns.
            log.error("%s: GPUs lost (%s): dropping this instance, the others carry on", name, e)
            self._detach(inst.link.endpoint)
            return
        if decision is not None:
            self.metrics.record(name, decision, time.perf_counter() - started)
            self.metrics.attainment.labels(name).set(inst.controller.scoreboard.attainment())
            error = inst.controller.scoreboard.predictor.error()
            if error.count:
                self.metrics.length_error.labels(name).set(error.mean_abs_pct_error)
                self.metrics.length_under.labels(name).set(error.under_predicted_share)
            last = inst.controller.last_iteration
            if last is not None and last.latency_s > 0:
                self.metrics.observed_ips.labels(name).set(1.0 / last.latency_s)
            try:
                total = sum(inst.driver.total_energy_mj(g) for g in inst.driver.gpu_indices())
                energy_j = (total - inst.energy_start_mj) / 1000.0
                self.metrics.record_energy(name, energy_j, inst.tokens)
                if inst.estimate is not None:
                    ratio = inst.estimate.saving_ratio(energy_j, inst.link.clock.now_s())
                    if ratio is not None:
                        self.metrics.energy_saving.labels(name).set(ratio)
            except Exception as e:
                log.debug("%s: energy reading failed: %s", name, e)

    def _observe_only(self, inst: ManagedInstance, reason: str) -> None:
        if isinstance(inst.driver, GuardedClockDriver):
            inst.driver.enter_observe_only(reason)  # keeps deciding and exporting metrics
        else:
            inst.controller = None

    def run(self, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                self.step()
                stop.wait(self.config.tick_s)
        finally:
            self.close()

    def close(self) -> None:
        try:
            self.save_lengths()  # all at once: detaching one by one would save fewer each time
        finally:
            for endpoint in list(self.instances):
                self._detach(endpoint, save_lengths=False)
