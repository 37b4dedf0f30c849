"""`throttllem controller`: the sidecar on its own (`throttllem serve` starts one by default)."""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from pathlib import Path
from typing import Any

import yaml

from . import stop_signals
from .cli_twin import UsageError, guarded
from .events import Slo

SETTINGS = {  # option -> (type, help): also the keys a --config YAML file may hold
    "model_name": (str, "Triton model whose instances to control (default tensorrt_llm)"),
    "watch_models": (
        str,
        "more Triton models whose instances to control, comma-separated, their arrivals "
        "counted under model_name (instance scaling: the sized variants behind the router)",
    ),
    "registry_dir": (
        str,
        "discovery registry folder (default: $THROTTLLEM_REGISTRY_DIR or "
        "$TMPDIR/throttllem-registry)",
    ),
    "metrics_port": (int, "Prometheus port on 127.0.0.1 (default 9400; 0: none)"),
    "metrics_host": (str, "address the metrics port binds (default 127.0.0.1)"),
    "perf_model": (
        str,
        "auto (twin engines: profile once, cached), oracle (twin only), or a "
        ".cbm file from `throttllem train`",
    ),
    "driver": (str, "auto (twin engines: their GpuControl; others: NVML), twin, nvml, clockd"),
    "clockd_socket": (str, "socket of `throttllem clockd` (with --driver clockd)"),
    "slo_ttft_ms": (float, "default TTFT target (requests may override)"),
    "slo_tbt_ms": (float, "default mean TBT target"),
    "slo_e2e_ms": (float, "default E2E target"),
    "telemetry_timeout_s": (float, "reset clocks after this long without telemetry (default 3)"),
    "observe_only": (bool, "decide and export metrics, never change clocks"),
    "prefill_clock": (
        str,
        "clock for iterations that carry prompts: optimal (what the SLOs and the energy "
        "floor pick), max while requests decode (short answers to long prompts), or auto "
        "(default: max while prefill stalls dominate the traffic; docs/controller.md item 7)",
    ),
    "length_hints": (
        str,
        "how clients' output_length_hint is used: cap (default: a request is planned at the "
        "shorter of its hint and what the lengths seen say), trust (at its hint), or ignore",
    ),
    "idle_clocks": (
        str,
        "with nothing in flight: release (default: the GPU idles at its lowest clock and "
        "boosts by itself for an arrival until the next lock) or lock (held at the chosen clock)",
    ),
    "gpu_idle_power_w": (
        float,
        "per-GPU idle power for the energy floor (default: the twin preset's; real GPUs 0)",
    ),
    "lengths_dir": (
        str,
        "keep each LLM's learned output lengths in this folder across restarts (saved every "
        "minute and on exit, read when an instance attaches; default: none, each start "
        "learns afresh)",
    ),
    "keda_port": (int, "serve KEDA's external scaler API on this port (default 0: off)"),
    "keda_host": (str, "address the KEDA scaler binds (default 127.0.0.1)"),
    "scaling_sizes": (
        str,
        "instance scaling: tpN=REQ_PER_S,... the sizes and their capacities (docs/scaling.md)",
    ),
    "triton_url": (str, "instance scaling: Triton's gRPC address (default 127.0.0.1:8001)"),
    "routing_file": (str, "instance scaling: the router's routing file"),
    "scale_period": (float, "instance scaling: seconds between looks (default 10)"),
    "scale_grace": (float, "instance scaling: seconds before moving down (default 60)"),
    "scale_margin": (float, "instance scaling: capacity share kept spare (default 0.1)"),
}
DEFAULTS: dict[str, Any] = {
    "model_name": "tensorrt_llm",
    "watch_models": None,
    "registry_dir": None,
    "metrics_port": 9400,
    "metrics_host": "127.0.0.1",
    "perf_model": "auto",
    "driver": "auto",
    "clockd_socket": None,
    "slo_ttft_ms": None,
    "slo_tbt_ms": None,
    "slo_e2e_ms": None,
    "telemetry_timeout_s": 3.0,
    "observe_only": False,
    "prefill_clock": "auto",
    "length_hints": "cap",
    "idle_clocks": "release",
    "gpu_idle_power_w": None,
    "lengths_dir": None,
    "keda_port": 0,
    "keda_host": "127.0.0.1",
    "scaling_sizes": None,
    "triton_url": "127.0.0.1:8001",
    "routing_file": None,
    "scale_period": 10.0,
    "scale_grace": 60.0,
    "scale_margin": 0.1,
}


