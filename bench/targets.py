"""Issue #9's targets against one run: each a Check with its interval and verdict."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

from scipy.stats import quantile_test

from bench.report_cost import SAME_CORE_HOW, WRITER_SPARED_HOW, same_core_costs, without_writer_costs
from bench.runs import FixedRateSample
from bench.stack import Target
from bench.report_text import percent, unit_decimals
from bench.results import BenchResults, KIND_TITLES, PINNED_HOW


def throughput_costs(ratios: Sequence[float]) -> list[float]:
    """Throughput ratios (with / without a feature) as the per cent of throughput the feature costs."""
    return [100 * (1 - ratio) for ratio in ratios]


@dataclass(frozen=True)
class Check:
    """One target of issue #9 against what was measured.

    `samples` are the same measure taken once per round (per pair for the logging cost). On this
    shared machine a single run's median can land on either side of a goal, so the verdict also
    asks whether the goal lies outside the confidence interval of the samples' median.
    """

    goal: str
    kind: str
    measured: float
    limit: float
    unit: str
    at_most: bool
    samples: tuple[float, ...] = ()

    @property
    def met(self) -> bool | None:
        """True/False by the point estimate, or None when nothing was measured."""
        if math.isnan(self.measured):
            return None
        return self._meets(self.measured)

    def _meets(self, value: float) -> bool:
        return value <= self.limit if self.at_most else value >= self.limit

    @cached_property
    def interval(self) -> tuple[float, float] | None:
        """The distribution-free interval (at CONFIDENCE) of the samples' median; None with fewer than 5 samples.

        `scipy.stats.quantile_test`'s interval rests on order statistics only (no normality, no
        equal variances), which suits latency percentiles and throughput ratios; with 5 rounds it
        is the rounds' range, whose coverage is 1 − 2 / 2⁵ = 94 %; with 8 (the fixed-rate runs') it
        runs from the second lowest to the second highest, 1 − 2 · 9 / 2⁸ = 93 %.
        """
        return median_interval(self.samples)

    @property
    def established(self) -> bool:
        """Whether the whole interval lies on one side of the goal (True without an interval: nothing to weigh)."""
        if self.interval is None:
            return True
        low, high = self.interval
        return self._meets(low) == self._meets(high)

    @property
    def verdict(self) -> str:
        """'met', 'missed' or 'not measured'; with ', not established' when the interval straddles the goal."""
        verdict = {True: "met", False: "missed", None: "not measured"}[self.met]
        return verdict if self.met is None or self.established else f"{verdict}, not established"

    @property
    def shortfall(self) -> str:
        """How far off a missed target is ('' when met or unmeasured)."""
        if self.met is not False:
            return ""
        gap = abs(self.measured - self.limit)
        if self.unit == "%":
            return f"{gap:.0f} points " + ("over" if self.at_most else "short")
        ratio = f" ({self.measured / self.limit:.1f}× the limit)" if self.at_most and self.limit > 0 else ""
        return f"{gap:.{unit_decimals(self.unit)}f} {self.unit} " + ("over" if self.at_most else "short") + ratio


# Two-sided, so a bound on the goal's side is a one-sided 95 % statement.
CONFIDENCE = 0.90


def median_interval(samples: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """Distribution-free confidence interval of the median of `samples` (NaN ignored); None with fewer than 5."""
    values = [value for value in samples if not math.isnan(value)]
    if len(values) < 5:
        return None
    bounds = quantile_test(values, q=statistics.median(values), p=0.5).confidence_interval(confidence)
    return float(bounds.low), float(bounds.high)


def added_latency(hop_runs: Sequence[FixedRateSample], direct_runs: Sequence[FixedRateSample],
           percentile: str) -> tuple[float, ...]:
    """Per round: the hop's latency percentile ('p50' or 'p99') − direct calls' in the same round."""
    return tuple(getattr(hop, f"{percentile}_ms") - getattr(plain, f"{percentile}_ms")
                 for hop, plain in zip(hop_runs, direct_runs, strict=False))


def throughput_shares(results: BenchResults, mine: Target | None, theirs: Target | None) -> tuple[float, ...]:
    """Per round: `mine`'s saturation throughput as a % of `theirs`'."""
    return tuple(percent(one.requests_per_second, other.requests_per_second) for one, other in
                 zip(results.saturation_samples(mine), results.saturation_samples(theirs), strict=False))


def evaluate_targets(results: BenchResults) -> list[Check]:
    """Issue #9's targets, per backend kind."""
    checks = []
    for kind in KIND_TITLES:
        direct, balancer, nginx = (results.target(kind, hop) for hop in ("direct", "balancer", "nginx"))
        if balancer is None:
            continue
        def added(percentile: str) -> tuple[float, ...]:
            return added_latency(results.fixed_rate_samples(balancer), results.fixed_rate_samples(direct), percentile)

        def throughput_share(other: Target | None) -> tuple[float, ...]:
            return throughput_shares(results, balancer, other)

        checks += [
            Check("added latency p50 at half saturation (balancer − direct)", kind,
                  results.latency(balancer, "p50") - results.latency(direct, "p50"), 1.0, "ms", True, added("p50")),
            Check("added latency p99 at half saturation (balancer − direct)", kind,
                  results.latency(balancer, "p99") - results.latency(direct, "p99"), 5.0, "ms", True, added("p99")),
            Check("balancer CPU per request, outcome logging + metrics on", kind,
                  results.hop_cpu(balancer), 120.0, "µs", True,
                  tuple(sample.proxy_us_per_request or math.nan for sample in results.saturation_samples(balancer))),
            Check("saturation throughput, balancer / direct", kind,
                  percent(results.rps(balancer), results.rps(direct)), 50.0, "%", False, throughput_share(direct)),
            Check("saturation throughput, balancer / nginx", kind,
                  percent(results.rps(balancer), results.rps(nginx)), 50.0, "%", False, throughput_share(nginx)),
        ]
        pinned_added = added_latency(results.pinned_samples(balancer), results.pinned_samples(direct), "p99")
        if pinned_added:
            checks.append(Check(f"added latency p99 at half saturation, {PINNED_HOW} (balancer − direct)", kind,
                                results.pinned_p99(balancer) - results.pinned_p99(direct), 5.0, "ms", True,
                                pinned_added))
    checks += workers_checks(results)
    checks += priority_checks(results)
    cost = results.logging_cost()
    if results.same_core.get("default"):
        assert cost is not None
        checks.append(Check(f"throughput cost of outcome logging + metrics ({SAME_CORE_HOW})", "noop", cost, 10.0, "%",
                            True, tuple(same_core_costs(results.same_core["default"]))))
        spared = without_writer_costs(results.same_core["default"])
        checks.append(Check(f"throughput cost of outcome logging + metrics ({WRITER_SPARED_HOW})", "noop",
                            statistics.median(spared), 10.0, "%", True, tuple(spared)))
    elif cost is not None:
        how = "back-to-back pairs" if results.cost_ratios else "medians over rounds"
        checks.append(Check(f"throughput cost of outcome logging + metrics ({how})", "noop", cost, 10.0, "%", True,
                            tuple(throughput_costs(results.cost_ratios))))
    adjusted = results.adjusted_cost_ratios()
    if adjusted:
        checks.append(Check("throughput cost of outcome logging + metrics (the same pairs, steal-adjusted)", "noop",
                            100 * (1 - statistics.median(adjusted)), 10.0, "%", True,
                            tuple(throughput_costs(adjusted))))
    return checks


