"""Which engine size should carry the load: the instance-scaling decision, as pure logic.

The sizes of one model (e.g. Llama-2-13B at TP1, TP2, TP4 on disjoint GPU sets) each carry up
to a profiled capacity (requests/s at maximum clock within the SLOs: evaluation/capacity.py).
Every `period_s` the scaler compares the measured arrival rate with those capacities and picks
the smallest size that carries it with `margin` to spare. Up at once, since a size that is too
small breaks SLOs within seconds; down only after the smaller size has been enough for
`grace_s` in a row, since every switch costs a cold start with two engines powered.

A queue that keeps growing means the measured rate under-reads the load (requests already
waiting are not arrivals any more): `queue_per_capacity_s` turns the queue into extra rate.

Used by the sidecar (real time, through switcher.py) and by the virtual-time scaling simulation
(evaluation/scaling_sim.py); time is whatever the caller passes in.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class EngineSize:
    """One size of a model: a Triton model variant and what it carries."""

    name: str  # e.g. "tp2"; also the suffix of the Triton variant
    tp: int
    capacity_rps: float
    instances: int = 1  # data-parallel copies of this TP size behind the same variant

    @property
    def gpus(self) -> int:
        return self.tp * self.instances

    @property
    def total_capacity_rps(self) -> float:
        return self.capacity_rps * self.instances


@dataclass(frozen=True)
class ScalerConfig:
    period_s: float = 10.0
    margin: float = 0.1  # keep this share of a size's capacity spare
    grace_s: float = 60.0  # a smaller size must have been enough this long before moving down
    queue_per_capacity_s: float = 10.0  # a queue of q adds q / this to the measured rate
    # Scale-up looks this far ahead along the demand's recent rise: the measured rate lags by
    # half its window and a new size needs its cold start before it carries anything.
    lookahead_s: float = 30.0
    trend_points: int = 4  # periodic readings the rise is measured over

    def __post_init__(self) -> None:
        if not (self.period_s > 0 and math.isfinite(self.period_s)):
            raise ValueError(f"period_s must be positive, got {self.period_s}")
        if not 0 <= self.margin < 1:
            raise ValueError(f"margin must be in [0, 1), got {self.margin}")
        if not self.grace_s >= 0:
            raise ValueError(f"grace_s must be >= 0, got {self.grace_s}")
        if not self.queue_per_capacity_s > 0:
            raise ValueError(
                f"queue_per_capacity_s must be positive, got {self.queue_per_capacity_s}"
            )


@dataclass(frozen=True)
class ScaleDecision:
    time_s: float
    from_size: str
    to_size: str
    demand_rps: float
    reason: str  # "up" | "down"


def order_sizes(sizes: Sequence[EngineSize]) -> list[EngineSize]:
    """Sizes from the smallest carrying capacity (then fewest GPUs) upwards; names unique."""
    if not sizes:
        raise ValueError("at least one engine size is needed")
    names = [s.name for s in sizes]
    if len(set(names)) != len(names):
        raise ValueError(f"engine size names must be unique, got {names}")
    for s in sizes:
        if not (s.capacity_rps > 0 and math.isfinite(s.capacity_rps)):
            raise ValueError(f"size {s.name}: capacity must be positive, got {s.capacity_rps}")
        if s.tp < 1 or s.instances < 1:
            raise ValueError(f"size {s.name}: tp and instances must be >= 1")
    return sorted(sizes, key=lambda s: (s.total_capacity_rps, s.gpus))


def demand_rps(rate_rps: float, queued: int, config: ScalerConfig) -> float:
    return max(0.0, rate_rps) + max(0, queued) / config.queue_per_capacity_s


def smallest_fitting(sizes: Sequence[EngineSize], demand: float, margin: float) -> int:
    """Index (in `sizes`, ordered) of the smallest size whose spare-kept capacity carries
    `demand`; the largest when none does."""
    for i, s in enumerate(sizes):
        if demand <= s.total_capacity_rps * (1.0 - margin):
            return i
    return len(sizes) - 1


class InstanceScaler:
    """Stateful: remembers the current size and how long a smaller one has been enough."""

    def __init__(
        self,
        sizes: Sequence[EngineSize],
        config: ScalerConfig | None = None,
        start: str | None = None,
    ) -> None:
        self.sizes = order_sizes(sizes)
        self.config = config or ScalerConfig()
        names = [s.name for s in self.sizes]
        if start is not None and start not in names:
            raise ValueError(f"unknown start size {start!r}; sizes: {', '.join(names)}")
        self.current = names.index(start) if start is not None else len(self.sizes) - 1
        self._enough_since: float | None = None
        self._next_s = -math.inf
        self._readings: deque[tuple[float, float]] = deque(maxlen=self.config.trend_points)

    @property
    def current_size(self) -> EngineSize:
        return self.sizes[self.current]

    def due(self, now_s: float) -> bool:
        return now_s >= self._next_s

    def update(self, now_s: float, rate_rps: float, queued: int = 0) -> ScaleDecision | None:
        """One periodic look; a decision when the size should change (already applied to
        `current`: the caller switches engines)."""
        if not self.due(now_s):
            return None
        self._next_s = now_s + self.config.period_s
        demand = demand_rps(rate_rps, queued, self.config)
        self._readings.append((now_s, demand))
        # Along a rise, judge by where demand is heading, both ways: up early enough to cover
        # the cold start, and never down while it is still climbing.
        ahead = demand + max(0.0, self.trend()) * self.config.lookahead_s
        want = smallest_fitting(self.sizes, ahead, self.config.margin)
        old = self.sizes[self.current].name
        if want > self.current:
            self._enough_since = None
            self.current = want
            return ScaleDecision(now_s, old, self.sizes[want].name, demand, "up")
        if want == self.current:
            self._enough_since = None
            return None
        if self._enough_since is None:
            self._enough_since = now_s
        if now_s - self._enough_since < self.config.grace_s:
            return None
        self._enough_since = None
        self.current = want
        return ScaleDecision(now_s, old, self.sizes[want].name, demand, "down")

    def trend(self) -> float:
        """Demand's rise in requests/s per second over the recent readings (0 with fewer than
        two)."""
        if len(self._readings) < 2:
            return 0.0
        (t0, d0), (t1, d1) = self._readings[0], self._readings[-1]
        return (d1 - d0) / (t1 - t0) if t1 > t0 else 0.0
