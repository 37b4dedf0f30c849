"""The serving core with a scripted engine: final flags, batching, errors, cancellation, stop,
unload, telemetry. Every Triton request must get exactly one FINAL response."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from throttllem.backend.engines.base import (
    EngineFacts,
    EngineRequest,
    EngineResponse,
    FinishReason,
    GpuControl,
    IterationStat,
)
from throttllem.backend.telemetry.hub import TelemetryHub
from throttllem.backend.triton_model.convert import Converted, ConvertedRow
from throttllem.backend.triton_model.outputs import Outputs
from throttllem.backend.triton_model.serving import ErrorKind, ServingCore
from throttllem.v1 import telemetry_pb2 as pb

WAIT_S = 5.0


class ScriptedEngine:
    """The test decides every response; enqueue/cancel are recorded."""

    def __init__(self) -> None:
        self.enqueued: list[EngineRequest] = []
        self.cancelled: list[int] = []
        self.responses: queue.Queue[EngineResponse] = queue.Queue()
        self.stats: list[IterationStat] = []
        self.reject: str | None = None
        self.answer_cancels = True
        self.shut_down = False

    def enqueue(self, request: EngineRequest) -> int:
        if self.reject:
            raise ValueError(self.reject)
        self.enqueued.append(request)
        return len(self.enqueued)

    def await_responses(self, timeout_s: float) -> list[EngineResponse]:
        try:
            out = [self.responses.get(timeout=timeout_s)]
        except queue.Empty:
            return []
        while not self.responses.empty():
            out.append(self.responses.get_nowait())
        return out

    def cancel(self, request_id: int) -> None:
        self.cancelled.append(request_id)
        if self.answer_cancels:
            self.emit(request_id, [], final=True, reason=FinishReason.CANCELLED)

    def drain_iteration_stats(self) -> list[IterationStat]:
        out, self.stats = self.stats, []
        return out

    def facts(self) -> EngineFacts:
        return EngineFacts(engine_kind="scripted", llm="none")

    def gpu_control(self) -> GpuControl | None:
        return None

    def shutdown(self) -> None:
        self.shut_down = True

    def emit(
        self,
        rid: int,
        tokens: list[int],
        *,
        final: bool = False,
        reason: FinishReason = FinishReason.NOT_FINISHED,
        error: str | None = None,
    ) -> None:
        if error is not None:
            self.responses.put(EngineResponse(request_id=rid, is_final=True, error=error))
            return
        self.responses.put(
            EngineResponse(request_id=rid, is_final=final, output_token_ids=[tokens],
                           finish_reasons=[reason])
        )  # fmt: skip


@dataclass
class Sent:
    outputs: Outputs | None
    final: bool
    error: str | None
    kind: ErrorKind


@dataclass
class FakeResponder:
    sent: list[Sent] = field(default_factory=list)
    cancelled: bool = False
    done: threading.Event = field(default_factory=threading.Event)

    def send(
        self,
        outputs: Outputs | None,
        *,
        final: bool,
        error: str | None = None,
        kind: ErrorKind = ErrorKind.INTERNAL,
    ) -> None:
        if self.done.is_set():
            raise AssertionError("a response after the FINAL one")
        self.sent.append(Sent(outputs, final, error, kind))
        if final:
            self.done.set()

    def is_cancelled(self) -> bool:
        return self.cancelled

    def wait(self) -> list[Sent]:
        assert self.done.wait(WAIT_S), "no FINAL response"
        assert sum(s.final for s in self.sent) == 1
        return self.sent


def request(tokens: int = 3, *, streaming: bool = True, rows: int = 1, perf: bool = False) -> Any:
    engine_request = EngineRequest(
        input_token_ids=[1, 2, 3], max_tokens=tokens, streaming=streaming, return_perf_metrics=perf
    )
    made = [
        ConvertedRow(request=engine_request, batch_index=i, prompt_tokens=3) for i in range(rows)
    ]
    return Converted(rows=made, batch_size=rows)


@pytest.fixture
def setup() -> Iterator[tuple[ServingCore, ScriptedEngine, TelemetryHub]]:
    engine = ScriptedEngine()
    hub = TelemetryHub()
    core = ServingCore(engine, hub, decoupled=True, cancellation_period_s=0.01,
                       stats_period_s=0.01, await_timeout_s=0.01)  # fmt: skip
    core.start()
    yield core, engine, hub
    core.shutdown(drain_timeout_s=1.0)


def test_streaming_tokens_then_one_final(setup: Any) -> None:
    core, engine, hub = setup
    sub = hub.subscribe()
    client = FakeResponder()
    core.submit(request(), client, "req-a", arrival_ns=1)
    engine.emit(1, [7])
    engine.emit(1, [8])
    engine.emit(1, [9], final=True, reason=FinishReason.LENGTH)
    sent = client.wait()
    assert [s.final for s in sent] == [False, False, True]
    assert [int(s.outputs["output_ids"][0, 0, 0]) for s in sent if s.outputs] == [7, 8, 9]
    events = sub.get(100, 0.0)
    assert [e.WhichOneof("kind") for e in events] == ["arrived", "first_token", "finished"]
    assert events[0].arrived.triton_request_id == "req-a"
    assert events[2].finished.output_tokens == 3
    assert events[2].finished.finish_reason == pb.FINISH_REASON_LENGTH
    assert core.in_flight() == 0


def test_batched_rows_share_one_final(setup: Any) -> None:
    core, engine, _ = setup
    client = FakeResponder()
    core.submit(request(rows=2), client, "", arrival_ns=1)
    engine.emit(1, [5], final=True, reason=FinishReason.END_ID)
    engine.emit(2, [6])
    engine.emit(2, [7], final=True, reason=FinishReason.LENGTH)
    sent = client.wait()
    assert [s.final for s in sent] == [False, False, True]
    assert [int(s.outputs["batch_index"][0, 0]) for s in sent if s.outputs] == [0, 1, 1]


def test_non_decoupled_batch_is_one_stacked_response() -> None:
    engine = ScriptedEngine()
    core = ServingCore(engine, TelemetryHub(), decoupled=False, await_timeout_s=0.01)
    core.start()
    try:
        client = FakeResponder()
        core.submit(request(streaming=False, rows=2), client, "", arrival_ns=1)
        engine.emit(2, [1, 2, 3, 9, 9], final=True, reason=FinishReason.LENGTH)
        engine.emit(1, [1, 2, 3, 8], final=True, reason=FinishReason.END_ID)
        (only,) = client.wait()
        assert only.outputs is not None
        assert only.outputs["output_ids"].tolist() == [[[1, 2, 3, 8, -1]], [[1, 2, 3, 9, 9]]]
        assert only.outputs["sequence_length"].tolist() == [[4], [5]]
    finally:
        core.shutdown(drain_timeout_s=1.0)


def test_an_engine_refusal_is_one_final_error(setup: Any) -> None:
    core, engine, hub = setup
    engine.reject = "input_token_ids: prompt of 9000 tokens exceeds the max input length 8192"
    client = FakeResponder()
    core.submit(request(), client, "x", arrival_ns=1)
    (only,) = client.wait()
    assert only.final and only.kind is ErrorKind.INVALID_ARG
    assert only.error is not None and "input_token_ids" in only.error
    assert hub.in_flight() == 0 and hub.published == 0


def test_an_engine_error_is_one_final_error(setup: Any) -> None:
    core, engine, hub = setup
    sub = hub.subscribe()
    client = FakeResponder()
    core.submit(request(), client, "x", arrival_ns=1)
    engine.emit(1, [4])
    engine.emit(1, [], error="engine exploded")
    sent = client.wait()
    assert sent[-1].error == "engine exploded"
    finished = [e.finished for e in sub.get(100, 0.0) if e.WhichOneof("kind") == "finished"]
    assert finished[0].finish_reason == pb.FINISH_REASON_ERROR


def test_client_cancellation_cancels_the_engine_request(setup: Any) -> None:
    core, engine, hub = setup
    sub = hub.subscribe()
    client = FakeResponder()
    core.submit(request(tokens=100), client, "c", arrival_ns=1)
    engine.emit(1, [4])
    client.cancelled = True
    sent = client.wait()
    assert engine.cancelled == [1]
    assert sent[-1].kind is ErrorKind.CANCELLED
    kinds = [e.WhichOneof("kind") for e in sub.get(100, 0.0)]
    assert kinds == ["arrived", "first_token", "cancelled", "finished"]


def test_stop_cancels_by_request_id(setup: Any) -> None:
    core, engine, _ = setup
    client, stopper = FakeResponder(), FakeResponder()
    core.submit(request(tokens=100), client, "victim", arrival_ns=1)
    engine.emit(1, [4])
    core.stop("victim", stopper)
    assert stopper.wait()[0].error is None
    assert client.wait()[-1].error is None  # stopped, not failed: the tokens so far stand
    assert engine.cancelled == [1]


@pytest.mark.parametrize("user_id", ["", "ghost"])
def test_stop_of_an_unknown_request_is_an_error(setup: Any, user_id: str) -> None:
    core, _, _ = setup
    stopper = FakeResponder()
    core.stop(user_id, stopper)
    (only,) = stopper.wait()
    assert only.error is not None and only.error.startswith("stop: ")


def test_stop_of_a_finished_request_is_an_error(setup: Any) -> None:
    core, engine, _ = setup
    client, stopper = FakeResponder(), FakeResponder()
    core.submit(request(tokens=1), client, "done", arrival_ns=1)
    engine.emit(1, [4], final=True, reason=FinishReason.LENGTH)
    client.wait()
    core.stop("done", stopper)
    assert "no request with id 'done'" in (stopper.wait()[0].error or "")


def test_unload_ends_every_request_with_a_final(setup: Any) -> None:
    core, engine, hub = setup
    engine.answer_cancels = False  # an engine that never answers
    client = FakeResponder()
    core.submit(request(tokens=100), client, "late", arrival_ns=1)
    core.shutdown(drain_timeout_s=0.2)
    (only,) = client.wait()
    assert only.kind is ErrorKind.UNAVAILABLE
    assert engine.shut_down and hub.in_flight() == 0
    refused = FakeResponder()
    core.submit(request(), refused, "after", arrival_ns=1)
    assert refused.wait()[0].kind is ErrorKind.UNAVAILABLE


def idle_stat(i: int) -> IterationStat:
    return IterationStat(
        iter=i, timestamp_unix_ns=0, iter_latency_ms=1.0, num_active_requests=0,
        num_queued_requests=None, num_new_active_requests=0, num_completed_requests=None,
        max_num_active_requests=8, num_scheduled_requests=0, num_context_requests=0,
        num_gen_requests=0, num_paused_requests=0, num_ctx_tokens=0, kv_used_blocks=0,
        kv_free_blocks=10, kv_max_blocks=10, kv_tokens_per_block=64,
    )  # fmt: skip


def test_iteration_stats_reach_telemetry(setup: Any) -> None:
    _, engine, hub = setup
    sub = hub.subscribe()
    engine.stats = [idle_stat(i) for i in range(3)]
    events: list[Any] = []
    deadline = time.monotonic() + WAIT_S
    while len(events) < 3 and time.monotonic() < deadline:
        events += sub.get(100, 0.05)
    assert [e.iteration.iter for e in events] == [0, 1, 2]
    assert not events[0].iteration.HasField("num_queued_requests")


def test_emit_time_alone_on_request(setup: Any) -> None:
    core, engine, _ = setup
    client = FakeResponder()
    converted = request(tokens=2)
    rows = [replace(r, return_emit_time=True) for r in converted.rows]
    core.submit(Converted(rows=rows, batch_size=1), client, "", arrival_ns=1)
    engine.emit(1, [3])
    engine.emit(1, [4], final=True, reason=FinishReason.LENGTH)
    sent = client.wait()
    assert all(s.outputs is not None and set(s.outputs) == {"output_ids", "sequence_length",
               "emit_time_ns"} for s in sent)  # fmt: skip


def test_responses_of_many_requests_keep_their_order(setup: Any) -> None:
    core, engine, _ = setup
    clients = [FakeResponder() for _ in range(20)]
    for i, c in enumerate(clients):
        core.submit(request(tokens=30), c, f"r{i}", arrival_ns=1)
    for step in range(30):
        for rid in range(1, 21):
            engine.emit(rid, [step], final=step == 29, reason=FinishReason.LENGTH)
    for c in clients:
        tokens = [int(s.outputs["output_ids"][0, 0, 0]) for s in c.wait() if s.outputs]
        assert tokens == list(range(30))


def test_perf_outputs_carry_an_emit_time(setup: Any) -> None:
    core, engine, _ = setup
    client = FakeResponder()
    core.submit(request(tokens=1, perf=True), client, "", arrival_ns=1)
    engine.emit(1, [3], final=True, reason=FinishReason.LENGTH)
    (only,) = client.wait()
    assert only.outputs is not None and int(only.outputs["emit_time_ns"][0, 0]) > 0
