"""One engine instance's controller: observe events -> decide -> actuate, with every decision kept.

Time is given, never read: the same object runs beside a real GPU, beside the twin in real time,
and inside a virtual-time simulation. Decisions happen on request arrival, on request end, and at
a fixed period in between (the projection drifts as requests progress).
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from .clock_governor import ClockGovernor, GovernorConfig
from .clock_policy import ChoiceKind, choose_clock
from .events import Arrived, Event, Finished, FirstToken, InFlight, Iteration
from .gpu.driver import ClockDriver, WriteOutcome
from .ips_table import IpsTable
from .prefill_clock import PREFILL_CLOCKS
from .projection import EngineLimits, engine_room, project
from .scoreboard import Scoreboard, SloOutcome
from .slo_slack import Margin

log = logging.getLogger(__name__)


class ClockActuator(Protocol):
    def set_clock_mhz(self, mhz: int) -> None:
        """Lock every GPU of the instance at this SM clock."""
        ...

    def reset(self) -> None:
        """Release the lock: default clocks (idle clock when idle, boost under load)."""
        ...


class DriverActuator:
    """A ClockActuator over any ClockDriver: every GPU of the instance at one clock. Counts the
    changes that reached the GPUs (unchanged values are skipped by the driver)."""

    def __init__(self, driver: ClockDriver) -> None:
        self.driver = driver
        self.changes = 0

    def set_clock_mhz(self, mhz: int) -> None:
        outcome = self.driver.set_locked_clocks(self.driver.gpu_indices(), mhz, mhz)
        if outcome is WriteOutcome.APPLIED:
            self.changes += 1

    def reset(self) -> None:
        """Back to default clocks (not counted as a change: no clock is set)."""
        self.driver.reset_locked_clocks(self.driver.gpu_indices())


# clock_policy reports 1 / max(first_iteration_s, 1e-9) for the first projected iteration, which
# reads ~1e9 when it evaluated no iteration at all (every request in flight left out as lost).
# No engine iterates 1e8 times a second.
_UNEVALUATED_IPS = 1e8


IDLE_CLOCKS = ("release", "lock")


@dataclass
class ControllerConfig:
    decision_period_s: float = 0.1
    margin: Margin = field(default_factory=Margin)
    lost_fallback: str = "ignore"  # or "max", the paper's rule (see clock_policy.choose_clock)
    forecast: bool = True  # reserve time for the prefills of requests still to come
    prefill_clock: str = "auto"  # or "optimal", "max" (prefill_clock.PREFILL_CLOCKS)
    # With nothing in flight: "release" the lock (default clocks: the GPU idles at its lowest
    # clock and boosts by itself for an arrival until the next lock), or "lock" at the chosen
    # clock (for operators who want the GPU never to boost on its own).
    idle_clocks: str = "release"
    governor: GovernorConfig = field(default_factory=GovernorConfig)
    keep_decisions: int = 10_000

    def __post_init__(self) -> None:
        if self.idle_clocks not in IDLE_CLOCKS:
            raise ValueError(
                f"idle_clocks must be one of {', '.join(IDLE_CLOCKS)}, got {self.idle_clocks!r}"
            )
        if self.prefill_clock not in PREFILL_CLOCKS:
            raise ValueError(
                f"prefill_clock must be one of {', '.join(PREFILL_CLOCKS)}, "
                f"got {self.prefill_clock!r}"
            )


@dataclass
class ChoiceTimer:
    """Time under each kind of clock choice: a decision's kind holds until the next one."""

    totals: dict[str, float] = field(default_factory=dict)
    last: tuple[float, str] | None = None  # (time, kind) of the choice in force

    def record(self, now_s: float, kind: str) -> tuple[str, float] | None:
        """A new choice from now on; returns the span the previous one just closed, if any."""
        closed = None
        if self.last is not None and now_s > self.last[0]:
            closed = (self.last[1], now_s - self.last[0])
            self.totals[closed[0]] = self.totals.get(closed[0], 0.0) + closed[1]
        self.last = (now_s, kind)
        return closed

    def until(self, end_s: float) -> dict[str, float]:
        """The totals with the choice in force counted up to `end_s`."""
        out = dict(self.totals)
        if self.last is not None and end_s > self.last[0]:
            out[self.last[1]] = out.get(self.last[1], 0.0) + end_s - self.last[0]
        return out


@dataclass(frozen=True)
class Decision:
    time_s: float
    chosen_mhz: int
    applied_mhz: int | None  # None: nothing sent to the GPU (unchanged, rate-limited)
    reason: str
    min_slack_s: float
    tightest_request: str | None
    # The model's IPS for the next iteration at the chosen clock; None while nothing is in
    # flight (no iteration to predict: an idle engine runs none).
    predicted_ips: float | None
    lost_requests: int
    running: int
    queued: int
    trigger: str
    kind: str = "slo"  # clock_policy.ChoiceKind's value: what decided the clock
    released: bool = False  # the lock was released now (nothing in flight): default clocks


