"""How `throttllem controller` wires its settings into the sidecar (cli_controller.build_sidecar):
the clock daemon's client per instance, the watched models."""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from throttllem.backend.twin.gpu import TwinGpu
from throttllem.backend.twin.hardware import default_catalog
from throttllem.backend.twin.time_source import VirtualTime
from throttllem.controller.cli_controller import DEFAULTS, build_sidecar
from throttllem.controller.gpu.clockd import ClockDaemon
from throttllem.controller.gpu.driver import WriteOutcome
from throttllem.controller.gpu.twin_driver import TwinDriver


@pytest.fixture
def daemon_gpus() -> Iterator[tuple[Path, list[TwinGpu]]]:
    """A clock daemon over four twin GPUs on a short socket path."""
    spec = default_catalog().gpu("A100-SXM4-40GB")
    gpus = [TwinGpu(spec, VirtualTime(), index=i, clock_change_latency_ms=0.0) for i in range(4)]
    folder = Path(tempfile.mkdtemp(prefix="clockd-", dir="/tmp"))
    driver = TwinDriver(gpus)
    daemon = ClockDaemon(driver, folder / "c.sock")
    ready = threading.Event()
    thread = threading.Thread(target=daemon.serve_forever, args=(ready.set,))
    thread.start()
    try:
        assert ready.wait(10)
        yield daemon.socket_path, gpus
    finally:
        daemon.stop()
        thread.join(10)
        driver.close()
        shutil.rmtree(folder, ignore_errors=True)


def link(endpoint: str, gpus: list[int]) -> Any:
    return SimpleNamespace(endpoint=endpoint, info=SimpleNamespace(gpu_indices=gpus))


def test_clockd_driver_of_each_instance_holds_only_its_gpus(
    daemon_gpus: tuple[Path, list[TwinGpu]],
) -> None:
    """Two instances (GPUs 0-1 and 2-3) under one daemon: each driver locks its own GPUs; with
    a client over every GPU the second instance's first write was a LeaseConflict."""
    socket_path, gpus = daemon_gpus
    sidecar = build_sidecar({**DEFAULTS, "driver": "clockd", "clockd_socket": str(socket_path)})
    first = sidecar._drivers(link("a:1", [0, 1]))
    second = sidecar._drivers(link("b:2", [2, 3]))
    try:
        assert first.gpu_indices() == (0, 1) and second.gpu_indices() == (2, 3)
        for driver, mhz in ((first, 900), (second, 705)):
            outcome = driver.set_locked_clocks(driver.gpu_indices(), mhz, mhz)
            assert outcome is WriteOutcome.APPLIED
        assert [g.locked_clocks_mhz() for g in gpus] == [(900, 900)] * 2 + [(705, 705)] * 2
    finally:
        first.close()
        second.close()
    assert all(g.locked_clocks_mhz() is None for g in gpus)


def test_watch_models_setting_reaches_the_sidecar(tmp_path: Path) -> None:
    from throttllem.controller.cli import build_parser
    from throttllem.controller.cli_controller import resolve_settings

    flags = ["controller", "--watch-models", "tensorrt_llm_tp1, tensorrt_llm_tp2,"]
    sidecar = build_sidecar(resolve_settings(build_parser().parse_args(flags)))
    assert sidecar.config.watch_models == ("tensorrt_llm_tp1", "tensorrt_llm_tp2")
    assert sidecar.watched_models() == ("tensorrt_llm", "tensorrt_llm_tp1", "tensorrt_llm_tp2")
    assert sidecar.meter.models() == ["tensorrt_llm"]  # arrivals counted under the router

    cfg = tmp_path / "c.yaml"
    cfg.write_text("model_name: router\nwatch_models: v1\n")
    settings = resolve_settings(build_parser().parse_args(["controller", "--config", str(cfg)]))
    assert build_sidecar(settings).watched_models() == ("router", "v1")
    assert build_sidecar(DEFAULTS).config.watch_models == ()


