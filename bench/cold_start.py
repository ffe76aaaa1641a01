"""The first seconds of a balancer's life: latency of a fixed-rate load started the moment it is ready.

    python -m bench.cold_start [--rate 6000] [--windows 5] [--seconds 1] [--starts 3] [--configuration default]

`make bench` warms every balancer up at saturation before it measures, so its figures are those
of a balancer that has served for a while. A user's first traffic meets a fresh one: empty
connection pools, an outcome log whose writer has not started, caches and allocator arenas not
yet grown. Each start here launches a new balancer (sticky 50/50, outcome log and metrics on) in
front of two no-op backends, waits for its health check, then sends `--windows` consecutive
fixed-rate runs of `--seconds` each (`bench.openloop`, no warm-up: the first request is the
first the balancer proxies). A window's p99 against the last window's says what a cold start
costs; over `--starts` fresh balancers the median of each window is printed.
"""

from __future__ import annotations

import argparse
import logging
import statistics
from dataclasses import replace

from bench.errors import BenchError
from bench.runs import FULL, FixedRateSample, Settings, measure_fixed_rate
from bench.same_core import CONFIGURATIONS
from bench.stack import BalancerOptions, Stack, scratch_folder

logger = logging.getLogger(__name__)


def windows_after_start(stack: Stack, upstreams: dict[str, str], backend_pids: tuple[int, ...], *, label: str,
                        rate: float, windows: int, settings: Settings,
                        options: BalancerOptions | None = None) -> list[FixedRateSample]:
    """Start a fresh balancer (`options`, relabelled; the default's if None), then `windows` fixed-rate runs
    back to back, the first at once."""
    target = stack.balancer("noop", replace(options or BalancerOptions(label), label=label), upstreams, backend_pids)
    stack.ready()
    return [measure_fixed_rate(target, rate, settings, stack.body_file) for _ in range(windows)]


def measure_starts(stack: Stack, *, starts: int, rate: float, windows: int, window_s: float, settings: Settings,
                   options: BalancerOptions | None = None) -> list[list[FixedRateSample]]:
    """`starts` fresh balancers one after another in front of the no-op backends, each with its windows of
    `window_s` from the moment it is ready (`windows_after_start`)."""
    upstreams, backend_pids = stack.backends("noop")
    stack.ready()
    window = replace(settings, fixed_rate_s=window_s, warmup_s=0.0)
    measured = []
    for start in range(starts):
        samples = windows_after_start(stack, upstreams, backend_pids, label=f"cold start {start + 1}", rate=rate,
                                      windows=windows, settings=window, options=options)
        logger.info("cold start %d/%d at %.0f req/s: p99 per %g s window %s ms", start + 1, starts, rate, window_s,
                    ", ".join(f"{sample.p99_ms:.2f}" for sample in samples))
        measured.append(samples)
    return measured


def summarize(starts: list[list[FixedRateSample]], seconds: float) -> list[str]:
    """One line per window: the median p50 and p99 over the starts, and the p99 of each start."""
    lines = []
    for index in range(len(starts[0])):
        window = [samples[index] for samples in starts]
        lines.append(
            f"window {index + 1} ({index * seconds:g}-{(index + 1) * seconds:g} s after ready): "
            f"p50 {statistics.median(sample.p50_ms for sample in window):.2f} ms, "
            f"p99 {statistics.median(sample.p99_ms for sample in window):.2f} ms (each start: "
            + ", ".join(f"{sample.p99_ms:.2f}" for sample in window)
            + f"), errors {sum(sample.errors for sample in window)}")
    first = statistics.median(samples[0].p99_ms for samples in starts)
    last = statistics.median(samples[-1].p99_ms for samples in starts)
    lines.append(f"first window's p99 over the last window's: {first / last:.2f}x (median over {len(starts)} starts)")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Command line: print each window's latency over the fresh starts."""
    from bench.tools import ensure_tools
    from tests.processes import artifacts_dir

    parser = argparse.ArgumentParser(prog="python -m bench.cold_start", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=6000.0, help="requests/s")
    parser.add_argument("--windows", type=int, default=5, help="consecutive runs after each start")
    parser.add_argument("--seconds", type=float, default=1.0, help="length of each window")
    parser.add_argument("--starts", type=int, default=3, help="fresh balancers, one after another")
    parser.add_argument("--configuration", choices=tuple(CONFIGURATIONS), default="default",
                        help="the balancers' features (as bench.same_core names them)")
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.windows < 2 or args.seconds <= 0 or args.starts < 1:
        parser.error("--rate and --seconds must be above 0, --windows at least 2, --starts at least 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    tools = ensure_tools()
    with scratch_folder("bench-cold-start-") as folder, \
            Stack(folder, nginx=tools["nginx"], artifacts=artifacts_dir()) as stack:
        starts = measure_starts(stack, starts=args.starts, rate=args.rate, windows=args.windows, window_s=args.seconds,
                                settings=FULL, options=CONFIGURATIONS[args.configuration])
    print(f"fixed rate {args.rate:g} req/s from the moment a fresh balancer ({args.configuration}) is ready, "
          f"{args.starts} starts:")
    print("\n".join(summarize(starts, args.seconds)))
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except BenchError as exc:
        raise SystemExit(f"bench.cold_start: {exc}") from exc
