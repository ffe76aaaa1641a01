"""BENCHMARKS.md from one run's samples: tables per backend kind, feature cost, targets, profile."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from datetime import datetime

from scipy.stats import quantile_test, spearmanr

from bench.cold_start import summarize as summarize_cold_start
from bench.instructions import FLUSH_EVERY, LONG_RUN, REPEATS, SHORT_RUN, WRITER
from bench.loop_stalls import STALL_S, WRITERS, Stalls
from bench import perf_profile
from bench.perf_profile import KERNEL, PerfProfile
from bench.profile import SAMPLE_RATE_HZ, Profile
from bench.report_cost import SAME_CORE_HOW, WRITER_SPARED_HOW, same_core_costs, same_core_paragraph, without_writer_costs
from bench.runs import FixedRateSample, SaturationSample, Settings, median
from bench import tail_episodes
from bench.tail_episodes import TailRun, episode_shares
from bench.same_core import SameCorePair
from bench.stack import (
    AIOHTTP_FLOOR_LABEL,
    ASYNCIO_LABEL,
    FEATURE_BASELINE,
    FLOOR_LABEL,
    INTERPRETED_ASYNCIO_LABEL,
    INTERPRETED_LABEL,
    Target,
)

KIND_TITLES = {"noop": "No-op backends", "model": "Real model servers"}
PINNED_HOW = "the hop on a CPU of its own"
# Linux's CFS weight of each niceness from -20 to 19 (kernel/sched/core.c, sched_prio_to_weight)
NICE_WEIGHTS = dict(zip(range(-20, 20), (
    88761, 71755, 56483, 46273, 36291, 29154, 23254, 18705, 14949, 11916, 9548, 7620, 6100, 4904, 3906, 3121, 2501,
    1991, 1586, 1277, 1024, 820, 655, 526, 423, 335, 272, 215, 172, 137, 110, 87, 70, 56, 45, 36, 29, 23, 18, 15),
    strict=True))
PROFILE_PLACEHOLDER = (
    "_Not recorded in this run._ `make bench BENCH_ARGS=--profile` samples the balancer with py-spy at "
    "saturation (no-op backends) and fills this section with its top self-time frames.\n\n"
    "The section below, \"What bounds the balancer\", splits its CPU without a profiler."
)


@dataclass
class BenchResults:
    """Everything one run measured, plus what is needed to say how."""

    settings: Settings
    quick: bool
    targets: list[Target]
    saturation: dict[str, list[SaturationSample]]
    fixed_rate: dict[str, list[FixedRateSample]]
    rates: dict[str, float]
    machine: dict[str, str]
    load_before: str
    load_after: str
    started: datetime
    seconds: float
    commands: dict[str, str]
    profile: Profile | None = None
    profile_error: str | None = None
    report_requests: int = 0  # rows in the synthetic store the report was timed on
    report_seconds: float | None = None  # best wall-clock seconds of build_report over it
    instructions: dict[str, float] | None = None  # bench/instructions.py: kind -> instructions per request
    instructions_error: str | None = None
    loop_stalls: list[Stalls] = field(default_factory=list)  # bench/loop_stalls.py, one run per writer placement
    cost_ratios: list[float] = field(default_factory=list)  # default / outcomes and metrics off, back-to-back pairs
    perf_profiles: list[PerfProfile] = field(default_factory=list)  # bench/perf_profile.py: the balancer, then nginx
    perf_error: str | None = None
    cost_steal: list[tuple[float, float]] = field(default_factory=list)  # per pair: steal during default's, lean's run
    feature_labels: list[str] = field(default_factory=list)
    # bench/same_core.py: feature configuration label -> its runs at once with outcomes and metrics off
    same_core: dict[str, list[SameCorePair]] = field(default_factory=dict)
    # fixed-rate runs of the no-op paths with the hop's processes on one CPU, the client and backends on the other
    fixed_rate_pinned: dict[str, list[FixedRateSample]] = field(default_factory=dict)
    # bench/cold_start.py: per fresh balancer, its consecutive fixed-rate windows from the moment it was ready
    cold_start: list[list[FixedRateSample]] = field(default_factory=list)
    cold_start_window_s: float = 1.0
    # server.workers: the balancer with `workers` processes and nginx with as many, no-op backends; their
    # fixed-rate runs (with direct calls) at `workers_rate`, half that balancer's saturation rate
    workers: int = 0
    workers_rate: float | None = None
    workers_fixed_rate: dict[str, list[FixedRateSample]] = field(default_factory=dict)
    # the balancer (server.priority) and nginx (worker_priority) at niceness `priority`, no-op backends, in the
    # fixed-rate rounds above (None, []: not measured, e.g. without CAP_SYS_NICE)
    priority: int | None = None
    priority_targets: list[Target] = field(default_factory=list)
    # bench/tail_episodes.py: traced fixed-rate runs of the no-op balancer and nginx, interleaved
    tail_runs: list[TailRun] = field(default_factory=list)

    def target(self, kind: str, hop: str, label: str = "") -> Target | None:
        """The target of `kind` and `hop` ('balancer' with a label for the feature-cost variants)."""
        name = f"{kind} {hop}" + (f" ({label})" if label and label != "default" else "")
        return next((target for target in self.targets if target.name == name), None)

    def logging_cost(self) -> float | None:
        """Throughput lost to outcome logging + metrics, in %: from the same-core pairs, else the back-to-back
        pairs (results from before them), else the rounds' medians."""
        if self.same_core.get("default"):
            return statistics.median(same_core_costs(self.same_core["default"]))
        if self.cost_ratios:
            return 100 * (1 - statistics.median(self.cost_ratios))
        return self.round_logging_cost()

    def adjusted_cost_ratios(self) -> list[float]:
        """The pairs' ratios of steal-adjusted throughput (`SaturationSample.steal_adjusted_rps`); none without steal."""
        if len(self.cost_steal) != len(self.cost_ratios):
            return []
        return [ratio * (1 - lean) / (1 - full) for ratio, (full, lean) in zip(self.cost_ratios, self.cost_steal)
                if not (math.isnan(full) or math.isnan(lean))]

    def round_logging_cost(self) -> float | None:
        """The same from the medians over rounds of the two configurations (None if either was not run)."""
        full, lean = self.target("noop", "balancer"), self.target("noop", "balancer", FEATURE_BASELINE)
        if full is None or lean is None:
            return None
        return 100 - _percent(self.rps(full), self.rps(lean))

    def rps(self, target: Target | None) -> float:
        """Median saturation throughput."""
        return self._median_saturation(target, lambda sample: sample.requests_per_second)

    def hop_cpu(self, target: Target | None) -> float:
        """Median CPU µs per request of the hop's processes."""
        return self._median_saturation(target, lambda sample: sample.proxy_us_per_request)

    def saturation_busy(self, target: Target | None) -> float:
        """Median share of one core the hop's processes used at saturation."""
        return self._median_saturation(target, lambda sample: sample.proxy_busy)

    def machine_cpu(self, target: Target | None) -> float:
        """Median CPU µs per request of the whole machine (every process, kernel included) at saturation."""
        return self._median_saturation(target, lambda sample: sample.machine_us_per_request)

    def machine_busy(self, target: Target | None) -> float:
        """Median number of cores' worth of work the machine ran at saturation."""
        return self._median_saturation(target, lambda sample: sample.machine_busy_cores)

    def writer_cpu(self, target: Target | None) -> float:
        """Median CPU µs per request of a balancer's store writer process."""
        return self._median_saturation(target, lambda sample: sample.writer_us_per_request)

    def hop_kernel_cpu(self, target: Target | None) -> float:
        """Median kernel CPU µs per request of the hop's processes."""
        return self._median_saturation(target, lambda sample: sample.proxy_kernel_us_per_request)

    def hop_kernel_share(self, target: Target | None) -> float:
        """Median fraction of the hop's CPU spent in the kernel."""
        return self._median_saturation(target, lambda sample: sample.proxy_system_share)

    def backend_cpu(self, target: Target | None) -> float:
        """Median CPU µs per request of both backends."""
        return self._median_saturation(target, lambda sample: sample.backend_us_per_request)

    def latency(self, target: Target | None, percentile: str) -> float:
        """Median fixed-rate latency ('p50' or 'p99') in ms."""
        return self._median_fixed_rate(target, lambda sample: sample.p50_ms if percentile == "p50" else sample.p99_ms)

    def fixed_rate_hop_cpu(self, target: Target | None) -> float:
        """Median CPU µs per request of the hop's processes at the fixed rate."""
        return self._median_fixed_rate(target, lambda sample: sample.proxy_us_per_request)

    def fixed_rate_busy(self, target: Target | None) -> float:
        """Median share of one core the hop's processes used at the fixed rate."""
        return self._median_fixed_rate(target, lambda sample: sample.proxy_busy)

    def pinned_samples(self, target: Target | None) -> list[FixedRateSample]:
        """The fixed-rate runs of `target` with its hop on a CPU of its own, in round order."""
        return self.fixed_rate_pinned.get(target.name, []) if target is not None else []

    def pinned_p99(self, target: Target | None) -> float:
        """Median p99 ms of the target's fixed-rate runs with its hop on a CPU of its own."""
        return median([sample.p99_ms for sample in self.pinned_samples(target)])

    def workers_targets(self) -> tuple[Target | None, Target | None]:
        """The balancer with `workers` processes and nginx with as many workers (None if not run)."""
        label = f"{self.workers} workers"
        return self.target("noop", "balancer", label), self.target("noop", "nginx", label)

    def workers_samples(self, target: Target | None) -> list[FixedRateSample]:
        """The target's runs at `workers_rate` in round order."""
        return self.workers_fixed_rate.get(target.name, []) if target is not None else []

    def workers_latency(self, target: Target | None, percentile: str) -> float:
        """Median latency ('p50' or 'p99') in ms at `workers_rate`."""
        return median([sample.p50_ms if percentile == "p50" else sample.p99_ms for sample in self.workers_samples(target)])

    def fixed_rate_queued(self, target: Target | None) -> float:
        """Median share of a fixed-rate run's requests that waited in the client for a free connection."""
        return self._median_fixed_rate(target, lambda sample: sample.queued_share)

    def fixed_rate_wait(self, target: Target | None) -> float:
        """Median share of a fixed-rate run the hop's serving threads spent runnable, waiting for a CPU."""
        return self._median_fixed_rate(target, lambda sample: sample.proxy_wait_share)

    def priority_target(self, hop: str) -> Target | None:
        """The no-op balancer or nginx run at niceness `priority` (None if not measured)."""
        return next((target for target in self.priority_targets if target.hop == hop), None)

    def fixed_rate_samples(self, target: Target | None) -> list[FixedRateSample]:
        """The target's fixed-rate runs in round order (none for a target not run)."""
        return self.fixed_rate.get(target.name, []) if target is not None else []

    def saturation_samples(self, target: Target | None) -> list[SaturationSample]:
        """The target's saturation runs in round order (none for a target not run)."""
        return self.saturation.get(target.name, []) if target is not None else []

    def _median_fixed_rate(self, target: Target | None, value: Callable[[FixedRateSample], float | None]) -> float:
        return median([value(sample) for sample in self.fixed_rate_samples(target)])

    def _median_saturation(self, target: Target | None, value: Callable[[SaturationSample], float | None]) -> float:
        return median([value(sample) for sample in self.saturation_samples(target)])


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
        return f"{gap:.{_decimals(self.unit)}f} {self.unit} " + ("over" if self.at_most else "short") + ratio


