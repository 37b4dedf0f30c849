"""The twin engine through its executor API, in virtual and real time."""

from __future__ import annotations

import datetime
import json

import pytest
from engine_builders import finals, make_engine, make_request
from hypothesis import given, settings
from hypothesis import strategies as st

from throttllem.backend.twin import executor_api
from throttllem.backend.twin.errors import ExecutorShutdownError, RequestError
from throttllem.backend.twin.executor_api import (
    TIMESTAMP_FORMAT,
    ExecutorConfig,
    FinishReason,
    IterationStats,
    Response,
)
from throttllem.backend.twin.factory import build_twin_engine
from throttllem.backend.twin.lengths import FixedLengths
from throttllem.backend.twin.messages import TokenSource

PROMPT = 16


def run_all(engine, *requests):  # type: ignore[no-untyped-def]
    ids = engine.enqueue_requests(list(requests))
    engine.run_until_idle()
    return ids, engine.await_responses()


# ---------------------------------------------------------------------- finishing


def test_true_length_within_max_tokens_ends_with_end_id() -> None:
    eng = make_engine()
    (rid,), responses = run_all(eng, make_request(PROMPT, max_tokens=10, out_len=4))
    (resp,) = responses
    assert resp.request_id == rid and not resp.has_error()
    assert resp.result.is_final and resp.result.finish_reasons == [FinishReason.END_ID]
    tokens = resp.result.output_token_ids[0]
    assert tokens[:PROMPT] == list(range(100, 100 + PROMPT))  # input first by default
    assert len(tokens) == PROMPT + 4


def test_max_tokens_stops_a_longer_request_with_length() -> None:
    eng = make_engine()
    _, (resp,) = run_all(eng, make_request(PROMPT, max_tokens=5, out_len=50, exclude_input=True))
    assert resp.result.finish_reasons == [FinishReason.LENGTH]
    assert len(resp.result.output_token_ids[0]) == 5


def test_sampled_lengths_are_used_when_the_request_has_none() -> None:
    eng = make_engine(lengths=FixedLengths(7))
    _, (resp,) = run_all(eng, make_request(PROMPT, max_tokens=30, exclude_input=True))
    assert len(resp.result.output_token_ids[0]) == 7


def test_cancel_ends_a_generating_request_with_its_tokens_so_far() -> None:
    eng = make_engine()
    rid = eng.enqueue_request(make_request(PROMPT, max_tokens=100, out_len=100, exclude_input=True))
    for _ in range(5):
        eng.step()
    eng.cancel_request(rid)
    eng.cancel_request(12345)  # unknown: ignored
    assert eng.await_responses() == []  # takes effect at the next iteration boundary
    assert eng.step() is None  # nothing left to run after the boundary
    (resp,) = eng.await_responses()
    assert resp.result.finish_reasons == [FinishReason.CANCELLED] and resp.result.is_final
    assert len(resp.result.output_token_ids[0]) == 5
    assert eng.kv.used_blocks == 0


def test_cancelled_requests_count_as_completed_in_the_next_stats() -> None:
    eng = make_engine()
    a = eng.enqueue_request(make_request(out_len=50, max_tokens=50))
    eng.enqueue_request(make_request(out_len=50, max_tokens=50))
    eng.step()
    eng.cancel_request(a)
    stats = eng.step()
    assert stats is not None and stats.num_completed_requests == 1


# ---------------------------------------------------------------------- streaming


def test_streaming_sends_one_response_per_token_then_a_final_one() -> None:
    eng = make_engine()
    (rid,), responses = run_all(eng, make_request(PROMPT, max_tokens=10, out_len=6, streaming=True))
    assert [r.result.is_final for r in responses] == [False] * 5 + [True]
    assert all(len(r.result.output_token_ids[0]) == 1 for r in responses)
    assert responses[-1].result.finish_reasons == [FinishReason.END_ID]
    assert {r.request_id for r in responses} == {rid}
    # The streamed tokens are the tokens a non-streaming request gets.
    plain = make_engine()
    _, (whole,) = run_all(plain, make_request(PROMPT, max_tokens=10, out_len=6, exclude_input=True))
    streamed = [r.result.output_token_ids[0][0] for r in responses]
    assert streamed == whole.result.output_token_ids[0]


