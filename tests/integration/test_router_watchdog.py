"""The router when the variant instance serving a request dies (SIGKILL of its stub): the
request ends with exactly one final response, an error naming it, instead of hanging; the
router keeps serving; its outcome counters on Triton's metrics port say what happened."""

from __future__ import annotations

import os
import re
import signal
import time
import urllib.request
from pathlib import Path

import pytest
from test_prometheus_scrape import deadline_poll
from triton_support import BASE_PARAMETERS, LLM, Stream, llm_inputs

from throttllem.backend.telemetry.discovery import discover
from throttllem.backend.triton_model.routing_file import write_routing_file
from throttllem.controller.scaling.switcher import telemetry_in_flight
from throttllem.controller.shm_regions import python_backend_regions
from throttllem.controller.triton_launcher import RepositorySpec, running_triton

pytestmark = pytest.mark.integration

TP1 = f"{LLM}_tp1"


def router_counts(metrics_url: str) -> dict[str, float]:
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    out = {}
    for m in re.finditer(r"^throttllem_router_requests_total\{([^}]*)\} (\S+)$", text, re.M):
        outcome = re.search(r'outcome="([^"]+)"', m.group(1))
        assert outcome is not None
        out[outcome.group(1)] = float(m.group(2))
    return out


def test_request_on_a_killed_instance_ends_with_one_error_final(tmp_path: Path) -> None:
    routing, registry = tmp_path / "routing.json", tmp_path / "registry"
    write_routing_file(routing, TP1)
    # A slow twin, so that a long request is surely in flight when its instance dies.
    params = {**BASE_PARAMETERS, "telemetry_registry_dir": str(registry), "twin_speedup": "0.5",
              "relay_stall_s": "1.5"}  # fmt: skip
    spec = RepositorySpec(parameters=params, models=(), sized={TP1: {}}, routing_file=str(routing))
    with running_triton(spec, work_dir=tmp_path / "triton", ready_models=(LLM, TP1)) as server:
        metrics_url = f"http://{server.host}:{server.ports.metrics}/metrics"
        stream = Stream(server.grpc_url)
        try:
            stream.send("ok-1", llm_inputs(8, 3, streaming=True))
            done = stream.collect("ok-1", timeout_s=60)
            assert done.error is None and len(done.tokens) == 3 and done.finals == 1

            stream.send("doomed", llm_inputs(8, 1000, streaming=True))
            in_flight = telemetry_in_flight(registry)
            deadline_poll("the request in flight on the variant", 30, lambda: in_flight(TP1) == 1)
            (instance,) = discover(registry, TP1)
            maps = Path(f"/proc/{instance.pid}/maps").read_text()
            regions = {r for r in python_backend_regions() if f"/dev/shm/{r}" in maps}
            assert regions, "the stub maps its shared-memory region"
            os.kill(instance.pid, signal.SIGKILL)
            started = time.monotonic()
            out = stream.collect("doomed", timeout_s=60)
            took = time.monotonic() - started
            assert out.finals == 1, out.messages
            assert out.error is not None and "request 'doomed'" in out.error, out.error
            assert f"model {TP1} lost the instance" in out.error and str(instance.pid) in out.error
            assert took < 30, took

            # The router keeps serving: a request sent to the dead variant ends the same way.
            stream.send("after", llm_inputs(8, 3, streaming=True))
            after = stream.collect("after", timeout_s=60)
            assert after.finals == 1 and after.error is not None and "'after'" in after.error
            # Nothing else arrived on the stream (no second final for anyone).
            assert stream.stray == []

            counts = deadline_poll("router counters", 30, lambda: (c := router_counts(
                metrics_url)).get("error", 0) >= 2 and c)  # fmt: skip
            assert counts == {"completed": 1.0, "error": 2.0, "cancelled": 0.0}, counts
            # By now anything else would have arrived: no second final (an error is the only
            # final response of its request), nothing for anyone else.
            leftover = []
            while not stream._inbox.empty():
                leftover.append(stream._inbox.get_nowait())
            assert leftover == [], leftover
        finally:
            stream.client.stop_stream(cancel_requests=True)
            stream.client.close()
    # The killed stub's shared-memory region was unlinked when the server stopped (nobody else
    # would: it would hold its memory in /dev/shm until reboot).
    assert python_backend_regions() & regions == set()
