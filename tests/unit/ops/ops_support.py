"""Helpers of the ops tests: the docker/ files as data, compose interpolation, metric names in
the code and in PromQL, and where promtool is."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[3]
DOCKER = ROOT / "docker"
COMPOSE_FILES = ("compose.yaml", "compose.cpu.yaml")
PROMETHEUS_YML = DOCKER / "prometheus" / "prometheus.yml"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "throttllem.json"
PROVISIONING = DOCKER / "grafana" / "provisioning"
CODE_DIRS = (ROOT / "controller", ROOT / "python_backend")

# Metric families the dashboard uses before the code that exports them has landed: the lead's
# energy-saving estimate (controller/metrics.py) and the instance scaler's families (issue 6).
# A name here may be missing from the code; every other name must be in it.
PENDING_METRICS = frozenset(
    {
        "throttllem_energy_saving_ratio",
        "throttllem_scaler_active_size",
        "throttllem_scaler_decisions_total",
        "throttllem_scaler_request_rate_rps",
        "throttllem_scaler_desired_replicas",
    }
)

_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def load_compose(name: str) -> dict[str, Any]:
    data = yaml.safe_load((DOCKER / name).read_text())
    assert isinstance(data, dict)
    return data


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?error}` over a loaded
    document (a required variable that is unset raises KeyError naming it)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match[str]) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        current = env.get(name)
        unset_or_empty = current is None or (current == "" and op is not None and ":" in op)
        if op in (":-", "-") and unset_or_empty:
            return arg or ""
        if op in (":?", "?") and unset_or_empty:
            raise KeyError(f"{name}: {arg}")
        return current or ""

    return _VARIABLE.sub(one, value)


def services(compose: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    found = compose["services"]
    assert isinstance(found, dict)
    return found


def command_of(service: Mapping[str, Any]) -> list[str]:
    command = service.get("command")
    assert isinstance(command, list), "commands are lists (no shell parsing)"
    return [str(part) for part in command]


def flag_values(argv: list[str]) -> dict[str, str]:
    """`--name=value` and `--name value` pairs of a command line."""
    values: dict[str, str] = {}
    for i, part in enumerate(argv):
        if not part.startswith("--"):
            continue
        if "=" in part:
            key, value = part.split("=", 1)
            values[key] = value
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            values[part] = argv[i + 1]
        else:
            values[part] = ""
    return values


def volume_parts(entry: str) -> tuple[str, str, str]:
    """(source, target, mode) of a short-syntax volume."""
    parts = entry.split(":")
    if len(parts) == 2:
        return parts[0], parts[1], "rw"
    assert len(parts) == 3, entry
    return parts[0], parts[1], parts[2]


def code_text() -> str:
    """Every Python source of the packages that export metrics."""
    return "\n".join(
        path.read_text() for folder in CODE_DIRS for path in sorted(folder.rglob("*.py"))
    )


def defined_in_code(name: str, text: str) -> bool:
    """A metric name as a string literal in the code, allowing the suffixes the client adds
    (Counter `x` is exposed as `x_total`; a Histogram `x` as `x_bucket`, `x_sum`, `x_count`)."""
    candidates = {name}
    for suffix in ("_total", "_bucket", "_sum", "_count"):
        if name.endswith(suffix):
            candidates.add(name[: -len(suffix)])
    return any(f'"{c}"' in text or f"'{c}'" in text for c in candidates)


_IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_QUOTED = re.compile(r'"[^"]*"')


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (ours and the reference backend's families)."""
    bare = _QUOTED.sub('""', expr)  # label values are not names
    return {
        token
        for token in _IDENTIFIER.findall(bare)
        if token.startswith(("throttllem_", "nv_trt_llm_", "nv_llm_", "nv_inference_"))
    }


def load_dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def dashboard_panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows' nested panels included, rows themselves excluded."""
    for panel in dashboard["panels"]:
        if panel.get("type") == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def dashboard_exprs(dashboard: Mapping[str, Any]) -> list[str]:
    return [t["expr"] for p in dashboard_panels(dashboard) for t in p.get("targets", [])]


def grafana_to_promql(expr: str, range_s: str = "5m") -> str:
    """A dashboard expression with Grafana's built-in variables replaced, as Grafana sends it."""
    return expr.replace("$__rate_interval", "1m").replace("$__range", range_s)


def promtool() -> str | None:
    return shutil.which("promtool")


PROMTOOL_MISSING = (
    "promtool not found: `make ops-tools` installs Debian's prometheus package "
    "(needs apt-get and root)"
)
