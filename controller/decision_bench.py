"""How long one full clock decision takes: scoreboard -> projection -> policy over a table."""

from __future__ import annotations

import gc
import time

import numpy as np

from throttllem.backend.twin.hardware import default_catalog, kv_cache_blocks

from .clock_policy import choose_clock
from .events import Arrived, FirstToken, Slo
from .ips_table import IpsTable
from .length_predictor import LengthPredictor
from .oracle_model import TwinOracleModel
from .projection import EngineLimits, engine_room, project
from .scoreboard import Scoreboard

TOKENS_PER_BLOCK = 64
# Prompts waiting to enter: the decision then projects their admission and prefills.
WAITING = 4


def build_loaded_scoreboard(
    requests: int, horizon: int, seed: int = 0, waiting: int = 0
) -> Scoreboard:
    """`requests` requests generating, whose predicted ends spread over `horizon` iterations,
    and `waiting` long prompts just arrived (their prefills are the next iterations')."""
    rng = np.random.default_rng(seed)
    # Trusted length hints pin the predictions, so the horizon is exactly what was asked for
    # (the default use, `cap`, would cut them to the prior's 90% quantile).
    board = Scoreboard(
        LengthPredictor(hints="trust"), Slo(ttft_s=2.0, tbt_s=0.2, e2e_s=600.0), TOKENS_PER_BLOCK
    )
    for i in range(requests):
        remaining = horizon if i == 0 else int(rng.integers(1, horizon + 1))
        prompt = int(rng.integers(64, 1024))
        board.on_arrived(Arrived(i, 0.0, prompt, max_tokens=horizon + 8, length_hint=remaining + 1))
        board.on_first_token(FirstToken(i, 0.1))
    for j in range(waiting):
        board.on_arrived(Arrived(requests + j, 0.11, 2000, max_tokens=64, length_hint=32))
    return board


def run_decision_bench(
    gpu_name: str, requests: int, horizon: int, repeat: int
) -> dict[str, float | int]:
    catalog = default_catalog()
    gpu, model = catalog.gpu(gpu_name), catalog.model("llama-3-8b")
    capacity = max(
        kv_cache_blocks(gpu, model, 1, TOKENS_PER_BLOCK),
        requests * (1024 + horizon) // TOKENS_PER_BLOCK + requests,
    )
    limits = EngineLimits(max(requests, 1), capacity, TOKENS_PER_BLOCK)
    table = IpsTable(
        TwinOracleModel(gpu, model, 1, TOKENS_PER_BLOCK),
        gpu.supported_clocks_mhz(),
        tp=1,
        max_batch=limits.max_batch_size,
        kv_capacity_blocks=capacity,
    )
    board = build_loaded_scoreboard(requests, horizon, waiting=WAITING)
    # As the sidecar does once an instance is set up: the long-lived set-up objects leave the
    # garbage collector's scans, so they do not stretch the decisions' tail.
    gc.collect()
    gc.freeze()
    times = []
    proj_horizon = 0
    for _ in range(repeat):
        started = time.perf_counter()
        inputs = board.decision_inputs()
        proj = project(inputs.running, inputs.queued, limits)
        # 20 ms after the first tokens: every request on schedule, none lost. As the control
        # loop decides: with the arrival forecast (and prefill_clock's default, auto).
        choose_clock(
            0.12,
            proj,
            inputs.deadlines,
            table,
            forecast=board.forecast(0.12),
            room=engine_room(limits, inputs.running, inputs.queued),
        )
        times.append(time.perf_counter() - started)
        proj_horizon = proj.horizon
    ms = np.array(times) * 1000.0
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "requests": requests,
        "horizon": proj_horizon,
        "clocks": len(table.clocks_mhz),
    }
