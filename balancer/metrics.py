"""Prometheus metrics of the balancer, on its own registry, with label children cached per variant.

Labels are bounded: experiment and variant come from the config, status is a class
(2xx..5xx), upstream is a configured address, reason is one of a fixed few.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

LATENCY_BUCKETS: Final[list[float]] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


class BalancerMetrics:
    """Every metric the balancer exports."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        # Requests and their latency are counted in plain integers on the hot path (a lock-free
        # bisect and two additions) and turned into Prometheus samples only when scraped.
        self._variant_stats: dict[tuple[str, str], VariantStats] = {}
        r.register(_HotPathCollector(self._variant_stats))
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
        # A gauge, not a counter: feedback may be negative (a loss, a cost), and a counter refuses that.
        self.feedback_value = Gauge(
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
        """Pre-bound metrics for one variant (cheap to use on the hot path); kept across reloads."""
        stats = self._variant_stats.setdefault((experiment, variant), VariantStats())
        return VariantMetrics(
            stats=stats,
            feedback=self.feedback.labels(experiment, variant),
            feedback_value=self.feedback_value.labels(experiment, variant),
            fallbacks=self.fallbacks.labels(experiment, variant),
        )


class VariantStats:
    """Answered requests of one variant: counts per status class and a latency histogram.

    Every count is a float attribute, one per status class and bucket, which mypyc keeps unboxed:
    counting allocates nothing (exact up to 2**53). Counts in lists of ints allocated and freed an int
    per count, and `bisect_left` compared boxed floats: metrics then cost 2.7 % of throughput in
    `python -m bench.same_core --first outcomes-off --second lean`, nothing measurable since. The
    comparisons below are LATENCY_BUCKETS written out
    (`tests/test_metrics.py` checks them against prometheus_client's own histogram at every edge).
    """

    __slots__ = ("status_1xx", "status_2xx", "status_3xx", "status_4xx", "status_5xx", "le_0", "le_1", "le_2", "le_3",
                 "le_4", "le_5", "le_6", "le_7", "le_8", "le_9", "le_10", "le_11", "le_12", "le_inf", "duration_sum")

    def __init__(self) -> None:
        self.status_1xx = 0.0
        self.status_2xx = 0.0
        self.status_3xx = 0.0
        self.status_4xx = 0.0
        self.status_5xx = 0.0
        self.le_0 = 0.0
        self.le_1 = 0.0
        self.le_2 = 0.0
        self.le_3 = 0.0
        self.le_4 = 0.0
        self.le_5 = 0.0
        self.le_6 = 0.0
        self.le_7 = 0.0
        self.le_8 = 0.0
        self.le_9 = 0.0
        self.le_10 = 0.0
        self.le_11 = 0.0
        self.le_12 = 0.0
        self.le_inf = 0.0
        self.duration_sum = 0.0

    def observe(self, status: int, seconds: float) -> None:
        """Count one answered request (runs on the event loop, like the scrape)."""
        if status < 300:
            if status >= 200:
                self.status_2xx += 1.0
            else:
                self.status_1xx += 1.0
        elif status < 400:
            self.status_3xx += 1.0
        elif status < 500:
            self.status_4xx += 1.0
        else:
            self.status_5xx += 1.0
        if seconds <= 0.001:
            self.le_0 += 1.0
        elif seconds <= 0.0025:
            self.le_1 += 1.0
        elif seconds <= 0.005:
            self.le_2 += 1.0
        elif seconds <= 0.01:
            self.le_3 += 1.0
        elif seconds <= 0.025:
            self.le_4 += 1.0
        elif seconds <= 0.05:
            self.le_5 += 1.0
        elif seconds <= 0.1:
            self.le_6 += 1.0
        elif seconds <= 0.25:
            self.le_7 += 1.0
        elif seconds <= 0.5:
            self.le_8 += 1.0
        elif seconds <= 1.0:
            self.le_9 += 1.0
        elif seconds <= 2.5:
            self.le_10 += 1.0
        elif seconds <= 5.0:
            self.le_11 += 1.0
        elif seconds <= 10.0:
            self.le_12 += 1.0
        else:
            self.le_inf += 1.0
        self.duration_sum += seconds

    def status_counts(self) -> list[float]:
        """Requests per class, in STATUS_CLASSES order."""
        return [self.status_1xx, self.status_2xx, self.status_3xx, self.status_4xx, self.status_5xx]

    def bucket_counts(self) -> list[float]:
        """Requests per latency bucket (not cumulative), in LATENCY_BUCKETS order, then +Inf."""
        return [self.le_0, self.le_1, self.le_2, self.le_3, self.le_4, self.le_5, self.le_6, self.le_7, self.le_8,
                self.le_9, self.le_10, self.le_11, self.le_12, self.le_inf]


class _HotPathCollector(Collector):
    """Exports every variant's `VariantStats` as `balancer_requests_total` and the duration histogram."""

    def __init__(self, variant_stats: dict[tuple[str, str], VariantStats]) -> None:
        self._variant_stats = variant_stats

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "balancer_requests", "Proxied requests by variant and status class.",
            labels=["experiment", "variant", "status_class"],
        )
        duration = HistogramMetricFamily(
            "balancer_request_duration_seconds", "Time from request arrival to answer, by variant.",
            labels=["experiment", "variant"],
        )
        for (experiment, variant), stats in list(self._variant_stats.items()):
            for status_class, count in zip(STATUS_CLASSES, stats.status_counts(), strict=True):
                requests.add_metric([experiment, variant, status_class], count)
            cumulative = list(accumulate(stats.bucket_counts()))
            bounds = [repr(float(bound)) for bound in LATENCY_BUCKETS] + ["+Inf"]
            duration.add_metric([experiment, variant], list(zip(bounds, cumulative, strict=True)), stats.duration_sum)
        yield requests
        yield duration


@dataclass(frozen=True)
class VariantMetrics:
    """Metrics of one variant."""

    stats: VariantStats
    feedback: Counter = field(repr=False)
    feedback_value: Gauge = field(repr=False)
    fallbacks: Counter = field(repr=False)

    def observe(self, status: int, seconds: float) -> None:
        """Count one answered request."""
        self.stats.observe(status, seconds)
