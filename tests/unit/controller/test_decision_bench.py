"""The decision benchmark's loaded scoreboard (decision_bench.py): it must pose the decision it
names, whatever the controller's default use of length hints."""

from __future__ import annotations

from throttllem.controller.decision_bench import build_loaded_scoreboard


def test_the_loaded_scoreboard_spans_exactly_the_horizon_asked_for() -> None:
    board = build_loaded_scoreboard(requests=64, horizon=2000, waiting=4)
    inputs = board.decision_inputs()
    remaining = inputs.running.remaining_tokens
    assert len(remaining) == 64
    # The longest request ends at the horizon: the default `cap` would have cut it to ~459.
    assert int(remaining.max()) == 2000
    assert inputs.queued.output_tokens.tolist() == [32] * 4
