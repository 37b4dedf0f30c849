"""Learned lengths across restarts: the file format, its checks, merging, and restoring."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from throttllem.controller import length_memory
from throttllem.controller.length_memory import LearnedLengths, LengthMemoryError
from throttllem.controller.length_predictor import MIN_SAMPLES, LengthPredictor


def _served(seed: int = 0, count: int = 400) -> LengthPredictor:
    """A predictor after `count` requests of prompt lengths from 20 to 9,000 tokens."""
    rng = np.random.default_rng(seed)
    p = LengthPredictor()
    for prompt, out in zip(
        rng.integers(20, 9000, count), rng.lognormal(3.0, 1.2, count).astype(int) + 1, strict=True
    ):
        p.observe(int(prompt), int(out), predicted_at_arrival=0)
    return p


def _save(directory: Path, llm: str, predictors: list[LengthPredictor]) -> Path | None:
    """What the sidecar's saves do (length_keeper.py): merged, written to the LLM's file."""
    known = length_memory.merged_for(llm, predictors)
    if known is None:
        return None
    path = length_memory.file_for(directory, llm)
    length_memory.save(path, known)
    return path


PROBES = [(p, g) for p in (30, 200, 700, 1500, 3000, 9000) for g in (0, 5, 40, 300)]


def _predictions(p: LengthPredictor) -> list[int]:
    return [p.predict(prompt, 4096, generated=g) for prompt, g in PROBES]


def test_a_saved_and_restored_predictor_predicts_as_the_one_saved(tmp_path: Path) -> None:
    before = _served()
    path = _save(tmp_path, "llama-3-8b", [before])
    assert path == tmp_path / "llama-3-8b.lengths.json"
    after = LengthPredictor()
    source = length_memory.seed(after, "llama-3-8b", [], tmp_path)
    assert source is not None and str(path) in source and "400 lengths" in source
    assert _predictions(after) == _predictions(before)
    assert _predictions(after) != _predictions(LengthPredictor())  # not the prior any more
    assert after.learned(3000) and not LengthPredictor().learned(3000)


def test_restore_goes_through_the_window_and_the_vectorised_path_agrees() -> None:
    p = LengthPredictor(window=64)
    taken = p.restore([list(range(1, 101))] + [[] for _ in range(p.bucket_count - 1)])
    assert taken == 100
    assert p.learned_lengths()[0] == tuple(range(37, 101))  # the last 64, oldest first
    one = p.predict(30, 4096)
    many = p.predict_many(
        np.array([30]), np.array([4096]), np.array([0]), np.array([0]), quantile=None
    )
    assert one == int(many[0]) and one >= 37


def test_restore_refuses_another_bucket_layout() -> None:
    with pytest.raises(ValueError, match="3 buckets of lengths for a predictor of 8"):
        LengthPredictor().restore([[1], [2], [3]])


def test_no_file_yet_means_nothing_known(tmp_path: Path) -> None:
    p = LengthPredictor()
    assert length_memory.load(tmp_path / "x.lengths.json", "x", p.bucket_count) is None
    assert length_memory.seed(p, "x", [], tmp_path) is None
    assert length_memory.seed(p, "x", [], None) is None
    assert p.learned_lengths() == tuple(() for _ in range(p.bucket_count))


def _good_body() -> dict[str, object]:
    return {"format": length_memory.FORMAT, "version": 1, "llm": "m", "buckets": [[3]] * 8}


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda b: "{not json", "not JSON"),
        (lambda b: b"\xff\xfe\x00garbage", "not JSON (not UTF-8 text)"),
        (lambda b: {**b, "format": "other"}, "not a throttllem lengths file"),
        (lambda b: {**b, "version": 9}, "version 9, this controller reads 1"),
        (lambda b: {**b, "llm": "llama-2-13b"}, "holds the lengths of 'llama-2-13b', not 'm'"),
        (lambda b: {**b, "buckets": [[3]] * 7}, "must be a list of 8 lists, got 7"),
        (lambda b: {**b, "buckets": {"a": 1}}, "must be a list of 8 lists, got dict"),
        (lambda b: {**b, "buckets": [[3]] * 7 + [[4, 0]]}, "bucket 7 must be a list of positive"),
        (lambda b: {**b, "buckets": [[3]] * 7 + [[4.5]]}, "bucket 7 must be a list of positive"),
        (lambda b: {**b, "buckets": [[3]] * 7 + [[True]]}, "bucket 7 must be a list of positive"),
    ],
)
def test_an_unusable_file_is_refused_naming_the_file_and_the_fault(
    tmp_path: Path, edit: object, message: str
) -> None:
    path = tmp_path / "m.lengths.json"
    body = edit(_good_body())  # type: ignore[operator]
    if isinstance(body, bytes):
        path.write_bytes(body)
    else:
        path.write_text(body if isinstance(body, str) else json.dumps(body))
    p = LengthPredictor()
    with pytest.raises(LengthMemoryError) as err:
        length_memory.seed(p, "m", [], tmp_path)
    assert str(path) in str(err.value) and message in str(err.value)
    assert sum(len(b) for b in p.learned_lengths()) == 0  # left as it was: empty


def test_merge_takes_each_part_in_turn_and_keeps_the_last_window() -> None:
    a = ((1, 2, 3), (10,))
    b = ((4, 5), ())
    merged = length_memory.merge("m", [a, b], window=4)
    assert merged == LearnedLengths("m", ((2, 3, 4, 5), (10,)))
    assert merged.count == 5
    with pytest.raises(ValueError, match="different bucket counts"):
        length_memory.merge("m", [a, ((1,),)], window=4)


def test_running_instances_are_preferred_to_the_file(tmp_path: Path) -> None:
    _save(tmp_path, "m", [_served(seed=1)])
    sibling = _served(seed=2)
    p = LengthPredictor()
    source = length_memory.seed(p, "m", [sibling], tmp_path)
    assert source is not None and source.startswith("1 running instance(s) of m")
    assert p.learned_lengths() == sibling.learned_lengths()


def test_nothing_learned_does_not_empty_an_earlier_file(tmp_path: Path) -> None:
    path = _save(tmp_path, "m", [_served()])
    assert path is not None
    saved = path.read_text()
    assert _save(tmp_path, "m", [LengthPredictor()]) is None
    assert _save(tmp_path, "m", []) is None
    assert path.read_text() == saved


def test_saving_replaces_the_file_whole_and_leaves_no_temporary(tmp_path: Path) -> None:
    first = _served(seed=1)
    second = _served(seed=2, count=MIN_SAMPLES)
    _save(tmp_path / "new", "m", [first])  # creates the folder
    _save(tmp_path / "new", "m", [second])
    assert [f.name for f in (tmp_path / "new").iterdir()] == ["m.lengths.json"]
    loaded = length_memory.load(tmp_path / "new" / "m.lengths.json", "m", 8)
    assert loaded is not None and loaded.buckets == second.learned_lengths()


def test_a_model_name_becomes_a_safe_file_name(tmp_path: Path) -> None:
    path = length_memory.file_for(tmp_path, "meta/Llama 3:8b")
    assert path == tmp_path / "meta_Llama_3_8b.lengths.json"
    assert length_memory.file_for(tmp_path, "..").parent == tmp_path
