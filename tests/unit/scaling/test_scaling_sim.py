"""Instance scaling in virtual time: no request lost across switches, switch cost counted, and
a fixed size agrees with the single-engine simulator."""

from __future__ import annotations

import numpy as np
import pytest

from throttllem.controller.evaluation.policies import MaxClock
from throttllem.controller.evaluation.scaling_sim import ScalingSimulation
from throttllem.controller.evaluation.simulator import EngineSetup, Policy, simulate
from throttllem.controller.evaluation.workload import TraceRequest, Workload, daily_swing, synthetic
from throttllem.controller.events import Slo
from throttllem.controller.scaling.scaler import EngineSize, ScalerConfig

SETUPS = {
    "tp1": EngineSetup(model="llama-3-8b", tp=1),
    "tp2": EngineSetup(model="llama-3-8b", tp=2),
}
SIZES = [EngineSize("tp1", 1, 2.0), EngineSize("tp2", 2, 6.0)]


def max_clock(_: EngineSize) -> Policy:
    return MaxClock()


def ramp() -> Workload:
    """0.5/s for 60 s, then 4/s for 60 s, then 0.5/s for 120 s."""
    reqs: list[TraceRequest] = []
    t = 0.0
    for rate, until in ((0.5, 60.0), (4.0, 120.0), (0.5, 240.0)):
        while t < until:
            reqs.append(TraceRequest(t, 200, 60))
            t += 1.0 / rate
    return Workload("ramp", tuple(reqs))


def run(scaling: bool, start: str | None, cold_start_s: float = 10.0) -> ScalingSimulation:
    sim = ScalingSimulation(
        SETUPS, SIZES, max_clock, Slo(), scaling=scaling, start=start, cold_start_s=cold_start_s,
        scaler_config=ScalerConfig(period_s=5.0, margin=0.2, grace_s=30.0),
    )  # fmt: skip
    return sim


def test_switches_up_and_down_and_every_request_completes_once() -> None:
    work = ramp()
    out = run(True, "tp1").run(work)
    moves = [(d.from_size, d.to_size) for d in out.decisions]
    assert ("tp1", "tp2") in moves and moves[-1] == ("tp2", "tp1")
    r = out.result
    assert np.array_equal(r.output_tokens, np.full(len(work.requests), 60))
    assert not np.isnan(r.finish_s).any() and (r.finish_s >= r.arrival_s).all()
    # The new size takes traffic only after its cold start.
    up = next(d for d in out.decisions if d.to_size == "tp2")
    taken = next(t for t, name in out.size_timeline if name == "tp2")
    assert taken >= up.time_s + 10.0 - 1e-9


def test_a_warming_engine_is_powered_from_the_decision_on() -> None:
    """A cold start longer than the run: the new size never takes traffic, yet its GPUs draw
    (idle) power from the decision to the end, on top of what the old size used."""
    work = Workload("steady", tuple(TraceRequest(0.5 * k, 200, 60) for k in range(240)))
    out = run(True, "tp1", cold_start_s=10_000.0).run(work)
    (decision,) = out.decisions
    alone = run(False, "tp1").run(work).result
    gpu, _ = SETUPS["tp2"].specs()
    idle_j = 2 * gpu.idle_power_w * (out.result.span_s - decision.time_s)
    assert out.result.energy_j - alone.energy_j == pytest.approx(idle_j, rel=0.05)


def test_a_fixed_size_matches_the_single_engine_simulator() -> None:
    work = synthetic("conv", 1.0, 120.0, seed=3).clipped(8192)
    fixed = run(False, "tp1").run(work).result
    single = simulate(work, SETUPS["tp1"], MaxClock(), Slo())
    assert fixed.energy_j == pytest.approx(single.energy_j, rel=1e-6)
    assert np.allclose(fixed.finish_s, single.finish_s)


def test_daily_swing_follows_low_high_low() -> None:
    source = synthetic("conv", 5.0, 2000.0, seed=1)
    swung = daily_swing(source, 0.5, 4.5, 1000.0)
    t = np.array([r.arrival_s for r in swung.requests])
    edge = ((t < 100) | (t > 900)).sum() / 200.0
    middle = ((t > 450) & (t < 550)).sum() / 100.0
    assert edge < 1.2 and middle > 3.5
    assert len(swung.requests) == pytest.approx(2500, rel=0.01)  # mean 2.5/s over 1000 s
    per_second, _ = np.histogram(t, bins=1000, range=(0.0, 1000.0))
    assert per_second.max() < 20  # nothing piles up anywhere (e.g. at the end)
    with pytest.raises(ValueError, match="the swing needs"):
        daily_swing(source, 10.0, 20.0, 1000.0)
