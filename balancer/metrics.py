"""Prometheus metrics of the balancer, on its own registry, with label children cached per variant.

Labels are bounded: experiment and variant come from the config, status is a class
(2xx..5xx), upstream is a configured address, reason is one of a fixed few.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


class BalancerMetrics:
    """Every metric the balancer exports."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "balancer_requests", "Proxied requests by variant and status class.",
            ["experiment", "variant", "status_class"], registry=r,
        )
        self.duration = Histogram(
            "balancer_request_duration_seconds", "Time from request arrival to answer, by variant.",
            ["experiment", "variant"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.upstream_errors = Counter(
            "balancer_upstream_errors", "Failed tries against an upstream, by reason.",
            ["variant", "upstream", "reason"], registry=r,
        )
        self.in_flight = Gauge("balancer_in_flight_requests", "Requests being proxied now (read at scrape time).", registry=r)

        self.rejected = Counter(
            "balancer_rejected_requests", "Requests refused before assignment, by reason.", ["reason"], registry=r,
        )
        self.fallbacks = Counter(
            "balancer_fallback_requests", "Requests served by the control because their variant was down.",
            ["experiment", "variant"], registry=r,
        )
        self.feedback = Counter(
            "balancer_feedback", "Feedback values received, by variant.", ["experiment", "variant"], registry=r,
        )
        self.feedback_value = Counter(
            "balancer_feedback_value_sum", "Sum of feedback values, by variant.", ["experiment", "variant"], registry=r,
        )
        self.weight = Gauge(
            "balancer_variant_weight", "Configured share of traffic (0..1) per variant.",
            ["experiment", "variant"], registry=r,
        )
        self.config_version = Gauge("balancer_config_version", "Version number of the active config.", registry=r)
        self.config_info = Gauge(
            "balancer_config_info", "Active config (value 1), labelled by its content hash.",
            ["experiment", "hash", "status"], registry=r,
        )
        self.reload_failures = Counter(
            "balancer_config_reload_failures", "Config reloads rejected (syntax, schema or upstream).", registry=r,
        )
        self.events_pending = Gauge("balancer_events_pending", "Outcome records waiting for the next flush.", registry=r)

    def children(self, experiment: str, variant: str) -> VariantMetrics:
        """Pre-bound label children for one variant (cheap to use on the hot path)."""
        return VariantMetrics(
            status={c: self.requests.labels(experiment, variant, c) for c in STATUS_CLASSES},
            duration=self.duration.labels(experiment, variant),
            feedback=self.feedback.labels(experiment, variant),
            feedback_value=self.feedback_value.labels(experiment, variant),
            fallbacks=self.fallbacks.labels(experiment, variant),
        )


@dataclass(frozen=True)
class VariantMetrics:
    """Label children of one variant."""

    status: dict[str, Counter] = field(repr=False)
    duration: Histogram = field(repr=False)
    feedback: Counter = field(repr=False)
    feedback_value: Counter = field(repr=False)
    fallbacks: Counter = field(repr=False)

    def observe(self, status: int, seconds: float) -> None:
        """Count one answered request."""
        self.status[STATUS_CLASSES[min(max(status // 100, 1), 5) - 1]].inc()
        self.duration.observe(seconds)
