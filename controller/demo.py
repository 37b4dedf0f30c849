"""`throttllem demo`: the whole system on a laptop with no GPU.

1. Finds the twin engine's capacity and the paper's SLOs (virtual time, cached).
2. Starts the real stack: Triton serving the twin in real time (sped up), and the controller.
3. Replays a few minutes of conversation traffic through Triton over gRPC streaming, showing the
   clock, power, requests in flight and SLO attainment as it goes.
4. Simulates the same arrivals in virtual time under the maximum-clock baseline and under
   throttllem, and prints the live run beside both; writes the plots.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from throttllem.backend.twin.lengths import LognormalLengths

from .cli_controller import DEFAULTS, build_sidecar
from .control_loop import Decision
from .evaluation.capacity import find_capacity, paper_slo
from .evaluation.experiment import compare, trained_model, write_outputs
from .evaluation.replay import replay
from .evaluation.report import PolicySummary, format_table, summarise
from .evaluation.simulator import CLIENT_MAX_TOKENS, EngineSetup
from .evaluation.workload import TraceRequest, Workload, read_trace, synthetic
from .sidecar import Sidecar
from .triton_launcher import RepositorySpec, running_triton


@dataclass
class DemoConfig:
    gpu: str = "A100-SXM4-40GB"
    model: str = "llama-3-8b"
    load: float = 0.5
    duration_s: float = 180.0  # engine seconds of traffic
    speedup: float = 2.0
    seed: int = 0
    out: Path = Path("demo-out")
    trace: Path | None = None


def shared_conv_trace() -> Path | None:
    """../shared/data/traces/AzureLLMInferenceTrace_conv.csv when this checkout has it."""
    for parent in Path(__file__).resolve().parents:
        path = parent / "shared" / "data" / "traces" / "AzureLLMInferenceTrace_conv.csv"
        if path.is_file():
            return path
    return None


def build_workload(cfg: DemoConfig, rate: float, max_context: int) -> Workload:
    """Arrivals and prompts from the trace (or synthetic); output lengths as the served twin
    draws them (request i is the twin's request i + 1), so a simulation can replay them."""
    if cfg.trace is not None:
        base = read_trace(cfg.trace)
        base = base.scaled_to_rate(rate).window(0.0, cfg.duration_s)
    else:
        base = synthetic("conv", rate, cfg.duration_s, seed=cfg.seed)
    lengths = LognormalLengths(cfg.seed)
    requests = []
    for i, r in enumerate(base.requests):
        prompt = min(r.prompt_tokens, max_context - CLIENT_MAX_TOKENS)
        out = min(lengths.sample(i + 1), CLIENT_MAX_TOKENS)
        requests.append(TraceRequest(r.arrival_s, max(prompt, 1), max(out, 1)))
    return Workload(base.name, tuple(requests))


def _status(sidecar: Sidecar) -> str:
    for inst in sidecar.instances.values():
        ctl = inst.controller
        if ctl is None or not ctl.decisions:
            continue
        d = ctl.decisions[-1]
        gpu = inst.driver.gpu_indices()[0]
        power = inst.driver.power_usage_mw(gpu) / 1000.0
        return (
            f"clock {d.chosen_mhz:4d} MHz  power {power:5.0f} W  running {d.running:3d}  "
            f"waiting {d.queued:3d}  SLO attainment {ctl.scoreboard.attainment():6.1%}"
        )
    return "waiting for the controller"


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_demo(cfg: DemoConfig) -> int:
    setup = EngineSetup(gpu=cfg.gpu, model=cfg.model, tp=1, seed=cfg.seed)
    gpu, model = setup.specs()
    say(f"[1/4] capacity of {model.name} on a twin {gpu.name} (virtual time; cached)")
    capacity = find_capacity(setup, "conv", cfg.seed)
    slo = paper_slo(capacity)
    workload = build_workload(cfg, capacity.rate_per_s * cfg.load, model.max_context)
    source = cfg.trace.name if cfg.trace else "synthetic conversation traffic"
    say(
        f"      {capacity.rate_per_s:.2f} req/s; replaying {len(workload.requests)} requests "
        f"({source}) at {cfg.load:.0%} load; SLO: mean TBT <= {(slo.tbt_s or 0) * 1000:.0f} ms"
        f", E2E <= {slo.e2e_s or 0:.1f} s"
    )
    say("[2/4] the performance model (profiled on the twin once, then cached)")
    trained_model(setup)
    say(
        f"[3/4] Triton + twin at {cfg.speedup:g}x real time + controller; "
        f"~{cfg.duration_s / cfg.speedup:.0f} s of wall time"
    )
    params = {
        "engine": "twin",
        "twin_gpu": gpu.name,
        "twin_model": model.name,
        "twin_speedup": repr(cfg.speedup),
        "twin_seed": str(cfg.seed),
        "exclude_input_in_output": "true",
    }
    registry = Path(tempfile.mkdtemp(prefix="throttllem-demo-registry-"))
    spec = RepositorySpec(
        parameters={**params, "telemetry_registry_dir": str(registry)}, models=("tensorrt_llm",)
    )
    assert slo.tbt_s is not None and slo.e2e_s is not None
    settings = {
        **DEFAULTS,
        "metrics_port": 0,
        "slo_tbt_ms": slo.tbt_s * 1000.0,
        "slo_e2e_ms": slo.e2e_s * 1000.0,
        "registry_dir": str(registry),
    }
    with running_triton(spec) as server:
        sidecar: Sidecar = build_sidecar(settings)
        stop = threading.Event()
        thread = threading.Thread(target=sidecar.run, args=(stop,), daemon=True)
        thread.start()
        deadline = time.monotonic() + 60
        while not any(i.controller for i in sidecar.instances.values()):
            if time.monotonic() > deadline:
                say("the controller did not attach to the served model")
                stop.set()
                return 1
            time.sleep(0.1)
        inst = next(iter(sidecar.instances.values()))
        gpus = inst.driver.gpu_indices()
        energy0 = sum(inst.driver.total_energy_mj(g) for g in gpus)
        last_print = [0.0]

        def progress(sent: int, total: int) -> None:
            now = time.monotonic()
            if now - last_print[0] >= 1.0:
                last_print[0] = now
                say(f"      {sent:5d}/{total} sent   {_status(sidecar)}")

        result = replay(server.grpc_url, workload, speedup=cfg.speedup, progress=progress)
        energy_j = (sum(inst.driver.total_energy_mj(g) for g in gpus) - energy0) / 1000.0
        decisions = list(inst.controller.decisions) if inst.controller else []
        changes = inst.controller.governor.changes if inst.controller else 0
        stop.set()
        thread.join(timeout=30)
    shutil.rmtree(registry, ignore_errors=True)
    live = result.as_sim_result("live throttllem", energy_j, changes)
    say("[4/4] the same arrivals in virtual time: maximum clock vs throttllem")
    comparison = compare(workload, setup, ["max", "throttllem"], slo)
    base = comparison.results["max"].energy_j
    table: dict[str, PolicySummary] = dict(comparison.summaries)
    table["live throttllem"] = summarise(live, slo, base)
    print(format_table(table))
    if result.late_sends:
        print(
            f"note: the client sent {result.late_sends} requests late (max "
            f"{result.max_lag_s * 1000:.0f} ms): client delays are in the live numbers"
        )
    written = write_outputs(comparison, cfg.out, slo)
    _plot_live(decisions, cfg.out / "live_clock.png")
    print(f"plots and records in {cfg.out}/ ({len(written) + 1} files)")
    return 0


def _plot_live(decisions: list[Decision], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [d.time_s for d in decisions]
    mhz = [d.chosen_mhz for d in decisions]
    fig, ax = plt.subplots(figsize=(10, 3))
    ax.step(t, mhz, where="post", linewidth=0.8)
    ax.set_xlabel("engine time (s)")
    ax.set_ylabel("chosen SM clock (MHz)")
    ax.set_title("live run: the controller's clock decisions")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
