"""Instance discovery: registry entries and instance ordinals."""

from __future__ import annotations

import os
from pathlib import Path

from throttllem.backend.telemetry.discovery import (
    InstanceEndpoint,
    discover,
    entry_path,
    instance_ordinal,
    register,
    unregister,
)


def entry(instance: str, pid: int | None = None, model: str = "tensorrt_llm") -> InstanceEndpoint:
    return InstanceEndpoint(
        protocol="throttllem.v1", model_name=model, model_version="1", instance_name=instance,
        endpoint="127.0.0.1:5000", pid=os.getpid() if pid is None else pid, started_unix_ns=1,
        engine_kind="twin", gpu_control=True,
    )  # fmt: skip


def test_register_discover_unregister(tmp_path: Path) -> None:
    a = register(tmp_path, entry("tensorrt_llm_0_1"))
    register(tmp_path, entry("tensorrt_llm_0_0"))
    register(tmp_path, entry("other_0_0", model="other"))
    found = discover(tmp_path, "tensorrt_llm")
    assert [e.instance_name for e in found] == ["tensorrt_llm_0_0", "tensorrt_llm_0_1"]
    assert len(discover(tmp_path)) == 3
    unregister(a, os.getpid())
    assert [e.instance_name for e in discover(tmp_path, "tensorrt_llm")] == ["tensorrt_llm_0_0"]


def test_entries_of_dead_processes_are_skipped(tmp_path: Path) -> None:
    register(tmp_path, entry("tensorrt_llm_0_0", pid=2**22 + 12345))  # no such pid
    assert discover(tmp_path, "tensorrt_llm") == []
    assert len(discover(tmp_path, "tensorrt_llm", check_pid=False)) == 1


def test_unregister_leaves_a_replacement_alone(tmp_path: Path) -> None:
    path = register(tmp_path, entry("tensorrt_llm_0_0"))
    unregister(path, pid=os.getpid() + 1)
    assert path.exists()


def test_garbage_files_are_ignored(tmp_path: Path) -> None:
    path = entry_path(tmp_path, "tensorrt_llm", "broken")
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    assert discover(tmp_path, "tensorrt_llm") == []


def test_instance_ordinals_follow_the_instance_groups() -> None:
    groups = [{"count": 2, "kind": "KIND_CPU"}, {"count": 3, "name": "extra"}]
    assert instance_ordinal("tensorrt_llm_0_0", "tensorrt_llm", groups) == 0
    assert instance_ordinal("tensorrt_llm_0_1", "tensorrt_llm", groups) == 1
    assert instance_ordinal("extra_2", "tensorrt_llm", groups) == 4
    gpu_groups = [{"count": 2, "gpus": [0, 1]}, {"count": 1}]
    assert instance_ordinal("m_1_0", "m", gpu_groups) == 4
