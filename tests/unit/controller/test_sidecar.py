"""The sidecar's fault handling: telemetry silence, snapshot rebuilds, and clocks reset on close.

Real parts wherever they can be: the sidecar builds its own InstanceControllers, scoreboards and
IPS tables, and actuates through the real `TwinDriver` over in-process twin GPUs. Only the
transport is faked: `discover` returns registry entries from a list, and `InstanceLink` is a fake
whose `connected` and `last_heard_monotonic` the tests set, and that pushes `Delivery`s into the
sidecar's inbox as the real link's thread would. Time moves by setting those fields and the fake
engine clock, then calling `sidecar.step()`: nothing sleeps.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from throttllem.backend.telemetry.discovery import InstanceEndpoint
from throttllem.backend.twin.errors import TwinNvmlError
from throttllem.backend.twin.gpu import TwinGpu
from throttllem.backend.twin.hardware import GpuSpec, default_catalog
from throttllem.backend.twin.time_source import VirtualTime
from throttllem.controller import sidecar as sidecar_module
from throttllem.controller.control_loop import ControllerConfig
from throttllem.controller.events import (
    Arrived,
    Event,
    Finish,
    Finished,
    FirstToken,
    InFlight,
    Iteration,
    Slo,
)
from throttllem.controller.gpu.driver import ClockDriver
from throttllem.controller.gpu.errors import GpuLost, LeaseConflict
from throttllem.controller.gpu.twin_driver import TwinDriver
from throttllem.controller.perf_model import FEATURES, PerformanceModel
from throttllem.controller.scaling.rate_meter import ArrivalRateMeter
from throttllem.controller.sidecar import Sidecar, SidecarConfig
from throttllem.controller.telemetry_client import Delivery
from throttllem.v1 import telemetry_pb2 as pb

TIMEOUT_S = 3.0
COL = {name: i for i, name in enumerate(FEATURES)}


class AnalyticModel:
    """IPS falling with work and rising with the clock: enough for the policy to pick clocks."""

    def predict_ips(self, features: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        f = features[:, COL["sm_clock_mhz"]]
        ms = (
            8.0
            + 0.02 * features[:, COL["kv_blocks"]] / 64
            + (2.0 + 0.05 * features[:, COL["batch_size"]] + 0.01 * features[:, COL["ctx_tokens"]])
            * (1410.0 / f)
        )
        return np.asarray(1000.0 / ms, dtype=np.float64)


class PowerAnalyticModel(AnalyticModel):
    """The same, with power per GPU rising with the clock and the batch."""

    def has_power(self) -> bool:
        return True

    def predict_power_w(self, features: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        f = features[:, COL["sm_clock_mhz"]]
        b = features[:, COL["batch_size"]]
        return np.asarray(60.0 + 0.15 * f + 1.0 * b, dtype=np.float64)


class CountingTwinGpu(TwinGpu):
    """A twin GPU that counts the lock and reset calls reaching it; `fail_set` makes its lock
    calls fail (e.g. NVML's "GPU is lost")."""

    def __init__(self, spec: GpuSpec, time_source: VirtualTime, index: int) -> None:
        super().__init__(spec, time_source, index=index, clock_change_latency_ms=0.0)
        self.sets = 0
        self.resets = 0
        self.fail_set: Exception | None = None

    def set_locked_clocks(self, min_mhz: int, max_mhz: int) -> None:
        self.sets += 1
        if self.fail_set is not None:
            raise self.fail_set
        super().set_locked_clocks(min_mhz, max_mhz)

    def reset_locked_clocks(self) -> None:
        self.resets += 1
        super().reset_locked_clocks()


@dataclass
class FakeEngineClock:
    """The engine's time base (EngineClock's `now_s`), moved by the test."""

    t_s: float = 0.0

    def now_s(self) -> float:
        return self.t_s


class FakeLink:
    """Stands in for `InstanceLink`: same attributes the sidecar reads, no gRPC, no thread."""

    def __init__(self, endpoint: str, out: queue.Queue[Delivery], info: pb.EngineInfo) -> None:
        self.endpoint = endpoint
        self.info = info
        self.clock = FakeEngineClock()
        self.connected = True
        self.gaps = 0
        self.last_heard_monotonic = time.monotonic()
        self.closed = False
        self.fail_on_close = False
        self._out = out

    def deliver(self, events: list[Event], snapshot: list[InFlight] | None = None) -> None:
        """What the real link's thread does with a batch: hear it, and queue it."""
        self.connected = True
        self.last_heard_monotonic = time.monotonic()
        self._out.put(Delivery(self.endpoint, events, snapshot))

    def go_silent(self, for_s: float, *, connected: bool = False) -> None:
        """The stream dropped (or stalled) `for_s` seconds ago and nothing arrived since."""
        self.connected = connected
        self.last_heard_monotonic = time.monotonic() - for_s

    def close(self) -> None:
        self.closed = True
        if self.fail_on_close:
            raise RuntimeError("channel already torn down")


def engine_info(name: str, tp: int) -> pb.EngineInfo:
    return pb.EngineInfo(
        instance_name=name,
        engine_kind="twin",
        llm="llama-2-13b",
        gpu_name="A100-SXM4-40GB",
        tp_size=tp,
        gpu_indices=list(range(tp)),
        max_batch_size=64,
        kv_max_blocks=2000,
        kv_tokens_per_block=64,
        scheduler_policy="GUARANTEED_NO_EVICT",
        default_slo=pb.Slo(ttft_ms=1000, tbt_ms=200, e2e_ms=30_000),
    )


class Harness:
    """A Sidecar over fake links and real twin drivers, one per registered instance."""

    def __init__(
        self,
        monkeypatch: pytest.MonkeyPatch,
        *,
        with_model: bool = True,
        tp: int = 2,
        power: bool = False,
        idle_power_w: float | None = None,
        watch_models: tuple[str, ...] = (),
        meter: ArrivalRateMeter | None = None,
        share_gpus: bool = False,
        idle_clocks: str = "lock",
        lengths_dir: Path | None = None,
        lengths_save_every_s: float = 60.0,
    ) -> None:
        self.spec = default_catalog().gpu("A100-SXM4-40GB")
        self.gpu_time = VirtualTime()
        self.tp = tp
        self.registry: list[InstanceEndpoint] = []
        self.links: dict[str, FakeLink] = {}
        self.gpus: dict[str, list[CountingTwinGpu]] = {}
        self.drivers: dict[str, TwinDriver] = {}
        self._with_model = with_model
        self._power = power
        self._shared: list[CountingTwinGpu] | None = None
        if share_gpus:  # every instance on the same GPUs
            self._shared = [CountingTwinGpu(self.spec, self.gpu_time, i) for i in range(tp)]

        def fake_discover(registry_dir: object, model_name: str) -> list[InstanceEndpoint]:
            return [e for e in self.registry if e.model_name == model_name]

        def fake_link(endpoint: str, out: queue.Queue[Delivery]) -> FakeLink:
            link = FakeLink(endpoint, out, engine_info(f"inst@{endpoint}", self.tp))
            self.links[endpoint] = link
            return link

        monkeypatch.setattr(sidecar_module, "discover", fake_discover)
        monkeypatch.setattr(sidecar_module, "InstanceLink", fake_link)
        self.sidecar = Sidecar(
            SidecarConfig(
                telemetry_timeout_s=TIMEOUT_S,
                idle_power_w=idle_power_w,
                watch_models=watch_models,
                # Locked even while idle: these tests follow locks and resets through
                # disconnects and restarts without traffic (the default releases an idle
                # instance's lock: test_an_idle_instance_s_gpus_are_released_by_default).
                controller=ControllerConfig(idle_clocks=idle_clocks),
                lengths_dir=lengths_dir,
                lengths_save_every_s=lengths_save_every_s,
            ),
            self._model,
            self._driver,
            meter=meter,
        )

    def _model(self, link: object) -> PerformanceModel | None:
        if not self._with_model:
            return None
        return PowerAnalyticModel() if self._power else AnalyticModel()

    def _driver(self, link: object) -> ClockDriver:
        endpoint = link.endpoint  # type: ignore[attr-defined]
        base = 10 * len(self.gpus)  # distinct NVML indices per instance
        gpus = self._shared or [
            CountingTwinGpu(self.spec, self.gpu_time, base + i) for i in range(self.tp)
        ]
        self.gpus[endpoint] = gpus
        self.drivers[endpoint] = TwinDriver(gpus)
        return self.drivers[endpoint]

    def register(self, endpoint: str, model: str = "tensorrt_llm") -> FakeLink:
        self.registry.append(
            InstanceEndpoint(
                "throttllem.v1",
                model,
                "1",
                f"inst@{endpoint}",
                endpoint,
                pid=1,
                started_unix_ns=0,
                engine_kind="twin",
                gpu_control=True,
            )
        )
        self.sidecar.discover()
        return self.links[endpoint]

    def unregister(self, endpoint: str) -> None:
        """The instance went away (variant unloaded): registry entry gone, stream closed."""
        self.registry[:] = [e for e in self.registry if e.endpoint != endpoint]
        self.links[endpoint].connected = False

    def locks(self, endpoint: str) -> list[tuple[int, int] | None]:
        return [g.locked_clocks_mhz() for g in self.gpus[endpoint]]

    def resets(self, endpoint: str) -> int:
        return sum(g.resets for g in self.gpus[endpoint])

    def decisions(self, endpoint: str) -> int:
        controller = self.sidecar.instances[endpoint].controller
        assert controller is not None
        return len(controller.decisions)

    def tick(self, endpoint: str, engine_s: float) -> None:
        """Move the engine clock past a decision period, then run one sidecar step."""
        self.links[endpoint].clock.t_s += engine_s
        self.sidecar.step()


@pytest.fixture
def harness(monkeypatch: pytest.MonkeyPatch) -> Iterator[Harness]:
    h = Harness(monkeypatch)
    yield h
    h.sidecar.close()


def arrived(request_id: int, t_s: float, prompt: int = 512) -> Arrived:
    return Arrived(request_id, t_s, prompt, max_tokens=256, slo=Slo())


# ---- (a) telemetry silence ---------------------------------------------------------------------


def test_an_idle_instance_s_gpus_are_released_by_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Default clocks idle lower than any lock; the first arrival locks every GPU again."""
    h = Harness(monkeypatch, idle_clocks="release")
    try:
        link = h.register("a:1")
        h.sidecar.step()
        assert h.locks("a:1") == [None, None] and h.resets("a:1") == 2
        link.deliver([arrived(1, link.clock.t_s)])
        h.sidecar.step()
        locks = h.locks("a:1")
        assert all(lock is not None for lock in locks) and locks[0] == locks[1]
    finally:
        h.sidecar.close()


def test_first_step_locks_every_gpu_of_the_instance(harness: Harness) -> None:
    harness.register("a:1")
    harness.sidecar.step()
    locks = harness.locks("a:1")
    assert len(locks) == 2 and all(lock is not None for lock in locks)
    assert locks[0] == locks[1]
    assert harness.decisions("a:1") == 1


def test_silence_while_disconnected_resets_once_and_stops_deciding(harness: Harness) -> None:
    link = harness.register("a:1")
    harness.sidecar.step()
    assert all(lock is not None for lock in harness.locks("a:1"))
    decided = harness.decisions("a:1")

    link.go_silent(TIMEOUT_S + 1.0)
    harness.tick("a:1", 1.0)
    assert harness.locks("a:1") == [None, None]
    assert harness.resets("a:1") == 2  # one reset call per GPU
    assert harness.sidecar.instances["a:1"].reset_for_silence

    for _ in range(5):  # the silence goes on: no more resets, no decisions
        harness.tick("a:1", 1.0)
    assert harness.resets("a:1") == 2
    assert harness.decisions("a:1") == decided
    assert harness.locks("a:1") == [None, None]


def test_decides_and_locks_again_when_telemetry_comes_back(harness: Harness) -> None:
    link = harness.register("a:1")
    harness.sidecar.step()
    before = harness.locks("a:1")
    link.go_silent(TIMEOUT_S + 1.0)
    harness.tick("a:1", 1.0)
    assert harness.locks("a:1") == [None, None]
    decided = harness.decisions("a:1")

    link.deliver([arrived(1, link.clock.t_s)])  # the link reconnected and heard a batch
    harness.tick("a:1", 1.0)
    assert not harness.sidecar.instances["a:1"].reset_for_silence
    assert harness.decisions("a:1") > decided
    # The governor forgot its clock at the reset, so the lock is written again even though the
    # policy may choose the same clock as before the silence.
    assert all(lock is not None for lock in harness.locks("a:1"))
    assert before[0] is not None

    # A second silence is a new one: reset again, once.
    link.go_silent(TIMEOUT_S + 1.0)
    harness.tick("a:1", 1.0)
    harness.tick("a:1", 1.0)
    assert harness.resets("a:1") == 4
    assert harness.locks("a:1") == [None, None]


def test_short_disconnect_does_not_reset(harness: Harness) -> None:
    link = harness.register("a:1")
    harness.sidecar.step()
    link.go_silent(TIMEOUT_S / 3)
    harness.tick("a:1", 1.0)
    assert harness.resets("a:1") == 0
    assert all(lock is not None for lock in harness.locks("a:1"))


def test_silent_but_connected_stream_is_not_lost(harness: Harness) -> None:
    """An idle engine sends nothing; a stream that is still up is not a lost one."""
    link = harness.register("a:1")
    harness.sidecar.step()
    decided = harness.decisions("a:1")
    link.go_silent(TIMEOUT_S * 10, connected=True)
    harness.tick("a:1", 1.0)
    assert harness.resets("a:1") == 0
    assert harness.decisions("a:1") == decided + 1  # the periodic decision still runs


def test_silence_resets_only_the_silent_instance(harness: Harness) -> None:
    quiet = harness.register("a:1")
    harness.register("b:2")
    harness.sidecar.step()
    assert all(lock is not None for lock in harness.locks("b:2"))
    quiet.go_silent(TIMEOUT_S + 1.0)
    harness.sidecar.step()
    assert harness.locks("a:1") == [None, None]
    assert harness.resets("b:2") == 0
    assert all(lock is not None for lock in harness.locks("b:2"))


# ---- (b) snapshot rebuilds ---------------------------------------------------------------------


def test_snapshot_replaces_the_scoreboard_then_events_apply_on_top(harness: Harness) -> None:
    link = harness.register("a:1")
    link.deliver([arrived(1, 0.0), arrived(2, 0.0)])
    harness.sidecar.step()
    controller = harness.sidecar.instances["a:1"].controller
    assert controller is not None
    assert set(controller.scoreboard.requests) == {1, 2}
    link.clock.t_s = 5.0
    snapshot = [
        InFlight(2, 0.0, 512, 256, output_tokens=40, first_token_s=0.5),
        InFlight(3, 1.0, 128, 64, output_tokens=0, first_token_s=None, slo=Slo(e2e_s=9.0)),
    ]
    link.deliver([arrived(4, 4.9)], snapshot)
    harness.sidecar.step()
    assert controller.decisions[-1].trigger == "arrival"  # the event after the rebuild

    board = controller.scoreboard
    assert set(board.requests) == {2, 3, 4}  # 1 is gone: the engine no longer has it
    assert board.requests[2].generated == 40
    assert board.requests[2].first_token_s == 0.5
    assert board.requests[3].first_token_s is None
    assert board.requests[3].e2e_deadline_s == pytest.approx(10.0)  # the request's own SLO
    assert board.requests[3].ttft_deadline_s == pytest.approx(2.0)  # the deployment default
    last = controller.decisions[-1]
    assert last.time_s == 5.0  # decided at once, on the rebuilt state
    assert last.running + last.queued == 3


def test_empty_snapshot_clears_the_scoreboard(harness: Harness) -> None:
    link = harness.register("a:1")
    link.deliver([arrived(1, 0.0), arrived(2, 0.0)])
    harness.sidecar.step()
    link.deliver([], [])
    link.clock.t_s = 0.01  # before the next periodic decision is due
    harness.sidecar.step()
    controller = harness.sidecar.instances["a:1"].controller
    assert controller is not None
    assert len(controller.scoreboard) == 0
    assert controller.decisions[-1].trigger == "snapshot"


def test_snapshot_reapplies_the_clock_in_force(harness: Harness) -> None:
    """After a rebuild the GPU may have been reset behind the controller's back (backend
    restart): the same clock is sent again instead of being skipped as unchanged."""
    link = harness.register("a:1")
    harness.sidecar.step()
    controller = harness.sidecar.instances["a:1"].controller
    assert controller is not None
    first = controller.decisions[-1]
    assert first.applied_mhz is not None
    harness.tick("a:1", 1.0)  # a periodic decision: same clock, nothing sent
    assert controller.decisions[-1].trigger == "period"
    assert controller.decisions[-1].applied_mhz is None

    link.deliver([], [])
    link.clock.t_s += 0.01
    harness.sidecar.step()
    last = controller.decisions[-1]
    assert last.trigger == "snapshot"
    assert last.chosen_mhz == first.chosen_mhz
    assert last.applied_mhz == first.chosen_mhz


def test_delivery_for_an_unknown_instance_is_dropped(harness: Harness) -> None:
    link = harness.register("a:1")
    link.deliver([arrived(1, 0.0)])
    harness.sidecar._inbox.put(
        Delivery("gone:9", [arrived(2, 0.0)], [InFlight(3, 0, 1, 1, 0, None)])
    )
    harness.sidecar.step()
    controller = harness.sidecar.instances["a:1"].controller
    assert controller is not None
    assert set(controller.scoreboard.requests) == {1}


# ---- (c) close ---------------------------------------------------------------------------------


def test_close_resets_every_locked_gpu_of_every_instance(harness: Harness) -> None:
    harness.register("a:1")
    harness.register("b:2")
    harness.sidecar.step()
    gpus = harness.gpus["a:1"] + harness.gpus["b:2"]
    assert all(g.locked_clocks_mhz() is not None for g in gpus)

    harness.sidecar.close()
    assert all(g.locked_clocks_mhz() is None for g in gpus)
    assert all(link.closed for link in harness.links.values())
    assert harness.sidecar.instances == {}


def test_close_resets_the_gpus_even_when_a_link_fails_to_close(harness: Harness) -> None:
    first = harness.register("a:1")
    harness.register("b:2")
    harness.sidecar.step()
    first.fail_on_close = True
    harness.sidecar.close()
    for endpoint in ("a:1", "b:2"):
        assert harness.locks(endpoint) == [None, None]
    assert harness.sidecar.instances == {}


def test_close_writes_nothing_to_gpus_it_never_locked(monkeypatch: pytest.MonkeyPatch) -> None:
    h = Harness(monkeypatch, with_model=False)  # no performance model: observe only
    h.register("a:1")
    h.sidecar.step()
    h.sidecar.close()
    assert [(g.sets, g.resets) for g in h.gpus["a:1"]] == [(0, 0), (0, 0)]


def test_vanished_instance_is_detached_and_its_gpus_reset(harness: Harness) -> None:
    link = harness.register("a:1")
    harness.sidecar.step()
    assert all(lock is not None for lock in harness.locks("a:1"))
    harness.registry.clear()  # the backend died: its registry entry is gone
    link.connected = False
    harness.sidecar.discover()
    assert "a:1" not in harness.sidecar.instances
    assert link.closed
    assert harness.locks("a:1") == [None, None]


def test_a_lost_gpu_drops_its_instance_with_every_gpu_reset_and_the_rest_goes_on(
    harness: Harness,
) -> None:
    """GPU 1 is lost while the first lock is written (GPU 0 already locked; the driver no longer
    knows either lock): that instance is dropped, GPU 0 reset anyway and GPU 1 tried; the other
    instance keeps its control and the controller keeps running."""
    harness.register("a:1")
    harness.register("b:2")
    harness.gpus["a:1"][1].fail_set = TwinNvmlError(15, "GPU is lost")
    harness.sidecar.step()
    assert harness.gpus["a:1"][0].sets == 1
    assert harness.locks("a:1") == [None, None]
    assert harness.resets("a:1") == 2  # GPU 0 reset, GPU 1 tried
    assert "a:1" not in harness.sidecar.instances
    assert all(lock is not None for lock in harness.locks("b:2"))
    harness.sidecar.close()
    assert harness.locks("b:2") == [None, None]


def test_a_lease_conflict_observes_that_instance_only(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """Another client of the clock daemon holds b's GPUs: b is observed only (still decided and
    exported, never written), with one warning; a is controlled; the controller goes on."""
    caplog.set_level(logging.WARNING)
    harness.register("a:1")
    harness.register("b:2")
    for gpu in harness.gpus["b:2"]:
        gpu.fail_set = LeaseConflict(f"GPU {gpu.index} is leased by another client")
    harness.sidecar.step()
    assert all(lock is not None for lock in harness.locks("a:1"))
    assert harness.locks("b:2") == [None, None]
    driver = harness.drivers["b:2"]
    assert not driver.can_actuate()
    assert harness.drivers["a:1"].can_actuate()
    decided = harness.decisions("b:2")
    sets = [g.sets for g in harness.gpus["b:2"]]
    for request_id in (1, 2, 3):
        harness.links["b:2"].deliver([arrived(request_id, 0.0)])
        harness.tick("b:2", 1.0)
    assert harness.decisions("b:2") > decided  # still decided
    assert [g.sets for g in harness.gpus["b:2"]] == sets  # never written again
    warnings = [r for r in caplog.records if "observing this instance only" in r.getMessage()]
    assert len(warnings) == 1 and "inst@b:2" in warnings[0].getMessage()
    harness.sidecar.close()
    assert harness.resets("b:2") == 0  # nothing was locked there: nothing to reset
    assert harness.locks("a:1") == [None, None]


# ---- (d) metrics -------------------------------------------------------------------------------


def sample(harness: Harness, name: str, endpoint: str, **labels: str) -> float | None:
    value = harness.sidecar.metrics.registry.get_sample_value(
        name, {"instance": f"inst@{endpoint}", **labels}
    )
    return None if value is None else float(value)


def iteration(t_s: float, batch: int, latency_s: float = 0.02, kv: int = 100) -> Iteration:
    return Iteration(1, t_s, latency_s, batch, 0, 0, batch, 0, kv, 2000, 64)


def test_predicted_ips_is_not_exported_while_nothing_is_in_flight(harness: Harness) -> None:
    """Idle (before any traffic and after the last request): no prediction, the gauge keeps
    its last value; never the policy's 1 / 1e-9 for "no iteration"."""
    link = harness.register("a:1")
    harness.sidecar.step()
    assert sample(harness, "throttllem_predicted_ips", "a:1") is None  # idle from the start
    link.deliver([arrived(1, 0.0), FirstToken(1, 0.05), iteration(0.05, 1)])
    harness.tick("a:1", 0.2)
    busy = sample(harness, "throttllem_predicted_ips", "a:1")
    assert busy is not None and 1.0 < busy < 1000.0
    link.deliver([Finished(1, link.clock.t_s, 20, Finish.END_ID)])
    for _ in range(3):
        harness.tick("a:1", 0.2)
    assert harness.sidecar.instances["a:1"].controller.decisions[-1].running == 0  # type: ignore[union-attr]
    assert sample(harness, "throttllem_predicted_ips", "a:1") == busy


