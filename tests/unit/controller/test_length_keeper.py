"""The sidecar's periodic saves of learned lengths: when they happen, and that they are written
off the control loop, one at a time."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from throttllem.controller import length_keeper
from throttllem.controller.length_keeper import LengthKeeper
from throttllem.controller.length_predictor import LengthPredictor


def _learned() -> LengthPredictor:
    p = LengthPredictor()
    for n in range(1, 41):
        p.observe(3000, n, predicted_at_arrival=0)
    return p


def test_a_save_is_due_every_period_and_not_before(tmp_path: Path) -> None:
    keeper = LengthKeeper(tmp_path, every_s=60.0, now_s=100.0)
    predictors = {"m": [_learned()]}
    keeper.tick(159.9, ["m"], predictors.__getitem__)
    keeper.flush()
    assert not (tmp_path / "m.lengths.json").exists()
    keeper.tick(160.0, ["m"], predictors.__getitem__)
    keeper.flush()
    assert (tmp_path / "m.lengths.json").is_file()


def test_the_loop_does_not_wait_for_a_write_nor_start_a_second_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    release = threading.Event()
    writes: list[int] = []

    def slow_write(snapshots: list[object]) -> None:
        writes.append(len(snapshots))
        release.wait()

    monkeypatch.setattr(length_keeper, "_write", slow_write)
    keeper = LengthKeeper(tmp_path, every_s=1.0, now_s=0.0)
    predictors = {"m": [_learned()]}
    keeper.tick(1.0, ["m"], predictors.__getitem__)  # returns while the write is held
    keeper.tick(2.0, ["m"], predictors.__getitem__)  # due, but the last is still writing
    release.set()
    keeper.flush()
    assert writes == [1]
    keeper.tick(3.0, ["m"], predictors.__getitem__)
    keeper.flush()
    assert writes == [1, 1]


def test_without_a_folder_nothing_is_written_and_predictors_start_empty(tmp_path: Path) -> None:
    keeper = LengthKeeper(None, every_s=0.0, now_s=0.0)
    keeper.tick(1.0, ["m"], lambda llm: [_learned()])
    keeper.save(["m"], lambda llm: [_learned()])
    assert list(tmp_path.iterdir()) == []
    assert keeper.new_predictor("m", "inst", []).learned_lengths() == ((),) * 8
