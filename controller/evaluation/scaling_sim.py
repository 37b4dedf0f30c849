"""Instance scaling in virtual time: several engine sizes of one model, one active at a time.

Each size is a twin engine on its own GPUs with its own virtual clock; a discrete-event loop
always advances whichever comes first: the next arrival or the busy engine that is furthest
behind. Arrivals go to the active engine. When the scaler (scaling/scaler.py) picks another
size, that engine is loaded: it draws idle power for `cold_start_s` while the old one keeps
serving (shadow instancing), then takes the traffic; the old one finishes what it holds and is
retired, its GPUs back to default clocks and out of the energy account. Energy counts every GPU
of every loaded engine, warming and draining ones included: the switch cost.

Per engine, a clock policy from policies.py: `max` for the scaling-only and fixed baselines,
the product's controller for `clocks-only` and `throttllem`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from throttllem.backend.twin.executor import TwinExecutor
from throttllem.backend.twin.executor_api import Request
from throttllem.backend.twin.factory import build_twin_engine
from throttllem.backend.twin.gpu import TwinGpuGroup

from ..control_loop import DriverActuator
from ..events import Arrived, Finished, Slo
from ..gpu.twin_driver import TwinDriver
from ..scaling.rate_meter import ArrivalRateMeter
from ..scaling.scaler import EngineSize, InstanceScaler, ScaleDecision, ScalerConfig
from .simulator import (
    EngineSetup,
    Policy,
    SimContext,
    SimResult,
    events_from_responses,
    iteration_event,
)
from .workload import Workload

DEFAULT_COLD_START_S = 20.0
TIMELINE_EVERY_S = 0.5
RATE_WINDOW_S = 30.0
MODEL = "engine"


@dataclass
class _Slot:
    """One loaded engine."""

    size: EngineSize
    executor: TwinExecutor
    gpus: TwinGpuGroup
    policy: Policy
    clocks: DriverActuator
    energy_at_load_mj: int
    ready_s: float
    max_tokens: Callable[[int, int], int]  # (prompt, output) -> the max_tokens a client sends
    index_of: dict[int, int] = field(default_factory=dict)  # engine request id -> request index
    in_flight: int = 0
    queued: int = 0
    started: set[int] = field(default_factory=set)
    tokens: dict[int, int] = field(default_factory=dict)
    first: dict[int, float] = field(default_factory=dict)
    done: dict[int, float] = field(default_factory=dict)
    clock_mhz: float = float("nan")

    def now(self) -> float:
        return self.executor.time.now_s()

    def energy_mj(self) -> int:
        return self.gpus.total_energy_mj() - self.energy_at_load_mj


@dataclass
class ScalingResult:
    result: SimResult
    decisions: list[ScaleDecision]
    size_timeline: list[tuple[float, str]]  # (time, size now taking traffic)


PolicyFactory = Callable[[EngineSize], Policy]


class ScalingSimulation:
    def __init__(
        self,
        setups: dict[str, EngineSetup],
        sizes: list[EngineSize],
        policy_for: PolicyFactory,
        slo: Slo,
        *,
        scaling: bool,
        start: str | None = None,
        cold_start_s: float = DEFAULT_COLD_START_S,
        scaler_config: ScalerConfig | None = None,
        name: str = "policy",
    ) -> None:
        if cold_start_s < 0:
            raise ValueError(f"cold start must be >= 0 s, got {cold_start_s}")
        self.setups, self.policy_for, self.slo = setups, policy_for, slo
        self.scaler = InstanceScaler(sizes, scaler_config, start)
        self.scaling = scaling
        self.cold_start_s = cold_start_s
        self.name = name
        self.now_s = 0.0
        self.meter = ArrivalRateMeter(RATE_WINDOW_S, clock=lambda: self.now_s, models=[MODEL])
        self.slots: list[_Slot] = []  # loaded: warming, active, draining
        self.active: _Slot | None = None
        self.warming: _Slot | None = None
        self.retired_energy_mj = 0
        self.clock_changes = 0
        self.decisions: list[ScaleDecision] = []
        self.size_timeline: list[tuple[float, str]] = []
        self.iter_latency: list[float] = []
        self.iter_gen: list[int] = []
        self.tl: tuple[list[float], list[float], list[float]] = ([], [], [])
        self._next_sample = 0.0

    # ---- engines -----------------------------------------------------------------------------

    def _load(self, size: EngineSize, at_s: float) -> _Slot:
        setup = self.setups[size.name]
        gpu, model = setup.specs()
        engine = build_twin_engine(
            gpu, model, setup.tp, mode="virtual", seed=setup.seed,
            latency_jitter=setup.latency_jitter, max_batch_size=setup.max_batch_size,
            iter_stats_max_iterations=16,
        )  # fmt: skip
        ex, gpus = engine.executor, engine.gpus
        if at_s > 0:
            ex.run_until(at_s)  # the engine did not exist before: its energy is not counted
        clocks = DriverActuator(TwinDriver(gpus.gpus))
        policy = self.policy_for(size)
        ctx = SimContext(
            setup, gpu, model, self.slo, clocks, ex.limits.max_batch_size,
            ex.kv.max_num_blocks, ex.kv.tokens_per_block, ex.limits.max_num_tokens,
        )  # fmt: skip
        policy.start(ctx)

        def max_tokens(prompt: int, output: int) -> int:
            return setup.max_tokens(prompt, output, model.max_context)

        slot = _Slot(size, ex, gpus, policy, clocks, gpus.total_energy_mj(), at_s, max_tokens)
        self.slots.append(slot)
        return slot

    def _retire(self, slot: _Slot) -> None:
        if slot.in_flight == 0 and slot.now() < self.now_s:
            slot.executor.run_until(self.now_s)  # idle, yet powered, until it is unloaded
        self.retired_energy_mj += slot.energy_mj()
        slot.clocks.reset()  # a retired engine's GPUs go back to default clocks
        self.clock_changes += slot.clocks.changes
        slot.executor.shutdown()
        self.slots.remove(slot)

    def _switch(self, decision: ScaleDecision) -> None:
        self.decisions.append(decision)
        target = next(s for s in self.scaler.sizes if s.name == decision.to_size)
        live = next((s for s in self.slots if s.size.name == target.name), None)
        if live is not None:  # still draining (or warming): it is loaded, take it back
            if live is not self.warming:
                self.warming = None
                self._activate(live)
            return
        if self.warming is not None and self.warming.in_flight == 0:
            self._retire(self.warming)  # a load overtaken by a newer decision
        self.warming = self._load(target, self.now_s)
        self.warming.ready_s = self.now_s + self.cold_start_s

    def _activate(self, slot: _Slot) -> None:
        self.active = slot
        self.size_timeline.append((self.now_s, slot.size.name))

    def _promote_ready(self) -> None:
        w = self.warming
        if w is not None and self.now_s >= w.ready_s:
            if w.now() < w.ready_s:
                w.executor.run_until(w.ready_s)
            self.warming = None
            self._activate(w)
            self._retire_drained()

    def _retire_drained(self) -> None:
        for slot in list(self.slots):
            if slot is not self.active and slot is not self.warming and slot.in_flight == 0:
                self._retire(slot)

    # ---- one engine iteration ----------------------------------------------------------------

    def _step(self, slot: _Slot) -> None:
        slot.policy.before_iteration(slot.now())
        stats = slot.executor.step()
        if stats is None:  # nothing to run after all (everything finished at the boundary)
            slot.in_flight = 0
            return
        now = slot.now()
        ib = stats.inflight_batching_stats
        self.iter_latency.append(stats.iter_latency_ms / 1000.0)
        self.iter_gen.append(ib.num_gen_requests)
        events = events_from_responses(
            slot.executor, now, slot.started, slot.tokens, slot.first, slot.done
        )
        for ev in events:
            slot.policy.observe(ev)
            if isinstance(ev, Finished):
                slot.in_flight -= 1
        slot.queued = stats.num_queued_requests
        slot.policy.observe(iteration_event(stats, now))
        twin = stats.twin
        if twin is not None:
            slot.clock_mhz = float(twin.sm_clock_mhz)
        if slot is self.active and now >= self._next_sample:
            self._next_sample = now + TIMELINE_EVERY_S
            self.tl[0].append(now)
            self.tl[1].append(slot.clock_mhz)
            self.tl[2].append(
                sum(g.power_usage_mw() for s in self.slots for g in s.gpus.gpus) / 1000.0
            )

    # ---- the run -----------------------------------------------------------------------------

    def run(
        self, workload: Workload, progress: Callable[[float], None] | None = None
    ) -> ScalingResult:
        reqs = workload.requests
        n = len(reqs)
        first_size = self.scaler.current_size
        self._activate(self._load(first_size, 0.0))
        owner: list[_Slot | None] = [None] * n
        rid_of = [0] * n
        i = 0
        prompts: dict[int, list[int]] = {}
        last_progress = 0.0
        while True:
            busy = [s for s in self.slots if s.in_flight > 0]
            t_engine = min((s.now() for s in busy), default=float("inf"))
            t_arrival = reqs[i].arrival_s if i < n else float("inf")
            if t_arrival == float("inf") and t_engine == float("inf"):
                break
            if t_arrival <= t_engine:
                self.now_s = max(self.now_s, t_arrival)
                self._promote_ready()
                self._scale()
                r = reqs[i]
                slot = self.active
                assert slot is not None
                if slot.in_flight == 0 and slot.now() < r.arrival_s:
                    slot.executor.run_until(r.arrival_s)
                ids = prompts.setdefault(r.prompt_tokens, [1] * r.prompt_tokens)
                max_tokens = slot.max_tokens(r.prompt_tokens, r.output_tokens)
                rid = slot.executor.enqueue_request(
                    Request(ids, max_tokens=max_tokens, streaming=True,
                            twin_output_len=r.output_tokens)
                )  # fmt: skip
                slot.index_of[rid] = i
                slot.in_flight += 1
                owner[i], rid_of[i] = slot, rid
                self.meter.record_arrival(MODEL, r.arrival_s)
                slot.policy.observe(
                    Arrived(rid, r.arrival_s, r.prompt_tokens, max_tokens, Slo(),
                            slot.policy.length_hint(r.output_tokens))
                )  # fmt: skip
                i += 1
            else:
                slot = min(busy, key=lambda s: s.now())
                self.now_s = max(self.now_s, slot.now())
                self._promote_ready()
                self._step(slot)
                self._retire_drained()
            if progress is not None and self.now_s - last_progress >= 5.0:
                last_progress = self.now_s
                progress(self.now_s)
        end_s = max([self.now_s, *(s.now() for s in self.slots)])
        self.now_s = end_s
        for slot in list(self.slots):
            self._retire(slot)
        return self._result(workload, owner, rid_of, end_s)

    def _scale(self) -> None:
        if not self.scaling or not self.scaler.due(self.now_s):
            return
        rate = self.meter.request_rate_rps(MODEL) or 0.0
        queued = sum(s.queued for s in self.slots)
        decision = self.scaler.update(self.now_s, rate, queued)
        if decision is not None:
            self._switch(decision)

    def _result(
        self, workload: Workload, owner: list[_Slot | None], rid_of: list[int], end_s: float
    ) -> ScalingResult:
        n = len(workload.requests)
        first = np.full(n, np.nan)
        finish = np.full(n, np.nan)
        tokens = np.zeros(n, dtype=np.int64)
        for k, slot in enumerate(owner):
            if slot is None:
                continue
            rid = rid_of[k]
            first[k] = slot.first.get(rid, np.nan)
            finish[k] = slot.done.get(rid, np.nan)
            tokens[k] = slot.tokens.get(rid, 0)
        result = SimResult(
            policy=self.name,
            arrival_s=np.array([r.arrival_s for r in workload.requests]),
            first_token_s=first,
            finish_s=finish,
            output_tokens=tokens,
            energy_j=self.retired_energy_mj / 1000.0,
            span_s=end_s,
            clock_changes=self.clock_changes,
            iter_latency_s=np.array(self.iter_latency),
            iter_gen=np.array(self.iter_gen, dtype=np.int64),
            timeline_t=np.array(self.tl[0]),
            timeline_clock=np.array(self.tl[1]),
            timeline_power=np.array(self.tl[2]),
        )
        return ScalingResult(result, self.decisions, self.size_timeline)
