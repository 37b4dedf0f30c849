"""One call that assembles a twin engine: presets -> GPUs -> latency model -> executor."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, NamedTuple

from .engine_profile import EngineProfile, engine_profile
from .errors import ConfigurationError
from .executor import TwinExecutor
from .executor_api import CapacitySchedulerPolicy, ExecutorConfig, SchedulerConfig
from .gpu import TwinGpu, TwinGpuGroup
from .hardware import Catalog, GpuSpec, ModelSpec, default_catalog, valid_tp_sizes
from .kv_cache import DEFAULT_TOKENS_PER_BLOCK
from .latency import LatencyModel
from .lengths import LengthSampler
from .time_source import ScaledWallTime, TimeSource, VirtualTime

_CONFIG_FIELDS = {f.name for f in dataclasses.fields(ExecutorConfig)}


class TwinEngine(NamedTuple):
    executor: TwinExecutor
    gpus: TwinGpuGroup


def scheduler_policy(value: CapacitySchedulerPolicy | str) -> CapacitySchedulerPolicy:
    """A policy from its enum or its name (any case); ConfigurationError naming the valid ones."""
    if isinstance(value, CapacitySchedulerPolicy):
        return value
    try:
        return CapacitySchedulerPolicy[value.upper()]
    except KeyError:
        valid = ", ".join(p.name for p in CapacitySchedulerPolicy)
        raise ConfigurationError(f"unknown scheduler policy '{value}'; valid: {valid}") from None


def build_twin_engine(
    gpu: str | GpuSpec = "A100-SXM4-40GB",
    model: str | ModelSpec = "llama-3-8b",
    tp: int = 1,
    *,
    mode: Literal["virtual", "realtime"] = "virtual",
    speedup: float = 1.0,
    seed: int = 0,
    profile: str | EngineProfile = "tensorrt-llm",
    lengths: LengthSampler | None = None,
    tokens_per_block: int = DEFAULT_TOKENS_PER_BLOCK,
    max_num_blocks: int | None = None,
    clock_change_latency_ms: float = 10.0,
    privileged: bool = True,
    latency_jitter: float = 0.0,
    policy: CapacitySchedulerPolicy | str | None = None,
    config: ExecutorConfig | None = None,
    catalog: Catalog | None = None,
    **config_fields: Any,
) -> TwinEngine:
    """A twin engine on `tp` GPUs. `config_fields` override ExecutorConfig fields
    (max_batch_size=64, enable_chunked_context=True, ...); `policy` sets the capacity scheduler
    policy. In "realtime" mode the engine thread is already running, `speedup` simulated seconds
    per wall second."""
    catalog = catalog or default_catalog()
    gpu_spec = gpu if isinstance(gpu, GpuSpec) else catalog.gpu(gpu)
    model_spec = model if isinstance(model, ModelSpec) else catalog.model(model)
    valid = valid_tp_sizes(gpu_spec, model_spec)
    if tp not in valid:
        raise ConfigurationError(
            f"tp={tp} does not fit {model_spec.name} on {gpu_spec.name}; valid: "
            f"{', '.join(map(str, valid)) or 'none'}"
        )
    unknown = sorted(set(config_fields) - _CONFIG_FIELDS)
    if unknown:
        valid_fields = ", ".join(sorted(_CONFIG_FIELDS))
        raise ConfigurationError(
            f"unknown executor setting(s) {', '.join(unknown)}; valid: {valid_fields}"
        )
    config = dataclasses.replace(config or ExecutorConfig(), **config_fields)
    if policy is not None:
        config.scheduler_config = SchedulerConfig(scheduler_policy(policy))
    if mode == "virtual":
        time: TimeSource = VirtualTime()
    elif mode == "realtime":
        time = ScaledWallTime(speedup)
    else:
        raise ConfigurationError(f"unknown mode '{mode}'; valid: virtual, realtime")
    gpus = TwinGpuGroup(
        [
            TwinGpu(
                gpu_spec,
                time,
                index=i,
                clock_change_latency_ms=clock_change_latency_ms,
                privileged=privileged,
            )
            for i in range(tp)
        ]
    )
    prof = profile if isinstance(profile, EngineProfile) else engine_profile(profile)
    executor = TwinExecutor(
        model_spec,
        gpus,
        config,
        tp=tp,
        time=time,
        latency=LatencyModel(gpu_spec, model_spec, tp, prof),
        seed=seed,
        lengths=lengths,
        tokens_per_block=tokens_per_block,
        max_num_blocks=max_num_blocks,
        latency_jitter=latency_jitter,
    )
    if mode == "realtime":
        executor.start()
    return TwinEngine(executor, gpus)
