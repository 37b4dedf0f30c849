"""What goes into the twin engine and what comes out: request checks, token ids, responses,
iteration and per-request statistics.

Requests are checked at enqueue against the engine's limits, each failure naming the field.

Token ids are pseudo-random but deterministic per (seed, request id, position): a request's
tokens come from a fixed pool at an offset derived from its id, so building a response is a list
slice, not a random draw per token. A token never equals the request's `end_id`.

Streaming responses carry only the new token (the input is never repeated, as in TensorRT-LLM);
a non-streaming request gets one final response with every generated token, after its input
unless `output_config.exclude_input_from_output`.
"""

from __future__ import annotations

import datetime
import random

from .errors import RequestError
from .executor_api import (
    FinishReason,
    IterationStats,
    KvCacheMetrics,
    Request,
    RequestPerfMetrics,
    RequestStage,
    RequestStats,
    RequestStatsPerIteration,
    Response,
    Result,
    TimingMetrics,
)
from .gpu import ExecutedIteration
from .kv_cache import KvCacheManager
from .scheduler import Phase, ScheduledBatch, Scheduler, SchedulerLimits, Sequence, StepOutcome

_POOL_SIZE = 4099  # prime: offsets of consecutive ids do not line up
_ID_STRIDE = 2654435761  # Knuth's multiplicative hash constant: spreads ids over the pool


def validate_request(
    req: Request,
    *,
    max_input_len: int,
    max_seq_len: int,
    limits: SchedulerLimits,
    kv: KvCacheManager,
) -> None:
    """Raise RequestError, naming the field, if the engine could never run `req`."""
    prompt = len(req.input_token_ids)
    if prompt == 0:
        raise RequestError("input_token_ids: the prompt is empty")
    if req.max_tokens <= 0:
        raise RequestError(f"max_tokens: must be positive, got {req.max_tokens}")
    if prompt > max_input_len:
        raise RequestError(
            f"input_token_ids: prompt of {prompt} tokens exceeds the max input length "
            f"{max_input_len}"
        )
    if prompt + req.max_tokens > max_seq_len:
        raise RequestError(
            f"max_tokens: prompt ({prompt}) + max_tokens ({req.max_tokens}) exceeds the "
            f"max sequence length {max_seq_len}"
        )
    if not limits.enable_chunked_context and prompt > limits.max_num_tokens:
        raise RequestError(
            f"input_token_ids: prompt of {prompt} tokens exceeds max_num_tokens "
            f"({limits.max_num_tokens}) and chunked context is off"
        )
    # A request alone must fit the cache, or it could never finish (and under MAX_UTILIZATION
    # it would pause itself forever).
    blocks = kv.blocks_for(prompt + req.max_tokens)
    if blocks > kv.max_num_blocks:
        raise RequestError(
            f"max_tokens: prompt + max_tokens needs {blocks} KV blocks, the cache holds "
            f"{kv.max_num_blocks}"
        )
    if req.sampling_config.beam_width != 1:
        raise RequestError("sampling_config.beam_width: the twin runs beam width 1 only")
    if req.twin_output_len is not None and req.twin_output_len < 1:
        raise RequestError(f"twin_output_len: must be >= 1, got {req.twin_output_len}")


class TokenSource:
    def __init__(self, seed: int, vocab_size: int) -> None:
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be at least 2, got {vocab_size}")
        rng = random.Random(seed)
        pool = [rng.randrange(vocab_size) for _ in range(_POOL_SIZE)]
        self._pool = pool
        self._pool2 = pool + pool  # any window of up to _POOL_SIZE is one slice
        self._seed = seed
        self._vocab = vocab_size

    def tokens(self, seq_id: int, start: int, stop: int, end_id: int | None) -> list[int]:
        """Token ids at output positions [start, stop) of request `seq_id`."""
        n = stop - start
        if n <= 0:
            return []
        off = (seq_id * _ID_STRIDE + self._seed + start) % _POOL_SIZE
        if n <= _POOL_SIZE:
            out = self._pool2[off : off + n]
        else:
            pool = self._pool
            out = [pool[(off + i) % _POOL_SIZE] for i in range(n)]
        if end_id is not None and end_id in out:
            alt = (end_id + 1) % self._vocab
            out = [alt if t == end_id else t for t in out]
        return out


def _td(seconds: float | None) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds or 0.0)


def perf_metrics(seq: Sequence, end_s: float | None, iteration: int) -> RequestPerfMetrics:
    """The request's perf metrics; `end_s` is None until its final response."""
    return RequestPerfMetrics(
        timing_metrics=TimingMetrics(
            arrival_time=_td(seq.arrival_s),
            first_scheduled_time=_td(seq.first_scheduled_s),
            first_token_time=_td(seq.first_token_s),
            last_token_time=_td(end_s),
        ),
        kv_cache_metrics=KvCacheMetrics(
            num_total_allocated_blocks=seq.blocks_allocated,
            num_new_allocated_blocks=seq.blocks_allocated,
        ),
        iter=iteration,
    )


