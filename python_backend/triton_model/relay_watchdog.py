"""Requests the router relays, and a watchdog that ends those whose instance died.

When a Triton Python-backend stub process dies (killed, OOM, a crash), Triton neither restarts it
nor ends the requests it held: a BLS response iterator waiting on one of them waits forever, and
the client never gets its final response. The router records, for every relay, which processes
served the target model when the request went out (the telemetry registry's pids). A relay that
has heard nothing for `stall_s` while one of those processes is gone is ended with an error
naming the request, so every client request still ends with exactly one final response.

New requests are not sent to a model with a dead instance at all: the router holds them until
the model is repaired (the controller reloads it) or `stall_s` passes. That spares them the dead
instance, and spares Triton a dispatch to a stub that just died: while diagnosing soak crashes
(tritonserver aborting with `boost::interprocess::lock_exception` or signal 11 in
libtriton_python.so), requests arriving right after a stub's SIGKILL were the common factor.

The stall bound keeps a request that is merely slow (queued behind others on a live instance of
the same model) from being failed the moment a sibling instance dies; a request that has heard
nothing for `stall_s` while an instance it may be on is dead has, in practice, lost its instance.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .guarded_sender import GuardedSender

logger = logging.getLogger(__name__)

Clock = Callable[[], float]


class InstanceLiveness:
    """Which processes serve a model, from the telemetry registry, and which of them died.

    A registry entry whose process was never seen alive is stale (left by an earlier server
    whose instance never unregistered) and is ignored; one seen alive that is now gone is a
    dead instance until a new instance of the same name overwrites its entry."""

    def __init__(self, entries: Callable[[str], list[int]], alive: Callable[[int], bool]) -> None:
        self._entries = entries
        self._alive = alive
        self._seen: set[int] = set()
        self._lock = threading.Lock()

    def pids(self, model: str) -> frozenset[int]:
        out = set()
        for pid in self._entries(model):
            if self._alive(pid):
                with self._lock:
                    self._seen.add(pid)
                out.add(pid)
            elif pid in self._seen:
                out.add(pid)
        return frozenset(out)

    def dead(self, model: str) -> list[int]:
        return sorted(p for p in self.pids(model) if not self._alive(p))


@dataclass
class Relay:
    """One client request in flight through the router. Every response to the client goes
    through `send` (a GuardedSender), so the relay thread and the watchdog can never both send
    a final one, and nothing asks Triton about the request after it."""

    request_id: str
    target: str
    pids: frozenset[int]
    sender: Any
    last_activity_s: float
    outcome: str = "completed"  # completed | error | cancelled
    out: GuardedSender = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.out = GuardedSender(self.sender)

    @property
    def closed(self) -> bool:
        """A final response has been sent."""
        return self.out.closed

    def send(self, response: Any = None, *, final: bool = False, flags: int = 0) -> bool:
        """Send unless already closed; False when the relay was closed (nothing sent)."""
        return self.out.send(response, final=final, flags=flags)

    def is_cancelled(self) -> bool:
        return self.out.is_cancelled()


class RelayWatchdog:
    """Tracks relays in flight; `sweep` ends those whose instance died (see the module doc)."""

    def __init__(
        self,
        stall_s: float,
        instance_pids: Callable[[str], frozenset[int]],
        alive: Callable[[int], bool],
        fail: Callable[[Relay, str], None],
        clock: Clock = time.monotonic,
    ) -> None:
        if stall_s <= 0:
            raise ValueError(f"relay_stall_s must be > 0, got {stall_s}")
        self.stall_s = stall_s
        self._instance_pids = instance_pids
        self._alive = alive
        self._fail = fail
        self._clock = clock
        self._relays: dict[int, Relay] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def open(self, request_id: str, target: str, sender: Any) -> Relay:
        try:
            pids = self._instance_pids(target)
        except Exception:  # an unreadable registry must not fail the request itself
            logger.exception("reading the instances of %s", target)
            pids = frozenset()
        relay = Relay(request_id, target, pids, sender, self._clock())
        with self._lock:
            self._relays[id(relay)] = relay
        return relay

    def retarget(self, relay: Relay, target: str) -> None:
        """The relay moved to another model (its first target went away before answering)."""
        relay.target = target
        relay.pids = self._instance_pids(target)
        relay.last_activity_s = self._clock()

    def heard(self, relay: Relay) -> None:
        relay.last_activity_s = self._clock()

    def close(self, relay: Relay) -> None:
        with self._lock:
            self._relays.pop(id(relay), None)

    def in_flight(self) -> int:
        with self._lock:
            return len(self._relays)

    def sweep(self) -> list[Relay]:
        """End the relays that lost their instance; the ones ended."""
        now = self._clock()
        with self._lock:
            stalled = [r for r in self._relays.values() if now - r.last_activity_s > self.stall_s]
        ended = []
        for relay in stalled:
            dead = sorted(p for p in relay.pids if not self._alive(p))
            if not dead:
                continue
            message = (
                f"router: request '{relay.request_id}': model {relay.target} lost the instance "
                f"serving it (process {', '.join(map(str, dead))} ended) and it heard nothing for "
                f"{now - relay.last_activity_s:.0f} s"
            )
            self._fail(relay, message)
            self.close(relay)
            ended.append(relay)
        return ended

    def start(self) -> None:
        period = min(1.0, self.stall_s / 4)

        def run() -> None:
            while not self._stop.wait(period):
                try:
                    for relay in self.sweep():
                        logger.warning("ended relay of request %s to %s: its instance died",
                                       relay.request_id, relay.target)  # fmt: skip
                except Exception:
                    logger.exception("relay watchdog sweep failed")

        self._thread = threading.Thread(target=run, name="throttllem-relay-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