# Two-sided, so a bound on the goal's side is a one-sided 95 % statement.
CONFIDENCE = 0.90


def median_interval(samples: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """Distribution-free confidence interval of the median of `samples` (NaN ignored); None with fewer than 5."""
    values = [value for value in samples if not math.isnan(value)]
    if len(values) < 5:
        return None
    bounds = quantile_test(values, q=statistics.median(values), p=0.5).confidence_interval(confidence)
    return float(bounds.low), float(bounds.high)


def _added(hop_runs: Sequence[FixedRateSample], direct_runs: Sequence[FixedRateSample],
           percentile: str) -> tuple[float, ...]:
    """Per round: the hop's latency percentile ('p50' or 'p99') − direct calls' in the same round."""
    return tuple(getattr(hop, f"{percentile}_ms") - getattr(plain, f"{percentile}_ms")
                 for hop, plain in zip(hop_runs, direct_runs, strict=False))


def _throughput_shares(results: BenchResults, mine: Target | None, theirs: Target | None) -> tuple[float, ...]:
    """Per round: `mine`'s saturation throughput as a % of `theirs`'."""
    return tuple(_percent(one.requests_per_second, other.requests_per_second) for one, other in
                 zip(results.saturation_samples(mine), results.saturation_samples(theirs), strict=False))


def evaluate_targets(results: BenchResults) -> list[Check]:
    """Issue #9's targets, per backend kind."""
    checks = []
    for kind in KIND_TITLES:
        direct, balancer, nginx = (results.target(kind, hop) for hop in ("direct", "balancer", "nginx"))
        if balancer is None:
            continue
        def added(percentile: str) -> tuple[float, ...]:
            return _added(results.fixed_rate_samples(balancer), results.fixed_rate_samples(direct), percentile)

        def throughput_share(other: Target | None) -> tuple[float, ...]:
            return _throughput_shares(results, balancer, other)

        checks += [
            Check("added latency p50 at half saturation (balancer − direct)", kind,
                  results.latency(balancer, "p50") - results.latency(direct, "p50"), 1.0, "ms", True, added("p50")),
            Check("added latency p99 at half saturation (balancer − direct)", kind,
                  results.latency(balancer, "p99") - results.latency(direct, "p99"), 5.0, "ms", True, added("p99")),
            Check("balancer CPU per request, outcome logging + metrics on", kind,
                  results.hop_cpu(balancer), 120.0, "µs", True,
                  tuple(sample.proxy_us_per_request or math.nan for sample in results.saturation_samples(balancer))),
            Check("saturation throughput, balancer / direct", kind,
                  _percent(results.rps(balancer), results.rps(direct)), 50.0, "%", False, throughput_share(direct)),
            Check("saturation throughput, balancer / nginx", kind,
                  _percent(results.rps(balancer), results.rps(nginx)), 50.0, "%", False, throughput_share(nginx)),
        ]
        pinned_added = _added(results.pinned_samples(balancer), results.pinned_samples(direct), "p99")
        if pinned_added:
            checks.append(Check(f"added latency p99 at half saturation, {PINNED_HOW} (balancer − direct)", kind,
                                results.pinned_p99(balancer) - results.pinned_p99(direct), 5.0, "ms", True,
                                pinned_added))
    checks += _workers_checks(results)
    checks += _priority_checks(results)
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
                            tuple(_costs(results.cost_ratios))))
    adjusted = results.adjusted_cost_ratios()
    if adjusted:
        checks.append(Check("throughput cost of outcome logging + metrics (the same pairs, steal-adjusted)", "noop",
                            100 * (1 - statistics.median(adjusted)), 10.0, "%", True,
                            tuple(_costs(adjusted))))
    return checks


def _workers_checks(results: BenchResults) -> list[Check]:
    """The same targets for the balancer with `workers` processes (nginx: as many workers), no-op backends."""
    balancer, nginx = results.workers_targets()
    direct = results.target("noop", "direct")
    if balancer is None or not results.workers_samples(balancer):
        return []
    label = f"{results.workers} workers"

    def added(percentile: str) -> tuple[float, ...]:
        return _added(results.workers_samples(balancer), results.workers_samples(direct), percentile)

    def share(other: Target | None) -> tuple[float, ...]:
        return _throughput_shares(results, balancer, other)

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
              _percent(results.rps(balancer), results.rps(direct)), 50.0, "%", False, share(direct)),
        Check(f"saturation throughput, balancer / nginx, {label} each", "noop",
              _percent(results.rps(balancer), results.rps(nginx)), 50.0, "%", False, share(nginx)),
    ]


def _priority_checks(results: BenchResults) -> list[Check]:
    """The tail target for the balancer at niceness `priority` (the same fixed-rate rounds as the default's)."""
    balancer, direct = results.priority_target("balancer"), results.target("noop", "direct")
    if results.priority is None or balancer is None or not results.fixed_rate_samples(balancer):
        return []
    return [Check(f"added latency p99 at half saturation, `server.priority: {results.priority}` (balancer − direct)",
                  "noop", results.latency(balancer, "p99") - results.latency(direct, "p99"), 5.0, "ms", True,
                  _added(results.fixed_rate_samples(balancer), results.fixed_rate_samples(direct), "p99"))]


def _priority_section(results: BenchResults) -> str:
    """The default balancer and nginx against both at niceness `priority`, in the same fixed-rate rounds."""
    direct, full, nginx = (results.target("noop", hop) for hop in ("direct", "balancer", "nginx"))
    ahead, nginx_ahead = results.priority_target("balancer"), results.priority_target("nginx")
    if results.priority is None or direct is None or ahead is None or not results.fixed_rate_samples(ahead):
        return ""
    niceness = results.priority
    rows = []
    for label, target in (("balancer", full), (f"balancer, `server.priority: {niceness}`", ahead), ("nginx", nginx),
                          (f"nginx, `worker_priority {niceness}`", nginx_ahead)):
        runs = results.fixed_rate_samples(target)
        if target is None or not runs:
            continue
        rows.append(
            f"| {label} | {_number(results.latency(target, 'p99'), 2)} "
            f"| {_signed(results.latency(target, 'p99') - results.latency(direct, 'p99'))} "
            f"| {', '.join(_number(sample.p99_ms, 1) for sample in runs)} "
            f"| {_number(100 * results.fixed_rate_busy(target), 0)} % | {_share(results.fixed_rate_wait(target))} "
            f"| {_share(results.fixed_rate_queued(target))} |\n")
    return (
        f"## Ahead of the backends on shared cores (`server.priority: {niceness}`)\n\n"
        f"The fixed-rate rounds of the no-op backends ({results.rates.get('noop', math.nan):.0f} req/s, cores shared) "
        f"also ran the balancer with `server.priority: {niceness}` and nginx with `worker_priority {niceness}`: the "
        "hop at that niceness, the backends and the load generator at 0. Linux's scheduler then weighs the hop's "
        f"threads {NICE_WEIGHTS[niceness]:,} against their 1,024 (`sched_prio_to_weight`): a woken hop gets a CPU "
        "ahead of them and keeps it for its turn.\n\n"
        "| path | p99 ms | added p99 ms | each round's p99 ms | busy | waited for a CPU | queued |\n"
        "|---|---|---|---|---|---|---|\n" + "".join(rows)
        + "\n\"Waited\" (for a CPU) and \"queued\" (in the client, for a connection) are explained under \"What bounds "
        "the tail latency\". `python -m bench.compare --base HEAD --method latency --cores shared --priority "
        f"{niceness}` compares the two balancers alone, in pairs of runs.\n"
    )


