"""What a balancer feature costs, measured with both configurations on one core at the same time.

    python -m bench.same_core [--first default] [--second lean] [--pairs 8] [--seconds 3]

On this VM two saturation runs of the same balancer, seconds apart, differ by tens of per cent
(the machine's speed changes under it: steal, and neighbours that `/proc/stat` does not show),
so a few per cent of cost is lost in back-to-back runs. Here the two configurations run at once:
both balancers' processes (their store writers included) are pinned to one CPU, the backends and
two wrk processes (one per balancer, half the connections each) to the others, and each pair is a
run of both. Whatever slows that CPU down slows both alike. A balancer on a saturated core serves
requests at the rate its CPU per request allows, so each pair gives the feature's throughput cost
as 1 − (second's CPU per request ÷ first's), from each process tree's `/proc` CPU time over the
requests its wrk completed. The first configuration's store writer counts in full, as if it had to
share the balancer's core: the conservative reading on a machine where every core is busy.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from bench.errors import BenchError
from bench.procstat import (microseconds_per_request, pinned_apart, process_tree, snapshot, split_cpus,
                            tree_cpu_between)
from bench.runs import FULL, Settings
from bench.stack import FEATURE_BASELINE, BalancerOptions, Stack, Target, scratch_folder
from bench.wrk import WrkResult, run_wrk, wrk_command, wrk_environment

logger = logging.getLogger(__name__)

CONFIGURATIONS = {
    "default": BalancerOptions("default"),
    "lean": BalancerOptions(FEATURE_BASELINE, record_outcomes=False, export_metrics=False),
    "outcomes-off": BalancerOptions("outcomes off", record_outcomes=False),
    "metrics-off": BalancerOptions("metrics off", export_metrics=False),
}

# After each run, before the CPU is read: a few flush intervals (0.2 s) for the store writers to catch up.
DRAIN_S = 0.8

# What `make bench` runs at once with the lean balancer: all features on, then each alone (labels of
# `bench.stack.FEATURE_CONFIGURATIONS`).
SAME_CORE_LABELS = ("default", "metrics off", "outcomes off")


@dataclass(frozen=True)
class CoreShare:
    """One balancer's part of a same-core run: what its wrk completed and what its processes used."""

    requests: int
    errors: int
    cpu_s: float  # the balancer's process tree (its store writer included)
    writer_s: float  # of which its child processes: the store writer

    @property
    def us_per_request(self) -> float:
        """CPU µs of the whole tree per completed request."""
        return microseconds_per_request(self.cpu_s, self.requests)

    @property
    def writer_us_per_request(self) -> float:
        """CPU µs of the store writer per completed request."""
        return microseconds_per_request(self.writer_s, self.requests)


@dataclass(frozen=True)
class SameCorePair:
    """One run of both configurations at once on the same CPU."""

    first: CoreShare
    second: CoreShare
    busy: float  # CPU seconds both trees used per second of the run: 1.0 is the shared CPU kept busy

    @property
    def cost(self) -> float:
        """The first configuration's throughput lost against the second's on a saturated core, as a fraction."""
        return 1 - self.second.us_per_request / self.first.us_per_request


def measure_pairs(first: Target, second: Target, pairs: int, *, settings: Settings, body_file: Path, wrk: str,
                  seconds: float) -> list[SameCorePair]:
    """`pairs` runs of `first` and `second` at once, their process trees pinned to one CPU (BenchError with one CPU)."""
    split = split_cpus()
    if split is None:
        raise BenchError("a same-core comparison needs two CPUs: one for both balancers, one for the load")
    hop_cpus, load_cpus = split
    backends = sorted(set(first.backend_pids) | set(second.backend_pids))
    measured = []
    with pinned_apart([], backends, hop_cpus, load_cpus):
        for index in range(pairs):
            order = (first, second) if index % 2 == 0 else (second, first)
            shares, busy = _run_together(order, settings=settings, body_file=body_file, wrk=wrk, seconds=seconds,
                                         hop_cpus=hop_cpus, load_cpus=load_cpus)
            pair = SameCorePair(first=shares[first.name], second=shares[second.name], busy=busy)
            logger.info("same-core pair %d/%d: %s %.1f µs/request, %s %.1f µs/request: cost %.1f %% (CPU %.0f %% busy)",
                        index + 1, pairs, first.name, pair.first.us_per_request, second.name,
                        pair.second.us_per_request, 100 * pair.cost, 100 * busy)
            measured.append(pair)
    return measured


def _tree(target: Target) -> list[int]:
    if target.proxy_pid is None:
        raise BenchError(f"{target.name} has no process of its own to pin")
    return process_tree(target.proxy_pid)


