"""The routing file between the switcher (controller/scaling/switcher.py), which writes it, and
the router model (router.py), which reads it: {"target": "<Triton model name>"}."""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

logger = logging.getLogger(__name__)


class RoutingTable:
    """The routing file, re-read when it changes (one stat per request)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._target: str | None = None

    def target(self) -> str | None:
        try:
            st = os.stat(self._path)
        except OSError:
            return self._target
        stamp = (st.st_mtime_ns, st.st_size)
        with self._lock:
            if stamp != self._stamp:
                try:
                    data = json.loads(self._path.read_text())
                    target = data["target"]
                    if isinstance(target, str) and target:
                        self._target, self._stamp = target, stamp
                except (OSError, ValueError, KeyError, TypeError) as e:
                    logger.warning("routing file %s unreadable (%s): keeping %s", self._path, e,
                                   self._target)  # fmt: skip
            return self._target


def write_routing_file(path: Path, target: str) -> None:
    """Point the router at `target`; atomic, so a router never reads half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"target": target}))
    os.replace(tmp, path)
