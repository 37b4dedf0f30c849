"""Turning clock choices into actuations: what a real GPU needs on top of `choose_clock`.

Hysteresis, a minimum interval between lowering changes, skipping unchanged values, raising at
once when deadlines are threatened (a late raise costs deadlines, a late lowering only energy),
and releasing the lock while nothing is in flight.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .clock_policy import ClockChoice


@dataclass
class GovernorConfig:
    min_interval_s: float = 0.2  # between two lowering changes
    hysteresis_mhz: int = 30  # ignore lowering by less than this
    # Raising is never delayed: a late raise costs deadlines, a late lowering only energy.


@dataclass
class ClockGovernor:
    """Turns each choice into an actuation, or none: rate-limited, hysteretic, idempotent."""

    config: GovernorConfig = field(default_factory=GovernorConfig)
    current_mhz: int | None = None
    last_change_s: float = float("-inf")
    changes: int = 0
    released: bool = False  # the lock is off: the GPU runs its default clocks

    def apply(self, now_s: float, choice: ClockChoice) -> int | None:
        """The clock to set now, or None to leave the GPU as it is."""
        target = choice.clock_mhz
        if self.released:
            self.released = False
            self.current_mhz = None
        if target == self.current_mhz:
            return None
        if self.current_mhz is not None and target < self.current_mhz:
            if self.current_mhz - target < self.config.hysteresis_mhz:
                return None
            if now_s - self.last_change_s < self.config.min_interval_s:
                return None
        self.current_mhz = target
        self.last_change_s = now_s
        self.changes += 1
        return target

    def release(self, now_s: float) -> bool:
        """Whether to release the lock now (nothing in flight): an idle GPU left to its default
        clocks drops to its idle clock, which no lock undercuts (a locked clock keeps its clock
        tree and rails up), and boosts by itself for whatever arrives before the next lock.
        Not rate-limited: the engine may idle for long before any decision comes again (none
        is due without events), and an arrival re-locks at once whatever the release cost."""
        if self.released:
            return False
        self.released = True
        self.current_mhz = None
        self.last_change_s = now_s
        self.changes += 1
        return True

    def forget(self) -> None:
        """The GPU was reset behind our back (clock daemon, restart): next choice is applied."""
        self.current_mhz = None
