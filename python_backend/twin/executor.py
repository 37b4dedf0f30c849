"""The twin engine: an in-process stand-in for `tensorrt_llm.bindings.executor.Executor`.

Same methods and semantics as the real executor (apis.md §1): enqueue, await responses, cancel,
drained and bounded iteration statistics, shutdown. Each iteration flows
    scheduler.schedule() -> IterationWork -> gpus.run_iteration(latency at a clock) -> commit
    -> responses + IterationStats
in one of two time modes, chosen by the TimeSource given:
- VirtualTime: the caller drives the engine with `step()`, `run_until(t_s)`, `run_until_idle()`;
  each iteration advances virtual time by its latency. Deterministic for a given seed.
- ScaledWallTime: `start()` runs a background thread that paces iterations by the wall clock
  (latency / speedup) and sleeps on a condition while idle, woken by enqueue and shutdown.

Differences from the real executor, on purpose: an invalid request raises `RequestError` (a
ValueError) from `enqueue_request`, naming the field; the real one throws for some checks and
reports others as an error response, so callers must handle both. `shutdown()` runs the admitted
requests to completion, as the real loop does, but also answers requests still queued with
CANCELLED (the real one drops them). Token ids are pseudo-random, never `end_id`.
"""

from __future__ import annotations

import datetime
import functools
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, cast

from .errors import ConfigurationError, ExecutorShutdownError, RequestError
from .executor_api import (
    ExecutorConfig,
    FinishReason,
    IterationStats,
    Request,
    RequestStatsPerIteration,
    Response,
)
from .gpu import ExecutedIteration, TwinGpuGroup
from .hardware import ModelSpec, kv_cache_blocks
from .iteration import LatencyBreakdown
from .kv_cache import DEFAULT_TOKENS_PER_BLOCK, KvCacheManager
from .latency import LatencyModel
from .lengths import LengthSampler, LognormalLengths, true_output_len, uniform01
from .messages import (
    IterationStatsBuilder,
    TokenSource,
    final_response,
    request_stats,
    token_response,
    validate_request,
)
from .scheduler import ScheduledBatch, Scheduler, SchedulerLimits, Sequence
from .time_source import ScaledWallTime, TimeSource, VirtualTime

log = logging.getLogger(__name__)
_NOT_FINISHED = FinishReason.NOT_FINISHED  # enum member lookups cost ~0.15 us each

# Engine build-time values TensorRT-LLM uses when a config leaves them unset (trtllm-build).
DEFAULT_MAX_BATCH_SIZE = 256
DEFAULT_MAX_NUM_TOKENS = 8192
# Timestamps of a virtual-time run start here, so its stats are reproducible.
VIRTUAL_EPOCH = datetime.datetime(2025, 1, 1)


