"""`throttllem twin ...`: run, inspect and calibrate the digital twin from the command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from throttllem.backend.twin.errors import TwinError
from throttllem.backend.twin.hardware import (
    Catalog,
    GpuSpec,
    ModelSpec,
    default_catalog,
    valid_tp_sizes,
)

EXIT_USAGE = 2


class UsageError(Exception):
    """A bad value on the command line: reported as one line, exit status 2."""


def add_parser(sub: Any) -> None:
    twin = sub.add_parser("twin", help="run, inspect and calibrate the digital twin")
    cmds = twin.add_subparsers(dest="twin_command", required=True, metavar="TWIN_COMMAND")

    run = cmds.add_parser(
        "run",
        help="B requests arrive at time 0, each generates exactly O tokens, clocks locked at F",
    )
    run.add_argument("--gpu", required=True, help="GPU preset name or a .yaml/.json file")
    run.add_argument("--model", required=True, help="model preset name or a .yaml/.json file")
    run.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    run.add_argument("--clock-mhz", type=int, required=True, help="locked SM clock, MHz")
    run.add_argument("--batch", type=int, required=True, help="requests arriving at time 0")
    run.add_argument("--prompt-tokens", type=int, required=True, help="prompt length")
    run.add_argument("--output-tokens", type=int, required=True, help="tokens each generates")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--json", action="store_true", help="print one JSON object")
    run.set_defaults(handler=guarded("twin run", _run))

    clocks = cmds.add_parser("clocks", help="the SM clocks a GPU supports")
    clocks.add_argument("--gpu", required=True, help="GPU preset name or a .yaml/.json file")
    clocks.set_defaults(handler=guarded("twin clocks", _clocks))

    cal = cmds.add_parser(
        "calibrate", help="compare the twin with published measurements; non-zero on a miss"
    )
    cal.add_argument(
        "--data",
        type=Path,
        default=None,
        help="calibration data folder (default: ../shared/data/calibration when it exists)",
    )
    cal.add_argument("--json", action="store_true", help="print one JSON object")
    cal.set_defaults(handler=guarded("twin calibrate", _calibrate))


def guarded(command: str, handler: Any) -> Any:
    """Turn bad input into one clear line and exit status 2, as the commands promise."""

    def run(args: argparse.Namespace) -> int:
        try:
            code: int = handler(args)
            return code
        except (UsageError, TwinError) as e:
            print(f"throttllem {command}: error: {e}", file=sys.stderr)
            return EXIT_USAGE

    return run


def _positive(name: str, value: int) -> int:
    if value <= 0:
        raise UsageError(f"{name} must be a positive whole number, got {value}")
    return value


def resolve_engine(
    catalog: Catalog, gpu_name: str, model_name: str, tp: int
) -> tuple[GpuSpec, ModelSpec]:
    """The GPU and model of --gpu/--model, checked to fit at --tp (one line naming the valid
    choices otherwise): shared by every command that builds an engine."""
    gpu = catalog.gpu(gpu_name)
    model = catalog.model(model_name)
    sizes = valid_tp_sizes(gpu, model)
    if tp not in sizes:
        raise UsageError(
            f"--tp {tp}: {model.name} does not fit {tp} x {gpu.name}; "
            f"valid: {', '.join(map(str, sizes)) or 'none'}"
        )
    return gpu, model


def validate_run_args(args: argparse.Namespace, catalog: Catalog) -> None:
    """Check every value of `twin run` before building anything."""
    gpu, model = resolve_engine(catalog, args.gpu, args.model, args.tp)
    for name in ("batch", "prompt_tokens", "output_tokens"):
        _positive("--" + name.replace("_", "-"), getattr(args, name))
    clocks = gpu.supported_clocks_mhz()
    if args.clock_mhz not in clocks:
        raise UsageError(
            f"--clock-mhz {args.clock_mhz}: not supported by {gpu.name}; valid: "
            f"{clocks[-1]}..{clocks[0]} MHz in steps of {gpu.clock_step_mhz}"
        )
    if args.prompt_tokens + args.output_tokens > model.max_context:
        raise UsageError(
            f"--prompt-tokens + --output-tokens = {args.prompt_tokens + args.output_tokens} "
            f"exceeds {model.name}'s context of {model.max_context} tokens"
        )


def _run(args: argparse.Namespace) -> int:
    catalog = default_catalog()
    validate_run_args(args, catalog)
    from throttllem.backend.twin.experiments import run_fixed_batch

    result = run_fixed_batch(
        gpu=catalog.gpu(args.gpu),
        model=catalog.model(args.model),
        tp=args.tp,
        clock_mhz=args.clock_mhz,
        batch=args.batch,
        prompt_tokens=args.prompt_tokens,
        output_tokens=args.output_tokens,
        seed=args.seed,
    )
    if args.json:
        print(json.dumps(result.to_json()))
        return 0
    print(
        f"{args.batch} x ({args.prompt_tokens} prompt + {args.output_tokens} output) tokens, "
        f"{args.model} TP{args.tp} on {args.gpu} locked at {args.clock_mhz} MHz"
    )
    print(f"  iterations/s      {result.ips:10.2f}   ({result.iterations} iterations)")
    print(f"  tokens/s          {result.tokens_per_s:10.1f}")
    print(f"  mean power        {result.avg_power_w:10.1f} W (per engine, all GPUs)")
    print(f"  energy            {result.energy_j:10.2f} J")
    print(f"  tokens per joule  {result.tokens_per_joule:10.3f}")
    lat = result.iter_latency_ms
    print(f"  iteration latency mean {lat.mean:.2f} ms, p50 {lat.p50:.2f} ms, p99 {lat.p99:.2f} ms")
    return 0


def _clocks(args: argparse.Namespace) -> int:
    gpu = default_catalog().gpu(args.gpu)
    clocks = gpu.supported_clocks_mhz()
    print(
        f"{gpu.name}: {len(clocks)} SM clocks, {clocks[0]}..{clocks[-1]} MHz "
        f"in steps of {gpu.clock_step_mhz} MHz"
    )
    print(" ".join(map(str, clocks)))
    return 0


def default_calibration_dir() -> Path | None:
    """../shared/data/calibration beside the project checkout, or beside the current folder."""
    here = Path(__file__).resolve()
    candidates = [p / "shared" / "data" / "calibration" for p in here.parents]
    candidates.append(Path.cwd().parent / "shared" / "data" / "calibration")
    return next((c for c in candidates if c.is_dir()), None)


def _calibrate(args: argparse.Namespace) -> int:
    from throttllem.backend.twin.calibration import run_calibration

    data = args.data or default_calibration_dir()
    if data is None or not Path(data).is_dir():
        raise UsageError(
            f"no calibration data at {data or '../shared/data/calibration'}; pass --data DIR"
        )
    report = run_calibration(Path(data))
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(report.format_table())
    return 0 if report.all_passed else 1
