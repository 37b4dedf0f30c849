"""What the work an instance did would have cost at maximum clock: the baseline of the energy
saving the controller exports (`throttllem_energy_saving_ratio`).

Over the span since the controller attached, at maximum clock the GPUs would have drawn their
idle power all along, plus, for every iteration the engine ran, the power above idle the model
predicts at maximum clock for that iteration's batch and KV blocks, for as long as the model
predicts the iteration takes at maximum clock:

    E_max = gpus * P_idle * span
            + sum over iterations i of (P_max(b_i, kv_i) - gpus * P_idle) * t_max_i

t_max_i being the model's duration of iteration i at maximum clock (b_i, kv_i, prompt tokens).

`P_idle` is per GPU (`IpsTable.idle_power_w`); the power model's P is the whole engine's (all
its GPUs); the table's `energy_per_iteration_j` is (P - gpus * P_idle) * t at each clock, the
last one being the maximum. An iteration that prefills prompt tokens takes longer: its time
comes from the table's prompt-token axis, at the decoding power (the power model has no prompt
axis), which makes E_max, and the saving, a little low. Iterations the controller did not see
(telemetry gaps) are missing from E_max too.

The largest bias is batching: at a lower clock requests live longer, so each iteration batches
more of them; the same requests at maximum clock would run more, smaller iterations, which a
sum over the observed iterations cannot see. Measured in virtual time (A100-40GB twin,
Llama-3-8B TP1, CatBoost model, synthetic conversation traffic, 300 s; scratch script, not a
test): on the maximum-clock run itself E_max is within 2% of the measured energy (without the
prompt-token axis it was 26% low), but against a throttllem run the estimated saving is 26% /
26% / 15.5% where the two runs measured 57% / 42% / 22.5%, at 25% / 50% / 75% of capacity.
So read this gauge as a lower bound; all the biases lean towards reporting less saving (the
models' own errors aside).

Pure: time is given, energy is measured by the caller. The saving is 1 - E / E_max, E being the
energy the GPUs measured over the same span.
"""

from __future__ import annotations

import numpy as np

from .ips_table import IpsTable


class MaxClockEnergyEstimate:
    """Energy the same iterations would have cost at maximum clock, for one instance's GPUs."""

    def __init__(self, table: IpsTable, gpus: int, start_s: float) -> None:
        if not table.has_power:
            raise ValueError("estimating energy at maximum clock needs a model that predicts power")
        if gpus < 1:
            raise ValueError(f"gpus must be at least 1, got {gpus}")
        self._table = table
        self._gpus = gpus
        self._start_s = start_s
        self._top = len(table.clocks_mhz) - 1
        self._busy_j = 0.0  # power above idle at maximum clock x time, all GPUs
        self.iterations = 0

    @property
    def start_s(self) -> float:
        return self._start_s

    def add_iteration(self, batch: int, kv_blocks: int, ctx_tokens: int = 0) -> None:
        """One iteration the engine ran with `batch` requests scheduled, `kv_blocks` KV blocks
        in use and `ctx_tokens` prompt tokens prefilled."""
        if batch <= 0:
            return
        engine_j = float(self._table.energy_per_iteration_j(batch, kv_blocks)[-1])
        if ctx_tokens > 0:
            # Same power above idle, for the longer time a prefill takes at maximum clock.
            b, kv = np.array([batch]), np.array([kv_blocks])
            decode_s = float(self._table.seconds(self._top, b, kv, np.array([0]))[0])
            prefill_s = float(self._table.seconds(self._top, b, kv, np.array([ctx_tokens]))[0])
            if decode_s > 0:
                engine_j *= prefill_s / decode_s
        self._busy_j += engine_j
        self.iterations += 1

    def energy_at_max_j(self, now_s: float) -> float:
        """E_max from the start to `now_s` (same time base as the iterations' durations)."""
        span_s = max(now_s - self._start_s, 0.0)
        return self._table.idle_power_w * self._gpus * span_s + self._busy_j

    def saving_ratio(self, measured_j: float, now_s: float) -> float | None:
        """1 - E / E_max, clamped to [-1, 1]; None while E_max is not positive (nothing to
        compare with yet)."""
        e_max = self.energy_at_max_j(now_s)
        if e_max <= 0:
            return None
        return min(1.0, max(-1.0, 1.0 - measured_j / e_max))
