"""docker/compose.yaml and compose.cpu.yaml, without a Docker engine: the compose-spec schema,
the privileges each service holds, the volumes and namespaces the services share, and every
throttllem command line parsed by the real CLI."""

from __future__ import annotations

import importlib.resources
import json
from typing import Any

import jsonschema
import pytest
import yaml
from ops_support import (
    COMPOSE_FILES,
    DOCKER,
    PROMETHEUS_YML,
    command_of,
    flag_values,
    interpolate,
    load_compose,
    services,
    volume_parts,
)

from throttllem.controller.cli import build_parser
from throttllem.controller.cli_controller import resolve_settings

# What an operator sets (compose.yaml refuses to start without the first two).
ENV = {"THROTTLLEM_ENGINE_DIR": "/srv/engines/llama3", "THROTTLLEM_TOKENIZER_DIR": "/srv/hf/llama3"}


def compose_schema() -> dict[str, Any]:
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    schema: dict[str, Any] = json.loads((vendor / "compose-spec.json").read_text())
    return schema


def resolved(name: str) -> dict[str, Any]:
    data: dict[str, Any] = interpolate(load_compose(name), ENV)
    return data


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_valid_against_the_compose_spec_schema(name: str) -> None:
    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    for document in (load_compose(name), resolved(name)):
        errors = sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path))
        assert not errors, "\n".join(
            f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors
        )


def test_the_schema_rejects_what_compose_rejects() -> None:
    """The check has teeth: a misspelt key and a wrong type fail."""
    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    broken = resolved("compose.yaml")
    broken["services"]["clockd"]["cap_ad"] = ["SYS_ADMIN"]
    broken["services"]["triton"]["ports"] = "8000:8000"
    assert len(list(validator.iter_errors(broken))) >= 2


def test_compose_yaml_needs_the_engine_and_tokenizer() -> None:
    with pytest.raises(KeyError, match="THROTTLLEM_ENGINE_DIR"):
        interpolate(load_compose("compose.yaml"), {})


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_no_service_is_privileged_and_only_clockd_has_sys_admin(name: str) -> None:
    for service_name, service in services(resolved(name)).items():
        assert service.get("privileged") is not True, service_name
        assert "devices" not in service, f"{service_name}: GPUs come through reservations"
        caps = service.get("cap_add", [])
        if service_name == "clockd":
            assert caps == ["SYS_ADMIN"]
        else:
            assert caps == [], f"{service_name} adds capabilities {caps}"
        for option in service.get("security_opt", []):
            assert "unconfined" not in option, f"{service_name}: {option}"
        assert service.get("pid") in (None, "service:triton"), service_name
        assert service.get("network_mode") in (None, "none", "service:triton"), service_name


def gpu_services(compose: dict[str, Any]) -> set[str]:
    found = set()
    for name, service in services(compose).items():
        devices = service.get("deploy", {}).get("resources", {}).get("reservations", {})
        for device in devices.get("devices", []):
            if "gpu" in device.get("capabilities", []):
                found.add(name)
    return found