def _workers_section(results: BenchResults) -> str:
    balancer, nginx = results.workers_targets()
    direct = results.target("noop", "direct")
    one = results.target("noop", "balancer")
    if balancer is None or nginx is None or direct is None or not results.workers_samples(balancer):
        return ""
    label = f"{results.workers} workers"
    rate = results.workers_rate or math.nan
    rows = []
    for name, target in ((f"balancer, {label}", balancer), (f"nginx, {label}", nginx), ("direct", direct)):
        runs = results.workers_samples(target)
        busy = median([sample.proxy_busy for sample in runs])
        rows.append(
            f"| {name} | {_number(results.rps(target), 0)} | "
            f"{'—' if target is direct else _ratio(results.rps(target), results.rps(direct))} "
            f"| {_number(results.workers_latency(target, 'p50'), 2)} | {_number(results.workers_latency(target, 'p99'), 2)} "
            f"| {'—' if target is direct else _signed(results.workers_latency(target, 'p50') - results.workers_latency(direct, 'p50'))} "
            f"| {'—' if target is direct else _signed(results.workers_latency(target, 'p99') - results.workers_latency(direct, 'p99'))} "
            f"| {'—' if target is direct else _cpu(results.hop_cpu(target), results.hop_kernel_share(target))} "
            f"| {'—' if target is direct else f'{busy * 100:.0f} %'} "
            f"| {', '.join(f'{sample.p99_ms:.1f}' for sample in runs)} |\n")
    return (
        f"## Several worker processes (`server.workers: {results.workers}`)\n\n"
        f"One balancer process serves what one core gives it. With `server.workers: {results.workers}` "
        "(`balancer/supervisor.py`) that many processes listen on the public port with SO_REUSEPORT, each with "
        "its own outcome-log writer, under a supervisor that serves the admin port (metrics summed over the "
        f"workers). Compared here with nginx at `worker_processes {results.workers}` (`listen ... reuseport`), "
        "no-op backends; saturation runs in the same interleaved rounds as above, then fixed-rate rounds at half "
        f"this balancer's own median saturation rate ({rate:.0f} req/s), direct calls included, interleaved. "
        "Hop CPU counts the supervisor, every worker and their store writers.\n\n"
        "| path | req/s at saturation | vs direct | p50 ms | p99 ms | added p50 ms | added p99 ms "
        "| hop CPU µs/req (kernel share) | busy at the fixed rate | each round's p99 ms |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n" + "".join(rows) +
        f"\n- balancer with {label} / with one process, saturation: **{_ratio(results.rps(balancer), results.rps(one))}**; "
        f"/ nginx with {label}: **{_ratio(results.rps(balancer), results.rps(nginx))}**\n")


def render_report(results: BenchResults) -> str:
    """The whole BENCHMARKS.md."""
    settings = results.settings
    mode = "`--quick` smoke run" if results.quick else "full run"
    parts = [
        "# Benchmarks\n",
        f"Generated by `make bench` (`.venv/bin/python -m bench{' --quick' if results.quick else ''}"
        f"{' --profile' if results.profile or results.profile_error else ''}`) on "
        f"{results.started:%Y-%m-%d %H:%M} UTC in {results.seconds / 60:.1f} min: {mode}, "
        f"{settings.rounds} interleaved round{'s' if settings.rounds > 1 else ''}"
        + ("" if settings.fixed_rate_rounds == settings.rounds else
           f" ({settings.fixed_rate_rounds} for the fixed-rate runs of the tables by backend kind)")
        + ", every figure the median over rounds "
        "unless marked. Numbers from a loaded machine are only comparable within the run (see the load average).\n",
        _machine_section(results),
        _method_section(results),
        *(_kind_section(results, kind) for kind in KIND_TITLES if results.target(kind, "balancer")),
        _workers_section(results),
        _priority_section(results),
        _feature_section(results),
        _targets_section(results),
        _bounds_section(results),
        _direct_bound_section(results),
        _perf_section(results),
        _tail_section(results),
        _episodes_section(results),
        _cold_start_section(results),
        _instructions_section(results),
        _stalls_section(results),
        _profile_section(results),
        _report_section(results),
        _raw_section(results),
    ]
    return "\n".join(part for part in parts if part).rstrip() + "\n"


def _machine_section(results: BenchResults) -> str:
    rows = [*results.machine.items(), ("load average at start (1 / 5 / 15 min)", results.load_before),
            ("load average at end (1 / 5 / 15 min)", results.load_after)]
    cores = results.machine.get("nproc", "?").split()[0]
    return ("## Machine\n\n| | |\n|---|---|\n" + "".join(f"| {name} | {value} |\n" for name, value in rows)
            + f"\nA load average well above the core count ({cores}) means other work shared the CPUs: absolute "
            "figures are then low and noisy, while ratios between interleaved configurations hold up better.\n")


def _method_section(results: BenchResults) -> str:
    settings = results.settings
    commands = "".join(f"- {what}:\n  `{command}`\n" for what, command in results.commands.items())
    rates = ", ".join(f"{kind} {rate:.0f} req/s" for kind, rate in results.rates.items())
    return f"""## Method

Every process runs on loopback, started by the harness (`bench/stack.py`): two backends per kind (one per
variant; `tests/noop_backend.py` on uvloop, or the real `model_a` / `model_b` servers), a balancer per
configuration and one nginx per kind. On uvloop a no-op backend costs about a quarter less CPU per request at the
fixed rate than on asyncio's loop (`python -m bench.backend_cost`), CPU the hop and the client then have. Three paths per kind:

- **direct**: the load generator talks to both backends itself, half the connections each;
- **balancer**: `python -m balancer serve`, one process, sticky 50/50 on `X-User-ID`, outcome log and metrics on;
- **nginx**: one worker (`worker_processes 1`, like the balancer's one process), `split_clients` 50/50 on
  `$http_x_user_id`, upstream keep-alive, `access_log off`, the same request/response headers added
  (`bench/nginx.conf.template`).

Every request is `POST /predict` with the first held-out row (`{{"instances": [[30 floats]]}}`) and an
`X-User-ID` cycling over {settings.users} users.

- **Saturation** (closed loop): `wrk -t {settings.threads} -c {settings.connections} -d {settings.saturation_s:g}s`
  with `bench/post.lua`; requests/s as wrk counts them.
- **Fixed rate** (open loop) at half the balancer's median saturation rate of the same kind ({rates}):
  `python -m bench.openloop`, a small C client (`bench/openloop.c`, compiled on first use: one thread,
  epoll, non-blocking keep-alive sockets, {settings.rate_connections} connections, {settings.warmup_s:g} s
  warm-up then {settings.fixed_rate_s:g} s measured). Debian has no `wrk2` and wrk cannot hold a rate, so
  this client schedules request *i* at *start + i / rate* and sleeps to the microsecond until it is due;
  latency runs from dispatch to the kernel's receive timestamp of the answer's last byte (so the client's
  own scheduling delays stay out of it), and time spent waiting for a free connection counts (no
  coordinated omission). The client's own timer lateness and CPU are reported separately (raw runs below).
- **Added latency** of a hop = its median percentile − direct's median percentile at the same rate.
- **CPU per request** = user + system seconds of the hop's processes (`/proc/<pid>/stat` utime + stime, all
  threads; nginx = master + worker) over a saturation run ÷ the requests wrk completed in it; the kernel
  share is stime's part (on loopback a `send` also runs the receiver's TCP work). "backends" is both
  backends' CPU on the same scale.
- **Interleaving**: each round runs every configuration once, starting one further along each round;
  {settings.pause_s:g} s pause between runs. Saturation rounds first, then {settings.fixed_rate_rounds} fixed-rate
  rounds.

Command lines of this run (ports and temp paths vary):

{commands}"""


def _kind_section(results: BenchResults, kind: str) -> str:
    direct, balancer, nginx = (results.target(kind, hop) for hop in ("direct", "balancer", "nginx"))
    rate = results.rates.get(kind, float("nan"))
    header = ("| path | req/s at saturation (min–max) | vs direct | p50 ms | p99 ms | added p50 ms | added p99 ms "
              "| hop CPU µs/req (kernel share) | backends CPU µs/req | errors |\n"
              "|---|---|---|---|---|---|---|---|---|---|\n")
    rows = []
    for target in (direct, balancer, nginx):
        if target is None:
            continue
        samples = results.saturation.get(target.name, [])
        spread = [sample.requests_per_second for sample in samples]
        errors = sum(sample.errors for sample in samples) + sum(
            sample.errors for sample in results.fixed_rate.get(target.name, []))
        is_direct = target is direct
        rows.append(
            f"| {target.hop} | {_number(results.rps(target), 0)} ({_range(spread)}) "
            f"| {'—' if is_direct else _ratio(results.rps(target), results.rps(direct))} "
            f"| {_number(results.latency(target, 'p50'), 2)} | {_number(results.latency(target, 'p99'), 2)} "
            f"| {'—' if is_direct else _signed(results.latency(target, 'p50') - results.latency(direct, 'p50'))} "
            f"| {'—' if is_direct else _signed(results.latency(target, 'p99') - results.latency(direct, 'p99'))} "
            f"| {'—' if is_direct else _cpu(results.hop_cpu(target), results.hop_kernel_share(target))} "
            f"| {_number(results.backend_cpu(target), 0)} | {errors} |\n")
    summary = (
        f"\n- balancer / direct throughput: **{_ratio(results.rps(balancer), results.rps(direct))}**; "
        f"balancer / nginx: **{_ratio(results.rps(balancer), results.rps(nginx))}**\n"
        f"- CPU per proxied request: balancer **{_number(results.hop_cpu(balancer), 0)} µs**, nginx "
        f"**{_number(results.hop_cpu(nginx), 0)} µs** ({_ratio(results.hop_cpu(balancer), results.hop_cpu(nginx))}); "
        f"in user space {_number(results.hop_cpu(balancer) - results.hop_kernel_cpu(balancer), 0)} µs vs "
        f"{_number(results.hop_cpu(nginx) - results.hop_kernel_cpu(nginx), 0)} µs, in the kernel "
        f"{_number(results.hop_kernel_cpu(balancer), 0)} µs vs {_number(results.hop_kernel_cpu(nginx), 0)} µs\n"
        f"- hop latency added at {rate:.0f} req/s: balancer p50 {_signed(results.latency(balancer, 'p50') - results.latency(direct, 'p50'))} ms, "
        f"p99 {_signed(results.latency(balancer, 'p99') - results.latency(direct, 'p99'))} ms; nginx p50 "
        f"{_signed(results.latency(nginx, 'p50') - results.latency(direct, 'p50'))} ms, "
        f"p99 {_signed(results.latency(nginx, 'p99') - results.latency(direct, 'p99'))} ms\n")
    return (f"## {KIND_TITLES[kind]}\n\nLatency columns: fixed rate {rate:.0f} req/s (half the balancer's saturation "
            f"rate). Throughput and CPU: saturation.\n\n" + header + "".join(rows) + summary)


