from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from throttllem.backend.twin.errors import KvCacheExhaustedError
from throttllem.backend.twin.kv_cache import KvCacheManager


def test_blocks_for_rounds_up_to_whole_blocks() -> None:
    kv = KvCacheManager(10, tokens_per_block=64)
    assert [kv.blocks_for(t) for t in (0, 1, 64, 65, 128, 129)] == [0, 1, 1, 2, 2, 3]
    assert kv.capacity_tokens == 640


def test_add_grow_free_track_used_and_free_blocks() -> None:
    kv = KvCacheManager(10, tokens_per_block=4)
    assert kv.add_sequence(1, 9) == 3
    kv.grow(1)
    kv.add_sequence(2, 4)
    assert (kv.used_blocks, kv.free_blocks, kv.held(1), kv.held(2)) == (5, 5, 4, 1)
    assert kv.free(1) == 4
    assert kv.free(1) == 0  # idempotent: a cancel after a finish frees nothing twice
    assert (kv.used_blocks, kv.free_blocks) == (1, 9)
    assert kv.alloc_total_blocks == 5  # cumulative, freeing does not undo it
    kv.check()


def test_allocations_beyond_capacity_are_refused() -> None:
    kv = KvCacheManager(4, tokens_per_block=4)
    kv.add_sequence(1, 16)
    with pytest.raises(KvCacheExhaustedError):
        kv.grow(1)
    with pytest.raises(KvCacheExhaustedError):
        kv.add_sequence(2, 1)
    with pytest.raises(KvCacheExhaustedError):
        kv.add_sequence(1, 1)  # already holds blocks
    assert kv.used_blocks == 4
    kv.check()


def test_reservations_promise_blocks_and_are_released_with_the_sequence() -> None:
    kv = KvCacheManager(10, tokens_per_block=4)
    kv.add_sequence(1, 4, reserve_tokens=24)  # holds 1, promised 6
    assert (kv.held(1), kv.reserved(1), kv.reserved_blocks) == (1, 6, 6)
    assert kv.can_reserve(4) and not kv.can_reserve(5)
    with pytest.raises(KvCacheExhaustedError):
        kv.add_sequence(2, 4, reserve_tokens=24)
    kv.free(1)
    assert kv.reserved_blocks == 0 and kv.can_reserve(10)
    kv.check()


def test_stats_report_the_executor_fields() -> None:
    kv = KvCacheManager(10, tokens_per_block=8, enable_block_reuse=True)
    kv.add_sequence(1, 20)
    s = kv.stats()
    assert (s.max_num_blocks, s.used_num_blocks, s.free_num_blocks, s.tokens_per_block) == (
        10,
        3,
        7,
        8,
    )
    assert (s.alloc_total_blocks, s.alloc_new_blocks, s.reused_blocks, s.missed_blocks) == (
        3,
        3,
        0,
        3,
    )
    assert s.cache_hit_rate == 0.0
    assert KvCacheManager(10).stats().missed_blocks == 0


@pytest.mark.parametrize("blocks, tpb", [(0, 64), (10, 0), (-1, 4)])
def test_bad_sizes_are_rejected(blocks: int, tpb: int) -> None:
    with pytest.raises(ValueError):
        KvCacheManager(blocks, tpb)


@settings(max_examples=150, deadline=None)
@given(
    capacity=st.integers(1, 40),
    ops=st.lists(
        st.tuples(st.sampled_from(["add", "grow", "free"]), st.integers(0, 6), st.integers(1, 30)),
        max_size=60,
    ),
)
def test_random_operations_never_break_the_invariants(
    capacity: int, ops: list[tuple[str, int, int]]
) -> None:
    kv = KvCacheManager(capacity, tokens_per_block=4)
    for op, seq, tokens in ops:
        try:
            if op == "add":
                kv.add_sequence(seq, tokens, reserve_tokens=tokens * 2 if seq % 2 else 0)
            elif op == "grow" and kv.held(seq):
                kv.grow(seq)
            elif op == "free":
                kv.free(seq)
        except KvCacheExhaustedError:
            pass  # refused, and nothing changed
        kv.check()
        assert 0 <= kv.used_blocks <= capacity
        assert 0 <= kv.reserved_blocks <= capacity
    for seq in range(7):
        kv.free(seq)
    assert kv.used_blocks == 0 and kv.reserved_blocks == 0 and kv.num_sequences == 0
