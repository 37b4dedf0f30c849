"""Fault tests with real processes: `throttllem clockd` over the NVML double (real pynvml) or the
twin, a controller-like client process, and signals. However the client ends, its GPU is back at
default clocks within 2 s; the daemon resets on start and on SIGTERM/SIGINT."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from gpu_test_support import FakeNvml, read_line, request, short_socket_dir, wait_until

RESET_DEADLINE_S = 2.0  # the promise

# A stand-in for the controller: locks GPU 0 through the daemon, says so, then idles forever.
CLIENT = """
import sys
from pathlib import Path
from throttllem.controller.gpu.clockd_client import ClockdClient
client = ClockdClient.connect(Path(sys.argv[1]), lease_s=float(sys.argv[2]))
client.set_locked_clocks([0], 900, 900)
print("locked", flush=True)
sys.stdin.read()
"""


class Processes:
    """Every process a test starts, killed and reaped at teardown whatever happened."""

    def __init__(self, log_dir: Path) -> None:
        self._log_dir = log_dir
        self._procs: list[subprocess.Popen[str]] = []

    def start(self, *args: str, name: str) -> subprocess.Popen[str]:
        log = open(self._log_dir / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            [sys.executable, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        log.close()  # the child holds its own descriptor
        self._procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self._log_dir / f"{name}.log").read_text()

    def stop_all(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    stream.close()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    p = Processes(tmp_path)
    try:
        yield p
    finally:
        p.stop_all()


@pytest.fixture
def sock_path() -> Iterator[Path]:
    with short_socket_dir() as d:
        yield d / "clockd.sock"


def start_clockd(procs: Processes, sock_path: Path, *extra: str) -> subprocess.Popen[str]:
    proc = procs.start(
        "-m",
        "throttllem.controller.cli",
        "clockd",
        "--socket",
        str(sock_path),
        "--max-lease-s",
        "2",
        "--log-level",
        "debug",
        *extra,
        name="clockd",
    )

    def ready() -> bool:
        assert proc.poll() is None, f"clockd exited early:\n{procs.log('clockd')}"
        try:
            return bool(request(sock_path, {"op": "hello"})["ok"])
        except OSError:
            return False

    wait_until(ready, 20.0, "clockd to listen")
    return proc


def start_client(procs: Processes, sock_path: Path, lease_s: float) -> subprocess.Popen[str]:
    proc = procs.start("-c", CLIENT, str(sock_path), str(lease_s), name="client")
    assert read_line(proc, 20.0) == "locked", procs.log("client")
    return proc


def twin_gpu0_lock(sock_path: Path) -> Callable[[], list[int] | None]:
    def lock() -> list[int] | None:
        value: list[int] | None = request(sock_path, {"op": "status"})["gpus"][0]["locked_mhz"]
        return value

    return lock


def test_sigkill_of_the_client_resets_the_gpu_within_2_s(
    fake_nvml: FakeNvml, procs: Processes, sock_path: Path
) -> None:
    fake_nvml.configure(gpu_count=2)
    start_clockd(procs, sock_path)
    client = start_client(procs, sock_path, lease_s=1.0)
    assert fake_nvml.locks() == {0: (900, 900), 1: None}
    client.send_signal(signal.SIGKILL)
    took_s = wait_until(
        lambda: fake_nvml.locks()[0] is None, RESET_DEADLINE_S, "GPU 0 back at default clocks"
    )
    print(f"reset {took_s * 1000:.0f} ms after SIGKILL")


def test_a_hung_client_loses_its_lease_within_2_s(
    fake_nvml: FakeNvml, procs: Processes, sock_path: Path
) -> None:
    start_clockd(procs, sock_path)
    client = start_client(procs, sock_path, lease_s=0.5)
    # Stopped, not dead: its connection stays open, only the lease can save the GPU.
    client.send_signal(signal.SIGSTOP)
    wait_until(lambda: fake_nvml.locks()[0] is None, RESET_DEADLINE_S, "lease lapse")
    assert client.poll() is None  # still there (stopped): the lease did it, not a disconnect


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stopping_the_daemon_resets_and_removes_its_socket(
    fake_nvml: FakeNvml, procs: Processes, sock_path: Path, sig: signal.Signals
) -> None:
    clockd = start_clockd(procs, sock_path)
    start_client(procs, sock_path, lease_s=2.0)
    assert fake_nvml.locks()[0] == (900, 900)
    clockd.send_signal(sig)
    assert clockd.wait(10) == 0, procs.log("clockd")
    assert fake_nvml.locks()[0] is None
    assert not sock_path.exists()


def test_start_resets_locks_a_crashed_run_left(
    fake_nvml: FakeNvml, procs: Processes, sock_path: Path
) -> None:
    fake_nvml.configure(gpu_count=3)
    fake_nvml.seed_locks({0: (600, 600), 1: None, 2: (210, 705)})
    start_clockd(procs, sock_path, "--gpus", "0,2")
    assert fake_nvml.locks() == {0: None, 1: None, 2: None}
    assert fake_nvml.writes(1) == 0  # not ours to touch


def test_only_the_daemons_user_can_connect(
    fake_nvml: FakeNvml, procs: Processes, sock_path: Path
) -> None:
    start_clockd(procs, sock_path)
    assert sock_path.stat().st_mode & 0o777 == 0o600
    assert sock_path.stat().st_uid == os.geteuid()
    if os.geteuid() != 0:
        pytest.skip("connecting as a second user needs root to switch users")
    assert connects_as_nobody(sock_path) == "refused"
    # The same check passes once the mode allows it, so it is the mode that refused.
    sock_path.chmod(0o666)
    assert connects_as_nobody(sock_path) == "connected"


def connects_as_nobody(path: Path) -> str:
    """Try to connect from a forked child running as user and group nobody (65534). A fork,
    not a new interpreter: nobody may not be able to read this interpreter's files."""
    read_fd, write_fd = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12 warns about fork() while threads run; the child only connects and exits.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:
        verdict = b"?"
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(path))
            verdict = b"c"
        except PermissionError:
            verdict = b"r"
        finally:
            os.write(write_fd, verdict)
            os._exit(0)
    os.close(write_fd)
    try:
        verdict = os.read(read_fd, 1)
    finally:
        os.close(read_fd)
        os.waitpid(pid, 0)
    return {b"c": "connected", b"r": "refused"}.get(verdict, "failed")


