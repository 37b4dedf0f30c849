"""docker/k8s: Kubernetes' own schemas (offline), KEDA's ScaledObject fields, and the wiring.

No cluster here: the core kinds are checked against the OpenAPI schemas that kubernetes-validate
bundles, the ScaledObject against a schema of KEDA's CRD fields (keda_scaledobject.schema.json),
and the rest by reading the manifests: who is privileged, what the ScaledObject points at, and
that every command line parses with throttllem's own CLI.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from throttllem.controller import cli_clockd, cli_controller, cli_serve
from throttllem.controller.scaling.keda import (
    KEDA_KEYS,
    METADATA_KEYS,
    REQUIRED_KEYS,
    metric_name,
    parse_metadata,
)

K8S_DIR = Path(__file__).resolve().parents[3] / "docker" / "k8s"
SCHEMA = Path(__file__).with_name("keda_scaledobject.schema.json")
K8S_VERSION = "1.31.0"
"""A Kubernetes release that kubernetes-validate bundles (1.25-1.37 in 1.37.0)."""
CORE_KINDS = {"Namespace", "Deployment", "Service", "NetworkPolicy"}
# Flags the controller will take for the KEDA scaler (controller/scaling/keda.py: serve_keda),
# accepted here until `throttllem controller` has them.
KEDA_FLAGS = {"--keda-port", "--keda-host"}


def load_documents() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


DOCS = load_documents()


def the(kind: str) -> dict[str, Any]:
    (doc,) = [d for d in DOCS if d["kind"] == kind]
    return doc


def containers() -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in the("Deployment")["spec"]["template"]["spec"]["containers"]}


def flags(container: dict[str, Any]) -> dict[str, str]:
    """`--name=value` arguments of a container's command, by name."""
    out: dict[str, str] = {}
    for arg in container["command"]:
        if arg.startswith("--") and "=" in arg:
            name, value = arg.split("=", 1)
            out[name] = value
    return out


def test_every_kind_is_here_and_in_the_kustomization() -> None:
    assert sorted(d["kind"] for d in DOCS) == sorted([*CORE_KINDS, "ScaledObject"])
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in K8S_DIR.glob("*.yaml")} - {"kustomization.yaml"}


@pytest.mark.parametrize("kind", sorted(CORE_KINDS))
def test_core_kinds_match_the_kubernetes_schema(kind: str) -> None:
    kubernetes_validate.validate(the(kind), K8S_VERSION, strict=True)


def test_the_kubernetes_schema_check_catches_mistakes() -> None:
    bad = copy.deepcopy(the("Deployment"))
    clockd = next(c for c in bad["spec"]["template"]["spec"]["containers"] if c["name"] == "clockd")
    clockd["securityContext"]["capabilities"]["add"] = "SYS_ADMIN"  # not a list
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)
    typo = copy.deepcopy(the("Service"))
    typo["spec"]["selectr"] = typo["spec"].pop("selector")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, K8S_VERSION, strict=True)


def test_scaled_object_matches_kedas_fields() -> None:
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text()))
    validator.check_schema(validator.schema)
    validator.validate(the("ScaledObject"))
    bad = copy.deepcopy(the("ScaledObject"))
    bad["spec"]["triggers"][0]["metadata"]["replicaCapacityRps"] = 2.5  # KEDA wants strings
    assert not validator.is_valid(bad)
    bad = copy.deepcopy(the("ScaledObject"))
    bad["spec"]["minReplicas"] = bad["spec"].pop("minReplicaCount")  # the HPA's name, not KEDA's
    assert not validator.is_valid(bad)


def test_only_clockd_is_privileged_and_only_with_sys_admin() -> None:
    pod = the("Deployment")["spec"]["template"]["spec"]
    everything = pod["containers"] + pod.get("initContainers", [])
    privileged = [
        c["name"]
        for c in everything
        if c.get("securityContext", {}).get("privileged")
        or c.get("securityContext", {}).get("capabilities", {}).get("add")
    ]
    assert privileged == ["clockd"]
    sc = containers()["clockd"]["securityContext"]
    assert sc["privileged"] is False
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["SYS_ADMIN"]}
    # The API server refuses allowPrivilegeEscalation: false beside an added SYS_ADMIN.
    assert sc.get("allowPrivilegeEscalation") is not False
    assert "--driver=nvml" in containers()["clockd"]["command"]
    for name in ("triton", "controller"):
        sc = containers()[name]["securityContext"]
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["allowPrivilegeEscalation"] is False
    assert not pod.get("hostNetwork") and not pod.get("hostPID")


