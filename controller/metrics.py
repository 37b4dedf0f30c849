"""The controller's Prometheus metrics: one registry per controller, no globals.

Names are the contract with dashboards (docker/) and tests; labels carry the engine instance.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from .control_loop import Decision


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
            "Predicted iterations per second at the chosen clock",
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

    def record(self, instance: str, decision: Decision, wall_s: float) -> None:
        self.clock_mhz.labels(instance).set(decision.chosen_mhz)
        self.predicted_ips.labels(instance).set(decision.predicted_ips)
        if decision.min_slack_s != float("inf"):
            self.min_slack.labels(instance).set(decision.min_slack_s)
        self.in_flight.labels(instance).set(decision.running)
        self.queued.labels(instance).set(decision.queued)
        self.decisions.labels(instance, decision.trigger).inc()
        self.decision_seconds.labels(instance).observe(wall_s)
        if decision.applied_mhz is not None:
            self.clock_changes.labels(instance).inc()
        if decision.lost_requests:
            self.lost.labels(instance).inc()

    def record_energy(self, instance: str, energy_j: float, tokens: int) -> None:
        self.energy.labels(instance).set(energy_j)
        if energy_j > 0:
            self.tokens_per_joule.labels(instance).set(tokens / energy_j)

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        start_http_server(port, addr=host, registry=self.registry)
