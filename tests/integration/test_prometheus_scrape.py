"""A real Prometheus server (Debian's `prometheus`) scraping a live `throttllem serve` on the twin
with the scrape jobs of docker/prometheus/prometheus.yml: the controller's clock metric is
queryable, inside the GPU's supported range, and every dashboard query evaluates."""

from __future__ import annotations

import contextlib
import json
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from throttllem.backend.twin.hardware import default_catalog
from throttllem.controller.triton_launcher import free_port, free_ports

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_YML = ROOT / "docker" / "prometheus" / "prometheus.yml"
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "throttllem.json"
GPU = "A100-SXM4-40GB"
# Ports the compose stack's scrape targets name (triton:8002, triton:9400).
TRITON_METRICS, CONTROLLER_METRICS = 8002, 9400


def deadline_poll(
    what: str, timeout_s: float, probe: Callable[[], Any], detail: Callable[[], str] = str
) -> Any:
    """Call `probe` until it returns something truthy; fail naming `what` at the deadline."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(0.2)  # poll interval, not synchronisation: the deadline decides
    pytest.fail(f"{what}: not within {timeout_s:.0f} s (last: {last!r}) {detail()}")


def stop(proc: subprocess.Popen[Any], timeout_s: float = 60) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Served:
    metrics_port: int
    controller_port: int
    work: Path


@pytest.fixture(scope="module")
def prometheus_binary() -> str:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip(
            "prometheus not found: `make ops-tools` installs Debian's prometheus package "
            "(needs apt-get and root)"
        )
    return binary


@pytest.fixture(scope="module")
def served(prometheus_binary: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """`throttllem serve` on the twin (10x real time) with its controller (oracle model: no
    profiling), on free ports, stopped by SIGTERM whatever the test does."""
    work = tmp_path_factory.mktemp("serve") / "work"
    http, grpc, metrics, controller = free_ports(4)
    cmd = [
        sys.executable, "-m", "throttllem.controller.cli", "serve", "--engine", "twin",
        "--gpu", GPU, "--speedup", "10", "--work-dir", str(work),
        "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
        "--controller-metrics-port", str(controller), "--perf-model", "oracle",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    seen: list[str] = []

    def controller_running() -> bool:
        with contextlib.suppress(queue.Empty):
            while True:
                seen.append(lines.get_nowait())
        if proc.poll() is not None:
            pytest.fail("throttllem serve exited:\n" + "".join(seen))
        return any("controller running" in line for line in seen)

    try:
        deadline_poll(
            "throttllem serve ready with its controller",
            180,
            controller_running,
            lambda: "output:\n" + "".join(seen),
        )
        yield Served(metrics, controller, work)
    finally:
        stop(proc)
        reader.join(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


def prometheus_config(served: Served) -> dict[str, Any]:
    """docker/prometheus/prometheus.yml with the compose targets pointed at this machine."""
    config: dict[str, Any] = yaml.safe_load(PROMETHEUS_YML.read_text())
    ports = {TRITON_METRICS: served.metrics_port, CONTROLLER_METRICS: served.controller_port}
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    for job in config["scrape_configs"]:
        for static in job["static_configs"]:
            static["targets"] = [
                f"127.0.0.1:{ports[int(t.rsplit(':', 1)[1])]}" for t in static["targets"]
            ]
    return config


@dataclass
class Prometheus:
    url: str

    def get(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=5) as response:
            return json.loads(response.read())

    def query(self, promql: str) -> list[dict[str, Any]]:
        body = self.get("/api/v1/query", query=promql)
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result


@contextlib.contextmanager
def running_prometheus(binary: str, config: dict[str, Any], folder: Path) -> Iterator[Prometheus]:
    """A real Prometheus on a free 127.0.0.1 port scraping with `config`, storage in `folder`;
    ready when yielded, always stopped."""
    folder.mkdir(parents=True, exist_ok=True)
    config_file = folder / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config))
    port = free_port()
    log = (folder / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [binary, f"--config.file={config_file}", f"--storage.tsdb.path={folder / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h"],
        stdout=log, stderr=subprocess.STDOUT, cwd=folder,
    )  # fmt: skip
    server = Prometheus(f"http://127.0.0.1:{port}")

    def ready() -> bool:
        if proc.poll() is not None:
            pytest.fail("prometheus exited:\n" + (folder / "prometheus.log").read_text())
        try:
            with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    try:
        deadline_poll("prometheus ready", 60, ready)
        yield server
    finally:
        stop(proc, timeout_s=30)
        log.close()


@pytest.fixture(scope="module")
def prometheus(
    prometheus_binary: str, served: Served, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Prometheus]:
    folder = tmp_path_factory.mktemp("prometheus")
    with running_prometheus(prometheus_binary, prometheus_config(served), folder) as server:
        yield server


def test_prometheus_scrapes_the_controller_clock(prometheus: Prometheus) -> None:
    clocks = default_catalog().gpu(GPU).supported_clocks_mhz()
    lowest, highest = min(clocks), max(clocks)

    def both_targets_up() -> list[dict[str, Any]]:
        up = prometheus.query("up == 1")
        return up if len(up) == 2 else []

    up = deadline_poll("both scrape targets up", 60, both_targets_up)
    assert {s["metric"]["job"] for s in up} == {"triton", "throttllem-controller"}

    chosen = deadline_poll(
        "throttllem_clock_mhz in Prometheus", 60, lambda: prometheus.query("throttllem_clock_mhz")
    )
    (series,) = chosen
    # honor_labels kept the controller's own instance label: the Triton model instance.
    assert series["metric"]["instance"] == "tensorrt_llm_0_0"
    assert series["metric"]["job"] == "throttllem-controller"
    mhz = float(series["value"][1])
    assert lowest <= mhz <= highest and int(mhz) in clocks, (mhz, lowest, highest)

    measured = deadline_poll(
        "throttllem_gpu_sm_clock_mhz in Prometheus",
        60,
        lambda: prometheus.query("max by (gpu) (throttllem_gpu_sm_clock_mhz)"),
    )
    for sample in measured:
        assert lowest <= float(sample["value"][1]) <= highest


def test_every_dashboard_query_evaluates(prometheus: Prometheus) -> None:
    deadline_poll(
        "throttllem_clock_mhz in Prometheus", 60, lambda: prometheus.query("throttllem_clock_mhz")
    )
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for row in dashboard["panels"] for p in (row.get("panels") or [row])]
    exprs = [t["expr"] for p in panels if p.get("type") != "row" for t in p["targets"]]
    assert exprs
    with_data = 0
    for expr in exprs:
        promql = expr.replace("$__rate_interval", "1m").replace("$__range", "5m")
        with_data += bool(prometheus.query(promql))  # status success: parsed and evaluated
    # An idle twin already exports the clocks, power, energy and the controller's decisions.
    assert with_data >= 5, f"only {with_data} of {len(exprs)} dashboard queries have data"
