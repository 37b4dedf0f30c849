"""Regenerate the committed Python code of the gRPC contracts (proto/: throttllem.v1 and KEDA's).

    python -m throttllem.backend.telemetry.codegen          # rewrite the committed files
    python -m throttllem.backend.telemetry.codegen --check  # exit 1 when they are stale

Needs grpcio-tools (a test dependency). The generated files record the protoc and grpc versions
that made them; `normalise` masks those lines so that a check run with another grpcio-tools
version compares only what the contract decides.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

PROTO_FILES = ("throttllem/v1/telemetry.proto", "externalscaler/externalscaler.proto")
"""The contracts, as paths under proto/ (where the .proto and its generated code are committed)."""
# Folders under proto/ installed under another import name (pyproject's package-dir): protoc is
# shown them at the import path, so that the generated code's imports resolve once installed.
IMPORT_PATHS = {"externalscaler": "throttllem/externalscaler"}
MODULE = "throttllem.backend.telemetry.codegen"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2_grpc.py")

_VERSION_LINES = (
    re.compile(r"^# Protobuf Python Version: .*$", re.M),
    re.compile(r"^(\s*)\d+,\s*\d+,\s*\d+,\s*$", re.M),  # ValidateProtobufRuntimeVersion args
    re.compile(r"^GRPC_GENERATED_VERSION = .*$", re.M),
)


class CodegenError(RuntimeError):
    """The generator is missing or protoc rejected the contract."""


def proto_root() -> Path:
    """The folder that holds `throttllem/v1/*.proto` (the repository's proto/)."""
    spec = importlib.util.find_spec("throttllem.v1")
    if spec is None or not spec.submodule_search_locations:
        raise CodegenError("package throttllem.v1 not found: is the project installed?")
    return Path(next(iter(spec.submodule_search_locations))).resolve().parents[1]


def generated_names(proto: str) -> list[str]:
    stem = proto[: -len(".proto")]
    return [stem + suffix for suffix in GENERATED_SUFFIXES]


def import_path(proto: str) -> str:
    """The path protoc is shown for `proto` (a path under proto/)."""
    folder, _, name = proto.rpartition("/")
    return f"{IMPORT_PATHS.get(folder, folder)}/{name}"


def generate(out_dir: Path, root: Path | None = None) -> list[Path]:
    """Run protoc (from grpc_tools) on the contracts; the generated files land in `out_dir`
    laid out as under proto/. Returns the files written."""
    try:
        from grpc_tools import protoc  # type: ignore[import-untyped]
    except ImportError as e:  # pragma: no cover - grpcio-tools is a test dependency
        raise CodegenError("grpcio-tools is not installed: pip install grpcio-tools") from e
    root = root or proto_root()
    written: list[Path] = []
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            *(f"-I{virtual}={root / folder}" for folder, virtual in IMPORT_PATHS.items()),
            f"-I{root}",
            f"--python_out={tmp}",
            f"--grpc_python_out={tmp}",
            *(import_path(proto) for proto in PROTO_FILES),
        ]
        code = protoc.main(args)
        if code != 0:
            raise CodegenError(f"protoc failed with status {code} on {', '.join(PROTO_FILES)}")
        for proto in PROTO_FILES:
            for name, made in zip(
                generated_names(proto), generated_names(import_path(proto)), strict=True
            ):
                target = out_dir / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text((Path(tmp) / made).read_text())
                written.append(target)
    return written


def normalise(text: str) -> str:
    """The generated text with the generator's own version numbers masked."""
    for pattern in _VERSION_LINES:
        text = pattern.sub("<version>", text)
    return text


def stale_files(root: Path | None = None) -> list[str]:
    """Committed generated files that differ from a fresh generation (or are missing)."""
    root = root or proto_root()
    stale: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp), root)
        for proto in PROTO_FILES:
            for name in generated_names(proto):
                fresh = (Path(tmp) / name).read_text()
                committed = root / name
                if not committed.is_file() or normalise(committed.read_text()) != normalise(fresh):
                    stale.append(name)
    return stale


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the code is stale")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        for name in stale:
            print(f"stale: proto/{name} (regenerate: python -m {MODULE})", file=sys.stderr)
        return 1 if stale else 0
    written = generate(proto_root())
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