def test_gpus_are_limited_and_clockd_sees_the_same_node() -> None:
    c = containers()
    gpus = c["triton"]["resources"]["limits"]["nvidia.com/gpu"]
    assert int(gpus) >= 1
    assert "nvidia.com/gpu" not in c["controller"].get("resources", {}).get("limits", {})
    env = {e["name"]: e["value"] for e in c["clockd"]["env"]}
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    anti = the("Deployment")["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    (term,) = anti["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname"  # one pod, one node's GPUs


def test_scaled_object_targets_the_deployment() -> None:
    deployment, scaled = the("Deployment"), the("ScaledObject")
    ref = scaled["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == (
        "apps/v1",
        "Deployment",
        deployment["metadata"]["name"],
    )
    assert scaled["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    # The scaler lives in the pods it scales: never to zero.
    assert scaled["spec"]["minReplicaCount"] >= 1
    assert scaled["spec"]["maxReplicaCount"] >= scaled["spec"]["minReplicaCount"]


def test_scaler_address_reaches_the_controllers_keda_port() -> None:
    service, scaled = the("Service"), the("ScaledObject")
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "external"
    host, port = trigger["metadata"]["scalerAddress"].rsplit(":", 1)
    name, namespace = service["metadata"]["name"], service["metadata"]["namespace"]
    assert host in (f"{name}.{namespace}.svc.cluster.local", f"{name}.{namespace}.svc")
    (svc_port,) = [p for p in service["spec"]["ports"] if p["port"] == int(port)]
    controller = containers()["controller"]
    (target,) = [p for p in controller["ports"] if p["name"] == svc_port["targetPort"]]
    assert flags(controller)["--keda-port"] == str(target["containerPort"])
    assert flags(controller)["--keda-host"] == "0.0.0.0"  # the KEDA operator is another pod
    labels = the("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    policy = the("NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert any(
        any(p["port"] == target["containerPort"] for p in rule.get("ports", []))
        for rule in policy["spec"]["ingress"]
    )


def test_trigger_metadata_is_what_the_scaler_accepts() -> None:
    (trigger,) = the("ScaledObject")["spec"]["triggers"]
    metadata = trigger["metadata"]
    assert set(REQUIRED_KEYS) <= set(metadata)
    assert set(metadata) <= set(METADATA_KEYS) | set(KEDA_KEYS)
    spec = parse_metadata(metadata)  # the scaler would accept it as it stands
    assert spec.model == cli_controller.DEFAULTS["model_name"]  # what the controller watches
    assert metric_name(spec.model) == f"throttllem-{spec.model}-demand"
    # Each controller reports its own pod's demand: the HPA multiplies by the pods (keda.py).
    assert trigger["metricType"] == "Value"


def test_pod_wiring_is_consistent() -> None:
    pod = the("Deployment")["spec"]["template"]["spec"]
    c = containers()
    assert pod["shareProcessNamespace"] is True  # discovery checks each instance's pid
    volumes = {v["name"] for v in pod["volumes"]}
    mounts = {
        name: {m["name"]: m["mountPath"] for m in spec.get("volumeMounts", [])}
        for name, spec in c.items()
    }
    assert all(set(m) <= volumes for m in mounts.values())
    registry = flags(c["triton"])["--registry-dir"]
    assert flags(c["controller"])["--registry-dir"] == registry
    assert mounts["triton"]["registry"] == mounts["controller"]["registry"] == registry
    socket = flags(c["clockd"])["--socket"]
    assert flags(c["controller"])["--clockd-socket"] == socket
    assert flags(c["controller"])["--driver"] == "clockd"
    folder = str(Path(socket).parent)
    assert mounts["clockd"]["clockd-socket"] == mounts["controller"]["clockd-socket"] == folder
    for name in ("--engine-dir", "--tokenizer-dir"):
        assert flags(c["triton"])[name].startswith(mounts["triton"]["models"] + "/")
    assert flags(c["controller"])["--perf-model"].startswith(mounts["controller"]["models"] + "/")
    assert "--no-controller" in c["triton"]["command"]  # the controller is its own container
    port_names = [p["name"] for spec in c.values() for p in spec.get("ports", [])]
    port_names += [p["name"] for p in the("Service")["spec"]["ports"]]
    for port_name in port_names:  # IANA service names, as the API server insists
        assert re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?", port_name), port_name
    ports = {p["name"] for p in c["triton"]["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c["triton"][probe]["httpGet"]["port"] in ports


def test_commands_parse_with_throttllem_cli() -> None:
    parser = argparse.ArgumentParser(prog="throttllem", exit_on_error=False)
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (cli_serve, cli_clockd, cli_controller):
        module.add_parser(sub)
    for name, container in containers().items():
        command = container["command"]
        assert command[0] == "throttllem", name
        args = command[1:]
        if args[0] == "controller":
            known = {"--" + key.replace("_", "-") for key in cli_controller.SETTINGS}
            assert KEDA_FLAGS.issubset(flags(container)), "the controller must serve KEDA"
            args = [a for a in args if a.split("=", 1)[0] not in KEDA_FLAGS - known]
        try:
            parser.parse_args(args)
        except (SystemExit, argparse.ArgumentError) as e:  # pragma: no cover - shows the line
            pytest.fail(f"{name}: `{shlex.join(command)}` does not parse: {e}")
