"""The in-process telemetry hub: request book-keeping, events, and bounded subscriber buffers.

The backend's threads report what happens (a request arrived, tokens went out, a request ended,
an iteration ran); the hub keeps the state of every request in flight (for snapshots) and
publishes one event per change to every subscriber. Publishing never blocks: each subscriber has
a bounded buffer; when it is full the OLDEST undelivered event is dropped and counted, and the
subscriber's next read starts with a Gap event carrying the count. State changes and publishing
happen under one lock, so a snapshot is exactly consistent with a sequence number.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from throttllem.v1 import telemetry_pb2 as pb

from ..engines.base import FinishReason, IterationStat

DEFAULT_SUBSCRIBER_BUFFER = 16384

# Engine finish reasons -> proto enum values (same numbering, plus ERROR for engine errors).
FINISH_ERROR = pb.FINISH_REASON_ERROR
CANCEL_UNSPECIFIED = pb.CANCEL_CAUSE_UNSPECIFIED
CANCEL_CLIENT = pb.CANCEL_CAUSE_CLIENT
CANCEL_STOP_REQUEST = pb.CANCEL_CAUSE_STOP_REQUEST
CANCEL_SHUTDOWN = pb.CANCEL_CAUSE_SHUTDOWN


@dataclass(frozen=True)
class Slo:
    """Per-request latency targets in ms; None: no target (the deployment default applies)."""

    ttft_ms: float | None = None
    tbt_ms: float | None = None
    e2e_ms: float | None = None

    def to_proto(self) -> Any:
        return pb.Slo(ttft_ms=self.ttft_ms, tbt_ms=self.tbt_ms, e2e_ms=self.e2e_ms)


@dataclass
class RequestRecord:
    """One request in flight, as the backend sees it."""

    request_id: int
    prompt_tokens: int
    max_tokens: int
    arrival_unix_ns: int
    triton_request_id: str = ""
    batch_index: int = 0
    streaming: bool = False
    beam_width: int = 1
    slo: Slo = field(default_factory=Slo)
    output_length_hint: int | None = None
    output_tokens: int = 0
    first_token_unix_ns: int = 0
    last_token_unix_ns: int = 0
    cancelling: bool = False

    def phase(self) -> int:
        if self.cancelling:
            return int(pb.REQUEST_PHASE_CANCELLING)
        if self.first_token_unix_ns:
            return int(pb.REQUEST_PHASE_GENERATING)
        return int(pb.REQUEST_PHASE_WAITING_FIRST_TOKEN)

    def to_progress(self) -> Any:
        return pb.RequestProgress(
            request_id=self.request_id,
            triton_request_id=self.triton_request_id,
            batch_index=self.batch_index,
            prompt_tokens=self.prompt_tokens,
            max_tokens=self.max_tokens,
            output_tokens=self.output_tokens,
            streaming=self.streaming,
            beam_width=self.beam_width,
            slo=self.slo.to_proto(),
            output_length_hint=self.output_length_hint,
            arrival_unix_ns=self.arrival_unix_ns,
            first_token_unix_ns=self.first_token_unix_ns,
            last_token_unix_ns=self.last_token_unix_ns,
            phase=self.phase(),
        )

    def to_arrived(self) -> Any:
        return pb.RequestArrived(
            request_id=self.request_id,
            triton_request_id=self.triton_request_id,
            batch_index=self.batch_index,
            prompt_tokens=self.prompt_tokens,
            max_tokens=self.max_tokens,
            streaming=self.streaming,
            beam_width=self.beam_width,
            slo=self.slo.to_proto(),
            output_length_hint=self.output_length_hint,
            arrival_unix_ns=self.arrival_unix_ns,
        )


def iteration_to_proto(stat: IterationStat) -> Any:
    return pb.IterationEvent(
        iter=stat.iter,
        timestamp_unix_ns=stat.timestamp_unix_ns,
        iter_latency_ms=stat.iter_latency_ms,
        num_active_requests=stat.num_active_requests,
        num_queued_requests=stat.num_queued_requests,
        num_new_active_requests=stat.num_new_active_requests,
        num_completed_requests=stat.num_completed_requests,
        max_num_active_requests=stat.max_num_active_requests,
        num_scheduled_requests=stat.num_scheduled_requests,
        num_context_requests=stat.num_context_requests,
        num_gen_requests=stat.num_gen_requests,
        num_paused_requests=stat.num_paused_requests,
        num_ctx_tokens=stat.num_ctx_tokens,
        kv_used_blocks=stat.kv_used_blocks,
        kv_free_blocks=stat.kv_free_blocks,
        kv_max_blocks=stat.kv_max_blocks,
        kv_tokens_per_block=stat.kv_tokens_per_block,
        gpu_mem_usage_bytes=stat.gpu_mem_usage_bytes,
    )


class Subscription:
    """One subscriber's bounded buffer. The hub pushes, the subscriber's thread reads."""

    def __init__(self, capacity: int, *, skip_iterations: bool = False) -> None:
        if capacity < 1:
            raise ValueError(f"subscriber buffer must hold at least 1 event, got {capacity}")
        self.capacity = capacity
        self.skip_iterations = skip_iterations
        self.snapshot: Any = None
        self._events: deque[Any] = deque()
        self._cond = threading.Condition(threading.Lock())
        self._pending_dropped = 0
        self.total_dropped = 0
        self.delivered = 0
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def push(self, event: Any) -> None:
        """Never blocks beyond the buffer's own short lock; drops the oldest when full."""
        with self._cond:
            if self._closed:
                return
            if len(self._events) >= self.capacity:
                self._events.popleft()
                self._pending_dropped += 1
                self.total_dropped += 1
            self._events.append(event)
            if len(self._events) == 1:
                self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def get(self, max_events: int, timeout_s: float) -> list[Any]:
        """Up to `max_events` events (a Gap first when some were dropped); [] after `timeout_s`
        without any, or once closed and drained."""
        with self._cond:
            if not self._events and not self._closed:
                self._cond.wait(timeout_s)
            out: list[Any] = []
            if self._pending_dropped:
                gap = pb.Gap(
                    dropped_events=self._pending_dropped, total_dropped_events=self.total_dropped
                )
                out.append(pb.Event(seq=0, time_unix_ns=time.time_ns(), gap=gap))
                self._pending_dropped = 0
            while self._events and len(out) < max_events:
                out.append(self._events.popleft())
            self.delivered += len(out)
            return out


