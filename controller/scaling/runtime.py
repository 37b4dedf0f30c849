"""The scaler wired to a live Triton server: used by `throttllem serve --scaling-tp` (in process)
and by `throttllem controller --scaling-sizes` (the sidecar process, restartable).

The size that serves is whatever the routing file names when the loop starts, so a controller
that restarts picks up where the last one left off.
"""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry

from throttllem.backend.triton_model.routing_file import RoutingTable

from .loop import ScalingLoop
from .rate_meter import ArrivalRateMeter
from .scaler import EngineSize, InstanceScaler, ScalerConfig
from .scaler_metrics import ScalerMetrics
from .switcher import TritonSwitcher, live_instances, telemetry_in_flight


def parse_tp_list(spec: str) -> list[int]:
    """`1,2,4`: TP sizes, ascending, duplicates dropped."""
    try:
        tps = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"expected comma-separated TP sizes such as 1,2,4, got {spec!r}") from None
    if not tps or tps[0] < 1:
        raise ValueError(f"expected TP sizes >= 1, got {spec!r}")
    return tps


def parse_sizes(spec: str) -> list[EngineSize]:
    """`tp1=1.0,tp2=3.5,...`: each size's name (tpN) and capacity in requests/s."""
    sizes = []
    for item in (x.strip() for x in spec.split(",") if x.strip()):
        name, sep, value = item.partition("=")
        if not sep or not name.startswith("tp") or not name[2:].isdigit():
            raise ValueError(f"scaling size {item!r}: expected tpN=REQUESTS_PER_S")
        try:
            capacity = float(value)
        except ValueError:
            raise ValueError(f"scaling size {name}: capacity {value!r} is not a number") from None
        if not capacity > 0:
            raise ValueError(f"scaling size {name}: capacity must be positive, got {capacity}")
        sizes.append(EngineSize(name, int(name[2:]), capacity))
    if not sizes:
        raise ValueError("no scaling sizes given")
    return sizes


def build_scaling_loop(
    triton_grpc_url: str,
    sizes: list[EngineSize],
    *,
    model_name: str,
    routing_file: Path,
    registry_dir: Path,
    meter: ArrivalRateMeter,
    registry: CollectorRegistry,
    config: ScalerConfig,
) -> ScalingLoop:
    import tritonclient.grpc as grpcclient

    variants = {s.name: f"{model_name}_{s.name}" for s in sizes}
    current = RoutingTable(routing_file).target()
    start = next((name for name, v in variants.items() if v == current), None)
    if start is None:
        raise ValueError(
            f"routing file {routing_file} names {current!r}, not one of "
            f"{', '.join(variants.values())}"
        )
    control = grpcclient.InferenceServerClient(triton_grpc_url)
    switcher = TritonSwitcher(control, routing_file, telemetry_in_flight(registry_dir))
    switcher.current = current
    return ScalingLoop(
        InstanceScaler(sizes, config, start=start),
        switcher,
        meter,
        model_name,
        variants.__getitem__,
        metrics=ScalerMetrics(registry),
        live_instances=live_instances(registry_dir),
    )
