"""The clock daemon and its client, in-process over twin GPUs (fault tests with real processes
and the NVML double are in test_clockd_faults.py)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from gpu_test_support import request, short_socket_dir, wait_until

from throttllem.backend.twin.gpu import TwinGpu
from throttllem.backend.twin.hardware import default_catalog
from throttllem.backend.twin.time_source import VirtualTime
from throttllem.controller.gpu.clockd import ClockDaemon
from throttllem.controller.gpu.clockd_client import ClockdClient
from throttllem.controller.gpu.driver import ClockDriver, WriteOutcome
from throttllem.controller.gpu.errors import (
    ClockdError,
    DaemonUnavailable,
    InvalidArgument,
    LeaseConflict,
    NoPermission,
)
from throttllem.controller.gpu.twin_driver import TwinDriver


def twin_gpus(n: int = 2, *, privileged: bool = True) -> list[TwinGpu]:
    spec = default_catalog().gpu("A100-SXM4-40GB")
    # No clock-change delay: a lock is in force the moment the daemon writes it.
    return [
        TwinGpu(spec, VirtualTime(), index=i, clock_change_latency_ms=0.0, privileged=privileged)
        for i in range(n)
    ]


@pytest.fixture
def sock_path() -> Iterator[Path]:
    with short_socket_dir() as d:
        yield d / "clockd.sock"


@contextmanager
def running(daemon: ClockDaemon) -> Iterator[ClockDaemon]:
    ready = threading.Event()
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            daemon.serve_forever(on_ready=ready.set)
        except BaseException as e:
            errors.append(e)
            ready.set()

    thread = threading.Thread(target=serve, name="clockd-under-test")
    thread.start()
    try:
        assert ready.wait(10), "clock daemon did not start"
        if errors:
            raise errors[0]
        yield daemon
    finally:
        daemon.stop()
        thread.join(10)
        assert not thread.is_alive(), "clock daemon did not stop"


@pytest.fixture
def gpus() -> list[TwinGpu]:
    return twin_gpus()


@pytest.fixture
def daemon(gpus: list[TwinGpu], sock_path: Path) -> Iterator[ClockDaemon]:
    driver = TwinDriver(gpus)
    with running(ClockDaemon(driver, sock_path, max_lease_s=2.0)) as d:
        yield d
    driver.close()


@pytest.fixture
def client(daemon: ClockDaemon) -> Iterator[ClockdClient]:
    c = ClockdClient.connect(daemon.socket_path, lease_s=0.3, renew_every_s=0.05)
    yield c
    c.close()


def test_client_is_a_clock_driver_with_the_daemons_gpus(
    client: ClockdClient, gpus: list[TwinGpu]
) -> None:
    assert isinstance(client, ClockDriver)
    assert client.gpu_indices() == (0, 1)
    assert client.supported_clocks_mhz(1) == tuple(gpus[1].supported_clocks_mhz())
    assert client.sm_clock_mhz(0) == gpus[0].sm_clock_mhz()
    assert client.enforced_power_limit_mw(1) == gpus[1].enforced_power_limit_mw()
    assert client.power_usage_mw(0) == gpus[0].power_usage_mw()
    assert client.total_energy_mj(0) == gpus[0].total_energy_mj()


def test_locks_go_through_and_the_lease_is_renewed(
    client: ClockdClient, gpus: list[TwinGpu], sock_path: Path
) -> None:
    assert client.set_locked_clocks([0, 1], 900, 1005) is WriteOutcome.APPLIED
    assert [g.locked_clocks_mhz() for g in gpus] == [(900, 1005), (900, 1005)]
    assert client.set_locked_clocks([0, 1], 900, 1005) is WriteOutcome.UNCHANGED
    assert client.set_latency().count == 1
    # Three lease lengths with no request from the controller: the background renewal alone
    # keeps the lock.
    time.sleep(0.9)
    assert gpus[0].locked_clocks_mhz() == (900, 1005)
    status = request(sock_path, {"op": "status"})
    assert status["gpus"][0]["locked_mhz"] == [900, 1005]
    assert status["gpus"][0]["lease_holder_pid"] is not None


def test_close_resets_and_releases(daemon: ClockDaemon, gpus: list[TwinGpu]) -> None:
    c = ClockdClient.connect(daemon.socket_path, lease_s=0.5)
    c.set_locked_clocks([1], 600, 600)
    assert gpus[1].locked_clocks_mhz() == (600, 600)
    c.close()
    assert gpus[1].locked_clocks_mhz() is None
    # Released: another client may take GPU 1 at once.
    with ClockdClient.connect(daemon.socket_path) as other:
        assert other.set_locked_clocks([1], 705, 705) is WriteOutcome.APPLIED


def test_a_lease_nobody_renews_lapses_and_resets(daemon: ClockDaemon, gpus: list[TwinGpu]) -> None:
    with socket.socket(socket.AF_UNIX) as raw:  # a client that sets and then hangs
        raw.connect(str(daemon.socket_path))
        reply = request(
            raw, {"op": "set", "gpus": [0], "min_mhz": 795, "max_mhz": 795, "lease_s": 0.2}
        )
        assert reply["outcome"] == "applied"
        assert gpus[0].locked_clocks_mhz() == (795, 795)
        took_s = wait_until(lambda: gpus[0].locked_clocks_mhz() is None, 2.0, "lease lapse")
        assert took_s < 1.0
        late = request(raw, {"op": "renew", "lease_s": 0.2})
        assert late["ok"] is False and late["error"] == "lease_lost"


def test_closing_the_connection_resets_at_once(daemon: ClockDaemon, gpus: list[TwinGpu]) -> None:
    raw = socket.socket(socket.AF_UNIX)
    raw.connect(str(daemon.socket_path))
    request(raw, {"op": "set", "gpus": [0, 1], "min_mhz": 795, "max_mhz": 795, "lease_s": 2.0})
    raw.close()
    took_s = wait_until(lambda: all(g.locked_clocks_mhz() is None for g in gpus), 2.0, "reset")
    assert took_s < 0.5  # not the 2 s lease: the disconnect itself triggers the reset


def test_a_gpu_leased_by_one_client_is_refused_to_another(
    client: ClockdClient, daemon: ClockDaemon, gpus: list[TwinGpu]
) -> None:
    client.set_locked_clocks([0], 900, 900)
    with ClockdClient.connect(daemon.socket_path) as other:
        with pytest.raises(LeaseConflict, match="GPU 0"):
            other.set_locked_clocks([0, 1], 1005, 1005)
        assert gpus[1].locked_clocks_mhz() is None  # the refused request changed nothing
        with pytest.raises(LeaseConflict):
            other.reset_locked_clocks([0])
        assert other.set_locked_clocks([1], 1005, 1005) is WriteOutcome.APPLIED
        assert other.sm_clock_mhz(0) > 0  # reads are open to every client
    assert gpus[0].locked_clocks_mhz() == (900, 900)


def test_clients_scoped_to_their_gpus_do_not_conflict(sock_path: Path) -> None:
    """One client per engine instance, each for its own GPUs (what the controller opens with
    --driver clockd): both lock at once, and each close resets only its own GPUs."""
    gpus = twin_gpus(4)
    driver = TwinDriver(gpus)
    with running(ClockDaemon(driver, sock_path)) as daemon:
        first = ClockdClient.connect(daemon.socket_path, gpus=[0, 1])
        second = ClockdClient.connect(daemon.socket_path, gpus=[3, 2])
        assert first.gpu_indices() == (0, 1) and second.gpu_indices() == (3, 2)
        assert first.set_locked_clocks(first.gpu_indices(), 900, 900) is WriteOutcome.APPLIED
        assert second.set_locked_clocks(second.gpu_indices(), 705, 705) is WriteOutcome.APPLIED
        assert [g.locked_clocks_mhz() for g in gpus] == [(900, 900)] * 2 + [(705, 705)] * 2
        with pytest.raises(InvalidArgument, match="no GPU 2"):
            first.set_locked_clocks([2], 900, 900)  # not its GPU: refused before any request
        first.close()
        assert [g.locked_clocks_mhz() for g in gpus] == [None, None] + [(705, 705)] * 2
        second.close()
        assert all(g.locked_clocks_mhz() is None for g in gpus)
    driver.close()


@pytest.mark.parametrize("wanted", [[1, 7], []])
def test_a_client_for_gpus_the_daemon_does_not_serve_is_refused(
    daemon: ClockDaemon, wanted: list[int]
) -> None:
    with pytest.raises(InvalidArgument, match=r"serves GPUs \[0, 1\]"):
        ClockdClient.connect(daemon.socket_path, gpus=wanted)


def test_bad_requests_get_error_replies(daemon: ClockDaemon) -> None:
    with socket.socket(socket.AF_UNIX) as raw:
        raw.connect(str(daemon.socket_path))
        for bad, kind in [
            (b"not json\n", "invalid_argument"),
            (b'{"op": "launch"}\n', "invalid_argument"),
            (
                b'{"op": "set", "gpus": [0], "min_mhz": "900", "max_mhz": 900, "lease_s": 1}\n',
                "invalid_argument",
            ),
            (
                b'{"op": "set", "gpus": [0], "min_mhz": 900, "max_mhz": 900, "lease_s": 60}\n',
                "invalid_argument",
            ),
            (
                b'{"op": "set", "gpus": [7], "min_mhz": 900, "max_mhz": 900, "lease_s": 1}\n',
                "invalid_argument",
            ),
            (b'{"op": "read", "gpu": 0, "quantity": "__class__"}\n', "invalid_argument"),
        ]:
            raw.sendall(bad)
            reply = request(raw, None)
            assert (reply["ok"], reply["error"]) == (False, kind), bad
        assert request(raw, {"op": "hello"})["ok"] is True  # still served
        raw.sendall(b"x" * 70_000)  # no newline, ever: dropped
        assert raw.recv(1) == b""


def test_client_reconnects_after_the_daemon_restarts(gpus: list[TwinGpu], sock_path: Path) -> None:
    driver = TwinDriver(gpus)
    with running(ClockDaemon(driver, sock_path)):
        c = ClockdClient.connect(sock_path, lease_s=1.0)
        c.set_locked_clocks([0], 900, 900)
    assert gpus[0].locked_clocks_mhz() is None  # the daemon reset on its way out
    with pytest.raises(DaemonUnavailable):
        c.set_locked_clocks([0], 1005, 1005)
    with running(ClockDaemon(driver, sock_path)):
        # Not skipped as "already in force": the client knows its lease died with the daemon.
        assert c.set_locked_clocks([0], 900, 900) is WriteOutcome.APPLIED
        assert gpus[0].locked_clocks_mhz() == (900, 900)
        c.close()
    driver.close()


def test_daemon_without_permission_refuses_to_start(sock_path: Path) -> None:
    driver = TwinDriver(twin_gpus(privileged=False))
    with pytest.raises(NoPermission, match="CAP_SYS_ADMIN"):
        ClockDaemon(driver, sock_path).serve_forever()
    assert not sock_path.exists()


def test_socket_is_private_and_a_live_daemon_is_not_replaced(
    daemon: ClockDaemon, sock_path: Path
) -> None:
    assert sock_path.stat().st_mode & 0o777 == 0o600
    second = ClockDaemon(TwinDriver(twin_gpus()), sock_path)
    with pytest.raises(ClockdError, match="already listening"):
        second.serve_forever()


def test_leftover_socket_is_replaced_but_other_files_are_not(sock_path: Path) -> None:
    leftover = socket.socket(socket.AF_UNIX)
    leftover.bind(str(sock_path))
    leftover.close()  # a dead daemon's socket file: nobody listens
    driver = TwinDriver(twin_gpus())
    with running(ClockDaemon(driver, sock_path, socket_mode=0o660)):
        assert sock_path.stat().st_mode & 0o777 == 0o660
        assert request(sock_path, {"op": "hello"})["version"] == 1
    assert not sock_path.exists()
    sock_path.write_text("not a socket")
    with pytest.raises(ClockdError, match="not a socket"):
        ClockDaemon(driver, sock_path).serve_forever()
    with pytest.raises(ValueError, match="other users"):
        ClockDaemon(driver, sock_path, socket_mode=0o666)


def test_client_lease_is_bounded_by_the_daemon(daemon: ClockDaemon) -> None:
    with pytest.raises(InvalidArgument, match="maximum"):
        ClockdClient.connect(daemon.socket_path, lease_s=5.0)
    with pytest.raises(InvalidArgument, match="renew_every_s"):
        ClockdClient.connect(daemon.socket_path, lease_s=1.0, renew_every_s=1.0)


def test_connecting_to_no_daemon_is_daemon_unavailable(sock_path: Path) -> None:
    with pytest.raises(DaemonUnavailable, match=str(sock_path)):
        ClockdClient.connect(sock_path)
