"""`throttllem demo`: the main job, on the twin (see demo.py)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .cli_twin import UsageError, guarded


def add_parser(sub: Any) -> None:
    p = sub.add_parser("demo", help="the whole system on the twin: live run + comparison")
    p.add_argument("--gpu", default="A100-SXM4-40GB")
    p.add_argument("--model", default="llama-3-8b")
    p.add_argument("--load", type=float, default=0.5, help="fraction of capacity (default 0.5)")
    p.add_argument(
        "--duration", type=float, default=180.0, help="engine seconds of traffic (default 180)"
    )
    p.add_argument(
        "--speedup", type=float, default=2.0, help="engine seconds per wall second (default 2)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("demo-out"), help="plots and records")
    p.add_argument(
        "--trace",
        default="auto",
        help="auto (../shared's Azure conv trace when present, else synthetic), "
        "synthetic, or a trace file",
    )
    p.set_defaults(handler=guarded("demo", _demo))


def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo, shared_conv_trace

    for name in ("load", "duration", "speedup"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name} must be positive, got {getattr(args, name)}")
    if args.trace == "auto":
        trace = shared_conv_trace()
    elif args.trace == "synthetic":
        trace = None
    else:
        trace = Path(args.trace)
        if not trace.is_file():
            raise UsageError(f"--trace {trace}: no such file")
    cfg = DemoConfig(
        gpu=args.gpu,
        model=args.model,
        load=args.load,
        duration_s=args.duration,
        speedup=args.speedup,
        seed=args.seed,
        out=args.out,
        trace=trace,
    )
    return run_demo(cfg)