def test_streaming_cancel_sends_a_final_response_without_tokens() -> None:
    eng = make_engine()
    rid = eng.enqueue_request(make_request(max_tokens=50, out_len=50, streaming=True))
    for _ in range(3):
        eng.step()
    eng.cancel_request(rid)
    eng.run_until_idle()
    responses = eng.await_responses()
    assert len(responses) == 4
    last = responses[-1].result
    assert last.is_final and last.finish_reasons == [FinishReason.CANCELLED]
    assert last.output_token_ids == [[]]


def test_token_ids_never_equal_end_id() -> None:
    source = TokenSource(seed=3, vocab_size=3)
    for seq_id in range(20):
        assert 1 not in source.tokens(seq_id, 0, 500, end_id=1)
    eng = make_engine()
    end_id = 7
    _, responses = run_all(
        eng, *[make_request(max_tokens=200, out_len=200, end_id=end_id) for _ in range(5)]
    )
    for r in responses:
        assert end_id not in r.result.output_token_ids[0][PROMPT:]


# ---------------------------------------------------------------------- statistics


def test_iteration_stats_are_drained() -> None:
    eng = make_engine()
    eng.enqueue_request(make_request(max_tokens=10, out_len=10))
    for _ in range(4):
        eng.step()
    first = eng.get_latest_iteration_stats()
    assert [s.iter for s in first] == [0, 1, 2, 3]
    assert eng.get_latest_iteration_stats() == []
    eng.run_until_idle()
    assert [s.iter for s in eng.get_latest_iteration_stats()] == list(range(4, 10))


def test_the_stats_queue_keeps_only_the_newest() -> None:
    eng = make_engine(iter_stats_max_iterations=5)
    eng.enqueue_request(make_request(max_tokens=20, out_len=20))
    eng.run_until_idle()
    assert [s.iter for s in eng.get_latest_iteration_stats()] == [15, 16, 17, 18, 19]
    off = make_engine(iter_stats_max_iterations=0)
    off.enqueue_request(make_request(max_tokens=3, out_len=3))
    assert off.step() is not None  # step() still reports the iteration
    assert off.get_latest_iteration_stats() == []


def test_stats_fields_describe_the_iteration() -> None:
    eng = make_engine(max_num_blocks=100, tokens_per_block=8)
    eng.enqueue_requests([make_request(PROMPT, max_tokens=20, out_len=20) for _ in range(3)])
    ctx = eng.step()
    gen = eng.step()
    assert ctx is not None and gen is not None
    assert (ctx.num_new_active_requests, ctx.num_active_requests, ctx.num_queued_requests) == (
        3,
        3,
        0,
    )
    ib = ctx.inflight_batching_stats
    assert (ib.num_context_requests, ib.num_ctx_tokens, ib.num_gen_requests) == (3, 48, 0)
    assert gen.inflight_batching_stats.num_gen_requests == 3
    assert gen.inflight_batching_stats.num_scheduled_requests == 3
    kv = gen.kv_cache_stats
    assert (kv.max_num_blocks, kv.tokens_per_block, kv.used_num_blocks) == (100, 8, 9)
    assert kv.free_num_blocks == 91
    assert gen.iter_latency_ms == pytest.approx((gen.end_s - ctx.end_s) * 1e3)
    assert gen.twin is not None and gen.twin.power_w > 0 and gen.twin.sm_clock_mhz == 1410
    # Timestamp: the END of the iteration, in the executor's format.
    stamp = datetime.datetime.strptime(gen.timestamp, TIMESTAMP_FORMAT)
    assert stamp == datetime.datetime(2025, 1, 1) + datetime.timedelta(seconds=gen.end_s)


def test_to_json_str_uses_the_executor_keys() -> None:
    eng = make_engine()
    eng.enqueue_request(make_request())
    stats = eng.step()
    assert stats is not None
    data = json.loads(stats.to_json_str())
    for key in ("timestamp", "iter", "iterLatencyMS", "numActiveRequests", "numQueuedRequests",
                "numCompletedRequests", "maxNumActiveRequests", "gpuMemUsage"):  # fmt: skip
        assert key in data
    assert data["kvCacheStats"]["usedNumBlocks"] == stats.kv_cache_stats.used_num_blocks
    assert data["inflightBatchingStats"]["numCtxTokens"] == PROMPT
    assert data["twin"]["smClockMHz"] == 1410
    assert "twin" not in json.loads(stats.to_json_str(include_twin=False))