def _feature_section(results: BenchResults) -> str:
    lean = results.target("noop", "balancer", FEATURE_BASELINE)
    full = results.target("noop", "balancer")
    if lean is None or full is None:
        return "## Feature cost on the hot path\n\n_Not measured in this run._\n"
    rows = []
    for label in results.feature_labels:
        target = results.target("noop", "balancer", label)
        if target is None:
            continue
        rows.append(
            f"| {label} | {_number(results.rps(target), 0)} | {_signed(_percent(results.rps(target), results.rps(lean)) - 100, 1)} % "
            f"| {_number(results.hop_cpu(target), 0)} | {_number(results.writer_cpu(target), 1)} "
            f"| {_signed(results.hop_cpu(target) - results.hop_cpu(lean), 0)} "
            f"| {_number(results.machine_cpu(target), 0)} |\n")
    random = results.target("noop", "balancer", "random")
    lines = [f"\nIn the rounds above (medians), outcome logging + metrics cost "
             f"{_number(results.round_logging_cost() or 0.0, 1)} % of throughput and "
             f"{_signed(results.hop_cpu(full) - results.hop_cpu(lean), 0)} µs of balancer CPU per request "
             f"(the balancer's process and its store writer's; the writer alone ran {_number(results.writer_cpu(full), 1)} "
             f"µs per request); the whole machine's CPU per request, load generator and backends included, differed by "
             f"{_signed(results.machine_cpu(full) - results.machine_cpu(lean), 0)} µs "
             f"({_signed(_percent(results.machine_cpu(full), results.machine_cpu(lean)) - 100, 1)} %).\n"]
    if results.same_core.get("default"):
        check = next(check for check in evaluate_targets(results) if SAME_CORE_HOW in check.goal)
        lines.insert(0, same_core_paragraph(results.same_core, results.settings, check.interval))
    elif results.cost_ratios:
        costs = sorted(_costs(results.cost_ratios))
        settings = results.settings
        lines.insert(0, f"\n**Outcome logging + metrics cost {_number(results.logging_cost() or 0.0, 1)} % of throughput** "
                        f"(target < 10 %): the median over {len(costs)} back-to-back pairs of {settings.cost_pair_s:g}-second "
                        f"saturation runs, default and {FEATURE_BASELINE}, alternating which goes first (the pairs ranged "
                        f"from {_number(costs[0], 1)} % to {_number(costs[-1], 1)} %). A pair runs seconds apart, so "
                        "it shares the machine's conditions, while rounds are a minute apart.\n")
        adjusted = sorted(_costs(results.adjusted_cost_ratios()))
        if adjusted:
            steal = sorted(100 * share for pair in results.cost_steal for share in pair)
            lines.insert(1, f"\nThe hypervisor took {_number(steal[0], 1)} % to {_number(steal[-1], 1)} % of the machine's "
                            "CPU time during these runs (steal, `/proc/stat`), and not evenly between the two runs of a pair. "
                            "Divided by the share it left (requests/s ÷ (1 − steal): at saturation every core has work, "
                            "so stolen time is time no process of the run could use), the same pairs give "
                            f"**{_number(statistics.median(adjusted), 1)} %**, ranging from {_number(adjusted[0], 1)} % to "
                            f"{_number(adjusted[-1], 1)} %{_spread_comparison(costs, adjusted)}.\n")
    if random is not None:
        lines.append(f"Sticky vs random assignment (both with logging + metrics): sticky "
                     f"{_signed(results.hop_cpu(full) - results.hop_cpu(random), 0)} µs/request, "
                     f"{_signed(_percent(results.rps(full), results.rps(random)) - 100, 1)} % throughput.\n")
    for label, what in ((INTERPRETED_LABEL, "Compiled request path (mypyc) vs interpreted"),
                        (ASYNCIO_LABEL, "uvloop vs asyncio's event loop"),
                        (INTERPRETED_ASYNCIO_LABEL, "Both (the balancer as it ran before them)")):
        other = results.target("noop", "balancer", label)
        if other is not None:
            lines.append(f"{what}: default {_signed(results.hop_cpu(full) - results.hop_cpu(other), 0)} µs/request, "
                         f"{_signed(_percent(results.rps(full), results.rps(other)) - 100, 1)} % throughput.\n")
    return ("## Feature cost on the hot path\n\nNo-op backends, saturation; each configuration is its own balancer "
            "process started from a generated YAML (`server: {record_outcomes, export_metrics}`, `strategy:`), "
            "with `serve --event-loop` and `BALANCER_PURE_PYTHON=1` for the last three. "
            "\"default\" is the sticky balancer of the table above: compiled, on uvloop.\n\n"
            "\"of which store writer\" is the part of the CPU spent in the balancer's store writer process "
            "(`balancer/store_writer.py`, its child), which commits the outcome log; \"machine\" is all cores' busy "
            "time per request, load generator and backends included (see \"What bounds throughput against direct "
            "calls\").\n\n"
            f"| balancer configuration | req/s | vs {FEATURE_BASELINE} | CPU µs/req | of which store writer "
            "| Δ CPU µs/req | machine CPU µs/req |\n"
            "|---|---|---|---|---|---|---|\n" + "".join(rows) + "".join(lines))


def _targets_section(results: BenchResults) -> str:
    rows = []
    for check in evaluate_targets(results):
        decimals = 0 if check.unit in ("µs", "%") else 2
        verdict = check.verdict.replace("missed", "**missed**") if check.established else check.verdict
        comparison = "≤" if check.at_most else "≥"
        interval = ("" if check.interval is None else
                    f"{_number(check.interval[0], decimals)} to {_number(check.interval[1], decimals)} {check.unit} "
                    f"({len(check.samples)})")
        rows.append(f"| {check.goal} | {check.kind} | {_number(check.measured, decimals)} {check.unit} | {interval} "
                    f"| {comparison} {check.limit:g} {check.unit} | {verdict} | {check.shortfall} |\n")
    return ("## Targets\n\n"
            f"\"Interval\": the {100 * CONFIDENCE:.0f} % confidence interval of the median of the measure taken once per round "
            "(per back-to-back pair for the logging cost; their number in brackets), from order statistics only "
            "(`scipy.stats.quantile_test`). On this shared machine one run's median can fall on either side of a "
            "goal, so a verdict stands only when the whole interval is on one side of it (one-sided "
            f"{50 * (1 + CONFIDENCE):.0f} %); otherwise it reads \"not established\".\n\n"
            "| target | backends | measured | interval | goal | verdict | missed by |\n|---|---|---|---|---|---|---|\n"
            + "".join(rows))


def _bounds_section(results: BenchResults) -> str:
    """Where the balancer's CPU per request goes, from targets measured side by side in this run."""
    floor = results.target("noop", "balancer", FLOOR_LABEL)
    aiohttp_floor = results.target("noop", "balancer", AIOHTTP_FLOOR_LABEL)
    lean = results.target("noop", "balancer", FEATURE_BASELINE)
    full = results.target("noop", "balancer")
    nginx = results.target("noop", "nginx")
    if floor is None or aiohttp_floor is None or lean is None or full is None or nginx is None:
        return "## What bounds the balancer\n\n_Not measured in this run._\n"
    floor_cpu, lean_cpu, full_cpu = results.hop_cpu(floor), results.hop_cpu(lean), results.hop_cpu(full)
    aiohttp_cpu, nginx_cpu = results.hop_cpu(aiohttp_floor), results.hop_cpu(nginx)
    floor_kernel = results.hop_kernel_cpu(floor)
    return (
        "## What bounds the balancer\n\n"
        "CPU per proxied request at saturation (no-op backends, median over the rounds above), split by running "
        "beside the balancer two floor processes (`bench/floor_proxy.py`, on uvloop like the balancer): the balancer's "
        "own HTTP server (`balancer/http_server.py`, httptools on `asyncio.Protocol`, compiled like the rest of the "
        "request path) and upstream client, answering from the "
        "upstream connection's callback as the balancer's fast path does, with no assignment, logging, metrics or "
        "header handling; and the same forwarding behind aiohttp's `web.Server`, which the public port ran on "
        "before.\n\n"
        "| layer | CPU µs/request | share of the balancer |\n|---|---|---|\n"
        f"| server + event loop + upstream client (the floor) | {_number(floor_cpu, 0)} | "
        f"{_number(_percent(floor_cpu, full_cpu), 0)} % |\n"
        f"| &nbsp;&nbsp;of which in the kernel (loopback TCP, both sides' work on `send`) | {_number(floor_kernel, 0)} | "
        f"{_number(_percent(floor_kernel, full_cpu), 0)} % |\n"
        f"| proxy logic: ids, assignment, header filtering, response headers | "
        f"{_signed(lean_cpu - floor_cpu, 0)} | {_number(_percent(lean_cpu - floor_cpu, full_cpu), 0)} % |\n"
        f"| outcome log (its store writer process included) + metrics | {_signed(full_cpu - lean_cpu, 0)} | "
        f"{_number(_percent(full_cpu - lean_cpu, full_cpu), 0)} % |\n"
        f"| **balancer** | **{_number(full_cpu, 0)}** | 100 % |\n"
        f"| the floor behind aiohttp's server instead, for comparison | {_number(aiohttp_cpu, 0)} | |\n"
        f"| nginx, for scale | {_number(nginx_cpu, 0)} | |\n\n"
        f"The floor costs {_number(floor_cpu / 120 * 100, 0)} % of the 120 µs target on its own; aiohttp's server "
        f"would cost {_signed(aiohttp_cpu - floor_cpu, 0)} µs more per request. Each request makes two `send` and two "
        "`recv` system calls, as nginx's does; the rest is uvloop, httptools, the compiled request path and the CPython "
        "object machinery (allocation, attribute and dictionary lookups) it still goes through. Several worker processes "
        "(`server.workers`, \"Several worker processes\" above) share the load of one port, not the CPU a request "
        "costs." + _negative_layer_sentence(floor_cpu, lean_cpu, full_cpu) + "\n" + _model_cpu_paragraph(results)
    )


