"""KEDA external scaler: the controller tells a ScaledObject how many replicas the load needs.

KEDA (keda.sh) calls this gRPC service (proto/externalscaler, KEDA's own contract) for every
ScaledObject whose trigger is `type: external` with `scalerAddress` pointing here; every key of the
trigger's `metadata` arrives as `scalerMetadata`:

| key | | meaning |
|---|---|---|
| `model` | required | the Triton model whose demand is measured (one this controller serves) |
| `replicaCapacityRps` | required | highest request rate one replica sustains under the SLOs (> 0) |
| `margin` | default 0.2 | headroom kept free on each replica, in [0, 1) |
| `activationRps` | default 0 | active (IsActive) while the rate is above this or requests queue |
| `queueDrainSeconds` | default 30 | waiting requests are to be cleared within this time (> 0) |

KEDA's own keys (`scalerAddress`, `enableTLS`, `unsafeSsl`) are forwarded too and ignored; any
other key is refused, so that a misspelt optional key is not silently left at its default.

The metric, `throttllem-<model>-demand` (characters other than letters, digits, `-` and `_`
become `-`), counts replicas' worth of demand; its target (GetMetricSpec) is 1, one replica's
worth. Its value (GetMetrics) is

    demand = (rate + queued / queueDrainSeconds) / (replicaCapacityRps * (1 - margin))

The arrival rate is the load itself; the queue term adds the rate that would clear the requests
already waiting within `queueDrainSeconds`, so a backlog raises the demand while the arrival rate
alone would not (during a burst, or when one replica is saturated). `metricValueFloat` carries
`demand` and `metricValue` its ceiling, for KEDA versions that read only the integer.

What the value covers is what the demand source measures. The controller runs beside one Triton
pod and sees that pod's traffic, so a ScaledObject over such pods uses `metricType: Value`: the
HPA then asks for ceil(ready pods x demand) replicas, the whole Deployment's demand when traffic is
spread evenly over the pods. A source that sees every replica's traffic (one controller in front
of all of them) takes `metricType: AverageValue` instead: ceil(demand) replicas.

Errors: bad metadata (missing, not a number, out of range, unknown key) is INVALID_ARGUMENT and a
model this controller does not serve is NOT_FOUND, each message naming the field; a GetMetrics for
another metric name is NOT_FOUND. StreamMetricSpec is not implemented (UNIMPLEMENTED): the target
never changes, and KEDA then falls back to GetMetricSpec.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections.abc import Iterator, Mapping
from concurrent import futures
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol, runtime_checkable

import grpc

from throttllem.externalscaler import externalscaler_pb2 as pb
from throttllem.externalscaler import externalscaler_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

KEY_MODEL = "model"
KEY_CAPACITY = "replicaCapacityRps"
KEY_MARGIN = "margin"
KEY_ACTIVATION = "activationRps"
KEY_QUEUE_DRAIN = "queueDrainSeconds"
REQUIRED_KEYS = (KEY_MODEL, KEY_CAPACITY)
OPTIONAL_KEYS = (KEY_MARGIN, KEY_ACTIVATION, KEY_QUEUE_DRAIN)
METADATA_KEYS = REQUIRED_KEYS + OPTIONAL_KEYS
KEDA_KEYS = ("scalerAddress", "enableTLS", "unsafeSsl")
"""Keys KEDA reads itself from an external trigger's metadata, and forwards with the rest."""

DEFAULT_MARGIN = 0.2
DEFAULT_ACTIVATION_RPS = 0.0
DEFAULT_QUEUE_DRAIN_S = 30.0
DEFAULT_POLL_PERIOD_S = 1.0
TARGET_REPLICAS = 1
"""The metric's target: one replica's worth of demand."""
_MAX_METRIC_VALUE = 2**62


class DemandSource(Protocol):
    """What the scaler measures: a model's arrival rate and the requests waiting for its engine."""

    def request_rate_rps(self, model: str) -> float | None:
        """Measured arrivals per second; None when the model is not known here."""
        ...

    def queued(self, model: str) -> int:
        """Requests waiting for the engine now."""
        ...


@runtime_checkable
class _ListsModels(Protocol):
    def models(self) -> list[str]: ...


