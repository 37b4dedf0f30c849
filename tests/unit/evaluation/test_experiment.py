"""Policy names, the static-best search and the comparison (experiment.py), on small runs:
llama-3-8b TP1 on A100-SXM4-40GB, ~30 requests over 40 s of virtual time (~0.1 s each)."""

from __future__ import annotations

import numpy as np
import pytest

from throttllem.controller.evaluation.experiment import (
    POLICY_NAMES,
    PolicyError,
    compare,
    parse_policies,
    static_best,
)
from throttllem.controller.evaluation.policies import MaxClock, StaticClock
from throttllem.controller.evaluation.report import summarise
from throttllem.controller.evaluation.simulator import CLIENT_MAX_TOKENS, EngineSetup, simulate
from throttllem.controller.evaluation.workload import Workload, synthetic
from throttllem.controller.events import Arrived, Event, Slo

SETUP = EngineSetup(gpu="A100-SXM4-40GB", model="llama-3-8b", tp=1)
CLOCKS = sorted(SETUP.specs()[0].supported_clocks_mhz())  # ascending, 210..1410 by 15
# A tight TBT target: attainment climbs from 0 at the lowest clocks to 1 well below the top.
TIGHT_TBT = Slo(tbt_s=0.03)


@pytest.fixture(scope="module")
def workload() -> Workload:
    w = synthetic("conv", 1.0, 40.0, seed=1).clipped(SETUP.specs()[1].max_context)
    assert 20 <= len(w.requests) <= 60
    return w


def _attainment(workload: Workload, mhz: int, slo: Slo) -> float:
    return summarise(simulate(workload, SETUP, StaticClock(mhz), slo), slo, None).slo_attainment


# --- parse_policies ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "names"),
    [
        ("max", ["max"]),
        ("max,throttllem", ["max", "throttllem"]),
        (" pid , static:1200,, oracle ", ["pid", "static:1200", "oracle"]),
        ("static-best,static:210", ["static-best", "static:210"]),
        ("hinted,hinted:0.5,hinted:0", ["hinted", "hinted:0.5", "hinted:0"]),
    ],
)
def test_valid_policy_names_are_kept_in_order(spec: str, names: list[str]) -> None:
    assert parse_policies(spec) == names


@pytest.mark.parametrize(
    ("spec", "bad"),
    [
        ("max,bogus", "bogus"),
        ("static", "static"),
        ("static:", "static:"),
        ("static:fast", "static:fast"),
        ("static:-100", "static:-100"),
        ("MAX", "MAX"),
    ],
)
def test_an_unknown_policy_is_named_with_the_valid_ones(spec: str, bad: str) -> None:
    with pytest.raises(PolicyError) as err:
        parse_policies(spec)
    message = str(err.value)
    assert f"unknown policy '{bad}'" in message
    assert all(name in message for name in POLICY_NAMES)
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize(
    "spec", ["hinted:", "hinted:wide", "hinted:-0.5", "hinted:nan", "hinted:9"]
)
def test_a_bad_hint_spread_is_named_with_what_it_must_be(spec: str) -> None:
    with pytest.raises(PolicyError, match=f"'{spec}': SIGMA must be a number from 0 to 5"):
        parse_policies(f"max,{spec}")


def test_the_static_placeholder_itself_is_not_a_policy() -> None:
    with pytest.raises(PolicyError, match="unknown policy 'static:MHZ'"):
        parse_policies("max,static:MHZ")


@pytest.mark.parametrize("spec", ["", " , ,"])
def test_no_policy_at_all_is_refused(spec: str) -> None:
    with pytest.raises(PolicyError, match="no policy given; valid: max"):
        parse_policies(spec)


# --- static_best ---------------------------------------------------------------------------