def workers_checks(results: BenchResults) -> list[Check]:
    """The same targets for the balancer with `workers` processes (nginx: as many workers), no-op backends."""
    balancer, nginx = results.workers_targets()
    direct = results.target("noop", "direct")
    if balancer is None or not results.workers_samples(balancer):
        return []
    label = f"{results.workers} workers"

    def added(percentile: str) -> tuple[float, ...]:
        return added_latency(results.workers_samples(balancer), results.workers_samples(direct), percentile)

    def share(other: Target | None) -> tuple[float, ...]:
        return throughput_shares(results, balancer, other)

    return [
        Check(f"added latency p50 at half saturation, {label} (balancer − direct)", "noop",
              results.workers_latency(balancer, "p50") - results.workers_latency(direct, "p50"), 1.0, "ms", True,
              added("p50")),
        Check(f"added latency p99 at half saturation, {label} (balancer − direct)", "noop",
              results.workers_latency(balancer, "p99") - results.workers_latency(direct, "p99"), 5.0, "ms", True,
              added("p99")),
        Check(f"balancer CPU per request, {label}", "noop", results.hop_cpu(balancer), 120.0, "µs", True,
              tuple(sample.proxy_us_per_request or math.nan for sample in results.saturation_samples(balancer))),
        Check(f"saturation throughput, balancer / direct, {label}", "noop",
              percent(results.rps(balancer), results.rps(direct)), 50.0, "%", False, share(direct)),
        Check(f"saturation throughput, balancer / nginx, {label} each", "noop",
              percent(results.rps(balancer), results.rps(nginx)), 50.0, "%", False, share(nginx)),
    ]


def priority_checks(results: BenchResults) -> list[Check]:
    """The tail target for the balancer at niceness `priority` (the same fixed-rate rounds as the default's)."""
    balancer, direct = results.priority_target("balancer"), results.target("noop", "direct")
    if results.priority is None or balancer is None or not results.fixed_rate_samples(balancer):
        return []
    return [Check(f"added latency p99 at half saturation, `server.priority: {results.priority}` (balancer − direct)",
                  "noop", results.latency(balancer, "p99") - results.latency(direct, "p99"), 5.0, "ms", True,
                  added_latency(results.fixed_rate_samples(balancer), results.fixed_rate_samples(direct), "p99"))]
