"""Open-loop replay of a workload against a running Triton, over gRPC streaming.

Arrivals are sent on the wall-clock schedule `arrival_s / speedup` (a twin sped up S times runs
S engine seconds per wall second), every response is timed on receipt, and the measurements come
back in engine seconds, comparable with a virtual-time simulation of the same arrivals. The
sender reports when it falls behind its schedule, so a client-side bottleneck is never mistaken
for the server's latency.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .simulator import SimResult
from .workload import Workload

log = logging.getLogger(__name__)

LATE_S = 0.05  # a send this late (wall) counts as behind schedule


@dataclass
class ReplayResult:
    arrival_s: npt.NDArray[np.float64]  # engine seconds from the start
    first_token_s: npt.NDArray[np.float64]
    finish_s: npt.NDArray[np.float64]
    output_tokens: npt.NDArray[np.int64]
    errors: int
    late_sends: int  # sends more than LATE_S behind their schedule
    max_lag_s: float

    def as_sim_result(self, policy: str, energy_j: float, clock_changes: int) -> SimResult:
        """The live run in the simulator's record, for the same summaries and reports (no
        per-iteration data: the client sees tokens, not iterations)."""
        finished = self.finish_s[np.isfinite(self.finish_s)]
        return SimResult(
            policy,
            self.arrival_s,
            self.first_token_s,
            self.finish_s,
            self.output_tokens,
            energy_j,
            float(finished.max()) if finished.size else 0.0,
            clock_changes,
            np.zeros(0),
            np.zeros(0, dtype=np.int64),
        )


def replay(
    grpc_url: str,
    workload: Workload,
    *,
    speedup: float = 1.0,
    model: str = "tensorrt_llm",
    max_tokens: Callable[[int], int] = lambda prompt: 2048,
    progress: Callable[[int, int], None] | None = None,
    timeout_s: float = 120.0,
) -> ReplayResult:
    import tritonclient.grpc as grpcclient

    n = len(workload.requests)
    first = np.full(n, np.nan)
    last = np.full(n, np.nan)
    tokens = np.zeros(n, dtype=np.int64)
    finals: queue.Queue[int] = queue.Queue()
    errors = 0
    lock = threading.Lock()

    def on_response(result: object, error: object) -> None:
        nonlocal errors
        now = time.monotonic()
        if error is not None:
            with lock:
                errors += 1
            log.warning("request failed: %s", error)
            return
        response = result.get_response()  # type: ignore[attr-defined]
        i = int(response.id)
        ids = result.as_numpy("output_ids")  # type: ignore[attr-defined]
        lengths = result.as_numpy("sequence_length")  # type: ignore[attr-defined]
        got = int(lengths.reshape(-1)[0]) if lengths is not None else 0
        with lock:
            if ids is not None and got:
                if np.isnan(first[i]):
                    first[i] = now
                last[i] = now
                tokens[i] += got
        final = response.parameters.get("triton_final_response")
        if final is not None and final.bool_param:
            finals.put(i)

    client = grpcclient.InferenceServerClient(grpc_url)
    client.start_stream(callback=on_response)
    sent = np.full(n, np.nan)
    late, max_lag = 0, 0.0
    done = 0
    start = time.monotonic()
    try:
        for i, req in enumerate(workload.requests):
            due = start + req.arrival_s / speedup
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            lag = time.monotonic() - due
            if lag > LATE_S:
                late += 1
            max_lag = max(max_lag, lag)
            prompt = np.arange(1, req.prompt_tokens + 1, dtype=np.int32).reshape(1, -1) % 30000
            inputs = []
            for name, array, dtype in (
                ("input_ids", prompt + 1, "INT32"),
                ("input_lengths", np.array([[req.prompt_tokens]], np.int32), "INT32"),
                (
                    "request_output_len",
                    np.array([[max_tokens(req.prompt_tokens)]], np.int32),
                    "INT32",
                ),
                ("streaming", np.array([[True]]), "BOOL"),
            ):
                t = grpcclient.InferInput(name, list(array.shape), dtype)
                t.set_data_from_numpy(array)
                inputs.append(t)
            sent[i] = time.monotonic()
            client.async_stream_infer(
                model, inputs, request_id=str(i), enable_empty_final_response=True
            )
            if progress is not None:
                progress(i + 1, n)
        deadline = time.monotonic() + timeout_s
        while done < n and time.monotonic() < deadline:
            try:
                finals.get(timeout=0.5)
                done += 1
            except queue.Empty:
                continue
    finally:
        # Requests still open after the timeout are cancelled (and reported below as such).
        client.stop_stream(cancel_requests=done < n)
        client.close()
    if late:
        log.warning(
            "the client fell behind its schedule for %d of %d sends (max %.0f ms): "
            "client-side delays are in these numbers",
            late,
            n,
            max_lag * 1000,
        )

    def engine(t: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        return (t - start) * speedup

    return ReplayResult(engine(sent), engine(first), engine(last), tokens, errors, late, max_lag)
