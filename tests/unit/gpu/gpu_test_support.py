"""Helpers shared by the GPU tests (imported by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

import ctypes
import json
import select
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest


@dataclass
class FakeNvml:
    """Handle on the double: its configuration (environment) and its shared lock state."""

    lib_path: Path
    state_path: Path
    lib: ctypes.CDLL
    monkeypatch: pytest.MonkeyPatch

    def configure(self, **variables: str | int) -> None:
        """Set FAKE_NVML_<NAME> variables (read at nvmlInit; FAIL is read on every call)."""
        for name, value in variables.items():
            self.monkeypatch.setenv(f"FAKE_NVML_{name.upper()}", str(value))

    def fail(self, spec: str) -> None:
        """Force return codes: "nvmlDeviceGetPowerUsage=15,nvmlDeviceSetGpuLockedClocks@1=4"."""
        self.monkeypatch.setenv("FAKE_NVML_FAIL", spec)

    def locks(self) -> dict[int, tuple[int, int] | None]:
        """Locked clocks per GPU as the "hardware" holds them (GPUs never written: absent)."""
        return {gpu: lock for gpu, (lock, _) in self._rows().items()}

    def writes(self, gpu: int) -> int:
        """Set/reset calls that reached the double for `gpu`, from any process."""
        row = self._rows().get(gpu)
        return 0 if row is None else row[1]

    def seed_locks(self, locks: dict[int, tuple[int, int] | None]) -> None:
        """Pretend an earlier run left these locks behind."""
        lines = [
            f"{gpu} 0 0 0 0" if lock is None else f"{gpu} 1 {lock[0]} {lock[1]} 0"
            for gpu, lock in sorted(locks.items())
        ]
        self.state_path.write_text("\n".join(lines) + "\n")

    def init_count(self) -> int:
        """nvmlInit calls not yet matched by nvmlShutdown in this process."""
        return int(self.lib.fake_nvml_init_count())

    def _rows(self) -> dict[int, tuple[tuple[int, int] | None, int]]:
        if not self.state_path.exists():
            return {}
        rows = {}
        for line in self.state_path.read_text().splitlines():
            gpu, locked, lo, hi, writes = (int(v) for v in line.split())
            rows[gpu] = ((lo, hi) if locked else None, writes)
        return rows


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Poll `predicate` until true; returns the seconds it took. Fails the test at the deadline."""
    start = time.monotonic()
    deadline = start + timeout_s
    while True:
        if predicate():
            return time.monotonic() - start
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.005)


def read_line(proc: subprocess.Popen[str], timeout_s: float) -> str:
    """The next stdout line of `proc`, failing the test if none comes in time."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    if not ready:
        pytest.fail(f"no output from pid {proc.pid} within {timeout_s} s")
    return proc.stdout.readline().strip()


@contextmanager
def short_socket_dir() -> Iterator[Path]:
    """A fresh directory with a short path (a Unix socket path must fit in 108 bytes), open to
    other users (0755) so that only the socket's own mode decides who may connect."""
    d = Path(tempfile.mkdtemp(prefix="clockd-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def request(target: Path | socket.socket, message: dict[str, Any] | None) -> dict[str, Any]:
    """Send one request line (None: send nothing, just read) and return the reply object.
    A path opens a connection for this request only."""
    if isinstance(target, Path):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5.0)
            sock.connect(str(target))
            return request(sock, message)
    target.settimeout(5.0)
    if message is not None:
        target.sendall(json.dumps(message).encode() + b"\n")
    line = b""
    while not line.endswith(b"\n"):
        chunk = target.recv(65536)
        if not chunk:
            raise ConnectionError("clock daemon closed the connection")
        line += chunk
    reply: dict[str, Any] = json.loads(line)
    return reply
