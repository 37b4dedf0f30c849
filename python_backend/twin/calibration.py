"""`throttllem twin calibrate`: the twin against every published measurement that matches a preset.

Two things are kept apart (issue 2, "Fidelity targets"):
- GPU time and power come from the physics with one set of constants per board (presets), never
  fitted per dataset;
- the runtime overhead of the engine that took the measurements (a 2023 vLLM for Splitwise, vLLM
  with CUDA graphs for ML.ENERGY) is an `EngineProfile` fitted per dataset here, by least squares
  on relative error, two numbers at most. Datasets are per source and per host (DGX-A100 and
  DGX-H100 have different CPUs, so their runtimes cost differently).

Everything returns records; printing them is the CLI's job.
"""

from __future__ import annotations

import math
from pathlib import Path

from .calibration_common import (
    IDLE_MAX_ERROR,
    MLENERGY_ITL_MAPE,
    MLENERGY_POWER_MAPE,
    SPLITWISE_DECODE_MAPE,
    SPLITWISE_PREFILL_MAPE,
    VIDUR_DENSE_MAPE,
    CalibrationReport,
    CalibrationRow,
    FittedProfile,
    TargetSummary,
    fit_overhead,
    mape,
)
from .calibration_sources import (
    MLENERGY_PROMPT_TOKENS,
    idle_rows,
    mlenergy_rows,
    splitwise_power_rows,
    splitwise_rows,
    vidur_rows,
)
from .hardware import Catalog, default_catalog

__all__ = [
    "CalibrationReport",
    "CalibrationRow",
    "FittedProfile",
    "TargetSummary",
    "fit_overhead",
    "mape",
    "run_calibration",
]


# ---- report -----------------------------------------------------------------------------------


def _summary(
    name: str, rows: list[CalibrationRow], threshold: float, note: str, *, max_error: bool = False
) -> TargetSummary:
    if not rows:
        return TargetSummary(name, "MAPE %", math.nan, threshold, False, "no data: " + note)
    if max_error:
        value = max(abs(r.error_pct) for r in rows)
        return TargetSummary(name, "max |error| %", value, threshold, value <= threshold, note)
    value = mape(rows)
    return TargetSummary(name, "MAPE %", value, threshold, value <= threshold, note)


def run_calibration(data_dir: Path, catalog: Catalog | None = None) -> CalibrationReport:
    """Compare the twin with every published measurement in `data_dir` that matches a preset."""
    catalog = catalog or default_catalog()
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"calibration data directory not found: {data_dir}")
    report = CalibrationReport()
    report.assumptions += [
        "All points at stock clocks: the twin GPU is unlocked and its power controller "
        "lowers the clock under the board's power limit, as on the measured boards",
        "Overhead profiles: one per dataset and host (Splitwise DGX-A100, Splitwise DGX-H100, "
        "ML.ENERGY H100), least squares on relative error, fixed_ms + per_seq_ms",
        "Splitwise: decode iteration = batch requests each attending to prompt + output/2 "
        "tokens; prefill = one iteration of the whole prompt; 80GB boards -> SXM presets",
        f"ML.ENERGY: batch = avg_batch_size; mean prompt {MLENERGY_PROMPT_TOKENS} tokens "
        "(not in the file); each request attends to prompt + avg_output_len/2; chunked prefill "
        "adds batch*prompt/output context tokens per iteration; mean iteration compared with "
        "the median ITL; power after the power cap settles",
        "Vidur: dense per-layer kernel time only (no LM head, no overhead profile), at the "
        "clock the power controller settles at for a forward pass of that many tokens",
    ]
    split = data_dir / "splitwise" / "perf_model.csv"
    s_rows: list[CalibrationRow] = []
    if split.is_file():
        s_rows, profiles = splitwise_rows(split, catalog)
        report.profiles += profiles
        report.rows += s_rows
        report.rows += splitwise_power_rows(
            data_dir / "splitwise" / "power_model_constant.yaml", catalog
        )
    v_path = data_dir / "vidur" / "derived_mlp_compact.csv"
    v_rows = vidur_rows(v_path, catalog) if v_path.is_file() else []
    report.rows += v_rows
    m_path = data_dir / "mlenergy" / "llm_configurations_flat.csv"
    m_rows: list[CalibrationRow] = []
    if m_path.is_file():
        m_rows, profiles = mlenergy_rows(m_path, catalog)
        report.profiles += profiles
        report.rows += m_rows
    facts = data_dir / "gpu_facts.csv"
    i_rows = idle_rows(facts, catalog) if facts.is_file() else []
    report.rows += i_rows

    def pick(rows: list[CalibrationRow], target: str) -> list[CalibrationRow]:
        return [r for r in rows if r.target == target]

    report.targets = [
        _summary(
            "splitwise decode (llama-2-70b TP4/8, A100+H100)",
            pick(s_rows, "splitwise-decode"),
            SPLITWISE_DECODE_MAPE,
            "token_time over batch 1-64 and prompt sizes",
        ),
        _summary(
            "splitwise prefill (llama-2-70b TP4/8, A100+H100)",
            pick(s_rows, "splitwise-prefill"),
            SPLITWISE_PREFILL_MAPE,
            "prompt_time at batch 1 over prompt sizes",
        ),
        _summary(
            "vidur dense per layer (llama-2-7b TP1, A100)",
            pick(v_rows, "vidur-dense-a100"),
            VIDUR_DENSE_MAPE,
            "1-4096 tokens, kernel time",
        ),
        _summary(
            "vidur dense per layer (llama-2-7b TP1, H100)",
            pick(v_rows, "vidur-dense-h100"),
            VIDUR_DENSE_MAPE,
            "1-4096 tokens, kernel time",
        ),
        _summary(
            "ml.energy power (llama-3.1-8b, H100)",
            pick(m_rows, "mlenergy-power"),
            MLENERGY_POWER_MAPE,
            "mean GPU power, batch 8-256",
        ),
        _summary(
            "ml.energy ITL (llama-3.1-8b, H100)",
            pick(m_rows, "mlenergy-itl"),
            MLENERGY_ITL_MAPE,
            "median inter-token latency, batch 8-256",
        ),
        _summary(
            "idle power",
            i_rows and pick(i_rows, "idle-power"),
            IDLE_MAX_ERROR,
            "gpu_facts.csv idle power",
            max_error=True,
        ),
    ]
    return report
