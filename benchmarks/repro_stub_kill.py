"""Reproduction for an upstream limit: SIGKILL of a Triton Python-backend stub under traffic can
abort tritonserver itself.

No router, no controller: the `tensorrt_llm` model (twin) with two instances, clients sending
non-streaming requests at a steady rate; one stub is SIGKILLed and the server is watched for
`--watch` seconds. Seen here (nvidia-pytriton 0.7.0's tritonserver): in most trials the server
dies at once or within seconds, the log ending in `boost::interprocess::lock_exception` and
signal 6 or 11 in libtriton_python.so (a shared-memory mutex the dead stub held). Without new
requests arriving, the same kill is survived. throttllem's router holds requests while a model
has a dead instance (python_backend/triton_model/relay_watchdog.py), which narrows the window
but cannot close it.

Run: `python benchmarks/repro_stub_kill.py [--trials N] [--rate R] [--watch S]`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from throttllem.backend.telemetry.discovery import discover
from throttllem.controller.triton_launcher import RepositorySpec, running_triton

LLM = "tensorrt_llm"


def inputs(prompt: int, tokens: int) -> list[grpcclient.InferInput]:
    out = []
    for name, value in (
        ("input_ids", np.ones((1, prompt), np.int32)),
        ("input_lengths", np.array([[prompt]], np.int32)),
        ("request_output_len", np.array([[tokens]], np.int32)),
    ):
        t = grpcclient.InferInput(name, list(value.shape), "INT32")
        t.set_data_from_numpy(value)
        out.append(t)
    return out


def trial(rate: float, watch_s: float) -> str:
    with tempfile.TemporaryDirectory(prefix="repro-stub-kill-") as tmp_name:
        tmp = Path(tmp_name)
        registry = tmp / "registry"
        params = {"engine": "twin", "twin_speedup": "6", "telemetry_registry_dir": str(registry)}
        spec = RepositorySpec(parameters=params, models=(LLM,), instances=2)
        with running_triton(spec, work_dir=tmp / "triton") as server:
            client = grpcclient.InferenceServerClient(server.grpc_url)
            client.start_stream(callback=lambda result, error: None)
            victim = discover(registry, LLM)[-1]
            n, killed_at = 0, None
            start = time.monotonic()
            while time.monotonic() - start < 3.0 + watch_s:
                if server.process is not None and server.process.poll() is not None:
                    assert killed_at is not None
                    return f"tritonserver died {time.monotonic() - killed_at:.1f} s after the kill"
                if killed_at is None and time.monotonic() - start > 3.0:
                    os.kill(victim.pid, signal.SIGKILL)
                    killed_at = time.monotonic()
                n += 1
                # A stream that died with the server raises: the next poll says so.
                with contextlib.suppress(Exception):
                    client.async_stream_infer(LLM, inputs(64, 120), request_id=f"r{n}")
                time.sleep(1.0 / rate)  # open-loop pacing of the load
            with_dead = "stub killed" if killed_at is not None else "no kill"
            client.stop_stream(cancel_requests=True)
            return f"tritonserver survived {watch_s:.0f} s ({with_dead})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--rate", type=float, default=10.0, help="requests per second")
    parser.add_argument("--watch", type=float, default=30.0, help="seconds watched after the kill")
    args = parser.parse_args(argv)
    died = 0
    for k in range(args.trials):
        outcome = trial(args.rate, args.watch)
        died += outcome.startswith("tritonserver died")
        print(f"trial {k + 1}: {outcome}", flush=True)
    print(f"tritonserver died in {died} of {args.trials} trials")
    return 0


if __name__ == "__main__":
    sys.exit(main())
