"""Per-model request arrival rate over a sliding window, and the length of each model's queue.

The measured demand that the KEDA external scaler (`keda.py`) turns into a replica count. The
sidecar feeds it: `record_arrival` on every request-arrived event, `set_queued` whenever the
number of requests waiting for the engine changes. Thread-safe: gRPC worker threads read while
the sidecar writes.

Time comes from an injectable clock (`time.monotonic` by default, seconds); a time passed to
`record_arrival` must be on that clock.
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

DEFAULT_WINDOW_S = 30.0
MIN_SPAN_S = 1.0
"""Shortest span a rate is averaged over: a model seen for 0.1 s with one arrival is not 10 rps."""


@dataclass
class _ModelDemand:
    since: float
    arrivals: deque[float] = field(default_factory=deque)
    queued: int = 0


class ArrivalRateMeter:
    """Arrivals per second of each model over the last `window_s` seconds, and its queue length.

    A model is known once registered (the names the controller serves, at start: a model with no
    traffic yet has rate 0, not "unknown") or once it had an arrival. Until a model has been known
    for a whole window, its rate is averaged over the time since then (at least `MIN_SPAN_S`), so a
    fresh meter does not read low.
    """

    def __init__(
        self,
        window_s: float = DEFAULT_WINDOW_S,
        *,
        clock: Callable[[], float] = time.monotonic,
        models: Iterable[str] = (),
    ) -> None:
        if not (math.isfinite(window_s) and window_s > 0):
            raise ValueError(f"window_s must be positive, got {window_s}")
        self._window_s = float(window_s)
        self._clock = clock
        self._lock = threading.Lock()
        self._models: dict[str, _ModelDemand] = {}
        for model in models:
            self.register(model)

    @property
    def window_s(self) -> float:
        return self._window_s

    def register(self, model: str) -> None:
        """Make `model` known (rate 0 until it has arrivals); registering again changes nothing."""
        if not model:
            raise ValueError("model name must not be empty")
        with self._lock:
            self._models.setdefault(model, _ModelDemand(since=self._clock()))

    def models(self) -> list[str]:
        with self._lock:
            return sorted(self._models)

    def record_arrival(self, model: str, t: float | None = None) -> None:
        """One request for `model` arrived at `t` (the meter's clock; default: now)."""
        now = self._clock()
        at = now if t is None else float(t)
        with self._lock:
            demand = self._models.get(model)
            if demand is None:
                if not model:
                    raise ValueError("model name must not be empty")
                demand = self._models[model] = _ModelDemand(since=min(at, now))
            arrivals = demand.arrivals
            if not arrivals or at >= arrivals[-1]:
                arrivals.append(at)
            else:  # reported late by another thread: keep the window ordered
                arrivals.insert(bisect.bisect_right(arrivals, at), at)
            demand.since = min(demand.since, at)
            self._prune(arrivals, now)

    def set_queued(self, model: str, n: int) -> None:
        """`n` requests for `model` are waiting for the engine now (registers the model)."""
        if n < 0:
            raise ValueError(f"queued count must be >= 0, got {n}")
        with self._lock:
            demand = self._models.get(model)
            if demand is None:
                if not model:
                    raise ValueError("model name must not be empty")
                demand = self._models[model] = _ModelDemand(since=self._clock())
            demand.queued = int(n)

    # DemandSource (keda.py)

    def request_rate_rps(self, model: str) -> float | None:
        """Arrivals per second over the window; None when the model is not known."""
        now = self._clock()
        with self._lock:
            demand = self._models.get(model)
            if demand is None:
                return None
            self._prune(demand.arrivals, now)
            count = bisect.bisect_right(demand.arrivals, now)  # not those stamped ahead of now
            span = min(self._window_s, max(now - demand.since, MIN_SPAN_S))
            return count / span

    def queued(self, model: str) -> int:
        """Requests waiting for the engine (0 for a model not known)."""
        with self._lock:
            demand = self._models.get(model)
            return 0 if demand is None else demand.queued

    def _prune(self, arrivals: deque[float], now: float) -> None:
        horizon = now - self._window_s
        while arrivals and arrivals[0] <= horizon:
            arrivals.popleft()
