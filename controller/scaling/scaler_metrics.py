"""The scaler's Prometheus metrics, on the controller's registry (one scrape target).

Names are the dashboard's (docker/grafana/dashboards/throttllem.json); label `model` is the
client-facing model name (the router's)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from .scaler import ScaleDecision


class ScalerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        lab = ["model"]
        self.active_size = Gauge(
            "throttllem_scaler_active_size",
            "GPUs of the engine size taking new requests",
            lab,
            registry=registry,
        )
        self.decisions = Counter(
            "throttllem_scaler_decisions",
            "Engine size changes decided",
            [*lab, "action"],
            registry=registry,
        )
        self.rate = Gauge(
            "throttllem_scaler_request_rate_rps",
            "Measured arrival rate the scaler sees",
            lab,
            registry=registry,
        )
        self.desired = Gauge(
            "throttllem_scaler_desired_replicas",
            "Replicas of the largest size the measured demand needs (KEDA's view)",
            lab,
            registry=registry,
        )

    def record_look(self, model: str, rate_rps: float, gpus: int, replica_capacity_rps: float,
                    margin: float) -> None:  # fmt: skip
        self.rate.labels(model).set(rate_rps)
        self.active_size.labels(model).set(gpus)
        self.desired.labels(model).set(rate_rps / (replica_capacity_rps * (1.0 - margin)))

    def record_decision(self, model: str, decision: ScaleDecision) -> None:
        self.decisions.labels(model, decision.reason).inc()
