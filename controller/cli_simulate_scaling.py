"""`throttllem simulate --scaling --tp 1,2,4`: instance scaling plus clocks, in virtual time.

The workload is rescaled to one compressed day (--swing LOW,HIGH as fractions of the largest
size's capacity, over --duration seconds); the SLO preset comes from the largest size, the one
a deployment without scaling runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .cli_twin import UsageError, resolve_engine
from .events import Slo

DEFAULT_SWING = "0.1,0.9"
DEFAULT_SCALING_DURATION_S = 1800.0


def add_scaling_arguments(sim: Any) -> None:
    g = sim.add_argument_group("instance scaling (--scaling)")
    g.add_argument(
        "--scaling",
        action="store_true",
        help="compare fixed:tpN, scaling-only, clocks-only:tpN, throttllem over the --tp sizes",
    )
    g.add_argument(
        "--swing",
        default=DEFAULT_SWING,
        help="daily-like load swing LOW,HIGH as fractions of the largest size's capacity",
    )
    g.add_argument("--cold-start", type=float, default=20.0, help="s to load a new engine")
    g.add_argument("--scale-period", type=float, default=10.0, help="s between scaler looks")
    g.add_argument("--scale-grace", type=float, default=60.0, help="s before moving down")
    g.add_argument("--scale-margin", type=float, default=0.1, help="share of capacity kept spare")
    g.add_argument(
        "--scale-lookahead", type=float, default=30.0, help="s ahead along a rising demand"
    )


def _swing(spec: str) -> tuple[float, float]:
    try:
        low, high = (float(x) for x in spec.split(","))
    except ValueError:
        raise UsageError(f"--swing: expected LOW,HIGH such as 0.1,0.9, got {spec!r}") from None
    if not (0 < low <= high <= 2):
        raise UsageError(f"--swing: need 0 < LOW <= HIGH <= 2, got {spec!r}")
    return low, high


def simulate_scaling(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from throttllem.backend.twin.hardware import default_catalog

    from .cli_simulate import JSON_KEYS, load_slo_file, ms, workload_kind
    from .evaluation.capacity import paper_slo
    from .evaluation.experiment import Comparison, write_outputs
    from .evaluation.report import format_table
    from .evaluation.scaling_experiment import (
        compare_scaling,
        engine_sizes,
        parse_scaling_policies,
    )
    from .evaluation.simulator import EngineSetup
    from .evaluation.workload import TraceError, daily_swing, read_trace, synthetic
    from .scaling.runtime import parse_tp_list
    from .scaling.scaler import ScalerConfig

    try:
        tps = parse_tp_list(args.tp)
        policy_spec = args.policy
        if policy_spec == "max,throttllem":  # the non-scaling default: use the scaling set
            policy_spec = f"fixed:tp{tps[-1]},scaling-only,clocks-only:tp{tps[-1]},throttllem"
        policies = parse_scaling_policies(policy_spec, tps)
    except ValueError as e:  # PolicyError included
        raise UsageError(f"--tp/--policy: {e}") from e
    catalog = default_catalog()
    for tp in tps:
        gpu, model = resolve_engine(catalog, args.gpu, args.model, tp)
    low, high = _swing(args.swing)
    if args.cold_start < 0:
        raise UsageError(f"--cold-start must be >= 0, got {args.cold_start}")
    try:
        scaler = ScalerConfig(
            args.scale_period, args.scale_margin, args.scale_grace,
            lookahead_s=args.scale_lookahead,
        )  # fmt: skip
    except ValueError as e:
        raise UsageError(f"--scale-*: {e}") from e
    duration = args.duration or DEFAULT_SCALING_DURATION_S
    if duration <= 0:
        raise UsageError(f"--duration must be positive, got {duration}")
    setups = {
        f"tp{tp}": EngineSetup(gpu=gpu.name, model=model.name, tp=tp, seed=args.seed) for tp in tps
    }
    kind = workload_kind(args.trace)
    print(f"finding the capacity of each size ({kind} mix; cached)", file=sys.stderr)
    # Capacities are a profiled property of the deployment: one search (seed 0) for every seed;
    # a seed changes the simulated day (twin noise, the stretch of trace it replays).
    sizes, caps = engine_sizes(setups, kind, 0)
    largest = max(sizes, key=lambda s: s.total_capacity_rps)
    slo: Slo = (
        paper_slo(caps[largest.name]) if args.slo == "paper" else load_slo_file(Path(args.slo))
    )
    low_rps, high_rps = low * largest.capacity_rps, high * largest.capacity_rps
    if args.trace.startswith("synthetic:"):
        source = synthetic(kind, high_rps, duration, seed=args.seed)
    else:
        try:
            source = read_trace(args.trace)
        except TraceError as e:
            raise UsageError(str(e)) from e
    try:
        needed = int((low_rps + high_rps) / 2 * duration)
        skip = args.seed * needed // 2 if not args.trace.startswith("synthetic:") else 0
        workload = daily_swing(source, low_rps, high_rps, duration, skip).clipped(model.max_context)
    except ValueError as e:
        raise UsageError(f"--swing: {e}") from e
    for s in sizes:
        print(f"  {s.name}: {s.capacity_rps:.2f} req/s", file=sys.stderr)
    print(
        f"{len(workload.requests)} requests over {workload.duration_s:.0f} s, rate swinging "
        f"{low_rps:.2f}..{high_rps:.2f}/s; cold start {args.cold_start:.0f} s; SLO: TBT "
        f"{ms(slo.tbt_s)}, E2E {ms(slo.e2e_s)}",
        file=sys.stderr,
    )
    with tqdm(total=len(policies) + 1, desc="policies", unit="policy", file=sys.stderr) as bar:

        def progress(message: str) -> None:
            bar.set_postfix_str(message)
            if message.startswith("simulating"):
                bar.update(1)

        comparison = compare_scaling(
            workload, setups, sizes, policies, slo,
            cold_start_s=args.cold_start, scaler=scaler, progress=progress,
        )  # fmt: skip
    for name, decisions in comparison.decisions.items():
        if decisions:
            moves = ", ".join(f"{d.time_s:.0f}s->{d.to_size}" for d in decisions)
            print(f"{name}: {len(decisions)} size changes: {moves}", file=sys.stderr)
    if args.out:
        written = write_outputs(Comparison(comparison.results, comparison.summaries), args.out, slo)
        print(f"wrote {len(written)} files to {args.out}", file=sys.stderr)
    if args.json:
        out: dict[str, Any] = {
            name: {k: getattr(s, k) for k in JSON_KEYS}
            | {"size_changes": len(comparison.decisions[name])}
            for name, s in comparison.summaries.items()
        }
        print(json.dumps(out, indent=2))
    else:
        print(f"(savings against {comparison.baseline} at maximum clock)")
        print(format_table(comparison.summaries))
    return 0
