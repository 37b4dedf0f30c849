"""The engine-facing half of the Triton model: request table, response, cancellation and stats
threads, telemetry reporting. Knows nothing of Triton: it talks to clients through `Responder`s
(the Triton model wraps response senders in them), so unit tests drive it with fakes.

Threads (as in the reference model):
- response: `engine.await_responses` -> outputs, FINAL on the last response of the last row of a
  Triton request, telemetry token / finish events -> a `SendPool` thread -> `Responder.send`
  (a Python-backend send is a ~0.1-0.3 ms IPC round trip: the response thread never waits on it);
- cancellation: every `cancellation_period_s`, cancels the engine requests of Triton requests
  whose client went away (`Responder.is_cancelled`);
- stats: every `stats_period_s`, drains the engine's iteration statistics into telemetry and
  metrics.
Every Triton request gets exactly one FINAL response, whatever happens (error, cancel, unload).
"""

from __future__ import annotations

import enum
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..engines.base import Engine, EngineResponse, FinishReason, IterationStat
from ..telemetry.hub import (
    CANCEL_CLIENT,
    CANCEL_SHUTDOWN,
    CANCEL_STOP_REQUEST,
    CANCEL_UNSPECIFIED,
    FINISH_ERROR,
    RequestRecord,
    TelemetryHub,
    finish_reason_value,
)
from .convert import Converted
from .outputs import Outputs, response_outputs, stack_rows

logger = logging.getLogger(__name__)


class ErrorKind(enum.Enum):
    INVALID_ARG = "invalid_arg"
    CANCELLED = "cancelled"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


class Responder(Protocol):
    """One Triton request's response channel."""

    def send(
        self,
        outputs: Outputs | None,
        *,
        final: bool,
        error: str | None = None,
        kind: ErrorKind = ErrorKind.INTERNAL,
    ) -> None: ...

    def is_cancelled(self) -> bool: ...


class MetricsSink(Protocol):
    def on_iteration(self, stat: IterationStat) -> None: ...

    def flush(self) -> None:
        """Publish what on_iteration held back (called when no iteration ran)."""

    def on_request_done(self, input_tokens: int, output_tokens: int) -> None: ...


class NullMetrics:
    def on_iteration(self, stat: IterationStat) -> None:
        pass

    def flush(self) -> None:
        pass

    def on_request_done(self, input_tokens: int, output_tokens: int) -> None:
        pass


class SendPool:
    """Threads that send responses, so that the response thread never waits on a send (a
    Python-backend send is an IPC round trip to the Triton process, ~0.25 ms). The responses of
    one Triton request always go through the same thread, in order."""

    def __init__(self, threads: int) -> None:
        self._queues: list[queue.SimpleQueue[tuple[Any, ...] | None]] = [
            queue.SimpleQueue() for _ in range(max(1, threads))
        ]
        self._threads = [
            threading.Thread(target=self._run, args=(q,), name=f"throttllem-send-{i}", daemon=True)
            for i, q in enumerate(self._queues)
        ]
        for t in self._threads:
            t.start()

    def _run(self, q: queue.SimpleQueue[tuple[Any, ...] | None]) -> None:
        while True:
            item = q.get()
            if item is None:
                return
            responder, outputs, final, error, kind = item
            try:
                responder.send(outputs, final=final, error=error, kind=kind)
            except Exception:
                logger.exception("sending a response failed")

    def send(
        self,
        key: int,
        responder: Responder,
        outputs: Outputs | None,
        *,
        final: bool,
        error: str | None = None,
        kind: ErrorKind = ErrorKind.INTERNAL,
    ) -> None:
        self._queues[key % len(self._queues)].put((responder, outputs, final, error, kind))

    def close(self) -> None:
        """Send everything queued, then stop."""
        for q in self._queues:
            q.put(None)
        for t in self._threads:
            t.join(timeout=10.0)