def test_static_best_is_the_lowest_clock_reaching_the_target(workload: Workload) -> None:
    target = 0.9
    result, mhz = static_best(workload, SETUP, TIGHT_TBT, target)
    assert mhz in CLOCKS
    assert CLOCKS[0] < mhz < CLOCKS[-1]  # the workload and SLO make the search non-trivial
    assert result.policy == "static-best"
    reached = summarise(result, TIGHT_TBT, None).slo_attainment
    assert reached >= target
    # The result is the run at that clock (the simulation is deterministic).
    again = simulate(workload, SETUP, StaticClock(mhz), TIGHT_TBT)
    assert result.energy_j == again.energy_j
    assert np.array_equal(result.finish_s, again.finish_s)
    # One step lower misses the target.
    lower = CLOCKS[CLOCKS.index(mhz) - 1]
    assert _attainment(workload, lower, TIGHT_TBT) < target


def test_static_best_takes_the_lowest_clock_when_every_clock_suffices(
    workload: Workload,
) -> None:
    result, mhz = static_best(workload, SETUP, Slo(e2e_s=3600.0), 1.0)
    assert mhz == CLOCKS[0]
    assert summarise(result, Slo(e2e_s=3600.0), None).slo_attainment == 1.0


def test_static_best_falls_back_to_the_top_clock_when_none_suffices(workload: Workload) -> None:
    impossible = Slo(ttft_s=1e-6)
    result, mhz = static_best(workload, SETUP, impossible, 0.5)
    assert mhz == CLOCKS[-1]
    again = simulate(workload, SETUP, StaticClock(CLOCKS[-1]), impossible)
    assert result.energy_j == again.energy_j


# --- compare -------------------------------------------------------------------------------


def test_compare_measures_savings_against_max_even_when_max_is_not_asked(
    workload: Workload,
) -> None:
    slo = Slo(tbt_s=0.2)
    c = compare(workload, SETUP, ["static:1005"], slo)
    assert list(c.summaries) == ["static:1005"] and list(c.results) == ["static:1005"]
    base = simulate(workload, SETUP, MaxClock(), slo).energy_j
    s = c.summaries["static:1005"]
    assert s.energy_j == c.results["static:1005"].energy_j < base
    assert s.energy_saving_vs_max == pytest.approx(1.0 - s.energy_j / base)
    assert s.clock_changes >= 1


def test_policies_in_parallel_processes_give_the_results_of_one_after_the_other(
    workload: Workload,
) -> None:
    slo = Slo(tbt_s=0.2, e2e_s=60.0)
    names = ["static:1005", "pid", "oracle", "static-best"]
    one = compare(workload, SETUP, names, slo)
    many = compare(workload, SETUP, names, slo, jobs=2)
    assert list(many.summaries) == list(one.summaries) == names  # in the order asked
    for name in names:
        assert many.summaries[name] == one.summaries[name], name
    assert many.results["oracle"].choice_seconds == one.results["oracle"].choice_seconds


@pytest.mark.parametrize("jobs", [1, 2])
def test_progress_hears_each_policy_finish_once_max_included(workload: Workload, jobs: int) -> None:
    heard: list[str] = []
    compare(workload, SETUP, ["static:1005", "pid"], Slo(tbt_s=0.2), heard.append, jobs=jobs)
    finished = sorted(m for m in heard if m.startswith("finished"))
    assert finished == ["finished max", "finished pid", "finished static:1005"]


def test_an_unknown_policy_in_a_worker_process_fails_the_comparison(workload: Workload) -> None:
    with pytest.raises(PolicyError, match="unknown policy 'fastest'"):
        compare(workload, SETUP, ["pid", "fastest"], Slo(tbt_s=0.2), jobs=2)


def test_compare_static_best_matches_the_max_clock_attainment(workload: Workload) -> None:
    slo = TIGHT_TBT
    c = compare(workload, SETUP, ["max", "static-best"], slo)
    assert list(c.summaries) == ["max", "static-best"]
    assert c.summaries["max"].energy_saving_vs_max == 0.0
    best = c.summaries["static-best"]
    assert best.slo_attainment >= min(c.summaries["max"].slo_attainment, 0.99)
    assert best.energy_j < c.summaries["max"].energy_j
    # The clock it found is reported, and is the clock of its run.
    assert c.static_best_mhz is not None and c.static_best_mhz < CLOCKS[-1]
    pinned = simulate(workload, SETUP, StaticClock(c.static_best_mhz), slo)
    assert pinned.energy_j == c.results["static-best"].energy_j
    assert compare(workload, SETUP, ["pid"], slo).static_best_mhz is None


