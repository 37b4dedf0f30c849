"""The committed gRPC code matches proto/**/*.proto (regenerated with grpc_tools)."""

from __future__ import annotations

import shutil
from pathlib import Path

from throttllem.backend.telemetry.codegen import (
    PROTO_FILES,
    generate,
    normalise,
    proto_root,
    stale_files,
)


def test_committed_generated_code_is_current() -> None:
    stale = stale_files()
    assert stale == [], (
        f"stale generated code {stale}: run python -m throttllem.backend.telemetry.codegen"
    )


def test_an_edited_contract_is_detected(tmp_path: Path) -> None:
    root = tmp_path / "proto"
    shutil.copytree(proto_root(), root)
    proto = root / PROTO_FILES[0]
    proto.write_text(proto.read_text().replace("uint64 seq = 1;", "uint64 sequence = 1;"))
    assert "throttllem/v1/telemetry_pb2.py" in stale_files(root)


def test_an_edited_keda_contract_is_detected(tmp_path: Path) -> None:
    root = tmp_path / "proto"
    shutil.copytree(proto_root(), root)
    proto = root / "externalscaler/externalscaler.proto"
    proto.write_text(proto.read_text().replace("bool result = 1;", "bool active = 1;"))
    assert stale_files(root) == ["externalscaler/externalscaler_pb2.py"]


def test_keda_code_imports_from_its_installed_package() -> None:
    grpc_code = (proto_root() / "externalscaler/externalscaler_pb2_grpc.py").read_text()
    assert "from throttllem.externalscaler import externalscaler_pb2" in grpc_code
    from throttllem.externalscaler import externalscaler_pb2

    assert externalscaler_pb2.DESCRIPTOR.package == "externalscaler"  # KEDA's, on the wire


def test_version_lines_do_not_count(tmp_path: Path) -> None:
    (written, *_) = generate(tmp_path)
    text = written.read_text()
    bumped = text.replace("# Protobuf Python Version:", "# Protobuf Python Version: 99.0.0 was")
    assert normalise(bumped) == normalise(text)
