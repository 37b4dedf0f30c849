from __future__ import annotations

import pytest
from engine_builders import GNE, MAX_UTIL, drive, make_scheduler, make_seq
from hypothesis import given, settings
from hypothesis import strategies as st

from throttllem.backend.twin.errors import ConfigurationError
from throttllem.backend.twin.executor_api import CapacitySchedulerPolicy, FinishReason
from throttllem.backend.twin.scheduler import Phase, Scheduler, Sequence


def step(sched: Scheduler):  # type: ignore[no-untyped-def]
    sched.apply_cancellations()
    batch = sched.schedule()
    assert batch is not None
    return batch, sched.update_after(batch)


def test_context_then_generation_first_token_at_end_of_context() -> None:
    sched = make_scheduler()
    seq = make_seq(1, prompt=10, max_tokens=8, true_len=5)
    sched.add(seq)
    batch, out = step(sched)
    assert (batch.work.ctx_requests, batch.work.ctx_tokens, batch.work.gen_requests) == (1, 10, 0)
    assert batch.work.ctx_attention_pairs == 10 * 11 // 2
    assert out.first_tokens == [seq] and seq.phase is Phase.GENERATION
    assert sched.generated(seq) == 1
    batch, out = step(sched)
    # One generation token attending prompt + the first token.
    assert (batch.work.ctx_requests, batch.work.gen_requests, batch.work.gen_kv_tokens) == (
        0,
        1,
        11,
    )
    assert sched.generated(seq) == 2
    assert drive(sched) == 3  # tokens 3, 4, 5
    assert seq.finish_reason is FinishReason.END_ID and seq.generated == 5
    assert sched.kv.used_blocks == 0


def test_max_tokens_cuts_the_true_length_with_reason_length() -> None:
    sched = make_scheduler()
    seq = make_seq(1, prompt=4, max_tokens=3, true_len=50)
    sched.add(seq)
    assert drive(sched) == 3
    assert (seq.finish_reason, seq.generated) == (FinishReason.LENGTH, 3)


def test_one_token_request_finishes_with_its_context() -> None:
    sched = make_scheduler()
    seq = make_seq(1, prompt=4, max_tokens=1, true_len=9)
    sched.add(seq)
    _, out = step(sched)
    assert out.first_tokens == [seq] and out.finished == [seq]
    assert sched.schedule() is None


def test_batch_size_caps_active_requests_and_admission_is_fifo() -> None:
    sched = make_scheduler(max_batch_size=2)
    seqs = [make_seq(i, 4, 4, 4) for i in range(1, 5)]
    for s in seqs:
        sched.add(s)
    batch, _ = step(sched)
    assert [s.seq_id for s in batch.admitted] == [1, 2]
    assert sched.num_active == 2 and sched.num_waiting == 2
    drive(sched)
    assert all(s.phase is Phase.FINISHED for s in seqs)


def test_gen_kv_tokens_matches_a_direct_count() -> None:
    sched = make_scheduler(max_batch_size=4, blocks=200)
    seqs = [make_seq(i, 3 * i, 20, 5 + i) for i in range(1, 5)]
    for s in seqs:
        sched.add(s)
    step(sched)
    while True:
        expected = sum(
            s.prompt_len + sched.generated(s) for s in seqs if s.phase is Phase.GENERATION
        )
        sched.apply_cancellations()
        batch = sched.schedule()
        if batch is None:
            break
        assert batch.work.gen_kv_tokens == expected
        sched.update_after(batch)


def test_without_chunking_a_context_waits_for_a_whole_budget() -> None:
    sched = make_scheduler(max_num_tokens=20, max_batch_size=8)
    a, b = make_seq(1, 16, 10, 10), make_seq(2, 16, 10, 10)
    sched.add(a)
    sched.add(b)
    batch, _ = step(sched)
    # Both admitted, but only one prompt fits the 20-token budget.
    assert [s.seq_id for s, _ in batch.ctx_chunks] == [1]
    batch, _ = step(sched)
    assert batch.work.gen_requests == 1 and [s.seq_id for s, _ in batch.ctx_chunks] == [2]
    assert batch.work.tokens <= 20


