"""The vectorised projection against a plain iteration-by-iteration reference."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from throttllem.controller.projection import (
    Admission,
    EngineLimits,
    Projection,
    QueuedRequests,
    RunningRequests,
    engine_room,
    project,
    with_expected_arrivals,
)


def _reference(
    running: list[tuple[int, int, int]],
    queued: list[tuple[int, int, int]],
    limits: EngineLimits,
    horizon: int,
) -> tuple[list[int], list[int], list[int], list[int]]:
    """Step through iterations one at a time: the obvious, slow way."""
    tpb = limits.tokens_per_block
    # active: [context tokens before this iteration, tokens left, reserved blocks]
    active = [[c, r, res] for c, r, res in running]
    waiting = list(queued)
    batch, kv, ctx, first = [], [], [], []
    for _ in range(horizon):
        entering = 0
        # FIFO admission: the head of the queue enters only when it fits.
        while waiting:
            p, o, res = waiting[0]
            if len(active) >= limits.max_batch_size:
                break
            if limits.admission is Admission.GUARANTEED_NO_EVICT:
                ok = sum(a[2] for a in active) + res <= limits.kv_capacity_blocks
            else:
                used = sum(math.ceil((a[0] + 1) / tpb) for a in active)
                ok = used + math.ceil((p + 1) / tpb) <= limits.kv_capacity_blocks
            if not ok:
                break
            waiting.pop(0)
            active.append([p, o, res])
            entering += p
            first.append(len(batch))
        batch.append(len(active))
        kv.append(sum(math.ceil((a[0] + 1) / tpb) for a in active))
        ctx.append(entering)
        for a in active:
            a[0] += 1
            a[1] -= 1
        active = [a for a in active if a[1] > 0]
    return batch, kv, ctx, first


requests = st.tuples(st.integers(1, 300), st.integers(1, 120), st.integers(1, 12))


@settings(max_examples=150, deadline=None)
@given(
    running=st.lists(requests, max_size=12),
    queued=st.lists(requests, max_size=5),
    max_batch=st.integers(1, 16),
    capacity=st.integers(4, 60),
    tpb=st.sampled_from([4, 16, 64]),
    admission=st.sampled_from(list(Admission)),
)
def test_projection_matches_the_iteration_by_iteration_reference(
    running: list[tuple[int, int, int]],
    queued: list[tuple[int, int, int]],
    max_batch: int,
    capacity: int,
    tpb: int,
    admission: Admission,
) -> None:
    limits = EngineLimits(max_batch, capacity, tpb, admission)

    def arrays(rows: list[tuple[int, int, int]]) -> list[np.ndarray]:
        return [np.array([r[i] for r in rows], dtype=np.int64) for i in range(3)]

    proj = project(RunningRequests(*arrays(running)), QueuedRequests(*arrays(queued)), limits)
    batch, kv, ctx, first = _reference(running, queued, limits, proj.horizon)
    assert proj.batch.tolist() == batch
    assert proj.kv_blocks.tolist() == kv
    assert proj.ctx_tokens.tolist() == ctx
    projected_first = [int(f) for f in proj.queued_first_iter if f >= 0]
    assert projected_first == first[: len(projected_first)]
    assert proj.running_last_iter.tolist() == [r - 1 for _, r, _ in running]


def test_a_full_engine_delays_the_queued_request_until_blocks_free_up() -> None:
    limits = EngineLimits(max_batch_size=8, kv_capacity_blocks=10, tokens_per_block=64)
    running = RunningRequests(np.array([100, 100]), np.array([5, 50]), np.array([4, 4]))
    queued = QueuedRequests(np.array([200]), np.array([10]), np.array([4]))
    proj = project(running, queued, limits)
    # Reserved 8 of 10 blocks until the first request ends after iteration 4.
    assert proj.queued_first_iter.tolist() == [5]
    assert proj.queued_last_iter.tolist() == [14]
    assert proj.ctx_tokens[5] == 200 and proj.ctx_tokens.sum() == 200


def test_nothing_in_flight_projects_an_empty_future() -> None:
    empty = np.array([], dtype=np.int64)
    proj = project(
        RunningRequests(empty, empty, empty),
        QueuedRequests(empty, empty, empty),
        EngineLimits(8, 100, 64),
    )
    assert proj.horizon <= 1 and proj.batch.sum() == 0


def test_a_burst_of_prompts_is_spread_over_iterations_by_max_num_tokens() -> None:
    """TensorRT-LLM computes at most max_num_tokens per iteration (without chunked context a
    prompt enters whole): five 3,000-token prompts take three iterations, not one of 15,000."""
    limits = EngineLimits(64, 10_000, 64, max_num_tokens=8192)
    running = RunningRequests(np.array([100, 100]), np.array([50, 50]), np.array([4, 4]))
    queued = QueuedRequests(np.full(5, 3000), np.full(5, 20), np.full(5, 50))
    proj = project(running, queued, limits)
    assert proj.queued_first_iter.tolist() == [0, 0, 1, 1, 2]
    assert proj.ctx_tokens[:4].tolist() == [6000, 6000, 3000, 0]
    assert all((proj.ctx_tokens + proj.batch)[:3] <= 8192)  # prompts + a token per request
    # Without the limit all five enter at once, as before.
    unlimited = project(running, queued, EngineLimits(64, 10_000, 64))
    assert unlimited.queued_first_iter.tolist() == [0] * 5
    # A prompt longer than the limit runs alone (chunked) rather than never.
    alone = project(running, QueuedRequests(np.array([9000]), np.array([5]), np.array([150])),
                    limits)  # fmt: skip
    assert alone.queued_first_iter.tolist() == [0]


# --- the engine's room, and the expected arrivals it caps ---------------------------------


def _reserving(*blocks: int) -> tuple[RunningRequests, QueuedRequests]:
    """The first request running, the rest queued: the room counts both."""
    res = np.array(blocks, dtype=np.int64)
    one, rest = np.ones(1, np.int64), np.ones(len(blocks) - 1, np.int64)
    return RunningRequests(one, one, res[:1]), QueuedRequests(rest, rest, res[1:])


def test_the_room_is_the_kv_capacity_over_the_mean_reservation_within_the_batch_limit() -> None:
    limits = EngineLimits(max_batch_size=64, kv_capacity_blocks=1000, tokens_per_block=32)
    assert engine_room(limits, *_reserving(80, 120)) == 10  # 1000 / 100
    assert engine_room(limits, *_reserving(5, 5)) == 64  # the batch limit binds
    empty = np.zeros(0, np.int64)
    nothing = RunningRequests(empty, empty, empty), QueuedRequests(empty, empty, empty)
    assert engine_room(limits, *nothing) == 64  # nothing known: the limit
    # Blocks taken as they fill: reservations do not bound the batch.
    filling = EngineLimits(64, 1000, 32, admission=Admission.MAX_UTILIZATION)
    assert engine_room(filling, *_reserving(80, 120)) == 64


def _stream_over(batch: int, room: int | None) -> tuple[Projection, Projection]:
    running = RunningRequests(
        np.full(batch, 600, np.int64), np.full(batch, 400, np.int64), np.full(batch, 80, np.int64)
    )
    empty = np.zeros(0, np.int64)
    limits = EngineLimits(max_batch_size=256, kv_capacity_blocks=100_000, tokens_per_block=32)
    arrived = project(running, QueuedRequests(empty, empty, empty), limits)
    return arrived, with_expected_arrivals(arrived, 0.2, 500.0, 300.0, 32, room)


def test_expected_arrivals_join_the_batch_only_as_far_as_the_room_holds() -> None:
    arrived, unbounded = _stream_over(8, None)
    assert unbounded.batch.max() > 60  # 0.2 per iteration for 300 iterations, on top of 8
    _, capped = _stream_over(8, 20)
    assert capped.batch.max() == 20 and (capped.batch <= 20).all()
    assert (capped.batch >= arrived.batch).all()  # the stream still fills what room there is
    # The blocks of the arrivals kept, not of those left waiting.
    assert (capped.kv_blocks <= unbounded.kv_blocks).all()
    assert (capped.kv_blocks >= arrived.kv_blocks).all()
    assert capped.kv_blocks[-1] < unbounded.kv_blocks[-1]
    # Their prompts still enter (as slots free up), so every iteration still carries them.
    assert (capped.ctx_tokens == unbounded.ctx_tokens).all()


def test_arrived_requests_beyond_the_room_are_kept_and_the_stream_adds_nothing() -> None:
    arrived, capped = _stream_over(30, 20)  # a queue admitted past the room's estimate
    full = arrived.batch == 30
    assert full.sum() >= 300 and (capped.batch[full] == 30).all()
    # Once the arrived requests end, the stream fills the room they leave.
    assert capped.batch[-1] > 0 == arrived.batch[-1]
