"""`throttllem serve` as a user runs it: ready line, telemetry endpoints, SIGTERM / SIGINT stop
everything it started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from throttllem.controller.triton_launcher import free_ports

pytestmark = pytest.mark.integration


def processes_using(folder: Path) -> list[int]:
    """Pids whose command line mentions `folder` (tritonserver and its stubs do)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(folder) in cmdline and int(entry.name) != os.getpid():
            found.append(int(entry.name))
    return found


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_until_signalled(tmp_path: Path, sig: signal.Signals) -> None:
    work = tmp_path / "work"
    ports = [str(p) for p in free_ports(4)]
    cmd = [
        sys.executable, "-m", "throttllem.controller.cli", "serve", "--engine", "twin",
        "--speedup", "10", "--instances", "2", "--work-dir", str(work),
        "--http-port", ports[0], "--grpc-port", ports[1], "--metrics-port", ports[2],
        "--controller-metrics-port", ports[3], "--perf-model", "oracle",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "controller running" in line:
                break
        output = "".join(lines)
        assert "ready" in output, output
        assert f"HTTP http://127.0.0.1:{ports[0]}" in output
        assert output.count("telemetry tensorrt_llm/tensorrt_llm_0_") == 2
        assert f"controller running, metrics http://127.0.0.1:{ports[3]}/metrics" in output
        assert processes_using(work), "no tritonserver running"
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    deadline = time.monotonic() + 10
    while processes_using(work) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_using(work) == []