def _negative_layer_sentence(floor_cpu: float, lean_cpu: float, full_cpu: float) -> str:
    """What a layer that came out below zero means ('' when none did)."""
    if not (lean_cpu < floor_cpu or full_cpu < lean_cpu):
        return ""
    return (" A layer below zero is not a saving: these are separate processes, each measured in its own saturation "
            "runs, whose CPU per request moved more between rounds than that layer costs. \"Instructions per "
            "request\" below splits the same layers with counts the machine cannot move.")


def _spread_comparison(raw: list[float], adjusted: list[float]) -> str:
    """How the steal adjustment changed the pairs' interquartile range ('' with fewer than 4 pairs)."""
    if len(raw) < 4 or len(adjusted) < 4:
        return ""
    def iqr(values: list[float]) -> float:
        low, _, high = statistics.quantiles(values, n=4)
        return high - low
    before, after = iqr(raw), iqr(adjusted)
    finding = ("steal explains part of the spread between pairs" if after < 0.75 * before
               else "steal explains little of the spread between pairs")
    return f" (interquartile range {after:.1f} points, against {before:.1f} unadjusted: {finding})"


def _direct_bound_section(results: BenchResults) -> str:
    """Throughput against direct calls, as CPU per request of the whole machine times how busy its cores were."""
    title = "## What bounds throughput against direct calls\n\n"
    rows, sentences = [], []
    for kind, kind_title in KIND_TITLES.items():
        direct, balancer, nginx = (results.target(kind, hop) for hop in ("direct", "balancer", "nginx"))
        if direct is None or balancer is None or nginx is None or math.isnan(results.machine_cpu(direct)):
            continue
        direct_cpu, direct_busy, direct_rps = results.machine_cpu(direct), results.machine_busy(direct), results.rps(direct)
        for target in (direct, balancer, nginx):
            cpu, busy = results.machine_cpu(target), results.machine_busy(target)
            rows.append(f"| {kind_title} | {target.hop} | {_number(results.rps(target), 0)} | {_number(cpu, 0)} "
                        f"| {_number(busy, 2)} | {_number(direct_cpu / cpu, 2)}× | {_number(busy / direct_busy, 2)}× "
                        f"| {_number(results.rps(target) / direct_rps, 2)}× |\n")
        if kind == "noop":
            balancer_cpu = results.machine_cpu(balancer)
            sentences.append(
                f"With the no-op backends a direct call cost the machine {_number(direct_cpu, 0)} µs of CPU and a call "
                f"through the balancer {_number(balancer_cpu, 0)} µs ({_number(balancer_cpu / direct_cpu, 1)}×), "
                f"through nginx {_number(results.machine_cpu(nginx), 0)} µs. Half of direct calls' throughput, with "
                f"the cores as busy as direct calls kept them, needs a path of at most {_number(2 * direct_cpu, 0)} µs "
                "per request, load generator and backends included: less than nginx's path costs here. The goal is "
                "out of reach of any proxy that needs a process of its own on these two shared cores; what the "
                "balancer can still win is its own CPU per request (see above).\n")
    if not rows:
        return title + "_Not measured in this run._\n"
    return (
        title + "At saturation all cores' busy time (`/proc/stat`: every process, the load generator's and the "
        "kernel's work included; idle and stolen time left out) divided by the requests served gives the CPU a "
        "request costs the whole machine on each path. A path's throughput is the cores it keeps busy divided by "
        "that cost, so its share of direct calls' throughput is the product of two factors: direct calls' CPU "
        "per request over the path's, and the cores the path kept busy over those direct calls kept busy (exactly "
        "so in each run; the columns are medians over rounds).\n\n"
        "| backends | path | req/s | machine CPU µs/req | cores busy | CPU factor | busy factor | share of direct "
        "|\n|---|---|---|---|---|---|---|---|\n" + "".join(rows)
        + ("\n" + "".join(sentences) if sentences else "")
    )


def _perf_section(results: BenchResults) -> str:
    """perf's samples of the balancer and nginx at saturation: share per binary, then the heaviest functions."""
    title = "## Where the CPU goes, kernel included (perf)\n\n"
    if not results.perf_profiles:
        return title + (f"_Not recorded in this run: {results.perf_error}._\n" if results.perf_error
                        else "_Not recorded in this run._\n")
    def binaries(profile: PerfProfile) -> str:
        return "; ".join(f"{_binary(binary)} {share:.1f} %" for binary, share in profile.by_binary)

    rows = "".join(f"| {profile.hop} | {profile.kernel_share:.1f} % | {binaries(profile)} |\n"
                   for profile in results.perf_profiles)
    functions = []
    for profile in results.perf_profiles:
        functions.append(f"\n{profile.hop} ({profile.cpu_seconds:.2f} CPU seconds sampled), heaviest functions:\n\n"
                         "| share | binary | function |\n|---|---|---|\n"
                         + "".join(f"| {share:.1f} % | {_binary(binary)} | `{name}` |\n"
                                   for binary, name, share in profile.top_functions))
    return (
        title + f"`perf record -e cpu-clock -F {perf_profile.SAMPLE_RATE_HZ}` on the hop's processes (the balancer and its store "
        "writer; nginx's master and worker) during one more saturation run each with the no-op backends, then "
        "`perf report --sort dso` and `--sort dso,sym` (`bench/perf_profile.py`; binaries and functions under "
        "0.5 % left out). Unlike py-spy it sees the kernel's share of the work, where loopback TCP runs.\n\n"
        "| hop | kernel | by binary |\n|---|---|---|\n" + rows + "".join(functions)
    )


def _binary(name: str) -> str:
    """A perf binary as the report names it: the kernel in words, a file in code."""
    return "kernel" if name == KERNEL else f"`{name}`"


def _model_cpu_paragraph(results: BenchResults) -> str:
    """Why a request costs the hops more CPU with the real models: how busy each hop was at saturation."""
    hops = {(kind, hop): results.target(kind, hop) for kind in KIND_TITLES for hop in ("balancer", "nginx")}
    if any(target is None for target in hops.values()):
        return ""
    cpu = {key: results.hop_cpu(target) for key, target in hops.items()}
    busy = {key: 100 * results.saturation_busy(target) for key, target in hops.items()}
    return (
        f"\nWith the real model servers a request costs the balancer {_number(cpu['model', 'balancer'], 0)} µs of CPU, "
        f"against {_number(cpu['noop', 'balancer'], 0)} µs with the no-op backends, and nginx "
        f"{_number(cpu['model', 'nginx'], 0)} against {_number(cpu['noop', 'nginx'], 0)} µs. Saturation there is the "
        f"models': the balancer was busy {_number(busy['model', 'balancer'], 0)} % of one core "
        f"(against {_number(busy['noop', 'balancer'], 0)} % with the no-op backends) and nginx "
        f"{_number(busy['model', 'nginx'], 0)} % (against {_number(busy['noop', 'nginx'], 0)} %). A hop that waits "
        "for its backends between requests pays a wake-up from `epoll_wait` per request instead of serving a batch "
        "per wake-up, as at the fixed rate (see \"What bounds the tail latency\").\n"
    )


def _stalls_section(results: BenchResults) -> str:
    """Event-loop stalls caused by the outcome log: writer process (used) against a writer thread."""
    title = "## Event-loop stalls from the outcome log\n\n"
    if not results.loop_stalls:
        return title + "_Not measured in this run._\n"
    first = results.loop_stalls[0]
    roles = dict(zip(WRITERS, (" (used)", " (before)", ": the machine's own stalls")))
    rows = [f"| {run.writer}{roles.get(run.writer, '')} | {len(run.gaps)} "
            f"| {run.percentile(0.5) * 1000:.2f} | {run.percentile(1.0) * 1000:.2f} | {run.stalled_share * 100:.2f} % "
            f"| {'n/a' if math.isnan(run.steal) else f'{run.steal * 100:.1f} %'} |\n"
            for run in results.loop_stalls]
    return (
        title + f"`python -m bench.loop_stalls --rate {first.rows / first.seconds:.0f} --seconds {first.seconds:g}`: an "
        "event loop records request rows into an outcome log (flushed every 0.2 s) and otherwise spins, noting "
        f"every gap over {STALL_S * 1000:g} ms between two of its iterations. While Python's sqlite3 binds an "
        "INSERT's parameters it holds the GIL, and with it the loop. The balancer commits from a writer process "
        "(`balancer/store_writer.py`); the second row is a thread in the same process running the same writer, as "
        "the balancer did before"
        + ("; the last records nothing, so its stalls are the machine's own (the hypervisor's steal, other "
           "processes), which the other runs suffer too" if any(run.writer == WRITERS[2] for run in results.loop_stalls)
           else "") + ". Stalls are part of the p99 added latency above." + _stalls_comparison(results) + "\n\n"
        "| who commits | stalls | median stall ms | longest ms | share of the time stalled | steal |\n"
        "|---|---|---|---|---|---|\n" + "".join(rows)
    )


