"""A Triton response sender that can be closed once and is never asked anything afterwards.

Triton frees a request's response factory once its final response is sent, and
`is_cancelled()` reads that factory in the Triton process: asking after the final is a
use-after-free there (seen as a SIGSEGV in TRITONBACKEND_ResponseFactoryIsCancelled). Sends and
the question share one lock, so a final response sent by one thread (a send thread, the
router's watchdog) and the question asked by another (the cancellation thread, a relay) exclude
each other; once closed, nothing more is sent and the question is answered here.
"""

from __future__ import annotations

import threading
from typing import Any


class GuardedSender:
    __slots__ = ("_closed", "_lock", "_sender")

    def __init__(self, sender: Any) -> None:
        self._sender = sender
        self._lock = threading.Lock()
        self._closed = False

    @property
    def closed(self) -> bool:
        """A final response has been sent."""
        return self._closed

    def send(self, response: Any = None, *, final: bool = False, flags: int = 0) -> bool:
        """Send unless already closed (False then: nothing sent). `final` closes it."""
        with self._lock:
            if self._closed:
                return False
            if final:
                self._closed = True
            if response is None:
                self._sender.send(flags=flags)
            else:
                self._sender.send(response, flags=flags)
            return True

    def is_cancelled(self) -> bool:
        """Whether the client cancelled; False once closed (nothing left to cancel)."""
        with self._lock:
            return not self._closed and bool(self._sender.is_cancelled())
