"""`throttllem controller` settings: defaults < config file < flags; bad values name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from throttllem.controller.cli import build_parser
from throttllem.controller.cli_controller import resolve_settings
from throttllem.controller.cli_twin import UsageError


def _args(*argv: str):  # type: ignore[no-untyped-def]
    return build_parser().parse_args(["controller", *argv])


def test_defaults_bind_loopback_and_use_auto_everything() -> None:
    s = resolve_settings(_args())
    assert s["metrics_host"] == "127.0.0.1" and s["metrics_port"] == 9400
    assert s["driver"] == "auto" and s["perf_model"] == "auto"
    assert s["slo_e2e_ms"] is None and s["observe_only"] is False


def test_config_file_then_flags_override(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("slo_e2e_ms: 20000\nmetrics_port: 9500\nobserve_only: true\n")
    s = resolve_settings(_args("--config", str(cfg), "--metrics-port", "9600"))
    assert s["slo_e2e_ms"] == 20000 and s["metrics_port"] == 9600 and s["observe_only"] is True


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("colour: blue\n", "unknown setting 'colour'"),
        ("metrics_port: many\n", "metrics_port must be a int"),
        ("slo_tbt_ms: -5\n", "slo_tbt_ms must be positive"),
        ("driver: magic\n", "driver 'magic': valid: auto, twin, nvml, clockd"),
        ("driver: clockd\n", "--driver clockd needs --clockd-socket"),
        ("prefill_clock: fast\n", "prefill_clock 'fast': valid: auto, optimal, max"),
        ("idle_clocks: parked\n", "idle_clocks 'parked': valid: release, lock"),
        ("perf_model: /nowhere.cbm\n", "perf_model '/nowhere.cbm'"),
        ("- a list\n", "expected a mapping of settings"),
    ],
)
def test_a_wrong_config_names_the_field(tmp_path: Path, text: str, message: str) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_settings(_args("--config", str(cfg)))


def test_unreadable_config(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot read"):
        resolve_settings(_args("--config", str(tmp_path / "absent.yaml")))
