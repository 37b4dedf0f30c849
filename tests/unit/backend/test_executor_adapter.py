"""The TensorRT-LLM adapter against a stand-in executor with the real API's names and semantics."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import pytest
import trtllm_standin as standin

from throttllem.backend.engines.base import EngineRequest, FinishReason, SamplingParams
from throttllem.backend.engines.executor_adapter import (
    ExecutorAdapter,
    convert_iteration_stats,
    parse_timestamp_ns,
)
from throttllem.backend.engines.trtllm import build_trtllm_engine, executor_config
from throttllem.backend.params import ParameterError, Parameters


def _engine_dir(tmp_path: Path) -> Path:
    build = {
        "build_config": {
            "max_batch_size": 32, "max_input_len": 1024, "max_seq_len": 2048,
            "max_num_tokens": 4096, "max_beam_width": 1, "plugin_config": {"tokens_per_block": 64},
        },
        "pretrained_config": {"mapping": {"tp_size": 2}},
    }  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(build))
    return tmp_path


def _build(tmp_path: Path, extra: dict[str, str] | None = None, **kw: Any) -> ExecutorAdapter:
    params = Parameters({"gpt_model_path": str(_engine_dir(tmp_path)), **(extra or {})})
    api = kw.get("api", standin.module())
    return build_trtllm_engine(params, kw.get("model_config", {}), api=api)


def test_executor_config_reads_the_reference_parameters_and_enables_iteration_stats() -> None:
    params = Parameters(
        {
            "batch_scheduler_policy": "max_utilization",
            "kv_cache_free_gpu_mem_fraction": "0.85",
            "enable_kv_cache_reuse": "false",
            "enable_chunked_context": "true",
            "max_beam_width": "${max_beam_width}",  # unfilled template: unset
            "max_tokens_in_paged_kv_cache": "",
        }
    )
    model_config = {"dynamic_batching": {"default_queue_policy": {"max_queue_size": 7}}}
    cfg = executor_config(params, model_config, standin.module())
    assert cfg.iter_stats_max_iterations == 1000  # the reference model leaves it at 0 / unset
    assert cfg.scheduler_config.capacity_scheduler_policy is (
        standin.CapacitySchedulerPolicy.MAX_UTILIZATION
    )
    assert cfg.kv_cache_config.free_gpu_memory_fraction == pytest.approx(0.85)
    assert cfg.kv_cache_config.enable_block_reuse is False
    assert cfg.kv_cache_config.max_tokens is None
    assert cfg.enable_chunked_context is True
    assert cfg.max_beam_width == 1
    assert cfg.max_queue_size == 7


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("batch_scheduler_policy", "fastest"),
        ("kv_cache_free_gpu_mem_fraction", "lots"),
        ("enable_chunked_context", "maybe"),
        ("iter_stats_max_iterations", "0"),
    ],
)
def test_bad_parameters_name_the_parameter(name: str, value: str) -> None:
    with pytest.raises(ParameterError, match=name):
        executor_config(Parameters({name: value}), {}, standin.module())


def test_engine_facts_come_from_the_engine_build_config(tmp_path: Path) -> None:
    engine = _build(tmp_path, {"iter_stats_max_iterations": "50"})
    facts = engine.facts()
    assert facts.engine_kind == "tensorrtllm"
    assert (facts.max_batch_size, facts.max_input_len, facts.max_seq_len) == (32, 1024, 2048)
    assert facts.tp_size == 2 and facts.gpu_indices == [0, 1]
    assert facts.kv_tokens_per_block == 64
    executor = engine.executor
    assert executor.engine_dir == str(tmp_path)
    assert executor.config.iter_stats_max_iterations == 50


def test_requests_pass_max_tokens_by_keyword_and_sampling_through(tmp_path: Path) -> None:
    engine = _build(tmp_path)
    request = EngineRequest(
        input_token_ids=[5, 6, 7],
        max_tokens=4,
        streaming=True,
        end_id=2,
        stop_words=[[9, 9]],
        sampling=SamplingParams(temperature=0.7, top_k=5, seed=11, min_tokens=2),
        exclude_input_from_output=True,
        return_perf_metrics=True,
    )
    built = engine.build_request(request)
    assert built.max_tokens == 4 and built.input_token_ids == [5, 6, 7]
    assert built.end_id == 2 and built.stop_words == [[9, 9]] and built.pad_id is None
    assert built.sampling_config.temperature == pytest.approx(0.7)
    assert built.sampling_config.seed == 11 and built.sampling_config.min_tokens == 2
    assert built.output_config.exclude_input_from_output is True
    assert built.output_config.return_perf_metrics is True


def test_old_sampling_names_are_used_when_the_new_ones_are_refused(tmp_path: Path) -> None:
    engine = _build(tmp_path, api=standin.module(old=True))
    sampling = SamplingParams(seed=3, min_tokens=2)
    built = engine.build_request(
        EngineRequest(input_token_ids=[1], max_tokens=1, sampling=sampling)
    )
    assert built.sampling_config.random_seed == 3
    assert built.sampling_config.min_length == 2


def test_streaming_responses_and_final_flags(tmp_path: Path) -> None:
    engine = _build(tmp_path)
    rid = engine.enqueue(EngineRequest(input_token_ids=[1, 2], max_tokens=3, streaming=True))
    executor = engine.executor
    got = []
    for _ in range(3):
        executor.step()
        got += engine.await_responses(0.001)
    assert [r.request_id for r in got] == [rid] * 3
    assert [r.is_final for r in got] == [False, False, True]
    assert [r.output_token_ids for r in got] == [[[1001]], [[1002]], [[1003]]]
    assert got[-1].finish_reasons == [FinishReason.LENGTH]
    assert executor.await_timeouts[0] == datetime.timedelta(milliseconds=1)


def test_error_responses_are_final_and_carry_the_message(tmp_path: Path) -> None:
    engine = _build(tmp_path)
    rid = engine.enqueue(EngineRequest(input_token_ids=[1], max_tokens=5))
    engine.executor.fail(rid, "out of memory")
    (response,) = engine.await_responses(0.001)
    assert response.is_final and response.error == "out of memory"
    assert response.output_token_ids == []


def test_cancel_ends_with_a_cancelled_final(tmp_path: Path) -> None:
    engine = _build(tmp_path)
    rid = engine.enqueue(EngineRequest(input_token_ids=[1], max_tokens=50, streaming=True))
    engine.executor.step()
    engine.cancel(rid)
    engine.executor.step()
    responses = engine.await_responses(0.001)
    assert responses[-1].is_final
    assert responses[-1].finish_reasons == [FinishReason.CANCELLED]


def test_iteration_stats_are_drained_not_peeked(tmp_path: Path) -> None:
    engine = _build(tmp_path, {"iter_stats_max_iterations": "2"})
    engine.enqueue(EngineRequest(input_token_ids=[1], max_tokens=10))
    for _ in range(3):
        engine.executor.step()
    first = engine.drain_iteration_stats()
    # The queue is bounded: of 3 iterations, the newest 2 are kept.
    assert [s.iter for s in first] == [2, 3]
    assert engine.drain_iteration_stats() == []
    stat = first[-1]
    assert stat.iter_latency_ms == pytest.approx(12.5)
    assert stat.num_queued_requests == 3
    assert (stat.kv_used_blocks, stat.kv_max_blocks, stat.kv_tokens_per_block) == (1, 100, 64)
    assert engine.facts().kv_max_blocks == 100  # learnt from the stats


def test_stats_of_an_old_version_lack_fields_without_failing() -> None:
    stat = convert_iteration_stats(standin.iteration_stats(4, active=2, used_blocks=3, old=True))
    assert stat.iter_latency_ms is None and stat.num_queued_requests is None
    assert stat.num_completed_requests is None
    assert stat.timestamp_unix_ns == 0  # empty timestamp
    assert stat.num_gen_requests == 2 and stat.kv_used_blocks == 3


def test_timestamps_parse_to_unix_nanoseconds() -> None:
    ns = parse_timestamp_ns("01-02-2025 03:04:05.250000")
    expected = datetime.datetime(2025, 1, 2, 3, 4, 5, 250000).timestamp()
    assert ns == int(expected * 1e6) * 1000
    assert parse_timestamp_ns("garbage") == 0


def test_a_non_leader_rank_shuts_its_executor_down(tmp_path: Path) -> None:
    class Follower(standin.Executor):
        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            self.leader = False

    api = standin.module()
    api.Executor = Follower
    engine = _build(tmp_path, api=api)
    assert engine.executor.shut_down
    assert not engine.can_enqueue()


def test_missing_engine_dir_parameter_is_named() -> None:
    with pytest.raises(ParameterError, match="gpt_model_path"):
        build_trtllm_engine(Parameters({}), {}, api=standin.module())
