"""The policies `throttllem simulate` compares, all driving the twin through its clock surface.

- `max`: Triton's default: clocks left to the GPU (boost to maximum, power-capped).
- `static:MHZ`: one locked clock for the whole run.
- `pid`: feedback on the measured time between tokens, as power-aware servers without a model.
- `throttllem`: ours: scoreboard, predicted lengths, CatBoost model, SLO-aware clock policy.
- `hinted`: ours, learned model and all, with every request carrying its true length as the
  client's `output_length_hint`: what throttllem would save if clients said how long their
  answers will be (docs/serving.md). `hinted:SIGMA`: the hints off by a log-normal factor
  (exp(SIGMA x z), z standard normal, seeded): what clients whose estimates err that much give.
- `oracle`: ours with the true output lengths and the twin's own latency function.
(`static-best` is a search over `static:MHZ` runs: see experiment.py.)
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

from ..clock_governor import GovernorConfig
from ..control_loop import ChoiceTimer, ControllerConfig, InstanceController
from ..events import Event, Iteration
from ..ips_table import IpsTable
from ..length_memory import LearnedLengths
from ..length_predictor import LengthPredictor
from ..oracle_model import TwinOracleModel
from ..perf_model import PerformanceModel
from ..projection import EngineLimits
from ..scoreboard import Scoreboard
from .simulator import Policy, SimContext

# Keeps the hints' noise apart from every other random stream seeded by the setup's seed.
_HINT_NOISE_STREAM = 0x4B1D


class MaxClock(Policy):
    name = "max"

    def start(self, ctx: SimContext) -> None:
        ctx.clocks.reset()


class StaticClock(Policy):
    def __init__(self, mhz: int) -> None:
        self.mhz = mhz
        self.name = f"static:{mhz}"

    def start(self, ctx: SimContext) -> None:
        supported = ctx.gpu.supported_clocks_mhz()
        if self.mhz not in supported:
            raise ValueError(
                f"static:{self.mhz}: not supported by {ctx.gpu.name}; valid: "
                f"{supported[-1]}..{supported[0]} MHz in steps of {ctx.gpu.clock_step_mhz}"
            )
        ctx.clocks.set_clock_mhz(self.mhz)


class PidClock(Policy):
    """PI control of the clock on the mean iteration latency of the last window.

    Its setpoint is what an operator would derive from the SLOs without a model: the TBT target,
    tightened so that a long request (the p95 output length) still meets the E2E target.
    """

    name = "pid"

    def __init__(
        self,
        period_s: float = 0.5,
        kp: float = 0.6,
        ki: float = 0.15,
        long_output_tokens: int = 600,
        safety: float = 0.8,
    ) -> None:
        self.period_s, self.kp, self.ki = period_s, kp, ki
        self.long_output_tokens = long_output_tokens
        self.safety = safety
        self._window: deque[float] = deque(maxlen=256)
        self._integral = 0.0
        self._next_s = 0.0

    def start(self, ctx: SimContext) -> None:
        self.ctx = ctx
        self.clocks = sorted(ctx.gpu.supported_clocks_mhz())
        targets = []
        if ctx.slo.tbt_s is not None:
            targets.append(ctx.slo.tbt_s)
        if ctx.slo.e2e_s is not None:
            targets.append(ctx.slo.e2e_s / self.long_output_tokens)
        self.setpoint_s = self.safety * min(targets) if targets else float("inf")
        self.level = float(len(self.clocks) - 1)
        ctx.clocks.set_clock_mhz(self.clocks[-1])

    def observe(self, ev: Event) -> None:
        if isinstance(ev, Iteration) and ev.generation_requests:
            self._window.append(ev.latency_s)

    def before_iteration(self, now_s: float) -> None:
        if now_s < self._next_s or not self._window:
            return
        self._next_s = now_s + self.period_s
        measured = sum(self._window) / len(self._window)
        self._window.clear()
        error = (self.setpoint_s - measured) / self.setpoint_s  # > 0: room to slow down
        self._integral = max(-5.0, min(5.0, self._integral + error))
        step = -(self.kp * error + self.ki * self._integral) * len(self.clocks) / 4
        self.level = max(0.0, min(len(self.clocks) - 1.0, self.level + step))
        self.ctx.clocks.set_clock_mhz(self.clocks[round(self.level)])


class ThrottllemPolicy(Policy):
    """The product's controller, unchanged, in the simulation loop."""

    def __init__(
        self,
        model: PerformanceModel | None,
        *,
        name: str = "throttllem",
        true_lengths: bool = False,
        hint_error: float = 0.0,
        quantile: float = 0.9,
        config: ControllerConfig | None = None,
        marginal_energy: bool = True,
        prefill_clock: str = "auto",
        lengths: LearnedLengths | None = None,
        length_hints: str = "cap",
    ) -> None:
        self.name = name
        # How the controller uses the hints (length_predictor.HINT_USES); the oracle trusts
        # them, since its hints are the truth.
        self.length_hints = length_hints
        self.marginal_energy = marginal_energy
        # What a controller restarted with its lengths file knows at the start
        # (length_memory.py); None: it starts as a new one does, from the prior.
        self.lengths = lengths
        self.model = model
        # Each request's true length reaches the controller as a client's hint (`hinted`, and
        # the oracle, which also takes the twin's own latency function for `model=None`),
        # multiplied by exp(hint_error x z) for a client whose estimates err.
        if hint_error < 0 or not math.isfinite(hint_error):
            raise ValueError(f"hint_error must be a finite number >= 0, got {hint_error}")
        self.true_lengths = true_lengths
        self.hint_error = hint_error
        self.seed_hints(0)  # start() seeds it again, from the setup
        self.quantile = quantile
        self.config = config or ControllerConfig(
            decision_period_s=0.25,
            governor=GovernorConfig(min_interval_s=0.25),
            prefill_clock=prefill_clock,
        )

    def length_hint(self, true_tokens: int) -> int | None:
        if not self.true_lengths:
            return None
        if self.hint_error == 0.0:
            return true_tokens
        factor = math.exp(self.hint_error * float(self._hint_noise.standard_normal()))
        return max(1, round(true_tokens * factor))

    def seed_hints(self, seed: int) -> None:
        """The same hint errors for the same arrivals in every run seeded so (one draw an
        arrival, in arrival order)."""
        self._hint_noise = np.random.default_rng([seed, _HINT_NOISE_STREAM])

    def start(self, ctx: SimContext) -> None:
        self.seed_hints(ctx.setup.seed)
        model = self.model
        if model is None:
            model = TwinOracleModel(ctx.gpu, ctx.model, ctx.setup.tp, ctx.tokens_per_block)
        limits = EngineLimits(
            ctx.max_batch_size,
            ctx.kv_capacity_blocks,
            ctx.tokens_per_block,
            max_num_tokens=ctx.max_num_tokens,
        )
        table = IpsTable(
            model,
            ctx.gpu.supported_clocks_mhz(),
            tp=ctx.setup.tp,
            max_batch=ctx.max_batch_size,
            kv_capacity_blocks=ctx.kv_capacity_blocks,
            tokens_per_block=ctx.tokens_per_block,
            idle_power_w=ctx.gpu.idle_power_w if self.marginal_energy else 0.0,
        )
        predictor = LengthPredictor(quantile=self.quantile, hints=self.length_hints)
        if self.lengths is not None:
            predictor.restore(self.lengths.buckets)
        board = Scoreboard(predictor, ctx.slo, ctx.tokens_per_block)
        self.controller = InstanceController(board, table, limits, ctx.clocks, self.config)
        self._choices = ChoiceTimer()

    def observe(self, ev: Event) -> None:
        self.controller.observe(ev)

    def before_iteration(self, now_s: float) -> None:
        decision = self.controller.maybe_decide(now_s)
        if decision is not None:
            self._choices.record(now_s, decision.kind)

    def choice_seconds(self, end_s: float) -> dict[str, float]:
        return self._choices.until(end_s)
