"""The scoreboard: every request in flight on one engine instance, and what is expected of it.

Fed by events (arrived, first token, iteration, finished) or rebuilt from a snapshot; read as
the arrays the projection and the clock policy take. Tokens generated are counted from
iteration events (one per generating request per iteration) and corrected by snapshots and
by the exact count a finished event carries.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .backlog_check import ArrivalForecast
from .events import Arrived, Finish, Finished, FirstToken, InFlight, Iteration, Slo
from .length_predictor import LengthPredictor
from .projection import QueuedRequests, RunningRequests
from .slo_slack import RequestDeadlines

INF = math.inf
# Arrivals remembered for the forecast, and the shortest span a rate is measured over.
FORECAST_WINDOW_S = 30.0
FORECAST_MIN_SPAN_S = 5.0
# Arrivals counted for the rate a backlog must keep up with (backlog_check): long enough that
# a burst the E2E targets can absorb does not set the clock (conv at 0.9 load, 120 s against
# 30 s: +0.2 to +4.6 points of saving per cell at the same attainment, docs/evaluation.md).
SUSTAIN_WINDOW_S = 120.0
# How short a running request may still turn out: this quantile of the lengths seen that are
# longer than what it has generated (the shortest plausible end, for the clock policy's guard).
SHORT_QUANTILE = 0.02
# While requests wait for admission, the running requests are planned at this quantile of their
# lengths instead of the predictor's long one. The wait is set by the sum of many lengths, which
# each one's long quantile overstates, and a request that outlives it is re-planned longer at
# the next decision (the prediction is conditional on what it has generated). Conv at 0.75-0.9
# load: +0.4 to +1.6 points of saving at the same attainment (docs/evaluation.md, 2026-12-03).
WAITING_QUANTILE = 0.5
# Finished requests in the forecast window enough for a median length before the predictor
# has learned the prompts arriving.
MEDIAN_MIN_FINISHED = 8


@dataclass
class TrackedRequest:
    request_id: int
    arrival_s: float
    prompt_tokens: int
    max_tokens: int
    slo: Slo
    length_hint: int | None
    predicted_at_arrival: int
    generated: int = 0
    first_token_s: float | None = None
    # Absolute targets in the controller's time base, inf where the request has no such SLO:
    # computed once here, read at every decision.
    ttft_deadline_s: float = INF
    e2e_deadline_s: float = INF
    tbt_target_s: float = INF
    key: str = ""

    def __post_init__(self) -> None:
        self.key = str(self.request_id)  # the id the clock policy names requests by
        if self.slo.ttft_s is not None:
            self.ttft_deadline_s = self.arrival_s + self.slo.ttft_s
        if self.slo.e2e_s is not None:
            self.e2e_deadline_s = self.arrival_s + self.slo.e2e_s
        if self.slo.tbt_s is not None:
            self.tbt_target_s = self.slo.tbt_s


@dataclass(frozen=True)
class SloOutcome:
    """How a finished request fared against its SLOs."""

    request_id: int
    ttft_s: float | None
    mean_tbt_s: float | None
    e2e_s: float
    met: bool


@dataclass(frozen=True)
class DecisionInputs:
    running: RunningRequests
    queued: QueuedRequests
    deadlines: RequestDeadlines


class Scoreboard:
    def __init__(self, predictor: LengthPredictor, default_slo: Slo, tokens_per_block: int) -> None:
        self.predictor = predictor
        self.default_slo = default_slo
        self.tokens_per_block = tokens_per_block
        self.requests: dict[int, TrackedRequest] = {}
        self.outcomes_met = 0
        self.outcomes_total = 0
        self._recent: deque[tuple[float, int]] = deque()  # (arrival, prompt tokens)
        self._finished: deque[tuple[float, int]] = deque()  # (finish, tokens generated)
        self._arrivals: deque[float] = deque()  # over SUSTAIN_WINDOW_S
        self._iteration_s = 0.0
        self._iterations = 0

    def __len__(self) -> int:
        return len(self.requests)

    def on_arrived(self, ev: Arrived) -> None:
        self._recent.append((ev.time_s, ev.prompt_tokens))
        self._arrivals.append(ev.time_s)
        predicted = self.predictor.predict(ev.prompt_tokens, ev.max_tokens, 0, ev.length_hint)
        self.requests[ev.request_id] = TrackedRequest(
            ev.request_id,
            ev.time_s,
            ev.prompt_tokens,
            ev.max_tokens,
            self.default_slo.overridden_by(ev.slo),
            ev.length_hint,
            predicted,
        )

    def on_first_token(self, ev: FirstToken) -> None:
        req = self.requests.get(ev.request_id)
        if req is not None and req.first_token_s is None:
            req.first_token_s = ev.time_s
            req.generated = max(req.generated, ev.tokens)

    def on_iteration(self, ev: Iteration) -> None:
        # Recent mean iteration time (EWMA over ~100 iterations), bias-corrected: started from
        # zero it would read a tenth of the truth after 10 iterations, and the forecast would
        # expect a tenth of the prefills while traffic is already heavy.
        self._iterations += 1
        self._iteration_s += (ev.latency_s - self._iteration_s) * max(0.01, 1 / self._iterations)
        for req in self.requests.values():
            if req.first_token_s is not None and req.first_token_s < ev.time_s:
                req.generated = min(req.generated + 1, req.max_tokens)

    def on_finished(self, ev: Finished) -> SloOutcome | None:
        req = self.requests.pop(ev.request_id, None)
        if req is None:
            return None
        if ev.reason in (Finish.END_ID, Finish.LENGTH, Finish.STOP_WORDS):
            self.predictor.observe(req.prompt_tokens, ev.output_tokens, req.predicted_at_arrival)
            self._finished.append((ev.time_s, ev.output_tokens))
        if ev.reason in (Finish.CANCELLED, Finish.ERROR):
            return None
        outcome = self._outcome(req, ev)
        self.outcomes_total += 1
        self.outcomes_met += outcome.met
        return outcome

    def _outcome(self, req: TrackedRequest, ev: Finished) -> SloOutcome:
        e2e = ev.time_s - req.arrival_s
        ttft = None if req.first_token_s is None else req.first_token_s - req.arrival_s
        tbt = None
        if req.first_token_s is not None and ev.output_tokens > 1:
            tbt = (ev.time_s - req.first_token_s) / (ev.output_tokens - 1)
        slo = req.slo
        met = (
            (slo.e2e_s is None or e2e <= slo.e2e_s)
            and (slo.ttft_s is None or ttft is None or ttft <= slo.ttft_s)
            and (slo.tbt_s is None or tbt is None or tbt <= slo.tbt_s)
        )
        return SloOutcome(req.request_id, ttft, tbt, e2e, met)

    def rebuild(self, snapshot: list[InFlight]) -> None:
        """Replace everything with a snapshot's view (after connecting or a gap)."""
        old = self.requests
        self.requests = {}
        for r in sorted(snapshot, key=lambda r: (r.arrival_s, r.request_id)):
            previous = old.get(r.request_id)
            predicted = (
                previous.predicted_at_arrival
                if previous
                else self.predictor.predict(r.prompt_tokens, r.max_tokens, 0, r.length_hint)
            )
            self.requests[r.request_id] = TrackedRequest(
                r.request_id,
                r.arrival_s,
                r.prompt_tokens,
                r.max_tokens,
                self.default_slo.overridden_by(r.slo),
                r.length_hint,
                predicted,
                generated=r.output_tokens,
                first_token_s=r.first_token_s,
            )

    def forecast(self, now_s: float) -> ArrivalForecast:
        """Arrival rate, mean prompt and the mean length of the requests finished, over the
        last FORECAST_WINDOW_S seconds; and the arrival rate over SUSTAIN_WINDOW_S."""
        while self._recent and self._recent[0][0] < now_s - FORECAST_WINDOW_S:
            self._recent.popleft()
        while self._finished and self._finished[0][0] < now_s - FORECAST_WINDOW_S:
            self._finished.popleft()
        while self._arrivals and self._arrivals[0] < now_s - SUSTAIN_WINDOW_S:
            self._arrivals.popleft()
        if not self._recent:
            return ArrivalForecast()
        span = max(now_s - self._recent[0][0], FORECAST_MIN_SPAN_S)
        prompts = sum(p for _, p in self._recent)
        mean_prompt = prompts / len(self._recent)
        median = 0.0
        if self.predictor.learned(int(mean_prompt)):
            median = float(self.predictor.predict(int(mean_prompt), 1 << 20, quantile=0.5))
        elif len(self._finished) >= MEDIAN_MIN_FINISHED:
            # Until the predictor has learned these prompts, the lengths just finished (short
            # ones finish first, so this errs short for a while: toward protecting answers).
            median = float(np.median([n for _, n in self._finished]))
        return ArrivalForecast(
            len(self._recent) / span,
            mean_prompt,
            float(self.predictor.predict(int(mean_prompt), 1 << 20)),
            self._iteration_s,
            sum(n for _, n in self._finished) / len(self._finished) if self._finished else 0.0,
            median,
            sustained_rate_per_s=len(self._arrivals)
            / max(now_s - self._arrivals[0], FORECAST_MIN_SPAN_S),
            e2e_target_s=INF if self.default_slo.e2e_s is None else self.default_slo.e2e_s,
        )

    def attainment(self) -> float:
        return self.outcomes_met / self.outcomes_total if self.outcomes_total else 1.0

    def decision_inputs(self) -> DecisionInputs:
        """The arrays the projection and the clock policy read, requests in arrival order."""
        # Insertion order is arrival order (events arrive in order; rebuild() inserts in the
        # snapshot's order), so no sort is needed on this hot path.
        ordered = self.requests.values()
        run = [r for r in ordered if r.first_token_s is not None]
        wait = [r for r in ordered if r.first_token_s is None]
        tpb = self.tokens_per_block

        def ints(values: list[int]) -> npt.NDArray[np.int64]:
            return np.array(values, dtype=np.int64)

        def floats(values: list[float]) -> npt.NDArray[np.float64]:
            return np.array(values, dtype=np.float64)

        many = self.predictor.predict_many

        Ints = npt.NDArray[np.int64]

        def lengths(reqs: list[TrackedRequest], generated: bool) -> tuple[Ints, Ints, Ints, Ints]:
            """predict_many's arguments for these requests."""
            return (
                ints([r.prompt_tokens for r in reqs]),
                ints([r.max_tokens for r in reqs]),
                ints([r.generated for r in reqs]) if generated else np.zeros(len(reqs), np.int64),
                ints([r.length_hint or 0 for r in reqs]),
            )

        lengths_run = lengths(run, True)
        prompt_run, generated_run = lengths_run[0], lengths_run[2]
        reserved_run = ints([-(-(r.prompt_tokens + r.max_tokens) // tpb) for r in run])
        planned = many(*lengths_run, quantile=WAITING_QUANTILE if wait else None)
        running = RunningRequests(
            prompt_run + generated_run, np.maximum(planned - generated_run, 1), reserved_run
        )
        queued = QueuedRequests(
            ints([r.prompt_tokens for r in wait]),
            many(*lengths(wait, False)),
            ints([-(-(r.prompt_tokens + r.max_tokens) // tpb) for r in wait]),
        )
        shortest = many(*lengths_run, quantile=SHORT_QUANTILE)
        deadlines = RequestDeadlines(
            running_ids=tuple(r.key for r in run),
            running_e2e_deadline_s=floats([r.e2e_deadline_s for r in run]),
            running_tbt_target_s=floats([r.tbt_target_s for r in run]),
            running_first_token_s=floats([r.first_token_s or 0.0 for r in run]),
            running_generated=generated_run,
            running_shortest_remaining=np.maximum(shortest - generated_run, 1),
            queued_ids=tuple(r.key for r in wait),
            queued_ttft_deadline_s=floats([r.ttft_deadline_s for r in wait]),
            queued_e2e_deadline_s=floats([r.e2e_deadline_s for r in wait]),
            queued_tbt_target_s=floats([r.tbt_target_s for r in wait]),
        )
        return DecisionInputs(running, queued, deadlines)
