"""Prometheus metrics of one model server, kept in a registry owned by its app.

A registry per app (not the global one) lets tests build many apps in one process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Histogram, Info
from prometheus_client.process_collector import ProcessCollector

from modelserver.validation import REASONS

# Sub-millisecond inline predictions up to multi-second executor batches.
LATENCY_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass(frozen=True)
class ServerMetrics:
    """The registry and the already-labelled series one model server updates."""

    registry: CollectorRegistry
    predict_requests: Counter
    predicted_rows: Counter
    predict_latency: Histogram
    bad_requests: dict[str, Counter]


def create_metrics(*, model: str, version: str) -> ServerMetrics:
    """Create a fresh registry with the model server's series, every label value pre-created at zero."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    Info("model", "Model served by this process.", registry=registry).info(
        {"model": model, "version": version}
    )
    predict_requests = Counter(
        "model_predict_requests", "Successful /predict requests.", ["model"], registry=registry
    )
    predicted_rows = Counter("model_predicted_rows", "Rows predicted by /predict.", ["model"], registry=registry)
    predict_latency = Histogram(
        "model_predict_latency_seconds",
        "Time from reading a /predict body to a built response, for successful requests.",
        ["model"],
        buckets=LATENCY_BUCKETS,
        registry=registry,
    )
    bad_requests = Counter(
        "model_bad_requests", "/predict requests rejected with 400, by reason.", ["model", "reason"], registry=registry
    )
    return ServerMetrics(
        registry=registry,
        predict_requests=predict_requests.labels(model=model),
        predicted_rows=predicted_rows.labels(model=model),
        predict_latency=predict_latency.labels(model=model),
        bad_requests={reason: bad_requests.labels(model=model, reason=reason) for reason in REASONS},
    )
