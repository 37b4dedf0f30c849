"""`throttllem clockd`: the small privileged process that owns GPU clock locks.

Locked clocks outlive the process that set them, so the controller never sets them itself: it
asks this daemon, under a lease it must keep renewing. The daemon resets a GPU's clocks when:
- the lease lapses (the controller hung, or died in a way that left its connection open),
- the client's connection closes (the controller exited or was killed, SIGKILL included: the
  kernel closes the socket),
- the daemon starts (locks a crashed earlier run left behind) and when it stops (SIGTERM,
  SIGINT, normal exit, or an error in its loop).

It listens on a Unix socket that only its user (mode 0600) or a chosen group (0660) can open.
One thread, one selector: requests are handled in order, so there is no locking here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
import stat
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import wire
from .driver import ClockDriver, WriteOutcome
from .errors import ClockdError, GpuError, InvalidArgument, NoPermission
from .guarded import PERMISSION_HELP
from .lease import LeaseTable

log = logging.getLogger(__name__)

DEFAULT_MAX_LEASE_S = 2.0
_READ_QUANTITIES = ("sm_clock_mhz", "power_usage_mw", "total_energy_mj", "enforced_power_limit_mw")


def default_socket_path() -> Path:
    """/run/throttllem/clockd.sock for root; a per-user runtime directory otherwise."""
    if os.geteuid() == 0:
        return Path("/run/throttllem/clockd.sock")
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/throttllem-{os.geteuid()}"
    return Path(runtime) / "throttllem-clockd.sock"


@dataclass
class _Client:
    sock: socket.socket
    owner: int
    pid: int
    uid: int
    buffer: bytearray = field(default_factory=bytearray)


class ClockDaemon:
    """Serves clock requests for `driver`'s GPUs on `socket_path` until `stop()`."""

    def __init__(
        self,
        driver: ClockDriver,
        socket_path: Path,
        *,
        max_lease_s: float = DEFAULT_MAX_LEASE_S,
        socket_mode: int = 0o600,
        socket_uid: int = -1,
        socket_gid: int = -1,
        now_s: Callable[[], float] = time.monotonic,
    ) -> None:
        if socket_mode & ~0o660:
            raise ValueError(f"socket mode {socket_mode:#o} would let other users in")
        self._driver = driver
        self.socket_path = socket_path
        self._mode = socket_mode
        self._uid, self._gid = socket_uid, socket_gid
        self._now_s = now_s
        self._leases = LeaseTable(max_lease_s)
        self._clients: dict[int, _Client] = {}
        self._next_owner = 1
        self._stopping = False
        # stop() may come from a signal handler or another thread: it sets the flag and writes
        # a byte here to wake the selector (the socket pair lives while serve_forever runs).
        self._wake_w: socket.socket | None = None

    def stop(self) -> None:
        """Ask `serve_forever` to reset the clocks and return. Safe from signal handlers."""
        self._stopping = True
        wake = self._wake_w
        if wake is not None:
            with contextlib.suppress(OSError):  # already woken (buffer full) or closed
                wake.send(b"x")

    def serve_forever(self, on_ready: Callable[[], None] | None = None) -> None:
        """Reset every GPU, listen, serve until stopped; reset again on the way out."""
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        self._wake_w = wake_w
        try:
            self._reset(self._driver.gpu_indices(), "clock daemon starting")
            if not self._driver.can_actuate():
                raise NoPermission(f"the clock daemon cannot change clocks: {PERMISSION_HELP}")
            with self._listen() as listener, selectors.DefaultSelector() as selector:
                selector.register(listener, selectors.EVENT_READ, None)
                selector.register(wake_r, selectors.EVENT_READ, None)
                log.info(
                    "clockd: serving GPUs %s on %s (mode %#o)",
                    self._driver.gpu_indices(),
                    self.socket_path,
                    self._mode,
                )
                if on_ready is not None:
                    on_ready()
                try:
                    self._loop(selector, listener, wake_r)
                finally:
                    for client in list(self._clients.values()):
                        self._drop(selector, client, reset=False)
        finally:
            self._reset(self._driver.gpu_indices(), "clock daemon stopping")
            self._wake_w = None
            wake_r.close()
            wake_w.close()

    # ---- socket -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _listen(self) -> Iterator[socket.socket]:
        path = self.socket_path
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_socket(path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Bind under a umask that already gives the final mode or stricter, so there is no
        # moment when the socket is open to others.
        old_umask = os.umask(0o777 & ~self._mode)
        try:
            listener.bind(str(path))
        finally:
            os.umask(old_umask)
        try:
            os.chown(path, self._uid, self._gid)
            os.chmod(path, self._mode)
            listener.listen(16)
            listener.setblocking(False)
            yield listener
        finally:
            listener.close()
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _loop(
        self, selector: selectors.BaseSelector, listener: socket.socket, wake_r: socket.socket
    ) -> None:
        while not self._stopping:
            self._expire_leases()
            next_s = self._leases.next_expiry_s()
            timeout_s = None if next_s is None else max(0.0, next_s - self._now_s())
            for key, _ in selector.select(timeout_s):
                if key.fileobj is listener:
                    self._accept(selector, listener)
                elif key.fileobj is wake_r:
                    with contextlib.suppress(BlockingIOError):
                        wake_r.recv(64)
                else:
                    self._receive(selector, key.data)

    def _accept(self, selector: selectors.BaseSelector, listener: socket.socket) -> None:
        try:
            sock, _ = listener.accept()
        except BlockingIOError:
            return
        pid, uid, _gid = struct.unpack(
            "3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        )
        sock.setblocking(False)
        client = _Client(sock, self._next_owner, pid, uid)
        self._next_owner += 1
        self._clients[client.owner] = client
        selector.register(sock, selectors.EVENT_READ, client)
        log.info("clockd: client %d connected (pid %d, uid %d)", client.owner, pid, uid)

    def _receive(self, selector: selectors.BaseSelector, client: _Client) -> None:
        try:
            data = client.sock.recv(wire.MAX_LINE_BYTES)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(selector, client, reset=True)
            return
        client.buffer += data
        while (end := client.buffer.find(b"\n")) >= 0:
            line = bytes(client.buffer[:end])
            del client.buffer[: end + 1]
            if not self._reply(client, self._handle(client, line)):
                self._drop(selector, client, reset=True)
                return
        if len(client.buffer) > wire.MAX_LINE_BYTES:
            log.warning("clockd: client %d sent an over-long line; dropping it", client.owner)
            self._drop(selector, client, reset=True)

    def _reply(self, client: _Client, reply: wire.Message) -> bool:
        data = wire.encode(reply)
        try:
            sent = client.sock.send(data)
        except OSError:
            sent = -1
        if sent != len(data):
            # Replies are tiny; a socket too full to take one belongs to a client that stopped
            # reading. It would hold the daemon up, so it is dropped (and its clocks reset).
            log.warning("clockd: client %d does not read its replies; dropping it", client.owner)
            return False
        return True

    def _drop(self, selector: selectors.BaseSelector, client: _Client, *, reset: bool) -> None:
        selector.unregister(client.sock)
        client.sock.close()
        del self._clients[client.owner]
        gpus = self._leases.release_owner(client.owner)
        log.info("clockd: client %d (pid %d) disconnected", client.owner, client.pid)
        if reset and gpus:
            self._reset(gpus, f"client {client.owner} (pid {client.pid}) went away")

    # ---- requests -----------------------------------------------------------------------------

    def _handle(self, client: _Client, line: bytes) -> wire.Message:
        try:
            request = wire.decode(line)
            op = request.get("op")
            if op == "hello":
                return self._hello()
            if op == "set":
                return self._set(client, request)
            if op == "renew":
                held = self._leases.renew(
                    client.owner, wire.field_seconds(request, "lease_s"), self._now_s()
                )
                return {"ok": True, "gpus": list(held)}
            if op == "reset":
                gpus = wire.field_gpus(request)
                self._leases.release(client.owner, gpus, self._now_s())
                outcome = self._driver.reset_locked_clocks(gpus)
                return {"ok": True, "outcome": outcome.value}
            if op == "read":
                return self._read(request)
            if op == "status":
                return self._status()
            raise InvalidArgument(f"unknown op {op!r}")
        except GpuError as e:
            return wire.error_reply(e)
        except Exception as e:  # a bug here must not take the daemon (and every lease) down
            log.exception("clockd: request from client %d failed", client.owner)
            return wire.error_reply(GpuError(f"clock daemon error: {type(e).__name__}: {e}"))

    def _hello(self) -> wire.Message:
        return {
            "ok": True,
            "version": wire.PROTOCOL_VERSION,
            "max_lease_s": self._leases.max_lease_s,
            "can_actuate": self._driver.can_actuate(),
            "gpus": [
                {"index": g, "supported_clocks_mhz": list(self._driver.supported_clocks_mhz(g))}
                for g in self._driver.gpu_indices()
            ],
        }

    def _set(self, client: _Client, request: wire.Message) -> wire.Message:
        gpus = wire.field_gpus(request)
        min_mhz, max_mhz = wire.field_int(request, "min_mhz"), wire.field_int(request, "max_mhz")
        lease_s = wire.field_seconds(request, "lease_s")
        now_s = self._now_s()
        self._leases.check_grant(client.owner, gpus, lease_s, now_s)
        try:
            outcome = self._driver.set_locked_clocks(gpus, min_mhz, max_mhz)
        except GpuError:
            # GPUs the client did not hold may have been locked before the failure: a lock
            # without a lease must not survive.
            self._reset(
                [g for g in gpus if self._leases.holder(g, now_s) != client.owner],
                "set failed half-way",
            )
            raise
        if outcome is WriteOutcome.REFUSED:
            raise NoPermission(f"the clock daemon cannot change clocks: {PERMISSION_HELP}")
        self._leases.grant(client.owner, gpus, lease_s, now_s)
        log.debug(
            "clockd: client %d locked GPUs %s to [%d, %d] MHz (%s), lease %.2f s",
            client.owner,
            gpus,
            min_mhz,
            max_mhz,
            outcome.value,
            lease_s,
        )
        reply: wire.Message = {"ok": True, "outcome": outcome.value}
        if outcome is WriteOutcome.APPLIED:
            reply["latency_ms"] = self._driver.set_latency().last_ms  # the NVML write alone
        return reply

    def _read(self, request: wire.Message) -> wire.Message:
        gpu = wire.field_int(request, "gpu")
        quantity = request.get("quantity")
        if quantity not in _READ_QUANTITIES:
            raise InvalidArgument(f"quantity must be one of {_READ_QUANTITIES}, got {quantity!r}")
        value: int = getattr(self._driver, str(quantity))(gpu)
        return {"ok": True, "value": value}

    def _status(self) -> wire.Message:
        now_s = self._now_s()
        gpus = []
        for g in self._driver.gpu_indices():
            holder = self._leases.holder(g, now_s)
            client = self._clients.get(holder) if holder is not None else None
            gpus.append(
                {
                    "index": g,
                    "locked_mhz": self._driver.locked_clocks_mhz(g),
                    "lease_holder_pid": client.pid if client is not None else None,
                }
            )
        latency = self._driver.set_latency()
        return {
            "ok": True,
            "gpus": gpus,
            "can_actuate": self._driver.can_actuate(),
            "set_count": latency.count,
            "set_mean_ms": latency.mean_ms,
            "set_max_ms": latency.max_ms,
        }

    # ---- resets -------------------------------------------------------------------------------

    def _expire_leases(self) -> None:
        lapsed = self._leases.expire(self._now_s())
        if lapsed:
            self._reset(lapsed, "lease lapsed")

    def _reset(self, gpus: Sequence[int], why: str) -> None:
        """Reset and log; a failure is logged, never raised: the other GPUs still get reset."""
        for gpu in gpus:
            try:
                outcome = self._driver.reset_locked_clocks([gpu])
            except GpuError as e:
                log.error("clockd: %s: could not reset GPU %d: %s", why, gpu, e)
                continue
            if outcome is WriteOutcome.APPLIED:
                log.info("clockd: %s: reset clocks of GPU %d", why, gpu)


def _remove_stale_socket(path: Path) -> None:
    """Remove a socket left by a dead daemon; refuse to replace a live one or a non-socket."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ClockdError(f"{path} exists and is not a socket; not replacing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()  # nobody listening: a leftover
        return
    finally:
        probe.close()
    raise ClockdError(f"another clock daemon is already listening on {path}")
