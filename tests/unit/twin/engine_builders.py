"""Small builders for twin-engine tests: requests, sequences, schedulers, engines."""

from __future__ import annotations

from typing import Any

from throttllem.backend.twin.executor import TwinExecutor
from throttllem.backend.twin.executor_api import (
    CapacitySchedulerPolicy,
    OutputConfig,
    Request,
    Response,
)
from throttllem.backend.twin.factory import build_twin_engine
from throttllem.backend.twin.kv_cache import KvCacheManager
from throttllem.backend.twin.scheduler import Scheduler, SchedulerLimits, Sequence

GNE = CapacitySchedulerPolicy.GUARANTEED_NO_EVICT
MAX_UTIL = CapacitySchedulerPolicy.MAX_UTILIZATION


def make_request(
    prompt_len: int = 16,
    max_tokens: int = 8,
    *,
    out_len: int | None = None,
    streaming: bool = False,
    end_id: int | None = None,
    exclude_input: bool = False,
    perf: bool = False,
    client_id: int | None = None,
) -> Request:
    return Request(
        list(range(100, 100 + prompt_len)),
        max_tokens=max_tokens,
        streaming=streaming,
        end_id=end_id,
        client_id=client_id,
        output_config=OutputConfig(
            exclude_input_from_output=exclude_input, return_perf_metrics=perf
        ),
        twin_output_len=out_len,
    )


def make_engine(**kwargs: Any) -> TwinExecutor:
    """A virtual-time engine on the default preset (A100-40GB, llama-3-8b, TP1)."""
    return build_twin_engine(**kwargs).executor


def make_seq(
    seq_id: int, prompt: int, max_tokens: int, true_len: int, *, streaming: bool = False
) -> Sequence:
    return Sequence(seq_id, prompt, max_tokens, true_len, streaming=streaming)


def make_scheduler(
    *,
    blocks: int = 64,
    tokens_per_block: int = 4,
    max_batch_size: int = 8,
    max_num_tokens: int = 64,
    policy: CapacitySchedulerPolicy = GNE,
    chunked: bool = False,
) -> Scheduler:
    kv = KvCacheManager(blocks, tokens_per_block)
    return Scheduler(SchedulerLimits(max_batch_size, max_num_tokens, policy, chunked), kv)


def drive(sched: Scheduler, *, max_iterations: int = 100_000, check: bool = True) -> int:
    """Schedule and commit until idle, checking the invariants after every iteration."""
    n = 0
    while n < max_iterations:
        sched.apply_cancellations()
        batch = sched.schedule()
        if batch is None:
            return n
        sched.update_after(batch)
        n += 1
        if check:
            sched.check()
    raise AssertionError(f"scheduler still busy after {max_iterations} iterations")


def finals(responses: list[Response]) -> dict[int, Response]:
    """The final response of each request, asserting there is exactly one."""
    out: dict[int, Response] = {}
    for r in responses:
        if r.has_error() or r.result.is_final:
            assert r.request_id not in out, f"two final responses for {r.request_id}"
            out[r.request_id] = r
    return out
