"""SIGINT/SIGTERM -> a threading.Event, safely.

A signal handler runs in the main thread between two bytecodes, possibly while that thread is
inside `stop.wait()` or `stop.set()` holding the event's lock: calling `stop.set()` there would
take the same (non-reentrant) lock and deadlock, which a second Ctrl-C or a forwarded SIGTERM
triggers. The handler only starts a thread that sets the event.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType


def stop_handler(stop: threading.Event) -> Callable[[int, FrameType | None], None]:
    def on_signal(signum: int, frame: FrameType | None) -> None:
        threading.Thread(target=stop.set, name="throttllem-stop", daemon=True).start()

    return on_signal


def install(stop: threading.Event) -> Callable[[], None]:
    """Handle SIGINT and SIGTERM by setting `stop`; returns the function that restores the
    previous handlers."""
    handler = stop_handler(stop)
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    return restore
