"""Saturation throughput of this checkout's balancer against another commit's, in back-to-back pairs.

    python -m bench.compare --base 2b94d0d [--method same-core|back-to-back|latency] [--pairs 8] [--seconds 4]
                            [--rate 12000] [--cores pinned|shared] [--configuration default] [--priority -5]
                            [--backends noop|model]

Does a change help? `make bench` measures one tree; its figures move by tens of per cent
between runs on a shared machine, more than most changes are worth. This checks `--base` out
into a temporary git worktree (compiling its request path there when it has
`scripts/build_native.py`, as `make native` does here), starts two no-op backends (`--backends
model`: the real model servers) and, in front of them, one balancer from each tree (sticky 50/50,
outcome log and metrics on, uvloop), then:

- `same-core` (the default): both balancers at once, their processes (store writers included)
  pinned to one CPU, each loaded by its own wrk from the other CPUs (`bench/same_core.py`). Each
  run gives the ratio of their CPU per request; whatever slows that CPU slows both alike, so a
  difference of a few per cent shows.
- `back-to-back`: wrk at saturation against each in turn, seconds apart, alternating which goes
  first; each pair's throughput ratio. Closer to how the balancer is used, but noisier.
- `latency`: the tail instead of throughput. Fixed-rate runs (`bench.openloop` at `--rate`)
  against each in turn, alternating which goes first, with the balancer under test (store writer
  included) pinned to one CPU and the client and backends to the others, as `make bench`'s
  "hop on a CPU of its own" runs (`--cores shared`: no pinning, everything shares every CPU, as
  `make bench`'s main fixed-rate runs); each pair's p99 difference, this tree's minus base's.

`--configuration` runs this tree's balancer with features off (as `bench.same_core` names them),
against base's default: `--base HEAD --configuration outcomes-off` measures what the outcome log costs.
`--priority N` runs this tree's balancer at `server.priority: N`: `--base HEAD --method latency --cores
shared --priority -5` measures what running ahead of the backends and the client does to the tail.

The median over the pairs is the answer.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path

from balancer import native
from bench.errors import BenchError
from bench.targets import CONFIDENCE, median_interval
from bench.procstat import split_cpus
from bench.runs import (FULL, FixedRateSample, measure_fixed_rate, measure_saturation, paired_samples,
                        throughput_ratio)
from bench.same_core import CONFIGURATIONS, measure_pairs
from bench.stack import KINDS, BalancerOptions, Stack, scratch_folder
from bench.tools import ensure_tools
from tests.processes import REPO, artifacts_dir

logger = logging.getLogger("bench.compare")
BASE_LABEL = "base"


def checkout(commit: str, folder: Path) -> Path:
    """A worktree of `commit` in `folder`, its request path compiled if it has the build script."""
    worktree = folder / "base"
    result = subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(worktree), commit],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise BenchError(f"git worktree add {commit} failed: {result.stderr.strip()}")
    if (worktree / "scripts" / "build_native.py").exists():
        logger.info("compiling %s's request path", commit)
        build = subprocess.run([sys.executable, "scripts/build_native.py"], cwd=worktree, capture_output=True, text=True,
                               env={**os.environ, "PYTHONPATH": str(worktree)}, check=False)
        if build.returncode != 0:
            raise BenchError(f"building {commit}'s request path failed:\n{build.stderr[-1500:]}")
    return worktree


def main(argv: list[str] | None = None) -> int:
    """Command line: the pairs and their median ratio."""
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the commit to compare against (anything git rev-parse takes)")
    parser.add_argument("--method", choices=("same-core", "back-to-back", "latency"), default="same-core")
    parser.add_argument("--backends", choices=KINDS, default="noop",
                        help="what the balancers proxy to: the no-op backends or the real model servers")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each run")
    parser.add_argument("--rate", type=float, default=12000.0, help="requests/s of the latency method's runs")
    parser.add_argument("--cores", choices=("pinned", "shared"), default="pinned",
                        help="latency method: the hop on a CPU of its own, or every process on every CPU")
    parser.add_argument("--configuration", choices=tuple(CONFIGURATIONS), default="default",
                        help="this tree's balancer configuration (base's is the default)")
    parser.add_argument("--priority", type=int, metavar="NICENESS",
                        help="run this tree's balancer at server.priority NICENESS (base's as started)")
    args = parser.parse_args(argv)
    if args.pairs < 1 or args.seconds <= 0 or args.rate <= 0:
        parser.error("--pairs must be at least 1, --seconds and --rate above 0")
    split = split_cpus() if args.cores == "pinned" else None
    if args.method == "latency" and args.cores == "pinned" and split is None:
        parser.error("--method latency needs two CPUs or more: one for the hop, the others for the client")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    tools = ensure_tools()
    settings = replace(FULL, saturation_s=args.seconds)
    with scratch_folder("bench-compare-") as folder:
        try:
            base = checkout(args.base, folder)
            with Stack(folder, nginx=tools["nginx"], artifacts=artifacts_dir()) as stack:
                body_file = stack.body_file
                upstreams, backend_pids = stack.backends(args.backends)
                this = stack.balancer(args.backends, replace(CONFIGURATIONS[args.configuration],
                                                             priority=args.priority), upstreams, backend_pids)
                other = stack.balancer(args.backends, BalancerOptions(BASE_LABEL), upstreams, backend_pids,
                                       source=base)
                stack.ready()
                if args.method == "same-core":
                    together = partial(measure_pairs, this, other, settings=settings, body_file=body_file,
                                       wrk=tools["wrk"])
                    together(1, seconds=settings.warmup_s)  # connection pools and caches filled; not measured
                    # this tree's throughput over base's on a saturated core: base's CPU per request over this one's
                    ratios = [pair.second.us_per_request / pair.first.us_per_request
                              for pair in together(args.pairs, seconds=args.seconds)]
                elif args.method == "latency":
                    fixed = partial(measure_fixed_rate, rate=args.rate, body_file=body_file, pinned=split,
                                    settings=replace(settings, fixed_rate_s=args.seconds))
                    for target in (this, other):  # connection pools and caches filled; not measured
                        fixed(target)
                    latency_pairs = paired_samples(this, other, args.pairs, fixed, pause_s=settings.pause_s)
                else:
                    saturate = partial(measure_saturation, settings=settings, body_file=body_file, wrk=tools["wrk"])
                    for target in (this, other):  # connection pools and caches filled; not measured
                        saturate(target, seconds=settings.warmup_s)
                    pairs = paired_samples(this, other, args.pairs, saturate, pause_s=settings.pause_s)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(folder / "base")],
                           capture_output=True, check=False)
    configuration = args.configuration + ("" if args.priority is None else f", server.priority {args.priority}")
    tree = (f"this tree ({native.decide(native.PACKAGE_DIR, os.environ)[1]}, {configuration}) / "
            f"{args.base} (default)")
    if args.method == "same-core":
        print(f"{tree}, both on one core (base's CPU per request ÷ this tree's): " + summarize(ratios, args.seconds))
        return 0
    if args.method == "latency":
        cores = "the hop on a CPU of its own" if split else "every process on every CPU"
        print(f"{tree}, p99 at {args.rate:g} req/s, {cores}: "
              + summarize_latency(latency_pairs, args.seconds))
        return 0
    print(f"{tree}: " + summarize([throughput_ratio(pair) for pair in pairs], args.seconds))
    print("the same, steal-adjusted (requests/s ÷ (1 − steal) per run): "
          + summarize([throughput_ratio(pair, steal_adjusted=True) for pair in pairs], args.seconds))
    return 0


def summarize(ratios: list[float], seconds: float) -> str:
    """The pairs' median ratio, range and, from 5 pairs on, its interval and what it establishes."""
    ordered = sorted(ratios)
    text = (f"median {statistics.median(ratios):.3f} over {len(ratios)} pairs of {seconds:g} s "
            f"(range {ordered[0]:.3f} to {ordered[-1]:.3f}; above 1 means this tree is faster)")
    interval = median_interval(ratios)
    if interval is None:
        return text + "; too few pairs for an interval (5 or more)"
    low, high = interval
    finding = ("this tree is faster" if low > 1 else "this tree is slower" if high < 1
               else "no difference established")
    return text + f"; {100 * CONFIDENCE:.0f} % interval of the median {low:.3f} to {high:.3f}: {finding}"


