"""The telemetry hub: request book-keeping, bounded subscriber buffers and gap markers."""

from __future__ import annotations

import threading
import time

import pytest

from throttllem.backend.engines.base import IterationStat
from throttllem.backend.telemetry.hub import (
    CANCEL_CLIENT,
    RequestRecord,
    Slo,
    Subscription,
    TelemetryHub,
)
from throttllem.v1 import telemetry_pb2 as pb


def stat(i: int, used: int = 0) -> IterationStat:
    return IterationStat(
        iter=i, timestamp_unix_ns=i, iter_latency_ms=10.0, num_active_requests=1,
        num_queued_requests=0, num_new_active_requests=0, num_completed_requests=0,
        max_num_active_requests=8, num_scheduled_requests=1, num_context_requests=0,
        num_gen_requests=1, num_paused_requests=0, num_ctx_tokens=0, kv_used_blocks=used,
        kv_free_blocks=100 - used, kv_max_blocks=100, kv_tokens_per_block=64,
    )  # fmt: skip


def record(rid: int, **kw: object) -> RequestRecord:
    base: dict[str, object] = {"prompt_tokens": 10, "max_tokens": 20, "arrival_unix_ns": 5}
    base.update(kw)
    return RequestRecord(request_id=rid, **base)  # type: ignore[arg-type]


def kinds(events: list[pb.Event]) -> list[str]:
    return [e.WhichOneof("kind") for e in events]


def test_lifecycle_events_in_order_with_contiguous_sequence_numbers() -> None:
    hub = TelemetryHub()
    sub = hub.subscribe()
    hub.request_arrived(record(1, slo=Slo(ttft_ms=100.0, e2e_ms=2000.0), output_length_hint=7))
    hub.tokens_delivered(1, 3)
    hub.tokens_delivered(1, 1)
    hub.cancel_requested(1, CANCEL_CLIENT)
    hub.request_finished(1, pb.FINISH_REASON_CANCELLED)
    events = sub.get(100, 0.0)
    assert kinds(events) == ["arrived", "first_token", "cancelled", "finished"]
    assert [e.seq for e in events] == [1, 2, 3, 4]
    arrived = events[0].arrived
    assert arrived.slo.ttft_ms == 100.0 and not arrived.slo.HasField("tbt_ms")
    assert arrived.output_length_hint == 7
    assert events[1].first_token.tokens == 3
    assert events[2].cancelled.cause == pb.CANCEL_CAUSE_CLIENT
    assert events[3].finished.output_tokens == 4
    assert hub.in_flight() == 0


def test_unknown_requests_publish_nothing() -> None:
    hub = TelemetryHub()
    sub = hub.subscribe()
    hub.tokens_delivered(9, 1)
    assert not hub.cancel_requested(9, CANCEL_CLIENT)
    assert hub.request_finished(9, 1) is None
    assert sub.get(10, 0.0) == []


def test_a_full_buffer_drops_the_oldest_and_reports_a_gap() -> None:
    hub = TelemetryHub(subscriber_buffer=4)
    slow = hub.subscribe()
    fast = hub.subscribe(buffer=1000)
    hub.iterations([stat(i) for i in range(10)])
    events = slow.get(100, 0.0)
    assert events[0].WhichOneof("kind") == "gap"
    assert events[0].gap.dropped_events == 6 and events[0].gap.total_dropped_events == 6
    # The survivors are the newest four; their seq numbers jump by the gap.
    assert [e.iteration.iter for e in events[1:]] == [6, 7, 8, 9]
    assert events[1].seq == 7
    assert len(fast.get(100, 0.0)) == 10  # another subscriber lost nothing
    hub.iterations([stat(10)])
    assert kinds(slow.get(100, 0.0)) == ["iteration"]  # no gap once caught up


def test_publishing_never_waits_for_a_subscriber_that_does_not_read() -> None:
    hub = TelemetryHub(subscriber_buffer=16)
    hub.subscribe()
    start = time.perf_counter()
    for i in range(2000):
        hub.iterations([stat(i)])
    assert time.perf_counter() - start < 2.0
    assert hub.published == 2000


def test_snapshot_is_consistent_with_the_sequence_number() -> None:
    hub = TelemetryHub()
    hub.request_arrived(record(1))
    hub.request_arrived(record(2, triton_request_id="b"))
    hub.tokens_delivered(2, 5)
    hub.request_finished(1, pb.FINISH_REASON_LENGTH)
    hub.iterations([stat(3, used=2)])
    snap = hub.snapshot()
    assert snap.last_seq == 5
    (only,) = snap.requests
    assert only.request_id == 2 and only.output_tokens == 5 and only.triton_request_id == "b"
    assert only.phase == pb.REQUEST_PHASE_GENERATING
    assert snap.last_iteration.kv_used_blocks == 2


def test_snapshot_first_subscription_sees_only_later_events() -> None:
    hub = TelemetryHub()
    hub.request_arrived(record(1))
    sub = hub.subscribe(snapshot_first=True)
    hub.request_finished(1, pb.FINISH_REASON_END_ID)
    assert sub.snapshot.last_seq == 1 and len(sub.snapshot.requests) == 1
    (event,) = sub.get(10, 0.0)
    assert event.seq == 2 and event.WhichOneof("kind") == "finished"


def test_skip_iterations_keeps_lifecycle_events_only() -> None:
    hub = TelemetryHub()
    sub = hub.subscribe(skip_iterations=True)
    hub.iterations([stat(1)])
    hub.request_arrived(record(1))
    assert kinds(sub.get(10, 0.0)) == ["arrived"]


def test_get_waits_for_events_and_close_wakes_it() -> None:
    sub = Subscription(8)
    got: list[int] = []
    reader = threading.Thread(target=lambda: got.append(len(sub.get(8, 5.0))))
    reader.start()
    sub.close()
    reader.join(timeout=2.0)
    assert not reader.is_alive() and got == [0]
    with pytest.raises(ValueError, match="at least 1"):
        Subscription(0)


def test_unsubscribe_stops_delivery() -> None:
    hub = TelemetryHub()
    sub = hub.subscribe()
    hub.unsubscribe(sub)
    hub.iterations([stat(1)])
    assert hub.subscriber_count() == 0 and sub.get(10, 0.0) == []
