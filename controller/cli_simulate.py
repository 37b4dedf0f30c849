"""`throttllem simulate`: policies compared on the same arrivals, in virtual time."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .cli_simulate_scaling import add_scaling_arguments, simulate_scaling
from .cli_twin import UsageError, guarded, resolve_engine
from .events import Slo

if TYPE_CHECKING:
    from .length_memory import LearnedLengths

# prefill_clock.PREFILL_CLOCKS, spelled out so that parsing does not import numpy (a test
# keeps the two equal).
PREFILL_CLOCK_CHOICES = ("auto", "optimal", "max")
# length_predictor.HINT_USES, likewise.
LENGTH_HINT_CHOICES = ("cap", "trust", "ignore")

JSON_KEYS = (
    "energy_j",
    "tokens_per_joule",
    "energy_saving_vs_max",
    "slo_attainment",
    "p99_ttft_ms",
    "mean_tbt_ms",
    "p99_tbt_ms",
    "p99_e2e_ms",
    "clock_changes",
)


def add_parser(sub: Any) -> None:
    sim = sub.add_parser("simulate", help="compare clock policies on a workload, virtual time")
    sim.add_argument(
        "--trace",
        required=True,
        help="a trace file (Azure CSV, JSON lines, or arrival_s,prompt_tokens,"
        "output_tokens CSV), or synthetic:conv / synthetic:code",
    )
    sim.add_argument("--gpu", default="A100-SXM4-40GB")
    sim.add_argument("--model", default="llama-3-8b")
    sim.add_argument(
        "--tp", default="1", help="tensor-parallel size; with --scaling, the sizes: e.g. 1,2,4"
    )
    sim.add_argument(
        "--load",
        type=float,
        default=0.5,
        help="arrival rate as a fraction of the engine's capacity (default 0.5)",
    )
    sim.add_argument(
        "--policy",
        default="max,throttllem",
        help="comma-separated: max, static:MHZ, static-best, pid, throttllem, hinted, "
        "hinted:SIGMA (hints off by a log-normal factor of that spread), oracle",
    )
    sim.add_argument(
        "--duration",
        type=float,
        default=None,
        help="seconds of the workload to replay (default: synthetic 600, trace all)",
    )
    sim.add_argument(
        "--slo", default="paper", help="'paper' or a YAML/JSON file with ttft_ms, tbt_ms, e2e_ms"
    )
    sim.add_argument(
        "--capacity",
        choices=("steady", "trace"),
        default="steady",
        help="what --load is a fraction of: 'steady' (Poisson arrivals with the trace's length "
        "mix, default) or 'trace' (burst-aware: the trace's own arrival pattern; for bursty "
        "traces such as Azure code, which overload an engine at any share of its steady rate)",
    )
    sim.add_argument(
        "--prefill-clock",
        choices=PREFILL_CLOCK_CHOICES,
        default="auto",
        help="throttllem's clock for iterations that carry prompts: 'optimal' (what the SLOs "
        "and the energy floor pick), 'max' while requests decode (short answers to long "
        "prompts), or 'auto' (default: 'max' while prefill stalls dominate the traffic; "
        "docs/controller.md item 7)",
    )
    sim.add_argument(
        "--length-hints",
        choices=LENGTH_HINT_CHOICES,
        default="cap",
        help="how throttllem and hinted use clients' output_length_hint: 'cap' (default: the "
        "shorter of the hint and what the lengths seen say), 'trust' (the hint), 'ignore'",
    )
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument(
        "--jobs",
        type=_jobs,
        default=0,
        help="policies simulated at once, one process each (default 0: one per CPU core; 1: "
        "one after the other). Each run is seeded alone: the results do not depend on it",
    )
    sim.add_argument(
        "--lengths-file",
        type=Path,
        default=None,
        help="throttllem, hinted and the oracle start knowing these learned output lengths, as "
        "a controller restarted with its --lengths-dir file (default: knowing nothing)",
    )
    sim.add_argument(
        "--save-lengths",
        type=Path,
        default=None,
        help="write the lengths file a controller serving this workload would leave (for "
        "--lengths-file, or a controller's --lengths-dir)",
    )
    sim.add_argument("--json", action="store_true", help="one JSON object keyed by policy")
    sim.add_argument(
        "--out", type=Path, default=None, help="folder for per-request records, timelines and plots"
    )
    add_scaling_arguments(sim)
    sim.set_defaults(handler=guarded("simulate", _simulate))


def _jobs(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (one per core) or more, got {value}")
    return value


def load_slo_file(path: Path) -> Slo:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise UsageError(f"--slo {path}: cannot read ({e})") from e
    if not isinstance(data, dict):
        raise UsageError(f"--slo {path}: expected a mapping of ttft_ms, tbt_ms, e2e_ms")
    unknown = sorted(set(data) - {"ttft_ms", "tbt_ms", "e2e_ms"})
    if unknown:
        raise UsageError(
            f"--slo {path}: unknown field(s) {', '.join(unknown)}; valid: ttft_ms, tbt_ms, e2e_ms"
        )
    values: dict[str, float | None] = {}
    for key in ("ttft_ms", "tbt_ms", "e2e_ms"):
        v = data.get(key)
        if v is not None and (
            isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0
        ):
            raise UsageError(f"--slo {path}: {key} must be a positive number, got {v!r}")
        values[key] = None if v is None else float(v) / 1000.0
    return Slo(values["ttft_ms"], values["tbt_ms"], values["e2e_ms"])


def _simulate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from throttllem.backend.twin.hardware import default_catalog

    from .evaluation.capacity import (
        find_capacity,
        find_trace_capacity,
        paper_slo,
        scale_to_load,
    )
    from .evaluation.experiment import PolicyError, compare, parse_policies, write_outputs
    from .evaluation.report import format_choices, format_table, overload_note
    from .evaluation.simulator import EngineSetup
    from .evaluation.workload import TraceError, read_trace, synthetic

    if args.scaling:
        return simulate_scaling(args)
    if not args.tp.isdigit():
        raise UsageError(f"--tp must be one integer without --scaling, got {args.tp!r}")
    args.tp = int(args.tp)
    gpu, model = resolve_engine(default_catalog(), args.gpu, args.model, args.tp)
    if not 0 < args.load <= 2:
        raise UsageError(f"--load must be in (0, 2], got {args.load}")
    if args.duration is not None and args.duration <= 0:
        raise UsageError(f"--duration must be positive, got {args.duration}")
    try:
        policies = parse_policies(args.policy, gpu.supported_clocks_mhz())
    except PolicyError as e:
        raise UsageError(f"--policy: {e}") from e
    setup = EngineSetup(gpu=gpu.name, model=model.name, tp=args.tp, seed=args.seed)
    lengths = _learned_lengths(args.lengths_file, model.name)
    kind = workload_kind(args.trace)
    synthetic_trace = args.trace.startswith("synthetic:")
    if args.capacity == "trace" and synthetic_trace:
        raise UsageError("--capacity trace needs a trace file, not a synthetic workload")
    print(
        f"finding the capacity of {model.name} TP{args.tp} on {gpu.name} ({kind} mix; cached)",
        file=sys.stderr,
    )
    capacity = find_capacity(setup, kind, args.seed)
    if not synthetic_trace:
        try:
            trace = read_trace(args.trace)
        except TraceError as e:
            raise UsageError(str(e)) from e
        if args.capacity == "trace":
            print("finding its burst-aware capacity on this trace (cached)", file=sys.stderr)
            try:
                capacity = find_trace_capacity(setup, trace, capacity)
            except ValueError as e:
                raise UsageError(f"--capacity trace: {e}") from e
    slo = paper_slo(capacity) if args.slo == "paper" else load_slo_file(Path(args.slo))
    if synthetic_trace:
        duration = args.duration or 600.0
        workload = synthetic(kind, capacity.rate_per_s * args.load, duration, seed=args.seed)
    else:
        workload = trace
        # The whole trace is rescaled to the target rate, then --duration seconds are taken.
        workload = scale_to_load(workload, capacity, args.load)
        if args.duration:
            workload = workload.window(0.0, args.duration)
    workload = workload.clipped(model.max_context)
    if workload.clipped_prompts:
        print(
            f"{workload.clipped_prompts} prompts clipped to {model.name}'s context", file=sys.stderr
        )
    print(
        f"{len(workload.requests)} requests over {workload.duration_s:.0f} s "
        f"({workload.rate_per_s:.2f}/s = {args.load:.0%} of capacity "
        f"{capacity.rate_per_s:.2f}/s); SLO: TBT {ms(slo.tbt_s)}, E2E {ms(slo.e2e_s)}, "
        f"TTFT {ms(slo.ttft_s)}",
        file=sys.stderr,
    )
    runs = len(dict.fromkeys(["max", *policies]))  # max runs as the baseline, asked or not
    with tqdm(total=runs, desc="policies", unit="policy", file=sys.stderr) as bar:

        def progress(message: str) -> None:
            if message.startswith("finished"):
                bar.update(1)
            else:
                bar.set_postfix_str(message)

        jobs = args.jobs or os.cpu_count() or 1
        comparison = compare(
            workload,
            setup,
            policies,
            slo,
            progress,
            args.prefill_clock,
            jobs,
            lengths,
            args.length_hints,
        )
    if args.save_lengths is not None:
        from . import length_memory

        served = ((r.prompt_tokens, r.output_tokens) for r in workload.requests)
        try:
            length_memory.save(args.save_lengths, length_memory.learned_from(model.name, served))
        except OSError as e:
            raise UsageError(f"--save-lengths {args.save_lengths}: cannot write ({e})") from e
        print(f"wrote the learned output lengths to {args.save_lengths}", file=sys.stderr)
    if args.out:
        written = write_outputs(comparison, args.out, slo)
        print(f"wrote {len(written)} files to {args.out}", file=sys.stderr)
    if args.json:
        print(
            json.dumps(
                {
                    name: {k: getattr(s, k) for k in JSON_KEYS}
                    for name, s in comparison.summaries.items()
                },
                indent=2,
            )
        )
    else:
        print(format_table(comparison.summaries))
        choices = format_choices(comparison.results)
        if choices:
            print(choices)
    if comparison.static_best_mhz is not None:
        # An operator who would pin a clock wants the number, not only what it saves.
        print(f"static-best: {comparison.static_best_mhz} MHz", file=sys.stderr)
    note = overload_note(comparison.summaries)
    if note:
        print(note, file=sys.stderr)
    return 0


def _learned_lengths(path: Path | None, llm: str) -> LearnedLengths | None:
    """--lengths-file read and checked (a LearnedLengths), or None without it."""
    if path is None:
        return None
    from . import length_memory

    try:
        lengths = length_memory.load(path, llm)
    except length_memory.LengthMemoryError as e:
        raise UsageError(f"--lengths-file {e}") from e
    if lengths is None:
        raise UsageError(f"--lengths-file {path}: no such file")
    print(f"starting from {lengths.count} learned output lengths", file=sys.stderr)
    return lengths


def workload_kind(trace: str) -> str:
    """`conv` or `code`: the length mix of --trace (its capacity search and synthetic lengths)."""
    if trace.startswith("synthetic:"):
        kind = trace.split(":", 1)[1]
        if kind not in ("conv", "code"):
            raise UsageError(
                f"--trace {trace}: valid synthetic workloads: synthetic:conv, synthetic:code"
            )
        return kind
    return "code" if "code" in Path(trace).name.lower() else "conv"


def ms(seconds: float | None) -> str:
    return "none" if seconds is None else f"{seconds * 1000:.0f} ms"