def test_an_unsupported_static_clock_is_refused_naming_the_valid_range(
    workload: Workload,
) -> None:
    with pytest.raises(ValueError, match=r"static:1000: not supported.*210\.\.1410 MHz"):
        compare(workload, SETUP, ["static:1000"], Slo())


def test_a_controller_policy_accounts_its_time_by_kind_of_clock_choice(
    workload: Workload, tmp_path
) -> None:
    from throttllem.controller.evaluation.experiment import write_outputs
    from throttllem.controller.evaluation.report import format_choices

    slo = Slo(tbt_s=0.2, e2e_s=60.0)
    c = compare(workload, SETUP, ["max", "oracle"], slo)
    oracle, top = c.results["oracle"], c.results["max"]
    assert top.choice_seconds == {}  # a fixed clock says no why
    seconds = oracle.choice_seconds
    # From its first decision (periodic, from the start) to the end of the run, every second
    # once, give or take the first decision period.
    assert sum(seconds.values()) == pytest.approx(oracle.span_s, abs=0.25)
    assert set(seconds) <= {"idle", "slo", "energy_floor", "backlog", "max_lost", "max_guard",
                            "max_prefill"}  # fmt: skip
    assert seconds.get("slo", 0) + seconds.get("energy_floor", 0) > 0
    line = format_choices(c.results)
    assert line.startswith("oracle clock choices (share of time): ") and "max " not in line
    written = write_outputs(c, tmp_path, slo)
    rows = (tmp_path / "clock_choices.csv").read_text().splitlines()
    assert tmp_path / "clock_choices.csv" in written
    assert rows[0] == "policy,why,seconds" and len(rows) == 1 + len(seconds)


# --- what a policy learns from an arrival -----------------------------------------------------


class _RecordingMax(MaxClock):
    """Max clock that keeps every arrival it is shown."""

    def __init__(self) -> None:
        super().__init__()
        self.arrivals: list[Arrived] = []

    def observe(self, ev: Event) -> None:
        if isinstance(ev, Arrived):
            self.arrivals.append(ev)


def test_arrivals_carry_the_clients_max_tokens_not_the_true_length(workload: Workload) -> None:
    """A simulation that told the controller each request's true length as its max_tokens
    would let the length predictor (never above max_tokens) read the answer."""
    policy = _RecordingMax()
    result = simulate(workload, SETUP, policy, Slo())
    max_context = SETUP.specs()[1].max_context
    assert len(policy.arrivals) == len(workload.requests)
    for ev, req in zip(policy.arrivals, workload.requests, strict=True):
        assert ev.length_hint is None
        assert ev.max_tokens == min(CLIENT_MAX_TOKENS, max_context - req.prompt_tokens)
        assert ev.max_tokens > req.output_tokens
    # ...and the engine still generates the trace's lengths.
    assert list(result.output_tokens) == [r.output_tokens for r in workload.requests]


def test_a_smaller_client_max_tokens_is_what_arrivals_carry(workload: Workload) -> None:
    policy = _RecordingMax()
    setup = EngineSetup(gpu="A100-SXM4-40GB", model="llama-3-8b", tp=1, client_max_tokens=600)
    simulate(workload, setup, policy, Slo())
    # Never below a request's own length: the client's bound does not cut the trace short.
    expected = [max(r.output_tokens, 600) for r in workload.requests]
    assert [ev.max_tokens for ev in policy.arrivals] == expected
    assert 600 in expected


