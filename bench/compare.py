"""Saturation throughput of this checkout's balancer against another commit's, in back-to-back pairs.

    python -m bench.compare --base 2b94d0d [--method same-core|back-to-back] [--pairs 8] [--seconds 4]

Does a change help? `make bench` measures one tree; its figures move by tens of per cent
between runs on a shared machine, more than most changes are worth. This checks `--base` out
into a temporary git worktree (compiling its request path there when it has
`scripts/build_native.py`, as `make native` does here), starts two no-op backends and, in front
of them, one balancer from each tree (sticky 50/50, outcome log and metrics on, uvloop), then:

- `same-core` (the default): both balancers at once, their processes (store writers included)
  pinned to one CPU, each loaded by its own wrk from the other CPUs (`bench/same_core.py`). Each
  run gives the ratio of their CPU per request; whatever slows that CPU slows both alike, so a
  difference of a few per cent shows.
- `back-to-back`: wrk at saturation against each in turn, seconds apart, alternating which goes
  first; each pair's throughput ratio. Closer to how the balancer is used, but noisier.

The median ratio over the pairs is the answer.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import replace
from functools import partial
from pathlib import Path

from balancer import native
from bench.errors import BenchError
from bench.report import CONFIDENCE, median_interval
from bench.runs import FULL, measure_saturation, paired_samples, throughput_ratio
from bench.same_core import measure_pairs
from bench.stack import BalancerOptions, Stack
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
    parser.add_argument("--method", choices=("same-core", "back-to-back"), default="same-core")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each run")
    args = parser.parse_args(argv)
    if args.pairs < 1 or args.seconds <= 0:
        parser.error("--pairs must be at least 1 and --seconds above 0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    tools = ensure_tools()
    settings = replace(FULL, saturation_s=args.seconds)
    with tempfile.TemporaryDirectory(prefix="bench-compare-") as scratch:
        folder = Path(scratch)
        folder.chmod(0o711)
        try:
            base = checkout(args.base, folder)
            with Stack(folder, nginx=tools["nginx"], artifacts=artifacts_dir()) as stack:
                body_file = folder / "body.json"
                body_file.write_bytes(stack.body)
                upstreams, backend_pids = stack.backends("noop")
                this = stack.balancer("noop", BalancerOptions("default"), upstreams, backend_pids)
                other = stack.balancer("noop", BalancerOptions(BASE_LABEL), upstreams, backend_pids, source=base)
                stack.ready()
                if args.method == "same-core":
                    together = partial(measure_pairs, this, other, settings=settings, body_file=body_file,
                                       wrk=tools["wrk"])
                    together(1, seconds=settings.warmup_s)  # connection pools and caches filled; not measured
                    # this tree's throughput over base's on a saturated core: base's CPU per request over this one's
                    ratios = [pair.second.us_per_request / pair.first.us_per_request
                              for pair in together(args.pairs, seconds=args.seconds)]
                else:
                    saturate = partial(measure_saturation, settings=settings, body_file=body_file, wrk=tools["wrk"])
                    for target in (this, other):  # connection pools and caches filled; not measured
                        saturate(target, seconds=settings.warmup_s)
                    pairs = paired_samples(this, other, args.pairs, saturate, pause_s=settings.pause_s)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(folder / "base")],
                           capture_output=True, check=False)
    tree = f"this tree ({native.decide(native.PACKAGE_DIR, os.environ)[1]}) / {args.base}"
    if args.method == "same-core":
        print(f"{tree}, both on one core (base's CPU per request ÷ this tree's): " + summarize(ratios, args.seconds))
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


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except BenchError as exc:
        raise SystemExit(f"bench.compare: {exc}") from exc
