"""The switcher's sequence (load, wait ready, route, drain, unload) and the loop's repair of a
size that lost an instance, against a fake model-control client; size specs parsed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from throttllem.backend.triton_model.routing_file import RoutingTable, write_routing_file
from throttllem.controller.scaling.loop import ScalingLoop
from throttllem.controller.scaling.rate_meter import ArrivalRateMeter
from throttllem.controller.scaling.runtime import parse_sizes
from throttllem.controller.scaling.scaler import EngineSize, InstanceScaler, ScalerConfig
from throttllem.controller.scaling.switcher import SwitchError, TritonSwitcher


class FakeTriton:
    def __init__(self, ready: set[str], instances: int = 2) -> None:
        self.ready = set(ready)
        self.calls: list[tuple[str, str]] = []
        self.instances = instances
        self.ready_after_polls = 2
        self._polls = 0

    def load_model(self, model_name: str, headers: Any = None, config: str | None = None) -> None:
        self.calls.append(("load", model_name))
        self._polls = 0

    def unload_model(self, model_name: str) -> None:
        self.calls.append(("unload", model_name))
        self.ready.discard(model_name)

    def is_model_ready(self, model_name: str) -> bool:
        if model_name in self.ready:
            return True
        self._polls += 1
        if (
            any(c == ("load", model_name) for c in self.calls)
            and self._polls >= self.ready_after_polls
        ):
            self.ready.add(model_name)
        return model_name in self.ready

    def get_model_config(self, model_name: str, as_json: bool = False) -> Any:
        return {"config": {"instance_group": [{"count": self.instances, "kind": "KIND_CPU"}]}}


def switcher(tmp_path: Path, fake: FakeTriton, in_flight: dict[str, int]) -> TritonSwitcher:
    def drain(model: str) -> int:
        n = in_flight.get(model, 0)
        in_flight[model] = max(0, n - 1)  # one request finishes per poll
        return n

    s = TritonSwitcher(fake, tmp_path / "route.json", drain, poll_s=0.0, wait=lambda _: None)
    s.start("m_tp1")
    return s


def test_switch_routes_only_once_ready_and_unloads_only_once_drained(tmp_path: Path) -> None:
    fake = FakeTriton({"m_tp1"})
    in_flight = {"m_tp1": 3}
    s = switcher(tmp_path, fake, in_flight)
    report = s.switch("m_tp2")
    assert fake.calls == [("load", "m_tp2"), ("unload", "m_tp1")]
    assert RoutingTable(tmp_path / "route.json").target() == "m_tp2"
    assert in_flight["m_tp1"] == 0 and report.unloaded and report.from_model == "m_tp1"


def test_a_size_that_never_becomes_ready_is_an_error_and_traffic_stays(tmp_path: Path) -> None:
    fake = FakeTriton({"m_tp1"})
    fake.ready_after_polls = 10**9
    clock = iter(range(10**6))
    s = TritonSwitcher(
        fake, tmp_path / "route.json", lambda m: 0, poll_s=0.0, ready_timeout_s=5.0,
        clock=lambda: float(next(clock)), wait=lambda _: None,
    )  # fmt: skip
    s.start("m_tp1")
    with pytest.raises(SwitchError, match="m_tp2 not ready"):
        s.switch("m_tp2")
    assert json.loads((tmp_path / "route.json").read_text())["target"] == "m_tp1"


def test_the_loop_reloads_a_size_that_lost_an_instance(tmp_path: Path) -> None:
    fake = FakeTriton({"m_tp1"}, instances=2)
    s = switcher(tmp_path, fake, {})
    alive = {"m_tp1": 1}
    now = [0.0]
    loop = ScalingLoop(
        InstanceScaler([EngineSize("tp1", 1, 10.0)], ScalerConfig(period_s=1.0), "tp1"),
        s, ArrivalRateMeter(5.0, clock=lambda: now[0], models=["m"]), "m", lambda n: f"m_{n}",
        clock=lambda: now[0], live_instances=lambda model: alive[model],
    )  # fmt: skip
    loop.look()
    assert fake.calls[-1] == ("load", "m_tp1") and loop.repairs == 1
    alive["m_tp1"] = 2
    now[0] = 1.0
    loop.look()
    assert loop.repairs == 1


def test_size_specs_are_parsed_and_bad_ones_named() -> None:
    assert parse_sizes("tp1=1.5, tp4=8") == [EngineSize("tp1", 1, 1.5), EngineSize("tp4", 4, 8.0)]
    with pytest.raises(ValueError, match="expected tpN=REQUESTS_PER_S"):
        parse_sizes("one=1")
    with pytest.raises(ValueError, match="tp2: capacity 'x'"):
        parse_sizes("tp2=x")
    with pytest.raises(ValueError, match="tp2: capacity must be positive"):
        parse_sizes("tp2=0")


def test_routing_file_survives_a_bad_write(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    write_routing_file(path, "a")
    table = RoutingTable(path)
    assert table.target() == "a"
    path.write_text("{not json")
    assert table.target() == "a"  # kept, not lost
    write_routing_file(path, "b")
    assert table.target() == "b"
