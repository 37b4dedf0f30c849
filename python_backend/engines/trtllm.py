"""The TensorRT-LLM engine: the real executor, configured from config.pbtxt as the reference model
(tensorrtllm_backend's `tensorrt_llm` Python model) reads its parameters.

Imported only when `engine` is `tensorrtllm`; `tensorrt_llm` itself is imported inside
`build_trtllm_engine`, so this module loads on machines without it (for the unit tests, which pass
a stand-in `api`). Unlike the reference model, iteration statistics are always enabled
(`iter_stats_max_iterations`, default 1000): the controller lives on them.

The real GPUs' state (SM clock, power, energy) is read for the model's metrics through NVML,
read-only, by `gpu_state.NvmlGpuState` on the engine's `gpu_device_ids` (default 0..tp-1).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from ..params import ParameterError, Parameters
from .base import EngineError, EngineFacts
from .executor_adapter import ExecutorAdapter, construct

logger = logging.getLogger(__name__)

DEFAULT_ITER_STATS_MAX_ITERATIONS = 1000

_POLICIES = {"max_utilization": "MAX_UTILIZATION", "guaranteed_no_evict": "GUARANTEED_NO_EVICT"}
_BATCHING = {"inflight_fused_batching": "INFLIGHT", "inflight_batching": "INFLIGHT", "v1": "STATIC"}
_DECODING = {
    "auto": "Auto", "top_k": "TopK", "top_p": "TopP", "top_k_top_p": "TopKTopP",
    "beam_search": "BeamSearch", "medusa": "Medusa", "redrafter": "ExplicitDraftTokens",
    "lookahead": "Lookahead", "eagle": "Eagle",
}  # fmt: skip


def _drop_none(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if v is not None}


def scheduler_config(params: Parameters, api: Any) -> Any:
    policy = params.get_str("batch_scheduler_policy")
    if policy is None:
        return api.SchedulerConfig()
    name = _POLICIES.get(policy.lower())
    if name is None:
        raise ParameterError(
            f"parameter 'batch_scheduler_policy': {policy!r} is not one of "
            f"{', '.join(sorted(_POLICIES))}"
        )
    return api.SchedulerConfig(getattr(api.CapacitySchedulerPolicy, name))


def kv_cache_config(params: Parameters, api: Any) -> Any:
    kwargs = _drop_none(
        {
            "enable_block_reuse": params.get_bool("enable_kv_cache_reuse"),
            "max_tokens": params.get_int("max_tokens_in_paged_kv_cache", minimum=1),
            "sink_token_length": params.get_int("sink_token_length", minimum=0),
            "free_gpu_memory_fraction": params.get_float(
                "kv_cache_free_gpu_mem_fraction", minimum=0.0
            ),
            "cross_kv_cache_fraction": params.get_float("cross_kv_cache_fraction", minimum=0.0),
            "host_cache_size": params.get_int("kv_cache_host_memory_bytes", minimum=0),
            "onboard_blocks": params.get_bool("kv_cache_onboard_blocks"),
            "max_attention_window": params.get_int_list("max_attention_window_size"),
        }
    )
    return construct(api.KvCacheConfig, (), kwargs)


def parallel_config(params: Parameters, api: Any) -> Any:
    kwargs: dict[str, Any] = {}
    device_ids = params.get_int_list("gpu_device_ids")
    if device_ids:
        kwargs["device_ids"] = device_ids
    if os.environ.get("TRTLLM_ORCHESTRATOR", "0") == "1":
        kwargs["communication_mode"] = api.CommunicationMode.ORCHESTRATOR
        kwargs["orchestrator_config"] = api.OrchestratorConfig(
            True, params.get_str("executor_worker_path")
        )
    return construct(api.ParallelConfig, (), kwargs) if kwargs else None


def peft_cache_config(params: Parameters, api: Any) -> Any:
    kwargs = _drop_none(
        {
            "optimal_adapter_size": params.get_int("lora_cache_optimal_adapter_size"),
            "max_adapter_size": params.get_int("lora_cache_max_adapter_size"),
            "device_cache_percent": params.get_float("lora_cache_gpu_memory_fraction"),
            "host_cache_size": params.get_int("lora_cache_host_memory_bytes"),
        }
    )
    if not kwargs or not hasattr(api, "PeftCacheConfig"):
        return None
    return construct(api.PeftCacheConfig, (), kwargs)


def decoding_config(params: Parameters, api: Any) -> Any:
    mode = params.get_str("decoding_mode")
    medusa = params.get_str("medusa_choices")
    if mode is None and medusa is None:
        return None
    kwargs: dict[str, Any] = {}
    if mode is not None:
        factory = _DECODING.get(mode)
        if factory is None:
            raise ParameterError(
                f"parameter 'decoding_mode': {mode!r} is not one of {', '.join(sorted(_DECODING))}"
            )
        kwargs["decoding_mode"] = getattr(api.DecodingMode, factory)()
    if medusa is not None:
        try:
            choices = json.loads("[" + medusa.replace("{", "[").replace("}", "]") + "]")
        except ValueError:
            raise ParameterError(f"parameter 'medusa_choices': unreadable {medusa!r}") from None
        kwargs["medusa_choices"] = choices
    return construct(api.DecodingConfig, (), kwargs)


def batching_type(params: Parameters, api: Any) -> Any:
    value = params.get_str("gpt_model_type")
    if value is None:
        return None
    name = _BATCHING.get(value.lower())
    if name is None:
        raise ParameterError(
            f"parameter 'gpt_model_type': {value!r} is not one of {', '.join(sorted(_BATCHING))}"
        )
    return getattr(api.BatchingType, name)


def executor_config(params: Parameters, model_config: Mapping[str, Any], api: Any) -> Any:
    """The ExecutorConfig the reference model builds, with iteration statistics enabled."""
    queue = (model_config.get("dynamic_batching") or {}).get("default_queue_policy") or {}
    max_queue = queue.get("max_queue_size")
    kwargs = _drop_none(
        {
            "max_beam_width": params.get_int("max_beam_width", minimum=1),
            "scheduler_config": scheduler_config(params, api),
            "kv_cache_config": kv_cache_config(params, api),
            "enable_chunked_context": params.get_bool("enable_chunked_context"),
            "normalize_log_probs": params.get_bool("normalize_log_probs"),
            "batching_type": batching_type(params, api),
            "parallel_config": parallel_config(params, api),
            "peft_cache_config": peft_cache_config(params, api),
            "decoding_config": decoding_config(params, api),
            "max_queue_size": None if max_queue is None else int(max_queue),
            "iter_stats_max_iterations": params.get_int(
                "iter_stats_max_iterations", DEFAULT_ITER_STATS_MAX_ITERATIONS, minimum=1
            ),
            "request_stats_max_iterations": params.get_int(
                "request_stats_max_iterations", minimum=0
            ),
            "max_batch_size": params.get_int("max_batch_size", minimum=1),
            "max_num_tokens": params.get_int("max_num_tokens", minimum=1),
        }
    )
    return construct(api.ExecutorConfig, (), kwargs)


def engine_facts(engine_dir: Path, params: Parameters) -> EngineFacts:
    """What the engine's build config (`config.json` in the engine directory) says."""
    cfg: dict[str, Any] = {}
    path = engine_dir / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        logger.warning("cannot read %s (%s): engine limits unknown", path, e)
    build = cfg.get("build_config") or {}
    plugin = build.get("plugin_config") or {}
    pretrained = cfg.get("pretrained_config") or {}
    mapping = pretrained.get("mapping") or {}
    tp = int(mapping.get("tp_size") or 1)
    devices = params.get_int_list("gpu_device_ids") or list(range(tp))
    policy = (params.get_str("batch_scheduler_policy") or "guaranteed_no_evict").upper()
    return EngineFacts(
        engine_kind="tensorrtllm",
        llm=str(engine_dir),
        gpu_name="",
        tp_size=tp,
        gpu_indices=devices,
        max_batch_size=int(params.get_int("max_batch_size") or build.get("max_batch_size") or 0),
        max_num_tokens=int(params.get_int("max_num_tokens") or build.get("max_num_tokens") or 0),
        max_input_len=int(build.get("max_input_len") or 0),
        max_seq_len=int(build.get("max_seq_len") or 0),
        kv_tokens_per_block=int(plugin.get("tokens_per_block") or 0),
        scheduler_policy=policy,
        max_beam_width=int(params.get_int("max_beam_width") or build.get("max_beam_width") or 1),
    )


