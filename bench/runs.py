"""The measurements: saturation (wrk) and fixed-rate (bench.openloop) runs, interleaved over rounds."""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

from bench.errors import BenchError
from bench.procstat import (CpuUsage, ProcessTimes, busy_seconds, cpu_between, machine_times, microseconds_per_request,
                            pinned_apart, process_tree, serving_waits, snapshot, steal_share, tree_cpu_between,
                            wait_between)
from bench.stack import Target
from bench.wrk import WrkResult, run_wrk, wrk_command, wrk_environment
from tests.processes import REPO

logger = logging.getLogger(__name__)
Sample = TypeVar("Sample")


@dataclass(frozen=True)
class Settings:
    """How long and how hard: the full run and the --quick smoke run differ only here."""

    rounds: int
    saturation_s: float
    fixed_rate_s: float
    warmup_s: float
    threads: int = 2
    connections: int = 64
    rate_connections: int = 32
    users: int = 1000
    pause_s: float = 0.5
    cost_pairs: int = 16  # back-to-back saturation pairs, default vs outcomes and metrics off (results before same-core pairs)
    cost_pair_s: float = 3.0
    same_core_pairs: int = 10  # bench/same_core.py: runs of each feature configuration at once with the lean one
    same_core_s: float = 3.0
    cold_starts: int = 5  # bench/cold_start.py: fresh balancers, each loaded from the moment it is ready
    cold_windows: int = 5
    cold_window_s: float = 1.0
    # rounds of the main fixed-rate runs (the latency targets): a p99 moves more from run to run than throughput does,
    # and with 8 the median's 90 % interval no longer spans the lowest to the highest round (`targets.Check`)
    fixed_rate_rounds: int = 8


FULL = Settings(rounds=5, saturation_s=4, fixed_rate_s=4, warmup_s=0.5)
QUICK = Settings(rounds=1, saturation_s=3, fixed_rate_s=3, warmup_s=0.5, cost_pairs=2, same_core_pairs=2, cold_starts=1,
                 cold_windows=2, fixed_rate_rounds=1)


def paired_samples(first: Target, second: Target, pairs: int, measure: Callable[[Target], Sample], *,
                   pause_s: float) -> list[tuple[Sample, Sample]]:
    """`first`'s and `second`'s runs, measured back to back `pairs` times (alternating which goes first).

    Rounds of every configuration take about a minute each, and the machine's speed drifts in
    that time; a pair measured seconds apart shares its conditions, so the ratio within a pair
    is steadier than a ratio of the two configurations' medians over rounds.
    """
    measured = []
    for index in range(pairs):
        order = (first, second) if index % 2 == 0 else (second, first)
        samples = {}
        for target in order:
            samples[target.name] = measure(target)
            time.sleep(pause_s)
        pair = samples[first.name], samples[second.name]
        logger.info("pair %d/%d: %s %s | %s %s", index + 1, pairs, first.name, describe(pair[0]), second.name,
                    describe(pair[1]))
        measured.append(pair)
    return measured


def throughput_ratio(pair: tuple[SaturationSample, SaturationSample], *, steal_adjusted: bool = False) -> float:
    """The first run's requests/s over the second's; with `steal_adjusted`, each per second the machine ran."""
    if steal_adjusted:
        return pair[0].steal_adjusted_rps / pair[1].steal_adjusted_rps
    return pair[0].requests_per_second / pair[1].requests_per_second


def busy_share(cpu: CpuUsage | None, seconds: float) -> float | None:
    """CPU seconds per second of wall time (1.0: one core kept busy); None without CPU figures, NaN over no time."""
    if cpu is None:
        return None
    return cpu.total_s / seconds if seconds > 0 else math.nan