def _stalls_comparison(results: BenchResults) -> str:
    """A sentence for a run in which the writer process stalled the loop more than the thread did."""
    runs = {run.writer: run for run in results.loop_stalls}
    used, thread = runs.get(WRITERS[0]), runs.get(WRITERS[1])
    if used is None or thread is None or used.stalled_share <= thread.stalled_share:
        return ""
    return (f" In this run the writer process stalled the loop more than the thread ({len(used.gaps)} stalls against "
            f"{len(thread.gaps)}): those stalls do not come from SQLite, which runs in the other process, and what "
            "causes them is not established.")


def _tail_section(results: BenchResults) -> str:
    """What the fixed-rate runs say about the p99: how busy each hop was, with and without the outcome log."""
    direct, full, nginx = (results.target("noop", hop) for hop in ("direct", "balancer", "nginx"))
    lean = results.target("noop", "balancer", FEATURE_BASELINE)
    if direct is None or full is None or nginx is None or not results.fixed_rate_samples(full):
        return "## What bounds the tail latency\n\n_Not measured in this run._\n"
    rate = results.rates.get("noop", float("nan"))
    rows = []
    for label, target in (("balancer", full), (f"balancer, {FEATURE_BASELINE}", lean), ("nginx", nginx)):
        if target is None or not results.fixed_rate_samples(target):
            continue
        at_rate, saturated = results.fixed_rate_hop_cpu(target), results.hop_cpu(target)
        rows.append(
            f"| {label} | {_number(results.latency(target, 'p99'), 2)} "
            f"| {_signed(results.latency(target, 'p99') - results.latency(direct, 'p99'))} "
            f"| {_number(at_rate, 0)} | {_number(saturated, 0)} | {_number(at_rate / saturated, 1)}× "
            f"| {_number(100 * results.fixed_rate_busy(target), 0)} % "
            f"| {_share(results.fixed_rate_wait(target))} "
            f"| {_share(results.fixed_rate_queued(target))} |\n")
    steal = [sample.steal for samples in results.fixed_rate.values() for sample in samples]
    noop_runs = {target.name: results.fixed_rate_samples(target)
                 for target in (direct, full, lean, nginx) if target is not None}
    hop_runs = {target.name: results.fixed_rate_samples(target)
                for target in (full, lean, nginx, *results.priority_targets) if target is not None}
    return (
        "## What bounds the tail latency\n\n"
        f"The fixed-rate runs of the no-op backends ({rate:.0f} req/s), with the CPU the hop's processes used during "
        "each whole run (warm-up included; the balancer's store writer process counts). \"Busy\" is that CPU time "
        "over the run's wall time: 100 % is one core kept busy. Below saturation a request costs more CPU than at "
        "saturation: each one wakes the process from `epoll_wait` on its own instead of arriving in a batch that "
        "one wake-up serves.\n\n"
        "\"Waited\": the time the hop's serving threads (the balancer's event loop, nginx's worker) were runnable "
        "but had no CPU, over the run's wall time (`/proc/<pid>/schedstat`; the store writer, idle by design, left "
        "out). A request that arrives while its hop waits waits too.\n\n"
        "| hop | p99 ms | added p99 ms | CPU µs/req at the fixed rate | at saturation | ratio | busy | waited for a CPU "
        "| queued |\n|---|---|---|---|---|---|---|---|---|\n" + "".join(rows)
        + "\n" + queue_correlation(hop_runs, results.settings.rate_connections, rate) + "\n"
        + f"\nThe hypervisor took {_number(100 * median(steal), 1)} % of the machine's CPU time during the fixed-rate "
        f"runs (median; from {_number(100 * min(steal, default=float('nan')), 1)} % to "
        f"{_number(100 * max(steal, default=float('nan')), 1)} %, `steal` in `/proc/stat`): time in which every "
        "process here, client included, waited. " + steal_correlation(noop_runs) + "\n"
        + _sharing(results, rate, (("direct", direct), ("balancer", full), ("nginx", nginx)))
        + _pinned_tail(results, (("direct", direct), ("balancer", full), (f"balancer, {FEATURE_BASELINE}", lean),
                                 ("nginx", nginx)))
    )


def _sharing(results: BenchResults, rate: float, paths: tuple[tuple[str, Target], ...]) -> str:
    """Who else used the two cores during the fixed-rate runs: the client's and the backends' CPU beside the hop's."""
    rows = []
    for label, target in paths:
        samples = results.fixed_rate_samples(target)
        client = median([sample.client_us_per_request for sample in samples])
        backends = median([sample.backend_us_per_request for sample in samples])
        hop = 0.0 if target.hop == "direct" else results.fixed_rate_hop_cpu(target)
        if math.isnan(backends):
            return ""
        rows.append(f"| {label} | {_number(client, 0)} | {_number(backends, 0)} "
                    f"| {'—' if target.hop == 'direct' else _number(hop, 0)} "
                    f"| {_number((client + backends + hop) * rate / 1e6, 2)} |\n")
    return (
        f"\nWho else uses the two cores at {rate:.0f} req/s: CPU per request of the load generator "
        "(`bench.openloop`, its own `getrusage`) and of both backends together (`/proc/<pid>/stat` around each "
        "run), medians over the same fixed-rate runs, beside the hop's. \"Cores\" is their sum at the rate: out of "
        "2.\n\n"
        "| path | client µs/req | backends µs/req | hop µs/req | cores |\n|---|---|---|---|---|\n" + "".join(rows)
    )


def _episodes_section(results: BenchResults) -> str:
    """What the slow answers of traced fixed-rate runs are made of, and what the serving thread did meanwhile."""
    if not results.tail_runs:
        return ""
    first = results.tail_runs[0]
    hops = list(dict.fromkeys(run.hop for run in results.tail_runs))
    rows, during = [], {}
    for hop in hops:
        runs = [run for run in results.tail_runs if run.hop == hop]
        slow, answers = sum(run.slow for run in runs), sum(run.requests for run in runs)
        in_episodes = sum(episode.requests for run in runs for episode in run.episodes)
        lengths = [1000 * (episode.end_s - episode.start_s) for run in runs for episode in run.episodes]
        during[hop] = episode_shares(runs)
        rows.append(
            f"| {hop} | {', '.join(_number(run.p99_ms, 1) for run in runs)} | {_share(slow / answers)} "
            f"| {_share(in_episodes / slow) if slow else 'n/a'} | {sum(len(run.episodes) for run in runs)} "
            f"| {_number(median(lengths), 0) if lengths else 'n/a'} "
            f"| {_share(median([run.running for run in runs]))} | {_share(median([run.waiting for run in runs]))} "
            f"| {_share(during[hop][0])} | {_share(during[hop][1])} |\n")
    return (
        "\n## What the slow answers are made of\n\n"
        f"`python -m bench.tail_episodes --rate {first.rate:.0f} --rounds {len(results.tail_runs) // len(hops)} "
        f"--seconds {results.settings.fixed_rate_s:g} --slow-ms {first.slow_ms:g}`, run here on the same processes "
        "after the runs above: each round a fixed-rate run against each hop in turn, cores shared, with "
        "`bench.openloop --trace` keeping every answer's dispatch time and latency. Meanwhile the hop's serving "
        "thread (the balancer's event loop, nginx's worker) is sampled every "
        f"{1000 * tail_episodes.SAMPLE_S:g} ms from `/proc/<pid>/task/<tid>/schedstat`: the time it ran and the time "
        f"it was runnable but had no CPU. An *episode* is a stretch of answers over {first.slow_ms:g} ms (the p99 "
        f"goal) dispatched less than {1000 * tail_episodes.EPISODE_GAP_S:g} ms apart, at least "
        f"{tail_episodes.EPISODE_MIN_REQUESTS} of them: the hop falling behind, not one unlucky request. Its shares "
        f"run from {1000 * tail_episodes.EPISODE_LEAD_S:g} ms before its first slow answer (a backlog builds before "
        "answers turn slow) to its last, weighted by length over all episodes.\n\n"
        "| hop | each run's p99 ms | answers over the goal | of them in episodes | episodes | median episode ms "
        "| ran, whole runs | waited for a CPU, whole runs | ran, in episodes | waited, in episodes |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n" + "".join(rows) + _episodes_reading(results, hops, during)
        + _episode_groups(results, hops, during)
    )


