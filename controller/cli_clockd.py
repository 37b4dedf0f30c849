"""`throttllem clockd`: run the privileged clock daemon (see docs/clock-control.md)."""

from __future__ import annotations

import argparse
import grp
import logging
import pwd
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any

from throttllem.backend.twin.errors import TwinError
from throttllem.controller.gpu.clockd import DEFAULT_MAX_LEASE_S, ClockDaemon, default_socket_path
from throttllem.controller.gpu.driver import ClockDriver
from throttllem.controller.gpu.errors import GpuError

EXIT_USAGE = 2
EXIT_GPU_ERROR = 1


class UsageError(Exception):
    """A bad value on the command line: one line, exit status 2."""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "clockd",
        help="privileged GPU clock daemon: applies clock locks under a lease, resets on exit",
    )
    p.add_argument(
        "--socket",
        type=Path,
        default=None,
        help=f"Unix socket to listen on (default {default_socket_path()})",
    )
    p.add_argument(
        "--driver",
        choices=("nvml", "twin"),
        default="nvml",
        help="nvml: the real GPUs (default); twin: in-process twin GPUs, for tests",
    )
    p.add_argument(
        "--gpus", default=None, help="comma-separated NVML GPU indices to manage (default: all)"
    )
    p.add_argument(
        "--group",
        default=None,
        help="group allowed to connect (socket mode 0660); default: only the owner",
    )
    p.add_argument(
        "--user", default=None, help="user that owns the socket (default: the daemon's own user)"
    )
    p.add_argument(
        "--max-lease-s",
        type=float,
        default=DEFAULT_MAX_LEASE_S,
        help=f"longest lease a client may ask for (default {DEFAULT_MAX_LEASE_S} s)",
    )
    p.add_argument("--twin-gpu", default="A100-SXM4-40GB", help="twin driver: GPU preset")
    p.add_argument("--twin-count", type=int, default=1, help="twin driver: number of GPUs")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        gpus = _parse_gpus(args.gpus)
        uid = pwd.getpwnam(args.user).pw_uid if args.user else -1
        gid = grp.getgrnam(args.group).gr_gid if args.group else -1
        if args.twin_count < 1:
            raise UsageError(f"--twin-count must be at least 1, got {args.twin_count}")
        if not args.max_lease_s > 0:
            raise UsageError(f"--max-lease-s must be positive, got {args.max_lease_s}")
    except (UsageError, KeyError) as e:
        print(f"throttllem clockd: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        driver = _open_driver(args, gpus)
    except TwinError as e:
        print(f"throttllem clockd: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except GpuError as e:
        print(f"throttllem clockd: error: {e}", file=sys.stderr)
        return EXIT_GPU_ERROR
    daemon = ClockDaemon(
        driver,
        args.socket or default_socket_path(),
        max_lease_s=args.max_lease_s,
        socket_mode=0o660 if args.group else 0o600,
        socket_uid=uid,
        socket_gid=gid,
    )

    def stop(signum: int, frame: FrameType | None) -> None:
        daemon.stop()

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        daemon.serve_forever()
    except GpuError as e:
        print(f"throttllem clockd: error: {e}", file=sys.stderr)
        return EXIT_GPU_ERROR
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        driver.close()
    return 0


def _parse_gpus(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        gpus = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--gpus {text!r}: expected comma-separated indices, e.g. 0,1") from None
    if not gpus or min(gpus) < 0:
        raise UsageError(f"--gpus {text!r}: expected non-negative indices, e.g. 0,1")
    return gpus


def _open_driver(args: argparse.Namespace, gpus: list[int] | None) -> ClockDriver:
    if args.driver == "nvml":
        from throttllem.controller.gpu.nvml_driver import NvmlDriver

        # The daemon resets every GPU itself at start; it must be able to write.
        return NvmlDriver.open(gpus, reset_at_start=False)
    from throttllem.backend.twin.gpu import TwinGpu
    from throttllem.backend.twin.hardware import default_catalog
    from throttllem.backend.twin.time_source import ScaledWallTime
    from throttllem.controller.gpu.twin_driver import TwinDriver

    spec = default_catalog().gpu(args.twin_gpu)
    time_source = ScaledWallTime()
    indices = gpus if gpus is not None else list(range(args.twin_count))
    return TwinDriver([TwinGpu(spec, time_source, index=i) for i in indices])
