"""Trace readers and workload transforms of the virtual-time evaluation (workload.py)."""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np
import pytest

from throttllem.controller.evaluation.workload import (
    TraceError,
    TraceRequest,
    Workload,
    read_trace,
    synthetic,
)

PLAIN_HEADER = "arrival_s,prompt_tokens,output_tokens"
AZURE_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens"


def _write(tmp_path: Path, name: str, lines: list[str]) -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def _triples(w: Workload) -> list[tuple[float, int, int]]:
    return [(r.arrival_s, r.prompt_tokens, r.output_tokens) for r in w.requests]


def _workload(arrivals: list[float], clipped: int = 0) -> Workload:
    reqs = tuple(TraceRequest(t, 100 + i, 10 + i) for i, t in enumerate(arrivals))
    return Workload("w", reqs, clipped)


# --- readers -------------------------------------------------------------------------------


def test_plain_csv_is_read_sorted_and_relative_to_the_earliest_arrival(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "plain.csv",
        [PLAIN_HEADER, "12.5,300,40", "10.0,100,20", "11.25,200,0", "12.5,400,50"],
    )
    w = read_trace(path)
    assert w.name == "plain"
    assert w.clipped_prompts == 0
    # Sorted by arrival (ties keep file order), times from the earliest row, output 0 -> 1.
    assert _triples(w) == [
        (0.0, 100, 20),
        (1.25, 200, 1),
        (2.5, 300, 40),
        (2.5, 400, 50),
    ]
    assert w.duration_s == 2.5
    assert w.rate_per_s == pytest.approx(4 / 2.5)


def test_azure_csv_keeps_seven_fractional_digits(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "azure_conv.csv",
        [
            AZURE_HEADER,
            "2023-11-16 18:15:46.6805900,1020,129",
            "2023-11-16 18:15:47.0000001,2048,7",
            "2023-11-16 18:15:45.5,5,300",  # earlier than the first data row
            "2023-11-16 18:16:45,64,8",  # no fraction
        ],
    )
    w = read_trace(path)
    assert w.name == "azure_conv"
    assert [(r.prompt_tokens, r.output_tokens) for r in w.requests] == [
        (5, 300),
        (1020, 129),
        (2048, 7),
        (64, 8),
    ]
    arrivals = [r.arrival_s for r in w.requests]
    assert arrivals == pytest.approx([0.0, 1.18059, 1.5000001, 59.5], abs=1e-6)


def test_json_lines_are_milliseconds_and_blank_lines_are_skipped(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "trace.jsonl",
        [
            '{"timestamp": 1700000002250, "input_length": 30, "output_length": 3}',
            "",
            '{"timestamp": 1700000000500, "input_length": 10, "output_length": 1, "x": 1}',
            '{"timestamp": 1700000001000, "input_length": 20, "output_length": 2}',
        ],
    )
    w = read_trace(path)
    assert w.name == "trace"
    assert _triples(w) == [(0.0, 10, 1), (0.5, 20, 2), (1.75, 30, 3)]


@pytest.mark.parametrize(
    ("lines", "bad_line"),
    [
        ([PLAIN_HEADER, "0.0,10,5", "1.0,abc,5"], 3),
        ([PLAIN_HEADER, "0.0,10,5", "1.0,10,5", "2.0,10"], 4),
        ([PLAIN_HEADER, "soon,10,5"], 2),
        ([AZURE_HEADER, "2023-11-16 18:15:46.1,10,5", "yesterday,10,5"], 3),
        ([AZURE_HEADER, "2023-11-16 18:15:46.1,10"], 2),
        ([AZURE_HEADER, "2023-11-16 18:15:46.1,10,5", "2023-11-16 18:15:47.1,ten,5"], 3),
        (["TIMESTAMP,Context,Generated", "2023-11-16 18:15:46.1,10,5"], 1),
        (['{"timestamp": 0, "input_length": 1, "output_length": 1}', '{"timestamp": 5}'], 2),
        (['{"timestamp": 0, "input_length": 1, "output_length": 1}', "", "{not json"], 3),
        (['{"timestamp": 0, "input_length": 1, "output_length": 1}', "[1, 2, 3]"], 2),
        (['{"timestamp": "late", "input_length": 1, "output_length": 1}'], 1),
    ],
    ids=[
        "plain-int",
        "plain-columns",
        "plain-time",
        "azure-time",
        "azure-columns",
        "azure-int",
        "azure-header",
        "jsonl-key",
        "jsonl-syntax",
        "jsonl-not-object",
        "jsonl-time",
    ],
)
def test_a_malformed_row_names_the_file_and_its_line(
    tmp_path: Path, lines: list[str], bad_line: int
) -> None:
    path = _write(tmp_path, "bad.txt", lines)
    with pytest.raises(TraceError) as err:
        read_trace(path)
    assert str(err.value).startswith(f"{path}:{bad_line}:")


