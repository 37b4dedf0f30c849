"""The twin behind the Engine interface, configured from config.pbtxt parameters."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from throttllem.backend.engines.base import EngineRequest, FinishReason, GpuControlError
from throttllem.backend.engines.executor_adapter import ExecutorAdapter
from throttllem.backend.engines.twin import build_twin_engine
from throttllem.backend.params import ParameterError, Parameters


@pytest.fixture
def engine() -> Iterator[ExecutorAdapter]:
    e = build_twin_engine(
        Parameters({"twin_speedup": "50", "twin_output_len": "5", "max_batch_size": "8",
                    "batch_scheduler_policy": "max_utilization", "twin_max_input_len": "256"})
    )  # fmt: skip
    yield e
    e.shutdown()


def run_to_end(engine: ExecutorAdapter, ids: set[int]) -> list[object]:
    out = []
    for _ in range(500):
        for r in engine.await_responses(0.05):
            out.append(r)
            if r.is_final:
                ids.discard(r.request_id)
        if not ids:
            return out
    raise AssertionError(f"requests {ids} never ended")


def test_parameters_reach_the_twin(engine: ExecutorAdapter) -> None:
    facts = engine.facts()
    assert facts.engine_kind == "twin" and facts.llm == "llama-3-8b"
    assert facts.gpu_name == "A100-SXM4-40GB" and facts.tp_size == 1
    assert facts.max_batch_size == 8 and facts.max_input_len == 256
    assert facts.scheduler_policy == "MAX_UTILIZATION" and facts.twin_speedup == 50.0
    assert facts.kv_max_blocks > 0


def test_tokens_flow_and_stats_drain(engine: ExecutorAdapter) -> None:
    rid = engine.enqueue(EngineRequest(input_token_ids=[1, 2, 3], max_tokens=20, streaming=True))
    responses = run_to_end(engine, {rid})
    assert len(responses) == 5  # twin_output_len: the twin "ends" after 5 tokens
    assert responses[-1].finish_reasons == [FinishReason.END_ID]  # type: ignore[attr-defined]
    stats = engine.drain_iteration_stats()
    assert stats and stats[-1].kv_used_blocks == 0
    assert engine.drain_iteration_stats() == []


def test_gpu_control_locks_and_resets(engine: ExecutorAdapter) -> None:
    control = engine.gpu_control()
    assert control is not None and control.gpu_indices() == [0]
    clocks = control.supported_clocks_mhz()
    control.set_locked_clocks(clocks[-1], clocks[len(clocks) // 2], [])
    reading = control.readings()[0]
    assert reading.power_limit_mw > 0 and reading.total_energy_mj >= 0
    with pytest.raises(GpuControlError) as info:
        control.set_locked_clocks(10, 20, [0])
    assert not info.value.permission and info.value.nvml_code == 2
    with pytest.raises(GpuControlError, match="GPU 5"):
        control.reset_locked_clocks([5])
    control.reset_locked_clocks([0])


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"twin_tp": "3"}, "twin_tp"),
        ({"twin_gpu": "Z80"}, "twin_gpu"),
        ({"twin_speedup": "-1"}, "twin_speedup"),
        ({"twin_tp": "2", "gpu_device_ids": "0"}, "gpu_device_ids"),
    ],
)
def test_bad_twin_parameters_are_named(params: dict[str, str], named: str) -> None:
    with pytest.raises(ParameterError, match=named):
        build_twin_engine(Parameters(params))
