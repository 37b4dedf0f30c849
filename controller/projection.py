"""Projection of an engine's future: batch size and KV blocks for every coming iteration.

Pure and vectorised (numpy), so that a decision over hundreds of requests and thousands of
iterations costs well under a millisecond. Iteration 0 is the next iteration the engine runs.

A running request with `remaining` predicted tokens generates one token in each of iterations
0 .. remaining-1 and holds ceil((context + t + 1) / tokens_per_block) KV blocks in iteration t.
A queued request enters, first come first served, at the first iteration where the batch has a
slot and the admission policy finds blocks for it (GUARANTEED_NO_EVICT: blocks for its whole
maximum length, reserved; MAX_UTILIZATION: blocks for its prompt, greedily). Its context phase
takes that iteration and yields the first token; it then generates one token per iteration.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

IntArray = npt.NDArray[np.int64]


class Admission(enum.Enum):
    GUARANTEED_NO_EVICT = "guaranteed_no_evict"
    MAX_UTILIZATION = "max_utilization"


@dataclass(frozen=True)
class EngineLimits:
    max_batch_size: int
    kv_capacity_blocks: int
    tokens_per_block: int
    admission: Admission = Admission.GUARANTEED_NO_EVICT
    # Tokens one iteration computes at most (one per generating request, whole prompts of those
    # entering): a burst's prompts are spread over several iterations. 0: no such limit.
    max_num_tokens: int = 0
    max_horizon: int = 16384  # iterations; requests beyond it count as not projectable


@dataclass(frozen=True)
class RunningRequests:
    """In-flight requests, one entry per request (numpy int arrays of equal length)."""

    context_tokens: IntArray  # prompt + tokens generated so far
    remaining_tokens: IntArray  # predicted tokens still to come, >= 1
    reserved_blocks: IntArray  # ceil((prompt + max_tokens) / tokens_per_block)


@dataclass(frozen=True)
class QueuedRequests:
    """Requests waiting for admission, in arrival order."""

    prompt_tokens: IntArray
    output_tokens: IntArray  # predicted, >= 1
    reserved_blocks: IntArray


@dataclass(frozen=True)
class Projection:
    batch: IntArray  # requests scheduled in iteration t (context + generation)
    kv_blocks: IntArray  # KV blocks in use during iteration t
    ctx_tokens: IntArray  # prompt tokens processed in iteration t (queued requests entering)
    running_last_iter: IntArray  # iteration of each running request's last token
    queued_first_iter: IntArray  # iteration of each queued request's first token; -1: beyond
    queued_last_iter: IntArray  # -1 when beyond the horizon

    @property
    def horizon(self) -> int:
        return int(self.batch.shape[0])


def _ceil_div(a: IntArray | int, b: int) -> IntArray:
    return -(-np.asarray(a, dtype=np.int64) // b)


def _running_kv(context: IntArray, remaining: IntArray, tpb: int, horizon: int) -> IntArray:
    """KV blocks of the running requests per iteration, from block-boundary events."""
    first = _ceil_div(context + 1, tpb)  # blocks in iteration 0
    last = _ceil_div(context + remaining, tpb)  # blocks in the last iteration
    delta = np.zeros(horizon + 1, dtype=np.int64)
    delta[0] = int(first.sum())
    # A new block is taken in iteration t when context + t + 1 passes a block boundary.
    n_new = last - first
    if int(n_new.sum()) > 0:
        starts = first * tpb - context  # iteration of the first new block
        owner = np.repeat(np.arange(context.shape[0]), n_new)
        k = np.arange(owner.shape[0]) - np.repeat(np.cumsum(n_new) - n_new, n_new)
        times = starts[owner] + k * tpb
        delta += np.bincount(times, minlength=horizon + 1)[: horizon + 1]
    # Blocks are freed after the request's last iteration.
    delta -= np.bincount(remaining, weights=last, minlength=horizon + 1)[: horizon + 1].astype(
        np.int64
    )
    return np.cumsum(delta[:horizon])


def project(running: RunningRequests, queued: QueuedRequests, limits: EngineLimits) -> Projection:
    """Batch, KV and context tokens per future iteration, and when each request is served."""
    tpb = limits.tokens_per_block
    remaining = np.maximum(running.remaining_tokens.astype(np.int64), 1)
    context = running.context_tokens.astype(np.int64)
    run_end = int(remaining.max()) if remaining.size else 0
    n_q = queued.prompt_tokens.shape[0]
    # Each queued request may wait an iteration of its own for its prompt to fit.
    horizon = min(run_end + int(queued.output_tokens.sum()) + n_q + 1, limits.max_horizon)

    ends = np.bincount(remaining, minlength=horizon + 1)[:horizon]
    batch = remaining.shape[0] - np.cumsum(ends)  # active in iteration t: remaining > t
    kv = _running_kv(context, remaining, tpb, horizon)
    reserved_end = np.bincount(remaining, weights=running.reserved_blocks, minlength=horizon + 1)[
        :horizon
    ]
    reserved = int(running.reserved_blocks.sum()) - np.cumsum(reserved_end)
    reserved = reserved.astype(np.int64)
    ctx = np.zeros(horizon, dtype=np.int64)

    q_first = np.full(n_q, -1, dtype=np.int64)
    q_last = np.full(n_q, -1, dtype=np.int64)
    earliest = 0
    for j in range(n_q):
        prompt = int(queued.prompt_tokens[j])
        out = max(int(queued.output_tokens[j]), 1)
        window = slice(earliest, horizon)
        fits = batch[window] < limits.max_batch_size
        if limits.admission is Admission.GUARANTEED_NO_EVICT:
            fits &= reserved[window] + int(queued.reserved_blocks[j]) <= limits.kv_capacity_blocks
        else:
            fits &= kv[window] + int(_ceil_div(prompt + 1, tpb)) <= limits.kv_capacity_blocks
        if limits.max_num_tokens:
            # Its whole prompt and a token for everyone generating; a prompt above the limit
            # alone runs in an iteration without other prompts (chunked).
            budget = ctx[window] + batch[window] + prompt <= limits.max_num_tokens
            fits &= budget | (ctx[window] == 0)
        if not fits.any():
            break  # first come first served: nothing after it enters earlier
        start = earliest + int(np.argmax(fits))
        stop = min(start + out, horizon)
        q_first[j] = start
        q_last[j] = start + out - 1 if start + out <= horizon else -1
        batch[start:stop] += 1
        ctx[start] += prompt
        kv[start:stop] += _ceil_div(prompt + 1 + np.arange(stop - start), tpb)
        reserved[start:stop] += int(queued.reserved_blocks[j])
        earliest = start
    return Projection(
        batch=batch,
        kv_blocks=kv,
        ctx_tokens=ctx,
        running_last_iter=remaining - 1,
        queued_first_iter=q_first,
        queued_last_iter=q_last,
    )


def engine_room(limits: EngineLimits, running: RunningRequests, queued: QueuedRequests) -> int:
    """How many requests the engine runs at once with requests like these in flight: the batch
    limit, and under GUARANTEED_NO_EVICT the KV capacity over their mean reservation (prompt +
    max_tokens). Under MAX_UTILIZATION blocks are taken as they fill, and the batch limit alone
    bounds it."""
    room = limits.max_batch_size
    count = running.reserved_blocks.size + queued.reserved_blocks.size
    if limits.admission is Admission.GUARANTEED_NO_EVICT and count:
        reserved = int(running.reserved_blocks.sum()) + int(queued.reserved_blocks.sum())
        if reserved > 0:
            room = min(room, int(limits.kv_capacity_blocks / (reserved / count)))
    return max(room, 1)


def with_expected_arrivals(
    proj: Projection,
    per_iteration: float,
    prompt_tokens: float,
    output_tokens: float,
    tokens_per_block: int,
    room: int | None = None,
) -> Projection:
    """The projection with the requests still to come added as a steady stream.

    `per_iteration` requests arrive each iteration (rate x iteration time), each with the mean
    prompt and output length. They join the batch, hold KV blocks and add prefill tokens to every
    iteration, which is what slows those in flight; they are not tracked one by one. Without
    them, the projection sees the batch drain to nothing, and a long request's future iterations
    look faster than they will be. With `room` (engine_room) they join only as far as the batch
    has room: the rest would wait for admission, not slow those running (their prompts still
    count, entering as slots free up).
    """
    if per_iteration <= 0 or proj.horizon == 0:
        return proj
    t = np.arange(proj.horizon, dtype=np.float64)
    age = np.minimum(t, max(output_tokens, 1.0))  # iterations of arrivals still generating
    count = per_iteration * age
    blocks = (
        per_iteration
        * (age * (prompt_tokens + 0.5 * tokens_per_block) + age * age / 2.0)
        / tokens_per_block
    )
    if room is not None:
        # The arrived requests may fill the room themselves (a queue is admitted into it).
        space = np.maximum(max(room, int(proj.batch.max())) - proj.batch, 0)
        kept = np.minimum(count, space)
        blocks = blocks * np.divide(kept, count, out=np.ones_like(count), where=count > 0)
        count = kept
    ctx = np.full(proj.horizon, per_iteration * prompt_tokens)
    return Projection(
        batch=proj.batch + np.rint(count).astype(np.int64),
        kv_blocks=proj.kv_blocks + np.rint(blocks).astype(np.int64),
        ctx_tokens=proj.ctx_tokens + np.rint(ctx).astype(np.int64),
        running_last_iter=proj.running_last_iter,
        queued_first_iter=proj.queued_first_iter,
        queued_last_iter=proj.queued_last_iter,
    )
