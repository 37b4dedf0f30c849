"""The twin engine: the digital twin's executor (real-time mode) behind the Engine interface.

The twin implements TensorRT-LLM's executor API, so it goes through the same `ExecutorAdapter`
as the real executor, configured from the same config.pbtxt parameters (`executor_config` in
trtllm.py), plus the twin's own:

    twin_gpu        GPU preset name or a .yaml/.json file      (default A100-SXM4-40GB)
    twin_model      model preset name or a .yaml/.json file    (default llama-3-8b)
    twin_tp         tensor-parallel size                       (default 1)
    twin_speedup    simulated seconds per wall second          (default 1.0)
    twin_seed       seed of lengths, tokens and jitter         (default 0)
    twin_latency_jitter  relative per-iteration jitter, [0, 1) (default 0.02)
    twin_output_len every request generates exactly this many tokens (default: sampled from
                    the Azure conversation trace's length distribution)
    twin_max_input_len / twin_max_seq_len / twin_tokens_per_block   engine build limits

Unlike a real GPU, the twin's GPUs expose their clock surface to the controller through the
instance's GpuControl endpoint (`TwinGpuControl`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from ..params import ParameterError, Parameters
from ..twin import executor_api as twin_api
from ..twin.engine_profile import engine_profile
from ..twin.errors import NVML_ERROR_NO_PERMISSION, TwinError, TwinNvmlError
from ..twin.executor import TwinExecutor
from ..twin.gpu import TwinGpu, TwinGpuGroup
from ..twin.hardware import default_catalog, valid_tp_sizes
from ..twin.kv_cache import DEFAULT_TOKENS_PER_BLOCK
from ..twin.latency import LatencyModel
from ..twin.lengths import FixedLengths, LengthSampler
from ..twin.time_source import ScaledWallTime
from .base import EngineError, EngineFacts, GpuControlError, GpuReading
from .executor_adapter import ExecutorAdapter
from .trtllm import executor_config

logger = logging.getLogger(__name__)

DEFAULT_GPU = "A100-SXM4-40GB"
DEFAULT_MODEL = "llama-3-8b"
DEFAULT_JITTER = 0.02
# Wall seconds a clock lock lasts without renewal, and how often lapses are checked: a dead
# controller's lock is gone within CLOCK_LEASE_S + LEASE_CHECK_S of its last renewal.
CLOCK_LEASE_S = 1.5
LEASE_CHECK_S = 0.1


class TwinGpuControl:
    """The GpuControl surface over the twin's GPUs; indices are the engine's GPU indices.

    Locks are leased, as the clock daemon leases real ones: a lock lapses (the GPU goes back to
    its default clocks) `lease_s` wall seconds after the last set call, so a controller that
    dies, SIGKILL included, cannot leave the twin throttled. A live controller renews by
    repeating its set call (controller/gpu/remote_twin.py does, every LEASE_RENEW_S).
    """

    def __init__(
        self, gpus: Sequence[TwinGpu], indices: Sequence[int], lease_s: float = CLOCK_LEASE_S
    ) -> None:
        if len(gpus) != len(indices):
            raise ValueError("one index per GPU")
        self._by_index = dict(zip(indices, gpus, strict=True))
        self.lease_s = lease_s
        self._expires: dict[int, float] = {}  # GPU index -> monotonic time its lock lapses
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, name="twin clock lease", daemon=True)
        self._watchdog.start()

    def _watch(self) -> None:
        while not self._stop.wait(LEASE_CHECK_S):
            now = time.monotonic()
            with self._mutex:
                lapsed = [i for i, t in self._expires.items() if t <= now]
                for i in lapsed:
                    del self._expires[i]
            for i in lapsed:
                logger.warning("twin GPU %d: clock lease lapsed: back to default clocks", i)
                try:
                    self._by_index[i].reset_locked_clocks()
                except TwinNvmlError as e:
                    logger.warning("twin GPU %d: reset failed: %s", i, e)

    def close(self) -> None:
        self._stop.set()

    def gpu_indices(self) -> list[int]:
        return list(self._by_index)

    def _first(self) -> TwinGpu:
        return next(iter(self._by_index.values()))

    def supported_clocks_mhz(self) -> list[int]:
        return self._first().supported_clocks_mhz()

    def max_sm_clock_mhz(self) -> int:
        return self._first().max_sm_clock_mhz()

    def default_sm_clock_mhz(self) -> int:
        return self._first().default_sm_clock_mhz()

    def _each(self, indices: Sequence[int], call: str, args: tuple[int, ...]) -> None:
        for i in indices or self.gpu_indices():
            gpu = self._by_index.get(i)
            if gpu is None:
                raise GpuControlError(f"GPU {i} is not one of this engine's {self.gpu_indices()}")
            try:
                getattr(gpu, call)(*args)
            except TwinNvmlError as e:
                raise GpuControlError(
                    str(e), permission=e.code == NVML_ERROR_NO_PERMISSION, nvml_code=e.code
                ) from e

    def set_locked_clocks(self, min_mhz: int, max_mhz: int, indices: Sequence[int]) -> None:
        self._each(indices, "set_locked_clocks", (min_mhz, max_mhz))
        with self._mutex:
            until = time.monotonic() + self.lease_s
            for i in indices or self.gpu_indices():
                self._expires[i] = until

    def reset_locked_clocks(self, indices: Sequence[int]) -> None:
        self._each(indices, "reset_locked_clocks", ())
        with self._mutex:
            for i in indices or self.gpu_indices():
                self._expires.pop(i, None)

    def readings(self) -> list[GpuReading]:
        return [
            GpuReading(
                index=i,
                sm_clock_mhz=gpu.sm_clock_mhz(),
                locked_range_mhz=gpu.locked_clocks_mhz(),
                power_mw=gpu.power_usage_mw(),
                total_energy_mj=gpu.total_energy_mj(),
                power_limit_mw=gpu.enforced_power_limit_mw(),
            )
            for i, gpu in self._by_index.items()
        ]


def build_twin_engine(
    params: Parameters, model_config: Mapping[str, Any] | None = None
) -> ExecutorAdapter:
    """A real-time twin executor, started, configured from config.pbtxt parameters."""
    model_config = model_config or {}
    catalog = default_catalog()
    try:
        gpu_spec = catalog.gpu(params.get_str("twin_gpu") or DEFAULT_GPU)
        model = catalog.model(params.get_str("twin_model") or DEFAULT_MODEL)
    except TwinError as e:
        raise ParameterError(f"parameter 'twin_gpu'/'twin_model': {e}") from e
    tp = params.get_int("twin_tp", 1, minimum=1) or 1
    sizes = valid_tp_sizes(gpu_spec, model)
    if tp not in sizes:
        raise ParameterError(
            f"parameter 'twin_tp': {model.name} does not fit {tp} x {gpu_spec.name}; "
            f"valid: {', '.join(map(str, sizes)) or 'none'}"
        )
    speedup = params.get_float("twin_speedup", 1.0) or 1.0
    if speedup <= 0:
        raise ParameterError(f"parameter 'twin_speedup': must be > 0, got {speedup}")
    seed = params.get_int("twin_seed", 0) or 0
    jitter = params.get_float("twin_latency_jitter", DEFAULT_JITTER, minimum=0.0)
    fixed_len = params.get_int("twin_output_len", minimum=1)
    lengths: LengthSampler | None = FixedLengths(fixed_len) if fixed_len else None
    tokens_per_block = (
        params.get_int("twin_tokens_per_block", DEFAULT_TOKENS_PER_BLOCK, minimum=1)
        or DEFAULT_TOKENS_PER_BLOCK
    )
    indices = params.get_int_list("gpu_device_ids") or list(range(tp))
    if len(indices) != tp:
        raise ParameterError(
            f"parameter 'gpu_device_ids': {len(indices)} ids for twin_tp={tp}; give one per GPU"
        )

    config = executor_config(params, model_config, twin_api)
    time = ScaledWallTime(speedup)
    gpus = [TwinGpu(gpu_spec, time, index=i) for i in indices]
    try:
        executor = TwinExecutor(
            model,
            TwinGpuGroup(gpus),
            config,
            tp=tp,
            time=time,
            latency=LatencyModel(gpu_spec, model, tp, engine_profile()),
            seed=seed,
            lengths=lengths,
            tokens_per_block=tokens_per_block,
            max_input_len=params.get_int("twin_max_input_len", minimum=1),
            max_seq_len=params.get_int("twin_max_seq_len", minimum=1),
            latency_jitter=jitter or 0.0,
        )
    except TwinError as e:
        raise EngineError(f"twin engine: {e}") from e
    executor.start()
    facts = EngineFacts(
        engine_kind="twin",
        llm=model.name,
        gpu_name=gpu_spec.name,
        tp_size=tp,
        gpu_indices=list(indices),
        max_batch_size=executor.limits.max_batch_size,
        max_num_tokens=executor.limits.max_num_tokens,
        max_input_len=executor.max_input_len,
        max_seq_len=executor.max_seq_len,
        kv_max_blocks=executor.kv.max_num_blocks,
        kv_tokens_per_block=tokens_per_block,
        scheduler_policy=executor.limits.policy.name,
        max_beam_width=1,
        twin_speedup=speedup,
    )
    logger.info(
        "twin engine: %s TP%d on %s, speed-up %.3g, %d KV blocks of %d tokens",
        model.name, tp, gpu_spec.name, speedup, facts.kv_max_blocks, tokens_per_block,
    )  # fmt: skip
    return ExecutorAdapter(executor, twin_api, facts, gpu_control=TwinGpuControl(gpus, indices))
