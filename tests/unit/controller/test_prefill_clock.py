"""`prefill_clock="max"`: an iteration that carries prompts runs at maximum clock while requests
decode, whatever the SLOs would allow; otherwise the choice is unchanged. "auto" (the default)
does so while prefill stalls dominate the traffic: short answers to long prompts."""

from __future__ import annotations

import numpy as np
import pytest
from test_clock_policy import CLOCKS, LIMITS, POWERED, TABLE

from throttllem.controller.backlog_check import ArrivalForecast
from throttllem.controller.cli import build_parser
from throttllem.controller.cli_simulate import PREFILL_CLOCK_CHOICES
from throttllem.controller.clock_policy import ChoiceKind, choose_clock
from throttllem.controller.control_loop import ControllerConfig
from throttllem.controller.prefill_clock import PREFILL_CLOCKS, STALL_SHARE, prefill_stalls_dominate
from throttllem.controller.projection import QueuedRequests, RunningRequests, project
from throttllem.controller.slo_slack import RequestDeadlines

NONE = np.zeros(0, np.int64)


def _case(decoding: bool, prompt_waiting: bool) -> tuple:
    """r0 decoding with plenty of slack (its SLOs allow the lowest clock); q0 a 4,000-token
    prompt entering the next iteration."""
    n, m = int(decoding), int(prompt_waiting)
    running = RunningRequests(
        np.full(n, 600, np.int64), np.full(n, 100, np.int64), np.full(n, 20, np.int64)
    )
    queued = QueuedRequests(
        np.full(m, 4000, np.int64), np.full(m, 50, np.int64), np.full(m, 200, np.int64)
    )
    dl = RequestDeadlines(
        running_ids=("r0",) * n,
        running_e2e_deadline_s=np.full(n, 1e6),
        running_tbt_target_s=np.full(n, 0.2),
        running_first_token_s=np.zeros(n),
        running_generated=np.ones(n, np.int64),
        running_shortest_remaining=np.full(n, 60, np.int64),
        queued_ids=("q0",) * m,
        queued_ttft_deadline_s=np.full(m, np.inf),
        queued_e2e_deadline_s=np.full(m, np.inf),
        queued_tbt_target_s=np.full(m, np.inf),
    )
    return project(running, queued, LIMITS), dl


def test_a_prompt_entering_while_a_request_decodes_runs_at_max() -> None:
    proj, dl = _case(decoding=True, prompt_waiting=True)
    optimal = choose_clock(0.0, proj, dl, TABLE, prefill_clock="optimal")
    assert optimal.clock_mhz == min(CLOCKS)
    choice = choose_clock(0.0, proj, dl, TABLE, prefill_clock="max")
    assert choice.clock_mhz == max(CLOCKS)
    assert "prefill_clock=max" in choice.reason and choice.kind is ChoiceKind.MAX_PREFILL


@pytest.mark.parametrize(("decoding", "prompt_waiting"), [(False, True), (True, False)])
def test_without_both_a_prompt_and_a_decoding_request_the_choice_is_unchanged(
    decoding: bool, prompt_waiting: bool
) -> None:
    proj, dl = _case(decoding, prompt_waiting)
    default = choose_clock(0.0, proj, dl, TABLE, prefill_clock="optimal")
    assert choose_clock(0.0, proj, dl, TABLE, prefill_clock="max") == default
    assert default.clock_mhz < max(CLOCKS)


def test_expected_arrivals_are_not_a_prompt_entering() -> None:
    # The forecast spreads prompts still to come over every projected iteration; only a prompt
    # that has arrived makes the next iteration a prefill.
    proj, dl = _case(decoding=True, prompt_waiting=False)
    forecast = ArrivalForecast(
        rate_per_s=2.0, mean_prompt_tokens=2000, mean_output_tokens=100, iteration_s=0.03
    )
    choice = choose_clock(0.0, proj, dl, TABLE, forecast=forecast, prefill_clock="max")
    assert choice.clock_mhz < max(CLOCKS)
    assert "prefill_clock" not in choice.reason


def test_a_wrong_value_names_the_setting() -> None:
    proj, dl = _case(decoding=True, prompt_waiting=True)
    with pytest.raises(ValueError, match="prefill_clock must be one of"):
        choose_clock(0.0, proj, dl, TABLE, prefill_clock="fast")
    with pytest.raises(ValueError, match="prefill_clock must be one of auto, optimal, max"):
        ControllerConfig(prefill_clock="fast")


