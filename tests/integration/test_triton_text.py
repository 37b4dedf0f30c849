"""Text through the ensemble (preprocessing -> tensorrt_llm -> postprocessing), over gRPC and
Triton's HTTP generate / generate_stream endpoints."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import numpy as np
import pytest
from triton_support import Stream, Telemetry, tensor

from throttllem.controller.triton_launcher import TritonServer

pytestmark = pytest.mark.integration


def post(triton: TritonServer, path: str, body: dict[str, Any]) -> tuple[int, str]:
    request = urllib.request.Request(
        f"http://{triton.http_url}{path}", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"}, method="POST",
    )  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return int(resp.status), resp.read().decode()
    except urllib.error.HTTPError as e:
        return int(e.code), e.read().decode()


def test_generate_returns_text(triton: TritonServer, telemetry: Telemetry) -> None:
    prompt = "Bonjour, ça va?"
    status, body = post(
        triton, "/v2/models/ensemble/generate", {"text_input": prompt, "max_tokens": 9}
    )
    assert status == 200, body
    text = json.loads(body)["text_output"]
    # One pseudo-word per token (a generated id below 256 decodes to its raw byte instead).
    assert isinstance(text, str) and 7 <= len(text.split()) <= 9
    # The byte-level tokenizer: the prompt is its UTF-8 bytes.
    telemetry.wait_until(lambda: bool(telemetry.of_kind("finished")))
    (arrived,) = telemetry.of_kind("arrived")
    assert arrived.prompt_tokens == len(prompt.encode("utf-8")) and arrived.max_tokens == 9


def test_generate_stream_sends_one_event_per_token(triton: TritonServer) -> None:
    status, body = post(
        triton, "/v2/models/ensemble/generate_stream",
        {"text_input": "Hello", "max_tokens": 6, "stream": True},
    )  # fmt: skip
    assert status == 200, body
    events = [json.loads(line[5:]) for line in body.splitlines() if line.startswith("data:")]
    pieces = [e["text_output"] for e in events if "text_output" in e]
    assert len(pieces) == 6 and sum(bool(p.strip()) for p in pieces) >= 5


def test_generate_reports_bad_input(triton: TritonServer) -> None:
    status, body = post(
        triton, "/v2/models/ensemble/generate", {"text_input": "Hi", "max_tokens": 0}
    )
    assert status >= 400 and "request_output_len" in body


def test_ensemble_over_grpc_streaming(triton: TritonServer) -> None:
    s = Stream(triton.grpc_url)
    try:
        inputs = [
            tensor("text_input", np.array([["Once upon a time"]], dtype=object), "BYTES"),
            tensor("max_tokens", np.array([[5]], np.int32)),
            tensor("stream", np.array([[True]])),
        ]
        out = s.call("text-1", inputs, model="ensemble")
        assert out.error is None and out.finals == 1
        pieces = [m.text for m in out.messages if m.text is not None]
        assert len(pieces) == 5 and sum(bool(p.strip()) for p in pieces) >= 4
    finally:
        s.close()
