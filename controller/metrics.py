"""The controller's Prometheus metrics: one registry per controller, no globals.

Names are the contract with dashboards (docker/) and tests; labels carry the engine instance.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from .control_loop import ChoiceTimer, Decision

# Latency buckets, seconds: TTFT from a prefill to a long queue; mean TBT around the paper's
# 200 ms target; E2E up to long generations.
TTFT_BUCKETS_S = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TBT_BUCKETS_S = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)
E2E_BUCKETS_S = (0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 300.0)


@dataclass
class ControllerMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r, lab = self.registry, ["instance"]
        self.clock_mhz = Gauge(
            "throttllem_clock_mhz", "SM clock the controller chose", lab, registry=r
        )
        self.predicted_ips = Gauge(
            "throttllem_predicted_ips",
            "Predicted iterations per second at the chosen clock (while nothing is in flight "
            "it keeps its last value, as throttllem_observed_ips does)",
            lab,
            registry=r,
        )
        self.observed_ips = Gauge(
            "throttllem_observed_ips",
            "Iterations per second the engine last reported",
            lab,
            registry=r,
        )
        self.min_slack = Gauge(
            "throttllem_min_slack_seconds",
            "Projected slack of the tightest request at the chosen clock",
            lab,
            registry=r,
        )
        self.attainment = Gauge(
            "throttllem_slo_attainment",
            "Share of finished requests that met every SLO",
            lab,
            registry=r,
        )
        self.in_flight = Gauge(
            "throttllem_requests_running", "Requests generating", lab, registry=r
        )
        self.queued = Gauge(
            "throttllem_requests_waiting", "Requests without a first token yet", lab, registry=r
        )
        self.energy = Gauge(
            "throttllem_energy_joules", "GPU energy since the controller started", lab, registry=r
        )
        self.tokens_per_joule = Gauge(
            "throttllem_tokens_per_joule",
            "Generated tokens per joule since the controller started",
            lab,
            registry=r,
        )
        self.energy_saving = Gauge(
            "throttllem_energy_saving_ratio",
            "Estimated share of GPU energy saved since the controller started against running "
            "the same iterations at maximum clock: 1 - E / E_max, -1..1, reads low (a lower "
            "bound: max_clock_estimate.py); needs a power model and the GPUs' idle power",
            lab,
            registry=r,
        )
        self.length_error = Gauge(
            "throttllem_length_prediction_mape",
            "Mean absolute % error of output lengths predicted at arrival",
            lab,
            registry=r,
        )
        self.length_under = Gauge(
            "throttllem_length_underpredicted_share",
            "Share of requests that outlived their predicted length",
            lab,
            registry=r,
        )
        self.clock_changes = Counter(
            "throttllem_clock_changes", "Clock changes sent to the GPU", lab, registry=r
        )
        self.decisions = Counter(
            "throttllem_decisions", "Clock decisions taken", [*lab, "trigger"], registry=r
        )
        # Time under each kind of choice, so a dashboard shows why the clock is where it is.
        self.choice_seconds = Counter(
            "throttllem_clock_choice_seconds",
            "Controller seconds (engine time) spent under each kind of clock choice: idle, slo, "
            "energy_floor, backlog, max_lost, max_guard, max_prefill",
            [*lab, "why"],
            registry=r,
        )
        self._choice_timers: dict[str, ChoiceTimer] = {}
        self.lost = Counter(
            "throttllem_lost_request_decisions",
            "Decisions that went to max clock because a request was lost",
            lab,
            registry=r,
        )
        self.decision_seconds = Histogram(
            "throttllem_decision_seconds",
            "Wall time of one decision",
            lab,
            registry=r,
            buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1),
        )
        # Per-request latency (controller time base: engine seconds, i.e. wall seconds times
        # the twin's speed-up), observed when a request finishes; the dashboard draws their
        # percentiles against the targets.
        self.ttft = Histogram(
            "throttllem_ttft_seconds",
            "Time to first token of finished requests (engine time)",
            lab,
            registry=r,
            buckets=TTFT_BUCKETS_S,
        )
        self.tbt = Histogram(
            "throttllem_tbt_seconds",
            "Mean time between tokens of finished requests (engine time)",
            lab,
            registry=r,
            buckets=TBT_BUCKETS_S,
        )
        self.e2e = Histogram(
            "throttllem_e2e_seconds",
            "End-to-end latency of finished requests (engine time)",
            lab,
            registry=r,
            buckets=E2E_BUCKETS_S,
        )
        self.slo_target = Gauge(
            "throttllem_slo_target_seconds",
            "Deployment SLO target by kind (ttft, tbt = mean TBT, e2e); absent: no target",
            [*lab, "kind"],
            registry=r,
        )

    def record(self, instance: str, decision: Decision, wall_s: float) -> None:
        self.clock_mhz.labels(instance).set(decision.chosen_mhz)
        if decision.predicted_ips is not None:  # None: nothing in flight, nothing to predict
            self.predicted_ips.labels(instance).set(decision.predicted_ips)
        if decision.min_slack_s != float("inf"):
            self.min_slack.labels(instance).set(decision.min_slack_s)
        self.in_flight.labels(instance).set(decision.running)
        self.queued.labels(instance).set(decision.queued)
        self.decisions.labels(instance, decision.trigger).inc()
        timer = self._choice_timers.setdefault(instance, ChoiceTimer())
        closed = timer.record(decision.time_s, decision.kind)
        if closed is not None:
            self.choice_seconds.labels(instance, closed[0]).inc(closed[1])
        self.decision_seconds.labels(instance).observe(wall_s)
        if decision.applied_mhz is not None or decision.released:
            self.clock_changes.labels(instance).inc()
        if decision.lost_requests:
            self.lost.labels(instance).inc()

    def record_energy(self, instance: str, energy_j: float, tokens: int) -> None:
        self.energy.labels(instance).set(energy_j)
        if energy_j > 0:
            self.tokens_per_joule.labels(instance).set(tokens / energy_j)

    def record_request(
        self, instance: str, ttft_s: float | None, tbt_s: float | None, e2e_s: float | None
    ) -> None:
        """One finished request's latencies; None (no first token, a single token) is skipped."""
        for histogram, value in ((self.ttft, ttft_s), (self.tbt, tbt_s), (self.e2e, e2e_s)):
            if value is not None and value >= 0:
                histogram.labels(instance).observe(value)

    def set_slo_targets(
        self, instance: str, ttft_s: float | None, tbt_s: float | None, e2e_s: float | None
    ) -> None:
        """The instance's default targets; a None target removes its series."""
        for kind, value in (("ttft", ttft_s), ("tbt", tbt_s), ("e2e", e2e_s)):
            if value is not None:
                self.slo_target.labels(instance, kind).set(value)
            else:
                with contextlib.suppress(KeyError):
                    self.slo_target.remove(instance, kind)

    def forget_instance(self, instance: str) -> None:
        """Drop the instance's gauges (it went away: a stale value would read as current).
        Counters and histograms stay: they only ever grow, and their rates fall to zero."""
        gauges = (
            self.clock_mhz,
            self.predicted_ips,
            self.observed_ips,
            self.min_slack,
            self.attainment,
            self.in_flight,
            self.queued,
            self.energy,
            self.tokens_per_joule,
            self.energy_saving,
            self.length_error,
            self.length_under,
        )
        for gauge in gauges:
            with contextlib.suppress(KeyError):
                gauge.remove(instance)
        self.set_slo_targets(instance, None, None, None)
        self._choice_timers.pop(instance, None)  # its next decision starts a new span

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        start_http_server(port, addr=host, registry=self.registry)