def test_daemon_without_permission_exits_with_the_fix(
    fake_nvml: FakeNvml, procs: Processes, sock_path: Path
) -> None:
    fake_nvml.configure(privileged=0)
    proc = procs.start(
        "-m", "throttllem.controller.cli", "clockd", "--socket", str(sock_path), name="clockd"
    )
    assert proc.wait(20) == 1
    assert "CAP_SYS_ADMIN" in procs.log("clockd")
    assert not sock_path.exists()


def test_sigkill_of_the_client_resets_the_twin_gpu_within_2_s(
    procs: Processes, sock_path: Path
) -> None:
    start_clockd(procs, sock_path, "--driver", "twin", "--twin-count", "2")
    client = start_client(procs, sock_path, lease_s=1.0)
    lock = twin_gpu0_lock(sock_path)
    assert lock() == [900, 900]
    client.send_signal(signal.SIGKILL)
    wait_until(lambda: lock() is None, RESET_DEADLINE_S, "twin GPU 0 back at default clocks")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gpus", "0,x"], "--gpus"),
        (["--gpus", "-1"], "non-negative"),
        (["--driver", "twin", "--twin-gpu", "Z9000"], "Z9000"),
        (["--driver", "twin", "--twin-count", "0"], "--twin-count"),
        (["--max-lease-s", "0"], "--max-lease-s"),
        (["--group", "no-such-group-xyz"], "no-such-group-xyz"),
    ],
)
def test_bad_command_lines_get_one_line_and_status_2(
    sock_path: Path, args: list[str], message: str
) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "throttllem.controller.cli",
            "clockd",
            "--socket",
            str(sock_path),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not sock_path.exists()
