"""GPU and model descriptions, their presets, and loading user-supplied ones from YAML or JSON.

A GPU is datasheet facts plus a few physics constants (efficiencies, power coefficients) that are
global per board, never per dataset. A model is its public architecture numbers. Presets live in
`presets/*.yaml` beside this module, in the same schema a user's own file uses.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import ConfigurationError, SpecError

FP16_BYTES = 2


@dataclass(frozen=True)
class GpuPhysics:
    """Per-board constants of the latency and power models (see latency.py and power.py)."""

    mem_efficiency: float  # share of peak HBM bandwidth a weight-streaming GEMM reaches
    compute_efficiency: float  # share of peak tensor FLOP/s a large GEMM reaches
    attention_efficiency: float  # share of peak tensor FLOP/s of (flash) attention
    issue_knee_mhz: float  # below this SM clock, memory-bound kernels become issue-bound
    kernel_floor_us: float  # GPU time of the smallest kernel at max clock (launch + tail)
    kernels_per_layer: int  # kernels one transformer layer launches per iteration
    allreduce_latency_us: float  # fixed cost of one tensor-parallel all-reduce
    static_active_w: float  # power above idle whenever kernels run, at max clock
    core_dynamic_w: float  # SM dynamic power at max clock and full compute activity
    mem_dynamic_w: float  # HBM + memory-path power at full bandwidth
    voltage_floor_ratio: float  # core voltage at the lowest clocks, relative to max clock
    voltage_knee_mhz: float  # voltage is flat below this clock and rises linearly above
    locked_idle_w: float  # extra power of an idle GPU held at max clock (clock tree, voltage)


@dataclass(frozen=True)
class GpuSpec:
    """One GPU board: datasheet facts (units in the names) and its physics constants."""

    name: str
    memory_gib: float
    mem_bandwidth_gb_s: float
    peak_fp16_tflops: float  # dense, at max SM clock
    num_sms: int
    max_sm_clock_mhz: int
    min_sm_clock_mhz: int
    clock_step_mhz: int
    default_app_clock_mhz: int
    memory_clock_mhz: int
    power_limit_w: float
    min_power_limit_w: float
    idle_power_w: float  # measured at the idle clock, nothing resident
    nvlink_gb_s: float  # per GPU, per direction
    physics: GpuPhysics

    def supported_clocks_mhz(self) -> list[int]:
        """SM clocks the board accepts, highest first (the order NVML lists them in)."""
        return list(range(self.max_sm_clock_mhz, self.min_sm_clock_mhz - 1, -self.clock_step_mhz))


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only transformer (Llama family: gated MLP, RMSNorm, GQA), fp16 weights."""

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    max_context: int
    tied_embeddings: bool = False
    dtype_bytes: int = FP16_BYTES

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def layer_params(self) -> int:
        """Weights of one layer: attention projections, gated MLP and two norms."""
        h = self.hidden_size
        attn = 2 * h * h + 2 * h * self.kv_dim
        mlp = 3 * h * self.intermediate_size
        return attn + mlp + 2 * h

    def total_params(self) -> int:
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tied_embeddings else 2)
        return self.num_layers * self.layer_params() + embeddings + self.hidden_size

    def weight_bytes(self) -> int:
        return self.total_params() * self.dtype_bytes

    def kv_bytes_per_token(self) -> int:
        """K and V of one token across all layers (whole model, before tensor parallelism)."""
        return 2 * self.num_layers * self.kv_dim * self.dtype_bytes


# Memory a TensorRT-LLM engine keeps for activations, workspace and the CUDA context, per GPU.
RUNTIME_RESERVE_GIB = 3.0
# Share of the memory left after weights that TensorRT-LLM gives the KV cache by default
# (KvCacheConfig.free_gpu_memory_fraction = 0.9).
DEFAULT_KV_FREE_FRACTION = 0.9