def token_response(seq: Sequence, sched: Scheduler, tokens: TokenSource) -> Response:
    """A streaming request's response with the token it generated this iteration."""
    req = seq.payload[0]
    g = sched.generated(seq)
    metrics = None
    if req.output_config.return_perf_metrics:
        metrics = perf_metrics(seq, None, sched.iteration - 1)
    result = Result(
        is_final=False,
        output_token_ids=[tokens.tokens(seq.seq_id, g - 1, g, req.end_id)],
        finish_reasons=[FinishReason.NOT_FINISHED],
        request_perf_metrics=metrics,
    )
    return Response(seq.seq_id, result, client_id=req.client_id)


def final_response(seq: Sequence, sched: Scheduler, tokens: TokenSource, end_s: float) -> Response:
    """The last response of a request that ended (length, end id or cancellation)."""
    req, prompt = seq.payload
    g = seq.generated
    if seq.streaming:
        # Everything but the last token went out already; a cancel brings no new token.
        last = g if seq.finish_reason is not FinishReason.CANCELLED else 0
        out = tokens.tokens(seq.seq_id, last - 1, last, req.end_id) if last else []
    else:
        out = tokens.tokens(seq.seq_id, 0, g, req.end_id)
        if not req.output_config.exclude_input_from_output:
            out = prompt + out
    metrics = None
    if req.output_config.return_perf_metrics:
        metrics = perf_metrics(seq, end_s, sched.iteration - 1)
    result = Result(
        is_final=True,
        output_token_ids=[out],
        finish_reasons=[seq.finish_reason],
        request_perf_metrics=metrics,
        is_sequence_final=True,
    )
    return Response(seq.seq_id, result, client_id=req.client_id)


_STAGES = {
    Phase.WAITING: RequestStage.QUEUED,
    Phase.CONTEXT: RequestStage.CONTEXT_IN_PROGRESS,
    Phase.GENERATION: RequestStage.GENERATION_IN_PROGRESS,
    Phase.FINISHED: RequestStage.GENERATION_COMPLETE,
}


def request_stats(
    batch: ScheduledBatch, out: StepOutcome, sched: Scheduler
) -> RequestStatsPerIteration:
    """Per-request stats of one iteration: the requests still active and those that finished."""
    scheduled = {seq.seq_id for seq, _ in batch.ctx_chunks}
    rows = []
    for seq in [*sched.active_sequences(), *out.finished]:
        gen = seq.phase is Phase.GENERATION
        rows.append(
            RequestStats(
                id=seq.seq_id,
                stage=_STAGES[seq.phase],
                context_prefill_position=seq.ctx_done,
                num_generated_tokens=sched.generated(seq),
                avg_num_decoded_tokens_per_iter=1.0 if gen else 0.0,
                scheduled=gen or seq.seq_id in scheduled,
                paused=False,
                alloc_total_blocks_per_request=seq.blocks_allocated,
                alloc_new_blocks_per_request=seq.blocks_allocated,
            )
        )
    return RequestStatsPerIteration(iter=batch.iteration - 1, request_stats=rows)


class IterationStatsBuilder:
    """Turns one committed iteration into the executor's IterationStats record."""

    def __init__(
        self,
        *,
        epoch: datetime.datetime,
        limits: SchedulerLimits,
        kv: KvCacheManager,
        num_gpus: int,
        gpu_mem_bytes: int,
    ) -> None:
        self.epoch = epoch
        self.limits = limits
        self.kv = kv
        self.num_gpus = num_gpus
        self.gpu_mem_bytes = gpu_mem_bytes

    def build(
        self,
        batch: ScheduledBatch,
        executed: ExecutedIteration,
        *,
        num_active: int,
        num_queued: int,
        num_new_active: int,
        queue_latency_ms: float,
        num_completed: int,
    ) -> IterationStats:
        work = batch.work
        start, end = executed.start_s, executed.end_s
        latency_ms = (end - start) * 1e3
        power_w = executed.power_w * self.num_gpus  # ExecutedIteration's is per GPU
        limits = self.limits
        # Positional, nested records as tuples: this runs once per simulated iteration.
        return IterationStats(
            end,
            self.epoch,
            batch.iteration - 1,
            latency_ms,
            queue_latency_ms,
            num_new_active,
            num_active,
            num_queued,
            num_completed,
            limits.max_batch_size,  # max_num_active_requests
            limits.max_batch_size,  # max_batch_size_static
            limits.max_num_tokens,  # max_num_tokens_static
            self.gpu_mem_bytes,
            self.kv.stats_fields(),
            (
                work.ctx_requests + work.gen_requests,  # num_scheduled_requests
                work.ctx_requests,
                work.gen_requests,
                batch.num_paused,
                work.ctx_tokens,
                0,  # micro_batch_id: no pipeline parallelism
                1.0 if work.gen_requests else 0.0,  # no speculative decoding
            ),
            (start, end, executed.sm_clock_mhz, power_w, power_w * latency_ms, executed.breakdown),
        )
