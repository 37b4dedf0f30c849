"""`throttllem replay` argument checks (the live path runs in the demo and by hand)."""

from __future__ import annotations

import pytest

from throttllem.controller.cli import main


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "give exactly one of --rate and --load"),
        (["--rate", "1", "--load", "0.5"], "give exactly one of --rate and --load"),
        (["--rate", "1", "--speedup", "0"], "--speedup must be positive"),
        (["--rate", "1", "--slo", "paper"], "--slo paper needs --load"),
        (["--rate", "1", "--tp", "3"], "--tp 3: llama-3-8b does not fit"),
        (["--rate", "1", "--trace", "/nowhere.csv"], "cannot read"),  # a later --trace wins
    ],
)
def test_bad_replay_arguments_exit_2_naming_the_problem(
    capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    argv = ["replay", "--trace", "synthetic:conv", "--controller-metrics", "", *extra]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