def test_finished_requests_feed_the_histograms_and_do_not_accumulate(harness: Harness) -> None:
    link = harness.register("a:1")
    assert sample(harness, "throttllem_slo_target_seconds", "a:1", kind="ttft") == 1.0
    assert sample(harness, "throttllem_slo_target_seconds", "a:1", kind="tbt") == 0.2
    assert sample(harness, "throttllem_slo_target_seconds", "a:1", kind="e2e") == 30.0
    controller = harness.sidecar.instances["a:1"].controller
    assert controller is not None
    for batch in range(3):
        events: list[Event] = []
        for k in range(10):
            rid = 10 * batch + k
            t = 10.0 * batch + 0.01 * k
            events += [
                arrived(rid, t),
                FirstToken(rid, t + 0.1),
                Finished(rid, t + 2.0, 21, Finish.END_ID),
            ]
        link.deliver(events)
        harness.tick("a:1", 10.0)
        assert len(controller.outcomes) == 0  # taken every step
    assert sample(harness, "throttllem_ttft_seconds_count", "a:1") == 30
    assert sample(harness, "throttllem_tbt_seconds_count", "a:1") == 30
    assert sample(harness, "throttllem_e2e_seconds_count", "a:1") == 30
    assert sample(harness, "throttllem_e2e_seconds_sum", "a:1") == pytest.approx(60.0)
    assert sample(harness, "throttllem_tbt_seconds_sum", "a:1") == pytest.approx(30 * 1.9 / 20)


