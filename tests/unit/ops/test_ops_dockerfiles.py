"""docker/Dockerfile (NGC Triton + TensorRT-LLM) and docker/Dockerfile.cpu, without a Docker
engine: the base images, what they copy, the command they run, and that the copied files alone
build the package."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from ops_support import DOCKER, ROOT, interpolate, load_compose, services

from throttllem.controller.cli import build_parser

Instruction = tuple[str, str]
PYPROJECT = (ROOT / "pyproject.toml").read_text()  # read as text: tomllib is Python 3.11+


def requires_python() -> str:
    match = re.search(r'^requires-python\s*=\s*"([^"]+)"', PYPROJECT, re.M)
    assert match is not None
    return match.group(1)


def package_dirs() -> list[str]:
    match = re.search(r"^package-dir\s*=\s*\{(.*)\}", PYPROJECT, re.M)
    assert match is not None
    return re.findall(r'"[^"]+"\s*=\s*"([^"]+)"', match.group(1))


def instructions(name: str) -> list[Instruction]:
    """(KEYWORD, arguments) per instruction, continuation lines joined, comments dropped."""
    out: list[Instruction] = []
    pending = ""
    for raw in (DOCKER / name).read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, rest = line.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def args_of(name: str) -> dict[str, str]:
    found = {}
    for keyword, rest in instructions(name):
        if keyword == "ARG" and "=" in rest:
            key, value = rest.split("=", 1)
            found[key] = value
    return found


def copies(name: str) -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY."""
    out = []
    for keyword, rest in instructions(name):
        if keyword == "COPY":
            *sources, dest = rest.split()
            out.append((sources, dest))
    return out


def copy_target(name: str, source: str) -> Path:
    """Where a COPY puts `source`, as an absolute path in the image."""
    for sources, dest in copies(name):
        if source in sources:
            base = Path(workdir(name)) / dest
            return base / Path(source).name if dest.endswith("/") else base
    raise AssertionError(f"{name} does not copy {source}")


def workdir(name: str) -> str:
    (found,) = [rest for keyword, rest in instructions(name) if keyword == "WORKDIR"]
    return found


def cmd(name: str) -> list[str]:
    (found,) = [rest for keyword, rest in instructions(name) if keyword == "CMD"]
    argv = json.loads(found)
    assert isinstance(argv, list)
    return [str(a) for a in argv]


def test_gpu_image_is_the_ngc_trtllm_image_with_a_tag_argument() -> None:
    steps = instructions("Dockerfile")
    assert steps[0] == ("ARG", f"TRITON_TAG={args_of('Dockerfile')['TRITON_TAG']}")
    (base,) = [rest for keyword, rest in steps if keyword == "FROM"]
    assert base == "nvcr.io/nvidia/tritonserver:${TRITON_TAG}-trtllm-python-py3"
    assert re.fullmatch(r"\d{2}\.\d{2}", args_of("Dockerfile")["TRITON_TAG"])


def test_compose_builds_the_same_default_tag() -> None:
    tag = args_of("Dockerfile")["TRITON_TAG"]
    env = {"THROTTLLEM_ENGINE_DIR": "/e", "THROTTLLEM_TOKENIZER_DIR": "/t"}
    compose = interpolate(load_compose("compose.yaml"), env)
    for service in services(compose).values():
        build = service.get("build")
        if build:
            assert build["dockerfile"] == "docker/Dockerfile" and build["context"] == ".."
            assert build["args"]["TRITON_TAG"] == tag
    cpu = load_compose("compose.cpu.yaml")
    for service in services(cpu).values():
        if "build" in service:
            assert service["build"]["dockerfile"] == "docker/Dockerfile.cpu"


def test_cpu_image_is_a_python_the_project_supports_on_glibc_2_35_or_later() -> None:
    (base,) = [rest for keyword, rest in instructions("Dockerfile.cpu") if keyword == "FROM"]
    assert base == "python:${PYTHON_VERSION}-slim-bookworm"  # Debian 12: glibc 2.36
    version = args_of("Dockerfile.cpu")["PYTHON_VERSION"]
    minor = int(version.split(".")[1])
    assert requires_python() == ">=3.10,<3.13" and 10 <= minor <= 12
    runs = " ".join(rest for keyword, rest in instructions("Dockerfile.cpu") if keyword == "RUN")
    assert "[triton-cpu]" in runs  # the CPU tritonserver `throttllem serve` finds by itself


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cpu"])
def test_copies_every_package_source_and_the_model_repository(name: str) -> None:
    sources = {source for group, _ in copies(name) for source in group}
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
    needed = {folder.split("/")[0] for folder in package_dirs()}
    assert {"controller", "python_backend", "proto"} <= needed
    needed |= {"pyproject.toml", "README.md", "model_repository"}
    assert needed <= sources, f"not copied: {needed - sources}"
    # Each lands where its name says, under the WORKDIR pip installs from.
    for source in sources:
        assert copy_target(name, source) == Path(workdir(name)) / source


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cpu"])
def test_the_command_serves_the_copied_model_repository(name: str) -> None:
    argv = cmd(name)
    assert argv[0] == "throttllem"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "serve" and args.host == "0.0.0.0"
    assert args.model_repository == copy_target(name, "model_repository")
    assert args.engine == ("tensorrtllm" if name == "Dockerfile" else "twin")


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cpu"])
def test_build_context_ignore_file_keeps_what_is_copied(name: str) -> None:
    ignored = {
        line.strip()
        for line in (DOCKER / f"{name}.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for group, _ in copies(name):
        for source in group:
            assert source not in ignored and source.split("/")[0] not in ignored


@pytest.mark.timeout(240)
def test_the_copied_files_alone_build_the_package(tmp_path: Path) -> None:
    """What `pip install /opt/throttllem` sees in the image: only the COPY'd paths."""
    context = tmp_path / "opt-throttllem"
    image_root = Path(workdir("Dockerfile"))
    for group, _ in copies("Dockerfile"):
        for source in group:
            dest = context / copy_target("Dockerfile", source).relative_to(image_root)
            src = ROOT / source
            if src.is_dir():
                shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest)
    out = tmp_path / "wheel"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(context)],
        check=True, capture_output=True, text=True, timeout=200,
    )  # fmt: skip
    (wheel,) = out.glob("throttllem-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in (
        "throttllem/controller/cli.py",
        "throttllem/backend/triton_model/model.py",
        "throttllem/backend/twin/presets/gpus.yaml",
        "throttllem/v1/telemetry_pb2.py",
    ):
        assert needed in names, f"{needed} missing from the wheel"
    # The model repository is not in the wheel: the image keeps its own copy, and the
    # command points at it.
    assert not any(n.startswith("model_repository/") for n in names)