def _episode_groups(results: BenchResults, hops: list[str], during: dict[str, tuple[float, float]]) -> str:
    """Who had the two CPUs during the episodes and over whole runs: every sampled group's ran and waited shares."""
    runs_by_hop = {hop: [run for run in results.tail_runs if run.hop == hop] for hop in hops}
    if not any(run.groups for runs in runs_by_hop.values() for run in runs):
        return ""  # a results file from before the other threads were sampled
    names = [name for name in (*tail_episodes.GROUPS, tail_episodes.IDLE)
             if any(name in run.groups for runs in runs_by_hop.values() for run in runs)]
    rows = []
    for hop, runs in runs_by_hop.items():
        in_episodes = tail_episodes.group_episode_shares(runs)
        whole = {name: (median([run.groups[name][0] for run in runs if name in run.groups]),
                        median([run.groups[name][1] for run in runs if name in run.groups])) for name in names}
        for label, shares, serving in (("in episodes", in_episodes, during[hop]),
                                       ("whole runs", whole, (median([run.running for run in runs]),
                                                              median([run.waiting for run in runs])))):
            if math.isnan(serving[0]):
                continue
            cells = [f"{_share(serving[0])} / {_share(serving[1])}"]
            for name in names:
                running, waiting = shares.get(name, (math.nan, math.nan))
                cells.append(_share(running) if name == tail_episodes.IDLE else f"{_share(running)} / {_share(waiting)}")
            rows.append(f"| {hop}, {label} | " + " | ".join(cells) + " |\n")
    header = " | ".join(("idle CPUs" if name == tail_episodes.IDLE else f"{name}: ran / waited") for name in names)
    return (
        "\nWho had the two CPUs meanwhile: the same samples, taken of every other thread the runs keep busy (the "
        "hop's other threads and processes, both backends, the client, the kernel's `ksoftirqd` threads and the "
        "harness's own, the sampler among them) and of the CPUs' idle time (`/proc/uptime`, both CPUs together, in "
        "10 ms steps). Shares of the wall time, each group's threads summed: with two CPUs, what ran and the idle "
        "time add up to at most 200 % (the rest ran other processes).\n\n"
        f"| hop, stretch | serving thread: ran / waited | {header} |\n"
        "|---|" + "---|" * (len(names) + 1) + "\n" + "".join(rows) + _idle_reading(results, hops[0], during)
    )


IDLE_WORTH_NOTING = 0.05  # idle CPU time in episodes (out of 100 % per CPU) from which the report points it out


def _idle_in_episodes(results: BenchResults, hop: str) -> float:
    """The CPUs' idle share in `hop`'s episodes (NaN when not sampled)."""
    shares = tail_episodes.group_episode_shares([run for run in results.tail_runs if run.hop == hop])
    return shares.get(tail_episodes.IDLE, (math.nan, math.nan))[0]


def _idle_reading(results: BenchResults, hop: str, during: dict[str, tuple[float, float]]) -> str:
    """A sentence when the CPUs sat idle in the episodes while the serving thread waited for one."""
    runs = [run for run in results.tail_runs if run.hop == hop]
    shares = tail_episodes.group_episode_shares(runs)
    idle, waiting = _idle_in_episodes(results, hop), during[hop][1]
    if math.isnan(idle) or math.isnan(waiting) or idle < IDLE_WORTH_NOTING or waiting < IDLE_WORTH_NOTING:
        return ""
    others = sum(shares.get(name, (0.0, 0.0))[1] for name in tail_episodes.GROUPS)
    whole = median([run.groups[tail_episodes.IDLE][0] for run in runs if tail_episodes.IDLE in run.groups])
    return (f"\nIn the {hop}'s episodes the CPUs were idle {_share(idle)} of the time (out of 200 %; "
            f"{_share(whole)} over whole runs) while, over the "
            f"same stretches, its serving thread waited for a CPU {_share(waiting)} and the other threads sampled "
            f"{_share(others)} between them. The slow answers there are not a shortage of CPU time: threads waited "
            "for a CPU while, part of that time, one had nothing to run. Where a runnable thread runs is the "
            "kernel's choice; what the balancer can set is its weight in that choice (`server.priority`) and how "
            "many of its processes share the load (`server.workers`), both measured above.\n")


def _episodes_reading(results: BenchResults, hops: list[str], during: dict[str, tuple[float, float]]) -> str:
    """What the episode table says, from its own figures."""
    hop = hops[0]
    running, waiting = during[hop]
    if math.isnan(running):
        return f"\nThe {hop} had no episodes in these runs.\n"
    runs = [run for run in results.tail_runs if run.hop == hop]
    whole_running = median([run.running for run in runs])
    whole_waiting = median([run.waiting for run in runs])
    text = (f"\nIn its episodes the {hop}'s serving thread ran {_share(running)} of the time and waited for a CPU "
            f"{_share(waiting)}, against {_share(whole_running)} and {_share(whole_waiting)} over whole runs")
    if running + waiting >= 0.9 and _idle_in_episodes(results, hop) >= IDLE_WORTH_NOTING:
        text += (f": running or runnable {_share(running + waiting)} of the time, so it always had work and was "
                 "blocked on nothing but a CPU; who had the CPUs meanwhile is below.")
    elif running + waiting >= 0.9:
        text += (f": running or runnable {_share(running + waiting)} of the time, so it always had work and was "
                 "blocked on nothing but a CPU. Those slow answers come from CPU contention: requests waited in the "
                 "hop while it waited for a core that the load generator and the backends were using.")
    else:
        text += (f": running or runnable only {_share(running + waiting)} of the time, so something other than "
                 "CPU contention held it too.")
    return text + "\n"


def _pinned_tail(results: BenchResults, paths: tuple[tuple[str, Target | None], ...]) -> str:
    """The same fixed-rate runs with the hop on a CPU of its own: how much of the tail sharing cores explains."""
    direct = paths[0][1]
    if not results.pinned_samples(direct):
        return ""
    rows = []
    for label, target in paths:
        samples = results.pinned_samples(target)
        if not samples:
            continue
        p99 = results.pinned_p99(target)
        added = "—" if target is direct else _signed(p99 - results.pinned_p99(direct))
        busy = median([sample.proxy_busy or math.nan for sample in samples])
        busy_text = "—" if target is direct else f"{_number(100 * busy, 0)} %"
        waited = "—" if target is direct else _share(median([sample.proxy_wait_share for sample in samples]))
        rows.append(f"| {label} | {_number(p99, 2)} | {added} | {_number(results.latency(target, 'p99'), 2)} "
                    f"| {', '.join(_number(sample.p99_ms, 1) for sample in samples)} | {busy_text} | {waited} "
                    f"| {_share(median([sample.backend_wait_share for sample in samples]))} |\n")
    return (
        f"\nThe same fixed-rate runs once more, {PINNED_HOW}: the hop's processes (the balancer and its store writer; "
        "nginx's master and worker) pinned to one CPU, the client and the backends to the other (direct calls "
        "leave the first idle), interleaved over the same number of rounds (`measure_fixed_rate(pinned=...)` in "
        "`bench/runs.py`). Nothing else then competes for the hop's core, so the difference from the shared "
        "runs is what sharing the cores with the load generator and the backends adds to the tail.\n\n"
        "\"Waited\" as above; the backends' is both backends' time waiting for a CPU over the run's wall time (up to "
        "200 %): they share their CPU with the load generator.\n\n"
        "| path | p99 ms, own CPU | added p99 ms, own CPU | p99 ms, cores shared (above) | each round's p99 ms, own CPU "
        "| busy | hop waited for a CPU | backends waited |\n|---|---|---|---|---|---|---|---|\n" + "".join(rows)
    )


def _cold_start_section(results: BenchResults) -> str:
    """The first seconds of a fresh balancer: what a user's first traffic meets, unlike the warmed-up runs above."""
    if not results.cold_start:
        return ""
    starts, window_s = results.cold_start, results.cold_start_window_s
    rate = starts[0][0].rate
    rows = []
    for index in range(len(starts[0])):
        window = [samples[index] for samples in starts]
        rows.append(f"| {index * window_s:g}–{(index + 1) * window_s:g} s "
                    f"| {_number(median([sample.p50_ms for sample in window]), 2)} "
                    f"| {_number(median([sample.p99_ms for sample in window]), 2)} "
                    f"| {', '.join(_number(sample.p99_ms, 1) for sample in window)} "
                    f"| {sum(sample.errors for sample in window)} |\n")
    return (
        "## The first seconds after a start\n\n"
        "Every balancer above was warmed up at saturation before it was measured. A user's first traffic meets a "
        f"fresh one: {len(starts)} balancers (sticky, outcome log and metrics on) were started one after another in "
        f"front of the no-op backends, and each, the moment its health check answered, got {len(starts[0])} "
        f"consecutive fixed-rate windows of {window_s:g} s at {rate:.0f} req/s with no warm-up "
        "(`bench/cold_start.py`; `python -m bench.cold_start` repeats it). The cores are shared, as in the "
        "main fixed-rate runs.\n\n"
        "| window after ready | p50 ms (median) | p99 ms (median) | each start's p99 ms | errors |\n"
        "|---|---|---|---|---|\n" + "".join(rows)
        + "\n" + summarize_cold_start(starts, window_s)[-1].capitalize() + ".\n"
    )


def queue_correlation(runs: dict[str, list[FixedRateSample]], connections: int, rate: float) -> str:
    """How a run's p99 ranks with its share of requests that waited in the client for a free connection: a sentence."""
    pairs = [(sample.queued_share, sample.p99_ms) for samples in runs.values() for sample in samples
             if not (math.isnan(sample.queued_share) or math.isnan(sample.p99_ms))]
    if len(pairs) < 5 or len({queued for queued, _ in pairs}) < 2 or len({p99 for _, p99 in pairs}) < 2:
        return ""
    rho, p_value = spearmanr(*zip(*pairs, strict=True))
    return (f"The client holds {connections} connections: a request due while all of them wait for answers waits for "
            f"one in the client, and that wait counts in its latency. That happens whenever a hop takes longer than "
            f"{connections} / {rate:.0f} req/s = {1000 * connections / rate:.2f} ms to answer the requests it holds, "
            "and the queue then drains only as fast as the hop answers. Over the "
            f"{len(pairs)} fixed-rate runs through a hop above, a run's p99 and its share of such requests (\"queued\") "
            f"have a Spearman rank correlation of {float(rho):.2f} (p = {float(p_value):.2g}).")