@pytest.mark.parametrize(("name", "hinted"), [("hinted", True), ("throttllem", False)])
def test_hinted_is_the_learned_controller_told_each_true_length_as_a_client_hint(
    workload: Workload, monkeypatch: pytest.MonkeyPatch, name: str, hinted: bool
) -> None:
    """`hinted` answers "what if clients said how long their answers are": the same learned
    model as `throttllem` (not the oracle's latency function), the true lengths as hints."""
    from throttllem.controller import oracle_model
    from throttllem.controller.evaluation import experiment

    class Learned(oracle_model.TwinOracleModel):  # stands in for the CatBoost model
        asked = 0

        def predict_ips(self, features: np.ndarray) -> np.ndarray:
            Learned.asked += 1
            return super().predict_ips(features)

    gpu, model = SETUP.specs()
    learned = Learned(gpu, model, SETUP.tp, 32)
    monkeypatch.setattr(experiment, "trained_model", lambda setup, progress=None: learned)
    policy = experiment._build(name, SETUP, None)
    arrivals: list[Arrived] = []
    observe = policy.observe

    def recording(ev: Event) -> None:
        if isinstance(ev, Arrived):
            arrivals.append(ev)
        observe(ev)

    policy.observe = recording  # type: ignore[method-assign]
    simulate(workload, SETUP, policy, Slo(tbt_s=0.2))
    assert policy.name == name and Learned.asked > 0  # the learned model, not the twin's own
    hints = [ev.length_hint for ev in arrivals]
    truth = [r.output_tokens for r in workload.requests]
    assert hints == (truth if hinted else [None] * len(truth))


def _hints(workload: Workload, name: str) -> list[int | None]:
    """The hints `name` gives the workload's arrivals, as simulate asks for them."""
    from throttllem.controller.evaluation import experiment, policies

    policy = experiment._build(name, SETUP, None)
    assert isinstance(policy, policies.ThrottllemPolicy)
    policy.seed_hints(SETUP.seed)  # what start() does
    return [policy.length_hint(r.output_tokens) for r in workload.requests]


def test_noisy_hints_err_by_the_spread_asked_and_the_same_on_every_run(
    workload: Workload, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`hinted:SIGMA`: clients whose estimates are off by a log-normal factor; the errors are
    seeded by the setup, so every policy compared sees the same hints for the same arrivals."""
    from throttllem.controller.evaluation import experiment

    monkeypatch.setattr(experiment, "trained_model", lambda setup, progress=None: None)
    truth = np.array([r.output_tokens for r in workload.requests], dtype=float)
    noisy = _hints(workload, "hinted:0.5")
    assert noisy == _hints(workload, "hinted:0.5")
    assert all(h is not None and h >= 1 for h in noisy)
    log_error = np.log(np.array(noisy, dtype=float) / truth)
    assert np.mean(np.abs(log_error) > 0.05) > 0.8  # nearly every hint is off
    assert 0.3 < float(np.std(log_error)) < 0.7
    assert abs(float(np.median(log_error))) < 0.3  # off both ways, not biased
    wide = np.log(np.array(_hints(workload, "hinted:1.5"), dtype=float) / truth)
    assert float(np.std(wide)) > 2 * float(np.std(log_error))
    assert _hints(workload, "hinted:0") == truth.astype(int).tolist()


def test_a_controller_policy_starts_from_the_lengths_it_is_given(workload: Workload) -> None:
    """What a controller restarted with its lengths file knows: the bucket of 3,000-token
    prompts plans 12-token answers from the first arrival instead of the prior's 459."""
    from throttllem.controller.evaluation.experiment import _build
    from throttllem.controller.length_memory import learned_from

    known = learned_from(SETUP.model, [(3000, 12)] * 40)
    warm = _build("oracle", SETUP, None, lengths=known)
    cold = _build("oracle", SETUP, None)
    for policy in (warm, cold):
        simulate(workload, SETUP, policy, Slo(tbt_s=0.2, e2e_s=60.0))
    predictions = [
        p.controller.scoreboard.predictor.predict(3000, 4096)  # type: ignore[attr-defined]
        for p in (warm, cold)
    ]
    assert predictions == [12, 459]  # the prior: ceil(458.3)