def import_bindings() -> ModuleType:
    try:
        import tensorrt_llm.bindings.executor as trtllm  # type: ignore[import-not-found]
    except ImportError as e:
        raise EngineError(
            f"engine 'tensorrtllm' needs TensorRT-LLM, which cannot be imported here ({e}); "
            "use an NGC tritonserver *-trtllm-python-py3 image, or set engine to 'twin'"
        ) from e
    module: ModuleType = trtllm
    return module


def build_trtllm_engine(
    params: Parameters, model_config: Mapping[str, Any], api: Any | None = None
) -> ExecutorAdapter:
    """The real executor on the engine in `gpt_model_path`, wrapped as an Engine.

    On a non-leader rank (`can_enqueue_requests()` is False) the executor is shut down at once,
    which blocks until the leader is done, as the reference model does; the adapter it returns
    then reports `can_enqueue() == False` and the model serves nothing.
    """
    engine_dir = Path(params.require_str("gpt_model_path"))
    if params.get_bool("enable_trt_overlap"):
        raise ParameterError("parameter 'enable_trt_overlap': true is not supported")
    api = api if api is not None else import_bindings()
    config = executor_config(params, model_config, api)
    facts = engine_facts(engine_dir, params)
    try:
        executor = api.Executor(str(engine_dir), api.ModelType.DECODER_ONLY, config)
    except Exception as e:
        raise EngineError(f"TensorRT-LLM executor on {engine_dir} failed to start: {e}") from e
    adapter = ExecutorAdapter(executor, api, facts)
    if not adapter.can_enqueue():
        adapter.shutdown()
    return adapter