def test_prefill_clock_setting_reaches_every_instance_controller() -> None:
    from throttllem.controller.cli import build_parser
    from throttllem.controller.cli_controller import resolve_settings

    flags = ["controller", "--prefill-clock", "max"]
    sidecar = build_sidecar(resolve_settings(build_parser().parse_args(flags)))
    assert sidecar.config.controller.prefill_clock == "max"
    assert build_sidecar(DEFAULTS).config.controller.prefill_clock == "auto"


def test_idle_clocks_setting_reaches_every_instance_controller() -> None:
    from throttllem.controller.cli import build_parser
    from throttllem.controller.cli_controller import resolve_settings

    flags = ["controller", "--idle-clocks", "lock"]
    sidecar = build_sidecar(resolve_settings(build_parser().parse_args(flags)))
    assert sidecar.config.controller.idle_clocks == "lock"
    assert build_sidecar(DEFAULTS).config.controller.idle_clocks == "release"


def test_lengths_dir_setting_reaches_the_sidecar(tmp_path: Path) -> None:
    from throttllem.controller.cli import build_parser
    from throttllem.controller.cli_controller import resolve_settings

    flags = ["controller", "--lengths-dir", str(tmp_path / "lengths")]
    sidecar = build_sidecar(resolve_settings(build_parser().parse_args(flags)))
    assert sidecar.config.lengths_dir == tmp_path / "lengths"
    assert build_sidecar(DEFAULTS).config.lengths_dir is None


def _serve_controller_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, extra: list[str]
) -> dict[str, Any]:
    """The settings `throttllem serve` with these flags hands the controller it starts."""
    from throttllem.controller import cli_controller, cli_serve
    from throttllem.controller.cli import build_parser

    seen: list[dict[str, Any]] = []

    class Idle:
        def run(self, stop: threading.Event) -> None:
            pass

    def fake_build(settings: dict[str, Any]) -> Idle:
        seen.append(settings)
        return Idle()

    monkeypatch.setattr(cli_controller, "build_sidecar", fake_build)
    flags = ["serve", "--controller-metrics-port", "0", *extra]
    thread, _ = cli_serve.start_controller(
        build_parser().parse_args(flags), tmp_path / "registry", threading.Event()
    )
    thread.join()
    assert len(seen) == 1
    return seen[0]


def test_serve_hands_its_lengths_dir_to_the_controller_it_starts(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for extra, expected in (
        (["--controller-lengths-dir", str(tmp_path / "l")], str(tmp_path / "l")),
        ([], None),
    ):
        settings = _serve_controller_settings(monkeypatch, tmp_path, extra)
        assert settings["lengths_dir"] == expected


def test_length_hints_setting_reaches_every_new_instances_predictor() -> None:
    from throttllem.controller.cli import build_parser
    from throttllem.controller.cli_controller import resolve_settings
    from throttllem.controller.cli_simulate import LENGTH_HINT_CHOICES
    from throttllem.controller.cli_twin import UsageError
    from throttllem.controller.length_predictor import HINT_USES

    assert LENGTH_HINT_CHOICES == HINT_USES
    flags = ["controller", "--length-hints", "trust"]
    sidecar = build_sidecar(resolve_settings(build_parser().parse_args(flags)))
    assert sidecar.config.length_hints == "trust"
    assert sidecar.lengths.new_predictor("llm", "i0", []).hints == "trust"
    default = build_sidecar(DEFAULTS)
    assert default.lengths.new_predictor("llm", "i0", []).hints == "cap"
    with pytest.raises(UsageError, match="length_hints 'always': valid: cap, trust, ignore"):
        resolve_settings(build_parser().parse_args(["controller", "--length-hints", "always"]))


def test_serve_hands_its_use_of_length_hints_to_the_controller_it_starts(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for extra, expected in ((["--length-hints", "ignore"], "ignore"), ([], "cap")):
        settings = _serve_controller_settings(monkeypatch, tmp_path, extra)
        assert settings["length_hints"] == expected