def test_energy_saving_ratio_against_maximum_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """1 - E / E_max, E measured by the GPUs since attaching, E_max from the table: idle power
    over the span plus every observed iteration's energy above idle at maximum clock."""
    h = Harness(monkeypatch, power=True)
    link = h.register("a:1")
    inst = h.sidecar.instances["a:1"]
    assert inst.controller is not None and inst.estimate is not None
    table = inst.controller.table
    assert table.idle_power_w == h.spec.idle_power_w > 0  # the twin preset's, per GPU
    start_mj = sum(g.total_energy_mj() for g in h.gpus["a:1"])
    iterations = [iteration(0.02 * (i + 1), batch=4, kv=300) for i in range(200)]
    link.deliver(iterations)
    h.gpu_time.advance_to(10.0)
    h.tick("a:1", 10.0)
    measured_j = (sum(g.total_energy_mj() for g in h.gpus["a:1"]) - start_mj) / 1000.0
    e_max = table.idle_power_w * 2 * 10.0 + 200 * float(table.energy_per_iteration_j(4, 300)[-1])
    ratio = sample(h, "throttllem_energy_saving_ratio", "a:1")
    assert ratio == pytest.approx(1.0 - measured_j / e_max, abs=1e-6)
    assert -1.0 <= ratio <= 1.0  # type: ignore[operator]
    h.sidecar.close()