def test_gpu_stack_services() -> None:
    compose = resolved("compose.yaml")
    svc = services(compose)
    assert set(svc) == {"triton", "controller", "clockd", "prometheus", "grafana"}
    # The GPUs go to Triton (the engine) and the clock daemon (the only one that locks clocks),
    # the same set to both so that NVML indices agree.
    assert gpu_services(compose) == {"triton", "clockd"}
    assert svc["triton"]["deploy"] == svc["clockd"]["deploy"]
    # The controller holds nothing: no capability, no GPU, no privilege escalation.
    assert svc["controller"]["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in svc["controller"]["security_opt"]
    # The daemon needs no network at all.
    assert svc["clockd"]["network_mode"] == "none"


def test_cpu_stack_has_no_gpu_and_no_clock_daemon() -> None:
    compose = resolved("compose.cpu.yaml")
    svc = services(compose)
    assert set(svc) == {"triton", "controller", "prometheus", "grafana"}
    assert gpu_services(compose) == set()
    assert svc["controller"]["cap_drop"] == ["ALL"]


def parse(argv: list[str]) -> Any:
    assert argv[0] == "throttllem"
    return build_parser().parse_args(argv[1:])


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_every_throttllem_command_parses(name: str) -> None:
    for service_name, service in services(resolved(name)).items():
        if "command" in service and command_of(service)[0] == "throttllem":
            args = parse(command_of(service))
            assert args.command in ("serve", "controller", "clockd"), service_name


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_triton_serves_on_every_interface_without_its_own_controller(name: str) -> None:
    args = parse(command_of(services(resolved(name))["triton"]))
    assert args.command == "serve" and args.no_controller is True
    assert args.host == "0.0.0.0"
    # Not built into the installed package: the image's copy of the repository.
    assert str(args.model_repository) == "/opt/throttllem/model_repository"
    expected_engine = "tensorrtllm" if name == "compose.yaml" else "twin"
    assert args.engine == expected_engine


def mounts(service: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """target -> (source, mode)."""
    out = {}
    for entry in service.get("volumes", []):
        source, target, mode = volume_parts(entry)
        out[target] = (source, mode)
    return out


def under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_controller_finds_the_instances(name: str) -> None:
    """Same registry folder (a shared volume) and Triton's network and pid namespaces: the
    telemetry endpoints are on Triton's loopback, and discovery checks each instance's pid."""
    svc = services(resolved(name))
    triton, controller = svc["triton"], svc["controller"]
    serve = parse(command_of(triton))
    ctl = parse(command_of(controller))
    registry = str(serve.registry_dir)
    assert ctl.registry_dir == registry
    triton_mounts, controller_mounts = mounts(triton), mounts(controller)
    (t_source,) = [s for t, (s, _) in triton_mounts.items() if under(registry, t)]
    (c_source,) = [s for t, (s, _) in controller_mounts.items() if under(registry, t)]
    assert t_source == c_source and t_source in load_compose(name)["volumes"]
    assert controller["network_mode"] == "service:triton"
    assert controller["pid"] == "service:triton"
    assert "ports" not in controller  # it has Triton's network: ports are published there


def settings_of(controller: dict[str, Any]) -> dict[str, Any]:
    """resolve_settings over a controller service's command, reading docker/controller.yaml
    where the command mounts it (a model file given by flag is left out: it is the operator's)."""
    argv = command_of(controller)
    config_target = flag_values(argv)["--config"]
    source, _ = mounts(controller)[config_target]
    config = (DOCKER / source).resolve()
    assert config.is_file(), f"{source} (mounted at {config_target}) is not in docker/"
    argv = [
        f"--config={config}" if a.startswith("--config=") else a
        for a in argv
        if not a.startswith("--perf-model=") or a == "--perf-model=auto"
    ]
    settings: dict[str, Any] = resolve_settings(parse(argv))
    return settings


def controller_settings(name: str) -> dict[str, Any]:
    return settings_of(services(resolved(name))["controller"])


def test_gpu_controller_drives_clocks_only_through_clockd() -> None:
    svc = services(resolved("compose.yaml"))
    settings = controller_settings("compose.yaml")
    assert settings["driver"] == "clockd"
    socket = settings["clockd_socket"]
    clockd = parse(command_of(svc["clockd"]))
    assert clockd.driver == "nvml" and str(clockd.socket) == socket
    # The socket's folder is one volume, shared by the daemon and the controller only.
    (d_source,) = [s for t, (s, _) in mounts(svc["clockd"]).items() if under(socket, t)]
    (c_source,) = [s for t, (s, _) in mounts(svc["controller"]).items() if under(socket, t)]
    assert d_source == c_source
    sharing = [n for n, s in svc.items() if any(src == d_source for src, _ in mounts(s).values())]
    assert sorted(sharing) == ["clockd", "controller"]
    assert svc["controller"]["depends_on"]["clockd"]["condition"] == "service_healthy"


def test_cpu_controller_uses_the_twin_and_the_paper_tbt() -> None:
    settings = controller_settings("compose.cpu.yaml")
    assert settings["driver"] == "twin" and settings["perf_model"] == "auto"
    assert settings["slo_tbt_ms"] == 200 and settings["slo_e2e_ms"] == 68000


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_controller_metrics_reach_prometheus(name: str) -> None:
    settings = controller_settings(name)
    assert settings["metrics_host"] == "0.0.0.0" and settings["metrics_port"] == 9400


def listening_ports(compose: dict[str, Any]) -> dict[str, set[int]]:
    """Service -> the ports its network namespace serves (a service joined to another's
    namespace listens in that one)."""
    svc = services(compose)
    out: dict[str, set[int]] = {name: set() for name in svc}
    for name, service in svc.items():
        owner = name
        mode = service.get("network_mode", "")
        if mode.startswith("service:"):
            owner = mode.split(":", 1)[1]
        argv = service.get("command", [])
        if argv and argv[0] == "throttllem":
            args = parse([str(a) for a in argv])
            if args.command == "serve":
                out[owner] |= {args.http_port, args.grpc_port, args.metrics_port}
            elif args.command == "controller":
                out[owner].add(settings_of(service)["metrics_port"])
        for flag in (str(a) for a in argv):
            if flag.startswith("--web.listen-address="):
                out[owner].add(int(flag.rsplit(":", 1)[1]))
        if "grafana" in str(service.get("image", "")):
            out[owner].add(3000)  # Grafana's default http_port
    return out


def prometheus_targets() -> dict[str, list[str]]:
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    return {
        job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]]
        for job in config["scrape_configs"]
    }


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_prometheus_targets_are_ports_the_stack_serves(name: str) -> None:
    compose = resolved(name)
    ports = listening_ports(compose)
    targets = prometheus_targets()
    assert set(targets) == {"triton", "throttllem-controller"}
    for job, addresses in targets.items():
        for address in addresses:
            host, port = address.rsplit(":", 1)
            assert host in ports, f"{job}: {address}: no service {host}"
            assert int(port) in ports[host], f"{job}: {address}: {host} serves {ports[host]}"
    serve = parse(command_of(services(compose)["triton"]))
    assert targets["triton"] == [f"triton:{serve.metrics_port}"]
    assert targets["throttllem-controller"] == ["triton:9400"]


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_published_ports_and_mounted_files(name: str) -> None:
    compose = resolved(name)
    ports = listening_ports(compose)
    for service_name, service in services(compose).items():
        for entry in service.get("ports", []):
            address, _published, target = str(entry).rsplit(":", 2)
            assert address == "127.0.0.1", f"{service_name}: {entry} binds beyond loopback"
            assert int(target) in ports[service_name], f"{service_name}: {entry}"
        for source, _mode in mounts(service).values():
            if source.startswith("./"):
                assert (DOCKER / source).exists() or source == "./perf-model", source
    prometheus = services(compose)["prometheus"]
    assert mounts(prometheus)["/etc/prometheus/prometheus.yml"][0] == "./prometheus/prometheus.yml"


def test_both_stacks_share_monitoring() -> None:
    gpu, cpu = services(resolved("compose.yaml")), services(resolved("compose.cpu.yaml"))
    for name in ("prometheus", "grafana"):
        assert gpu[name] == cpu[name], f"{name} differs between the stacks"


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_the_controller_keeps_its_learned_lengths_on_a_volume_of_its_own(name: str) -> None:
    """A restarted controller container finds what it learned: the lengths folder is a named
    volume, writable, mounted into the controller only."""
    folder = controller_settings(name)["lengths_dir"]
    assert folder
    svc = services(resolved(name))
    ((source, mode),) = [m for t, m in mounts(svc["controller"]).items() if under(folder, t)]
    assert source in load_compose(name)["volumes"] and mode != "ro"
    sharing = [n for n, s in svc.items() if any(src == source for src, _ in mounts(s).values())]
    assert sharing == ["controller"]