def kv_cache_blocks(
    gpu: GpuSpec,
    model: ModelSpec,
    tp: int,
    tokens_per_block: int,
    free_gpu_memory_fraction: float = DEFAULT_KV_FREE_FRACTION,
) -> int:
    """KV-cache blocks that fit per engine (every GPU of a TP group holds its shard of each)."""
    free = fits_free_bytes(gpu, model, tp)
    block_bytes_per_gpu = model.kv_bytes_per_token() * tokens_per_block / tp
    return int(free * free_gpu_memory_fraction // block_bytes_per_gpu)


def fits_free_bytes(gpu: GpuSpec, model: ModelSpec, tp: int) -> float:
    """Bytes per GPU left after weights and runtime reserve; ConfigurationError if none."""
    total = gpu.memory_gib * 2**30
    weights = model.weight_bytes() / tp
    free = total - weights - RUNTIME_RESERVE_GIB * 2**30
    if free <= 0:
        raise ConfigurationError(
            f"{model.name} does not fit on {tp} x {gpu.name}: "
            f"{weights / 2**30:.1f} GiB of weights per GPU of {gpu.memory_gib:g} GiB; "
            f"valid TP sizes: {valid_tp_sizes(gpu, model) or 'none'}"
        )
    return free


def valid_tp_sizes(gpu: GpuSpec, model: ModelSpec) -> list[int]:
    """TP sizes (1, 2, 4, 8) whose weight shard leaves room for a KV cache."""
    out = []
    for tp in (1, 2, 4, 8):
        if model.num_kv_heads % tp and tp % model.num_kv_heads:
            continue
        free = gpu.memory_gib * 2**30 - model.weight_bytes() / tp - RUNTIME_RESERVE_GIB * 2**30
        # A KV cache smaller than one full-context sequence is not a usable engine.
        if free * DEFAULT_KV_FREE_FRACTION >= model.kv_bytes_per_token() * model.max_context / tp:
            out.append(tp)
    return out


_T = TypeVar("_T")


def _build(cls: type[_T], data: Mapping[str, Any], where: str) -> _T:
    """Build a dataclass from a mapping, naming any missing, unknown or ill-typed field."""
    if not isinstance(data, Mapping):
        raise SpecError(f"{where}: expected a mapping of fields, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise SpecError(f"{where}: unknown field(s) {', '.join(unknown)}")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in data:
            no_default = (
                f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            )
            if no_default:
                raise SpecError(f"{where}: missing field '{name}'")
            continue
        kwargs[name] = _coerce(f.type, data[name], f"{where}.{name}")
    return cls(**kwargs)


def _coerce(type_name: Any, value: Any, where: str) -> Any:
    kind = type_name if isinstance(type_name, str) else getattr(type_name, "__name__", "")
    if kind == "GpuPhysics":
        return _build(GpuPhysics, value, where)
    if kind == "str":
        if not isinstance(value, str) or not value:
            raise SpecError(f"{where}: expected a non-empty string, got {value!r}")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise SpecError(f"{where}: expected true or false, got {value!r}")
        return value
    if kind in ("int", "float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpecError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value) or value < 0:
            raise SpecError(f"{where}: expected a finite, non-negative number, got {value!r}")
        if kind == "int":
            if value != int(value):
                raise SpecError(f"{where}: expected a whole number, got {value!r}")
            return int(value)
        return float(value)
    raise SpecError(f"{where}: unsupported field type {kind}")  # pragma: no cover


def _check_gpu(spec: GpuSpec, where: str) -> GpuSpec:
    positive = (
        "memory_gib",
        "mem_bandwidth_gb_s",
        "peak_fp16_tflops",
        "num_sms",
        "max_sm_clock_mhz",
        "min_sm_clock_mhz",
        "clock_step_mhz",
        "power_limit_w",
    )
    for name in positive:
        if getattr(spec, name) <= 0:
            raise SpecError(f"{where}.{name}: must be positive")
    if spec.min_sm_clock_mhz > spec.max_sm_clock_mhz:
        raise SpecError(f"{where}.min_sm_clock_mhz: above max_sm_clock_mhz")
    if (spec.max_sm_clock_mhz - spec.min_sm_clock_mhz) % spec.clock_step_mhz:
        raise SpecError(f"{where}.clock_step_mhz: does not divide the clock range")
    if spec.idle_power_w >= spec.power_limit_w:
        raise SpecError(f"{where}.idle_power_w: must be below power_limit_w")
    for name in ("mem_efficiency", "compute_efficiency", "attention_efficiency"):
        value = getattr(spec.physics, name)
        if not 0 < value <= 1:
            raise SpecError(f"{where}.physics.{name}: must be in (0, 1], got {value}")
    return spec


def _check_model(spec: ModelSpec, where: str) -> ModelSpec:
    for name in (
        "num_layers",
        "hidden_size",
        "num_heads",
        "num_kv_heads",
        "intermediate_size",
        "vocab_size",
        "max_context",
        "dtype_bytes",
    ):
        if getattr(spec, name) <= 0:
            raise SpecError(f"{where}.{name}: must be positive")
    if spec.hidden_size % spec.num_heads:
        raise SpecError(f"{where}.hidden_size: not a multiple of num_heads")
    if spec.num_heads % spec.num_kv_heads:
        raise SpecError(f"{where}.num_kv_heads: must divide num_heads")
    return spec


def gpu_from_mapping(data: Mapping[str, Any], where: str = "gpu") -> GpuSpec:
    return _check_gpu(_build(GpuSpec, data, where), where)


def model_from_mapping(data: Mapping[str, Any], where: str = "model") -> ModelSpec:
    return _check_model(_build(ModelSpec, data, where), where)


def _read_mapping(path: Path) -> Any:
    try:
        text = path.read_text()
    except OSError as e:
        raise SpecError(f"{path}: cannot read ({e.strerror})") from e
    try:
        return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        kind = "JSON" if path.suffix == ".json" else "YAML"
        raise SpecError(f"{path}: not valid {kind}: {e}") from e


def load_gpu_file(path: str | Path) -> GpuSpec:
    """A user's GPU description: one GpuSpec mapping in YAML or JSON."""
    return gpu_from_mapping(_read_mapping(Path(path)), str(path))


def load_model_file(path: str | Path) -> ModelSpec:
    """A user's model description: one ModelSpec mapping in YAML or JSON."""
    return model_from_mapping(_read_mapping(Path(path)), str(path))


@dataclass
class Catalog:
    """Known GPUs and models by name: the presets plus any files a user added."""

    gpus: dict[str, GpuSpec] = field(default_factory=dict)
    models: dict[str, ModelSpec] = field(default_factory=dict)

    def gpu(self, name_or_path: str) -> GpuSpec:
        if name_or_path in self.gpus:
            return self.gpus[name_or_path]
        if Path(name_or_path).suffix in (".yaml", ".yml", ".json"):
            return load_gpu_file(name_or_path)
        raise SpecError(
            f"unknown GPU '{name_or_path}'; valid: {', '.join(self.gpus)} "
            "(or a .yaml/.json file describing one)"
        )

    def model(self, name_or_path: str) -> ModelSpec:
        if name_or_path in self.models:
            return self.models[name_or_path]
        if Path(name_or_path).suffix in (".yaml", ".yml", ".json"):
            return load_model_file(name_or_path)
        raise SpecError(
            f"unknown model '{name_or_path}'; valid: {', '.join(self.models)} "
            "(or a .yaml/.json file describing one)"
        )


def _load_preset_list(filename: str) -> list[Any]:
    text = resources.files(__package__).joinpath("presets").joinpath(filename).read_text()
    data = yaml.safe_load(text)
    if not isinstance(data, list):
        raise SpecError(f"presets/{filename}: expected a list")
    return data


def default_catalog() -> Catalog:
    """The presets shipped with throttllem."""
    gpus = [
        gpu_from_mapping(d, f"presets/gpus.yaml[{i}]")
        for i, d in enumerate(_load_preset_list("gpus.yaml"))
    ]
    models = [
        model_from_mapping(d, f"presets/models.yaml[{i}]")
        for i, d in enumerate(_load_preset_list("models.yaml"))
    ]
    return Catalog({g.name: g for g in gpus}, {m.name: m for m in models})
