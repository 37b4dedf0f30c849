"""The sidecar keeps what it learned of output lengths: across restarts (the lengths folder) and
for a new instance of an LLM already served. Same harness as test_sidecar.py: real controllers
and twin drivers, fake links; nothing sleeps."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from test_sidecar import Harness, arrived

from throttllem.controller.events import Event, Finish, Finished, FirstToken
from throttllem.controller.length_predictor import LengthPredictor

PROMPT = 3000  # a bucket the prior speaks for until it has seen MIN_SAMPLES answers


def _serve_short_answers(h: Harness, endpoint: str, count: int = 40) -> None:
    link = h.links[endpoint]
    events: list[Event] = []
    for rid in range(count):
        t = link.clock.t_s + 0.01 * rid
        events += [
            arrived(rid, t, prompt=PROMPT),
            FirstToken(rid, t + 0.1),
            Finished(rid, t + 0.5, 12, Finish.END_ID),
        ]
    link.deliver(events)
    h.tick(endpoint, 1.0)


def _predictor(h: Harness, endpoint: str) -> LengthPredictor:
    controller = h.sidecar.instances[endpoint].controller
    assert controller is not None
    return controller.scoreboard.predictor


def test_a_restarted_sidecar_plans_with_the_lengths_learned_before(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    first = Harness(monkeypatch, lengths_dir=tmp_path)
    try:
        first.register("a:1")
        _serve_short_answers(first, "a:1")
        learned = _predictor(first, "a:1").predict(PROMPT, 256)
    finally:
        first.sidecar.close()  # saves on the way out
    assert learned == 12
    assert LengthPredictor().predict(PROMPT, 256) == 256  # the prior's 458, capped
    assert (tmp_path / "llama-2-13b.lengths.json").is_file()

    second = Harness(monkeypatch, lengths_dir=tmp_path)
    try:
        second.register("a:1")
        assert _predictor(second, "a:1").predict(PROMPT, 256) == learned
    finally:
        second.sidecar.close()


def test_without_a_lengths_folder_a_restart_learns_afresh(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    first = Harness(monkeypatch)
    try:
        first.register("a:1")
        _serve_short_answers(first, "a:1")
    finally:
        first.sidecar.close()
    assert list(tmp_path.iterdir()) == []
    second = Harness(monkeypatch)
    try:
        second.register("a:1")
        assert _predictor(second, "a:1").predict(PROMPT, 256) == 256
    finally:
        second.sidecar.close()


def test_lengths_are_saved_while_running_not_only_on_exit(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    h = Harness(monkeypatch, lengths_dir=tmp_path, lengths_save_every_s=0.0)
    try:
        h.register("a:1")
        h.sidecar.step()
        assert list(tmp_path.iterdir()) == []  # nothing learned: nothing written
        _serve_short_answers(h, "a:1")
        h.sidecar.lengths.flush()  # written by a thread of its own, off the control loop
        assert (tmp_path / "llama-2-13b.lengths.json").is_file()
    finally:
        h.sidecar.close()


def test_a_second_instance_of_an_llm_starts_with_what_the_first_learned(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    h = Harness(monkeypatch)
    try:
        h.register("a:1")
        _serve_short_answers(h, "a:1")
        h.register("b:2")
        assert _predictor(h, "b:2").predict(PROMPT, 256) == 12
        assert _predictor(h, "b:2") is not _predictor(h, "a:1")  # each learns on its own after
    finally:
        h.sidecar.close()


def test_an_unusable_lengths_file_is_reported_and_replaced_and_control_goes_on(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bad = tmp_path / "llama-2-13b.lengths.json"
    bad.write_text("{truncated")
    h = Harness(monkeypatch, lengths_dir=tmp_path)
    try:
        with caplog.at_level(logging.ERROR, logger="throttllem.controller.sidecar"):
            h.register("a:1")
        assert f"{bad}: not JSON" in caplog.text and "learning output lengths afresh" in caplog.text
        h.sidecar.step()
        assert all(lock is not None for lock in h.locks("a:1"))  # controlled all the same
        _serve_short_answers(h, "a:1")
    finally:
        h.sidecar.close()
    assert bad.read_text().startswith('{"format":"throttllem-learned-lengths"')


def test_a_failed_save_is_logged_and_the_loop_goes_on(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    h = Harness(monkeypatch, lengths_dir=blocked, lengths_save_every_s=0.0)
    try:
        h.register("a:1")
        with caplog.at_level(logging.WARNING, logger="throttllem.controller.sidecar"):
            _serve_short_answers(h, "a:1")
            h.sidecar.lengths.flush()
            h.tick("a:1", 1.0)
            h.sidecar.lengths.flush()
        assert "cannot save the learned output lengths of llama-2-13b" in caplog.text
        assert h.decisions("a:1") > 0
    finally:
        h.sidecar.close()
