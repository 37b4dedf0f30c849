"""Instance scaling through a real Triton server (explicit model control): the router in front,
sized twin variants loaded and unloaded by the switcher while a load ramp runs; every request
gets its whole stream and exactly one final response across every switch."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
from triton_support import BASE_PARAMETERS, LLM, Stream, llm_inputs

from throttllem.backend.triton_model.routing_file import write_routing_file
from throttllem.controller.scaling.loop import ScalingLoop
from throttllem.controller.scaling.rate_meter import ArrivalRateMeter
from throttllem.controller.scaling.scaler import EngineSize, InstanceScaler, ScalerConfig
from throttllem.controller.scaling.switcher import (
    TritonSwitcher,
    live_instances,
    telemetry_in_flight,
)
from throttllem.controller.triton_launcher import RepositorySpec, running_triton

pytestmark = pytest.mark.integration

SIZES = [EngineSize("tp1", 1, 2.0), EngineSize("tp2", 2, 4.0), EngineSize("tp4", 4, 8.0)]
# Open-loop ramp, 10% -> 90% of the largest size's capacity and back: (rate/s, seconds).
RAMP = [(0.8, 3.0), (3.0, 4.0), (7.2, 5.0), (3.0, 4.0), (0.8, 4.0)]
TOKENS = 12


def variant(size: str) -> str:
    return f"{LLM}_{size}"


def test_load_ramp_moves_through_the_sizes_without_losing_a_request(tmp_path: Path) -> None:
    routing = tmp_path / "routing.json"
    registry = tmp_path / "registry"
    write_routing_file(routing, variant("tp1"))
    params = {**BASE_PARAMETERS, "telemetry_registry_dir": str(registry), "twin_speedup": "4"}
    spec = RepositorySpec(
        parameters=params,
        models=(),
        sized={variant(s.name): {"twin_tp": str(s.tp)} for s in SIZES},
        routing_file=str(routing),
    )
    extra = (
        "--model-control-mode=explicit",
        f"--load-model={LLM}",
        f"--load-model={variant('tp1')}",
    )
    with running_triton(spec, work_dir=tmp_path / "triton", extra_args=extra,
                        ready_models=(LLM, variant("tp1"))) as server:  # fmt: skip
        control = grpcclient.InferenceServerClient(server.grpc_url)
        switcher = TritonSwitcher(control, routing, telemetry_in_flight(registry),
                                  ready_timeout_s=120.0, drain_timeout_s=60.0)  # fmt: skip
        switcher.current = variant("tp1")
        meter = ArrivalRateMeter(3.0, models=[LLM])
        scaler = InstanceScaler(SIZES, ScalerConfig(period_s=1.0, margin=0.2, grace_s=2.0), "tp1")
        loop = ScalingLoop(scaler, switcher, meter, LLM, variant)
        streams = [Stream(server.grpc_url) for _ in range(4)]
        sent: list[tuple[int, str]] = []
        loop.start()
        try:
            n = 0
            for rate, seconds in RAMP:
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    rid = f"r{n}"
                    streams[n % 4].send(rid, llm_inputs(8, TOKENS, streaming=True))
                    meter.record_arrival(LLM)
                    sent.append((n % 4, rid))
                    n += 1
                    time.sleep(1.0 / rate)  # open-loop pacing of the load, not synchronisation
            outcomes = {}
            for k, stream in enumerate(streams):
                ids = [rid for s, rid in sent if s == k]
                outcomes.update(stream.collect_all(ids, timeout_s=120.0))
            # Idle load: the scaler comes back down to the smallest size.
            deadline = time.monotonic() + 60.0
            while switcher.current != variant("tp1") and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            loop.stop()
        assert len(outcomes) == len(sent) > 40
        for rid, o in outcomes.items():
            assert o.error is None, (rid, o.error)
            assert o.finals == 1, (rid, o.finals)
            assert len(o.tokens) == TOKENS, (rid, len(o.tokens))
        moves = [(d.from_size, d.to_size) for d in loop.decisions]
        # Up through the sizes as the ramp rises, then down again.
        assert [to for _, to in moves][:2] == ["tp2", "tp4"] or "tp4" in [t for _, t in moves], (
            moves
        )
        assert any(frm == "tp4" for frm, _ in moves) and switcher.current == variant("tp1"), moves
        assert all(r.unloaded for r in loop.switches)
        # Retired sizes are unloaded: only the router and the current size are ready.
        ready = {s.name for s in SIZES if control.is_model_ready(variant(s.name))}
        assert ready == {"tp1"} and control.is_model_ready(LLM)
        control.close()
        for s in streams:
            s.client.stop_stream()
            s.client.close()


def test_data_parallel_replicas_change_in_place(tmp_path: Path) -> None:
    """The load API with a config override turns one instance into two (each its own process
    and telemetry endpoint) and back, while the model keeps answering."""
    registry = tmp_path / "registry"
    params = {**BASE_PARAMETERS, "telemetry_registry_dir": str(registry), "twin_speedup": "4"}
    spec = RepositorySpec(parameters=params, models=(LLM,))
    extra = ("--model-control-mode=explicit", f"--load-model={LLM}")
    with running_triton(spec, work_dir=tmp_path / "triton", extra_args=extra) as server:
        control = grpcclient.InferenceServerClient(server.grpc_url)
        switcher = TritonSwitcher(control, tmp_path / "unused.json", lambda m: 0)
        config = control.get_model_config(LLM, as_json=True)["config"]
        live = live_instances(registry)
        assert live(LLM) == 1
        switcher.set_instances(LLM, 2, config)
        deadline = time.monotonic() + 60
        while live(LLM) != 2 and time.monotonic() < deadline:
            time.sleep(0.2)  # polling with a deadline
        assert live(LLM) == 2 and switcher.expected_instances(LLM) == 2
        stream = Stream(server.grpc_url)
        stream.send("after", llm_inputs(8, TOKENS, streaming=True))
        outcome = stream.collect("after")
        assert outcome.finals == 1 and len(outcome.tokens) == TOKENS
        switcher.set_instances(LLM, 1, config)
        deadline = time.monotonic() + 60
        while live(LLM) != 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert live(LLM) == 1
        stream.client.stop_stream()
        stream.client.close()
        control.close()
