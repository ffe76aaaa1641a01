"""What the no-op backends cost at a fixed rate, on each event loop they can run on.

    python -m bench.backend_cost [--rate 17000] [--rounds 5] [--seconds 4]

`make bench`'s no-op backends (`tests/noop_backend.py`) stand in for a model that costs nothing,
so that what is measured is the hop. They share the two cores with the hop and the load
generator, though, and at a fixed rate every request wakes them on its own: what they use then
is taken from the others. This starts two backends on each event loop (uvloop, the default,
and asyncio's own) and sends `bench.openloop` straight at them, half the connections each, in
interleaved rounds: the backends' CPU per request (from `/proc/<pid>/stat`, warm-up included)
and the client's, medians over the rounds.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace

from bench.errors import BenchError
from bench.runs import FULL, FixedRateSample, interleaved, measure_fixed_rate, median
from bench.stack import Stack, scratch_folder

logger = logging.getLogger(__name__)

EVENT_LOOPS = ("uvloop", "asyncio")


def measure(stack: Stack, *, rate: float, rounds: int, seconds: float) -> dict[str, list[FixedRateSample]]:
    """Event loop -> its backends' direct fixed-rate runs, `rounds` each, interleaved."""
    targets = []
    for event_loop in EVENT_LOOPS:
        upstreams, pids = stack.backends("noop", event_loop=event_loop)
        targets.append(replace(stack.direct("noop", upstreams, pids), name=event_loop))
    stack.ready()
    settings = replace(FULL, fixed_rate_s=seconds)
    return interleaved(targets, rounds, lambda target: measure_fixed_rate(target, rate, settings, stack.body_file),
                       pause_s=settings.pause_s, what="backend cost")


def summarize(runs: dict[str, list[FixedRateSample]]) -> list[str]:
    """One line per event loop: the medians, and each round's backends' figure."""
    return [f"{event_loop:8} backends {median([run.backend_us_per_request for run in samples]):5.1f} µs/req "
            f"(rounds: {', '.join(f'{run.backend_us_per_request:.1f}' for run in samples)}), client "
            f"{median([run.client_us_per_request for run in samples]):5.1f} µs/req, p99 "
            f"{median([run.p99_ms for run in samples]):.2f} ms, errors {sum(run.errors for run in samples)}"
            for event_loop, samples in runs.items()]


def main(argv: list[str] | None = None) -> int:
    """Command line: print each event loop's medians."""
    from bench.tools import ensure_tools
    from tests.processes import artifacts_dir

    parser = argparse.ArgumentParser(prog="python -m bench.backend_cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=17000.0, help="requests/s")
    parser.add_argument("--rounds", type=int, default=5, help="runs per event loop, interleaved")
    parser.add_argument("--seconds", type=float, default=FULL.fixed_rate_s, help="length of each run")
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.rounds < 1 or args.seconds <= 0:
        parser.error("--rate and --seconds must be above 0, --rounds at least 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    tools = ensure_tools()
    with scratch_folder("bench-backend-cost-") as folder, \
            Stack(folder, nginx=tools["nginx"], artifacts=artifacts_dir()) as stack:
        runs = measure(stack, rate=args.rate, rounds=args.rounds, seconds=args.seconds)
    print(f"no-op backends at {args.rate:g} req/s, direct, {args.rounds} rounds of {args.seconds:g} s "
          "(CPU per request dispatched, medians):")
    print("\n".join(summarize(runs)))
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except BenchError as exc:
        raise SystemExit(f"bench.backend_cost: {exc}") from exc
