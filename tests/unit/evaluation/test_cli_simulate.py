"""`throttllem simulate`, run in-process through the CLI's main function.

The engine's capacity is really computed (find_capacity: ~10 s of virtual-time runs, once per
module) into a module-private THROTTLLEM_CACHE, so no user cache is read or written; every other
run here is a ~20-request trace at a light load (well under a second each)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from throttllem.controller.cli import main
from throttllem.controller.cli_simulate import JSON_KEYS, load_slo_file
from throttllem.controller.cli_twin import UsageError

N_REQUESTS = 24


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("throttllem_cache")


@pytest.fixture(autouse=True)
def _own_cache(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("THROTTLLEM_CACHE", str(cache))


@pytest.fixture
def trace(tmp_path: Path) -> Path:
    """24 requests about a second apart (conv mix by its name: no 'code' in it)."""
    path = tmp_path / "light.csv"
    rows = ["arrival_s,prompt_tokens,output_tokens"]
    for i in range(N_REQUESTS):
        rows.append(f"{i * 1.0 + 0.3 * (i % 3):.2f},{200 + 53 * i},{20 + (37 * i) % 180}")
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture
def slo_file(tmp_path: Path) -> Path:
    path = tmp_path / "slo.yaml"
    path.write_text("tbt_ms: 200\ne2e_ms: 30000\n")
    return path


def _run(argv: list[str]) -> int:
    """main()'s status; argparse's own errors exit through SystemExit."""
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code or 0)


def _error_line(err: str) -> str:
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1, err
    assert lines[0].startswith("throttllem simulate: error: ")
    return lines[0]


def _sim(trace: Path, slo: Path, *extra: str) -> list[str]:
    return ["simulate", "--trace", str(trace), "--slo", str(slo), *extra]


def _workload_line(err: str) -> tuple[int, float, float, float]:
    """From '20 requests over 30 s (0.66/s = 10% of capacity 6.62/s)': the count, the span,
    the rate and the capacity."""
    m = re.search(r"(\d+) requests over (\d+) s \(([\d.]+)/s = .* of capacity ([\d.]+)/s\)", err)
    assert m, err
    return int(m[1]), float(m[2]), float(m[3]), float(m[4])


def test_json_static_clock_saves_energy_against_max_on_a_light_load(
    capsys: pytest.CaptureFixture[str], trace: Path, slo_file: Path
) -> None:
    argv = _sim(trace, slo_file, "--json", "--policy", "max,static:1005", "--load", "0.1")
    assert main(argv) == 0
    out, err = capsys.readouterr()
    data = json.loads(out)
    assert list(data) == ["max", "static:1005"]
    for summary in data.values():
        assert list(summary) == list(JSON_KEYS)
        assert summary["slo_attainment"] == 1.0  # light load, loose SLO
    top, low = data["max"], data["static:1005"]
    assert 0 < low["energy_j"] < top["energy_j"]
    assert top["energy_saving_vs_max"] == 0.0
    assert low["energy_saving_vs_max"] == pytest.approx(1 - low["energy_j"] / top["energy_j"])
    # Both served every token: tokens per joule scale inversely with energy.
    assert low["tokens_per_joule"] / top["tokens_per_joule"] == pytest.approx(
        top["energy_j"] / low["energy_j"]
    )
    assert top["clock_changes"] == 0 and low["clock_changes"] >= 1
    assert low["mean_tbt_ms"] > top["mean_tbt_ms"]  # a lower clock decodes slower
    # The whole trace, rescaled to 10% of the capacity found.
    count, _, rate, capacity = _workload_line(err)
    assert count == N_REQUESTS
    assert rate == pytest.approx(0.1 * capacity, rel=0.02)


def test_the_table_is_printed_without_json(
    capsys: pytest.CaptureFixture[str], trace: Path, slo_file: Path
) -> None:
    assert main(_sim(trace, slo_file, "--policy", "static:1005", "--load", "0.1")) == 0
    out = capsys.readouterr().out
    with pytest.raises(json.JSONDecodeError):
        json.loads(out)
    rows = [line.split()[0] for line in out.splitlines()[2:-1]]
    assert rows == ["static:1005"]  # max runs as the baseline but is not shown


def test_duration_keeps_the_first_seconds_of_the_rescaled_trace(
    capsys: pytest.CaptureFixture[str], trace: Path, slo_file: Path
) -> None:
    argv = _sim(trace, slo_file, "--json", "--policy", "max", "--load", "0.1", "--duration", "20")
    assert main(argv) == 0
    out, err = capsys.readouterr()
    count, span, _, capacity = _workload_line(err)
    assert 1 <= count < N_REQUESTS and span < 20
    # The trace's arrivals are nearly even: 20 s at 0.1 x capacity hold about that many.
    assert count == pytest.approx(20 * 0.1 * capacity, abs=3)
    assert json.loads(out)["max"]["slo_attainment"] == 1.0


def test_an_unsupported_static_clock_exits_2_naming_it(
    capsys: pytest.CaptureFixture[str], trace: Path, slo_file: Path
) -> None:
    argv = _sim(trace, slo_file, "--json", "--policy", "max,static:1000", "--load", "0.1")
    assert main(argv) == 2
    assert "static:1000" in _error_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["--load", "0"], "--load"),
        (["--load", "2.5"], "--load"),
        (["--load", "abc"], "--load"),
        (["--policy", "bogus"], "--policy"),
        (["--policy", ""], "--policy"),
        (["--policy", "max,hinted:wide"], "hinted:wide"),
        (["--length-hints", "always"], "--length-hints"),
        (["--duration", "-1"], "--duration"),
        (["--duration", "0"], "--duration"),
        (["--capacity", "trace"], "--capacity trace"),
        (["--capacity", "burst"], "--capacity"),
        (["--tp", "two"], "--tp"),
        (["--tp", "3"], "--tp 3"),
        (["--trace", "synthetic:chat"], "--trace synthetic:chat"),
    ],
)
def test_bad_arguments_exit_2_with_one_line_naming_them(
    capsys: pytest.CaptureFixture[str], extra: list[str], named: str
) -> None:
    assert _run(["simulate", "--trace", "synthetic:conv", "--policy", "max", *extra]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert named in _error_line(err)
    assert "finding the capacity" not in err  # refused before any simulation


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("tbt_ms: 200\nttft: 100\n", "unknown field(s) ttft"),
        ("tbt_ms: -5\n", "tbt_ms must be a positive number"),
        ("e2e_ms: 0\n", "e2e_ms must be a positive number"),
        ("ttft_ms: fast\n", "ttft_ms must be a positive number"),
        ("tbt_ms: true\n", "tbt_ms must be a positive number"),
        ("- 200\n- 300\n", "expected a mapping"),
        ("", "expected a mapping"),
        ("tbt_ms: [200\n", "cannot read"),
    ],
)
def test_a_bad_slo_file_exits_2_naming_it(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, trace: Path, text: str, named: str
) -> None:
    slo = tmp_path / "bad_slo.yaml"
    slo.write_text(text)
    assert main(_sim(trace, slo, "--json", "--policy", "max", "--load", "0.1")) == 2
    out, err = capsys.readouterr()
    assert out == ""
    line = _error_line(err)
    assert f"--slo {slo}: " in line and named in line


def test_a_missing_slo_file_exits_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, trace: Path
) -> None:
    slo = tmp_path / "none.yaml"
    assert main(_sim(trace, slo, "--policy", "max", "--load", "0.1")) == 2
    assert f"--slo {slo}: cannot read" in _error_line(capsys.readouterr().err)


def test_slo_file_values_are_milliseconds(tmp_path: Path) -> None:
    path = tmp_path / "slo.json"
    path.write_text('{"ttft_ms": 1500, "tbt_ms": 200.5, "e2e_ms": null}')
    slo = load_slo_file(path)
    assert slo.ttft_s == pytest.approx(1.5) and slo.tbt_s == pytest.approx(0.2005)
    assert slo.e2e_s is None


def test_a_nan_slo_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "slo.yaml"
    path.write_text("tbt_ms: .nan\n")
    with pytest.raises(UsageError, match="tbt_ms must be a positive number"):
        load_slo_file(path)


@pytest.mark.parametrize(
    ("content", "named"),
    [
        ("arrival_s,prompt_tokens,output_tokens\n0.0,10,5\n1.0,ten,5\n", "bad.csv:3: malformed"),
        ("when,what\n1,2\n", "bad.csv:1: unknown trace format"),
    ],
)
def test_a_bad_trace_file_exits_2_naming_file_and_line(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    slo_file: Path,
    content: str,
    named: str,
) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(content)
    assert main(_sim(path, slo_file, "--policy", "max")) == 2
    assert named in _error_line(capsys.readouterr().err)


def test_a_missing_trace_file_exits_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, slo_file: Path
) -> None:
    path = tmp_path / "none.csv"
    assert main(_sim(path, slo_file, "--policy", "max")) == 2
    assert f"{path}: cannot read" in _error_line(capsys.readouterr().err)


def test_saved_lengths_start_the_next_simulation(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, trace: Path, slo_file: Path
) -> None:
    saved = tmp_path / "lengths" / "llama-3-8b.lengths.json"
    argv = _sim(trace, slo_file, "--policy", "max", "--load", "0.1", "--save-lengths", str(saved))
    assert main(argv) == 0
    assert f"wrote the learned output lengths to {saved}" in capsys.readouterr().err
    from throttllem.controller import length_memory

    known = length_memory.load(saved, "llama-3-8b", 8)
    assert known is not None and known.count == N_REQUESTS
    argv = _sim(trace, slo_file, "--json", "--policy", "oracle", "--load", "0.1",
                "--lengths-file", str(saved), "--jobs", "1")  # fmt: skip
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert f"starting from {N_REQUESTS} learned output lengths" in err
    assert json.loads(out)["oracle"]["slo_attainment"] == 1.0


@pytest.mark.parametrize(
    ("body", "named"),
    [
        (None, "no such file"),
        ("{", "not JSON"),
        ('{"format": "throttllem-learned-lengths", "version": 1, "llm": "llama-2-13b", '
         '"buckets": []}', "holds the lengths of 'llama-2-13b', not 'llama-3-8b'"),
    ],
)  # fmt: skip
def test_an_unusable_lengths_file_exits_2_naming_it_before_simulating(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    trace: Path,
    slo_file: Path,
    body: str | None,
    named: str,
) -> None:
    path = tmp_path / "l.json"
    if body is not None:
        path.write_text(body)
    argv = _sim(trace, slo_file, "--policy", "max", "--lengths-file", str(path))
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    line = _error_line(err)
    assert f"--lengths-file {path}: {named}" in line
    assert "finding the capacity" not in err


@pytest.mark.parametrize(
    ("extra", "expected"), [([], "cap"), (["--length-hints", "trust"], "trust")]
)
def test_the_use_of_length_hints_reaches_the_comparison(
    monkeypatch: pytest.MonkeyPatch, trace: Path, slo_file: Path, extra: list[str], expected: str
) -> None:
    from throttllem.controller.evaluation import experiment

    seen: list[str] = []
    real = experiment.compare

    def spy(*args: object, **kwargs: object) -> experiment.Comparison:
        seen.append(str(args[8] if len(args) > 8 else kwargs["length_hints"]))
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(experiment, "compare", spy)
    argv = _sim(trace, slo_file, "--policy", "max", "--load", "0.1", "--jobs", "1", *extra)
    assert main(argv) == 0
    assert seen == [expected]
