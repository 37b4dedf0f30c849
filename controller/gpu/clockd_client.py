"""`ClockdClient`: the controller's `ClockDriver` when clocks go through `throttllem clockd`.

It is a `GuardedClockDriver` like the others (idempotent writes, observe-only on a permission
error, timed writes), over `ClockdDevices`, which speak the daemon's line protocol and keep the
lease alive from a background thread. The lease belongs to the connection: if the connection
breaks, the daemon has already reset the clocks, so the client forgets what it had locked and
sets it again on the next write (reconnecting then).

A client is scoped to a set of the daemon's GPUs (`gpus`; default all of them): the controller
opens one per engine instance, for that instance's GPUs, so instances never ask for each
other's GPUs (each connection is its own lease holder).
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from . import wire
from .errors import DaemonUnavailable, GpuError, InvalidArgument, LeaseLost
from .guarded import GuardedClockDriver

log = logging.getLogger(__name__)

DEFAULT_LEASE_S = 1.0


class _Connection:
    """One request/reply connection to the daemon, opened lazily; requests are serialised."""

    def __init__(self, path: Path, timeout_s: float) -> None:
        self._path = path
        self._timeout_s = timeout_s
        self._mutex = threading.Lock()
        self._sock: socket.socket | None = None

    def request(self, message: wire.Message) -> wire.Message:
        """Send one request and return its reply (error replies raised as our exceptions).
        DaemonUnavailable means the connection is gone, and with it any lease."""
        with self._mutex:
            try:
                sock = self._connected()
                sock.sendall(wire.encode(message))
                line = self._readline(sock)
            except OSError as e:
                self._close_locked()
                raise DaemonUnavailable(f"clock daemon at {self._path}: {e}") from e
        return wire.raise_for_error(wire.decode(line))

    def close(self) -> None:
        with self._mutex:
            self._close_locked()

    def _connected(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self._timeout_s)
            try:
                sock.connect(str(self._path))
            except OSError:
                sock.close()
                raise
            self._sock = sock
        return self._sock

    def _readline(self, sock: socket.socket) -> bytes:
        # One request is in flight at a time, so a reply never runs into the next one.
        line = bytearray()
        while not line.endswith(b"\n"):
            chunk = sock.recv(wire.MAX_LINE_BYTES)
            if not chunk:
                raise ConnectionResetError("clock daemon closed the connection")
            line += chunk
            if len(line) > wire.MAX_LINE_BYTES:
                raise ConnectionError("over-long reply")
        return bytes(line)

    def _close_locked(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class ClockdDevices:
    """`GpuDevices` through the clock daemon, with the lease renewed in the background."""

    def __init__(
        self,
        socket_path: Path,
        *,
        lease_s: float,
        renew_every_s: float,
        timeout_s: float,
        gpus: Sequence[int] | None = None,
    ) -> None:
        if not 0 < renew_every_s < lease_s:
            raise InvalidArgument(
                f"renew_every_s ({renew_every_s}) must be positive and below lease_s ({lease_s})"
            )
        self._conn = _Connection(socket_path, timeout_s)
        self._lease_s = lease_s
        self._renew_every_s = renew_every_s
        hello = self._conn.request({"op": "hello"})
        if lease_s > float(hello["max_lease_s"]):
            self._conn.close()
            raise InvalidArgument(
                f"lease_s {lease_s} exceeds the daemon's maximum {hello['max_lease_s']} s"
            )
        served = {
            int(g["index"]): tuple(int(c) for c in g["supported_clocks_mhz"]) for g in hello["gpus"]
        }
        wanted = tuple(served) if gpus is None else tuple(dict.fromkeys(gpus))
        missing = [gpu for gpu in wanted if gpu not in served]
        if missing or not wanted:
            self._conn.close()
            raise InvalidArgument(
                f"the clock daemon at {socket_path} serves GPUs {sorted(served)}; "
                f"asked for {list(wanted)}"
            )
        self._clocks_mhz = {gpu: served[gpu] for gpu in wanted}
        self._held: set[int] = set()
        self._held_mutex = threading.Lock()
        self._on_lease_lost: Callable[[Sequence[int]], None] = lambda gpus: None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def on_lease_lost(self, callback: Callable[[Sequence[int]], None]) -> None:
        """Called (from any thread) with the GPUs whose locks the daemon has reset."""
        self._on_lease_lost = callback

    def gpu_indices(self) -> tuple[int, ...]:
        return tuple(self._clocks_mhz)

    def supported_clocks_mhz(self, gpu: int) -> tuple[int, ...]:
        return self._clocks_mhz[gpu]

    def set_locked_clocks(self, gpus: Sequence[int], min_mhz: int, max_mhz: int) -> None:
        self._call(
            {
                "op": "set",
                "gpus": list(gpus),
                "min_mhz": min_mhz,
                "max_mhz": max_mhz,
                "lease_s": self._lease_s,
            }
        )
        with self._held_mutex:
            self._held.update(gpus)
        self._start_renewer()

    def reset_locked_clocks(self, gpus: Sequence[int]) -> None:
        self._call({"op": "reset", "gpus": list(gpus)})
        with self._held_mutex:
            self._held.difference_update(gpus)

    def sm_clock_mhz(self, gpu: int) -> int:
        return self._read(gpu, "sm_clock_mhz")

    def power_usage_mw(self, gpu: int) -> int:
        return self._read(gpu, "power_usage_mw")

    def total_energy_mj(self, gpu: int) -> int:
        return self._read(gpu, "total_energy_mj")

    def enforced_power_limit_mw(self, gpu: int) -> int:
        return self._read(gpu, "enforced_power_limit_mw")

    def close(self) -> None:
        self._stop.set()
        if self._renewer is not None and self._renewer is not threading.current_thread():
            self._renewer.join()
        self._conn.close()

    # ---- internals ----------------------------------------------------------------------------

    def _read(self, gpu: int, quantity: str) -> int:
        return int(self._call({"op": "read", "gpu": gpu, "quantity": quantity})["value"])

    def _call(self, message: wire.Message) -> wire.Message:
        try:
            return self._conn.request(message)
        except DaemonUnavailable:
            self._lease_lost()
            raise

    def _lease_lost(self) -> None:
        with self._held_mutex:
            gpus = sorted(self._held)
            self._held.clear()
        self._report_lost(gpus)

    def _report_lost(self, gpus: Sequence[int]) -> None:
        # Outside _held_mutex: the callback takes the driver's lock, which a writer may hold
        # while it waits for _held_mutex.
        if gpus:
            log.warning("clockd lease lost: the daemon has reset GPUs %s", list(gpus))
            self._on_lease_lost(gpus)

    def _start_renewer(self) -> None:
        if self._renewer is None and not self._stop.is_set():
            self._renewer = threading.Thread(
                target=self._renew_loop, name="clockd-lease", daemon=True
            )
            self._renewer.start()

    def _renew_loop(self) -> None:
        # A daemon thread: if the process dies, its connection closes and the daemon resets.
        while not self._stop.wait(self._renew_every_s):
            lost: list[int] = []
            # The renewal and the bookkeeping of its failure are one step, so a write that
            # lands in between cannot be forgotten by a stale "lease lost".
            with self._held_mutex:
                if not self._held:
                    continue
                try:
                    self._conn.request({"op": "renew", "lease_s": self._lease_s})
                except (LeaseLost, DaemonUnavailable) as e:
                    log.warning("clockd lease renewal failed: %s", e)
                    lost = sorted(self._held)
                    self._held.clear()
                except GpuError as e:
                    log.error("clockd lease renewal refused: %s", e)
            self._report_lost(lost)


class ClockdClient(GuardedClockDriver):
    """The `ClockDriver` the controller uses when clocks go through `throttllem clockd`."""

    def __init__(self, devices: ClockdDevices) -> None:
        gpus = ",".join(str(g) for g in devices.gpu_indices())
        super().__init__(devices, name=f"clockd GPUs {gpus}")
        devices.on_lease_lost(self.forget)

    @classmethod
    def connect(
        cls,
        socket_path: Path,
        *,
        lease_s: float = DEFAULT_LEASE_S,
        renew_every_s: float | None = None,
        timeout_s: float = 5.0,
        gpus: Sequence[int] | None = None,
    ) -> ClockdClient:
        """Connect and read the daemon's GPUs: `gpus` (NVML indices the daemon serves; an
        unknown one is InvalidArgument), default all of them. The lease is taken by the first
        write and renewed every `renew_every_s` (default: a quarter of the lease)."""
        devices = ClockdDevices(
            socket_path,
            lease_s=lease_s,
            renew_every_s=lease_s / 4 if renew_every_s is None else renew_every_s,
            timeout_s=timeout_s,
            gpus=gpus,
        )
        return cls(devices)