def test_a_negative_length_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "neg.csv", [PLAIN_HEADER, "0.0,10,5", "1.0,-3,5"])
    with pytest.raises(TraceError, match="negative length") as err:
        read_trace(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("row", ["1.0,-3,5", "nan,3,5"])
def test_a_negative_length_or_bad_time_names_its_line(tmp_path: Path, row: str) -> None:
    path = _write(tmp_path, "neg.csv", [PLAIN_HEADER, "0.0,10,5", row])
    with pytest.raises(TraceError) as err:
        read_trace(path)
    assert str(err.value).startswith(f"{path}:3:")


def test_an_empty_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "empty.csv"
    path.write_text("")
    with pytest.raises(TraceError) as err:
        read_trace(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("header", [PLAIN_HEADER, AZURE_HEADER])
def test_a_header_without_rows_has_no_requests(tmp_path: Path, header: str) -> None:
    path = _write(tmp_path, "header_only.csv", [header])
    with pytest.raises(TraceError, match="no requests") as err:
        read_trace(path)
    assert str(path) in str(err.value)


def test_an_unknown_format_is_refused_naming_the_valid_ones(tmp_path: Path) -> None:
    path = _write(tmp_path, "other.csv", ["time,prompt,output", "0,1,1"])
    with pytest.raises(TraceError, match="unknown trace format") as err:
        read_trace(path)
    message = str(err.value)
    assert message.startswith(f"{path}:1:")
    assert PLAIN_HEADER in message and "JSON" in message and "Azure" in message


def test_a_missing_file_is_a_trace_error(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.csv"
    with pytest.raises(TraceError, match="cannot read") as err:
        read_trace(path)
    assert str(path) in str(err.value)


# --- window, scaled_to_rate, clipped -------------------------------------------------------


def test_window_keeps_a_half_open_interval_shifted_to_its_start() -> None:
    w = _workload([0.0, 1.0, 2.0, 3.0, 4.0, 5.0], clipped=3)
    cut = w.window(2.0, 3.0)
    assert [r.arrival_s for r in cut.requests] == [0.0, 1.0, 2.0]  # 2, 3, 4; not 5
    assert [r.prompt_tokens for r in cut.requests] == [102, 103, 104]
    assert cut.clipped_prompts == 3 and cut.name == "w"
    assert w.window(10.0, 5.0).requests == ()


def test_scaled_to_rate_reaches_the_rate_and_keeps_order_and_shape() -> None:
    w = _workload([0.0, 0.5, 0.6, 3.0, 10.0], clipped=1)
    fast = w.scaled_to_rate(2.0)
    assert fast.rate_per_s == pytest.approx(2.0)
    assert fast.duration_s == pytest.approx(2.5)
    # Same requests, same order, every gap scaled by the same factor.
    assert [(r.prompt_tokens, r.output_tokens) for r in fast.requests] == [
        (r.prompt_tokens, r.output_tokens) for r in w.requests
    ]
    gaps = np.diff([r.arrival_s for r in fast.requests])
    assert gaps == pytest.approx(np.diff([r.arrival_s for r in w.requests]) * 0.25)
    assert fast.clipped_prompts == 1
    assert w.scaled_to_rate(0.1).rate_per_s == pytest.approx(0.1)


@pytest.mark.parametrize("rate", [0.0, -1.0])
def test_scaled_to_rate_refuses_a_non_positive_rate(rate: float) -> None:
    with pytest.raises(ValueError, match="rate must be positive"):
        _workload([0.0, 1.0]).scaled_to_rate(rate)


def test_scaling_a_workload_without_a_span_leaves_it_alone() -> None:
    single = _workload([0.0])
    assert single.scaled_to_rate(3.0) == single
    empty = Workload("e", ())
    assert empty.scaled_to_rate(3.0) == empty


def test_clipped_fits_every_request_to_the_context_and_counts_cut_prompts() -> None:
    w = Workload(
        "w",
        (
            TraceRequest(0.0, 900, 700),  # output capped at max_context // 2, prompt cut
            TraceRequest(1.0, 100, 50),  # fits as it is
            TraceRequest(2.0, 0, 0),  # empty prompt and output raised to 1
            TraceRequest(3.0, 600, 400),  # fits exactly: 1000
            TraceRequest(4.0, 1500, 10),  # prompt alone too long
        ),
        clipped_prompts=2,
    )
    c = w.clipped(1000)
    assert _triples(c) == [
        (0.0, 500, 500),
        (1.0, 100, 50),
        (2.0, 1, 1),
        (3.0, 600, 400),
        (4.0, 990, 10),
    ]
    assert all(r.prompt_tokens + r.output_tokens <= 1000 for r in c.requests)
    assert c.clipped_prompts == 2 + 2


def test_clipped_caps_outputs_at_what_clients_ask_for() -> None:
    w = Workload("w", (TraceRequest(0.0, 10, 5000), TraceRequest(1.0, 10, 3)))
    c = w.clipped(100_000, min_output=4, max_output=2048)
    assert [r.output_tokens for r in c.requests] == [2048, 4]
    assert c.clipped_prompts == 0


# --- synthetic -----------------------------------------------------------------------------


def test_synthetic_is_reproducible_by_seed() -> None:
    a = synthetic("conv", 2.0, 120.0, seed=7)
    assert a == synthetic("conv", 2.0, 120.0, seed=7)
    b = synthetic("conv", 2.0, 120.0, seed=8)
    assert [r.arrival_s for r in a.requests] != [r.arrival_s for r in b.requests]
    assert a.name == "synthetic:conv"


@pytest.mark.parametrize(("kind", "steady"), [("conv", False), ("code", True)])
def test_poisson_arrivals_reach_the_asked_rate_over_a_long_run(kind: str, steady: bool) -> None:
    rate, duration = 2.0, 3000.0
    w = synthetic(kind, rate, duration, seed=3, steady=steady)
    arrivals = np.array([r.arrival_s for r in w.requests])
    assert np.all(np.diff(arrivals) >= 0)
    assert arrivals[0] >= 0 and arrivals[-1] < duration
    # ~6000 Poisson arrivals: the count's standard deviation is ~1.3%.
    assert len(arrivals) / duration == pytest.approx(rate, rel=0.05)
    gaps = np.diff(arrivals)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.1)  # exponential gaps


def test_code_arrivals_are_bursty() -> None:
    bursty = np.diff([r.arrival_s for r in synthetic("code", 2.0, 3000.0, seed=1).requests])
    assert bursty.std() / bursty.mean() > 4.0


def test_conv_and_code_have_different_length_mixes() -> None:
    conv = synthetic("conv", 5.0, 600.0, seed=2).requests
    code = synthetic("code", 5.0, 600.0, seed=2, steady=True).requests
    assert len(conv) > 2000 and len(code) > 2000
    # Medians of the Azure fits: conv prompts 1020 / outputs 129, code 1469 / 13.
    assert statistics.median(r.prompt_tokens for r in conv) == pytest.approx(1020, rel=0.1)
    assert statistics.median(r.output_tokens for r in conv) == pytest.approx(129, rel=0.1)
    assert statistics.median(r.prompt_tokens for r in code) == pytest.approx(1469, rel=0.1)
    assert statistics.median(r.output_tokens for r in code) == pytest.approx(13, rel=0.15)
    assert min(r.prompt_tokens for r in conv + code) >= 1
    assert min(r.output_tokens for r in conv + code) >= 1


def test_an_unknown_synthetic_kind_is_refused_naming_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="unknown synthetic workload 'chat'") as err:
        synthetic("chat", 1.0, 10.0)
    assert "conv" in str(err.value) and "code" in str(err.value)


def test_a_longer_conv_workload_starts_with_the_shorter_ones_arrivals() -> None:
    for seed in range(10):
        short = [r.arrival_s for r in synthetic("conv", 1.0, 600.0, seed=seed).requests]
        long = synthetic("conv", 1.0, 1200.0, seed=seed).requests
        # Equal up to float rounding: the longer run sums its gaps in one piece.
        assert short == pytest.approx([r.arrival_s for r in long if r.arrival_s < 600.0])


def test_a_longer_code_workload_starts_with_the_shorter_ones_arrivals() -> None:
    for seed in range(10):
        short = [r.arrival_s for r in synthetic("code", 1.0, 600.0, seed=seed).requests]
        long = synthetic("code", 1.0, 1200.0, seed=seed).requests
        # Equal up to float rounding: the longer run sums its gaps in one piece.
        assert short == pytest.approx([r.arrival_s for r in long if r.arrival_s < 600.0])