def test_chunked_context_splits_a_prompt_into_whole_blocks() -> None:
    sched = make_scheduler(max_num_tokens=10, tokens_per_block=4, chunked=True, blocks=100)
    seq = make_seq(1, 23, 4, 4)
    sched.add(seq)
    chunks = []
    pairs = 0
    while seq.phase is not Phase.GENERATION:
        batch, _ = step(sched)
        chunks += [c for _, c in batch.ctx_chunks]
        pairs += batch.work.ctx_attention_pairs
    assert chunks == [8, 8, 7]  # whole blocks, then the rest
    assert pairs == 23 * 24 // 2  # causal pairs add up over the chunks


def test_chunked_scheduler_needs_a_budget_of_at_least_one_block() -> None:
    with pytest.raises(ConfigurationError):
        make_scheduler(max_num_tokens=3, tokens_per_block=4)


def test_guaranteed_no_evict_admits_only_what_it_can_promise() -> None:
    # 12 blocks of 4 tokens; each request needs (8 + 12) / 4 = 5 blocks promised.
    sched = make_scheduler(blocks=12, tokens_per_block=4, policy=GNE)
    seqs = [make_seq(i, 8, 12, 12) for i in range(1, 4)]
    for s in seqs:
        sched.add(s)
    step(sched)
    assert sched.num_active == 2 and sched.num_waiting == 1
    drive(sched)
    assert sched.total_pauses == 0
    assert all(s.finish_reason is FinishReason.END_ID for s in seqs)


def test_max_utilization_admits_greedily_then_pauses_the_latest() -> None:
    sched = make_scheduler(blocks=12, tokens_per_block=4, policy=MAX_UTIL)
    seqs = [make_seq(i, 8, 12, 12) for i in range(1, 4)]
    for s in seqs:
        sched.add(s)
    step(sched)
    assert sched.num_active == 3  # only the prompts' blocks are needed to admit
    paused_at = None
    while sched.has_work:
        batch, _ = step(sched)
        sched.check()
        if batch.num_paused and paused_at is None:
            paused_at = batch.iteration
            assert seqs[2].phase is Phase.WAITING and seqs[2].num_pauses == 1
            assert seqs[0].phase is Phase.GENERATION
    assert paused_at is not None
    # The paused request resumed, re-ran context over prompt + generated, and lost no token.
    assert all(s.finish_reason is FinishReason.END_ID and s.generated == 12 for s in seqs)
    assert sched.kv.used_blocks == 0


@pytest.mark.parametrize("where", ["waiting", "context", "generation"])
def test_cancellation_frees_blocks_at_the_next_boundary(where: str) -> None:
    # One request at a time, chunks of 8 tokens: a 20-token prompt takes three iterations.
    sched = make_scheduler(max_batch_size=1, max_num_tokens=8, tokens_per_block=4, chunked=True)
    first, second = make_seq(1, 20, 20, 20), make_seq(2, 20, 20, 20)
    sched.add(first)
    sched.add(second)
    step(sched)
    if where == "generation":
        step(sched)
        step(sched)
    victim = second if where == "waiting" else first
    expected = {"waiting": Phase.WAITING, "context": Phase.CONTEXT, "generation": Phase.GENERATION}
    assert victim.phase is expected[where]
    held = sched.kv.used_blocks
    assert sched.cancel(victim.seq_id)
    assert sched.cancel(victim.seq_id)  # twice is harmless
    assert sched.kv.used_blocks == held  # nothing changes until the boundary
    ended = sched.apply_cancellations()
    assert ended == [victim] and victim.finish_reason is FinishReason.CANCELLED
    assert sched.kv.held(victim.seq_id) == 0
    assert not sched.cancel(victim.seq_id) and not sched.cancel(999)
    sched.check()
    drive(sched)
    assert sched.kv.used_blocks == 0


def test_committing_out_of_order_is_refused() -> None:
    sched = make_scheduler()
    sched.add(make_seq(1, 4, 4, 4))
    batch = sched.schedule()
    assert batch is not None
    sched.update_after(batch)
    with pytest.raises(ValueError):
        sched.update_after(batch)


# ---------------------------------------------------------------------- properties

request_st = st.tuples(
    st.integers(1, 40),  # prompt
    st.integers(1, 30),  # max_tokens
    st.integers(1, 40),  # true length
    st.booleans(),  # streaming
    st.one_of(st.none(), st.integers(0, 40)),  # cancel at this iteration
)