class MetadataError(ValueError):
    """A ScaledObject's metadata is missing a key, has a bad value or an unknown key."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


class UnknownModel(LookupError):
    """The metadata names a model that the demand source does not know."""


@dataclass(frozen=True)
class ScalerSpec:
    """One ScaledObject's settings, from its trigger metadata."""

    model: str
    replica_capacity_rps: float
    margin: float = DEFAULT_MARGIN
    activation_rps: float = DEFAULT_ACTIVATION_RPS
    queue_drain_s: float = DEFAULT_QUEUE_DRAIN_S

    @property
    def usable_rps(self) -> float:
        """The rate one replica is planned to carry: capacity less the margin."""
        return self.replica_capacity_rps * (1.0 - self.margin)

    @property
    def metric_name(self) -> str:
        return metric_name(self.model)


def metric_name(model: str) -> str:
    """`throttllem-<model>-demand`, with characters KEDA or the HPA could mangle replaced by `-`."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", f"throttllem-{model}-demand")


def parse_metadata(metadata: Mapping[str, str]) -> ScalerSpec:
    """The settings in a trigger's metadata; MetadataError names the first bad key."""
    unknown = sorted(set(metadata) - set(METADATA_KEYS) - set(KEDA_KEYS))
    if unknown:
        raise MetadataError(
            unknown[0],
            f"scalerMetadata: unknown key '{unknown[0]}'; valid: {', '.join(METADATA_KEYS)}",
        )
    model = metadata.get(KEY_MODEL, "").strip()
    if not model:
        raise MetadataError(KEY_MODEL, f"scalerMetadata: '{KEY_MODEL}' is required")
    capacity = _number(metadata, KEY_CAPACITY, None)
    if capacity <= 0:
        raise MetadataError(KEY_CAPACITY, f"{_show(metadata, KEY_CAPACITY)}: must be > 0")
    margin = _number(metadata, KEY_MARGIN, DEFAULT_MARGIN)
    if not 0.0 <= margin < 1.0:
        raise MetadataError(KEY_MARGIN, f"{_show(metadata, KEY_MARGIN)}: must be in [0, 1)")
    activation = _number(metadata, KEY_ACTIVATION, DEFAULT_ACTIVATION_RPS)
    if activation < 0:
        raise MetadataError(KEY_ACTIVATION, f"{_show(metadata, KEY_ACTIVATION)}: must be >= 0")
    drain = _number(metadata, KEY_QUEUE_DRAIN, DEFAULT_QUEUE_DRAIN_S)
    if drain <= 0:
        raise MetadataError(KEY_QUEUE_DRAIN, f"{_show(metadata, KEY_QUEUE_DRAIN)}: must be > 0")
    return ScalerSpec(model, capacity, margin, activation, drain)


def replica_demand(rate_rps: float, queued: int, spec: ScalerSpec) -> float:
    """Replicas' worth of demand: (rate + queued / drain time) / usable rate of one replica."""
    return (max(rate_rps, 0.0) + max(queued, 0) / spec.queue_drain_s) / spec.usable_rps


def is_active(rate_rps: float, queued: int, spec: ScalerSpec) -> bool:
    return rate_rps > spec.activation_rps or queued > 0


def _number(metadata: Mapping[str, str], key: str, default: float | None) -> float:
    text = metadata.get(key, "").strip()
    if not text:
        if default is None:
            raise MetadataError(key, f"scalerMetadata: '{key}' is required")
        return default
    try:
        value = float(text)
    except ValueError:
        raise MetadataError(key, f"{_show(metadata, key)}: not a number") from None
    if not math.isfinite(value):
        raise MetadataError(key, f"{_show(metadata, key)}: must be a finite number")
    return value


def _show(metadata: Mapping[str, str], key: str) -> str:
    return f"scalerMetadata: {key}={metadata.get(key)!r}"