@pytest.mark.parametrize(("power", "idle_w"), [(False, None), (True, 0.0)])
def test_no_energy_saving_ratio_without_power_or_idle_power(
    monkeypatch: pytest.MonkeyPatch, power: bool, idle_w: float | None
) -> None:
    h = Harness(monkeypatch, power=power, idle_power_w=idle_w)
    link = h.register("a:1")
    link.deliver([iteration(0.02, batch=4)])
    h.gpu_time.advance_to(5.0)
    h.tick("a:1", 5.0)
    assert h.sidecar.instances["a:1"].estimate is None
    assert sample(h, "throttllem_energy_saving_ratio", "a:1") is None
    assert sample(h, "throttllem_energy_joules", "a:1") is not None
    h.sidecar.close()


# ---- (e) instance scaling: sized variants behind a router --------------------------------------


def test_watched_variants_are_controlled_and_counted_under_the_router(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [100.0]
    meter = ArrivalRateMeter(10.0, clock=lambda: now[0], models=["tensorrt_llm"])
    h = Harness(
        monkeypatch, watch_models=("tensorrt_llm_tp1", "tensorrt_llm_tp2"), meter=meter, tp=1
    )
    h.register("r:0")  # instances of model_name itself are controlled too
    tp1 = h.register("v1:1", "tensorrt_llm_tp1")
    tp2 = h.register("v2:2", "tensorrt_llm_tp2")
    h.registry.append(replace(h.registry[-1], model_name="other_model", endpoint="x:9"))
    h.sidecar.discover()  # another model's instance: not watched
    assert set(h.sidecar.instances) == {"r:0", "v1:1", "v2:2"}
    tp1.deliver([arrived(1, 0.0), arrived(2, 0.0)])
    tp2.deliver([arrived(3, 0.0)])
    h.sidecar.step()
    assert meter.models() == ["tensorrt_llm"]  # every arrival under the router's name
    now[0] = 105.0
    assert meter.request_rate_rps("tensorrt_llm") == pytest.approx(3 / 5.0)
    assert all(lock is not None for lock in h.locks("v1:1") + h.locks("v2:2"))

    h.unregister("v1:1")  # the scaler unloaded the TP1 variant
    h.sidecar.discover()
    assert set(h.sidecar.instances) == {"r:0", "v2:2"}
    assert h.links["v1:1"].closed
    assert h.locks("v1:1") == [None] and h.resets("v1:1") == 1  # back to default clocks
    assert h.locks("v2:2") != [None] and h.resets("v2:2") == 0
    # The variant's gauges go with it; the live one's stay.
    assert sample(h, "throttllem_clock_mhz", "v1:1") is None
    assert sample(h, "throttllem_slo_target_seconds", "v1:1", kind="tbt") is None
    assert sample(h, "throttllem_clock_mhz", "v2:2") is not None
    h.sidecar.close()


def test_an_instance_left_on_a_detached_instances_gpus_locks_them_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two instances on the same GPUs (a variant loaded beside the one it replaces): closing
    the one that went away resets the GPUs, so the other writes its clock again."""
    h = Harness(monkeypatch, share_gpus=True)
    h.register("a:1")
    h.register("b:2")
    h.sidecar.step()
    assert all(lock is not None for lock in h.locks("b:2"))
    h.unregister("a:1")
    h.sidecar.discover()
    assert h.locks("b:2") == [None, None]  # a's close reset the shared GPUs
    h.tick("b:2", 1.0)
    assert all(lock is not None for lock in h.locks("b:2"))
    h.sidecar.close()


def test_an_instance_that_dies_while_being_attached_is_skipped(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its registry entry is still there but its GPU control answers no more (the soak's
    backend kill): the controller skips it, closes its link and controls the rest."""
    harness.register("a:1")
    make_driver = harness._driver

    def driver(link: object) -> ClockDriver:
        if link.endpoint == "dead:9":  # type: ignore[attr-defined]
            raise GpuLost("dead:9: get GPU state: connection refused")
        return make_driver(link)

    monkeypatch.setattr(harness.sidecar, "_drivers", driver)
    harness.register("dead:9")  # attaches at once
    harness.sidecar.step()
    assert set(harness.sidecar.instances) == {"a:1"}
    assert harness.links["dead:9"].closed
    harness.sidecar.close()
