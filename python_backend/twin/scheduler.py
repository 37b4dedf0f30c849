"""In-flight batching bookkeeping of the twin engine: a pure state machine, no clocks, no physics.

`schedule()` decides what the next iteration computes (a `ScheduledBatch` with its
`IterationWork`); the caller runs it on the simulated GPU and hands it back to `update_after()`,
which commits tokens and finishes. The policies follow TensorRT-LLM's batch manager:

- Capacity (admission, FIFO, at most min(max_batch_size, max_num_tokens) active requests):
  GUARANTEED_NO_EVICT admits a request only when blocks for prompt + max_tokens can be promised;
  MAX_UTILIZATION admits whenever the prompt's blocks are free, and when a generating request
  needs a block that is not free it pauses the most recently admitted requests (freeing their
  blocks). A paused request goes back to the head of the queue and, resumed, re-runs context
  over prompt + generated tokens.
- Micro-batch (per iteration, at most max_num_tokens tokens): every generating request gets one
  token, then context requests in admission order get their prompt, whole, or, with chunked
  context, in chunks of whole KV blocks. The context phase ends with the request's first token.

Cost per iteration is independent of the batch size in steady state: generating requests are not
visited one by one. Each records the iteration it joined generation, so its token count is
arithmetic; a heap holds each request's finish, and buckets by iteration modulo
`tokens_per_block` the requests that cross a KV block boundary in that iteration.
"""

from __future__ import annotations

import enum
import itertools
from collections import deque
from dataclasses import dataclass
from heapq import heappop, heappush
from typing import Any

from .errors import ConfigurationError
from .executor_api import CapacitySchedulerPolicy, FinishReason
from .iteration import IterationWork
from .kv_cache import KvCacheManager


class Phase(enum.IntEnum):
    WAITING = 0  # queued, never admitted or paused
    CONTEXT = 1
    GENERATION = 2
    FINISHED = 3


class Sequence:
    """One request as the scheduler tracks it. Time fields are written by the engine."""

    __slots__ = (
        "arrival_s",
        "base",
        "blocks_allocated",
        "ctx_done",
        "ctx_len",
        "end_reason",
        "epoch",
        "finish_iter",
        "finish_reason",
        "first_scheduled_s",
        "first_token_s",
        "generated",
        "join_iter",
        "max_tokens",
        "num_pauses",
        "paused_at",
        "payload",
        "phase",
        "prompt_len",
        "seq_id",
        "streaming",
        "target_len",
        "true_len",
    )

    def __init__(
        self,
        seq_id: int,
        prompt_len: int,
        max_tokens: int,
        true_len: int,
        *,
        streaming: bool = False,
        arrival_s: float = 0.0,
        payload: Any = None,
    ) -> None:
        self.seq_id = seq_id
        self.prompt_len = prompt_len
        self.max_tokens = max_tokens
        self.true_len = true_len
        self.target_len = min(true_len, max_tokens)
        # The "model" emits its end token after true_len tokens; max_tokens may cut it first.
        self.end_reason = _END_ID if true_len <= max_tokens else _LENGTH
        self.streaming = streaming
        self.arrival_s = arrival_s
        self.payload = payload
        self.phase = _WAITING
        self.finish_reason = _NOT_FINISHED
        self.generated = 0  # tokens generated; while GENERATION: base + (iteration - join_iter)
        self.base = 0
        self.join_iter = 0
        self.finish_iter = 0
        self.ctx_len = prompt_len  # positions the context phase (re)computes
        self.ctx_done = 0
        self.epoch = 0  # bumped on pause and finish: invalidates this sequence's heap entries
        self.num_pauses = 0
        self.paused_at = -1
        self.blocks_allocated = 0  # cumulative, for the request's perf metrics
        self.first_scheduled_s: float | None = None
        self.first_token_s: float | None = None

    def __repr__(self) -> str:
        return f"Sequence({self.seq_id}, {self.phase.name}, gen={self.generated})"


@dataclass(frozen=True)
class SchedulerLimits:
    max_batch_size: int
    max_num_tokens: int
    policy: CapacitySchedulerPolicy = CapacitySchedulerPolicy.GUARANTEED_NO_EVICT
    enable_chunked_context: bool = False