@dataclass(frozen=True)
class SaturationSample:
    """One wrk run, with the CPU the hop's and the backends' processes used meanwhile."""

    requests: int
    seconds: float
    errors: int
    p50_ms: float
    p99_ms: float
    proxy_cpu: CpuUsage | None
    backend_cpu: CpuUsage
    steal: float = math.nan  # share of the machine's CPU time the hypervisor took meanwhile
    writer_cpu: CpuUsage | None = None  # of proxy_cpu, the balancer's child processes: its store writer
    machine_busy_s: float = math.nan  # CPU seconds all cores ran work meanwhile (every process; not idle, not stolen)

    @property
    def requests_per_second(self) -> float:
        """Completed requests per second."""
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    @property
    def steal_adjusted_rps(self) -> float:
        """Requests per second the machine's CPUs were its own: requests/s ÷ (1 − steal).

        At saturation every core is busy, so the CPU time the hypervisor takes (steal) is time
        no process of the run can use; dividing it out leaves the throughput the run reached
        per unit of CPU it was given, which a neighbour's load moves far less than requests/s.
        """
        return self.requests_per_second / (1 - self.steal) if self.steal < 1 else math.nan

    @property
    def proxy_us_per_request(self) -> float | None:
        """CPU µs of the hop's processes per request (None for direct runs)."""
        return None if self.proxy_cpu is None else microseconds_per_request(self.proxy_cpu.total_s, self.requests)

    @property
    def proxy_busy(self) -> float | None:
        """The hop's CPU seconds per second of the run: 1.0 is one core kept busy (None for direct runs)."""
        return busy_share(self.proxy_cpu, self.seconds)

    @property
    def machine_us_per_request(self) -> float:
        """CPU µs per request of the whole machine: load generator, hop, backends and kernel together."""
        return microseconds_per_request(self.machine_busy_s, self.requests)

    @property
    def machine_busy_cores(self) -> float:
        """How many cores' worth of work the machine ran on average during the run."""
        return self.machine_busy_s / self.seconds if self.seconds > 0 else math.nan

    @property
    def writer_us_per_request(self) -> float | None:
        """CPU µs per request of the balancer's store writer process (None where there is none to count)."""
        return None if self.writer_cpu is None else microseconds_per_request(self.writer_cpu.total_s, self.requests)

    @property
    def proxy_kernel_us_per_request(self) -> float | None:
        """Kernel (stime) part of the hop's CPU per request, in µs."""
        return None if self.proxy_cpu is None else microseconds_per_request(self.proxy_cpu.system_s, self.requests)

    @property
    def proxy_system_share(self) -> float | None:
        """Fraction of the hop's CPU spent in the kernel (None for direct runs)."""
        return None if self.proxy_cpu is None else self.proxy_cpu.system_share

    @property
    def backend_us_per_request(self) -> float:
        """CPU µs of both backends together per request."""
        return microseconds_per_request(self.backend_cpu.total_s, self.requests)


@dataclass(frozen=True)
class FixedRateSample:
    """One open-loop run at a fixed rate."""

    rate: float
    achieved_rps: float
    completed: int
    errors: int
    queued: int
    p50_ms: float
    p99_ms: float
    p999_ms: float
    late_ms_p99: float
    client_cpu_s: float
    dispatched: int = 0  # requests of the whole run: those measured plus the warm-up's (at the same rate)
    seconds: float = math.nan  # wall time of the whole run, warm-up included
    proxy_cpu: CpuUsage | None = None  # the hop's processes over the whole run (None for direct runs)
    steal: float = math.nan  # share of the machine's CPU time the hypervisor took meanwhile
    # seconds the hop's serving threads (a balancer's event loops, nginx's workers) were runnable but waited for a
    # CPU, over the whole run (NaN for direct runs and runs from before it was measured)
    proxy_wait_s: float = math.nan
    backend_wait_s: float = math.nan  # the same for the backends' processes
    backend_cpu: CpuUsage | None = None  # both backends over the whole run (None for runs from before it was measured)

    @property
    def proxy_us_per_request(self) -> float | None:
        """CPU µs of the hop's processes per request dispatched (None for direct runs)."""
        return None if self.proxy_cpu is None else microseconds_per_request(self.proxy_cpu.total_s, self.dispatched)

    @property
    def client_us_per_request(self) -> float:
        """The client's CPU µs per request dispatched: its CPU time covers the warm-up's requests too."""
        return microseconds_per_request(self.client_cpu_s, self.dispatched)

    @property
    def backend_us_per_request(self) -> float:
        """CPU µs of both backends together per request dispatched (NaN for runs from before it was measured)."""
        if self.backend_cpu is None:
            return math.nan
        return microseconds_per_request(self.backend_cpu.total_s, self.dispatched)

    @property
    def proxy_wait_share(self) -> float:
        """`proxy_wait_s` over the run's wall time: 0.1 is a tenth of the run spent waiting for a CPU."""
        return self.proxy_wait_s / self.seconds if self.seconds > 0 else math.nan

    @property
    def queued_share(self) -> float:
        """Share of the measured requests that found every connection busy and waited for one in the client."""
        return self.queued / self.completed if self.completed > 0 else math.nan

    @property
    def backend_wait_share(self) -> float:
        """`backend_wait_s` over the run's wall time (both backends: up to 2.0)."""
        return self.backend_wait_s / self.seconds if self.seconds > 0 else math.nan

    @property
    def proxy_busy(self) -> float | None:
        """The hop's CPU seconds per second of the run: 1.0 is one core kept busy (None for direct runs)."""
        return busy_share(self.proxy_cpu, self.seconds)


