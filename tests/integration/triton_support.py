"""Helpers of the integration tests: a real tritonserver with the throttllem repository, gRPC
streams that keep every response in order, and a telemetry subscriber."""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import tritonclient.grpc as grpcclient

from throttllem.backend.telemetry.discovery import InstanceEndpoint, discover
from throttllem.controller.triton_launcher import RepositorySpec, TritonServer, running_triton
from throttllem.v1 import telemetry_pb2 as pb
from throttllem.v1 import telemetry_pb2_grpc as pb_grpc

LLM = "tensorrt_llm"
LLM_SYNC = "tensorrt_llm_sync"
WAIT_S = 30.0
MAX_INPUT_LEN = 512
MAX_OUTPUT_LEN = 1024

# The twin at 5x real time: Llama-3-8B on an A100 runs ~14 ms iterations, ~2.8 ms here. Every
# request "wants" 100000 tokens, so request_output_len decides its length (finish: LENGTH).
BASE_PARAMETERS = {
    "engine": "twin",
    "twin_gpu": "A100-SXM4-40GB",
    "twin_model": "llama-3-8b",
    "twin_speedup": "5",
    "twin_output_len": "100000",
    "twin_max_input_len": str(MAX_INPUT_LEN),
    "max_output_len": str(MAX_OUTPUT_LEN),
    "exclude_input_in_output": "true",
    "cancellation_check_period_ms": "20",
    "stats_check_period_ms": "10",
}


@contextlib.contextmanager
def llm_server(
    tmp: Path, *, instances: int = 1, extra: dict[str, str] | None = None, text: bool = True
) -> Iterator[TritonServer]:
    params = {**BASE_PARAMETERS, "telemetry_registry_dir": str(tmp / "registry"), **(extra or {})}
    models = (LLM, "preprocessing", "postprocessing", "ensemble") if text else (LLM,)
    spec = RepositorySpec(
        parameters=params, instances=instances, variants={LLM_SYNC: False}, models=models
    )
    ready = (LLM, LLM_SYNC, "ensemble") if text else (LLM, LLM_SYNC)
    with running_triton(spec, work_dir=tmp / "triton", ready_models=ready) as server:
        yield server


def registry_of(server: TritonServer) -> Path:
    return server.work_dir.parent / "registry"


def endpoints(server: TritonServer, model: str = LLM) -> list[InstanceEndpoint]:
    return discover(registry_of(server), model)


def tensor(name: str, array: np.ndarray[Any, Any], dtype: str | None = None) -> Any:
    kinds = {np.dtype(np.int32): "INT32", np.dtype(np.bool_): "BOOL",
             np.dtype(np.float32): "FP32", np.dtype(np.uint64): "UINT64"}  # fmt: skip
    t = grpcclient.InferInput(name, list(array.shape), dtype or kinds[array.dtype])
    t.set_data_from_numpy(array)
    return t


def llm_inputs(
    prompt: list[int] | int = 8,
    max_tokens: int = 4,
    *,
    streaming: bool | None = None,
    stop: bool | None = None,
    perf: bool = False,
) -> list[Any]:
    ids = list(range(1, prompt + 1)) if isinstance(prompt, int) else prompt
    out = [
        tensor("input_ids", np.array([ids], np.int32)),
        tensor("input_lengths", np.array([[len(ids)]], np.int32)),
        tensor("request_output_len", np.array([[max_tokens]], np.int32)),
    ]
    if streaming is not None:
        out.append(tensor("streaming", np.array([[streaming]])))
    if stop is not None:
        out.append(tensor("stop", np.array([[stop]])))
    if perf:
        out.append(tensor("return_perf_metrics", np.array([[True]])))
    return out


@dataclass
class Message:
    request_id: str | None  # None for errors (the client library drops the id)
    final: bool
    tokens: list[int]
    error: str | None
    received_ns: int
    emit_ns: int = 0
    text: str | None = None


@dataclass
class Outcome:
    messages: list[Message] = field(default_factory=list)

    @property
    def tokens(self) -> list[int]:
        return [t for m in self.messages for t in m.tokens]

    @property
    def finals(self) -> int:
        return sum(m.final for m in self.messages)

    @property
    def error(self) -> str | None:
        errors = [m.error for m in self.messages if m.error]
        return errors[0] if errors else None


