"""`throttllem twin ...` as a user types it: output, JSON keys, and every bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from throttllem.controller.cli import main
from throttllem.controller.cli_twin import default_calibration_dir

RUN = [
    "twin",
    "run",
    "--gpu",
    "A100-SXM4-40GB",
    "--model",
    "llama-3-8b",
    "--tp",
    "1",
    "--batch",
    "8",
    "--prompt-tokens",
    "256",
    "--output-tokens",
    "32",
]


def _run_json(capsys: pytest.CaptureFixture[str], *extra: str) -> dict[str, object]:
    assert main([*RUN, *extra, "--json"]) == 0
    out: dict[str, object] = json.loads(capsys.readouterr().out)
    return out


def test_run_json_has_the_documented_keys_and_consistent_numbers(
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = _run_json(capsys, "--clock-mhz", "1410")
    for key in ("ips", "tokens_per_s", "avg_power_w", "energy_j", "tokens_per_joule"):
        assert isinstance(out[key], float) and out[key] > 0
    lat = out["iter_latency_ms"]
    assert isinstance(lat, dict) and set(lat) >= {"mean", "p50", "p99"}
    assert lat["p50"] <= lat["p99"]
    assert out["output_tokens"] == 8 * 32
    assert out["tokens_per_joule"] == pytest.approx(256 / out["energy_j"])


def test_lower_clock_is_slower_but_uses_less_energy(capsys: pytest.CaptureFixture[str]) -> None:
    fast = _run_json(capsys, "--clock-mhz", "1410")
    slow = _run_json(capsys, "--clock-mhz", "900")
    assert slow["ips"] < fast["ips"]
    assert slow["avg_power_w"] < fast["avg_power_w"]
    assert slow["energy_j"] < fast["energy_j"]


def test_same_seed_same_numbers(capsys: pytest.CaptureFixture[str]) -> None:
    assert _run_json(capsys, "--clock-mhz", "1200") == _run_json(capsys, "--clock-mhz", "1200")


def test_human_readable_run(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*RUN, "--clock-mhz", "1410"]) == 0
    out = capsys.readouterr().out
    assert "iterations/s" in out and "tokens per joule" in out


def test_clocks_lists_every_supported_clock(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["twin", "clocks", "--gpu", "A100-SXM4-40GB"]) == 0
    out = capsys.readouterr().out
    clocks = [int(c) for c in out.splitlines()[1].split()]
    assert clocks[0] == 1410 and clocks[-1] == 210 and len(clocks) == 81


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gpu", "V100"], "unknown GPU 'V100'; valid: A100-SXM4-40GB"),
        (["--model", "gpt-9"], "unknown model 'gpt-9'; valid: llama-3-8b"),
        (
            ["--model", "llama-2-70b"],
            "--tp 1: llama-2-70b does not fit 1 x A100-SXM4-40GB; valid: 4, 8",
        ),
        (["--tp", "3"], "--tp 3: llama-3-8b does not fit"),
        (
            ["--clock-mhz", "1400"],
            "--clock-mhz 1400: not supported by A100-SXM4-40GB; "
            "valid: 210..1410 MHz in steps of 15",
        ),
        (["--batch", "0"], "--batch must be a positive whole number, got 0"),
        (["--prompt-tokens", "-5"], "--prompt-tokens must be a positive whole number, got -5"),
        (["--output-tokens", "0"], "--output-tokens must be a positive whole number, got 0"),
        (["--output-tokens", "9000"], "exceeds llama-3-8b's context of 8192 tokens"),
    ],
)
def test_bad_input_is_one_line_naming_the_value_and_exit_2(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    argv = [*RUN, "--clock-mhz", "1410"]
    for flag, value in zip(args[::2], args[1::2], strict=True):
        argv[argv.index(flag) + 1] = value
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1


def test_malformed_numbers_and_missing_flags_exit_2_with_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = [*RUN, "--clock-mhz", "1410"]
    argv[argv.index("--batch") + 1] = "many"
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["throttllem twin run: error: argument --batch: invalid int value: 'many'"]
    with pytest.raises(SystemExit) as info:
        main(["twin", "run", "--gpu", "A100-SXM4-40GB"])
    assert info.value.code == 2


def test_bad_clocks_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["twin", "clocks", "--gpu", "TPU"]) == 2
    assert "unknown GPU 'TPU'" in capsys.readouterr().err


def test_calibrate_without_data_says_where_it_looked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["twin", "calibrate", "--data", str(tmp_path / "absent")]) == 2
    assert "no calibration data at" in capsys.readouterr().err


def test_calibrate_passes_every_target_on_the_shared_data(
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = default_calibration_dir()
    if data is None:
        pytest.skip("../shared/data/calibration not present: nothing to calibrate against")
    assert main(["twin", "calibrate", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["targets"] and all(t["passed"] for t in report["targets"])