class KedaScaler(pb_grpc.ExternalScalerServicer):  # type: ignore[misc]
    """The ExternalScaler service over a DemandSource; `stop()` ends every open stream."""

    def __init__(self, source: DemandSource, *, poll_period_s: float = DEFAULT_POLL_PERIOD_S):
        if not (math.isfinite(poll_period_s) and poll_period_s > 0):
            raise ValueError(f"poll_period_s must be positive, got {poll_period_s}")
        self._source = source
        self._poll_period_s = poll_period_s
        self._lock = threading.Lock()
        self._streams: set[threading.Event] = set()
        self._stopping = False

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            for stream in self._streams:
                stream.set()

    def active_streams(self) -> int:
        with self._lock:
            return len(self._streams)

    # ExternalScaler

    def IsActive(self, request: Any, context: Any) -> Any:
        spec = self._spec(request, context, "IsActive")
        return pb.IsActiveResponse(result=self._active(spec, context))

    def StreamIsActive(self, request: Any, context: Any) -> Iterator[Any]:
        spec = self._spec(request, context, "StreamIsActive")
        done = threading.Event()
        context.add_callback(done.set)  # the client cancelled, or the server stops
        with self._lock:
            if self._stopping:
                done.set()
            self._streams.add(done)
        try:
            last: bool | None = None
            while not done.is_set() and context.is_active():
                active = self._active(spec, context)
                if active != last:
                    yield pb.IsActiveResponse(result=active)
                    last = active
                done.wait(self._poll_period_s)
        finally:
            with self._lock:
                self._streams.discard(done)

    def GetMetricSpec(self, request: Any, context: Any) -> Any:
        spec = self._spec(request, context, "GetMetricSpec")
        return pb.GetMetricSpecResponse(
            metricSpecs=[
                pb.MetricSpec(
                    metricName=spec.metric_name,
                    targetSize=TARGET_REPLICAS,
                    targetSizeFloat=float(TARGET_REPLICAS),
                )
            ]
        )

    def GetMetrics(self, request: Any, context: Any) -> Any:
        if not request.HasField("scaledObjectRef"):
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "scaledObjectRef is required")
        spec = self._spec(request.scaledObjectRef, context, "GetMetrics")
        if request.metricName and request.metricName != spec.metric_name:
            _abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"metricName '{request.metricName}': this scaled object's metric is "
                f"'{spec.metric_name}'",
            )
        rate, queued = self._demand(spec, context)
        demand = min(replica_demand(rate, queued, spec), float(_MAX_METRIC_VALUE))
        return pb.GetMetricsResponse(
            metricValues=[
                pb.MetricValue(
                    metricName=spec.metric_name,
                    metricValue=math.ceil(round(demand, 9)),
                    metricValueFloat=demand,
                )
            ]
        )

    # helpers

    def _spec(self, ref: Any, context: Any, rpc: str) -> ScalerSpec:
        try:
            spec = parse_metadata(dict(ref.scalerMetadata))
        except MetadataError as e:
            logger.warning("KEDA %s for %s/%s: %s", rpc, ref.namespace, ref.name, e)
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if self._source.request_rate_rps(spec.model) is None:
            message = f"scalerMetadata: model '{spec.model}' is not served by this controller"
            if isinstance(self._source, _ListsModels):
                message += f" (served: {', '.join(self._source.models()) or 'none yet'})"
            logger.warning("KEDA %s for %s/%s: %s", rpc, ref.namespace, ref.name, message)
            _abort(context, grpc.StatusCode.NOT_FOUND, message)
        return spec

    def _demand(self, spec: ScalerSpec, context: Any) -> tuple[float, int]:
        rate = self._source.request_rate_rps(spec.model)
        if rate is None:  # it went away since the request was checked
            _abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"scalerMetadata: model '{spec.model}' is not served by this controller",
            )
        return float(rate), int(self._source.queued(spec.model))

    def _active(self, spec: ScalerSpec, context: Any) -> bool:
        rate, queued = self._demand(spec, context)
        return is_active(rate, queued, spec)


def _abort(context: Any, code: Any, message: str) -> NoReturn:
    context.abort(code, message)  # raises
    raise AssertionError("grpc context.abort returned")  # pragma: no cover


def add_keda_scaler(
    server: Any, source: DemandSource, *, poll_period_s: float = DEFAULT_POLL_PERIOD_S
) -> KedaScaler:
    """Serve the ExternalScaler service on an existing (not yet started) grpc server."""
    scaler = KedaScaler(source, poll_period_s=poll_period_s)
    pb_grpc.add_ExternalScalerServicer_to_server(scaler, server)
    return scaler


def serve_keda(
    source: DemandSource,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    poll_period_s: float = DEFAULT_POLL_PERIOD_S,
    max_workers: int = 8,
) -> tuple[Any, int]:
    """Start the external scaler on host:port (0: a free port); returns (grpc server, port).

    Each open StreamIsActive holds one of `max_workers` threads until its client cancels.
    `server.stop(grace_s)` ends everything, open streams included. Inside a Kubernetes pod the
    KEDA operator must reach it: bind the pod's address (`0.0.0.0`), not loopback.
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="throttllem-keda"),
        options=[("grpc.so_reuseport", 0)],  # a second scaler on the same port must fail
    )
    add_keda_scaler(server, source, poll_period_s=poll_period_s)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as e:
        raise OSError(f"KEDA external scaler cannot bind {address}: {e}") from e
    if bound == 0:
        raise OSError(f"KEDA external scaler cannot bind {address}")
    server.start()
    logger.info("KEDA external scaler on %s", address.rsplit(":", 1)[0] + f":{bound}")
    return server, int(bound)
