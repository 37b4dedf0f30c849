"""Serving through a real Triton server (CPU bundle) with the twin: is the backend ever the
bottleneck, and what does a telemetry subscriber cost?

Workload: Llama-3-8B on one A100-SXM4-40GB (twin), 64 closed-loop streaming gRPC clients (each
sends its next request as soon as the previous one ends), 64-token prompts, 128 tokens each.
The twin's speed-up is chosen so that the engine emits about 2,000 tokens/s (from its own rate
in virtual time, measured first).

Figures, each over the same steady-state window:
- engine alone (baseline, same run): the twin in this process, responses drained by one thread;
  tokens/s it emits with nobody in the way;
- through Triton: tokens/s the engine emitted (responses stamped `emit_time_ns` by the backend,
  a lower bound of when the engine made them available) and tokens/s the clients received; the
  ratio received / emitted (goal >= 0.95) and added latency per token = client receive time -
  emit time, p50 and p99 (goal p99 <= 10 ms);
- the same with one telemetry subscriber attached: delivered tokens/s relative to the run
  without it (goal: a drop <= 2 %);
- telemetry throughput: the twin sped up until it runs >= 1,000 iterations/s, one subscriber;
  iteration events/s received and gaps (goal: >= 1,000/s, no gap).

Run: `python benchmarks/bench_serving.py [--quick]`; `main()` returns the figures as a dict.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import tritonclient.grpc as grpcclient

from throttllem.backend.engines.base import EngineRequest
from throttllem.backend.engines.twin import build_twin_engine as build_serving_twin
from throttllem.backend.params import Parameters
from throttllem.backend.telemetry.discovery import discover
from throttllem.backend.twin.executor_api import Request
from throttllem.backend.twin.factory import build_twin_engine
from throttllem.backend.twin.lengths import FixedLengths
from throttllem.controller.triton_launcher import RepositorySpec, TritonServer, running_triton
from throttllem.v1 import telemetry_pb2 as pb
from throttllem.v1 import telemetry_pb2_grpc as pb_grpc

GPU, MODEL = "A100-SXM4-40GB", "llama-3-8b"
CLIENTS = 64
PROMPT_TOKENS = 64
MAX_TOKENS = 128
TARGET_TOKENS_PER_S = 2000.0
TELEMETRY_TARGET_IPS = 1000.0
GOAL_DELIVERED_RATIO = 0.95
GOAL_P99_ADDED_MS = 10.0
GOAL_SUBSCRIBER_DROP = 0.02


def engine_rate_virtual(clients: int, prompt: int, max_tokens: int) -> tuple[float, float]:
    """(tokens/s, iterations/s) of the twin at speed-up 1, with `clients` requests always in
    flight, measured in virtual time (no wall clock involved)."""
    twin = build_twin_engine(GPU, MODEL, 1, mode="virtual", lengths=FixedLengths(10**6),
                             max_batch_size=clients)  # fmt: skip
    ex = twin.executor

    def new() -> None:
        ex.enqueue_request(
            Request(list(range(1, prompt + 1)), max_tokens=max_tokens, streaming=True)
        )

    for _ in range(clients):
        new()
    tokens = iterations = 0
    start_s = ex.time.now_s()
    while iterations < 20 * max_tokens // 10:
        if ex.step() is None:
            break
        iterations += 1
        for r in ex.await_responses():
            tokens += len(r.result.output_token_ids[0])
            if r.result.is_final:
                new()
    elapsed = ex.time.now_s() - start_s
    ex.shutdown()
    return tokens / elapsed, iterations / elapsed


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def engine_alone(speedup: float, clients: int, duration_s: float) -> float:
    """Baseline: tokens/s the real-time twin emits in this process, drained by one thread."""
    params = {"twin_speedup": repr(speedup), "twin_output_len": "1000000",
              "max_batch_size": str(clients)}  # fmt: skip
    engine = build_serving_twin(Parameters(params))
    req = EngineRequest(list(range(1, PROMPT_TOKENS + 1)), MAX_TOKENS, streaming=True)
    for _ in range(clients):
        engine.enqueue(req)
    start = time.monotonic()
    warm = start + min(1.0, duration_s / 4)
    tokens = 0
    while time.monotonic() < start + duration_s:
        for r in engine.await_responses(0.01):
            if time.monotonic() >= warm:
                tokens += len(r.output_token_ids[0]) if r.output_token_ids else 0
            if r.is_final:
                engine.enqueue(req)
    rate = tokens / (time.monotonic() - warm)
    engine.shutdown()
    return rate


@dataclass
class ClientStats:
    tokens: list[tuple[int, int]] = field(default_factory=list)  # (receive_ns, emit_ns)
    finished: int = 0
    errors: list[str] = field(default_factory=list)


class ClosedLoopClient:
    """One gRPC stream; each finished request is followed by the next until `stop`."""

    def __init__(self, url: str, index: int, stop: threading.Event) -> None:
        self.stats = ClientStats()
        self._index = index
        self._n = 0
        self._stop = stop
        self._idle = threading.Event()
        self._closing = False
        self.client = grpcclient.InferenceServerClient(url)
        self.client.start_stream(callback=self._on_response)
        ids = np.arange(1, PROMPT_TOKENS + 1, dtype=np.int32)[np.newaxis]
        self._inputs = []
        for name, value in (
            ("input_ids", ids),
            ("input_lengths", np.array([[PROMPT_TOKENS]], np.int32)),
            ("request_output_len", np.array([[MAX_TOKENS]], np.int32)),
            ("streaming", np.array([[True]])),
        ):
            t = grpcclient.InferInput(name, list(value.shape), "BOOL" if value.dtype == bool
                                      else "INT32")  # fmt: skip
            t.set_data_from_numpy(value)
            self._inputs.append(t)

    def send(self) -> None:
        if self._closing:
            return
        self._n += 1
        self.client.async_stream_infer(
            "tensorrt_llm", self._inputs, request_id=f"c{self._index}-{self._n}",
            parameters={"return_emit_time": True},
        )  # fmt: skip

    def _on_response(self, result: Any, error: Any) -> None:
        now = time.time_ns()
        if error is not None:
            if not self._closing:
                self.stats.errors.append(str(error))
            self._idle.set()
            return
        emit = result.as_numpy("emit_time_ns")
        ids = result.as_numpy("output_ids")
        if ids is not None and ids.size:
            self.stats.tokens.append((now, int(emit.reshape(-1)[0]) if emit is not None else 0))
        if result.get_response().parameters["triton_final_response"].bool_param:
            self.stats.finished += 1
            if self._stop.is_set():
                self._idle.set()
            else:
                self.send()

    def wait_idle(self, timeout_s: float) -> None:
        self._idle.wait(timeout_s)

    def close(self) -> None:
        self._closing = True
        self.client.stop_stream(cancel_requests=True)
        self.client.close()


class Subscriber:
    """A telemetry subscriber reading everything, counting iterations and gaps."""

    def __init__(self, endpoint: str) -> None:
        self.channel = grpc.insecure_channel(endpoint)
        self.call = pb_grpc.TelemetryStub(self.channel).Subscribe(pb.SubscribeRequest())
        self.iterations: list[tuple[int, int]] = []  # (publish ns, tokens of the iteration)
        self.gaps = 0
        self.events = 0
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for batch in self.call:
                for e in batch.events:
                    self.events += 1
                    kind = e.WhichOneof("kind")
                    if kind == "iteration":
                        it = e.iteration
                        tokens = it.num_gen_requests + it.num_context_requests
                        self.iterations.append((e.time_unix_ns, tokens))
                    elif kind == "gap":
                        self.gaps += 1
        except grpc.RpcError:
            pass

    def close(self) -> None:
        self.call.cancel()
        self.thread.join(timeout=5)
        self.channel.close()


def run_clients(server: TritonServer, clients: int, duration_s: float, warmup_s: float,
                subscriber: Subscriber | None) -> dict[str, float]:  # fmt: skip
    stop = threading.Event()
    pool = [ClosedLoopClient(server.grpc_url, i, stop) for i in range(clients)]
    try:
        for c in pool:
            c.send()
        t0 = time.time_ns() + int(warmup_s * 1e9)
        time.sleep(warmup_s + duration_s)
        t1 = time.time_ns()
        stop.set()
        for c in pool:
            c.wait_idle(30.0)
    finally:
        for c in pool:
            c.close()
    samples = [s for c in pool for s in c.stats.tokens]
    received = sum(1 for r, _ in samples if t0 <= r < t1)
    emitted = sum(1 for _, e in samples if t0 <= e < t1)
    added_ms = [(r - e) / 1e6 for r, e in samples if t0 <= e < t1 and e > 0]
    window_s = (t1 - t0) / 1e9
    out = {
        "emitted_tokens_per_s": emitted / window_s,
        "delivered_tokens_per_s": received / window_s,
        "delivered_ratio": received / emitted if emitted else float("nan"),
        "added_latency_p50_ms": pct(added_ms, 0.50),
        "added_latency_p99_ms": pct(added_ms, 0.99),
        "added_latency_mean_ms": statistics.fmean(added_ms) if added_ms else float("nan"),
        "requests_finished": float(sum(c.stats.finished for c in pool)),
        "errors": float(sum(len(c.stats.errors) for c in pool)),
    }
    if subscriber is not None:
        its = [(t, n) for t, n in subscriber.iterations if t0 <= t < t1]
        out["telemetry_iterations_per_s"] = len(its) / window_s
        out["telemetry_engine_tokens_per_s"] = sum(n for _, n in its) / window_s
        out["telemetry_gaps"] = float(subscriber.gaps)
    return out


def telemetry_throughput(tmp: Path, speedup: float, duration_s: float) -> dict[str, float]:
    """One subscriber on an engine running >= TELEMETRY_TARGET_IPS iterations/s."""
    spec = RepositorySpec(
        parameters={"engine": "twin", "twin_speedup": repr(speedup), "twin_output_len": "1000000",
                    "max_output_len": "4000", "stats_check_period_ms": "10",
                    "telemetry_registry_dir": str(tmp / "registry-fast")},
        models=("tensorrt_llm",),
    )  # fmt: skip
    with running_triton(spec, work_dir=tmp / "fast") as server:
        (entry,) = discover(tmp / "registry-fast", "tensorrt_llm")
        sub = Subscriber(entry.endpoint)
        stop = threading.Event()
        clients = [ClosedLoopClient(server.grpc_url, i, stop) for i in range(4)]
        try:
            for c in clients:
                c.send()
            time.sleep(0.5)
            n0, t0 = len(sub.iterations), time.monotonic()
            time.sleep(duration_s)
            n1, t1 = len(sub.iterations), time.monotonic()
            stop.set()
            for c in clients:
                c.wait_idle(30.0)
        finally:
            for c in clients:
                c.close()
            sub.close()
    return {"iterations_per_s": (n1 - n0) / (t1 - t0), "gaps": float(sub.gaps)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=CLIENTS)
    parser.add_argument("--tokens-per-s", type=float, default=TARGET_TOKENS_PER_S)
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per measured run")
    parser.add_argument("--quick", action="store_true", help="short runs (smoke test)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    duration = 2.0 if args.quick else args.duration
    warmup = 0.5 if args.quick else 1.5

    rate_1x, ips_1x = engine_rate_virtual(args.clients, PROMPT_TOKENS, MAX_TOKENS)
    speedup = args.tokens_per_s / rate_1x
    print(f"twin {MODEL} on {GPU}, {args.clients} clients: {rate_1x:.0f} tokens/s at 1x; "
          f"speed-up {speedup:.3f} for {args.tokens_per_s:.0f} tokens/s", flush=True)  # fmt: skip
    figures: dict[str, Any] = {"speedup": speedup, "engine_tokens_per_s_at_1x": rate_1x}
    figures["engine_alone_tokens_per_s"] = engine_alone(speedup, args.clients, duration)
    print(f"engine alone (baseline):    {figures['engine_alone_tokens_per_s']:8.0f} tokens/s",
          flush=True)  # fmt: skip

    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp_name:
        tmp = Path(tmp_name)
        spec = RepositorySpec(
            parameters={"engine": "twin", "twin_speedup": repr(speedup),
                        "twin_output_len": "1000000", "max_batch_size": str(args.clients),
                        "telemetry_registry_dir": str(tmp / "registry")},
            models=("tensorrt_llm",),
        )  # fmt: skip
        with running_triton(spec, work_dir=tmp / "triton") as server:
            run_clients(server, args.clients, 1.0, 0.5, None)  # warm the server up
            plain = run_clients(server, args.clients, duration, warmup, None)
            (entry,) = discover(tmp / "registry", "tensorrt_llm")
            sub = Subscriber(entry.endpoint)
            try:
                watched = run_clients(server, args.clients, duration, warmup, sub)
            finally:
                sub.close()
        figures["triton"] = plain
        figures["triton_with_subscriber"] = watched
        fast_speedup = TELEMETRY_TARGET_IPS * 2.0 / ips_1x * 4  # 4 clients: ~2x the target
        figures["telemetry"] = telemetry_throughput(tmp, fast_speedup, duration)

    report(figures)
    if args.json:
        print(json.dumps(figures, indent=2))
    return figures


def report(f: dict[str, Any]) -> None:
    plain, watched, tele = f["triton"], f["triton_with_subscriber"], f["telemetry"]
    alone = f["engine_alone_tokens_per_s"]
    print(f"through Triton: engine emitted {plain['emitted_tokens_per_s']:8.0f} tokens/s "
          f"({plain['emitted_tokens_per_s'] / alone:.3f} x engine alone), clients received "
          f"{plain['delivered_tokens_per_s']:8.0f} tokens/s")  # fmt: skip
    print(f"  delivered / emitted        {plain['delivered_ratio']:.4f}   "
          f"(goal >= {GOAL_DELIVERED_RATIO})")  # fmt: skip
    print(
        f"  added latency per token    p50 {plain['added_latency_p50_ms']:.2f} ms, "
        f"p99 {plain['added_latency_p99_ms']:.2f} ms   (goal p99 <= {GOAL_P99_ADDED_MS} ms)"
    )
    print(f"  requests finished {plain['requests_finished']:.0f}, errors {plain['errors']:.0f}")
    drop = 1.0 - watched["delivered_tokens_per_s"] / plain["delivered_tokens_per_s"]
    print(
        f"with one telemetry subscriber: {watched['delivered_tokens_per_s']:8.0f} tokens/s "
        f"delivered, {watched['delivered_tokens_per_s'] / plain['delivered_tokens_per_s']:.4f} "
        f"x without (drop {100 * drop:.2f} %, goal <= {100 * GOAL_SUBSCRIBER_DROP:.0f} %)"
    )
    print(f"  p99 added latency {watched['added_latency_p99_ms']:.2f} ms; subscriber saw "
          f"{watched['telemetry_iterations_per_s']:.0f} iterations/s carrying "
          f"{watched['telemetry_engine_tokens_per_s']:.0f} tokens/s, "
          f"{watched['telemetry_gaps']:.0f} gaps")  # fmt: skip
    print(
        f"telemetry throughput: {tele['iterations_per_s']:.0f} iterations/s received, "
        f"{tele['gaps']:.0f} gaps   (goal >= {TELEMETRY_TARGET_IPS:.0f}/s, no gap)"
    )
    f["goals_met"] = {
        "delivered_ratio": plain["delivered_ratio"] >= GOAL_DELIVERED_RATIO,
        "p99_added_latency": plain["added_latency_p99_ms"] <= GOAL_P99_ADDED_MS,
        "subscriber_drop": drop <= GOAL_SUBSCRIBER_DROP,
        "telemetry_rate": tele["iterations_per_s"] >= TELEMETRY_TARGET_IPS and tele["gaps"] == 0,
    }
    print("goals met: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in
                                    f["goals_met"].items()))  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