def test_request_stats_only_when_enabled() -> None:
    eng = make_engine()
    eng.enqueue_request(make_request())
    eng.run_until_idle()
    assert eng.get_latest_request_stats() == []
    on = make_engine(request_stats_max_iterations=10)
    rid = on.enqueue_request(make_request(max_tokens=3, out_len=3))
    on.run_until_idle()
    per_iter = on.get_latest_request_stats()
    assert [p.iter for p in per_iter] == [0, 1, 2]
    assert [p.request_stats[0].num_generated_tokens for p in per_iter] == [1, 2, 3]
    assert per_iter[-1].request_stats[0].id == rid
    assert per_iter[-1].request_stats[0].stage is executor_api.RequestStage.GENERATION_COMPLETE


def test_perf_metrics_follow_the_request() -> None:
    eng = make_engine()
    eng.step()  # idle
    eng.run_until(0.5)
    _, (resp,) = run_all(eng, make_request(max_tokens=4, out_len=4, perf=True))
    t = resp.result.request_perf_metrics
    assert t is not None
    tm = t.timing_metrics
    assert tm.arrival_time == datetime.timedelta(seconds=0.5)
    assert tm.arrival_time <= tm.first_scheduled_time < tm.first_token_time < tm.last_token_time
    assert t.kv_cache_metrics.num_total_allocated_blocks == 1


# ---------------------------------------------------------------------- policies


def admission_run(policy: str) -> tuple[int, int, dict[int, Response]]:
    # 60 blocks of 64 tokens; each request: 512 prompt + up to 512 output = 16 blocks.
    eng = build_twin_engine(seed=1, max_num_blocks=60, policy=policy).executor
    eng.enqueue_requests([make_request(512, max_tokens=512, out_len=400) for _ in range(8)])
    peak = paused = 0
    while (stats := eng.step()) is not None:
        peak = max(peak, stats.num_active_requests)
        paused += stats.inflight_batching_stats.num_paused_requests
    return peak, paused, finals(eng.await_responses())


def test_guaranteed_no_evict_runs_fewer_at_once_and_never_pauses() -> None:
    peak, paused, done = admission_run("GUARANTEED_NO_EVICT")
    assert peak == 3 and paused == 0  # 60 // 16 requests promised at a time
    assert len(done) == 8
    assert all(r.result.finish_reasons == [FinishReason.END_ID] for r in done.values())


def test_max_utilization_runs_more_at_once_and_pauses_when_blocks_run_out() -> None:
    peak, paused, done = admission_run("MAX_UTILIZATION")
    assert peak > 3 and paused > 0
    assert len(done) == 8
    for r in done.values():
        assert r.result.finish_reasons == [FinishReason.END_ID]
        assert len(r.result.output_token_ids[0]) == 512 + 400  # a pause loses no token


def test_chunked_context_is_needed_for_prompts_over_max_num_tokens() -> None:
    eng = make_engine(max_num_tokens=256)
    with pytest.raises(RequestError, match="input_token_ids"):
        eng.enqueue_request(make_request(1000))
    chunked = make_engine(max_num_tokens=256, enable_chunked_context=True)
    chunked.enqueue_request(make_request(1000, max_tokens=2, out_len=2))
    ctx = [chunked.step() for _ in range(4)]
    assert [s.inflight_batching_stats.num_ctx_tokens for s in ctx if s] == [256, 256, 256, 232]
    chunked.run_until_idle()
    (resp,) = chunked.await_responses()
    assert len(resp.result.output_token_ids[0]) == 1002


def test_batch_size_limits_the_active_requests() -> None:
    eng = make_engine(max_batch_size=2)
    eng.enqueue_requests([make_request(out_len=5, max_tokens=5) for _ in range(5)])
    stats = eng.step()
    assert stats is not None
    assert (stats.num_active_requests, stats.num_queued_requests) == (2, 3)
    eng.run_until_idle()
    assert len(finals(eng.await_responses())) == 5


# ---------------------------------------------------------------------- API behaviour


@pytest.mark.parametrize(
    "request_kwargs, field",
    [
        ({"prompt_len": 0}, "input_token_ids"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"prompt_len": 9000}, "input_token_ids"),  # over the model's context
        ({"prompt_len": 8000, "max_tokens": 500}, "max_tokens"),  # over max sequence length
        ({"out_len": 0}, "twin_output_len"),
    ],
)
def test_invalid_requests_are_refused_at_enqueue(request_kwargs: dict, field: str) -> None:  # type: ignore[type-arg]
    eng = make_engine(max_num_tokens=16384)
    with pytest.raises(RequestError, match=field) as info:
        eng.enqueue_request(make_request(**request_kwargs))
    assert isinstance(info.value, ValueError)
    assert eng.await_responses() == []


