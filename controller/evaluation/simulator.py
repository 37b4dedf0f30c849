"""Virtual-time simulation: a workload replayed against a twin engine, one policy in the loop.

One process, no threads, no wall clock: the engine advances virtual time by each iteration's
latency and idles the GPUs through gaps. Requests join at the first iteration boundary after
their arrival (as in a real engine), and are measured from their trace arrival time. The policy
sees the same events the controller gets from telemetry, and acts on the twin's GPUs through
the same NVML-like calls a clock driver makes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from throttllem.backend.twin.executor import TwinExecutor
from throttllem.backend.twin.executor_api import FinishReason, IterationStats, Request
from throttllem.backend.twin.factory import build_twin_engine
from throttllem.backend.twin.hardware import GpuSpec, ModelSpec, default_catalog

from ..control_loop import DriverActuator
from ..events import Arrived, Event, Finish, Finished, FirstToken, Iteration, Slo
from ..gpu.twin_driver import TwinDriver
from .workload import Workload

FloatArray = npt.NDArray[np.float64]
TIMELINE_EVERY_S = 0.5  # resolution of the clock/power timeline kept for plots
CLIENT_MAX_TOKENS = 2048  # the max_tokens clients send (the trace's outputs fit under it)

_FINISH = {
    FinishReason.END_ID: Finish.END_ID,
    FinishReason.LENGTH: Finish.LENGTH,
    FinishReason.STOP_WORDS: Finish.STOP_WORDS,
    FinishReason.CANCELLED: Finish.CANCELLED,
    FinishReason.TIMED_OUT: Finish.TIMED_OUT,
}


@dataclass(frozen=True)
class EngineSetup:
    gpu: str = "A100-SXM4-40GB"
    model: str = "llama-3-8b"
    tp: int = 1
    seed: int = 0
    latency_jitter: float = 0.02  # per-iteration noise, as a real GPU shows
    max_batch_size: int = 256
    client_max_tokens: int = CLIENT_MAX_TOKENS

    def specs(self) -> tuple[GpuSpec, ModelSpec]:
        catalog = default_catalog()
        return catalog.gpu(self.gpu), catalog.model(self.model)

    def max_tokens(self, prompt_tokens: int, output_tokens: int, max_context: int) -> int:
        """The max_tokens a request carries: what a client asks for, as `replay` sends it,
        never the length the trace says it will generate. The controller reads it (a length
        prediction never exceeds it) and the engine reserves KV blocks for it, so a simulation
        that passed the true length would hand the controller the answer and the engine a
        tighter reservation than any client gives. Never below the trace's output (clipped
        workloads fit), so no request is cut short."""
        return max(output_tokens, min(self.client_max_tokens, max_context - prompt_tokens))


@dataclass
class SimContext:
    """What a policy may use: the engine's facts and its GPUs' clocks (not its internals)."""

    setup: EngineSetup
    gpu: GpuSpec
    model: ModelSpec
    slo: Slo
    clocks: DriverActuator
    max_batch_size: int
    kv_capacity_blocks: int
    tokens_per_block: int
    max_num_tokens: int


class Policy(ABC):
    name: str = "policy"

    @abstractmethod
    def start(self, ctx: SimContext) -> None:
        """Before the first arrival."""

    def observe(self, ev: Event) -> None:  # noqa: B027 - most policies ignore events
        """Every telemetry event, in order."""

    def before_iteration(self, now_s: float) -> None:  # noqa: B027
        """Between two engine iterations: the time to decide and actuate."""

    def length_hint(self, true_tokens: int) -> int | None:
        """The `output_length_hint` the next arriving request carries, given its true length
        (called once per arrival, in arrival order); None: no hint, as most clients send."""
        return None

    def choice_seconds(self, end_s: float) -> dict[str, float]:
        """Seconds under each kind of clock choice up to `end_s` (clock_policy.ChoiceKind's
        values); empty for a policy that does not say why."""
        return {}


@dataclass
class SimResult:
    policy: str
    arrival_s: FloatArray
    first_token_s: FloatArray  # nan when never
    finish_s: FloatArray
    output_tokens: npt.NDArray[np.int64]
    energy_j: float
    span_s: float
    clock_changes: int
    iter_latency_s: FloatArray  # per iteration
    iter_gen: npt.NDArray[np.int64]  # generating requests per iteration
    timeline_t: FloatArray = field(default_factory=lambda: np.zeros(0))
    timeline_clock: FloatArray = field(default_factory=lambda: np.zeros(0))
    timeline_power: FloatArray = field(default_factory=lambda: np.zeros(0))
    # Seconds under each kind of clock choice, for policies that say why (throttllem, oracle).
    choice_seconds: dict[str, float] = field(default_factory=dict)


def events_from_responses(
    ex: TwinExecutor,
    now_s: float,
    started: set[int],
    tokens: dict[int, int],
    first: dict[int, float],
    done: dict[int, float],
) -> list[Event]:
    events: list[Event] = []
    for resp in ex.await_responses():
        rid = resp.request_id
        if resp.has_error():
            done[rid] = now_s
            events.append(Finished(rid, now_s, tokens.get(rid, 0), Finish.ERROR))
            continue
        result = resp.result
        n = len(result.output_token_ids[0])
        tokens[rid] = tokens.get(rid, 0) + n
        if rid not in started and n:
            started.add(rid)
            first[rid] = now_s
            events.append(FirstToken(rid, now_s, n))
        if result.is_final:
            done[rid] = now_s
            reason = _FINISH.get(FinishReason(result.finish_reasons[0]), Finish.END_ID)
            events.append(Finished(rid, now_s, tokens[rid], reason))
    return events


def iteration_event(stats: IterationStats, now_s: float) -> Iteration:
    """The controller's view of one twin iteration (what telemetry would carry)."""
    ib, kv = stats.inflight_batching_stats, stats.kv_cache_stats
    return Iteration(
        stats.iter,
        now_s,
        stats.iter_latency_ms / 1000.0,
        stats.num_active_requests,
        stats.num_queued_requests,
        ib.num_context_requests,
        ib.num_gen_requests,
        ib.num_ctx_tokens,
        kv.used_num_blocks,
        kv.max_num_blocks,
        kv.tokens_per_block,
    )


