"""The energy the same iterations would have cost at maximum clock, against hand-computed
numbers: a model whose IPS and power depend on the clock (and IPS on prompt tokens) only."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from throttllem.controller.ips_table import IpsTable
from throttllem.controller.max_clock_estimate import MaxClockEnergyEstimate
from throttllem.controller.perf_model import FEATURES

COL = {name: i for i, name in enumerate(FEATURES)}
IDLE_W = 50.0


class HandModel:
    """At 1000 MHz: 100 IPS (10 ms) decoding, 20 ms with 512 prompt tokens; 300 W per GPU, the
    engine's two GPUs 600 W (a power model predicts the whole engine's power)."""

    def predict_ips(self, x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        ips = x[:, COL["sm_clock_mhz"]] / 10.0 / (1.0 + x[:, COL["ctx_tokens"]] / 512.0)
        return np.asarray(ips, dtype=np.float64)

    def has_power(self) -> bool:
        return True

    def predict_power_w(self, x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        return np.asarray(2 * (100.0 + 0.2 * x[:, COL["sm_clock_mhz"]]), dtype=np.float64)


class NoPowerModel:
    def predict_ips(self, x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        return np.asarray(x[:, COL["sm_clock_mhz"]] / 10.0, dtype=np.float64)


def table(model: object = None) -> IpsTable:
    return IpsTable(
        model or HandModel(),  # type: ignore[arg-type]
        [500, 1000],
        tp=2,
        max_batch=8,
        kv_capacity_blocks=100,
        kv_points=8,
        idle_power_w=IDLE_W,
    )


def test_energy_at_max_clock_by_hand() -> None:
    # At 1000 MHz: decoding (600 - 2 x 50) W x 0.01 s = 5 J for the engine; with 512 prompt
    # tokens 500 W x 0.02 s = 10 J.
    est = MaxClockEnergyEstimate(table(), gpus=2, start_s=100.0)
    assert est.energy_at_max_j(100.0) == 0.0
    assert est.saving_ratio(0.0, 100.0) is None  # nothing to compare with yet
    for i in range(10):
        est.add_iteration(batch=1 + i % 8, kv_blocks=10 * i)
    est.add_iteration(batch=3, kv_blocks=20, ctx_tokens=512)
    est.add_iteration(batch=4, kv_blocks=20, ctx_tokens=512)
    assert est.iterations == 12
    # idle 50 W x 2 GPUs x 10 s = 1000 J; busy 10 x 5 + 2 x 10 = 70 J
    assert est.energy_at_max_j(110.0) == pytest.approx(1070.0)
    assert est.saving_ratio(856.0, 110.0) == pytest.approx(0.2)
    assert est.saving_ratio(1070.0, 110.0) == pytest.approx(0.0)
    assert est.saving_ratio(1284.0, 110.0) == pytest.approx(-0.2)  # worse than max clock


def test_ratio_is_clamped_and_empty_iterations_count_nothing() -> None:
    est = MaxClockEnergyEstimate(table(), gpus=1, start_s=0.0)
    est.add_iteration(batch=0, kv_blocks=0)
    assert est.iterations == 0
    assert est.energy_at_max_j(2.0) == pytest.approx(100.0)  # idle only
    assert est.saving_ratio(1000.0, 2.0) == -1.0
    assert est.saving_ratio(-5.0, 2.0) == 1.0
    assert est.energy_at_max_j(-1.0) == 0.0  # a clock before the start is no span


def test_needs_a_power_model() -> None:
    with pytest.raises(ValueError, match="power"):
        MaxClockEnergyEstimate(table(NoPowerModel()), gpus=1, start_s=0.0)
    with pytest.raises(ValueError, match="gpus"):
        MaxClockEnergyEstimate(table(), gpus=0, start_s=0.0)