def test_requests_over_the_kv_cache_are_refused() -> None:
    eng = make_engine(max_num_blocks=4)
    with pytest.raises(RequestError, match="KV blocks"):
        eng.enqueue_request(make_request(200, max_tokens=100))


def test_await_responses_forms() -> None:
    eng = make_engine()
    a, b = eng.enqueue_requests([make_request(out_len=2, max_tokens=2)] * 2)
    eng.run_until_idle()
    assert [r.request_id for r in eng.await_responses(id=b)] == [b]
    assert [[r.request_id for r in rs] for rs in eng.await_responses(ids=[a])] == [[a]]
    assert eng.await_responses(datetime.timedelta(milliseconds=5)) == []  # virtual: no waiting
    with pytest.raises(RequestError, match="id"):
        eng.await_responses(id=a)  # terminated, nothing pending


def test_error_responses_and_their_accessors() -> None:
    eng = make_engine(max_queue_size=1)
    ok, full = eng.enqueue_requests([make_request(), make_request(client_id=9)])
    (err,) = eng.await_responses(id=full)
    assert err.has_error() and "queue" in err.error_msg and err.client_id == 9
    with pytest.raises(RuntimeError):
        _ = err.result
    eng.run_until_idle()
    (good,) = eng.await_responses(id=ok)
    with pytest.raises(RuntimeError):
        _ = good.error_msg


def test_shutdown_cancels_the_queue_and_finishes_the_batch() -> None:
    eng = make_engine(max_batch_size=1)
    running, queued = eng.enqueue_requests([make_request(out_len=5, max_tokens=5)] * 2)
    eng.step()
    eng.shutdown()
    done = finals(eng.await_responses())
    assert done[running].result.finish_reasons == [FinishReason.END_ID]
    assert done[queued].result.finish_reasons == [FinishReason.CANCELLED]
    assert not eng.can_enqueue_requests()
    with pytest.raises(ExecutorShutdownError):
        eng.enqueue_request(make_request())
    eng.shutdown()  # idempotent


def test_context_manager_shuts_down() -> None:
    with make_engine() as eng:
        eng.enqueue_request(make_request(out_len=3, max_tokens=3))
    assert len(finals(eng.await_responses())) == 1


def test_run_until_idles_the_gpus_through_gaps() -> None:
    engine = build_twin_engine()
    eng, gpus = engine
    assert eng.run_until(2.0) == 0
    assert eng.time.now_s() == 2.0
    idle_mj = gpus.total_energy_mj()
    assert idle_mj == pytest.approx(2.0 * 52.12 * 1000, rel=0.05)  # idle power, whole gap
    eng.enqueue_request(make_request(out_len=3, max_tokens=3))
    assert eng.run_until(3.0) == 3
    assert eng.time.now_s() == 3.0 and gpus.total_energy_mj() > idle_mj + 52_000


def test_virtual_runs_are_deterministic_per_seed() -> None:
    def run(seed: int) -> tuple[list[str], list[list[int]]]:
        eng = make_engine(seed=seed, latency_jitter=0.05)
        eng.enqueue_requests([make_request(64, max_tokens=300) for _ in range(6)])
        eng.run_until_idle()
        stats = [s.to_json_str() for s in eng.get_latest_iteration_stats()]
        tokens = [r.result.output_token_ids[0] for r in eng.await_responses()]
        return stats, tokens

    assert run(1) == run(1)
    assert run(1)[1] != run(2)[1]


def test_virtual_only_and_real_time_only_methods_are_guarded() -> None:
    from throttllem.backend.twin.errors import ConfigurationError

    with pytest.raises(ConfigurationError):
        make_engine().start()
    rt = build_twin_engine(mode="realtime", speedup=1000.0).executor
    try:
        with pytest.raises(ConfigurationError):
            rt.step()
    finally:
        rt.shutdown()


def test_public_api_names_exist() -> None:
    for name in executor_api.__all__:
        assert hasattr(executor_api, name), name
    assert ExecutorConfig().iter_stats_max_iterations == 1000
    assert ExecutorConfig().request_stats_max_iterations == 0
    assert IterationStats.static_batching_stats is None


