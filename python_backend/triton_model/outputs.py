"""Engine responses -> the output tensors of tensorrtllm_backend's `tensorrt_llm` model.

`output_ids` INT32 [1, beams, L] padded with -1, `sequence_length` INT32 [1, beams]; with a
batched Triton request, `batch_index` INT32 [1, 1] tells the row (decoupled), or the rows are
stacked into one [B, ...] response (non-decoupled). With `return_perf_metrics`, the reference's
perf outputs (`arrival_time_ns`, `first_scheduled_time_ns`, `first_token_time_ns`,
`last_token_time_ns`: the engine's own clock; `kv_cache_alloc_new_blocks`,
`kv_cache_reused_blocks`, `kv_cache_alloc_total_blocks`) plus throttllem's `emit_time_ns` (also
alone, with the request parameter `return_emit_time`): a wall-clock (Unix ns) lower bound on when
the engine made the response available, which benchmarks compare with the client's receive time.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..engines.base import EngineResponse

Outputs = dict[str, "np.ndarray[Any, Any]"]


def token_outputs(beams: list[list[int]]) -> Outputs:
    beams = beams or [[]]
    longest = max(len(b) for b in beams)
    ids = np.full((1, len(beams), longest), -1, dtype=np.int32)
    for i, beam in enumerate(beams):
        ids[0, i, : len(beam)] = beam
    lengths = np.array([[len(b) for b in beams]], dtype=np.int32)
    return {"output_ids": ids, "sequence_length": lengths}


def response_outputs(
    response: EngineResponse,
    *,
    batch_index: int = 0,
    batch_size: int = 1,
    return_perf_metrics: bool = False,
    emit_time_ns: int | None = None,
) -> Outputs:
    out = token_outputs(response.output_token_ids)
    if response.cum_log_probs is not None:
        out["cum_log_probs"] = np.array([response.cum_log_probs], dtype=np.float32)
    if batch_size > 1:
        out["batch_index"] = np.array([[batch_index]], dtype=np.int32)
    if return_perf_metrics:
        perf = response.perf
        if perf is not None:
            for name, value in (
                ("arrival_time_ns", perf.arrival_time_ns),
                ("first_scheduled_time_ns", perf.first_scheduled_time_ns),
                ("first_token_time_ns", perf.first_token_time_ns),
                ("last_token_time_ns", perf.last_token_time_ns),
            ):
                out[name] = np.array([[value]], dtype=np.int64)
            for name, count in (
                ("kv_cache_alloc_new_blocks", perf.kv_new_allocated_blocks),
                ("kv_cache_reused_blocks", perf.kv_reused_blocks),
                ("kv_cache_alloc_total_blocks", perf.kv_total_allocated_blocks),
            ):
                out[name] = np.array([[count]], dtype=np.int32)
    if emit_time_ns is not None:
        out["emit_time_ns"] = np.array([[emit_time_ns]], dtype=np.int64)
    return out


def stack_rows(rows: list[Outputs]) -> Outputs:
    """The per-row outputs of a batched non-decoupled request as one [B, ...] response (ids
    padded with -1 to the longest row; batch_index dropped: the position is the row)."""
    if len(rows) == 1:
        return rows[0]
    beams = max(r["output_ids"].shape[1] for r in rows)
    longest = max(r["output_ids"].shape[2] for r in rows)
    ids = np.full((len(rows), beams, longest), -1, dtype=np.int32)
    lengths = np.zeros((len(rows), beams), dtype=np.int32)
    for i, r in enumerate(rows):
        o = r["output_ids"][0]
        ids[i, : o.shape[0], : o.shape[1]] = o
        lengths[i, : o.shape[0]] = r["sequence_length"][0]
    out: Outputs = {"output_ids": ids, "sequence_length": lengths}
    shared = set.intersection(*(set(r) for r in rows)) - {"output_ids", "sequence_length"}
    for name in sorted(shared - {"batch_index", "cum_log_probs"}):
        out[name] = np.concatenate([r[name] for r in rows], axis=0)
    return out
