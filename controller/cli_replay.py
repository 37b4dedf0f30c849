"""`throttllem replay`: a workload, open loop, against a running Triton; the same report as
`simulate`, measured from the client's side."""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request
from pathlib import Path
from typing import Any

from .cli_simulate import JSON_KEYS, load_slo_file
from .cli_twin import UsageError, guarded, resolve_engine


def add_parser(sub: Any) -> None:
    p = sub.add_parser("replay", help="replay a workload against a running server (live)")
    p.add_argument("--trace", required=True, help="trace file, or synthetic:conv / synthetic:code")
    p.add_argument("--url", default="127.0.0.1:8001", help="Triton gRPC address")
    p.add_argument("--model-name", default="tensorrt_llm", help="Triton model to send to")
    p.add_argument(
        "--speedup",
        type=float,
        default=1.0,
        help="engine seconds per wall second of the served twin (1 for a real GPU)",
    )
    p.add_argument("--rate", type=float, default=None, help="requests per engine second")
    p.add_argument(
        "--load",
        type=float,
        default=None,
        help="instead of --rate: a fraction of the capacity of --gpu/--model/--tp",
    )
    p.add_argument("--gpu", default="A100-SXM4-40GB")
    p.add_argument("--model", default="llama-3-8b")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--duration", type=float, default=120.0, help="engine seconds (default 120)")
    p.add_argument("--slo", default=None, help="'paper' (needs --load) or a YAML/JSON file")
    p.add_argument(
        "--controller-metrics",
        default="http://127.0.0.1:9400/metrics",
        help="where to read the energy counter ('' to skip)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.add_argument("--out", type=Path, default=None, help="folder for the per-request records")
    p.set_defaults(handler=guarded("replay", _replay))


def read_energy_j(url: str) -> float | None:
    """The controller's energy gauge, summed over instances; None when unreachable."""
    try:
        text = urllib.request.urlopen(url, timeout=3).read().decode()
    except OSError:
        return None
    values = [
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("throttllem_energy_joules{")
    ]
    return sum(values) if values else None


def _replay(args: argparse.Namespace) -> int:
    from throttllem.backend.twin.hardware import default_catalog

    from .evaluation.capacity import find_capacity, paper_slo
    from .evaluation.replay import replay
    from .evaluation.report import format_table, summarise, write_requests
    from .evaluation.simulator import CLIENT_MAX_TOKENS, EngineSetup
    from .evaluation.workload import TraceError, read_trace, synthetic
    from .events import Slo

    if (args.rate is None) == (args.load is None):
        raise UsageError("give exactly one of --rate and --load")
    for name in ("speedup", "duration"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name} must be positive, got {getattr(args, name)}")
    gpu, model = resolve_engine(default_catalog(), args.gpu, args.model, args.tp)
    kind = "code" if "code" in args.trace else "conv"
    capacity = None
    if args.load is not None:
        capacity = find_capacity(EngineSetup(gpu=gpu.name, model=model.name, tp=args.tp), kind)
    rate = args.rate if args.rate is not None else capacity.rate_per_s * args.load  # type: ignore[union-attr]
    if rate <= 0:
        raise UsageError(f"the request rate must be positive, got {rate}")
    if args.trace.startswith("synthetic:"):
        workload = synthetic(kind, rate, args.duration, seed=args.seed)
    else:
        try:
            workload = read_trace(args.trace).scaled_to_rate(rate).window(0.0, args.duration)
        except TraceError as e:
            raise UsageError(str(e)) from e
    workload = workload.clipped(model.max_context)
    if args.slo == "paper":
        if capacity is None:
            raise UsageError("--slo paper needs --load (the E2E target comes from the capacity)")
        slo = paper_slo(capacity)
    elif args.slo:
        slo = load_slo_file(Path(args.slo))
    else:
        slo = Slo()
    energy_before = read_energy_j(args.controller_metrics) if args.controller_metrics else None
    print(
        f"replaying {len(workload.requests)} requests over {workload.duration_s:.0f} engine s "
        f"to {args.url} at {args.speedup:g}x",
        file=sys.stderr,
    )
    result = replay(
        args.url,
        workload,
        speedup=args.speedup,
        model=args.model_name,
        max_tokens=lambda p: min(CLIENT_MAX_TOKENS, model.max_context - p),
    )
    energy_after = read_energy_j(args.controller_metrics) if args.controller_metrics else None
    energy = (
        energy_after - energy_before
        if energy_before is not None and energy_after is not None
        else float("nan")
    )
    live = result.as_sim_result("live", energy, 0)
    summary = summarise(live, slo, None)
    if result.late_sends:
        print(
            f"the client fell behind its schedule for {result.late_sends} sends (max "
            f"{result.max_lag_s * 1000:.0f} ms): client delays are in these numbers",
            file=sys.stderr,
        )
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        write_requests(args.out / "requests_live.csv", live)
    if args.json:
        print(json.dumps({"live": {k: getattr(summary, k) for k in JSON_KEYS}}, indent=2))
    else:
        print(format_table({"live": summary}))
    return 1 if result.errors else 0