def saturation_sample(result: WrkResult, proxy_cpu: CpuUsage | None, backend_cpu: CpuUsage, *,
                      steal: float = math.nan, writer_cpu: CpuUsage | None = None,
                      machine_busy_s: float = math.nan) -> SaturationSample:
    """Combine a wrk result with the CPU measured around it."""
    return SaturationSample(requests=result.requests, seconds=result.seconds, errors=result.errors,
                            p50_ms=result.p50_ms, p99_ms=result.p99_ms, proxy_cpu=proxy_cpu, backend_cpu=backend_cpu,
                            steal=steal, writer_cpu=writer_cpu, machine_busy_s=machine_busy_s)


def measure_saturation(target: Target, settings: Settings, body_file: Path, *, wrk: str,
                       seconds: float | None = None) -> SaturationSample:
    """wrk -c N for T seconds against `target`; CPU from /proc before and after."""
    duration = settings.saturation_s if seconds is None else seconds
    command = wrk_command(target.url, threads=settings.threads, connections=settings.connections,
                          seconds=duration, wrk=wrk)
    environment = wrk_environment(body_file=body_file, users=settings.users, spread=target.spread)
    proxy_pids = process_tree(target.proxy_pid) if target.proxy_pid is not None else []
    proxy_before, backends_before, machine_before = snapshot(proxy_pids), snapshot(target.backend_pids), machine_times()
    result = run_wrk(command, environment, duration)
    machine_after, backends_after = machine_times(), snapshot(target.backend_pids)
    proxy_cpu, children = hop_cpu(target, proxy_before)
    # a balancer's process tree is the balancer and the store writer it started
    writer_cpu = children if target.hop == "balancer" else None
    return saturation_sample(result, proxy_cpu, cpu_between(backends_before, backends_after),
                             steal=steal_share(machine_before, machine_after), writer_cpu=writer_cpu,
                             machine_busy_s=busy_seconds(machine_before, machine_after))


def hop_cpu(target: Target, before: Mapping[int, ProcessTimes]) -> tuple[CpuUsage | None, CpuUsage | None]:
    """(the hop's process tree, its child processes): CPU since `before`, a snapshot of the tree; Nones without
    a hop. The tree is listed again, so a store writer the balancer replaced meanwhile counts (`tree_cpu_between`)."""
    if target.proxy_pid is None:
        return None, None
    return tree_cpu_between(target.proxy_pid, before, snapshot(process_tree(target.proxy_pid)))


def openloop_command(target: Target, rate: float, settings: Settings, body_file: Path) -> list[str]:
    """The bench.openloop command line of a fixed-rate run."""
    command = [sys.executable, "-m", "bench.openloop", "--url", target.url, "--rate", f"{rate:.0f}",
               "--seconds", f"{settings.fixed_rate_s:g}", "--warmup", f"{settings.warmup_s:g}",
               "--connections", str(settings.rate_connections), "--users", str(settings.users),
               "--body-file", str(body_file)]
    if target.spread:
        command += ["--spread", ",".join(target.spread)]
    return command


