"""`throttllem profile`, `throttllem train` and `throttllem bench decision`: the performance model's
life cycle from the command line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .cli_twin import UsageError, guarded, resolve_engine

EXIT_USAGE = 2


def add_parsers(sub: Any) -> None:
    prof = sub.add_parser("profile", help="sweep clocks, batch sizes and KV on an engine")
    prof.add_argument(
        "--engine",
        choices=["twin"],
        default="twin",
        help="twin (virtual time). A real GPU engine is profiled by serving it "
        "and replaying load (see docs/operator-guide.md)",
    )
    prof.add_argument("--gpu", required=True, help="GPU preset name or a .yaml/.json file")
    prof.add_argument("--model", required=True, help="model preset name or a .yaml/.json file")
    prof.add_argument("--tp", type=int, default=1)
    prof.add_argument("--seed", type=int, default=0)
    prof.add_argument(
        "--clock-stride", type=int, default=2, help="profile every N-th supported clock (default 2)"
    )
    prof.add_argument("--out", type=Path, required=True, help="dataset file to write (CSV)")
    prof.set_defaults(handler=guarded("profile", _profile))

    train = sub.add_parser("train", help="fit the CatBoost performance model on profiling data")
    train.add_argument("--data", type=Path, nargs="+", required=True, help="dataset file(s)")
    train.add_argument("--out", type=Path, required=True, help="model file to write (.cbm)")
    train.add_argument("--test-fraction", type=float, default=0.2)
    train.add_argument(
        "--max-train-rows",
        type=int,
        default=150_000,
        help="subsample the training split to this many rows (default 150000)",
    )
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--json", action="store_true", help="print the report as one JSON object")
    train.set_defaults(handler=guarded("train", _train))

    bench = sub.add_parser("bench", help="micro-benchmarks")
    what = bench.add_subparsers(dest="bench_command", required=True, metavar="WHAT")
    dec = what.add_parser("decision", help="time one full clock decision")
    dec.add_argument("--requests", type=int, default=256)
    dec.add_argument("--horizon", type=int, default=2000)
    dec.add_argument("--gpu", default="A100-SXM4-40GB")
    dec.add_argument("--repeat", type=int, default=500)
    dec.add_argument("--json", action="store_true")
    dec.set_defaults(handler=guarded("bench decision", _bench_decision))


def _profile(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from throttllem.backend.twin.hardware import default_catalog

    from .perf_model import write_dataset
    from .profiler import default_plan, profile_twin

    gpu, model = resolve_engine(default_catalog(), args.gpu, args.model, args.tp)
    if args.clock_stride <= 0:
        raise UsageError(f"--clock-stride must be positive, got {args.clock_stride}")
    if not args.out.parent.is_dir():
        raise UsageError(f"--out {args.out}: folder {args.out.parent} does not exist")
    from throttllem.backend.twin.executor import DEFAULT_MAX_BATCH_SIZE

    plan = default_plan(gpu, model, DEFAULT_MAX_BATCH_SIZE, args.clock_stride)
    started = time.perf_counter()
    with tqdm(total=plan.size, desc="profiling", unit="run", file=sys.stderr) as bar:

        def advance(runs: int) -> None:
            bar.update(runs)

        x, ips, power = profile_twin(
            gpu, model, args.tp, seed=args.seed, plan=plan, progress=advance
        )
    meta = {
        "engine": "twin",
        "gpu": gpu.name,
        "model": model.name,
        "tp": str(args.tp),
        "seed": str(args.seed),
    }
    write_dataset(args.out, x, ips, meta, power)
    print(
        f"wrote {len(ips)} iterations from {plan.size} runs to {args.out} "
        f"in {time.perf_counter() - started:.0f} s"
    )
    return 0


def _train(args: argparse.Namespace) -> int:
    from .perf_model import (
        CatBoostPerformanceModel,
        evaluate,
        plot_predicted_vs_measured,
        read_dataset,
        split_indices,
    )

    if not 0 < args.test_fraction < 1:
        raise UsageError(f"--test-fraction must be in (0, 1), got {args.test_fraction}")
    for path in args.data:
        if not path.is_file():
            raise UsageError(f"--data {path}: no such file")
    try:
        x, y, power = read_dataset(args.data)
    except ValueError as e:
        raise UsageError(str(e)) from e
    train, test = split_indices(len(y), args.test_fraction, args.seed)
    if len(train) > args.max_train_rows:
        train = np.random.default_rng(args.seed).choice(train, args.max_train_rows, replace=False)
    x_train, y_train, x_test, y_test = x[train], y[train], x[test], y[test]
    started = time.perf_counter()
    model = CatBoostPerformanceModel.fit(
        x_train, y_train, power_w=None if power is None else power[train], seed=args.seed
    )
    fit_s = time.perf_counter() - started
    report = evaluate(model, x_test, y_test, n_train=len(y_train))
    model.meta["report"] = report.to_json()
    model.save(args.out)
    plot = args.out.with_suffix(".png")
    plot_predicted_vs_measured(
        y_test,
        model.predict_ips(x_test),
        plot,
        f"held-out: R2 {report.r2:.4f}, MAPE {report.mape:.2%}",
    )
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        print(f"trained on {report.n_train} rows in {fit_s:.0f} s; held out {report.n_test}")
        print(f"  R^2 {report.r2:.4f}   MAE {report.mae_ips:.3f} IPS   MAPE {report.mape:.2%}")
        print(f"  model {args.out}, report {args.out}.json, plot {plot}")
    return 0


def _bench_decision(args: argparse.Namespace) -> int:
    from .decision_bench import run_decision_bench

    for name in ("requests", "horizon", "repeat"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name} must be positive, got {getattr(args, name)}")
    result = run_decision_bench(args.gpu, args.requests, args.horizon, args.repeat)
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"decision with {args.requests} requests, horizon {result['horizon']} iterations, "
            f"{result['clocks']} candidate clocks: p50 {result['p50_ms']:.3f} ms, "
            f"p99 {result['p99_ms']:.3f} ms"
        )
    return 0