def _run_together(order: Sequence[Target], *, settings: Settings, body_file: Path, wrk: str, seconds: float,
                  hop_cpus: set[int], load_cpus: set[int]) -> tuple[dict[str, CoreShare], float]:
    """One wrk per target, started in `order` and run at once; each tree's CPU over the same interval."""
    trees = {target.name: _tree(target) for target in order}  # again every run: a restarted writer is a new pid
    with pinned_apart([pid for tree in trees.values() for pid in tree], [], hop_cpus, load_cpus):
        shares, busy = _load_together(order, trees, settings=settings, body_file=body_file, wrk=wrk, seconds=seconds,
                                      load_cpus=load_cpus)
    return shares, busy


def _load_together(order: Sequence[Target], trees: dict[str, list[int]], *, settings: Settings, body_file: Path,
                   wrk: str, seconds: float, load_cpus: set[int]) -> tuple[dict[str, CoreShare], float]:
    """Run one wrk per target at once and read each process tree's CPU over the same interval."""
    connections = max(1, settings.connections // len(order))
    results: dict[str, WrkResult] = {}
    failures: list[BaseException] = []

    def load(target: Target) -> None:
        command = wrk_command(target.url, threads=1, connections=connections, seconds=seconds, wrk=wrk)
        try:
            results[target.name] = run_wrk(command, wrk_environment(body_file=body_file, users=settings.users),
                                           seconds, cpus=load_cpus)
        except BaseException as exc:  # re-raised below, on the caller's thread
            failures.append(exc)

    before = {name: snapshot(tree) for name, tree in trees.items()}
    started = time.monotonic()
    threads = [threading.Thread(target=load, args=(target,), name=f"wrk {target.name}") for target in order]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    if failures:
        raise failures[0]
    # A store writer at idle priority may be behind when the load stops, and one the balancer replaced
    # (starved) is a new process: its work is counted once it is done, over the whole tree as it is now.
    time.sleep(DRAIN_S)
    after = {name: snapshot(process_tree(tree[0])) for name, tree in trees.items()}
    shares = {}
    for name, tree in trees.items():
        total, writer = tree_cpu_between(tree[0], before[name], after[name])
        shares[name] = CoreShare(requests=results[name].requests, errors=results[name].errors,
                                 cpu_s=total.total_s, writer_s=writer.total_s)
    busy = sum(share.cpu_s for share in shares.values()) / elapsed if elapsed > 0 else float("nan")
    return shares, busy


def summarize(pairs: Sequence[SameCorePair], first: str, second: str) -> str:
    """The pairs' median cost, its range and, from 5 pairs on, its interval."""
    from bench.targets import CONFIDENCE, median_interval  # here: bench.results imports this module

    costs = [100 * pair.cost for pair in pairs]
    text = (f"{first} against {second}, same core: median cost {statistics.median(costs):.1f} % over {len(costs)} "
            f"pairs (range {min(costs):.1f} to {max(costs):.1f} %; {first} "
            f"{statistics.median(p.first.us_per_request for p in pairs):.1f} µs/request, of which store writer "
            f"{statistics.median(p.first.writer_us_per_request for p in pairs):.1f}; {second} "
            f"{statistics.median(p.second.us_per_request for p in pairs):.1f})")
    interval = median_interval(costs)
    if interval is None:
        return text + "; too few pairs for an interval (5 or more)"
    return text + f"; {100 * CONFIDENCE:.0f} % interval of the median {interval[0]:.1f} to {interval[1]:.1f} %"


def main(argv: list[str] | None = None) -> int:
    """Command line: start two no-op backends and two balancers, print each pair and the summary."""
    from bench.tools import ensure_tools
    from tests.processes import artifacts_dir

    parser = argparse.ArgumentParser(prog="python -m bench.same_core", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--first", choices=list(CONFIGURATIONS), default="default")
    parser.add_argument("--second", choices=list(CONFIGURATIONS), default="lean",
                        help="the same as --first gives an A/A run: the method's own bias and spread")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args(argv)
    if args.pairs < 1 or args.seconds <= 0:
        parser.error("--pairs must be at least 1 and --seconds above 0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    tools = ensure_tools()
    settings: Settings = replace(FULL, saturation_s=args.seconds)
    with scratch_folder("bench-same-core-") as folder, \
            Stack(folder, nginx=tools["nginx"], artifacts=artifacts_dir()) as stack:
        body_file = stack.body_file
        upstreams, backend_pids = stack.backends("noop")
        # distinct labels, so an A/A run starts two balancers
        first = stack.balancer("noop", replace(CONFIGURATIONS[args.first], label=f"first: {args.first}"),
                               upstreams, backend_pids)
        second = stack.balancer("noop", replace(CONFIGURATIONS[args.second], label=f"second: {args.second}"),
                                upstreams, backend_pids)
        stack.ready()
        measure_pairs(first, second, 1, settings=settings, body_file=body_file, wrk=tools["wrk"],
                      seconds=settings.warmup_s)  # pools and caches filled; not counted
        pairs = measure_pairs(first, second, args.pairs, settings=settings, body_file=body_file,
                              wrk=tools["wrk"], seconds=args.seconds)
    print(summarize(pairs, args.first, args.second))
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except BenchError as exc:
        raise SystemExit(f"bench.same_core: {exc}") from exc
