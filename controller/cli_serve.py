"""`throttllem serve`: a real Triton server with throttllem's model repository, until Ctrl-C.

    throttllem serve --engine twin --gpu A100-SXM4-40GB --model llama-3-8b
    throttllem serve --engine tensorrtllm --engine-dir /engines/llama3 --tokenizer-dir /hf/llama3

Finds tritonserver ($TRITONSERVER, /opt/tritonserver, else the nvidia-pytriton CPU bundle), fills
the model repository into a temporary folder, starts Triton on 127.0.0.1 (ports configurable),
waits for readiness and prints the endpoints, including each instance's telemetry endpoint.
SIGINT or SIGTERM stops Triton and its model processes; nothing is left running.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from throttllem.backend.telemetry.discovery import discover
from throttllem.backend.triton_model.routing_file import write_routing_file

from . import stop_signals
from .cli_simulate import LENGTH_HINT_CHOICES, PREFILL_CLOCK_CHOICES
from .serve_scaling import (
    SizePlan,
    add_scaling_arguments,
    measured_capacities,
    plan_sizes,
    scaling_spec,
)
from .triton_launcher import (
    LLM_MODEL,
    Ports,
    RepositorySpec,
    TritonError,
    TritonServer,
    build_repository,
    find_triton,
    source_model_repository,
)

EXIT_USAGE = 2
EXIT_TRITON = 3


def add_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="run Triton with the throttllem model repository")
    p.add_argument("--engine", choices=("twin", "tensorrtllm"), default="twin")
    p.add_argument("--gpu", default="A100-SXM4-40GB", help="twin: GPU preset name or file")
    p.add_argument("--model", default="llama-3-8b", help="twin: model preset name or file")
    p.add_argument("--tp", type=int, default=1, help="twin: tensor-parallel size")
    p.add_argument("--speedup", type=float, default=1.0, help="twin: simulated s per wall s")
    p.add_argument("--seed", type=int, default=0, help="twin: seed")
    p.add_argument("--engine-dir", help="tensorrtllm: the TensorRT-LLM engine directory")
    p.add_argument("--tokenizer-dir", help="Hugging Face tokenizer folder for the text path")
    p.add_argument("--instances", type=int, default=1, help="tensorrt_llm model instances")
    p.add_argument("--host", default="127.0.0.1", help="address Triton binds (default loopback)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument(
        "--telemetry-port",
        type=int,
        default=0,
        help="base telemetry port: instance k listens on BASE+k (0: free ports)",
    )
    p.add_argument(
        "--registry-dir",
        type=Path,
        default=None,
        help="telemetry registry folder (default: inside the work folder)",
    )
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra tensorrt_llm config parameter (repeatable)",
    )
    p.add_argument(
        "--model-repository",
        type=Path,
        default=None,
        help="throttllem model repository to start from (default: the source tree's)",
    )
    p.add_argument("--work-dir", type=Path, default=None, help="keep the filled repository here")
    p.add_argument("--ready-timeout", type=float, default=300.0, help="seconds (default 300)")
    p.add_argument(
        "--model-control",
        choices=("none", "explicit"),
        default="none",
        help="explicit: Triton's model-control API on (load/unload, instance changes)",
    )
    p.add_argument(
        "--no-controller",
        action="store_true",
        help="serve only: do not start the clock controller beside Triton",
    )
    p.add_argument(
        "--controller-metrics-port",
        type=int,
        default=9400,
        help="the controller's Prometheus port on 127.0.0.1 (default 9400; 0: none)",
    )
    p.add_argument(
        "--perf-model",
        default="auto",
        help="controller performance model: auto, oracle, or a .cbm file",
    )
    p.add_argument(
        "--prefill-clock",
        choices=PREFILL_CLOCK_CHOICES,
        default="auto",
        help="the controller's clock for iterations that carry prompts (see `throttllem "
        "controller --help`)",
    )
    p.add_argument(
        "--length-hints",
        choices=LENGTH_HINT_CHOICES,
        default="cap",
        help="how the controller uses clients' output_length_hint (see `throttllem "
        "controller --help`)",
    )
    p.add_argument(
        "--controller-lengths-dir",
        type=Path,
        default=None,
        help="keep the controller's learned output lengths here across restarts (see "
        "`throttllem controller --help`)",
    )
    for name in ("ttft", "tbt", "e2e"):
        p.add_argument(
            f"--slo-{name}-ms",
            type=float,
            default=None,
            help=f"the controller's default {name.upper()} target (engine time)",
        )
    add_scaling_arguments(p)
    p.set_defaults(handler=run_serve)  # fmt: skip


def start_controller(
    args: argparse.Namespace, registry: Path, stop: threading.Event, watch: tuple[str, ...] = ()
) -> tuple[threading.Thread, Any]:
    """The sidecar in a thread of this process; it resets every clock it set when it ends."""
    from .cli_controller import DEFAULTS, build_sidecar

    settings = {
        **DEFAULTS,
        "registry_dir": str(registry),
        "perf_model": args.perf_model,
        "metrics_port": args.controller_metrics_port,
        "slo_ttft_ms": args.slo_ttft_ms,
        "slo_tbt_ms": args.slo_tbt_ms,
        "slo_e2e_ms": args.slo_e2e_ms,
        "watch_models": ",".join(watch) or None,
        "prefill_clock": args.prefill_clock,
        "length_hints": args.length_hints,
        "lengths_dir": str(args.controller_lengths_dir) if args.controller_lengths_dir else None,
    }
    sidecar = build_sidecar(settings)
    if settings["metrics_port"]:
        sidecar.metrics.serve(settings["metrics_port"], "127.0.0.1")
    thread = threading.Thread(target=sidecar.run, args=(stop,), name="throttllem-controller")
    thread.start()
    return thread, sidecar


def start_scaling(args: argparse.Namespace, server: TritonServer, sidecar: Any,
                  plans: list[SizePlan], routing: Path, registry: Path) -> Any:  # fmt: skip
    """The scaler's loop beside the controller: the sidecar's arrival meter in, Triton's model
    control out."""
    from .scaling.runtime import build_scaling_loop
    from .scaling.scaler import EngineSize, ScalerConfig

    loop = build_scaling_loop(
        server.grpc_url,
        [EngineSize(p.name, p.tp, p.capacity_rps or 0.0) for p in plans],
        model_name=LLM_MODEL,
        routing_file=routing,
        registry_dir=registry,
        meter=sidecar.meter,
        registry=sidecar.metrics.registry,
        config=ScalerConfig(args.scale_period, args.scale_margin, args.scale_grace),
    )
    loop.start()
    return loop


def repository_spec(args: argparse.Namespace, registry: Path) -> RepositorySpec:
    params: dict[str, str] = {
        "engine": args.engine,
        "exclude_input_in_output": "true",
        "telemetry_registry_dir": str(registry),
        "telemetry_port": str(args.telemetry_port),
    }
    if args.engine == "twin":
        params.update(
            twin_gpu=args.gpu, twin_model=args.model, twin_tp=str(args.tp),
            twin_speedup=repr(args.speedup), twin_seed=str(args.seed),
        )  # fmt: skip
    elif not args.engine_dir:
        raise ValueError("--engine tensorrtllm needs --engine-dir")
    else:
        params["engine_dir"] = str(args.engine_dir)
    if args.tokenizer_dir:
        params["tokenizer_dir"] = str(args.tokenizer_dir)
    for item in args.param:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--param {item!r}: expected KEY=VALUE")
        params[key] = value
    if args.instances < 1:
        raise ValueError(f"--instances must be >= 1, got {args.instances}")
    return RepositorySpec(parameters=params, instances=args.instances)


def run_serve(args: argparse.Namespace) -> int:
    owned = args.work_dir is None
    work = Path(tempfile.mkdtemp(prefix="throttllem-serve-")) if owned else args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    registry = args.registry_dir or work / "registry"
    stop = threading.Event()

    restore_signals = stop_signals.install(stop)
    server: TritonServer | None = None
    controller: threading.Thread | None = None
    scaling: Any = None
    clean = False
    try:
        plans: list[SizePlan] = []
        routing = work / "routing.json"
        try:
            spec = repository_spec(args, registry)
            if args.scaling_tp:
                plans = measured_capacities(args, plan_sizes(args))
                write_routing_file(routing, plans[0].variant)
                spec = scaling_spec(spec, plans, routing)
        except ValueError as e:
            print(f"throttllem serve: error: {e}", file=sys.stderr)
            return EXIT_USAGE
        try:
            install = find_triton(work)
            repo = build_repository(args.model_repository or source_model_repository(),
                                    work / "models", spec)  # fmt: skip
            ports = Ports(args.http_port, args.grpc_port, args.metrics_port)
            explicit = ("--model-control-mode=explicit", "--load-model=*")
            extra: tuple[str, ...] = explicit if args.model_control == "explicit" else ()
            ready: tuple[str, ...] = (LLM_MODEL,)
            if plans:  # the router, the smallest size and the text models; sizes come and go
                first = plans[0].variant
                ready = (LLM_MODEL, first)
                loads = (LLM_MODEL, first, *spec.models)
                extra = ("--model-control-mode=explicit", *(f"--load-model={m}" for m in loads))
            server = TritonServer(repo, work_dir=work, ports=ports, host=args.host,
                                  install=install, extra_args=extra)  # fmt: skip
            print(f"throttllem serve: starting {install.binary} ({install.source}); "
                  f"log {server.log_path}", flush=True)  # fmt: skip
            server.start()
            server.wait_ready(args.ready_timeout, ready, cancel=stop)
        except TritonError as e:
            print(f"throttllem serve: error: {e}", file=sys.stderr)
            return EXIT_TRITON
        if stop.is_set():
            clean = True
            return 0
        _print_ready(server, registry)
        if plans and args.no_controller:
            sizes = ",".join(f"{p.name}={p.capacity_rps:g}" for p in plans)
            watch = ",".join(p.variant for p in plans)
            print(f"throttllem serve: sizes load and unload only with the controller: "
                  f"throttllem controller --registry-dir {registry} --watch-models {watch} "
                  f"--scaling-sizes {sizes} --triton-url {server.grpc_url} "
                  f"--routing-file {routing}", flush=True)  # fmt: skip
        if not args.no_controller:
            controller, sidecar = start_controller(
                args, registry, stop, tuple(p.variant for p in plans)
            )
            if plans:
                scaling = start_scaling(args, server, sidecar, plans, routing, registry)
                sizes = ", ".join(f"{p.name} ({p.capacity_rps:.2f} req/s)" for p in plans)
                print(f"throttllem serve: scaling between {sizes}", flush=True)
            port = args.controller_metrics_port
            print(
                "throttllem serve: controller running"
                + (f", metrics http://127.0.0.1:{port}/metrics" if port else ""),
                flush=True,
            )
        while not stop.wait(0.5):
            if not server.running():
                tail = server.log_tail()
                print(f"throttllem serve: tritonserver exited unexpectedly "
                      f"(log {server.log_path}):\n{tail}", file=sys.stderr)  # fmt: skip
                return EXIT_TRITON
        print("throttllem serve: stopping", flush=True)
        clean = True
        return 0
    finally:
        stop.set()
        if scaling is not None:
            scaling.stop()
        if controller is not None:
            controller.join(timeout=30)  # resets the clocks it set before Triton goes
        if server is not None:
            server.stop()
        restore_signals()
        if owned and (clean or server is None):
            shutil.rmtree(work, ignore_errors=True)  # kept after a failure: the log is there


def _print_ready(server: TritonServer, registry: Path) -> None:
    print(f"throttllem serve: ready. HTTP http://{server.http_url}  gRPC {server.grpc_url}  "
          f"metrics http://{server.host}:{server.ports.metrics}/metrics", flush=True)  # fmt: skip
    for entry in discover(registry):
        control = ", GPU control" if entry.gpu_control else ""
        print(f"  telemetry {entry.model_name}/{entry.instance_name}: {entry.endpoint} "
              f"({entry.engine_kind}{control})", flush=True)  # fmt: skip
    print(f"  registry {registry}   Ctrl-C to stop", flush=True)