def simulate(
    workload: Workload,
    setup: EngineSetup,
    policy: Policy,
    slo: Slo,
    progress: Callable[[float], None] | None = None,
) -> SimResult:
    """Replay `workload` in virtual time under `policy`; everything measured, nothing sampled."""
    gpu, model = setup.specs()
    engine = build_twin_engine(
        gpu,
        model,
        setup.tp,
        mode="virtual",
        seed=setup.seed,
        latency_jitter=setup.latency_jitter,
        max_batch_size=setup.max_batch_size,
        iter_stats_max_iterations=16,
    )
    ex, gpus = engine.executor, engine.gpus
    # The same driver and actuator the sidecar uses on a served twin, over in-process GPUs.
    clocks = DriverActuator(TwinDriver(gpus.gpus))
    ctx = SimContext(
        setup,
        gpu,
        model,
        slo,
        clocks,
        ex.limits.max_batch_size,
        ex.kv.max_num_blocks,
        ex.kv.tokens_per_block,
        ex.limits.max_num_tokens,
    )
    policy.start(ctx)
    reqs = workload.requests
    n = len(reqs)
    engine_id: dict[int, int] = {}
    started: set[int] = set()
    tokens: dict[int, int] = {}
    first: dict[int, float] = {}
    done: dict[int, float] = {}
    lat: list[float] = []
    gen: list[int] = []
    tl_t: list[float] = []
    tl_clock: list[float] = []
    tl_power: list[float] = []
    next_sample = 0.0
    i = 0
    prompt_cache: dict[int, list[int]] = {}
    while True:
        now = ex.time.now_s()
        while i < n and reqs[i].arrival_s <= now:
            r = reqs[i]
            ids = prompt_cache.setdefault(r.prompt_tokens, [1] * r.prompt_tokens)
            max_tokens = setup.max_tokens(r.prompt_tokens, r.output_tokens, model.max_context)
            rid = ex.enqueue_request(
                Request(
                    ids,
                    max_tokens=max_tokens,
                    streaming=True,
                    twin_output_len=r.output_tokens,
                )
            )
            engine_id[rid] = i
            policy.observe(
                Arrived(
                    rid,
                    r.arrival_s,
                    r.prompt_tokens,
                    max_tokens,
                    Slo(),
                    policy.length_hint(r.output_tokens),
                )
            )
            i += 1
        policy.before_iteration(now)
        stats = ex.step()
        if stats is None:
            if i >= n:
                break
            ex.run_until(reqs[i].arrival_s)
            continue
        now = ex.time.now_s()
        ib = stats.inflight_batching_stats
        lat.append(stats.iter_latency_ms / 1000.0)
        gen.append(ib.num_gen_requests)
        for ev in events_from_responses(ex, now, started, tokens, first, done):
            policy.observe(ev)
        policy.observe(iteration_event(stats, now))
        if now >= next_sample:
            twin = stats.twin
            tl_t.append(now)
            tl_clock.append(float(twin.sm_clock_mhz) if twin else float("nan"))
            tl_power.append(twin.power_w if twin else float("nan"))
            next_sample = now + TIMELINE_EVERY_S
            if progress is not None:
                progress(now)
    span = ex.time.now_s()
    energy_j = gpus.total_energy_mj() / 1000.0
    ex.shutdown()
    clocks.reset()
    order = sorted(engine_id, key=engine_id.__getitem__)
    return SimResult(
        policy=policy.name,
        arrival_s=np.array([reqs[engine_id[r]].arrival_s for r in order]),
        first_token_s=np.array([first.get(r, np.nan) for r in order]),
        finish_s=np.array([done.get(r, np.nan) for r in order]),
        output_tokens=np.array([tokens.get(r, 0) for r in order], dtype=np.int64),
        energy_j=energy_j,
        span_s=span,
        clock_changes=clocks.changes,
        iter_latency_s=np.array(lat),
        iter_gen=np.array(gen, dtype=np.int64),
        timeline_t=np.array(tl_t),
        timeline_clock=np.array(tl_clock),
        timeline_power=np.array(tl_power),
        choice_seconds=policy.choice_seconds(span),
    )
