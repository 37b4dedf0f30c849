"""`throttllem serve --scaling-tp 1,2,4`: instance scaling inside one Triton server.

The repository gets one sized copy of the LLM model per TP size (`tensorrt_llm_tp1`, ...; on a
real node each on its own GPUs, assigned in order: TP1 on GPU 0, TP2 on GPUs 1-2, ...) and the
router (python_backend/triton_model/router.py) under the client-facing name `tensorrt_llm`.
Triton runs in explicit model-control mode with the router and the smallest size loaded; the
scaler (controller/scaling/) loads, routes and unloads sizes as the measured load moves.

Capacities (requests/s each size carries at maximum clock within the SLOs) come from
`--scaling-capacity tp1=R1,tp2=R2,...` or, on the twin, from the capacity search of the
evaluation (virtual time, cached; scaled by the twin's speed-up to wall time).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .triton_launcher import LLM_MODEL, RepositorySpec


@dataclass(frozen=True)
class SizePlan:
    name: str  # "tp2"
    tp: int
    variant: str  # Triton model name
    parameters: dict[str, str]
    capacity_rps: float | None  # wall-clock requests/s; None: to be found


def add_scaling_arguments(p: Any) -> None:
    g = p.add_argument_group("instance scaling")
    g.add_argument("--scaling-tp", default=None, help="TP sizes to scale between, e.g. 1,2,4")
    g.add_argument(
        "--scaling-capacity",
        default=None,
        help="tpN=REQ_PER_S,... each size's capacity (default on the twin: measured, cached)",
    )
    g.add_argument(
        "--scaling-engine-dir",
        action="append",
        default=[],
        metavar="tpN=PATH",
        help="tensorrtllm: the engine directory of each size (repeatable)",
    )
    g.add_argument("--scale-period", type=float, default=10.0, help="s between scaler looks")
    g.add_argument("--scale-grace", type=float, default=60.0, help="s before moving down")
    g.add_argument("--scale-margin", type=float, default=0.1, help="capacity share kept spare")


def _pairs(items: list[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("tp") or not key[2:].isdigit():
            raise ValueError(f"{what} {item!r}: expected tpN=VALUE")
        out[key] = value
    return out


def plan_sizes(args: argparse.Namespace) -> list[SizePlan]:
    from .scaling.runtime import parse_sizes, parse_tp_list

    try:
        tps = parse_tp_list(args.scaling_tp)
    except ValueError as e:
        raise ValueError(f"--scaling-tp: {e}") from None
    caps: dict[str, float] = {}
    if args.scaling_capacity:
        try:
            caps = {s.name: s.capacity_rps for s in parse_sizes(args.scaling_capacity)}
        except ValueError as e:
            raise ValueError(f"--scaling-capacity: {e}") from None
    dirs = _pairs(args.scaling_engine_dir, "--scaling-engine-dir")
    plans, first_gpu = [], 0
    for tp in tps:
        name = f"tp{tp}"
        params: dict[str, str] = {}
        if args.engine == "twin":
            params["twin_tp"] = str(tp)
        else:
            if name not in dirs:
                raise ValueError(
                    f"--scaling-engine-dir {name}=PATH is needed for the tensorrtllm engine"
                )
            params["engine_dir"] = dirs[name]
            params["gpu_device_ids"] = ",".join(str(g) for g in range(first_gpu, first_gpu + tp))
        first_gpu += tp
        capacity = caps.get(name)
        if capacity is None and args.engine != "twin":
            raise ValueError(f"--scaling-capacity {name}=REQ_PER_S is needed for a real engine")
        plans.append(SizePlan(name, tp, f"{LLM_MODEL}_{name}", params, capacity))
    return plans


def scaling_spec(base: RepositorySpec, plans: list[SizePlan], routing_file: Path) -> RepositorySpec:
    return RepositorySpec(
        parameters=base.parameters,
        instances=base.instances,
        models=("preprocessing", "postprocessing", "ensemble"),
        sized={p.variant: p.parameters for p in plans},
        routing_file=str(routing_file),
    )


def measured_capacities(args: argparse.Namespace, plans: list[SizePlan]) -> list[SizePlan]:
    """Fill in twin capacities from the cached capacity search (engine time x speed-up)."""
    from .evaluation.capacity import find_capacity
    from .evaluation.simulator import EngineSetup

    out = []
    for p in plans:
        if p.capacity_rps is None:
            print(f"throttllem serve: capacity of {args.model} TP{p.tp} on {args.gpu} "
                  "(virtual-time search, cached after the first time)", file=sys.stderr,
                  flush=True)  # fmt: skip
            cap = find_capacity(EngineSetup(gpu=args.gpu, model=args.model, tp=p.tp), "conv")
            p = SizePlan(p.name, p.tp, p.variant, p.parameters, cap.rate_per_s * args.speedup)
        out.append(p)
    return out