class TwinExecutor:
    """In-flight batching engine over a simulated GPU group. Thread-safe."""

    def __init__(
        self,
        model: ModelSpec,
        gpus: TwinGpuGroup,
        config: ExecutorConfig | None = None,
        *,
        tp: int,
        time: TimeSource,
        latency: LatencyModel,
        seed: int = 0,
        lengths: LengthSampler | None = None,
        tokens_per_block: int = DEFAULT_TOKENS_PER_BLOCK,
        max_num_blocks: int | None = None,
        max_input_len: int | None = None,
        max_seq_len: int | None = None,
        latency_jitter: float = 0.0,
        epoch: datetime.datetime | None = None,
    ) -> None:
        config = config if config is not None else ExecutorConfig()
        if config.max_beam_width != 1:
            raise ConfigurationError("max_beam_width: the twin runs beam width 1 only")
        if len(gpus.gpus) != tp:
            raise ConfigurationError(f"tp={tp} but the GPU group has {len(gpus.gpus)} GPUs")
        if not 0.0 <= latency_jitter < 1.0:
            raise ConfigurationError(f"latency_jitter must be in [0, 1), got {latency_jitter}")
        self.model, self.gpus, self.config, self.tp = model, gpus, config, tp
        self.time, self.latency, self.seed = time, latency, seed
        self._virtual = isinstance(time, VirtualTime)
        if not self._virtual and not isinstance(time, ScaledWallTime):
            raise ConfigurationError("time must be a VirtualTime or a ScaledWallTime")
        self._lengths: LengthSampler = lengths if lengths is not None else LognormalLengths(seed)
        self._jitter = latency_jitter
        self.max_input_len = max_input_len or model.max_context
        self.max_seq_len = max_seq_len or model.max_context
        kvc = config.kv_cache_config
        if max_num_blocks is None:
            fraction = kvc.free_gpu_memory_fraction
            max_num_blocks = kv_cache_blocks(
                gpus.gpus[0].spec,
                model,
                tp,
                tokens_per_block,
                *(() if fraction is None else (fraction,)),
            )
        if kvc.max_tokens is not None:
            max_num_blocks = min(max_num_blocks, -(-kvc.max_tokens // tokens_per_block))
        self.kv = KvCacheManager(
            max_num_blocks, tokens_per_block, enable_block_reuse=kvc.enable_block_reuse
        )
        self.limits = SchedulerLimits(
            max_batch_size=config.max_batch_size or DEFAULT_MAX_BATCH_SIZE,
            max_num_tokens=config.max_num_tokens or DEFAULT_MAX_NUM_TOKENS,
            policy=config.scheduler_config.capacity_scheduler_policy,
            enable_chunked_context=config.enable_chunked_context,
        )
        self._sched = Scheduler(self.limits, self.kv)
        self._tokens = TokenSource(seed, model.vocab_size)
        self._stats_builder = IterationStatsBuilder(
            epoch=epoch or (VIRTUAL_EPOCH if self._virtual else datetime.datetime.now()),
            limits=self.limits,
            kv=self.kv,
            num_gpus=tp,
            # Per GPU: its weight shard and its shard of the KV pool.
            gpu_mem_bytes=int(
                (model.weight_bytes() + self.kv.capacity_tokens * model.kv_bytes_per_token()) / tp
            ),
        )
        self._lock = threading.Lock()
        self._work_cv = threading.Condition(self._lock)  # the engine thread waits for work
        self._resp_cv = threading.Condition(self._lock)  # callers wait for responses
        self._ready: list[Response] = []
        self._stats: deque[IterationStats] = deque(maxlen=max(config.iter_stats_max_iterations, 0))
        self._req_stats: deque[RequestStatsPerIteration] = deque(
            maxlen=max(config.request_stats_max_iterations, 0)
        )
        self._next_id = 1
        self._completed_between = 0  # cancelled between iterations: counted in the next stats
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._failed: str | None = None

    # ================================================================== executor API

    def enqueue_request(self, request: Request) -> int:
        return self.enqueue_requests([request])[0]

    def enqueue_requests(self, requests: Iterable[Request]) -> list[int]:
        """Queue requests; all are validated before any is queued. Returns their ids."""
        requests = list(requests)
        for req in requests:
            validate_request(
                req, max_input_len=self.max_input_len, max_seq_len=self.max_seq_len,
                limits=self.limits, kv=self.kv,
            )  # fmt: skip
        with self._lock:
            if self._stopping:
                raise ExecutorShutdownError(self._failed or "the twin executor is shut down")
            ids = []
            now = self.time.now_s()
            max_queue = self.config.max_queue_size
            for req in requests:
                rid = self._next_id
                self._next_id += 1
                ids.append(rid)
                if max_queue and max_queue > 0 and self._sched.num_waiting >= max_queue:
                    msg = f"Maximum queue size of {max_queue} has been reached, try again later"
                    self._ready.append(Response(rid, error_msg=msg, client_id=req.client_id))
                    continue
                true_len = true_output_len(req, rid, self._lengths)
                seq = Sequence(
                    rid,
                    len(req.input_token_ids),
                    req.max_tokens,
                    true_len,
                    streaming=req.streaming,
                    arrival_s=now,
                    payload=(req, list(req.input_token_ids)),
                )
                self._sched.add(seq)
            if self._thread is not None:  # nobody waits on a virtual-time engine
                self._work_cv.notify()
                self._resp_cv.notify_all()
        return ids

    def cancel_request(self, id: int) -> None:
        """Cancel at the next iteration boundary; unknown or finished ids are ignored."""
        with self._lock:
            if self._sched.cancel(id):
                self._work_cv.notify()

    def can_enqueue_requests(self) -> bool:
        return not self._stopping

    def await_responses(
        self,
        timeout: datetime.timedelta | int | list[int] | None = None,
        *,
        id: int | None = None,
        ids: list[int] | None = None,
    ) -> Any:
        """Responses ready now, waiting up to `timeout` (wall time, real-time mode only) for one.

        Forms, as in the bindings: `()` -> list[Response] for any request; `(id=...)` ->
        list[Response] for that request; `(ids=[...])` -> one list per id. A positional int or
        list is taken as `id` / `ids`. In virtual mode nothing happens while waiting, so it
        returns at once. An id that is neither running nor has responses raises RequestError.
        """
        fast = id is None and ids is None and not isinstance(timeout, (int, list, tuple))
        if fast and self._thread is None:  # the common virtual-time poll: nothing to wait for
            with self._lock:
                out, self._ready = self._ready, []
            return out
        if isinstance(timeout, int) and not isinstance(timeout, bool):
            id, timeout = timeout, None
        elif isinstance(timeout, (list, tuple)):
            ids, timeout = list(timeout), None
        wait_s = timeout.total_seconds() if isinstance(timeout, datetime.timedelta) else None
        wanted = set(ids) if ids is not None else None if id is None else {id}
        with self._lock:
            if wanted is not None:
                for rid in wanted:
                    if self._sched.get(rid) is None and not self._any_ready({rid}):
                        raise RequestError(
                            f"id: request {rid} is not running and has no responses pending"
                        )
            if self._thread is not None:
                self._resp_cv.wait_for(
                    lambda: self._any_ready(wanted) or self._thread is None,
                    None if wait_s is None else max(wait_s, 0.0),
                )
            if wanted is None:
                out, self._ready = self._ready, []
                return out
            picked = [r for r in self._ready if r.request_id in wanted]
            self._ready = [r for r in self._ready if r.request_id not in wanted]
            if ids is None:
                return picked
            return [[r for r in picked if r.request_id == rid] for rid in ids]

    def get_latest_iteration_stats(self) -> list[IterationStats]:
        """Every iteration's stats since the last call (at most iter_stats_max_iterations, the
        newest kept), and empties the queue."""
        with self._lock:
            out = list(self._stats)
            self._stats.clear()
        return out

    def get_latest_request_stats(self) -> list[RequestStatsPerIteration]:
        """Per-request stats per iteration since the last call ([] unless
        request_stats_max_iterations > 0)."""
        with self._lock:
            out = list(self._req_stats)
            self._req_stats.clear()
        return out

    def shutdown(self) -> None:
        """Stop taking requests, cancel the queued ones, run the admitted ones to completion.

        Blocks until every request has ended (in virtual mode by simulating the iterations)."""
        with self._lock:
            if self._stopping and self._thread is None:
                return
            self._stopping = True
            for rid in self._sched.waiting_ids():
                self._sched.cancel(rid)
            self._work_cv.notify_all()
        if self._virtual:
            self.run_until_idle()
            return
        if self._thread is None and self._sched.has_work:
            self.start()
        thread = self._thread
        if thread is not None:
            thread.join()

    def __enter__(self) -> TwinExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ================================================================== virtual time

    def step(self) -> IterationStats | None:
        """Run one iteration, advancing virtual time by its latency; None when idle."""
        vt = self.time
        if not isinstance(vt, VirtualTime):
            raise ConfigurationError("step() needs VirtualTime; use start() instead")
        with self._lock:
            sched = self._sched
            if sched.has_cancellations:
                self._boundary()
            batch = sched.schedule()
            if batch is None:
                return None
            executed = self._execute(batch, vt.now_s())
            vt.advance_to(executed.end_s)
            return self._commit(batch, executed)

    def run_until(self, t_s: float) -> int:
        """Run every iteration that starts before `t_s`, then idle the GPUs up to it (if the
        last iteration ends after `t_s`, time stays at its end). Returns iterations run."""
        vt = self._require_virtual()
        n = 0
        while vt.now_s() < t_s:
            if self.step() is None:
                self.gpus.idle_until(t_s)
                vt.advance_to(t_s)
                break
            n += 1
        return n

    def run_until_idle(self, max_iterations: int | None = None) -> int:
        """Run until no request is waiting or running. Returns iterations run."""
        self._require_virtual()
        n = 0
        while max_iterations is None or n < max_iterations:
            if self.step() is None:
                break
            n += 1
        return n

    # ================================================================== real time

    def start(self) -> None:
        """Start the engine thread (real-time mode). Idempotent."""
        if self._virtual:
            raise ConfigurationError(
                "start() needs a ScaledWallTime; drive VirtualTime with step()"
            )
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._loop, name="twin-executor", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        wall = cast(ScaledWallTime, self.time)  # the constructor checked: not virtual
        try:
            while True:
                with self._lock:
                    while not self._sched.has_work:
                        if self._stopping:
                            return
                        self._work_cv.wait()
                    self._boundary()
                    batch = self._sched.schedule()
                    if batch is None:
                        continue
                    executed = self._execute(batch, wall.now_s())
                wall.sleep_until(executed.end_s)  # the iteration "runs"; callers go on meanwhile
                with self._lock:
                    self._commit(batch, executed)
        except Exception as e:  # never leave callers waiting on a dead engine
            log.exception("twin executor thread failed")
            with self._lock:
                self._fail_all(f"twin executor failed: {e}")
        finally:
            with self._lock:
                self._thread = None
                self._resp_cv.notify_all()

    # ================================================================== internals

    def _require_virtual(self) -> VirtualTime:
        if not isinstance(self.time, VirtualTime):
            raise ConfigurationError("step()/run_until() need VirtualTime; use start() instead")
        return self.time

    def _any_ready(self, wanted: set[int] | None) -> bool:
        if wanted is None:
            return bool(self._ready)
        return any(r.request_id in wanted for r in self._ready)

    def _boundary(self) -> None:
        """Between iterations: end the requests cancelled meanwhile."""
        cancelled = self._sched.apply_cancellations()
        if cancelled:
            now = self.time.now_s()
            for seq in cancelled:
                self._ready.append(final_response(seq, self._sched, self._tokens, now))
            self._completed_between += len(cancelled)
            self._resp_cv.notify_all()

    def _execute(self, batch: ScheduledBatch, start_s: float) -> ExecutedIteration:
        latency_at: Callable[[int], LatencyBreakdown] = functools.partial(
            self.latency.at, batch.work
        )
        if self._jitter:  # (seeded per iteration: the same factor at every clock the GPU tries)
            u = uniform01(self.seed ^ 0x5DEECE66D, batch.iteration)
            latency_at = functools.partial(
                _scaled, latency_at, 1.0 + self._jitter * (2.0 * u - 1.0) * 1.7320508075688772
            )
        return self.gpus.run_iteration(latency_at, start_s)

    def _commit(self, batch: ScheduledBatch, executed: ExecutedIteration) -> IterationStats:
        sched = self._sched
        start, end = executed.start_s, executed.end_s
        new_active = 0
        queue_ms = 0.0
        for seq in batch.admitted:
            if seq.first_scheduled_s is None:
                seq.first_scheduled_s = start
                new_active += 1
                queue_ms += (start - seq.arrival_s) * 1e3
        num_active = sched.num_active
        out = sched.update_after(batch)
        ready = self._ready
        tokens = self._tokens
        n_ready = len(ready)
        for seq in out.first_tokens:
            if seq.first_token_s is None:
                seq.first_token_s = end
            if seq.streaming and seq.finish_reason is _NOT_FINISHED:
                ready.append(token_response(seq, sched, tokens))
        for seq in out.streamed:
            if seq.finish_reason is _NOT_FINISHED:
                ready.append(token_response(seq, sched, tokens))
        for seq in out.finished:
            ready.append(final_response(seq, sched, tokens, end))
        stats = self._stats_builder.build(
            batch,
            executed,
            num_active=num_active,
            num_queued=sched.num_waiting,
            num_new_active=new_active,
            queue_latency_ms=queue_ms,
            num_completed=len(out.finished) + self._completed_between,
        )
        self._completed_between = 0
        if self._stats.maxlen:
            self._stats.append(stats)
        if self._req_stats.maxlen:
            self._req_stats.append(request_stats(batch, out, sched))
        if len(ready) > n_ready and self._thread is not None:
            self._resp_cv.notify_all()
        return stats

    def _fail_all(self, msg: str) -> None:
        """The engine died: every running or queued request gets an error response."""
        self._failed = msg
        self._stopping = True
        for seq in self._sched.active_sequences():
            self._sched.cancel(seq.seq_id)
        for rid in self._sched.waiting_ids():
            self._sched.cancel(rid)
        for seq in self._sched.apply_cancellations():
            self._ready.append(
                Response(seq.seq_id, error_msg=msg, client_id=seq.payload[0].client_id)
            )
        self._resp_cv.notify_all()


def _scaled(
    latency_at: Callable[[int], LatencyBreakdown], factor: float, clock_mhz: int
) -> LatencyBreakdown:
    b = latency_at(clock_mhz)
    return LatencyBreakdown(
        sm_clock_mhz=b.sm_clock_mhz,
        dense_ms=b.dense_ms * factor,
        attention_ms=b.attention_ms * factor,
        communication_ms=b.communication_ms * factor,
        overhead_ms=b.overhead_ms * factor,
        sm_activity=b.sm_activity,
        dram_activity=b.dram_activity,
    )