class TelemetryHub:
    """Request state plus event fan-out for one engine instance. Thread-safe."""

    def __init__(
        self,
        *,
        subscriber_buffer: int = DEFAULT_SUBSCRIBER_BUFFER,
        now_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self._lock = threading.Lock()
        self._now_ns = now_ns
        self._seq = 0
        self._subs: list[Subscription] = []
        self._requests: dict[int, RequestRecord] = {}
        self._last_iteration: Any = None
        self.subscriber_buffer = subscriber_buffer
        self.published = 0

    # ---- reporting (the backend's threads) ---------------------------------------------------

    def _publish(self, now_ns: int, is_iteration: bool = False, **kind: Any) -> None:
        """Caller holds the lock. Builds the event only when somebody listens."""
        self._seq += 1
        self.published += 1
        if not self._subs:
            return
        event = pb.Event(seq=self._seq, time_unix_ns=now_ns, **kind)
        for sub in self._subs:
            if not (is_iteration and sub.skip_iterations):
                sub.push(event)

    def request_arrived(self, record: RequestRecord) -> None:
        with self._lock:
            self._requests[record.request_id] = record
            self._publish(self._now_ns(), arrived=record.to_arrived())

    def tokens_delivered(self, request_id: int, tokens: int) -> None:
        """`tokens` more output tokens went to the client; the first time, a FirstToken event."""
        with self._lock:
            record = self._requests.get(request_id)
            if record is None:
                return
            now = self._now_ns()
            record.output_tokens += tokens
            record.last_token_unix_ns = now
            if not record.first_token_unix_ns and tokens > 0:
                record.first_token_unix_ns = now
                first = pb.FirstToken(request_id=request_id, time_unix_ns=now, tokens=tokens)
                self._publish(now, first_token=first)

    def cancel_requested(self, request_id: int, cause: int) -> bool:
        """Record a cancellation request; False when the request is unknown or already
        cancelling (no event then)."""
        with self._lock:
            record = self._requests.get(request_id)
            if record is None or record.cancelling:
                return False
            record.cancelling = True
            now = self._now_ns()
            msg = pb.RequestCancelled(request_id=request_id, time_unix_ns=now, cause=cause)
            self._publish(now, cancelled=msg)
            return True

    def request_finished(
        self, request_id: int, reason: int, *, error: str = "", output_tokens: int | None = None
    ) -> RequestRecord | None:
        """The request ended (`reason`: a FinishReason value or FINISH_ERROR)."""
        with self._lock:
            record = self._requests.pop(request_id, None)
            if record is None:
                return None
            if output_tokens is not None:
                record.output_tokens = output_tokens
            now = self._now_ns()
            msg = pb.RequestFinished(
                request_id=request_id,
                time_unix_ns=now,
                output_tokens=record.output_tokens,
                finish_reason=int(reason),
                error_message=error,
            )
            self._publish(now, finished=msg)
            return record

    def iterations(self, stats: list[IterationStat]) -> None:
        if not stats:
            return
        with self._lock:
            now = self._now_ns()
            for stat in stats:
                event = iteration_to_proto(stat)
                self._last_iteration = event
                self._publish(now, is_iteration=True, iteration=event)

    # ---- reading (the gRPC servicer) ---------------------------------------------------------

    def in_flight(self) -> int:
        with self._lock:
            return len(self._requests)

    def record(self, request_id: int) -> RequestRecord | None:
        with self._lock:
            return self._requests.get(request_id)

    def _snapshot_locked(self) -> Any:
        snap = pb.Snapshot(
            time_unix_ns=self._now_ns(),
            last_seq=self._seq,
            requests=[r.to_progress() for r in self._requests.values()],
        )
        if self._last_iteration is not None:
            snap.last_iteration.CopyFrom(self._last_iteration)
        return snap

    def snapshot(self) -> Any:
        with self._lock:
            return self._snapshot_locked()

    def subscribe(
        self,
        *,
        buffer: int | None = None,
        snapshot_first: bool = False,
        skip_iterations: bool = False,
    ) -> Subscription:
        sub = Subscription(buffer or self.subscriber_buffer, skip_iterations=skip_iterations)
        with self._lock:
            if snapshot_first:
                sub.snapshot = self._snapshot_locked()
            self._subs.append(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        sub.close()
        with self._lock:
            if sub in self._subs:
                self._subs.remove(sub)

    def subscriber_count(self) -> int:
        with self._lock:
            return len(self._subs)

    def close(self) -> None:
        with self._lock:
            subs, self._subs = self._subs, []
        for sub in subs:
            sub.close()


def finish_reason_value(reasons: list[FinishReason]) -> int:
    """The proto finish reason of a final response (beam 0's; NOT_FINISHED -> UNSPECIFIED)."""
    if not reasons:
        return int(pb.FINISH_REASON_UNSPECIFIED)
    return int(reasons[0])
