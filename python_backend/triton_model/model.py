"""The Triton Python-backend model: a drop-in replacement for tensorrtllm_backend's
`tensorrt_llm` model that also serves per-instance telemetry.

Imported inside Triton's stub process (model_repository/tensorrt_llm/1/model.py delegates here),
where `triton_python_backend_utils` exists. Parameters (config.pbtxt, strings; empty or `${...}`
means unset), beyond the reference model's executor parameters (engines/trtllm.py) and the
twin's (engines/twin.py):

    engine                     "twin" | "tensorrtllm" (unset: tensorrtllm when gpt_model_path
                               is set)
    exclude_input_in_output    default of the per-request input
    max_output_len             cap on request_output_len (0/unset: engine limits only)
    cancellation_check_period_ms   (default 100)   stats_check_period_ms (default 25)
    response_send_threads      threads sending responses (default 4; see serving.py)
    slo_ttft_ms / slo_tbt_ms / slo_e2e_ms   deployment default SLOs (reported to the controller)
    telemetry_enabled          default true
    telemetry_host             default 127.0.0.1
    telemetry_port             0 (default): a free port; B > 0: B + instance ordinal
    telemetry_registry_dir     default $TMPDIR/throttllem-registry (telemetry/discovery.py)
    telemetry_buffer_events    per-subscriber buffer (default 16384 events)
    gpu_metrics_period_ms      how often the GPU state metrics (gpu_metrics.py) are sampled
                               (default 1000; 0: not exported)
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import triton_python_backend_utils as pb_utils

from ..engines.base import Engine
from ..engines.gpu_state import gpu_state_source
from ..params import ParameterError, Parameters
from ..telemetry.discovery import (
    InstanceEndpoint,
    default_registry_dir,
    instance_ordinal,
    register,
    unregister,
)
from ..telemetry.hub import DEFAULT_SUBSCRIBER_BUFFER, Slo, TelemetryHub
from ..telemetry.server import InstanceIdentity, TelemetryServer, engine_info
from .convert import (
    Limits,
    RequestValidationError,
    convert_request,
    is_stop_request,
    parse_parameters,
)
from .gpu_metrics import GpuMetrics
from .guarded_sender import GuardedSender
from .metrics import TritonMetrics
from .outputs import Outputs
from .serving import ErrorKind, ServingCore

logger = logging.getLogger(__name__)

ENGINES = ("twin", "tensorrtllm")


def select_engine(params: Parameters) -> str:
    kind = params.get_str("engine")
    if kind is None:
        if "gpt_model_path" in params:
            return "tensorrtllm"
        raise ParameterError(
            "parameter 'engine': set it to 'twin', or to 'tensorrtllm' with gpt_model_path"
        )
    if kind not in ENGINES:
        raise ParameterError(f"parameter 'engine': {kind!r} is not one of {', '.join(ENGINES)}")
    return kind


def build_engine(params: Parameters, model_config: dict[str, Any]) -> Engine:
    """The selected engine; TensorRT-LLM and the twin are imported only when chosen."""
    if select_engine(params) == "twin":
        from ..engines.twin import build_twin_engine

        return build_twin_engine(params, model_config)
    from ..engines.trtllm import build_trtllm_engine

    return build_trtllm_engine(params, model_config)


def _error_code(kind: ErrorKind) -> Any:
    names = {
        ErrorKind.INVALID_ARG: "INVALID_ARG",
        ErrorKind.CANCELLED: "CANCELLED",
        ErrorKind.UNAVAILABLE: "UNAVAILABLE",
        ErrorKind.INTERNAL: "INTERNAL",
    }
    return getattr(pb_utils.TritonError, names[kind], None)


class TritonResponder:
    """A Triton response sender as a serving-core Responder (closed once, never asked after
    its final response: guarded_sender.py)."""

    __slots__ = ("_decoupled", "_sender")

    def __init__(self, request: Any, decoupled: bool) -> None:
        self._sender = GuardedSender(request.get_response_sender())
        self._decoupled = decoupled

    def send(
        self,
        outputs: Outputs | None,
        *,
        final: bool,
        error: str | None = None,
        kind: ErrorKind = ErrorKind.INTERNAL,
    ) -> None:
        flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0
        if error is not None:
            code = _error_code(kind)
            err = pb_utils.TritonError(error) if code is None else pb_utils.TritonError(error, code)
            response = pb_utils.InferenceResponse(output_tensors=[], error=err)
        elif outputs is None:
            if not final:
                return
            response = None if self._decoupled else pb_utils.InferenceResponse(output_tensors=[])
        else:
            tensors = [pb_utils.Tensor(name, array) for name, array in outputs.items()]
            response = pb_utils.InferenceResponse(output_tensors=tensors)
        self._sender.send(response, final=final, flags=flags)

    def is_cancelled(self) -> bool:
        return self._sender.is_cancelled()


def _getter(request: Any) -> Any:
    def get(name: str) -> Any:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        return None if tensor is None else tensor.as_numpy()

    return get


class LlmModel:
    """The `tensorrt_llm` model (Triton's TritonPythonModel, through the repository's model.py)."""

    def initialize(self, args: dict[str, str]) -> None:
        config: dict[str, Any] = json.loads(args["model_config"])
        params = Parameters.from_model_config(config)
        self._model_name = args.get("model_name", config.get("name", "tensorrt_llm"))
        self._instance = args.get("model_instance_name", self._model_name)
        self._decoupled = bool(pb_utils.using_decoupled_model_transaction_policy(config))
        self._exclude_input = bool(params.get_bool("exclude_input_in_output", False))
        engine = build_engine(params, config)
        facts = engine.facts()
        self._limits = Limits(
            max_input_len=facts.max_input_len,
            max_seq_len=facts.max_seq_len,
            max_output_len=params.get_int("max_output_len", 0, minimum=0) or 0,
            max_beam_width=max(1, facts.max_beam_width),
        )
        self._hub = TelemetryHub(
            subscriber_buffer=params.get_int(
                "telemetry_buffer_events", DEFAULT_SUBSCRIBER_BUFFER, minimum=1
            )
            or DEFAULT_SUBSCRIBER_BUFFER
        )
        version = args.get("model_version", "1")
        self._core = ServingCore(
            engine,
            self._hub,
            decoupled=self._decoupled,
            metrics=TritonMetrics(pb_utils, self._model_name, version),
            cancellation_period_s=(params.get_int("cancellation_check_period_ms", 100, minimum=1)
                                   or 100) / 1000.0,
            stats_period_s=(params.get_int("stats_check_period_ms", 25, minimum=1) or 25) / 1000.0,
            send_threads=params.get_int("response_send_threads", 4, minimum=1) or 4,
        )  # fmt: skip
        self._server: TelemetryServer | None = None
        self._registry_path: Path | None = None
        self._gpu_metrics: GpuMetrics | None = None
        try:
            if params.get_bool("telemetry_enabled", True):
                self._start_telemetry(params, config, engine, version)
            self._start_gpu_metrics(params, engine)
            self._core.start()
        except BaseException:
            if self._gpu_metrics is not None:
                self._gpu_metrics.close()
            engine.shutdown()
            raise

    def _start_gpu_metrics(self, params: Parameters, engine: Engine) -> None:
        period_ms = params.get_int("gpu_metrics_period_ms", 1000, minimum=0)
        source = gpu_state_source(engine) if period_ms else None
        if not period_ms or source is None:
            return
        self._gpu_metrics = GpuMetrics(pb_utils, source, self._instance, period_ms / 1000.0)
        self._gpu_metrics.start()

    def _start_telemetry(
        self, params: Parameters, config: dict[str, Any], engine: Engine, version: str
    ) -> None:
        identity = InstanceIdentity(
            model_name=self._model_name,
            model_version=version,
            instance_name=self._instance,
            decoupled=self._decoupled,
            default_slo=Slo(
                ttft_ms=params.get_float("slo_ttft_ms"),
                tbt_ms=params.get_float("slo_tbt_ms"),
                e2e_ms=params.get_float("slo_e2e_ms"),
            ),
            pid=os.getpid(),
            started_unix_ns=time.time_ns(),
        )
        base = params.get_int("telemetry_port", 0, minimum=0) or 0
        port = 0
        if base:
            groups = config.get("instance_group") or []
            port = base + instance_ordinal(self._instance, self._model_name, groups)
        control = engine.gpu_control()
        self._server = TelemetryServer(
            self._hub,
            lambda: engine_info(identity, engine.facts(), control is not None),
            gpu_control=control,
            host=params.get_str("telemetry_host", "127.0.0.1") or "127.0.0.1",
            port=port,
        )
        identity.endpoint = self._server.start()
        registry = Path(params.get_str("telemetry_registry_dir") or default_registry_dir())
        self._registry_path = register(
            registry,
            InstanceEndpoint(
                protocol="throttllem.v1",
                model_name=self._model_name,
                model_version=version,
                instance_name=self._instance,
                endpoint=identity.endpoint,
                pid=identity.pid,
                started_unix_ns=identity.started_unix_ns,
                engine_kind=engine.facts().engine_kind,
                gpu_control=control is not None,
            ),
        )
        pb_utils.Logger.log_info(
            f"throttllem: {self._instance} telemetry on {identity.endpoint} "
            f"(registry {self._registry_path})"
        )

    def execute(self, requests: list[Any]) -> None:
        arrival = time.time_ns()
        for request in requests:
            responder = TritonResponder(request, self._decoupled)
            get = _getter(request)
            user_id = request.request_id() or ""
            try:
                if is_stop_request(get):
                    self._core.stop(user_id, responder)
                    continue
                raw_params = request.parameters() if hasattr(request, "parameters") else None
                converted = convert_request(
                    get,
                    parse_parameters(raw_params),
                    decoupled=self._decoupled,
                    default_exclude_input=self._exclude_input,
                    limits=self._limits,
                )
            except RequestValidationError as e:
                responder.send(None, final=True, error=str(e), kind=ErrorKind.INVALID_ARG)
                continue
            except Exception as e:  # a bug, but the client still gets its one final response
                logger.exception("converting request %r", user_id)
                responder.send(None, final=True, error=f"internal error: {e}")
                continue
            self._core.submit(converted, responder, user_id, arrival)
        return None

    def finalize(self) -> None:
        if self._registry_path is not None:
            unregister(self._registry_path, os.getpid())
        if self._gpu_metrics is not None:
            self._gpu_metrics.close()
        try:
            self._core.shutdown()
        finally:
            if self._server is not None:
                self._server.stop(grace_s=0.5)
            self._hub.close()
