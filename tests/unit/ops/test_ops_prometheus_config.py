"""docker/prometheus/prometheus.yml through promtool (Debian's prometheus package), and the
settings the dashboard depends on."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml
from ops_support import PROMETHEUS_YML, PROMTOOL_MISSING, promtool


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    tool = promtool()
    if tool is None:
        pytest.skip(PROMTOOL_MISSING)
    return subprocess.run(
        [tool, "check", "config", str(path)], capture_output=True, text=True, timeout=60
    )


def test_promtool_accepts_the_config() -> None:
    result = check_config(PROMETHEUS_YML)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_promtool_rejects_a_broken_config(tmp_path: Path) -> None:
    """The check has teeth: a misspelt key fails it."""
    broken = tmp_path / "prometheus.yml"
    broken.write_text(PROMETHEUS_YML.read_text().replace("honor_labels", "honour_labels"))
    assert check_config(broken).returncode != 0


def test_controller_job_keeps_the_engine_instance_label() -> None:
    """The controller labels its series with the Triton model instance (`instance`); without
    honor_labels Prometheus would rename it exported_instance and the dashboard would lose it."""
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["throttllem-controller"]["honor_labels"] is True
    # Triton's families carry model/version/gpu/model_instance: nothing to keep there.
    assert jobs["triton"].get("honor_labels", False) is False
    interval = config["global"]["scrape_interval"]
    assert interval.endswith("s") and int(interval[:-1]) <= 15
