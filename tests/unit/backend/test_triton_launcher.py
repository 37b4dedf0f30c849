"""The Triton launcher's pure parts and `throttllem serve`'s one-line failures."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from throttllem.controller import triton_launcher as tl
from throttllem.controller.cli import main


def test_placeholders_are_filled_and_unknown_ones_stay() -> None:
    text = 'a: "${x}" b: "${y}"'
    assert tl.fill_placeholders(text, {"x": "1"}) == 'a: "1" b: "${y}"'


def test_repository_is_filled_with_instances_and_variants(tmp_path: Path) -> None:
    spec = tl.RepositorySpec(
        parameters={"engine": "twin", "twin_speedup": "3"},
        instances=3,
        variants={"tensorrt_llm_sync": False},
    )
    repo = tl.build_repository(tl.source_model_repository(), tmp_path / "models", spec)
    main_cfg = (repo / "tensorrt_llm" / "config.pbtxt").read_text()
    assert 'string_value: "twin"' in main_cfg and 'string_value: "3"' in main_cfg
    assert "count: 3" in main_cfg and "decoupled: true" in main_cfg
    assert tl.site_packages().split(":")[0] in main_cfg  # the stub needs our environment
    sync = (repo / "tensorrt_llm_sync" / "config.pbtxt").read_text()
    assert 'name: "tensorrt_llm_sync"' in sync and "decoupled: false" in sync
    assert (repo / "ensemble" / "config.pbtxt").is_file()
    assert (repo / "tensorrt_llm" / "1" / "model.py").is_file()


def test_not_a_repository(tmp_path: Path) -> None:
    with pytest.raises(tl.TritonError, match="not a throttllem model repository"):
        tl.build_repository(tmp_path, tmp_path / "out", tl.RepositorySpec())


def test_a_bad_tritonserver_variable_is_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRITONSERVER", str(tmp_path / "missing"))
    with pytest.raises(tl.TritonError, match=r"\$TRITONSERVER=.*not an executable"):
        tl.find_triton(tmp_path)


def test_serve_reports_a_missing_triton_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TRITONSERVER", str(tmp_path / "missing"))
    code = main(["serve", "--work-dir", str(tmp_path / "work")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3 and len(err) == 1 and "TRITONSERVER" in err[0]


def test_serve_checks_its_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--engine", "tensorrtllm"]) == 2
    assert "--engine-dir" in capsys.readouterr().err


def test_a_tritonserver_that_dies_is_reported_with_its_errors(tmp_path: Path) -> None:
    fake = tmp_path / "tritonserver"
    fake.write_text("#!/bin/sh\necho 'E1123 12:00:00 boom: cannot start'\nexit 7\n")
    fake.chmod(0o755)
    install = tl.TritonInstall(fake, None, {}, "test")
    server = tl.TritonServer(tmp_path, work_dir=tmp_path, ports=tl.Ports(1, 2, 3), install=install)
    server.start()
    with pytest.raises(tl.TritonError, match=r"(?s)exited with status 7.*boom"):
        server.wait_ready(timeout_s=10)
    assert server.stop() == 7


def test_free_ports_are_distinct_and_each_can_be_bound() -> None:
    """Picked one at a time, a port just released can come back: tritonserver then refuses
    gRPC and metrics on one port (a CI run failed so)."""
    ports = tl.free_ports(32)
    assert len(set(ports)) == 32
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", port))
    server = tl.Ports.free()
    assert len({server.http, server.grpc, server.metrics}) == 3