@dataclass(slots=True)
class ScheduledBatch:
    iteration: int  # 1-based index of the iteration this batch runs as
    work: IterationWork
    ctx_chunks: list[tuple[Sequence, int]]  # (request, prompt tokens computed this iteration)
    num_gen: int
    admitted: list[Sequence]  # admitted (or resumed) while scheduling this iteration
    num_paused: int  # paused while scheduling this iteration


@dataclass(slots=True)
class StepOutcome:
    first_tokens: list[Sequence]  # context finished: produced a first (or resumed) token
    finished: list[Sequence]  # reached their length this iteration
    streamed: list[Sequence]  # streaming requests that generated a token in the batch


_NO_SEQS: list[Sequence] = []
# Enum members read through their class cost ~0.13 us each; the hot paths use these aliases.
_WAITING, _CONTEXT, _GENERATION, _FINISHED = Phase
_NOT_FINISHED = FinishReason.NOT_FINISHED
_END_ID = FinishReason.END_ID
_LENGTH = FinishReason.LENGTH
_CANCELLED = FinishReason.CANCELLED


class Scheduler:
    def __init__(self, limits: SchedulerLimits, kv: KvCacheManager) -> None:
        if limits.max_batch_size <= 0 or limits.max_num_tokens <= 0:
            raise ConfigurationError("max_batch_size and max_num_tokens must be positive")
        if limits.policy is CapacitySchedulerPolicy.STATIC_BATCH:
            raise ConfigurationError("capacity_scheduler_policy: STATIC_BATCH is not modelled")
        if limits.max_num_tokens < kv.tokens_per_block:
            raise ConfigurationError(
                f"max_num_tokens ({limits.max_num_tokens}) is below tokens_per_block "
                f"({kv.tokens_per_block}): context chunks could never progress"
            )
        self.limits = limits
        self.kv = kv
        self._max_util = limits.policy is CapacitySchedulerPolicy.MAX_UTILIZATION
        # A generating request takes one token of the iteration's budget.
        self._cap = min(limits.max_batch_size, limits.max_num_tokens)
        self._iter = 0  # iterations committed
        self._seqs: dict[int, Sequence] = {}  # every request not finished
        self._waiting: deque[Sequence] = deque()
        self._active: dict[int, Sequence] = {}  # admitted, in admission order
        self._ctx: list[Sequence] = []  # active requests in the context phase, in order
        self._streaming_gen: dict[int, Sequence] = {}
        self._n_gen = 0
        self._gen_kv_sum = 0  # KV positions the generating requests attend to next iteration
        self._finish_heap: list[tuple[int, int, int, Sequence]] = []
        # Generating requests advance in lockstep, so each needs a block every tokens_per_block
        # iterations, at a fixed phase: bucket i holds those that need one when
        # iteration % tokens_per_block == i, as (request, epoch) so stale entries can be dropped.
        self._block_buckets: list[list[tuple[Sequence, int]]] = [
            [] for _ in range(kv.tokens_per_block)
        ]
        self._tiebreak = itertools.count()
        self._cancels: list[int] = []
        self.total_pauses = 0

    # ------------------------------------------------------------------ queries

    @property
    def iteration(self) -> int:
        return self._iter

    @property
    def has_cancellations(self) -> bool:
        return bool(self._cancels)

    @property
    def has_work(self) -> bool:
        return bool(self._seqs) or bool(self._cancels)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_active(self) -> int:
        return len(self._active)

    @property
    def num_generating(self) -> int:
        return self._n_gen

    def get(self, seq_id: int) -> Sequence | None:
        return self._seqs.get(seq_id)

    def waiting_ids(self) -> list[int]:
        return [s.seq_id for s in self._waiting]

    def active_sequences(self) -> list[Sequence]:
        return list(self._active.values())

    def generated(self, seq: Sequence) -> int:
        """Tokens the request has generated so far."""
        if seq.phase is _GENERATION:
            return seq.base + self._iter - seq.join_iter
        return seq.generated

    # ------------------------------------------------------------------ inputs

    def add(self, seq: Sequence) -> None:
        """Queue a request (validated by the engine: its max length fits the KV cache)."""
        if seq.seq_id in self._seqs:
            raise ValueError(f"request {seq.seq_id} is already queued")
        self._seqs[seq.seq_id] = seq
        self._waiting.append(seq)

    def cancel(self, seq_id: int) -> bool:
        """Ask to cancel a request at the next iteration boundary. False if it is not running."""
        if seq_id not in self._seqs:
            return False
        self._cancels.append(seq_id)
        return True

    def apply_cancellations(self) -> list[Sequence]:
        """End the requests cancelled since the last boundary, freeing their blocks."""
        if not self._cancels:
            return _NO_SEQS
        out = []
        for seq_id in self._cancels:
            seq = self._seqs.get(seq_id)
            if seq is not None:  # a second cancel, or it finished meanwhile
                self._finish(seq, _CANCELLED)
                out.append(seq)
        self._cancels.clear()
        return out

    # ------------------------------------------------------------------ one iteration

    def schedule(self) -> ScheduledBatch | None:
        """Plan the next iteration; None when nothing can run (no request is waiting or active)."""
        n = self._iter + 1
        bucket = n % self.kv.tokens_per_block
        num_paused = self._grow_generating(n, bucket) if self._block_buckets[bucket] else 0
        room = self._waiting and len(self._active) < self._cap
        admitted = self._admit(n) if room else _NO_SEQS
        chunks, ctx_tokens, pairs = self._context_chunks() if self._ctx else ([], 0, 0)
        if not chunks and not self._n_gen:
            return None
        work = IterationWork(
            ctx_requests=len(chunks),
            ctx_tokens=ctx_tokens,
            ctx_attention_pairs=pairs,
            gen_requests=self._n_gen,
            gen_kv_tokens=self._gen_kv_sum,
        )
        return ScheduledBatch(n, work, chunks, self._n_gen, admitted, num_paused)

    def update_after(self, batch: ScheduledBatch) -> StepOutcome:
        """Commit an executed batch: context progress, new tokens, finishes."""
        n = batch.iteration
        if n != self._iter + 1:
            raise ValueError(f"batch for iteration {n} committed after iteration {self._iter}")
        self._iter = n
        self._gen_kv_sum += batch.num_gen  # every generating request grew by one position
        streamed = list(self._streaming_gen.values()) if self._streaming_gen else _NO_SEQS
        first: list[Sequence] = []
        finished: list[Sequence] = []
        for seq, tokens in batch.ctx_chunks:
            seq.ctx_done += tokens
            if seq.ctx_done < seq.ctx_len:
                continue
            seq.generated += 1
            first.append(seq)
            if seq.generated >= seq.target_len:
                self._finish(seq, seq.end_reason)
                finished.append(seq)
            else:
                self._ctx.remove(seq)
                self._join_generation(seq, n)
        heap = self._finish_heap
        while heap and heap[0][0] <= n:
            _, _, epoch, seq = heappop(heap)
            if seq.epoch == epoch:
                self._finish(seq, seq.end_reason)
                finished.append(seq)
        return StepOutcome(first, finished, streamed)

    # ------------------------------------------------------------------ phases

    def _grow_generating(self, n: int, bucket: int) -> int:
        """Give each generating request that crosses a block boundary its next block."""
        needers = [seq for seq, epoch in self._block_buckets[bucket] if seq.epoch == epoch]
        paused = 0
        if self._max_util:
            while len(needers) > self.kv.free_blocks:
                victim = next(reversed(self._active.values()))
                self._pause(victim, n)
                paused += 1
                if victim in needers:
                    needers.remove(victim)
        nxt = n + self.kv.tokens_per_block
        grow = self.kv.grow
        for seq in needers:
            grow(seq.seq_id)
            seq.blocks_allocated += 1
        # Keep those that will cross another boundary before they finish.
        self._block_buckets[bucket] = [(s, s.epoch) for s in needers if nxt <= s.finish_iter]
        return paused

    def _admit(self, n: int) -> list[Sequence]:
        kv = self.kv
        admitted = []
        while self._waiting and len(self._active) < self._cap:
            seq = self._waiting[0]
            if seq.paused_at == n and self._active:
                break  # not resumed in the very iteration that paused it
            reserve_tokens = 0
            if self._max_util:
                if kv.blocks_for(seq.ctx_len) > kv.free_blocks:
                    break
            else:
                # ctx_len < prompt + max_tokens: the promise covers the context's blocks.
                reserve_tokens = seq.prompt_len + seq.max_tokens
                if not kv.can_reserve(kv.blocks_for(reserve_tokens)):
                    break
            self._waiting.popleft()
            seq.blocks_allocated += kv.add_sequence(
                seq.seq_id, seq.ctx_len, reserve_tokens=reserve_tokens
            )
            seq.phase = _CONTEXT
            seq.ctx_done = 0
            self._active[seq.seq_id] = seq
            self._ctx.append(seq)
            admitted.append(seq)
        return admitted

    def _context_chunks(self) -> tuple[list[tuple[Sequence, int]], int, int]:
        max_tokens = self.limits.max_num_tokens
        tpb = self.kv.tokens_per_block
        budget = max_tokens - self._n_gen
        chunks = []
        total = pairs = 0
        for seq in self._ctx:
            if budget <= 0:
                break
            done = seq.ctx_done
            remaining = seq.ctx_len - done
            if remaining <= budget:
                c = remaining
            elif self.limits.enable_chunked_context or seq.ctx_len > max_tokens:
                # Chunks are whole KV blocks except the last. A resumed request longer than
                # max_num_tokens is chunked even without chunked context: it could never run.
                c = budget - budget % tpb
                if c <= 0:
                    break
            else:
                break
            chunks.append((seq, c))
            budget -= c
            total += c
            pairs += c * (2 * done + c + 1) // 2  # causal: query at position q sees q + 1 keys
        return chunks, total, pairs

    def _join_generation(self, seq: Sequence, n: int) -> None:
        seq.phase = _GENERATION
        seq.join_iter = n
        seq.base = seq.generated
        seq.finish_iter = n + seq.target_len - seq.generated
        self._n_gen += 1
        self._gen_kv_sum += seq.prompt_len + seq.generated
        if seq.streaming:
            self._streaming_gen[seq.seq_id] = seq
        tb = next(self._tiebreak)
        heappush(self._finish_heap, (seq.finish_iter, tb, seq.epoch, seq))
        # Generation at iteration m computes position prompt+generated-1; the blocks held cover
        # held * tokens_per_block positions, so the first new block is needed at:
        need = n + 1 + self.kv.held(seq.seq_id) * self.kv.tokens_per_block - seq.ctx_len
        if need <= seq.finish_iter:
            # need is in [n + 1, n + tokens_per_block]: its bucket's next turn is exactly then.
            self._block_buckets[need % self.kv.tokens_per_block].append((seq, seq.epoch))

    def _detach(self, seq: Sequence) -> None:
        """Take a request out of whatever structure its phase keeps it in, freeing its blocks."""
        if seq.phase is _GENERATION:
            seq.generated = self.generated(seq)
            self._n_gen -= 1
            self._gen_kv_sum -= seq.prompt_len + seq.generated
            self._streaming_gen.pop(seq.seq_id, None)
        elif seq.phase is _CONTEXT:
            self._ctx.remove(seq)
        elif seq.phase is _WAITING:
            self._waiting.remove(seq)
        self._active.pop(seq.seq_id, None)
        self.kv.free(seq.seq_id)
        seq.epoch += 1

    def _pause(self, seq: Sequence, n: int) -> None:
        self._detach(seq)
        seq.phase = _WAITING
        seq.ctx_len = seq.prompt_len + seq.generated
        seq.ctx_done = 0
        seq.num_pauses += 1
        seq.paused_at = n
        self.total_pauses += 1
        self._waiting.appendleft(seq)

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        self._detach(seq)
        seq.phase = _FINISHED
        seq.finish_reason = reason
        del self._seqs[seq.seq_id]

    # ------------------------------------------------------------------ checking

    def check(self) -> None:
        """Raise RuntimeError if the bookkeeping is inconsistent (for tests and debugging)."""
        self.kv.check()
        problems = []
        if self.kv.num_sequences != len(self._active):
            problems.append("KV holders differ from the active requests")
        if len(self._active) > self._cap:
            problems.append(f"{len(self._active)} active requests, cap {self._cap}")
        gens = [s for s in self._active.values() if s.phase is _GENERATION]
        if len(gens) != self._n_gen:
            problems.append(f"{len(gens)} generating, counter says {self._n_gen}")
        kv_sum = sum(s.prompt_len + self.generated(s) for s in gens)
        if kv_sum != self._gen_kv_sum:
            problems.append(f"generation KV sum {self._gen_kv_sum}, actual {kv_sum}")
        for s in gens:
            if self.kv.held(s.seq_id) < self.kv.blocks_for(s.prompt_len + self.generated(s) - 1):
                problems.append(f"request {s.seq_id} holds too few blocks")
        if len(self._waiting) + len(self._active) != len(self._seqs):
            problems.append("a request is lost between the queue and the batch")
        if problems:
            raise RuntimeError("; ".join(problems))