class InstanceController:
    def __init__(
        self,
        scoreboard: Scoreboard,
        table: IpsTable,
        limits: EngineLimits,
        actuator: ClockActuator,
        config: ControllerConfig | None = None,
    ) -> None:
        self.scoreboard = scoreboard
        self.table = table
        self.limits = limits
        self.actuator = actuator
        self.config = config or ControllerConfig()
        self.governor = ClockGovernor(self.config.governor)
        self.decisions: deque[Decision] = deque(maxlen=self.config.keep_decisions)
        # Finished requests not yet taken by take_outcomes(); bounded for callers that never
        # take them (the oldest are dropped).
        self.outcomes: deque[SloOutcome] = deque(maxlen=self.config.keep_decisions)
        self.last_iteration: Iteration | None = None
        self._due: str | None = "start"
        self._last_decision_s = float("-inf")

    def observe(self, ev: Event) -> None:
        if isinstance(ev, Arrived):
            self.scoreboard.on_arrived(ev)
            self._due = "arrival"
        elif isinstance(ev, FirstToken):
            self.scoreboard.on_first_token(ev)
        elif isinstance(ev, Iteration):
            self.scoreboard.on_iteration(ev)
            self.last_iteration = ev
        elif isinstance(ev, Finished):
            outcome = self.scoreboard.on_finished(ev)
            if outcome is not None:
                self.outcomes.append(outcome)
            self._due = "finish"

    def take_outcomes(self) -> list[SloOutcome]:
        """The requests finished since the last call, oldest first; forgets them."""
        taken = list(self.outcomes)
        self.outcomes.clear()
        return taken

    def rebuild(self, snapshot: list[InFlight]) -> None:
        self.scoreboard.rebuild(snapshot)
        self.governor.forget()
        self._due = "snapshot"

    def maybe_decide(self, now_s: float) -> Decision | None:
        trigger = self._due
        if trigger is None and now_s - self._last_decision_s >= self.config.decision_period_s:
            trigger = "period"
        if trigger is None:
            return None
        return self.decide(now_s, trigger)

    def decide(self, now_s: float, trigger: str = "call") -> Decision:
        inputs = self.scoreboard.decision_inputs()
        proj = project(inputs.running, inputs.queued, self.limits)
        choice = choose_clock(
            now_s,
            proj,
            inputs.deadlines,
            self.table,
            margin=self.config.margin,
            lost_fallback=self.config.lost_fallback,
            forecast=self.scoreboard.forecast(now_s) if self.config.forecast else None,
            prefill_clock=self.config.prefill_clock,
            room=engine_room(self.limits, inputs.running, inputs.queued),
        )
        applied: int | None = None
        released = False
        if choice.kind is ChoiceKind.IDLE and self.config.idle_clocks == "release":
            released = self.governor.release(now_s)
            if released:
                self.actuator.reset()
        else:
            applied = self.governor.apply(now_s, choice)
            if applied is not None:
                self.actuator.set_clock_mhz(applied)
        running = len(inputs.deadlines.running_ids)
        queued = len(inputs.deadlines.queued_ids)
        predicted_ips: float | None = None
        if running + queued and proj.horizon:
            predicted_ips = choice.predicted_ips
            if not 0.0 < predicted_ips < _UNEVALUATED_IPS:
                # The policy evaluated nothing: ask the table for the next iteration itself.
                index = int(np.searchsorted(self.table.clocks_mhz, choice.clock_mhz))
                seconds = self.table.seconds(
                    min(index, len(self.table.clocks_mhz) - 1),
                    proj.batch[:1],
                    proj.kv_blocks[:1],
                    proj.ctx_tokens[:1],
                )
                predicted_ips = 1.0 / float(seconds[0]) if seconds[0] > 0 else None
        decision = Decision(
            time_s=now_s,
            chosen_mhz=choice.clock_mhz,
            applied_mhz=applied,
            reason=choice.reason,
            min_slack_s=choice.min_slack_s,
            tightest_request=choice.tightest_request,
            predicted_ips=predicted_ips,
            lost_requests=len(choice.lost_requests),
            running=running,
            queued=queued,
            trigger=trigger,
            kind=choice.kind.value,
            released=released,
        )
        self.decisions.append(decision)
        self._due = None
        self._last_decision_s = now_s
        if applied is not None:
            log.debug("clock -> %d MHz (%s)", applied, choice.reason)
        elif released:
            log.debug("clock lock released (%s)", choice.reason)
        return decision