@settings(max_examples=40, deadline=None)
@given(
    requests=st.lists(
        st.tuples(
            st.integers(1, 300),  # prompt
            st.integers(1, 200),  # max_tokens
            st.integers(1, 250),  # true length
            st.booleans(),  # streaming
            st.one_of(st.none(), st.integers(0, 150)),  # cancel after this many iterations
        ),
        min_size=1,
        max_size=12,
    ),
    policy=st.sampled_from(["GUARANTEED_NO_EVICT", "MAX_UTILIZATION"]),
    chunked=st.booleans(),
)
def test_every_request_ends_with_exactly_one_final_response(
    requests: list[tuple[int, int, int, bool, int | None]], policy: str, chunked: bool
) -> None:
    eng = build_twin_engine(
        max_num_blocks=12,
        tokens_per_block=32,
        policy=policy,
        max_batch_size=6,
        max_num_tokens=256,
        enable_chunked_context=chunked,
    ).executor
    ids = {}
    for prompt, max_tokens, true_len, streaming, cancel_at in requests:
        req = make_request(prompt, max_tokens, out_len=true_len, streaming=streaming)
        try:
            ids[eng.enqueue_request(req)] = (req, cancel_at)
        except RequestError:
            continue  # over max_num_tokens without chunking, or over the KV cache
    responses = []
    it = 0
    while True:
        for rid, (_, cancel_at) in ids.items():
            if cancel_at == it:
                eng.cancel_request(rid)
        stats = eng.step()
        responses += eng.await_responses()
        it += 1
        if stats is None and it > 150:
            break
        if stats is not None:
            kv = stats.kv_cache_stats
            assert 0 <= kv.used_num_blocks <= kv.max_num_blocks == 12
    done = finals(responses)
    assert set(done) == set(ids)
    assert eng.kv.used_blocks == 0
    for rid, (req, _) in ids.items():
        final = done[rid].result
        mine = [r for r in responses if r.request_id == rid]
        assert mine[-1] is done[rid]  # nothing after the final response
        reason = final.finish_reasons[0]
        if req.streaming:
            n = sum(len(r.result.output_token_ids[0]) for r in mine)
        else:
            n = len(final.output_token_ids[0]) - len(req.input_token_ids)
        expected = min(req.max_tokens, req.twin_output_len or 0)
        if reason is FinishReason.CANCELLED:
            assert n <= expected
        else:
            assert n == expected


# ---------------------------------------------------------------------- real time


def collect_finals(eng, ids: list[int], limit_s: float = 20.0) -> dict[int, Response]:  # type: ignore[no-untyped-def]
    """Wait on await_responses (with a timeout, never a sleep) until each id has ended."""
    out: dict[int, Response] = {}
    seen: list[Response] = []
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=limit_s)
    while len(out) < len(ids):
        assert datetime.datetime.now() < deadline, f"only {len(out)} of {len(ids)} ended"
        got = eng.await_responses(datetime.timedelta(milliseconds=200))
        seen += got
        out.update(finals(got))
    return out


def test_real_time_engine_answers_while_callers_wait() -> None:
    eng = build_twin_engine(mode="realtime", speedup=500.0, seed=3).executor
    try:
        ids = eng.enqueue_requests(
            [make_request(64, max_tokens=20, out_len=20, streaming=(i % 2 == 0)) for i in range(4)]
        )
        done = collect_finals(eng, ids)
        assert all(done[i].result.finish_reasons == [FinishReason.END_ID] for i in ids)
        # Simulated time moved at ~speedup x wall time; stats kept flowing.
        stats = eng.get_latest_iteration_stats()
        assert len(stats) >= 20 and stats[-1].end_s > stats[0].end_s
    finally:
        eng.shutdown()
    assert eng._thread is None  # joined


def test_await_without_timeout_blocks_until_a_response_in_real_time() -> None:
    eng = build_twin_engine(mode="realtime", speedup=1000.0).executor
    try:
        rid = eng.enqueue_request(make_request(max_tokens=2, out_len=2))
        got = eng.await_responses()  # no timeout: waits for the first response
        assert [r.request_id for r in got] == [rid]
    finally:
        eng.shutdown()


def test_real_time_cancel_and_shutdown() -> None:
    eng = build_twin_engine(mode="realtime", speedup=20.0, seed=4).executor
    rid = eng.enqueue_request(make_request(64, max_tokens=1000, out_len=1000, streaming=True))
    first = eng.await_responses(id=rid, timeout=datetime.timedelta(seconds=10))
    assert first and not first[0].result.is_final
    eng.cancel_request(rid)
    done = collect_finals(eng, [rid])
    assert done[rid].result.finish_reasons == [FinishReason.CANCELLED]
    eng.shutdown()
    with pytest.raises(ExecutorShutdownError):
        eng.enqueue_request(make_request())
