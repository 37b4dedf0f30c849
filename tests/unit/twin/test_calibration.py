"""`twin calibrate`: the overhead fit, and every fidelity target against ../shared's data."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from throttllem.backend.twin.calibration import CalibrationReport, fit_overhead, run_calibration

REPO_ROOT = Path(__file__).resolve().parents[3]
DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "calibration"


def test_overhead_fit_recovers_known_profile() -> None:
    points = [(g, n, g + 2.0 + 0.25 * n) for g, n in ((5.0, 1), (8.0, 16), (20.0, 64), (3.0, 8))]
    p = fit_overhead(points, "synthetic")
    assert p.fixed_ms == pytest.approx(2.0) and p.per_seq_ms == pytest.approx(0.25)


def test_overhead_fit_never_goes_negative() -> None:
    # Published below the GPU time: the best non-negative profile is zero.
    p = fit_overhead([(10.0, 1, 8.0), (20.0, 8, 15.0)], "too-fast")
    assert p.fixed_ms == 0.0 and p.per_seq_ms >= 0.0


@pytest.fixture(scope="module")
def report() -> CalibrationReport:
    if not DATA_DIR.is_dir():
        pytest.skip(f"../shared/data/calibration not present: {DATA_DIR}")
    return run_calibration(DATA_DIR)


def test_every_fidelity_target_passes(report: CalibrationReport) -> None:
    names = [t.name for t in report.targets]
    assert len(names) == 7
    failed = [t for t in report.targets if not t.passed]
    assert not failed, "\n".join(f"{t.name}: {t.value:.1f} > {t.threshold}" for t in failed)
    assert report.passed


def test_each_target_rests_on_published_points(report: CalibrationReport) -> None:
    by_target: dict[str, int] = {}
    for row in report.rows:
        by_target[row.target] = by_target.get(row.target, 0) + 1
        assert row.published > 0 and math.isfinite(row.twin)
    assert by_target["splitwise-decode"] >= 40
    assert by_target["splitwise-prefill"] >= 20
    assert by_target["vidur-dense-a100"] >= 100 and by_target["vidur-dense-h100"] >= 100
    assert by_target["mlenergy-power"] == by_target["mlenergy-itl"] == 8
    assert by_target["idle-power"] == 3


def test_overhead_profiles_are_two_numbers_per_dataset(report: CalibrationReport) -> None:
    datasets = [p.dataset for p in report.profiles]
    assert len(datasets) == len(set(datasets)) == 3
    for p in report.profiles:
        assert p.profile.fixed_ms >= 0 and p.profile.per_seq_ms >= 0
    js = report.to_json_dict()
    assert js["passed"] is True
    assert {"fixed_ms", "per_seq_ms", "dataset", "points"} == set(js["profiles"][0])


def test_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        run_calibration(tmp_path / "nope")
