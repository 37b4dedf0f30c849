"""Orphaned Python-backend regions: removed only when new, old enough and mapped by nobody."""

from __future__ import annotations

import os
import time
from pathlib import Path

from throttllem.controller.shm_regions import PREFIX, python_backend_regions, remove_orphans


def _region(shm: Path, name: str, age_s: float = 10.0) -> Path:
    path = shm / (PREFIX + name)
    path.write_bytes(b"\0" * 16)
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def _process(proc: Path, pid: int, maps: str) -> None:
    (proc / str(pid)).mkdir(parents=True)
    (proc / str(pid) / "maps").write_text(maps)


def test_only_new_unmapped_and_settled_regions_are_removed(tmp_path: Path) -> None:
    shm, proc = tmp_path / "shm", tmp_path / "proc"
    shm.mkdir()
    proc.mkdir()
    older = _region(shm, "from-before")
    before = python_backend_regions(shm)
    assert before == {older.name}
    orphan = _region(shm, "killed-stub")
    live = _region(shm, "live-stub")
    starting = _region(shm, "just-created", age_s=0.0)
    unrelated = shm / "some_other_segment"
    unrelated.write_bytes(b"x")
    _process(proc, 4242, f"7f00-7f10 rw-s 00000000 00:1a 12 {live}\n")
    _process(proc, 4243, "7f00-7f10 r-xp 00000000 08:01 99 /usr/bin/tritonserver\n")
    removed = remove_orphans(before, shm_dir=shm, proc=proc)
    assert removed == [orphan]
    assert not orphan.exists()
    # A region from before we started, one a live process maps, one too young to judge, and
    # anything that is not the Python backend's: all left alone.
    assert older.exists() and live.exists() and starting.exists() and unrelated.exists()


def test_nothing_new_reads_no_process_table(tmp_path: Path) -> None:
    shm = tmp_path / "shm"
    shm.mkdir()
    _region(shm, "a")
    before = python_backend_regions(shm)
    assert remove_orphans(before, shm_dir=shm, proc=tmp_path / "absent") == []


def test_a_missing_shm_folder_is_no_region(tmp_path: Path) -> None:
    assert python_backend_regions(tmp_path / "absent") == set()