def summarize_latency(pairs: list[tuple[FixedRateSample, FixedRateSample]], seconds: float) -> str:
    """The pairs' p99s, their median difference (this tree's minus base's) and, from 5 pairs on, its interval."""
    differences = [this.p99_ms - base.p99_ms for this, base in pairs]
    ordered = sorted(differences)
    errors = sum(this.errors + base.errors for this, base in pairs)
    text = (f"median p99 {statistics.median(this.p99_ms for this, _ in pairs):.2f} ms against "
            f"{statistics.median(base.p99_ms for _, base in pairs):.2f} ms; median difference "
            f"{statistics.median(differences):+.2f} ms over {len(pairs)} pairs of {seconds:g} s "
            f"(range {ordered[0]:+.2f} to {ordered[-1]:+.2f} ms; below 0 means this tree's tail is shorter; "
            f"{errors} errors)")
    interval = median_interval(differences)
    if interval is None:
        return text + "; too few pairs for an interval (5 or more)"
    low, high = interval
    finding = ("this tree's tail is shorter" if high < 0 else "this tree's tail is longer" if low > 0
               else "no difference established")
    return text + f"; {100 * CONFIDENCE:.0f} % interval of the median {low:+.2f} to {high:+.2f} ms: {finding}"


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except BenchError as exc:
        raise SystemExit(f"bench.compare: {exc}") from exc
