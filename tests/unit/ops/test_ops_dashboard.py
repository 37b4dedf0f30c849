"""docker/grafana: the throttllem dashboard (panels, PromQL, metric names that exist in the
code) and the provisioning that loads it."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from ops_support import (
    DASHBOARD,
    PENDING_METRICS,
    PROMTOOL_MISSING,
    PROVISIONING,
    code_text,
    dashboard_exprs,
    dashboard_panels,
    defined_in_code,
    grafana_to_promql,
    interpolate,
    load_compose,
    load_dashboard,
    metric_names,
    promtool,
    services,
    volume_parts,
)


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return load_dashboard()


def datasource_uid() -> str:
    (path,) = (PROVISIONING / "datasources").glob("*.yaml")
    (source,) = yaml.safe_load(path.read_text())["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    uid: str = source["uid"]
    return uid


def test_identity_and_layout(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "throttllem" and dashboard["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps another panel"
                cells.add((x, y))


def test_every_panel_queries_the_provisioned_prometheus(dashboard: dict[str, Any]) -> None:
    uid = datasource_uid()
    panels = list(dashboard_panels(dashboard))
    assert len(panels) >= 12
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]
        assert panel["targets"], f"{panel['title']}: no query"
        for target in panel["targets"]:
            assert target["expr"].strip(), f"{panel['title']}: empty query"
            assert target["datasource"]["uid"] == uid
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]


def test_every_metric_exists_in_the_code(dashboard: dict[str, Any]) -> None:
    """A metric renamed in the code (or misspelt here) fails; names of work still to land
    (PENDING_METRICS) may be missing until it does."""
    text = code_text()
    used = {name for expr in dashboard_exprs(dashboard) for name in metric_names(expr)}
    missing = sorted(n for n in used if not defined_in_code(n, text) and n not in PENDING_METRICS)
    assert not missing, f"not exported anywhere in controller/ or python_backend/: {missing}"


def test_the_name_check_has_teeth() -> None:
    text = code_text()
    assert defined_in_code("throttllem_clock_mhz", text)
    assert defined_in_code("throttllem_clock_changes_total", text)  # Counter + _total
    assert defined_in_code("throttllem_ttft_seconds_bucket", text)  # Histogram + _bucket
    assert defined_in_code("throttllem_gpu_energy_joules_total", text)
    assert not defined_in_code("throttllem_clock_mhz_renamed", text)
    assert metric_names('max by (gpu) (throttllem_gpu_power_w{kind="throttllem_x"})') == {
        "throttllem_gpu_power_w"
    }


def test_the_issue_asks_for_these(dashboard: dict[str, Any]) -> None:
    used = {name for expr in dashboard_exprs(dashboard) for name in metric_names(expr)}
    wanted = {
        # clock per GPU, power and energy, tokens per joule, saving against maximum clock
        "throttllem_gpu_sm_clock_mhz", "throttllem_clock_mhz", "throttllem_gpu_power_w",
        "throttllem_gpu_energy_joules_total", "throttllem_energy_joules",
        "throttllem_tokens_per_joule", "throttllem_energy_saving_ratio",
        # requests in flight and queued
        "throttllem_requests_running", "throttllem_requests_waiting",
        "nv_trt_llm_request_metrics",
        # TTFT / TBT / E2E percentiles against targets, SLO attainment
        "throttllem_ttft_seconds_bucket", "throttllem_tbt_seconds_bucket",
        "throttllem_e2e_seconds_bucket", "throttllem_slo_target_seconds",
        "throttllem_slo_attainment",
        # predicted vs observed IPS, scaler decisions
        "throttllem_predicted_ips", "throttllem_observed_ips",
        "throttllem_scaler_active_size", "throttllem_scaler_decisions_total",
        "throttllem_scaler_request_rate_rps", "throttllem_scaler_desired_replicas",
    }  # fmt: skip
    assert wanted <= used, f"missing: {sorted(wanted - used)}"


def test_percentile_panels_show_their_target(dashboard: dict[str, Any]) -> None:
    for kind in ("ttft", "tbt", "e2e"):
        (panel,) = [
            p
            for p in dashboard_panels(dashboard)
            if any(f"throttllem_{kind}_seconds_bucket" in t["expr"] for t in p["targets"])
        ]
        exprs = [t["expr"] for t in panel["targets"]]
        assert any(f'kind="{kind}"' in e and "throttllem_slo_target_seconds" in e for e in exprs)
        assert sum("histogram_quantile(0.99" in e for e in exprs) == 1
        assert panel["fieldConfig"]["defaults"]["unit"] == "s"


def test_every_query_is_valid_promql(dashboard: dict[str, Any], tmp_path: Path) -> None:
    """promtool parses each expression as a recording rule (Grafana's variables replaced)."""
    tool = promtool()
    if tool is None:
        pytest.skip(PROMTOOL_MISSING)
    exprs = dashboard_exprs(dashboard)
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{i}", "expr": grafana_to_promql(e)}
                    for i, e in enumerate(exprs)
                ],
            }
        ]
    }
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run(
        [tool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(exprs)} rules found" in result.stdout + result.stderr
    # ... and a broken one fails, so the check is real.
    broken = {"record": "x:y", "expr": "sum by (le (rate(throttllem_ttft_seconds_bucket[5m]))"}
    path.write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [broken]}]}))
    assert subprocess.run([tool, "check", "rules", str(path)], capture_output=True).returncode


def test_provisioning_loads_the_dashboard_from_the_mounted_folder() -> None:
    (path,) = (PROVISIONING / "dashboards").glob("*.yaml")
    (provider,) = yaml.safe_load(path.read_text())["providers"]
    assert provider["type"] == "file"
    folder = provider["options"]["path"]
    for name in ("compose.yaml", "compose.cpu.yaml"):
        env = {"THROTTLLEM_ENGINE_DIR": "/e", "THROTTLLEM_TOKENIZER_DIR": "/t"}
        grafana = services(interpolate(load_compose(name), env))["grafana"]
        volumes = {volume_parts(v)[1]: volume_parts(v)[0] for v in grafana["volumes"]}
        assert volumes[folder] == "./grafana/dashboards"
        assert volumes["/etc/grafana/provisioning"] == "./grafana/provisioning"
        home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
        assert home == f"{folder}/{DASHBOARD.name}"
