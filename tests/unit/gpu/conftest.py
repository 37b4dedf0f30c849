"""Fixtures for the GPU layer: the C test double of libnvidia-ml, loaded by the real pynvml.

`fake_nvml_lib` compiles tests/nvml_double/fake_nvml.c once per session. `fake_nvml` points the
real pynvml of this process at it (pynvml loads its library only while `nvmlLib` is None, so
the fixture assigns it) and puts it first on LD_LIBRARY_PATH for subprocesses, which find it by
soname exactly as they would find the real one.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pynvml
import pytest
from gpu_test_support import FakeNvml

SOURCE = Path(__file__).resolve().parents[2] / "nvml_double" / "fake_nvml.c"
FAKE_VARS = (
    "FAKE_NVML_GPU_COUNT",
    "FAKE_NVML_CLOCKS",
    "FAKE_NVML_MEM_CLOCKS",
    "FAKE_NVML_POWER_LIMIT_MW",
    "FAKE_NVML_PRIVILEGED",
    "FAKE_NVML_SET_DELAY_US",
    "FAKE_NVML_FAIL",
    "FAKE_NVML_STATE",
)


@pytest.fixture(scope="session")
def fake_nvml_lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        pytest.skip("no C compiler (gcc/cc) on PATH: cannot build the NVML test double")
    out = tmp_path_factory.mktemp("nvml_double") / "libnvidia-ml.so.1"
    build = subprocess.run(
        [
            compiler,
            "-shared",
            "-fPIC",
            "-O1",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-o",
            str(out),
            str(SOURCE),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if build.returncode != 0:
        pytest.fail(f"building the NVML test double failed:\n{build.stderr}")
    return out


@pytest.fixture
def fake_nvml(
    fake_nvml_lib: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[FakeNvml]:
    for name in FAKE_VARS:
        monkeypatch.delenv(name, raising=False)
    state = tmp_path / "nvml-state"
    monkeypatch.setenv("FAKE_NVML_STATE", str(state))
    ld_path = os.environ.get("LD_LIBRARY_PATH", "")
    monkeypatch.setenv(
        "LD_LIBRARY_PATH", str(fake_nvml_lib.parent) + (os.pathsep + ld_path if ld_path else "")
    )
    lib = ctypes.CDLL(str(fake_nvml_lib))
    lib.fake_nvml_reset()
    saved = (pynvml.nvmlLib, dict(pynvml._nvmlGetFunctionPointer_cache), pynvml._nvmlLib_refcount)
    pynvml.nvmlLib = lib
    pynvml._nvmlGetFunctionPointer_cache.clear()
    pynvml._nvmlLib_refcount = 0
    fake = FakeNvml(fake_nvml_lib, state, lib, monkeypatch)
    try:
        yield fake
        # Every driver a test opened must have shut NVML down again.
        assert fake.init_count() == 0, "a test left NVML initialised (a driver was not closed)"
    finally:
        pynvml.nvmlLib = saved[0]
        pynvml._nvmlGetFunctionPointer_cache.clear()
        pynvml._nvmlGetFunctionPointer_cache.update(saved[1])
        pynvml._nvmlLib_refcount = saved[2]
