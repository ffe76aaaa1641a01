"""The hot path's own request counts and latency histogram export what prometheus_client's Histogram would."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram

from balancer.metrics import LATENCY_BUCKETS, BalancerMetrics


def _samples(registry: CollectorRegistry, metric: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in registry.collect() if family.name == metric for sample in family.samples}


def test_latency_histogram_matches_prometheus_clients_on_every_bucket_edge() -> None:
    # Every bound itself (an "le" bucket includes it), just above and below it, zero and beyond the last.
    seconds = [0.0, 1e-9, LATENCY_BUCKETS[-1] * 3]
    for bound in LATENCY_BUCKETS:
        seconds += [bound, bound * (1 - 1e-12), bound * (1 + 1e-12)]
    metrics = BalancerMetrics()
    children = metrics.children("exp", "model_a")
    reference_registry = CollectorRegistry()
    reference = Histogram("balancer_request_duration_seconds", "", ["experiment", "variant"],
                          buckets=LATENCY_BUCKETS, registry=reference_registry).labels("exp", "model_a")
    for value in seconds:
        children.observe(200, value)
        reference.observe(value)
    ours = _samples(metrics.registry, "balancer_request_duration_seconds")
    expected = {key: value for key, value in _samples(reference_registry, "balancer_request_duration_seconds").items()
                if not key[0].endswith("_created")}
    assert ours == expected
    assert ours["balancer_request_duration_seconds_count", (("experiment", "exp"), ("variant", "model_a"))] == len(seconds)


def test_requests_are_counted_by_status_class() -> None:
    metrics = BalancerMetrics()
    children = metrics.children("exp", "model_b")
    for status in (200, 201, 204, 302, 404, 429, 500, 503, 504, 101, 99, 600):
        children.observe(status, 0.002)
    counts = {dict(labels)["status_class"]: value
              for (name, labels), value in _samples(metrics.registry, "balancer_requests").items() if name.endswith("_total")}
    # Out-of-range statuses count in the nearest class rather than being lost.
    assert counts == {"1xx": 2, "2xx": 3, "3xx": 1, "4xx": 2, "5xx": 4}
