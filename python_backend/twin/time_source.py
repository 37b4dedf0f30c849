"""Where the twin reads time from: a virtual clock it advances itself, or the wall clock.

Everything in the twin takes a `TimeSource`; nothing reads `time` directly, so the same engine
and GPU code runs in virtual time (as fast as the CPU allows) and in (sped-up) real time.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol


class TimeSource(Protocol):
    def now_s(self) -> float:
        """Seconds since the twin started (simulated seconds, whatever the mode)."""
        ...


class VirtualTime:
    """Time that moves only when the simulation advances it."""

    def __init__(self, start_s: float = 0.0) -> None:
        self._now = start_s

    def now_s(self) -> float:
        return self._now

    def advance_to(self, t_s: float) -> None:
        if t_s < self._now:
            raise ValueError(f"virtual time cannot go back: {t_s} < {self._now}")
        self._now = t_s


class ScaledWallTime:
    """Wall-clock time, `speedup` simulated seconds per real second."""

    def __init__(self, speedup: float = 1.0) -> None:
        if speedup <= 0:
            raise ValueError(f"speedup must be positive, got {speedup}")
        self.speedup = speedup
        self._t0 = time.monotonic()

    def now_s(self) -> float:
        return (time.monotonic() - self._t0) * self.speedup

    def sleep_until(self, t_s: float, wake: threading.Event | None = None) -> None:
        """Block until simulated time `t_s`, or until `wake` is set."""
        delay = (t_s - self.now_s()) / self.speedup
        if delay <= 0:
            return
        if wake is not None:
            wake.wait(delay)
        else:
            time.sleep(delay)