def add_parser(sub: Any) -> None:
    p = sub.add_parser("controller", help="run the clock controller sidecar")
    p.add_argument("--config", type=Path, help="YAML file with any of the settings below")
    for name, (kind, text) in SETTINGS.items():
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            p.add_argument(flag, action="store_true", default=None, help=text)
        else:
            p.add_argument(flag, type=kind, default=None, help=text)
    p.set_defaults(handler=guarded("controller", _controller))


def resolve_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Defaults, then the config file, then flags; a wrong key or type names the field."""
    settings = dict(DEFAULTS)
    if args.config is not None:
        try:
            data = yaml.safe_load(args.config.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise UsageError(f"--config {args.config}: cannot read ({e})") from e
        if not isinstance(data, dict):
            raise UsageError(f"--config {args.config}: expected a mapping of settings")
        for key, value in data.items():
            if key not in SETTINGS:
                raise UsageError(
                    f"--config {args.config}: unknown setting '{key}'; valid: {', '.join(SETTINGS)}"
                )
            kind = SETTINGS[key][0]
            ok = (
                isinstance(value, bool)
                if kind is bool
                else (
                    isinstance(value, (int, float)) and not isinstance(value, bool)
                    if kind in (int, float)
                    else isinstance(value, str)
                )
            )
            if value is not None and not ok:
                raise UsageError(
                    f"--config {args.config}: {key} must be a {kind.__name__}, got {value!r}"
                )
            settings[key] = value
    for key in SETTINGS:
        value = getattr(args, key, None)
        if value is not None:
            settings[key] = value
    if settings["driver"] not in ("auto", "twin", "nvml", "clockd"):
        raise UsageError(f"driver '{settings['driver']}': valid: auto, twin, nvml, clockd")
    from .prefill_clock import PREFILL_CLOCKS

    if settings["prefill_clock"] not in PREFILL_CLOCKS:
        raise UsageError(
            f"prefill_clock '{settings['prefill_clock']}': valid: " + ", ".join(PREFILL_CLOCKS)
        )
    from .length_predictor import HINT_USES

    if settings["length_hints"] not in HINT_USES:
        raise UsageError(
            f"length_hints '{settings['length_hints']}': valid: " + ", ".join(HINT_USES)
        )
    from .control_loop import IDLE_CLOCKS

    if settings["idle_clocks"] not in IDLE_CLOCKS:
        raise UsageError(
            f"idle_clocks '{settings['idle_clocks']}': valid: " + ", ".join(IDLE_CLOCKS)
        )
    if settings["driver"] == "clockd" and not settings["clockd_socket"]:
        raise UsageError("--driver clockd needs --clockd-socket")
    for key in ("slo_ttft_ms", "slo_tbt_ms", "slo_e2e_ms", "telemetry_timeout_s"):
        if settings[key] is not None and settings[key] <= 0:
            raise UsageError(f"{key} must be positive, got {settings[key]}")
    pm = settings["perf_model"]
    if pm not in ("auto", "oracle") and not Path(pm).is_file():
        raise UsageError(f"perf_model '{pm}': not auto, oracle, or an existing model file")
    return settings


def build_sidecar(settings: dict[str, Any]) -> Any:
    from .control_loop import ControllerConfig
    from .evaluation.experiment import trained_model
    from .evaluation.simulator import EngineSetup
    from .gpu.clockd_client import ClockdClient
    from .gpu.nvml_driver import NvmlDriver
    from .gpu.remote_twin import RemoteTwinDriver
    from .oracle_model import TwinOracleModel
    from .perf_model import CatBoostPerformanceModel, PerformanceModel
    from .scaling.rate_meter import ArrivalRateMeter
    from .sidecar import Sidecar, SidecarConfig
    from .telemetry_client import InstanceLink

    observe = bool(settings["observe_only"])

    def models(link: InstanceLink) -> PerformanceModel | None:
        info = link.info
        pm = settings["perf_model"]
        if pm not in ("auto", "oracle"):
            return CatBoostPerformanceModel.load(pm)
        if info.engine_kind != "twin":
            return None  # a real engine needs a model profiled on its GPU: observe only
        if pm == "oracle":
            from throttllem.backend.twin.hardware import default_catalog

            catalog = default_catalog()
            return TwinOracleModel(
                catalog.gpu(info.gpu_name),
                catalog.model(info.llm),
                info.tp_size,
                info.kv_tokens_per_block,
            )
        return trained_model(
            EngineSetup(
                gpu=info.gpu_name,
                model=info.llm,
                tp=info.tp_size,
                max_batch_size=info.max_batch_size,
            )
        )

    def drivers(link: InstanceLink) -> Any:
        kind = settings["driver"]
        if kind == "auto":
            kind = "twin" if link.info.gpu_control else "nvml"
        if kind == "twin":
            return RemoteTwinDriver(link.endpoint, observe_only=observe)
        if kind == "clockd":
            # One client per instance, for its own GPUs: instances never contend for a lease.
            return ClockdClient.connect(
                Path(settings["clockd_socket"]), gpus=list(link.info.gpu_indices) or None
            )
        return NvmlDriver.open(list(link.info.gpu_indices) or None, observe_only=observe)

    slo = Slo(
        *(
            None if settings[k] is None else settings[k] / 1000.0
            for k in ("slo_ttft_ms", "slo_tbt_ms", "slo_e2e_ms")
        )
    )
    config = SidecarConfig(
        model_name=settings["model_name"],
        watch_models=watch_models(settings),
        registry_dir=Path(settings["registry_dir"]) if settings["registry_dir"] else None,
        default_slo=slo,
        telemetry_timeout_s=settings["telemetry_timeout_s"],
        idle_power_w=settings["gpu_idle_power_w"],
        lengths_dir=Path(settings["lengths_dir"]) if settings["lengths_dir"] else None,
        length_hints=settings["length_hints"],
        controller=ControllerConfig(
            prefill_clock=settings["prefill_clock"], idle_clocks=settings["idle_clocks"]
        ),
    )
    meter = ArrivalRateMeter(models=[settings["model_name"]])
    return Sidecar(config, models, drivers, meter=meter)


def watch_models(settings: dict[str, Any]) -> tuple[str, ...]:
    """The watch_models setting ("a,b", or None) as names, blanks dropped."""
    text = settings.get("watch_models") or ""
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _controller(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    settings = resolve_settings(args)
    sidecar = build_sidecar(settings)
    if settings["metrics_port"]:
        sidecar.metrics.serve(settings["metrics_port"], settings["metrics_host"])
    keda = None
    if settings["keda_port"]:
        from .scaling.keda import serve_keda

        keda, port = serve_keda(sidecar.meter, settings["keda_host"], settings["keda_port"])
        print(f"KEDA external scaler on {settings['keda_host']}:{port}", file=sys.stderr)
    scaling = start_scaling(settings, sidecar)
    stop = threading.Event()
    stop_signals.install(stop)
    print(
        f"throttllem controller: watching model '{settings['model_name']}'"
        + "".join(f", '{name}'" for name in watch_models(settings))
        + (
            f", metrics on {settings['metrics_host']}:{settings['metrics_port']}"
            if settings["metrics_port"]
            else ""
        ),
        file=sys.stderr,
        flush=True,
    )
    try:
        sidecar.run(stop)  # resets every GPU it locked on the way out
    finally:
        if scaling is not None:
            scaling.stop()
        if keda is not None:
            keda.stop(1.0)
    return 0


def start_scaling(settings: dict[str, Any], sidecar: Any) -> Any:
    """The in-node scaler's loop (docs/scaling.md), when scaling sizes are set."""
    if not settings["scaling_sizes"]:
        return None
    from .scaling.runtime import build_scaling_loop, parse_sizes
    from .scaling.scaler import ScalerConfig

    if not settings["routing_file"]:
        raise UsageError("scaling_sizes needs routing_file (the router's routing file)")
    if not settings["registry_dir"]:
        raise UsageError("scaling_sizes needs registry_dir (to see each size's instances)")
    try:
        sizes = parse_sizes(settings["scaling_sizes"])
        config = ScalerConfig(
            settings["scale_period"], settings["scale_margin"], settings["scale_grace"]
        )
        loop = build_scaling_loop(
            settings["triton_url"], sizes, model_name=settings["model_name"],
            routing_file=Path(settings["routing_file"]),
            registry_dir=Path(settings["registry_dir"]), meter=sidecar.meter,
            registry=sidecar.metrics.registry, config=config,
        )  # fmt: skip
    except ValueError as e:
        raise UsageError(f"scaling: {e}") from e
    loop.start()
    print(f"throttllem controller: scaling between {', '.join(s.name for s in sizes)}",
          file=sys.stderr, flush=True)  # fmt: skip
    return loop
