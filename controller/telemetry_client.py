"""The controller's side of the telemetry contract: one engine instance's events, as controller
events in the engine's time base, delivered from a background thread into a queue.

Reconnects with back-off when the backend goes away, and rebuilds state from a snapshot after
connecting and after any gap, so a restart or a slow controller costs accuracy for a moment,
never correctness.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

import grpc

from throttllem.v1 import telemetry_pb2 as pb
from throttllem.v1 import telemetry_pb2_grpc as pb_grpc

from .events import Arrived, Event, Finish, Finished, FirstToken, InFlight, Iteration, Slo

log = logging.getLogger(__name__)

_FINISH = {
    pb.FINISH_REASON_END_ID: Finish.END_ID,
    pb.FINISH_REASON_STOP_WORDS: Finish.STOP_WORDS,
    pb.FINISH_REASON_LENGTH: Finish.LENGTH,
    pb.FINISH_REASON_TIMED_OUT: Finish.TIMED_OUT,
    pb.FINISH_REASON_CANCELLED: Finish.CANCELLED,
    pb.FINISH_REASON_ERROR: Finish.ERROR,
}


@dataclass(frozen=True)
class EngineClock:
    """Engine seconds from the backend's Unix timestamps: a twin sped up S times lives S engine
    seconds per wall second, and its SLOs are in engine seconds."""

    started_unix_ns: int
    speedup: float = 1.0

    def engine_s(self, unix_ns: int) -> float:
        return (unix_ns - self.started_unix_ns) / 1e9 * self.speedup

    def now_s(self) -> float:
        return self.engine_s(time.time_ns())


def slo_from_pb(msg: pb.Slo) -> Slo:
    def get(name: str) -> float | None:
        return getattr(msg, name) / 1000.0 if msg.HasField(name) else None

    return Slo(get("ttft_ms"), get("tbt_ms"), get("e2e_ms"))


def convert(ev: pb.Event, clock: EngineClock) -> Event | None:
    kind = ev.WhichOneof("kind")
    if kind == "iteration":
        it = ev.iteration
        stamp = ev.time_unix_ns  # engine timestamps of a sped-up twin are not wall time
        return Iteration(
            it.iter,
            clock.engine_s(stamp),
            (it.iter_latency_ms if it.HasField("iter_latency_ms") else 0.0) / 1000.0,
            it.num_active_requests,
            it.num_queued_requests,
            it.num_context_requests,
            it.num_gen_requests,
            it.num_ctx_tokens,
            it.kv_used_blocks,
            it.kv_max_blocks,
            it.kv_tokens_per_block,
        )
    if kind == "arrived":
        a = ev.arrived
        hint = a.output_length_hint if a.HasField("output_length_hint") else None
        return Arrived(
            a.request_id,
            clock.engine_s(a.arrival_unix_ns or ev.time_unix_ns),
            a.prompt_tokens,
            a.max_tokens,
            slo_from_pb(a.slo),
            hint,
        )
    if kind == "first_token":
        f = ev.first_token
        return FirstToken(
            f.request_id, clock.engine_s(f.time_unix_ns or ev.time_unix_ns), max(f.tokens, 1)
        )
    if kind == "finished":
        f = ev.finished
        return Finished(
            f.request_id,
            clock.engine_s(f.time_unix_ns or ev.time_unix_ns),
            f.output_tokens,
            _FINISH.get(f.finish_reason, Finish.END_ID),
        )
    return None  # cancelled (a finished event follows) and gaps are handled by the link


def snapshot_requests(snap: pb.Snapshot, clock: EngineClock) -> list[InFlight]:
    out = []
    for r in snap.requests:
        hint = r.output_length_hint if r.HasField("output_length_hint") else None
        first = clock.engine_s(r.first_token_unix_ns) if r.first_token_unix_ns else None
        out.append(
            InFlight(
                r.request_id,
                clock.engine_s(r.arrival_unix_ns),
                r.prompt_tokens,
                r.max_tokens,
                r.output_tokens,
                first,
                slo_from_pb(r.slo),
                hint,
            )
        )
    return out


@dataclass(frozen=True)
class Delivery:
    """What the link hands to the controller's loop."""

    endpoint: str
    events: list[Event]
    snapshot: list[InFlight] | None = None  # replace the scoreboard with this first


class InstanceLink:
    """Subscribes to one instance and keeps subscribing until closed."""

    def __init__(
        self,
        endpoint: str,
        out: queue.Queue[Delivery],
        retry_s: float = 0.5,
        max_retry_s: float = 5.0,
    ) -> None:
        self.endpoint = endpoint
        self._out = out
        self._retry_s, self._max_retry_s = retry_s, max_retry_s
        self._channel = grpc.insecure_channel(endpoint)
        self._stub = pb_grpc.TelemetryStub(self._channel)
        self.info: pb.EngineInfo = self._stub.GetInfo(pb.GetInfoRequest(), timeout=5.0)
        self.clock = EngineClock(self.info.started_unix_ns, self.info.twin_speedup or 1.0)
        self.connected = False
        self.gaps = 0
        self.last_heard_monotonic = time.monotonic()
        self._stop = threading.Event()
        self._stream: grpc.Future | None = None  # type: ignore[type-arg]
        self._thread = threading.Thread(target=self._run, name=f"telemetry {endpoint}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        delay = self._retry_s
        while not self._stop.is_set():
            try:
                self._stream = self._stub.Subscribe(pb.SubscribeRequest(snapshot_first=True))
                for batch in self._stream:
                    self.connected = True
                    delay = self._retry_s
                    self.last_heard_monotonic = time.monotonic()
                    self._deliver(batch)
            except grpc.RpcError as e:
                if self._stop.is_set():
                    break
                log.warning(
                    "telemetry from %s lost (%s); retrying in %.1f s",
                    self.endpoint,
                    e.code() if hasattr(e, "code") else e,
                    delay,
                )
            self.connected = False
            self._stop.wait(delay)
            delay = min(delay * 2, self._max_retry_s)

    def _deliver(self, batch: pb.EventBatch) -> None:
        snapshot = None
        if batch.HasField("snapshot"):
            snapshot = snapshot_requests(batch.snapshot, self.clock)
        events: list[Event] = []
        for ev in batch.events:
            if ev.WhichOneof("kind") == "gap":
                # Events were lost: state is rebuilt from a fresh snapshot, then carries on.
                self.gaps += 1
                if events or snapshot is not None:
                    self._out.put(Delivery(self.endpoint, events, snapshot))
                events, snapshot = [], self._fresh_snapshot()
                continue
            converted = convert(ev, self.clock)
            if converted is not None:
                events.append(converted)
        if events or snapshot is not None:
            self._out.put(Delivery(self.endpoint, events, snapshot))

    def _fresh_snapshot(self) -> list[InFlight] | None:
        try:
            snap = self._stub.GetSnapshot(pb.GetSnapshotRequest(), timeout=5.0)
        except grpc.RpcError:
            return None
        return snapshot_requests(snap, self.clock)

    def close(self) -> None:
        self._stop.set()
        if self._stream is not None:
            self._stream.cancel()
        self._channel.close()
        self._thread.join(timeout=5.0)
