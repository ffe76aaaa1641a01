"""Fixed-rate (open-loop) load: requests start on a schedule, whether or not earlier ones have finished.

wrk is closed-loop (a connection sends its next request only when the last one is
answered) and Debian has no wrk2, so latency at a fixed rate comes from this client:
asyncio + raw sockets + httptools, one request bytes string per user built up front, so
each request costs the client a `write` and a C-parsed response (~20-40 µs of CPU).

Timing: request i is due at start + i / rate. A request is *dispatched* when the
scheduler gets to it (at most ~1 ms after it is due: the event loop's timer
granularity; reported as `late_ms_p99`) and its latency runs from dispatch to the last
byte of the answer. If no connection is free at dispatch it waits in a queue and that
wait counts (the server's slowness, not hidden: no coordinated omission).

    python -m bench.openloop --url http://127.0.0.1:8080/predict --rate 1000 --seconds 8 \
        --body-file body.json [--spread 127.0.0.1:9001,127.0.0.1:9002]

prints one JSON line: rate, sent, completed, errors, latency percentiles in ms, client CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httptools

DRAIN_TIMEOUT_S = 5.0


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0-100) of already sorted values; NaN if there are none."""
    if not sorted_values:
        return float("nan")
    rank = max(1, -(-len(sorted_values) * q // 100))  # ceil without floats going wrong at q = 100
    return sorted_values[min(len(sorted_values), int(rank)) - 1]


def build_requests(*, host: str, path: str, body: bytes, users: int) -> list[bytes]:
    """One ready-to-send POST per user, as wrk's post.lua sends them."""
    return [
        b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nX-User-ID: user-%d\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (path.encode(), host.encode(), user, len(body), body)
        for user in range(users)
    ]


@dataclass
class Tally:
    """Latencies and counts of the measured part of a run."""

    latencies_s: list[float]
    late_s: list[float]
    sent: int = 0
    completed: int = 0
    non_2xx: int = 0
    connection_errors: int = 0
    queued: int = 0


class Connection(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time."""

    def __init__(self, client: OpenLoopClient, address: tuple[str, int]) -> None:
        self.client = client
        self.address = address
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.started = 0.0
        self.measured = False
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, request: bytes, started: float, measured: bool) -> None:
        """Write one request; `started` is when its latency clock began."""
        assert self.transport is not None
        self.started, self.measured, self.busy = started, measured, True
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def on_message_complete(self) -> None:
        finished = time.perf_counter()
        self.busy = False
        self.client.answered(self, finished - self.started, self.measured, self.parser.get_status_code())

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.lost(self)


class OpenLoopClient:
    """Sends `rate` requests per second for warm-up + measured seconds over a fixed set of connections."""

    def __init__(self, *, requests: list[bytes], addresses: Sequence[tuple[str, int]], rate: float,
                 seconds: float, warmup_s: float, connections: int) -> None:
        if rate <= 0 or seconds <= 0 or connections < 1 or not addresses:
            raise ValueError(f"rate = {rate}, seconds = {seconds}, connections = {connections}, "
                             f"addresses = {list(addresses)}: need rate, seconds > 0 and at least one of each")
        self.requests = requests
        self.addresses = list(addresses)
        self.rate = rate
        self.seconds = seconds
        self.warmup_s = warmup_s
        self.connection_count = connections
        self.idle: list[Connection] = []
        self.waiting: collections.deque[tuple[bytes, float, bool]] = collections.deque()
        self.outstanding = 0
        self.tally = Tally(latencies_s=[], late_s=[])
        self.all_answered = asyncio.Event()
        self.closing = False
        self.connections: set[Connection] = set()
        self.background: set[asyncio.Task[None]] = set()

    async def run(self) -> dict[str, Any]:
        """Connect, send on schedule, wait for the stragglers; the JSON-able summary."""
        for index in range(self.connection_count):
            self.idle.append(await self._connect(self.addresses[index % len(self.addresses)]))
        total = int(self.rate * (self.warmup_s + self.seconds))
        first_measured = int(self.rate * self.warmup_s)
        start = time.perf_counter()
        cpu_before = resource.getrusage(resource.RUSAGE_SELF)
        index = 0
        while index < total:
            now = time.perf_counter()
            due_until = min(total, int((now - start) * self.rate) + 1)
            while index < due_until:
                measured = index >= first_measured
                if measured:
                    self.tally.sent += 1
                    self.tally.late_s.append(now - (start + index / self.rate))
                self._dispatch(self.requests[index % len(self.requests)], now, measured)
                index += 1
            await asyncio.sleep(max(0.0, start + index / self.rate - time.perf_counter()))
        sending_ended = time.perf_counter()
        if self.outstanding:
            self.all_answered.clear()
            try:
                await asyncio.wait_for(self.all_answered.wait(), DRAIN_TIMEOUT_S)
            except TimeoutError:
                pass
        cpu_after = resource.getrusage(resource.RUSAGE_SELF)
        self.closing = True
        for connection in self.connections:
            if connection.transport is not None:
                connection.transport.close()
        return self._summary(sending_ended - start - self.warmup_s, cpu_after, cpu_before)

    def _dispatch(self, request: bytes, now: float, measured: bool) -> None:
        self.outstanding += 1
        if self.idle:
            self.idle.pop().send(request, now, measured)
        else:
            self.tally.queued += measured
            self.waiting.append((request, now, measured))

    def answered(self, connection: Connection, seconds: float, measured: bool, status: int) -> None:
        """A response is complete: record it and give the connection the next queued request."""
        self.outstanding -= 1
        if measured:
            self.tally.completed += 1
            self.tally.latencies_s.append(seconds)
            self.tally.non_2xx += not 200 <= status < 300
        if self.waiting:
            connection.send(*self.waiting.popleft())
        else:
            self.idle.append(connection)
        if self.outstanding == 0:
            self.all_answered.set()

    def lost(self, connection: Connection) -> None:
        """A connection closed: its request (if any) failed; open a replacement."""
        self.connections.discard(connection)
        if connection in self.idle:
            self.idle.remove(connection)
        if connection.busy:
            connection.busy = False
            self.outstanding -= 1
            self.tally.connection_errors += connection.measured
            if self.outstanding == 0:
                self.all_answered.set()
        if not self.closing:
            task = asyncio.get_running_loop().create_task(self._replace(connection.address))
            self.background.add(task)
            task.add_done_callback(self.background.discard)

    async def _connect(self, address: tuple[str, int]) -> Connection:
        _, protocol = await asyncio.get_running_loop().create_connection(lambda: Connection(self, address), *address)
        self.connections.add(protocol)
        return protocol

    async def _replace(self, address: tuple[str, int]) -> None:
        try:
            protocol = await self._connect(address)
        except OSError:
            self.tally.connection_errors += 1
            return
        if self.waiting:
            protocol.send(*self.waiting.popleft())
        else:
            self.idle.append(protocol)

    def _summary(self, measured_s: float, cpu_after: Any, cpu_before: Any) -> dict[str, Any]:
        tally = self.tally
        latencies = sorted(tally.latencies_s)
        late = sorted(tally.late_s)
        cpu_s = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
        return {
            "rate": self.rate, "seconds": round(measured_s, 3), "sent": tally.sent, "completed": tally.completed,
            "errors": tally.non_2xx + tally.sent - tally.completed, "non_2xx": tally.non_2xx,
            "connection_errors": tally.connection_errors, "queued": tally.queued,
            "achieved_rps": round(tally.completed / measured_s, 1) if measured_s > 0 else 0.0,
            "latency_ms": {f"p{q:g}": round(percentile(latencies, q) * 1000, 3) for q in (50, 90, 99, 99.9, 100)},
            "late_ms_p99": round(percentile(late, 99) * 1000, 3),
            "client_cpu_s": round(cpu_s, 3),
        }


def parse_address(text: str) -> tuple[str, int]:
    """'host:port' -> (host, port)."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not host:port")
    return host, int(port)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: one fixed-rate run, one JSON line on stdout."""
    parser = argparse.ArgumentParser(prog="python -m bench.openloop", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="http://host:port/path the requests go to")
    parser.add_argument("--spread", default="", help="host:port,host:port to connect to instead of the URL's")
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--seconds", type=float, required=True, help="measured duration")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds sent first and not measured")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--users", type=int, default=1000, help="distinct X-User-ID values")
    parser.add_argument("--body-file", type=Path, required=True)
    args = parser.parse_args(argv)
    url = urlsplit(args.url)
    if url.scheme != "http" or url.hostname is None or url.port is None:
        parser.error(f"--url {args.url!r} must be http://host:port/path")
    addresses = [parse_address(item) for item in args.spread.split(",") if item] or [(url.hostname, url.port)]
    requests = build_requests(host=url.netloc, path=url.path or "/", body=args.body_file.read_bytes(), users=args.users)
    client = OpenLoopClient(requests=requests, addresses=addresses, rate=args.rate, seconds=args.seconds,
                            warmup_s=args.warmup, connections=args.connections)
    summary = asyncio.run(client.run())
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
