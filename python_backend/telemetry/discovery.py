"""How a controller finds the telemetry endpoint of every instance of a model.

Triton runs each model instance in its own stub process, so each instance serves its own
endpoint. Nothing is configured per instance:

1. Registry directory (always on). Each instance, once its server listens, writes
   `<registry_dir>/<model_name>/<instance_name>.json` (atomically: temp file + rename) with its
   endpoint, pid and start time, and removes it when the model unloads. A controller lists the
   folder of the model it manages (`discover()`); files whose process is gone are skipped (a
   crash cannot remove its file). The folder is the `telemetry_registry_dir` parameter
   (default `$TMPDIR/throttllem-registry`); in Kubernetes, share it between the Triton container
   and the controller sidecar with an emptyDir volume.
2. Fixed ports (optional). With the `telemetry_port` parameter set to a base port B > 0, the
   instance with ordinal k listens on B + k, where k counts the instances of the model in the
   order of its instance_group entries (Triton names them `<model>_<group>_<index>`).
   `telemetry_port` 0 (the default) picks a free port and relies on the registry.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ENV_REGISTRY_DIR = "THROTTLLEM_REGISTRY_DIR"
_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


def default_registry_dir() -> Path:
    env = os.environ.get(ENV_REGISTRY_DIR)
    if env:
        return Path(env)
    return Path(tempfile.gettempdir()) / "throttllem-registry"


@dataclass(frozen=True)
class InstanceEndpoint:
    """One registry entry."""

    protocol: str
    model_name: str
    model_version: str
    instance_name: str
    endpoint: str  # host:port
    pid: int
    started_unix_ns: int
    engine_kind: str
    gpu_control: bool


def _safe(name: str) -> str:
    return _SAFE.sub("_", name) or "_"


def entry_path(registry_dir: Path, model_name: str, instance_name: str) -> Path:
    return registry_dir / _safe(model_name) / f"{_safe(instance_name)}.json"


def register(registry_dir: Path, entry: InstanceEndpoint) -> Path:
    """Write the entry atomically; returns its path (for `unregister`)."""
    path = entry_path(registry_dir, entry.model_name, entry.instance_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(entry), f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def unregister(path: Path, pid: int | None = None) -> None:
    """Remove an entry, unless another process has since replaced it."""
    try:
        if pid is not None and json.loads(path.read_text()).get("pid") != pid:
            return
        path.unlink()
    except (OSError, ValueError):
        pass


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    """A killed stub stays a zombie until Triton reaps it (which can take long): dead all the
    same. Linux only; elsewhere nothing is known and the process counts as alive."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state follows the command name, which is in parentheses and may hold spaces.
    return stat.rsplit(")", 1)[-1].split()[:1] == ["Z"]


def _read(path: Path) -> InstanceEndpoint | None:
    try:
        raw: dict[str, Any] = json.loads(path.read_text())
        return InstanceEndpoint(**raw)
    except (OSError, ValueError, TypeError):
        return None


def discover(
    registry_dir: Path | None = None, model_name: str | None = None, *, check_pid: bool = True
) -> list[InstanceEndpoint]:
    """Every live instance registered (of one model, or of all), sorted by model and instance.
    `check_pid=False` when the controller runs in another pid namespace (another container
    without a shared process namespace): it then tells live from stale by connecting."""
    root = registry_dir or default_registry_dir()
    folders = [root / _safe(model_name)] if model_name else sorted(p for p in root.glob("*"))
    found: list[InstanceEndpoint] = []
    for folder in folders:
        for path in sorted(folder.glob("*.json")):
            entry = _read(path)
            if entry is None or (check_pid and not pid_alive(entry.pid)):
                continue
            found.append(entry)
    return sorted(found, key=lambda e: (e.model_name, e.instance_name))


_INSTANCE = re.compile(r"^(?P<group>.+)_(?P<index>\d+)$")


def instance_ordinal(
    instance_name: str, model_name: str, instance_groups: Sequence[Mapping[str, Any]]
) -> int:
    """The instance's position among all instances of the model (0-based).

    Triton names instance i of group g `<group name>_<i>`, where an unnamed group is called
    `<model>_<g>`. Earlier groups contribute count x max(1, number of GPUs listed) instances.
    """
    match = _INSTANCE.match(instance_name)
    if match is None:
        return 0
    group_name, index = match.group("group"), int(match.group("index"))
    offset = 0
    for g, group in enumerate(instance_groups):
        name = str(group.get("name") or f"{model_name}_{g}")
        if name == group_name:
            return offset + index
        count = int(group.get("count") or 1)
        gpus = group.get("gpus") or []
        offset += count * max(1, len(gpus))
    return index