def steal_correlation(runs: dict[str, list[FixedRateSample]]) -> str:
    """How a run's p99 (relative to its hop's median p99) ranks with the steal time during it: a sentence."""
    steal, relative_p99 = [], []
    for samples in runs.values():
        typical = median([sample.p99_ms for sample in samples])
        for sample in samples:
            if not (math.isnan(sample.steal) or math.isnan(sample.p99_ms) or math.isnan(typical) or typical <= 0):
                steal.append(sample.steal)
                relative_p99.append(sample.p99_ms / typical)
    if len(steal) < 5 or len(set(steal)) < 2 or len(set(relative_p99)) < 2:
        return ""
    rho, p_value = spearmanr(steal, relative_p99)
    return (f"Over the {len(steal)} fixed-rate runs of the no-op backends, a run's p99 (over its path's median p99) "
            f"and the steal during it have a Spearman rank correlation of {float(rho):.2f} (p = {float(p_value):.2g}, "
            "`scipy.stats.spearmanr`).")


def _instructions_section(results: BenchResults) -> str:
    """Instructions per request from valgrind: the same split as above, immune to the machine's noise."""
    title = "## Instructions per request\n\n"
    if results.instructions is None:
        return title + f"_Not measured in this run:_ {results.instructions_error or 'skipped'}\n"
    counts = results.instructions
    rows = []
    previous: str | None = None
    for kind, label in (("floor", "the floor (server + upstream client, forwarding only)"),
                        ("lean", "+ the balancer's logic (outcome log and metrics off)"),
                        ("default", "+ outcome log and metrics: the balancer as it ships")):
        if kind not in counts:
            continue
        delta = "" if previous is None else _signed(counts[kind] - counts[previous], 0)
        rows.append(f"| {label} | {_number(counts[kind], 0)} | {delta} |\n")
        previous = kind
    writer = counts.get(WRITER)
    if writer is not None and "default" in counts:
        rows.append(f"| &nbsp;&nbsp;of which in the balancer's process | {_number(counts['default'] - writer, 0)} | "
                    f"{_signed(counts['default'] - writer - counts['lean'], 0) if 'lean' in counts else ''} |\n"
                    f"| &nbsp;&nbsp;of which in its store writer process (SQLite) | {_number(writer, 0)} | |\n")
    return (
        title + "`python -m bench.instructions`: the public port's code in one process with fake transports (no "
        "sockets, so no kernel work and no load generator), counted by `valgrind --tool=callgrind --trace-children=yes` "
        f"over all threads and the store writer process; the difference between runs of {LONG_RUN:,} and "
        f"{SHORT_RUN:,} requests, per request, with the outcome log flushed every {FLUSH_EVERY} requests; each count "
        f"is the least of {REPEATS} runs (whether a WAL checkpoint lands inside a run depends on timing, and one "
        "moved the writer's figure by thousands). Unlike CPU seconds on a shared machine, these counts move by a "
        "few per cent at most between runs, so they are the figure to compare when a change is small.\n\n"
        "| what runs | instructions per request | added |\n|---|---|---|\n" + "".join(rows)
    )


def _report_section(results: BenchResults) -> str:
    if results.report_seconds is None:
        return "## Report over a large store\n\n_Not measured in this run._\n"
    return (
        "## Report over a large store\n\n"
        f"`build_report` over a synthetic store of {_number(results.report_requests, 0)} logged requests "
        "(`balancer/report_synthetic.py`: two variants, feedback on half, sticky units), best of 2: "
        f"**{results.report_seconds:.2f} s**. Aggregation runs in SQL; percentiles, bootstrap and the timeline are "
        "vectorised with numpy.\n"
    )


def _profile_section(results: BenchResults) -> str:
    if results.profile_error:
        return f"## Profile\n\n_py-spy could not profile this run:_ {results.profile_error}\n"
    profile = results.profile
    if profile is None or profile.samples == 0:
        return "## Profile\n\n" + PROFILE_PLACEHOLDER + "\n"
    threads = _thread_summary(profile)
    own = [(frame, count) for frame, count in profile.total_counts.most_common()
           if "(balancer/" in frame and "(balancer/__main__.py)" not in frame][:12]
    return ("## Profile\n\n"
            f"py-spy at {SAMPLE_RATE_HZ} Hz (`py-spy record --threads --format raw`, idle samples excluded) of the "
            f"no-op balancer under `wrk` saturation, after the measurements; {profile.pinning}. Samples per "
            f"thread: {threads} (py-spy counts some waits in C, e.g. `Condition.wait`, as busy). "
            f"The tables are the event loop thread ({profile.thread}), which does every "
            "request's Python work. Self time is the Python function on top of the stack; C calls are charged "
            "to the Python function that made them, so `_SelectorSocketTransport.write` is the `send` syscall "
            "(on loopback it also runs the receiver's TCP work) plus any time the balancer sat preempted inside "
            "it, which py-spy cannot tell from running; the kernel share in the CPU columns above is the "
            "better measure of the syscall cost.\n\n"
            "| self % | function |\n|---|---|\n"
            + "".join(f"| {count / profile.samples * 100:.1f} | `{frame}` |\n"
                      for frame, count in profile.self_counts.most_common(20))
            + "\nInclusive time of the balancer's own functions:\n\n| total % | function |\n|---|---|\n"
            + "".join(f"| {count / profile.samples * 100:.1f} | `{frame}` |\n" for frame, count in own)
            )


def _thread_summary(profile: Profile) -> str:
    """'MainThread 2227; event-log-writer 607 (mostly `Condition.wait (threading.py)`, 80 %)'."""
    parts = []
    for name, count in profile.thread_samples.most_common():
        part = f"{name} {count}"
        top = profile.thread_top_frame.get(name)
        if name != profile.thread and top is not None:
            part += f" (mostly `{top[0]}`, {top[1] / count * 100:.0f} %)"
        parts.append(part)
    return "; ".join(parts)


def _raw_section(results: BenchResults) -> str:
    rows = []
    for target in results.targets:
        for index, sample in enumerate(results.saturation.get(target.name, []), 1):
            hop, share = sample.proxy_us_per_request, sample.proxy_system_share
            rows.append(f"| saturation | {target.name} | {index} | {sample.requests_per_second:.0f} req/s, "
                        f"p50 {sample.p50_ms:.1f} ms, p99 {sample.p99_ms:.1f} ms"
                        + ("" if hop is None or share is None else f", hop {_cpu(hop, share)} µs/req")
                        + f", backends {sample.backend_us_per_request:.0f} µs/req | {sample.errors} |\n")
    phases = (("fixed rate", results.fixed_rate),
              (f"fixed rate, {results.workers} workers' rate", results.workers_fixed_rate))
    for (phase, runs), target in ((phase, target) for phase in phases for target in results.targets):
        for index, fixed in enumerate(runs.get(target.name, []), 1):
            rows.append(f"| {phase} | {target.name} | {index} | {fixed.achieved_rps:.0f} of {fixed.rate:.0f} req/s, "
                        f"p50 {fixed.p50_ms:.2f} ms, p99 {fixed.p99_ms:.2f} ms, p99.9 {fixed.p999_ms:.2f} ms; "
                        f"queued {fixed.queued}, client late p99 {fixed.late_ms_p99:.1f} ms, client CPU "
                        f"{fixed.client_us_per_request:.0f} µs/req"
                        + ("" if fixed.proxy_us_per_request is None or fixed.proxy_busy is None else
                           f", hop {fixed.proxy_us_per_request:.0f} µs/req (busy {100 * fixed.proxy_busy:.0f} %)")
                        + ("" if math.isnan(fixed.backend_us_per_request) else
                           f", backends {fixed.backend_us_per_request:.0f} µs/req")
                        + f", steal {100 * fixed.steal:.1f} % | {fixed.errors} |\n")
    return ("## Every run\n\n<details><summary>Raw samples, in round order per configuration</summary>\n\n"
            "| phase | configuration | round | result | errors |\n|---|---|---|---|---|\n" + "".join(rows)
            + "\n</details>\n")


def _cpu(microseconds: float, kernel_share: float) -> str:
    if math.isnan(kernel_share):
        return _number(microseconds, 0)
    return f"{_number(microseconds, 0)} ({kernel_share * 100:.0f} % kernel)"


def _decimals(unit: str) -> int:
    return 2 if unit == "ms" else 0


def _costs(ratios: Sequence[float]) -> list[float]:
    """Throughput ratios (with / without a feature) as the per cent of throughput the feature costs."""
    return [100 * (1 - ratio) for ratio in ratios]


def _percent(part: float, whole: float) -> float:
    return part / whole * 100 if whole and not math.isnan(whole) else float("nan")


def _ratio(part: float, whole: float) -> str:
    value = part / whole if whole and not math.isnan(whole) else float("nan")
    return "n/a" if math.isnan(value) else f"{value:.2f}×"


def _number(value: float, decimals: int) -> str:
    return "n/a" if math.isnan(value) else f"{value:,.{decimals}f}"


def _share(fraction: float) -> str:
    """A fraction as a percentage with one decimal ("n/a" for NaN: not measured)."""
    return "n/a" if math.isnan(fraction) else f"{100 * fraction:.1f} %"


def _signed(value: float, decimals: int = 2) -> str:
    return "n/a" if math.isnan(value) else f"{value:+,.{decimals}f}"


def _range(values: Sequence[float]) -> str:
    return f"{min(values):,.0f}–{max(values):,.0f}" if values else "n/a"