@dataclass
class _Call:
    """One Triton request (B rows -> B engine requests)."""

    responder: Responder
    user_id: str
    batch_size: int
    pending: set[int] = field(default_factory=set)
    rows: dict[int, Outputs] = field(default_factory=dict)  # non-decoupled, batched
    error: str | None = None
    client_cancelled: bool = False


@dataclass
class _Entry:
    """One engine request."""

    call: _Call
    batch_index: int
    prompt_tokens: int
    streaming: bool
    exclude_input: bool
    return_perf: bool
    return_emit: bool = False
    output_tokens: int = 0


class ServingCore:
    def __init__(
        self,
        engine: Engine,
        hub: TelemetryHub,
        *,
        decoupled: bool,
        metrics: MetricsSink | None = None,
        cancellation_period_s: float = 0.1,
        stats_period_s: float = 0.025,
        await_timeout_s: float = 0.02,
        send_threads: int = 4,
        now_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self.engine = engine
        self.hub = hub
        self.decoupled = decoupled
        self.metrics: MetricsSink = metrics or NullMetrics()
        self._cancel_period = cancellation_period_s
        self._stats_period = stats_period_s
        self._await_timeout = await_timeout_s
        self._now_ns = now_ns
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._entries: dict[int, _Entry] = {}
        self._by_user_id: dict[str, _Call] = {}
        self._accepting = True
        self._running = False
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._send_threads = send_threads
        self._pool: SendPool | None = None

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._pool = SendPool(self._send_threads)
        self._running = True
        for name, target in (
            ("responses", self._response_loop),
            ("cancellation", self._cancellation_loop),
            ("stats", self._stats_loop),
        ):
            t = threading.Thread(target=target, name=f"throttllem-{name}", daemon=True)
            t.start()
            self._threads.append(t)

    def in_flight(self) -> int:
        with self._lock:
            return len(self._entries)

    def shutdown(self, drain_timeout_s: float = 10.0) -> None:
        """Refuse new requests, cancel the running ones, send their final responses, stop the
        threads, then shut the engine down."""
        with self._lock:
            self._accepting = False
            ids = list(self._entries)
        for rid in ids:
            self.hub.cancel_requested(rid, CANCEL_SHUTDOWN)
            self._cancel_engine(rid)
        deadline = time.monotonic() + drain_timeout_s
        with self._idle:
            while self._entries and self._running and time.monotonic() < deadline:
                self._idle.wait(0.05)
            leftovers = list(self._entries.items())
            self._entries.clear()
        self._running = False
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5.0)
        calls = {id(e.call): e.call for _, e in leftovers}
        for call in calls.values():
            self._send(
                call, None, final=True, error="the model was unloaded before the request ended",
                kind=ErrorKind.UNAVAILABLE,
            )  # fmt: skip
        if self._pool is not None:
            self._pool.close()
        for rid, _ in leftovers:
            self.hub.request_finished(rid, FINISH_ERROR, error="model unloaded")
        try:
            self.engine.shutdown()
        finally:
            self._stats_once()

    # ---- requests (Triton's execute thread) --------------------------------------------------

    def submit(
        self, converted: Converted, responder: Responder, user_id: str, arrival_ns: int
    ) -> None:
        """Enqueue every row; on failure, one final error response (rows already enqueued are
        cancelled and their ends awaited first)."""
        call = _Call(responder=responder, user_id=user_id, batch_size=converted.batch_size)
        error: str | None = None
        enqueued: list[int] = []
        with self._lock:
            if not self._accepting:
                error = "the model is shutting down"
            else:
                for row in converted.rows:
                    try:
                        rid = self.engine.enqueue(row.request)
                    except Exception as e:  # the engine refused it: the client's error
                        error = f"request rejected by the engine: {e}"
                        break
                    enqueued.append(rid)
                    call.pending.add(rid)
                    req = row.request
                    self._entries[rid] = _Entry(
                        call=call,
                        batch_index=row.batch_index,
                        prompt_tokens=row.prompt_tokens,
                        streaming=req.streaming,
                        exclude_input=req.exclude_input_from_output,
                        return_perf=req.return_perf_metrics,
                        return_emit=req.return_perf_metrics or row.return_emit_time,
                    )
                    self.hub.request_arrived(
                        RequestRecord(
                            request_id=rid,
                            prompt_tokens=row.prompt_tokens,
                            max_tokens=req.max_tokens,
                            arrival_unix_ns=arrival_ns,
                            triton_request_id=user_id,
                            batch_index=row.batch_index,
                            streaming=req.streaming,
                            beam_width=req.sampling.beam_width,
                            slo=row.slo,
                            output_length_hint=row.output_length_hint,
                        )
                    )
                if error is not None and enqueued:
                    call.error = error
                elif user_id and enqueued:
                    self._by_user_id[user_id] = call
        if error is None:
            return
        if not enqueued:
            kind = ErrorKind.UNAVAILABLE if not self._accepting else ErrorKind.INVALID_ARG
            responder.send(None, final=True, error=error, kind=kind)
            return
        for rid in enqueued:  # the final error goes out once these have ended
            self.hub.cancel_requested(rid, CANCEL_UNSPECIFIED)
            self._cancel_engine(rid)

    def stop(self, user_id: str, responder: Responder) -> None:
        """A `stop` request: cancel the in-flight request with this Triton request id."""
        if not user_id:
            responder.send(
                None, final=True, kind=ErrorKind.INVALID_ARG,
                error="stop: the request needs an id (the Triton request id of the request "
                "to cancel)",
            )  # fmt: skip
            return
        with self._lock:
            call = self._by_user_id.get(user_id)
            ids = sorted(call.pending) if call is not None else []
        if not ids:
            responder.send(
                None, final=True, kind=ErrorKind.INVALID_ARG,
                error=f"stop: no request with id '{user_id}' is in flight "
                "(unknown or already finished)",
            )  # fmt: skip
            return
        for rid in ids:
            self.hub.cancel_requested(rid, CANCEL_STOP_REQUEST)
            self._cancel_engine(rid)
        responder.send(None, final=True)

    def _send(
        self,
        call: _Call,
        outputs: Outputs | None,
        *,
        final: bool,
        error: str | None = None,
        kind: ErrorKind = ErrorKind.INTERNAL,
    ) -> None:
        if self._pool is None:
            call.responder.send(outputs, final=final, error=error, kind=kind)
        else:
            self._pool.send(id(call), call.responder, outputs, final=final, error=error, kind=kind)

    def _cancel_engine(self, rid: int) -> None:
        try:
            self.engine.cancel(rid)
        except Exception as e:  # a request the engine no longer knows: its final is on its way
            logger.debug("cancel of request %d: %s", rid, e)

    # ---- responses ---------------------------------------------------------------------------

    def _response_loop(self) -> None:
        previous_return_ns = self._now_ns()
        while not self._stop.is_set():
            before = self._now_ns()
            try:
                responses = self.engine.await_responses(self._await_timeout)
            except Exception:
                logger.exception("await_responses failed")
                self._stop.wait(self._await_timeout)
                continue
            after = self._now_ns()
            # The engine made these available after the previous call returned; when this call
            # had to wait, they came during the wait (see outputs.py, emit_time_ns).
            waited = after - before > 200_000
            emit_ns = after if waited else previous_return_ns
            previous_return_ns = after
            for response in responses:
                try:
                    self._deliver(response, emit_ns)
                except Exception:
                    logger.exception("delivering a response of request %d", response.request_id)

    def _request_done(self, entry: _Entry) -> None:
        try:
            self.metrics.on_request_done(entry.prompt_tokens, entry.output_tokens)
        except Exception:
            logger.exception("updating request metrics failed")

    def _generated_tokens(self, entry: _Entry, response: EngineResponse) -> int:
        beam = response.output_token_ids[0] if response.output_token_ids else []
        if entry.streaming or entry.exclude_input:
            return len(beam)
        return max(0, len(beam) - entry.prompt_tokens)

    def _deliver(self, response: EngineResponse, emit_ns: int) -> None:
        rid = response.request_id
        with self._lock:
            entry = self._entries.get(rid)
            if entry is None:
                return
            call = entry.call
            call_done = False
            if response.is_final:
                del self._entries[rid]
                call.pending.discard(rid)
                call_done = not call.pending
                if call_done and self._by_user_id.get(call.user_id) is call:
                    del self._by_user_id[call.user_id]
                if not self._entries:
                    self._idle.notify_all()
        hub = self.hub
        if response.error is not None:
            hub.request_finished(rid, FINISH_ERROR, error=response.error)
            call.error = call.error or response.error
            self._request_done(entry)
            if call_done:
                self._finish_call(call)
            return
        tokens = self._generated_tokens(entry, response)
        entry.output_tokens += tokens
        if tokens:
            hub.tokens_delivered(rid, tokens)
        outputs = response_outputs(
            response,
            batch_index=entry.batch_index,
            batch_size=call.batch_size,
            return_perf_metrics=entry.return_perf,
            emit_time_ns=emit_ns if entry.return_emit else None,
        )
        if response.is_final:
            hub.request_finished(
                rid, finish_reason_value(response.finish_reasons), output_tokens=entry.output_tokens
            )
            self._request_done(entry)
        if not self.decoupled:
            if response.is_final:
                call.rows[entry.batch_index] = outputs
            if call_done:
                self._finish_call(call)
            return
        if call_done and (call.client_cancelled or call.error):
            self._finish_call(call)
            return
        if call_done or (response.output_token_ids and any(response.output_token_ids)):
            self._send(call, outputs, final=call_done)
        elif response.is_final and response.finish_reasons[:1] == [FinishReason.CANCELLED]:
            pass  # a cancelled row of a batch that goes on: nothing to say

    def _finish_call(self, call: _Call) -> None:
        """The last engine request of `call` ended: its one FINAL response."""
        if call.client_cancelled:
            self._send(
                call, None, final=True, error="the client cancelled the request",
                kind=ErrorKind.CANCELLED,
            )  # fmt: skip
        elif call.error is not None:
            self._send(call, None, final=True, error=call.error, kind=ErrorKind.INVALID_ARG)
        elif not self.decoupled:
            rows = [call.rows[i] for i in sorted(call.rows)]
            self._send(call, stack_rows(rows) if rows else None, final=True)
        else:
            self._send(call, None, final=True)

    # ---- cancellation and statistics ---------------------------------------------------------

    def _cancellation_loop(self) -> None:
        while not self._stop.wait(self._cancel_period):
            self.check_cancellations()

    def check_cancellations(self) -> None:
        with self._lock:
            calls = {id(e.call): e.call for e in self._entries.values()}
        for call in calls.values():
            if call.client_cancelled:
                continue
            try:
                cancelled = call.responder.is_cancelled()
            except Exception:
                cancelled = False
            if not cancelled:
                continue
            call.client_cancelled = True
            with self._lock:
                ids = sorted(call.pending)
            for rid in ids:
                self.hub.cancel_requested(rid, CANCEL_CLIENT)
                self._cancel_engine(rid)

    def _stats_loop(self) -> None:
        while not self._stop.wait(self._stats_period):
            self._stats_once()

    def _stats_once(self) -> None:
        try:
            stats = self.engine.drain_iteration_stats()
        except Exception:
            logger.exception("draining iteration stats failed")
            return
        try:
            if stats:
                self.hub.iterations(stats)
                self.metrics.on_iteration(stats[-1])
            else:
                self.metrics.flush()
        except Exception:
            logger.exception("updating metrics failed")