@pytest.mark.parametrize("command", [["serve"], ["simulate", "--trace", "synthetic:conv"]])
def test_the_command_lines_take_exactly_the_policy_values(command: list[str]) -> None:
    assert PREFILL_CLOCK_CHOICES == PREFILL_CLOCKS
    parser = build_parser()
    for value in PREFILL_CLOCKS:
        assert parser.parse_args([*command, "--prefill-clock", value]).prefill_clock == value
    assert parser.parse_args(command).prefill_clock == "auto"
    with pytest.raises(SystemExit):
        parser.parse_args([*command, "--prefill-clock", "fast"])


def test_simulate_hands_the_setting_to_the_controller_in_the_loop() -> None:
    from throttllem.controller.evaluation.experiment import _build
    from throttllem.controller.evaluation.policies import ThrottllemPolicy
    from throttllem.controller.evaluation.simulator import EngineSetup

    policy = _build("oracle", EngineSetup(), None, "max")
    assert isinstance(policy, ThrottllemPolicy) and policy.config.prefill_clock == "max"
    default = _build("oracle", EngineSetup(), None)
    assert isinstance(default, ThrottllemPolicy) and default.config.prefill_clock == "auto"


def _traffic(median_output: float) -> ArrivalForecast:
    """Arrivals of 4,000-token prompts whose typical answer is `median_output` tokens."""
    return ArrivalForecast(
        rate_per_s=0.5,
        mean_prompt_tokens=4000,
        mean_output_tokens=median_output,
        iteration_s=0.03,
        median_output_tokens=median_output,
    )


def test_auto_runs_prompts_at_max_when_answers_are_short_for_their_prompts() -> None:
    proj, dl = _case(decoding=True, prompt_waiting=True)
    # One 4,000-token prefill at max clock against the TBT budget of a typical answer:
    # (6 - 1) x 0.2 s = 1 s for a 6-token answer, 60 s for a 301-token one.
    stall = float(TABLE.prefill_seconds(int(proj.batch[0]), int(proj.kv_blocks[0]), 4000)[-1])
    assert stall >= STALL_SHARE * 1.0 and stall < STALL_SHARE * 60.0
    assert prefill_stalls_dominate(TABLE, proj, dl, _traffic(6))
    assert not prefill_stalls_dominate(TABLE, proj, dl, _traffic(301))
    short = choose_clock(0.0, proj, dl, TABLE, forecast=_traffic(6))
    assert short.clock_mhz == max(CLOCKS) and short.kind is ChoiceKind.MAX_PREFILL
    assert "prefill_clock=auto" in short.reason
    long = choose_clock(0.0, proj, dl, TABLE, forecast=_traffic(301))
    assert long.clock_mhz < max(CLOCKS) and long.kind is not ChoiceKind.MAX_PREFILL


def test_a_prompt_entering_short_answer_traffic_raises_the_floor_to_whole_energy() -> None:
    """Where prompts dominate, a queued request's service is mostly its prefill: the time a
    faster clock saves goes to it, so the floor counts the whole energy of an iteration, as
    for a backlog. On decode-dominated traffic the same prompt keeps the marginal floor."""
    proj, dl = _case(decoding=True, prompt_waiting=True)

    def traffic(median_output: float) -> ArrivalForecast:  # the same load, only the median
        return ArrivalForecast(0.5, 4000, 100, 0.03, median_output_tokens=median_output)

    short = choose_clock(0.0, proj, dl, POWERED, forecast=traffic(6), prefill_clock="optimal")
    long = choose_clock(0.0, proj, dl, POWERED, forecast=traffic(301), prefill_clock="optimal")
    assert short.kind is long.kind is ChoiceKind.ENERGY_FLOOR
    assert short.clock_mhz > long.clock_mhz


def test_auto_needs_lengths_learned_and_a_tbt_target() -> None:
    proj, dl = _case(decoding=True, prompt_waiting=True)
    assert not prefill_stalls_dominate(TABLE, proj, dl, _traffic(0))  # nothing learned yet
    no_tbt = RequestDeadlines(**{**dl.__dict__, "running_tbt_target_s": np.full(1, np.inf)})
    assert not prefill_stalls_dominate(TABLE, proj, no_tbt, _traffic(6))
    # Without a forecast there is nothing to judge the traffic by: as "optimal".
    assert choose_clock(0.0, proj, dl, TABLE) == choose_clock(
        0.0, proj, dl, TABLE, prefill_clock="optimal"
    )