def measure_fixed_rate(target: Target, rate: float, settings: Settings, body_file: Path, *,
                       pinned: tuple[set[int], set[int]] | None = None) -> FixedRateSample:
    """Open-loop load at `rate` requests/s; latency percentiles from bench.openloop.

    `pinned`: (the hop's CPUs, everyone else's): the hop's processes run on the first, the client and the
    backends on the second, for this run only (direct calls leave the first idle).
    """
    command = openloop_command(target, rate, settings, body_file)
    limit = settings.warmup_s + settings.fixed_rate_s + 30
    proxy_pids = process_tree(target.proxy_pid) if target.proxy_pid is not None else []
    with ExitStack() as placement:
        if pinned is not None:
            placement.enter_context(pinned_apart(proxy_pids, target.backend_pids, *pinned))
        proxy_before, machine_before, started = snapshot(proxy_pids), machine_times(), time.monotonic()
        backends_before = snapshot(target.backend_pids)
        waits_before, backend_waits_before = serving_waits(proxy_pids), serving_waits(target.backend_pids)
        try:
            completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=limit, check=False,
                                       preexec_fn=None if pinned is None else partial(os.sched_setaffinity, 0,
                                                                                       pinned[1]))
        except subprocess.TimeoutExpired as exc:
            raise BenchError(f"bench.openloop did not finish within {limit:g}s: {' '.join(command)}") from exc
    # The client's start-up is inside this window: `python -m bench.openloop` starts an interpreter that then
    # execs the compiled client, 60-80 ms on this machine (`time`), so busy shares read about 1.5 % low.
    seconds, machine_after = time.monotonic() - started, machine_times()
    waited = wait_between(waits_before, serving_waits(proxy_pids)) if proxy_pids else math.nan
    backends_waited = wait_between(backend_waits_before, serving_waits(target.backend_pids))
    backend_cpu = cpu_between(backends_before, snapshot(target.backend_pids))
    proxy_cpu, _ = hop_cpu(target, proxy_before)
    if completed.returncode != 0:
        raise BenchError(f"bench.openloop exited with {completed.returncode}: {completed.stderr.strip()[-1500:]}")
    summary = json.loads(completed.stdout.strip().splitlines()[-1])
    # A run with no answers has no percentiles: the client prints null, the report shows NaN.
    latency = {key: math.nan if value is None else value for key, value in summary["latency_ms"].items()}
    if summary["late_ms_p99"] is None:
        summary["late_ms_p99"] = math.nan
    return FixedRateSample(rate=summary["rate"], achieved_rps=summary["achieved_rps"], completed=summary["completed"],
                           errors=summary["errors"], queued=summary["queued"], p50_ms=latency["p50"],
                           p99_ms=latency["p99"], p999_ms=latency["p99.9"], late_ms_p99=summary["late_ms_p99"],
                           client_cpu_s=summary["client_cpu_s"], seconds=seconds,
                           dispatched=summary["sent"] + round(rate * settings.warmup_s),
                           proxy_cpu=proxy_cpu, proxy_wait_s=waited, backend_wait_s=backends_waited,
                           backend_cpu=backend_cpu,
                           steal=steal_share(machine_before, machine_after))


def interleaved(targets: Sequence[Target], rounds: int, measure: Callable[[Target], Sample], *,
                pause_s: float, what: str) -> dict[str, list[Sample]]:
    """Every target once per round, in a rotated order each round (so no target always runs first)."""
    samples: dict[str, list[Sample]] = {target.name: [] for target in targets}
    for round_index in range(rounds):
        shift = round_index % len(targets)
        for target in [*targets[shift:], *targets[:shift]]:
            started = time.monotonic()
            sample = measure(target)
            samples[target.name].append(sample)
            logger.info("%s round %d/%d %-40s %s (%.1fs)", what, round_index + 1, rounds, target.name,
                        describe(sample), time.monotonic() - started)
            time.sleep(pause_s)
    return samples


def describe(sample: object) -> str:
    """One log line's worth of a sample."""
    if isinstance(sample, SaturationSample):
        cpu = sample.proxy_us_per_request
        return (f"{sample.requests_per_second:8.0f} req/s  errors {sample.errors}"
                + ("" if cpu is None else f"  hop CPU {cpu:.0f} µs/req") + f"  steal {100 * sample.steal:.1f} %")
    if isinstance(sample, FixedRateSample):
        return (f"{sample.achieved_rps:6.0f}/{sample.rate:.0f} req/s  p50 {sample.p50_ms:.2f} ms  "
                f"p99 {sample.p99_ms:.2f} ms  errors {sample.errors}  client late p99 {sample.late_ms_p99:.1f} ms")
    return repr(sample)


def median(values: Sequence[float | None]) -> float:
    """Median of the values present (NaN if none)."""
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else float("nan")
