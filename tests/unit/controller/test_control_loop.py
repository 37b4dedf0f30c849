"""InstanceController: the predicted IPS a decision reports, and the finished requests it hands
on (drained by the sidecar)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from throttllem.controller.control_loop import InstanceController
from throttllem.controller.events import Arrived, Finish, Finished, FirstToken, Slo
from throttllem.controller.ips_table import IpsTable
from throttllem.controller.length_predictor import LengthPredictor
from throttllem.controller.perf_model import FEATURES
from throttllem.controller.projection import Admission, EngineLimits
from throttllem.controller.scoreboard import Scoreboard

CLOCK = FEATURES.index("sm_clock_mhz")


class ClockOnlyModel:
    """IPS = clock / 10: 100 IPS at 1000 MHz, whatever the work."""

    def predict_ips(self, features: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        return np.asarray(features[:, CLOCK] / 10.0, dtype=np.float64)


class NoActuator:
    def set_clock_mhz(self, mhz: int) -> None:
        pass

    def reset(self) -> None:
        pass


class RecordingActuator:
    def __init__(self) -> None:
        self.calls: list[int | str] = []

    def set_clock_mhz(self, mhz: int) -> None:
        self.calls.append(mhz)

    def reset(self) -> None:
        self.calls.append("reset")


def controller(actuator: NoActuator | RecordingActuator | None = None) -> InstanceController:
    table = IpsTable(
        ClockOnlyModel(), [500, 1000], tp=1, max_batch=8, kv_capacity_blocks=100, kv_points=8
    )
    board = Scoreboard(LengthPredictor(), Slo(ttft_s=1.0, tbt_s=0.2, e2e_s=30.0), 64)
    limits = EngineLimits(8, 100, 64, Admission.GUARANTEED_NO_EVICT)
    return InstanceController(board, table, limits, actuator or NoActuator())


def test_an_idle_engine_gets_its_clock_lock_released_once_and_a_lock_again_on_arrival() -> None:
    """Idle, a locked clock keeps the GPU's clock tree and rails up: default clocks idle lower.
    The release is not rate-limited (no decision may come again for long) and happens once."""
    gpu = RecordingActuator()
    c = controller(gpu)
    c.observe(Arrived(1, 0.0, 100, 50))
    busy = c.decide(0.0)
    assert gpu.calls == [busy.chosen_mhz] and not busy.released
    c.observe(FirstToken(1, 0.01))
    c.observe(Finished(1, 0.02, 50, Finish.END_ID))
    idle = c.decide(0.02)  # right after the lock: a lowering would be rate-limited
    assert idle.kind == "idle" and idle.released and idle.applied_mhz is None
    assert gpu.calls == [busy.chosen_mhz, "reset"]
    assert not c.decide(5.0).released  # still idle: nothing more to do
    assert gpu.calls == [busy.chosen_mhz, "reset"]
    c.observe(Arrived(2, 6.0, 100, 50))
    again = c.decide(6.0)
    assert again.applied_mhz == again.chosen_mhz  # locked again at once, whatever it was
    assert gpu.calls == [busy.chosen_mhz, "reset", again.chosen_mhz]


def test_no_predicted_ips_while_nothing_is_in_flight() -> None:
    c = controller()
    assert c.decide(0.0).predicted_ips is None
    c.observe(Arrived(1, 0.0, 100, 50))
    c.observe(FirstToken(1, 0.1))
    busy = c.decide(0.1)
    assert busy.running == 1
    assert busy.predicted_ips == pytest.approx(busy.chosen_mhz / 10.0)
    c.observe(Finished(1, 0.5, 50, Finish.END_ID))
    assert c.decide(0.5).predicted_ips is None


def test_predicted_ips_when_every_request_in_flight_is_lost() -> None:
    """A request hopeless even at maximum clock is left out of the choice, so the policy
    evaluates no iteration; the prediction still comes from the table, not 1 / 1e-9."""
    c = controller()
    c.observe(Arrived(1, 0.0, 100, 50, slo=Slo(e2e_s=0.001)))
    d = c.decide(5.0)
    assert d.lost_requests == 1 and d.queued == 1
    assert d.predicted_ips == pytest.approx(d.chosen_mhz / 10.0)


def test_take_outcomes_hands_each_finished_request_over_once() -> None:
    c = controller()
    for rid in (1, 2):
        c.observe(Arrived(rid, 0.0, 100, 50))
        c.observe(FirstToken(rid, 0.1))
        c.observe(Finished(rid, 1.1, 11, Finish.END_ID))
    taken = c.take_outcomes()
    assert [o.request_id for o in taken] == [1, 2]
    assert taken[0].mean_tbt_s == pytest.approx(0.1) and taken[0].e2e_s == pytest.approx(1.1)
    assert c.take_outcomes() == [] and len(c.outcomes) == 0


def test_the_expected_arrivals_are_capped_at_the_room_the_requests_in_flight_reserve(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """KV reserved for prompt + max_tokens bounds the batch (GUARANTEED_NO_EVICT): 100 blocks
    over 20-block reservations leave room for 5, below the batch limit of 8."""
    from throttllem.controller import control_loop

    seen: list[int | None] = []
    choose = control_loop.choose_clock

    def recording(*args: object, **kwargs: object) -> object:
        seen.append(kwargs.get("room"))  # type: ignore[arg-type]
        return choose(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(control_loop, "choose_clock", recording)
    c = controller()
    c.observe(Arrived(1, 0.0, 100, 1180))  # ceil(1280 / 64) = 20 blocks
    c.observe(Arrived(2, 0.0, 228, 1052))  # 20 blocks
    c.decide(0.0)
    assert seen == [5]
