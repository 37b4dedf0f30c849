"""A registered instance whose process died but was not reaped yet (a zombie, as a killed
Python-backend stub stays until Triton reaps it) counts as gone."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from throttllem.backend.telemetry.discovery import pid_alive


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_zombie_is_not_alive_and_a_running_process_is() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)  # fmt: skip
    try:
        assert pid_alive(child.pid)
        os.kill(child.pid, 9)
        deadline = time.monotonic() + 10
        state = ""
        while state != "Z" and time.monotonic() < deadline:  # not reaped: we never wait() yet
            with open(f"/proc/{child.pid}/stat") as f:
                state = f.read().rsplit(")", 1)[-1].split()[0]
        assert state == "Z"
        assert not pid_alive(child.pid)
    finally:
        child.kill()
        child.wait()
        assert child.stdin is not None
        child.stdin.close()
