"""The router's relay watchdog: a relay that hears nothing while an instance it may be on is
dead ends with one error final; live or merely slow relays are left alone."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from throttllem.backend.triton_model.relay_watchdog import InstanceLiveness, Relay, RelayWatchdog


class FakeSender:
    def __init__(self) -> None:
        self.sent: list[tuple[Any, int]] = []

    def send(self, response: Any = None, flags: int = 0) -> None:
        self.sent.append((response, flags))


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(pids: dict[str, frozenset[int]], dead: set[int], stall_s: float = 10.0):  # type: ignore[no-untyped-def]
    clock = Clock()
    failed: list[tuple[str, str]] = []

    def fail(relay: Relay, message: str) -> None:
        if relay.send(message, final=True, flags=1):
            failed.append((relay.request_id, message))

    dog = RelayWatchdog(stall_s, lambda m: pids.get(m, frozenset()), lambda p: p not in dead,
                        fail, clock)  # fmt: skip
    return dog, clock, failed


def test_stalled_relay_on_a_dead_instance_ends_once_with_an_error_naming_it() -> None:
    dog, clock, failed = make({"m_tp1": frozenset({11, 12})}, dead={12})
    sender = FakeSender()
    relay = dog.open("r7", "m_tp1", sender)
    clock.now += 9.0
    assert dog.sweep() == []  # not stalled yet
    clock.now += 2.0
    assert dog.sweep() == [relay]
    assert len(failed) == 1 and "request 'r7'" in failed[0][1] and "12" in failed[0][1]
    assert "m_tp1" in failed[0][1]
    assert dog.in_flight() == 0
    # The relay thread, should it ever wake, cannot send a second final.
    assert relay.send("late", final=True, flags=1) is False
    assert sender.sent == [(failed[0][1], 1)]


def test_relays_on_live_instances_are_never_ended_however_slow() -> None:
    dog, clock, failed = make({"m_tp1": frozenset({11})}, dead=set())
    dog.open("r1", "m_tp1", FakeSender())
    clock.now += 1000.0
    assert dog.sweep() == [] and failed == [] and dog.in_flight() == 1


def test_activity_resets_the_stall_and_instances_started_later_do_not_count() -> None:
    pids = {"m_tp1": frozenset({11})}
    dog, clock, _ = make(pids, dead={11})
    relay = dog.open("r1", "m_tp1", FakeSender())
    clock.now += 8.0
    dog.heard(relay)
    clock.now += 8.0
    assert dog.sweep() == []  # 8 s since the last response
    # A relay opened after the dead one left the registry knows only the new process.
    pids["m_tp1"] = frozenset({21})
    other = dog.open("r2", "m_tp1", FakeSender())
    clock.now += 11.0
    assert dog.sweep() == [relay] and other.pids == frozenset({21})


def test_retarget_follows_the_new_model() -> None:
    dog, clock, _ = make({"a": frozenset({1}), "b": frozenset({2})}, dead={1})
    relay = dog.open("r1", "a", FakeSender())
    dog.retarget(relay, "b")
    clock.now += 60.0
    assert dog.sweep() == [] and relay.pids == frozenset({2})


def test_unreadable_registry_leaves_the_request_alone() -> None:
    def broken(model: str) -> frozenset[int]:
        raise OSError("registry gone")

    dog = RelayWatchdog(1.0, broken, lambda p: False, lambda r, m: None, Clock())
    relay = dog.open("r1", "m", FakeSender())
    assert relay.pids == frozenset() and dog.sweep() == []


def test_concurrent_finals_send_exactly_one() -> None:
    sender = FakeSender()
    relay = Relay("r1", "m", frozenset(), sender, 0.0)
    barrier = threading.Barrier(8)

    def finish() -> None:
        barrier.wait()
        relay.send("final", final=True, flags=1)

    threads = [threading.Thread(target=finish) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sender.sent == [("final", 1)]


def test_non_positive_stall_is_refused() -> None:
    with pytest.raises(ValueError, match="relay_stall_s"):
        RelayWatchdog(0.0, lambda m: frozenset(), lambda p: True, lambda r, m: None)


def test_liveness_ignores_stale_entries_and_reports_instances_that_died() -> None:
    entries = {"m": [1, 2, 3]}
    alive = {1, 2}  # 3: a stale entry, its process gone before this router ever saw it
    live = InstanceLiveness(lambda m: entries.get(m, []), lambda p: p in alive)
    assert live.pids("m") == frozenset({1, 2}) and live.dead("m") == []
    alive.discard(2)  # an instance seen alive dies
    assert live.dead("m") == [2] and live.pids("m") == frozenset({1, 2})
    entries["m"] = [1, 4]  # repaired: a new process under the same instance name
    alive.add(4)
    assert live.dead("m") == [] and live.pids("m") == frozenset({1, 4})
    assert live.pids("other") == frozenset()