def run_workload(
    sched: Scheduler,
    requests: list[tuple[int, int, int, bool, int | None]],
    arrivals: list[int],
) -> list[Sequence]:
    """Feed requests at their arrival iterations, cancel some, run to idle; check invariants
    after every iteration and that every request ended exactly once, its blocks all freed."""
    seqs: list[Sequence] = []
    pending = []
    kv = sched.kv
    for i, (prompt, max_tokens, true_len, streaming, cancel_at) in enumerate(requests):
        # The engine refuses what could never run; the scheduler is given only the rest.
        if not sched.limits.enable_chunked_context and prompt > sched.limits.max_num_tokens:
            continue
        if kv.blocks_for(prompt + max_tokens) > kv.max_num_blocks:
            continue
        seq = make_seq(i, prompt, max_tokens, true_len, streaming=streaming)
        seqs.append(seq)
        pending.append((arrivals[i % len(arrivals)], cancel_at, seq))
    last_arrival = max((a for a, _, _ in pending), default=0)
    finished: list[Sequence] = []
    for it in range(20_000):
        for arrival, _, seq in pending:
            if arrival == it:
                sched.add(seq)
        for _, cancel_at, seq in pending:
            if cancel_at == it:
                sched.cancel(seq.seq_id)
        finished += sched.apply_cancellations()
        batch = sched.schedule()
        if batch is not None:
            assert batch.work.tokens <= sched.limits.max_num_tokens
            assert batch.work.scheduled_requests <= sched.limits.max_batch_size
            finished += sched.update_after(batch).finished
        sched.check()
        assert 0 <= kv.used_blocks <= kv.max_num_blocks
        assert 0 <= kv.reserved_blocks <= kv.max_num_blocks
        if it > last_arrival and not sched.has_work:
            break
    # Nothing lost, nothing twice: every request ended exactly once.
    assert sorted(s.seq_id for s in finished) == sorted(s.seq_id for s in seqs)
    assert kv.used_blocks == 0 and kv.reserved_blocks == 0 and kv.num_sequences == 0
    for s in seqs:
        assert s.phase is Phase.FINISHED
        if s.finish_reason is FinishReason.CANCELLED:
            assert s.generated <= s.target_len
        else:
            assert s.generated == s.target_len
            assert s.finish_reason is (
                FinishReason.END_ID if s.true_len <= s.max_tokens else FinishReason.LENGTH
            )
    return seqs


@settings(max_examples=200, deadline=None)
@given(
    requests=st.lists(request_st, min_size=1, max_size=25),
    blocks=st.integers(6, 60),
    tokens_per_block=st.sampled_from([1, 2, 4, 8]),
    max_batch_size=st.integers(1, 10),
    max_num_tokens=st.integers(8, 80),
    policy=st.sampled_from([GNE, MAX_UTIL]),
    chunked=st.booleans(),
    arrivals=st.lists(st.integers(0, 30), min_size=1, max_size=25),
)
def test_scheduler_invariants_hold_for_any_workload(
    requests: list[tuple[int, int, int, bool, int | None]],
    blocks: int,
    tokens_per_block: int,
    max_batch_size: int,
    max_num_tokens: int,
    policy: CapacitySchedulerPolicy,
    chunked: bool,
    arrivals: list[int],
) -> None:
    sched = make_scheduler(
        blocks=blocks,
        tokens_per_block=tokens_per_block,
        max_batch_size=max_batch_size,
        max_num_tokens=max(max_num_tokens, tokens_per_block),
        policy=policy,
        chunked=chunked,
    )
    run_workload(sched, requests, arrivals)
    if policy is GNE:
        assert sched.total_pauses == 0


@settings(max_examples=100, deadline=None)
@given(
    requests=st.lists(
        st.tuples(
            st.integers(1, 12),
            st.integers(8, 30),
            st.integers(8, 60),
            st.booleans(),
            st.one_of(st.none(), st.integers(0, 60)),
        ),
        min_size=3,
        max_size=16,
    ),
    blocks=st.integers(6, 16),
    tokens_per_block=st.sampled_from([2, 4]),
    chunked=st.booleans(),
)
def test_max_utilization_under_memory_pressure_pauses_and_loses_nothing(
    requests: list[tuple[int, int, int, bool, int | None]],
    blocks: int,
    tokens_per_block: int,
    chunked: bool,
) -> None:
    sched = make_scheduler(
        blocks=blocks,
        tokens_per_block=tokens_per_block,
        max_batch_size=8,
        max_num_tokens=16,
        policy=MAX_UTIL,
        chunked=chunked,
    )
    run_workload(sched, requests, [0, 1, 2])
