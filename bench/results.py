"""One `make bench` run's samples, and the medians the report and the targets read from them."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from bench.loop_stalls import Stalls
from bench.perf_profile import PerfProfile
from bench.profile import Profile
from bench.report_cost import same_core_costs
from bench.runs import FixedRateSample, SaturationSample, Settings, median
from bench.tail_episodes import TailRun
from bench.same_core import SameCorePair
from bench.stack import FEATURE_BASELINE, Target
from bench.report_text import percent


KIND_TITLES = {"noop": "No-op backends", "model": "Real model servers"}


PINNED_HOW = "the hop on a CPU of its own"


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
        return 100 - percent(self.rps(full), self.rps(lean))

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
