"""The projection against the twin's true future, lengths known (the paper reports 0.2% error in
batch size and 2.3% in KV usage; the issue asks for <= 1% and <= 3%)."""

from __future__ import annotations

import numpy as np

from throttllem.backend.twin.executor_api import Request
from throttllem.backend.twin.factory import build_twin_engine
from throttllem.controller.projection import (
    EngineLimits,
    QueuedRequests,
    RunningRequests,
    project,
)


def _ceil(a: np.ndarray, b: int) -> np.ndarray:
    return -(-a // b)


def test_projection_matches_the_twins_future_batch_and_kv() -> None:
    rng = np.random.default_rng(0)
    engine = build_twin_engine("A100-SXM4-40GB", "llama-3-8b", 1, seed=0, max_batch_size=48)
    ex = engine.executor
    n = 120
    prompts = rng.integers(100, 1500, n)
    outputs = rng.integers(10, 400, n)
    index = {}
    for i in range(n):
        request = Request(
            [1] * int(prompts[i]),
            max_tokens=int(outputs[i]),
            streaming=True,
            twin_output_len=int(outputs[i]),
        )
        index[ex.enqueue_request(request)] = i
    generated: dict[int, int] = {}

    def drain() -> None:
        for r in ex.await_responses():
            generated[r.request_id] = generated.get(r.request_id, 0) + len(
                r.result.output_token_ids[0]
            )

    for _ in range(30):  # the engine is full and requests are waiting: a mid-run view
        ex.step()
        drain()
    tpb = ex.kv.tokens_per_block
    alive = [r for r in index if generated.get(r, 0) < outputs[index[r]]]
    run = [r for r in alive if generated.get(r, 0) > 0]
    wait = [r for r in alive if generated.get(r, 0) == 0]
    assert run and wait

    def col(reqs: list[int], f) -> np.ndarray:  # type: ignore[no-untyped-def]
        return np.array([f(r) for r in reqs], dtype=np.int64)

    p, o, g = (lambda r: prompts[index[r]]), (lambda r: outputs[index[r]]), generated.get
    proj = project(
        RunningRequests(
            col(run, lambda r: p(r) + g(r)),
            col(run, lambda r: o(r) - g(r)),
            _ceil(col(run, lambda r: p(r) + o(r)), tpb),
        ),
        QueuedRequests(col(wait, p), col(wait, o), _ceil(col(wait, lambda r: p(r) + o(r)), tpb)),
        EngineLimits(48, ex.kv.max_num_blocks, tpb),
    )
    batch, kv = [], []
    while (stats := ex.step()) is not None:
        drain()
        batch.append(stats.inflight_batching_stats.num_scheduled_requests)
        kv.append(stats.kv_cache_stats.used_num_blocks)
    true_batch, true_kv = np.array(batch), np.array(kv)
    # Every request ends exactly when projected: the projection's last busy iteration is the
    # twin's last iteration.
    assert int((proj.batch > 0).sum()) == len(true_batch)
    batch_err = np.mean(np.abs(proj.batch[: len(true_batch)] - true_batch) / true_batch)
    # The twin's KV stat is taken after an iteration's bookkeeping, i.e. the cache the next
    # iteration starts with: it lines up with the projection one iteration later.
    kv_err = np.mean(np.abs(proj.kv_blocks[1 : len(true_kv)] - true_kv[:-1]) / true_kv[:-1])
    assert batch_err <= 0.01, batch_err
    assert kv_err <= 0.03, kv_err
