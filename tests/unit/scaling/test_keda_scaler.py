"""The KEDA external scaler, through a real gRPC client built from KEDA's proto, on 127.0.0.1."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from throttllem.controller.scaling.keda import (
    DEFAULT_MARGIN,
    KEY_ACTIVATION,
    KEY_CAPACITY,
    KEY_MARGIN,
    KEY_MODEL,
    KEY_QUEUE_DRAIN,
    add_keda_scaler,
    metric_name,
    parse_metadata,
    replica_demand,
    serve_keda,
)
from throttllem.controller.scaling.rate_meter import ArrivalRateMeter
from throttllem.externalscaler import externalscaler_pb2 as pb
from throttllem.externalscaler import externalscaler_pb2_grpc as pb_grpc

MODEL = "tensorrt_llm"
WINDOW_S = 10.0
POLL_S = 0.02
TIMEOUT_S = 5.0


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.t

    def advance(self, dt: float) -> None:
        with self._lock:
            self.t += dt


class Load:
    """A meter driven by hand: `rate(r)` leaves exactly r rps in the window."""

    def __init__(self) -> None:
        self.clock = FakeClock()
        self.meter = ArrivalRateMeter(window_s=WINDOW_S, clock=self.clock, models=[MODEL])
        self.clock.advance(2 * WINDOW_S)

    def rate(self, rps: float) -> None:
        self.clock.advance(WINDOW_S)  # the window empties
        n = round(rps * WINDOW_S)
        for i in range(n):
            self.meter.record_arrival(MODEL, self.clock() - WINDOW_S + (i + 0.5) * WINDOW_S / n)

    def queue(self, n: int) -> None:
        self.meter.set_queued(MODEL, n)


@pytest.fixture
def load() -> Load:
    return Load()


@pytest.fixture
def stub(load: Load) -> Iterator[Any]:
    server, port = serve_keda(load.meter, "127.0.0.1", 0, poll_period_s=POLL_S)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield pb_grpc.ExternalScalerStub(channel)
    finally:
        channel.close()
        server.stop(0.5).wait(2.0)


def ref(**metadata: str) -> Any:
    base = {"scalerAddress": "throttllem-triton.llm:9090", KEY_MODEL: MODEL, KEY_CAPACITY: "4"}
    base.update(metadata)
    return pb.ScaledObjectRef(name="throttllem-triton", namespace="llm", scalerMetadata=base)


def without(key: str) -> Any:
    r = ref()
    del r.scalerMetadata[key]
    return r


def metrics(stub: Any, r: Any) -> Any:
    request = pb.GetMetricsRequest(scaledObjectRef=r, metricName=metric_name(MODEL))
    (value,) = stub.GetMetrics(request, timeout=TIMEOUT_S).metricValues
    return value


def test_metric_spec_is_one_replicas_worth(stub: Any) -> None:
    (spec,) = stub.GetMetricSpec(ref(), timeout=TIMEOUT_S).metricSpecs
    assert spec.metricName == "throttllem-tensorrt_llm-demand"
    assert spec.targetSize == 1
    assert spec.targetSizeFloat == 1.0


def test_metric_name_keeps_to_keda_safe_characters() -> None:
    assert metric_name("org/llama-3.1:8b (fp8)%") == "throttllem-org-llama-3-1-8b--fp8---demand"


def test_no_load_means_no_demand_and_inactive(stub: Any) -> None:
    value = metrics(stub, ref())
    assert value.metricName == metric_name(MODEL)
    assert (value.metricValue, value.metricValueFloat) == (0, 0.0)
    assert stub.IsActive(ref(), timeout=TIMEOUT_S).result is False


def test_demand_follows_the_load(stub: Any, load: Load) -> None:
    usable = 4.0 * (1 - DEFAULT_MARGIN)  # 3.2 rps per replica
    for rps in (1.0, 3.2, 5.0, 12.8, 20.0, 2.0, 0.0):
        load.rate(rps)
        value = metrics(stub, ref())
        assert value.metricValueFloat == pytest.approx(rps / usable)
        assert value.metricValue == math.ceil(round(rps / usable, 9))
        assert stub.IsActive(ref(), timeout=TIMEOUT_S).result is (rps > 0)
    load.rate(6.4)
    assert (metrics(stub, ref()).metricValue, metrics(stub, ref()).metricValueFloat) == (2, 2.0)


def test_margin_and_queue_terms(stub: Any, load: Load) -> None:
    load.rate(3.0)
    load.queue(20)
    r = ref(**{KEY_CAPACITY: "2", KEY_MARGIN: "0.5", KEY_QUEUE_DRAIN: "10"})
    value = metrics(stub, r)
    assert value.metricValueFloat == pytest.approx((3.0 + 20 / 10.0) / (2 * 0.5))  # 5 replicas
    assert value.metricValue == 5
    assert value.metricValueFloat == pytest.approx(
        replica_demand(3.0, 20, parse_metadata(dict(r.scalerMetadata)))
    )


def test_a_queue_alone_makes_the_target_active(stub: Any, load: Load) -> None:
    load.queue(3)
    assert stub.IsActive(ref(), timeout=TIMEOUT_S).result is True
    value = metrics(stub, ref())
    assert value.metricValue == 1
    assert value.metricValueFloat == pytest.approx(3 / 30.0 / 3.2)
    load.queue(0)
    assert stub.IsActive(ref(), timeout=TIMEOUT_S).result is False


def test_activation_threshold(stub: Any, load: Load) -> None:
    load.rate(0.5)
    assert stub.IsActive(ref(**{KEY_ACTIVATION: "1"}), timeout=TIMEOUT_S).result is False
    assert stub.IsActive(ref(), timeout=TIMEOUT_S).result is True
    load.rate(1.5)
    assert stub.IsActive(ref(**{KEY_ACTIVATION: "1"}), timeout=TIMEOUT_S).result is True


def test_stream_is_active_sends_at_once_then_on_change(stub: Any, load: Load) -> None:
    call = stub.StreamIsActive(ref(), timeout=30.0)
    try:
        assert next(call).result is False  # the current state, at once
        load.rate(2.0)
        assert next(call).result is True
        load.rate(0.0)
        load.queue(1)  # still active: nothing sent
        load.queue(0)
        assert next(call).result is False
    finally:
        call.cancel()
    with pytest.raises(grpc.RpcError) as e:
        next(call)
    assert e.value.code() == grpc.StatusCode.CANCELLED


def test_cancelled_streams_free_their_server_threads(load: Load) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    scaler = add_keda_scaler(server, load.meter, poll_period_s=POLL_S)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        stub = pb_grpc.ExternalScalerStub(channel)
        for _ in range(3):  # more rounds than workers: a leaked stream would block the next
            calls = [stub.StreamIsActive(ref(), timeout=30.0) for _ in range(2)]
            for call in calls:
                assert next(call).result is False
            assert scaler.active_streams() == 2
            for call in calls:
                call.cancel()
            _wait_for(lambda: scaler.active_streams() == 0)
        assert stub.IsActive(ref(), timeout=TIMEOUT_S).result is False
        call = stub.StreamIsActive(ref(), timeout=30.0)
        assert next(call).result is False
        scaler.stop()  # the server's side ends the stream: the client sees a clean end
        assert list(call) == []
        assert call.code() == grpc.StatusCode.OK
    finally:
        channel.close()
        server.stop(0.5).wait(2.0)


def test_server_stop_ends_open_streams(load: Load) -> None:
    server, port = serve_keda(load.meter, poll_period_s=POLL_S)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        call = pb_grpc.ExternalScalerStub(channel).StreamIsActive(ref(), timeout=30.0)
        assert next(call).result is False
        assert server.stop(0.2).wait(3.0)
        with pytest.raises(grpc.RpcError):
            next(call)
    finally:
        channel.close()


@pytest.mark.parametrize(
    ("r", "code", "field"),
    [
        (without(KEY_MODEL), grpc.StatusCode.INVALID_ARGUMENT, KEY_MODEL),
        (ref(**{KEY_MODEL: "  "}), grpc.StatusCode.INVALID_ARGUMENT, KEY_MODEL),
        (ref(**{KEY_MODEL: "gpt-9"}), grpc.StatusCode.NOT_FOUND, "gpt-9"),
        (without(KEY_CAPACITY), grpc.StatusCode.INVALID_ARGUMENT, KEY_CAPACITY),
        (ref(**{KEY_CAPACITY: "fast"}), grpc.StatusCode.INVALID_ARGUMENT, KEY_CAPACITY),
        (ref(**{KEY_CAPACITY: "-2"}), grpc.StatusCode.INVALID_ARGUMENT, KEY_CAPACITY),
        (ref(**{KEY_CAPACITY: "0"}), grpc.StatusCode.INVALID_ARGUMENT, KEY_CAPACITY),
        (ref(**{KEY_CAPACITY: "inf"}), grpc.StatusCode.INVALID_ARGUMENT, KEY_CAPACITY),
        (ref(**{KEY_CAPACITY: "nan"}), grpc.StatusCode.INVALID_ARGUMENT, KEY_CAPACITY),
        (ref(**{KEY_MARGIN: "1"}), grpc.StatusCode.INVALID_ARGUMENT, KEY_MARGIN),
        (ref(**{KEY_MARGIN: "-0.1"}), grpc.StatusCode.INVALID_ARGUMENT, KEY_MARGIN),
        (ref(**{KEY_MARGIN: "20%"}), grpc.StatusCode.INVALID_ARGUMENT, KEY_MARGIN),
        (ref(**{KEY_ACTIVATION: "-1"}), grpc.StatusCode.INVALID_ARGUMENT, KEY_ACTIVATION),
        (ref(**{KEY_QUEUE_DRAIN: "0"}), grpc.StatusCode.INVALID_ARGUMENT, KEY_QUEUE_DRAIN),
        (ref(margn="0.3"), grpc.StatusCode.INVALID_ARGUMENT, "margn"),
    ],
)
def test_bad_metadata_gets_a_clear_error_and_the_server_goes_on(
    stub: Any, load: Load, r: Any, code: Any, field: str
) -> None:
    load.rate(1.6)
    calls = [
        lambda: stub.GetMetricSpec(r, timeout=TIMEOUT_S),
        lambda: stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=r), timeout=TIMEOUT_S),
        lambda: stub.IsActive(r, timeout=TIMEOUT_S),
        lambda: next(stub.StreamIsActive(r, timeout=TIMEOUT_S)),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == code
        assert field in e.value.details()
    assert metrics(stub, ref()).metricValueFloat == pytest.approx(0.5)  # still serving


def test_unknown_model_error_lists_the_served_models(stub: Any) -> None:
    with pytest.raises(grpc.RpcError) as e:
        stub.IsActive(ref(**{KEY_MODEL: "gpt-9"}), timeout=TIMEOUT_S)
    assert e.value.details() == (
        f"scalerMetadata: model 'gpt-9' is not served by this controller (served: {MODEL})"
    )


def test_get_metrics_for_another_metric_or_without_ref(stub: Any) -> None:
    request = pb.GetMetricsRequest(scaledObjectRef=ref(), metricName="s0-other")
    with pytest.raises(grpc.RpcError) as e:
        stub.GetMetrics(request, timeout=TIMEOUT_S)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert "s0-other" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        stub.GetMetrics(pb.GetMetricsRequest(metricName=metric_name(MODEL)), timeout=TIMEOUT_S)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "scaledObjectRef" in e.value.details()


def test_stream_metric_spec_is_unimplemented_so_keda_falls_back(stub: Any) -> None:
    with pytest.raises(grpc.RpcError) as e:
        next(stub.StreamMetricSpec(ref(), timeout=TIMEOUT_S))
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_keda_keys_are_accepted_and_defaults_apply() -> None:
    spec = parse_metadata(
        {"scalerAddress": "x:1", "enableTLS": "false", KEY_MODEL: " m ", KEY_CAPACITY: "2.5"}
    )
    assert (spec.model, spec.replica_capacity_rps, spec.margin) == ("m", 2.5, DEFAULT_MARGIN)
    assert (spec.activation_rps, spec.queue_drain_s) == (0.0, 30.0)
    assert spec.usable_rps == pytest.approx(2.0)


def test_a_port_in_use_is_refused(load: Load) -> None:
    server, port = serve_keda(load.meter)
    try:
        with pytest.raises(OSError, match=str(port)):
            serve_keda(load.meter, "127.0.0.1", port)
    finally:
        server.stop(0.5).wait(2.0)


def _wait_for(condition: Any, timeout_s: float = TIMEOUT_S) -> None:
    done = threading.Event()
    for _ in range(int(timeout_s / 0.01)):
        if condition():
            return
        done.wait(0.01)
    raise AssertionError("condition not met in time")


KEDA_FIELDS = {  # KEDA's externalscaler.proto: message -> field -> number (the wire format)
    "ScaledObjectRef": {"name": 1, "namespace": 2, "scalerMetadata": 3},
    "IsActiveResponse": {"result": 1},
    "GetMetricSpecResponse": {"metricSpecs": 1},
    "MetricSpec": {"metricName": 1, "targetSize": 2, "targetSizeFloat": 3},
    "GetMetricsRequest": {"scaledObjectRef": 1, "metricName": 2},
    "GetMetricsResponse": {"metricValues": 1},
    "MetricValue": {"metricName": 1, "metricValue": 2, "metricValueFloat": 3},
}


def test_the_contract_is_kedas_on_the_wire() -> None:
    file = pb.DESCRIPTOR
    assert file.package == "externalscaler"
    for message, fields in KEDA_FIELDS.items():
        descriptor = file.message_types_by_name[message]
        assert {f.name: f.number for f in descriptor.fields} == fields, message
    assert file.message_types_by_name["MetricSpec"].fields_by_name["targetSize"].type == (
        file.message_types_by_name["MetricSpec"].fields_by_name["targetSize"].TYPE_INT64
    )
    service = file.services_by_name["ExternalScaler"]
    streams = {m.name: m.server_streaming for m in service.methods}
    assert streams == {
        "IsActive": False,
        "StreamIsActive": True,
        "GetMetricSpec": False,
        "GetMetrics": False,
        "StreamMetricSpec": True,
    }


def test_the_method_paths_a_go_client_calls(load: Load) -> None:
    server, port = serve_keda(load.meter)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        call = channel.unary_unary(
            "/externalscaler.ExternalScaler/GetMetricSpec",
            request_serializer=pb.ScaledObjectRef.SerializeToString,
            response_deserializer=pb.GetMetricSpecResponse.FromString,
        )
        (spec,) = call(ref(), timeout=TIMEOUT_S).metricSpecs
        assert (spec.metricName, spec.targetSize) == (metric_name(MODEL), 1)
    finally:
        channel.close()
        server.stop(0.5).wait(2.0)
