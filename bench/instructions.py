"""Instructions per proxied request, counted by valgrind: a measure the machine's noise cannot move.

    python -m bench.instructions [--kinds floor lean default] [outcomes-off metrics-off]

CPU seconds at saturation (`make bench`) swing by tens of percent on a shared machine; an
instruction count does not. Each kind runs the public port's real code in one process with
fake transports (no sockets, so no kernel work and no load generator): a request goes into
`balancer.http_server`, through the handler, out to a pooled upstream connection, whose
canned answer comes back to the client. `valgrind --tool=callgrind --trace-children=yes` counts
the instructions of every thread and of the outcome store's writer process; the figure is the difference between a run
of 2,304 and one of 256 requests, divided by 2,048, so start-up and imports cancel out. Each run is repeated
and the least count kept (see REPEATS).
The outcome log is flushed every 256 requests from the driving loop rather than on the
writer's timer, so every batch fills the largest INSERT statement, as at saturation, and
both runs prepare the same statements: with timed flushes the batch sizes, and so the
statements SQLite compiles, depend on how fast valgrind runs.

Kinds: `floor` is `bench.floor_proxy.FloorHandler` (forwarding only); `lean` is the balancer
with outcome logging and metrics off; `default` is the balancer as it ships; `outcomes-off` and
`metrics-off` (named as in `bench.same_core`) have one feature off, to count the other's share.
`make bench` counts the first three (MAKE_BENCH_KINDS).

    python -m bench.instructions --functions default [--top 15] [--self]

says where one kind's instructions per request go: each function's inclusive count per request
(the same difference of a long and a short run, from `callgrind_annotate --inclusive=yes`; with
`--self`, its own count, without what it calls), in the balancer's process and in its store writer process.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from balancer import store_writer
from balancer.app import assemble
from balancer.config import parse_experiment
from balancer.http_server import ClientConnection, HttpServer
from balancer.upstream_client import ConnectionPool, UpstreamConnection
from bench.errors import BenchError
from bench.floor_proxy import FloorHandler
from bench.stack import BalancerOptions, balancer_yaml

KINDS = {
    "floor": None,
    "lean": BalancerOptions("lean", record_outcomes=False, export_metrics=False),
    "default": BalancerOptions("default"),
    "outcomes-off": BalancerOptions("outcomes off", record_outcomes=False),
    "metrics-off": BalancerOptions("metrics off", export_metrics=False),
}
MAKE_BENCH_KINDS = ("floor", "lean", "default")
FLUSH_EVERY = store_writer.MAX_ROWS_PER_STATEMENT
# Multiples of FLUSH_EVERY: every batch is a full one, and close() has nothing left to write.
WARM_UP = FLUSH_EVERY
# The long run is long enough for the store's periodic WAL checkpoints to average out.
SHORT_RUN, LONG_RUN = FLUSH_EVERY, 9 * FLUSH_EVERY
# Each count is the least of this many runs. The store writer's count is not quite deterministic: whether
# a WAL checkpoint runs inside a run depends on how the writer's commits and the balancer's reads interleave,
# and one such checkpoint moved the per-request figure by up to 5,000 instructions.
REPEATS = 2
WRITER = "writer"  # the store writer process's share of `default`, reported under its own key (`WRITER` + kind for the others)
UPSTREAMS = {"model_a": "127.0.0.1:9", "model_b": "127.0.0.1:9"}  # never connected to: the transports are fake
BODY = json.dumps({"instances": [[0.5] * 30]}).encode()
UPSTREAM_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 80\r\n\r\n" + b"x" * 80


class _FakeTransport:
    """Just enough of asyncio.Transport: writes go to a callback."""

    def __init__(self, on_write: Any) -> None:
        self.on_write = on_write
        self.closing = False

    def write(self, data: bytes) -> None:
        self.on_write(data)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def drive(kind: str, requests: int, workdir: Path) -> int:
    """Proxy `requests` requests (after a warm-up) through `kind`; the number answered with a 200."""
    options = KINDS[kind]
    config = workdir / "experiment.yaml"
    config.write_text(balancer_yaml(options or BalancerOptions("floor"), UPSTREAMS))
    loaded = parse_experiment(config.read_text(), source=str(config))
    core = await assemble(config, loaded, workdir / "outcomes.db", flush_interval_s=3600.0)
    handler: Any = core.proxy
    pools = [endpoint.pool for upstreams in core.registry.variants.values() for endpoint in upstreams.endpoints]
    if options is None:
        floor_pools = [(name, ConnectionPool("127.0.0.1", 9)) for name in UPSTREAMS]
        handler = FloorHandler(itertools.cycle(floor_pools))
        pools = [pool for _, pool in floor_pools]
    sent: list[UpstreamConnection] = []
    answers: list[bytes] = []

    for pool in pools:  # one kept-alive connection per pool, whose writes are captured: nothing connects
        pool.idle_timeout = math.inf  # under valgrind a pool can sit unused for longer than the real timeout
        connection = UpstreamConnection(pool)
        connection.connection_made(_FakeTransport(lambda data, connection=connection: sent.append(connection)))  # type: ignore[arg-type]
        connection.keep_alive = True
        pool.release(connection)
    client = ClientConnection(HttpServer(handler, max_body_bytes=1 << 20, body_timeout_s=10, keepalive_timeout_s=60))
    client.connection_made(_FakeTransport(answers.append))  # type: ignore[arg-type]
    payloads = [b"POST /predict HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nX-User-ID: user-%d\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (user, len(BODY), BODY) for user in range(1000)]
    ok = 0
    for index in range(WARM_UP + requests):
        client.data_received(payloads[index % len(payloads)])
        sent.pop().data_received(UPSTREAM_ANSWER)
        while not answers:
            await asyncio.sleep(0)
        ok += answers.pop().startswith(b"HTTP/1.1 200 ")
        if (index + 1) % FLUSH_EVERY == 0:
            core.events.flush()
    core.events.close()  # the last batch is committed inside the counted run
    await core.registry.close()
    return ok - WARM_UP


def _count(kind: str, requests: int) -> tuple[int, int]:
    """Instructions of one whole run under callgrind: (the balancer's process, its child processes)."""
    command = ["valgrind", "--tool=callgrind", "--trace-children=yes", "--callgrind-out-file=/dev/null",
               sys.executable, "-m", "bench.instructions", "--run", kind, str(requests)]
    # A fixed hash seed: string hashes decide dict collisions, and so some of the count.
    environment = {**os.environ, "PYTHONHASHSEED": "0"}
    result = subprocess.run(command, capture_output=True, text=True, check=False, env=environment)
    counts = [int(line.split()[-1]) for line in result.stderr.splitlines() if "Collected :" in line]
    if result.returncode == 0 and counts:
        counts.sort()  # one per process; the balancer's, which imports everything, is by far the largest
        return counts[-1], sum(counts[:-1])
    raise BenchError(f"callgrind gave no count for {kind} ({result.returncode}): {result.stderr[-500:]}")


def measure(kinds: list[str]) -> dict[str, float]:
    """Instructions per request of each kind, all processes together (two callgrind runs each, all in parallel);
    under WRITER, how many of `default`'s ran in its store writer process (under WRITER + kind, another kind's
    with a store writer)."""
    if shutil.which("valgrind") is None:
        raise BenchError("valgrind is not installed: apt-get install -y valgrind")
    jobs = [(kind, requests) for kind in kinds for requests in (SHORT_RUN, LONG_RUN)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        repeated = list(pool.map(lambda job: _count(*job), [job for job in jobs for _ in range(REPEATS)]))
    counts = {}
    for index, job in enumerate(jobs):
        samples = repeated[index * REPEATS:(index + 1) * REPEATS]
        counts[job] = (min(sample[0] for sample in samples), min(sample[1] for sample in samples))
    runs = LONG_RUN - SHORT_RUN
    per_request = {kind: (sum(counts[kind, LONG_RUN]) - sum(counts[kind, SHORT_RUN])) / runs for kind in kinds}
    for kind in kinds:
        options = KINDS[kind]
        if options is not None and options.record_outcomes:
            per_request[writer_key(kind)] = (counts[kind, LONG_RUN][1] - counts[kind, SHORT_RUN][1]) / runs
    return per_request


# A line of `callgrind_annotate`: "  222,265,172 (40.01%)  /path/cursor.c:bind_param [/path/_sqlite3.so]"
_CALL_COUNT = re.compile(r" \([\d,]+x\)$")
_ANNOTATED = re.compile(r"^\s*([\d,]+) \([^)]*\)\s+(\S.*?)(?: \[[^\]]*\])?$")


def _function_counts(kind: str, requests: int, folder: Path, inclusive: bool = True) -> dict[str, dict[str, int]]:
    """One run of `kind` under callgrind: process ("balancer" or "writer") -> function -> instructions (inclusive:
    with those of the functions it calls; else its own only)."""
    pattern = folder / f"{requests}.%p"
    command = ["valgrind", "--tool=callgrind", "--trace-children=yes", f"--callgrind-out-file={pattern}",
               sys.executable, "-m", "bench.instructions", "--run", kind, str(requests)]
    result = subprocess.run(command, capture_output=True, text=True, check=False, env={**os.environ, "PYTHONHASHSEED": "0"})
    if result.returncode != 0:
        raise BenchError(f"callgrind failed for {kind} ({result.returncode}): {result.stderr[-500:]}")
    counts: dict[str, dict[str, int]] = {}
    for output in folder.glob(f"{requests}.*"):
        header = output.read_text(errors="replace")[:2000]
        process = "writer" if "balancer.store_writer" in header else "balancer" if "bench.instructions" in header else None
        if process is None:
            continue
        annotated = subprocess.run(["callgrind_annotate", f"--inclusive={'yes' if inclusive else 'no'}",
                                    "--threshold=100", str(output)], capture_output=True, text=True, check=True).stdout
        counts[process] = parse_annotated(annotated)
    return counts


def parse_annotated(annotated: str) -> dict[str, int]:
    """`callgrind_annotate` output -> "file.c:function" -> instructions (the same name in two places summed)."""
    functions: dict[str, int] = {}
    for line in annotated.splitlines():
        match = _ANNOTATED.match(line)
        # callgrind marks a recursive function's inner cycles with 'N (counted again inclusively), and
        # code without symbols by its address: neither names a place to look
        if match and ":" in match[2] and not re.search(r"'\d+$", match[2]) and ":0x" not in match[2]:
            # a name may carry its call count, "fn (1,234x)", where it shows apart from the same function without
            file, _, function = _CALL_COUNT.sub("", match[2]).rpartition(":")
            name = f"{Path(file).name}:{function}"
            functions[name] = functions.get(name, 0) + int(match[1].replace(",", ""))
    return functions


def function_profile(kind: str, inclusive: bool = True) -> dict[str, list[tuple[str, float]]]:
    """Process -> (function, instructions per request), largest first: a long run's counts minus a short run's,
    over the requests between them (start-up and imports cancel out). Inclusive counts leave out the chain of
    callers every request runs under (main, the event loop: within 5 % of the largest); the first entry is the
    process's whole count either way."""
    with tempfile.TemporaryDirectory(prefix="bench-functions-") as scratch:
        short = _function_counts(kind, SHORT_RUN, Path(scratch), inclusive)
        long = _function_counts(kind, LONG_RUN, Path(scratch), inclusive)
    runs = LONG_RUN - SHORT_RUN
    profile = {}
    for process, functions in long.items():
        before = short.get(process, {})
        per_request = sorted(((name, (count - before.get(name, 0)) / runs) for name, count in functions.items()),
                             key=lambda item: -item[1])
        if inclusive:
            whole = per_request[0][1] if per_request else 0.0
            per_request = [item for item in per_request if item[1] < 0.95 * whole]
        else:
            whole = sum(count for _, count in per_request)
        profile[process] = [("(everything)", whole)] + per_request
    return profile


def writer_key(kind: str) -> str:
    """Where `measure` puts the share of `kind`'s instructions that ran in its store writer process."""
    return WRITER if kind == "default" else f"{WRITER} {kind}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", nargs="+", choices=list(KINDS), default=list(MAKE_BENCH_KINDS))
    parser.add_argument("--run", nargs=2, metavar=("KIND", "REQUESTS"), help=argparse.SUPPRESS)  # one counted run
    parser.add_argument("--functions", choices=list(KINDS), metavar="KIND",
                        help="instead: where KIND's instructions per request go, function by function")
    parser.add_argument("--top", type=int, default=15, help="with --functions: functions shown per process")
    parser.add_argument("--self", action="store_true", dest="exclusive",
                        help="with --functions: each function's own instructions, without those of what it calls")
    args = parser.parse_args()
    if args.functions:
        for process, functions in function_profile(args.functions, inclusive=not args.exclusive).items():
            print(f"{args.functions}: {process} process, {'own' if args.exclusive else 'inclusive'} instructions per request")
            for name, count in functions[:args.top]:
                print(f"  {count:>10,.0f}  {name}")
        return
    if args.run:
        kind, requests = args.run[0], int(args.run[1])
        with tempfile.TemporaryDirectory(prefix="bench-instructions-") as folder:
            answered = asyncio.run(drive(kind, requests, Path(folder)))
        if answered != requests:
            raise SystemExit(f"{kind}: only {answered} of {requests} requests answered 200")
        return
    per_request = measure(args.kinds)
    previous = None
    for kind in args.kinds:
        delta = "" if previous is None else f"  ({per_request[kind] - per_request[previous]:+,.0f} over {previous})"
        print(f"{kind:12s} {per_request[kind]:>9,.0f} instructions/request{delta}")
        previous = kind
    for kind in args.kinds:
        writer = per_request.get(writer_key(kind))
        if writer is not None:
            print(f"{'':12s} of which {writer:,.0f} in {kind}'s store writer process")


if __name__ == "__main__":
    main()
