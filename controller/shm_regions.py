"""Shared-memory regions of Triton's Python backend that a killed stub leaves behind.

Each stub talks to tritonserver through a POSIX shared-memory region under /dev/shm. When a stub
dies by SIGKILL (an OOM kill, an operator, our own soak), nobody unlinks its region: it stays in
/dev/shm, holding memory, until reboot. After a server it started has stopped, throttllem removes
the regions that appeared while it ran and that no process maps any more. A region still mapped
belongs to a live server (another `serve`, another test) and is never touched.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
PREFIX = "triton_python_backend_shm_region_"
# A region younger than this may belong to a server starting beside ours, created and not yet
# mapped (microseconds apart): left alone.
MIN_AGE_S = 0.5


def python_backend_regions(shm_dir: Path = SHM_DIR) -> set[str]:
    """Names of the Python backend's regions now in `shm_dir` (empty where there is none)."""
    try:
        return {p.name for p in shm_dir.glob(PREFIX + "*")}
    except OSError:
        return set()


def _mapped(paths: list[Path], proc: Path) -> set[Path]:
    """Those of `paths` some process maps (read from every /proc/PID/maps we may read)."""
    mapped: set[Path] = set()
    for maps in proc.glob("[0-9]*/maps"):
        try:
            text = maps.read_text(errors="replace")
        except OSError:  # the process ended, or is not ours to read
            continue
        mapped.update(p for p in paths if str(p) in text)
    return mapped


def remove_orphans(
    before: set[str],
    *,
    shm_dir: Path = SHM_DIR,
    proc: Path = Path("/proc"),
    min_age_s: float = MIN_AGE_S,
) -> list[Path]:
    """Unlink the regions that appeared since `before` was taken, are at least `min_age_s`
    old and that no process maps; returns them."""
    now = time.time()
    new: list[Path] = []
    for name in python_backend_regions(shm_dir) - before:
        path = shm_dir / name
        try:
            if now - path.stat().st_mtime >= min_age_s:
                new.append(path)
        except OSError:
            continue
    if not new:
        return []
    orphans = [p for p in new if p not in _mapped(new, proc)]
    removed = []
    for path in orphans:
        try:
            path.unlink()
            removed.append(path)
        except OSError as e:
            log.warning("cannot remove the orphaned region %s: %s", path, e)
    if removed:
        log.info("removed %d shared-memory region(s) left by killed stubs", len(removed))
    return removed