class Stream:
    """One bidirectional gRPC stream (tritonclient allows one per client)."""

    def __init__(self, url: str) -> None:
        self.client = grpcclient.InferenceServerClient(url)
        self._inbox: queue.Queue[Message] = queue.Queue()
        self.client.start_stream(callback=self._on_response)
        self.stray: list[Message] = []

    def _on_response(self, result: Any, error: Any) -> None:
        now = time.time_ns()
        if error is not None:
            self._inbox.put(Message(None, True, [], str(error), now))
            return
        response = result.get_response()
        params = response.parameters
        final = params["triton_final_response"].bool_param if "triton_final_response" in params \
            else False  # fmt: skip
        tokens: list[int] = []
        ids = result.as_numpy("output_ids")
        if ids is not None:
            length = result.as_numpy("sequence_length")
            n = int(length.reshape(-1)[0]) if length is not None else ids.shape[-1]
            tokens = [int(t) for t in ids.reshape(ids.shape[0], -1)[0][:n]]
        emit = result.as_numpy("emit_time_ns")
        emit_ns = int(emit.reshape(-1)[0]) if emit is not None else 0
        text = result.as_numpy("text_output")
        decoded = None if text is None else b"".join(text.reshape(-1)).decode("utf-8", "replace")
        self._inbox.put(Message(response.id, final, tokens, None, now, emit_ns, decoded))

    def send(
        self,
        request_id: str,
        inputs: list[Any],
        *,
        model: str = LLM,
        parameters: dict[str, Any] | None = None,
    ) -> None:
        self.client.async_stream_infer(
            model, inputs, request_id=request_id, parameters=parameters,
            enable_empty_final_response=True,
        )  # fmt: skip

    def collect(self, request_id: str, timeout_s: float = WAIT_S) -> Outcome:
        """Messages of `request_id` until its FINAL one (an error counts as final: one request
        at a time per stream when errors are expected)."""
        out = Outcome()
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no final response for {request_id!r} in {timeout_s} s")
            try:
                msg = self._inbox.get(timeout=left)
            except queue.Empty:
                continue
            if msg.request_id not in (request_id, None):
                self.stray.append(msg)
                continue
            out.messages.append(msg)
            if msg.final:
                return out

    def collect_all(self, request_ids: list[str], timeout_s: float = WAIT_S) -> dict[str, Outcome]:
        """Messages of many concurrent requests, each until its FINAL one."""
        out = {rid: Outcome() for rid in request_ids}
        for msg in self.stray:
            if msg.request_id in out:
                out[msg.request_id].messages.append(msg)
        self.stray = [m for m in self.stray if m.request_id not in out]
        open_ids = {rid for rid, o in out.items() if not o.finals}
        deadline = time.monotonic() + timeout_s
        while open_ids:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no final response for {sorted(open_ids)[:5]} in time")
            try:
                msg = self._inbox.get(timeout=left)
            except queue.Empty:
                continue
            if msg.request_id not in out:
                self.stray.append(msg)
                continue
            out[msg.request_id].messages.append(msg)
            if msg.final:
                open_ids.discard(msg.request_id)
        return out

    def call(self, request_id: str, inputs: list[Any], **kw: Any) -> Outcome:
        self.send(request_id, inputs, **kw)
        return self.collect(request_id)

    def close(self, cancel: bool = False) -> None:
        self.client.stop_stream(cancel_requests=cancel)
        self.client.close()


class Telemetry:
    """A subscriber on one instance's endpoint, collecting events in the background."""

    def __init__(self, endpoint: str, *, snapshot_first: bool = True, buffer_delay_s: float = 0):
        self.channel = grpc.insecure_channel(endpoint)
        self.stub = pb_grpc.TelemetryStub(self.channel)
        self.gpu = pb_grpc.GpuControlStub(self.channel)
        self.events: list[Any] = []
        self.snapshot: Any = None
        self._lock = threading.Lock()
        self._delay = buffer_delay_s
        self._call = self.stub.Subscribe(pb.SubscribeRequest(snapshot_first=snapshot_first))
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        with contextlib.suppress(grpc.RpcError):
            for batch in self._call:
                if batch.HasField("snapshot"):
                    self.snapshot = batch.snapshot
                with self._lock:
                    self.events.extend(batch.events)
                if self._delay:
                    time.sleep(self._delay)

    def of_kind(self, kind: str) -> list[Any]:
        with self._lock:
            return [getattr(e, kind) for e in self.events if e.WhichOneof("kind") == kind]

    def wait_until(self, check: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError("telemetry: condition not met in time")
            time.sleep(0.01)

    def close(self) -> None:
        self._call.cancel()
        self._thread.join(timeout=5)
        self.channel.close()


def wait_idle(telemetry_stub: Any, timeout_s: float = WAIT_S) -> None:
    """Poll GetSnapshot until no request is in flight."""
    deadline = time.monotonic() + timeout_s
    while telemetry_stub.GetSnapshot(pb.GetSnapshotRequest()).requests:
        if time.monotonic() > deadline:
            raise AssertionError("requests still in flight")
        time.sleep(0.02)


def wait_drained(telemetry_stub: Any, timeout_s: float = WAIT_S) -> Any:
    """Poll GetSnapshot until nothing is in flight and the last iteration holds no KV block."""
    deadline = time.monotonic() + timeout_s
    while True:
        snap = telemetry_stub.GetSnapshot(pb.GetSnapshotRequest())
        if not snap.requests and snap.last_iteration.kv_used_blocks == 0:
            return snap
        if time.monotonic() > deadline:
            raise AssertionError(f"engine not drained: {snap}")
        time.sleep(0.02)
