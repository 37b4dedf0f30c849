"""A stop signal arriving while the main thread holds the stop event's lock (inside wait or
set) must not deadlock: the handler hands the set to another thread."""

from __future__ import annotations

import threading

from throttllem.controller.stop_signals import stop_handler


def test_a_signal_inside_the_events_own_lock_does_not_deadlock() -> None:
    stop = threading.Event()
    handler = stop_handler(stop)
    returned = threading.Event()

    def signal_arrives_inside_wait() -> None:
        with stop._cond:  # what the main thread holds inside stop.wait() / stop.set()
            handler(15, None)  # a plain stop.set() here would block on the same lock forever
            returned.set()

    t = threading.Thread(target=signal_arrives_inside_wait, daemon=True)
    t.start()
    assert returned.wait(5.0), "the handler blocked on the event's lock"
    assert stop.wait(5.0)
