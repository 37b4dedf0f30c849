"""Per-policy figures (report.py) on hand-built simulation results, checked by hand."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest

from throttllem.controller.evaluation.report import (
    PolicySummary,
    attainment_mask,
    format_table,
    summarise,
    write_requests,
)
from throttllem.controller.evaluation.simulator import SimResult
from throttllem.controller.events import Slo

NAN = math.nan


def _result(iter_gen: tuple[int, ...] = (99, 0, 1)) -> SimResult:
    """Four requests:
    0: TTFT 0.5 s, E2E 2.5 s, 5 tokens -> TBT (2.5 - 0.5) / 4 = 0.5 s
    1: TTFT 0.2 s, E2E 0.2 s, 1 token  -> no TBT (counts as 0 for the SLO)
    2: TTFT 2.0 s, E2E 4.0 s, 11 tokens -> TBT (6.0 - 4.0) / 10 = 0.2 s
    3: never served.
    Iterations: 10 ms decoding 99 requests, 500 ms decoding none, 300 ms decoding 1."""
    return SimResult(
        policy="p",
        arrival_s=np.array([0.0, 1.0, 2.0, 3.0]),
        first_token_s=np.array([0.5, 1.2, 4.0, NAN]),
        finish_s=np.array([2.5, 1.2, 6.0, NAN]),
        output_tokens=np.array([5, 1, 11, 0], dtype=np.int64),
        energy_j=100.0,
        span_s=10.0,
        clock_changes=3,
        iter_latency_s=np.array([0.01, 0.5, 0.3]),
        iter_gen=np.array(iter_gen, dtype=np.int64),
    )


@pytest.mark.parametrize(
    ("slo", "expected"),
    [
        (Slo(), [True, True, True, False]),  # only "finished"
        (Slo(tbt_s=0.3), [False, True, True, False]),
        (Slo(ttft_s=1.0), [True, True, False, False]),
        (Slo(e2e_s=3.0), [True, True, False, False]),
        (Slo(ttft_s=1.0, tbt_s=0.3, e2e_s=5.0), [False, True, False, False]),
        (Slo(tbt_s=0.5, e2e_s=4.0), [True, True, True, False]),  # bounds are inclusive
    ],
)
def test_attainment_mask_needs_every_slo_and_a_finished_request(
    slo: Slo, expected: list[bool]
) -> None:
    assert attainment_mask(_result(), slo).tolist() == expected


def test_summarise_by_hand() -> None:
    s = summarise(_result(), Slo(tbt_s=0.3), baseline_energy_j=125.0)
    assert s.energy_j == 100.0
    assert s.output_tokens == 17
    assert s.tokens_per_joule == pytest.approx(0.17)
    assert s.energy_saving_vs_max == pytest.approx(0.2)  # 1 - 100 / 125
    assert s.slo_attainment == pytest.approx(0.5)
    assert s.requests == 4 and s.clock_changes == 3 and s.span_s == 10.0
    # Latencies over the served requests only: TTFT 200, 500, 2000 ms; E2E 200, 2500, 4000 ms.
    assert s.p50_ttft_ms == pytest.approx(500.0)
    assert s.p99_ttft_ms == pytest.approx(500.0 + 0.98 * 1500.0)
    assert s.p99_e2e_ms == pytest.approx(2500.0 + 0.98 * 1500.0)
    assert s.mean_tbt_ms == pytest.approx(350.0)  # (500 + 200) / 2: one-token requests left out
    # p99 over token gaps: 99 of 100 gaps took 10 ms (the 500 ms iteration decoded nothing).
    assert s.p99_tbt_ms == pytest.approx(10.0)


def test_p99_tbt_is_weighted_by_the_requests_each_iteration_decodes() -> None:
    # 98 gaps of 10 ms and 2 of 300 ms: the 99th percentile gap is a 300 ms one.
    s = summarise(_result(iter_gen=(98, 0, 2)), Slo(), None)
    assert s.p99_tbt_ms == pytest.approx(300.0)
    s = summarise(_result(iter_gen=(0, 0, 0)), Slo(), None)
    assert math.isnan(s.p99_tbt_ms)


@pytest.mark.parametrize("baseline", [None, 0.0])
def test_without_a_baseline_there_is_no_saving(baseline: float | None) -> None:
    assert summarise(_result(), Slo(), baseline).energy_saving_vs_max is None


def test_a_result_more_costly_than_the_baseline_has_a_negative_saving() -> None:
    s = summarise(_result(), Slo(), baseline_energy_j=80.0)
    assert s.energy_saving_vs_max == pytest.approx(-0.25)


def test_an_empty_result_attains_everything_and_has_no_latencies() -> None:
    empty = SimResult(
        policy="p",
        arrival_s=np.zeros(0),
        first_token_s=np.zeros(0),
        finish_s=np.zeros(0),
        output_tokens=np.zeros(0, dtype=np.int64),
        energy_j=0.0,
        span_s=0.0,
        clock_changes=0,
        iter_latency_s=np.zeros(0),
        iter_gen=np.zeros(0, dtype=np.int64),
    )
    s = summarise(empty, Slo(tbt_s=0.1), None)
    assert s.slo_attainment == 1.0 and s.requests == 0 and s.output_tokens == 0
    assert all(
        math.isnan(v)
        for v in (s.tokens_per_joule, s.p99_ttft_ms, s.mean_tbt_ms, s.p99_tbt_ms, s.p99_e2e_ms)
    )


def test_to_json_has_every_field() -> None:
    s = summarise(_result(), Slo(), 125.0)
    data = s.to_json()
    assert set(data) == set(PolicySummary.__dataclass_fields__)
    assert data["energy_j"] == 100.0 and data["requests"] == 4


def test_format_table_has_a_row_per_policy_with_its_saving() -> None:
    table = format_table(
        {
            "max": summarise(_result(), Slo(), None),
            "static:1005": summarise(_result(), Slo(tbt_s=0.3), 125.0),
        }
    )
    lines = table.splitlines()
    assert lines[0].startswith("policy") and set(lines[1]) == {"-"}
    assert len(lines) == 2 + 2 + 1  # header, rule, two rows, footnote
    max_row, static_row = lines[2].split(), lines[3].split()
    assert max_row[:4] == ["max", "100", "0.170", "-"]
    assert static_row[:5] == ["static:1005", "100", "0.170", "+20.0%", "50.00%"]
    assert max_row[-1] == "3"  # clock changes
    assert "saving" in lines[-1]


def test_write_requests_writes_one_row_per_request(tmp_path: Path) -> None:
    path = tmp_path / "requests.csv"
    write_requests(path, _result())
    with path.open() as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["arrival_s", "first_token_s", "finish_s", "output_tokens"]
    assert len(rows) == 5
    assert [float(v) for v in rows[3][:3]] == [2.0, 4.0, 6.0] and rows[3][3] == "11"
    assert rows[4][1:] == ["nan", "nan", "0"]


def test_an_overloaded_maximum_clock_is_pointed_out() -> None:
    from dataclasses import replace

    from throttllem.controller.evaluation.report import PolicySummary, overload_note

    fine = PolicySummary(1.0, 1.0, 0.0, 0.995, 1, 1, 1, 1, 1, 0, 10, 100, 60.0)
    assert overload_note({"max": fine}) is None
    assert overload_note({"throttllem": replace(fine, slo_attainment=0.1)}) is None
    note = overload_note({"max": replace(fine, slo_attainment=0.0824)})
    assert note is not None and "8.2% of requests" in note and "Lower --load" in note
