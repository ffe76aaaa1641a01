"""Traffic generator: replays the held-out rows as /predict requests from simulated users.

With `--feedback` it posts the ground truth (1 if the prediction was right, else 0)
to /feedback after a short random delay, as a product would once the truth is known.
Every run is bounded by a request count and a time limit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


@dataclass
class LoadResult:
    """What a load run saw."""

    sent: int = 0
    ok: int = 0
    errors: int = 0
    feedback_sent: int = 0
    feedback_errors: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    by_variant: Counter[str] = field(default_factory=Counter)
    correct_by_variant: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    request_ids: list[str] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        """Answered requests per second."""
        return self.sent / self.seconds if self.seconds > 0 else 0.0

    def percentile(self, q: float) -> float:
        """Latency percentile in ms (NaN without data)."""
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        return statistics.quantiles(ordered, n=1000, method="inclusive")[int(q * 10) - 1] if len(ordered) > 1 else ordered[0]

    def summary(self) -> dict[str, Any]:
        """JSON-able summary."""
        return {
            "sent": self.sent, "ok": self.ok, "errors": self.errors,
            "feedback_sent": self.feedback_sent, "feedback_errors": self.feedback_errors,
            "seconds": round(self.seconds, 3), "throughput_rps": round(self.throughput, 1),
            "latency_ms": {f"p{q}": round(self.percentile(q), 2) for q in (50, 95, 99)},
            "by_variant": dict(self.by_variant), "statuses": {str(k): v for k, v in self.statuses.items()},
            "accuracy_by_variant": {
                variant: round(self.correct_by_variant[variant] / count, 4)
                for variant, count in self.by_variant.items() if count
            },
        }


def load_holdout(path: str | Path) -> tuple[list[list[float]], list[int]]:
    """The held-out rows and labels written by `make train`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"held-out data {path} not found: run `make train` first")
    document = json.loads(path.read_text())
    return document["X"], document["y"]


def default_holdout_path() -> Path:
    """artifacts/holdout.json, or under $MODEL_ARTIFACTS_DIR."""
    return Path(os.environ.get("MODEL_ARTIFACTS_DIR", "artifacts")) / "holdout.json"


async def run_load(
    url: str,
    *,
    requests: int,
    concurrency: int,
    users: int,
    rows: list[list[float]],
    labels: list[int],
    rate: float | None = None,
    feedback: bool = False,
    feedback_delay_s: tuple[float, float] = (0.05, 0.5),
    duration_s: float = 300.0,
    seed: int = 7,
    user_header: str = "X-User-ID",
    progress: Progress | None = None,
) -> LoadResult:
    """Send `requests` predictions (at most `duration_s` seconds) and return what happened."""
    result = LoadResult()
    rng = random.Random(seed)
    plan = [(f"user-{rng.randrange(users)}", rng.randrange(len(rows))) for _ in range(requests)]
    feedback_tasks: set[asyncio.Task[None]] = set()
    deadline = time.monotonic() + duration_s
    started = time.monotonic()
    next_slot = [started]
    task_id = progress.add_task("requests", total=requests) if progress else None
    url = url.rstrip("/")
    connector = aiohttp.TCPConnector(limit=concurrency * 2)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:

        async def send_feedback(request_id: str, value: int) -> None:
            await asyncio.sleep(rng.uniform(*feedback_delay_s))
            try:
                async with session.post(f"{url}/feedback", json={"request_id": request_id, "value": value}) as reply:
                    await reply.read()
                    if reply.status == 202:
                        result.feedback_sent += 1
                    else:
                        result.feedback_errors += 1
            except (TimeoutError, aiohttp.ClientError):
                _reraise_if_cancelled()
                result.feedback_errors += 1

        async def worker(jobs: list[tuple[str, int]]) -> None:
            for user, row in jobs:
                if time.monotonic() >= deadline:
                    return
                if rate:
                    slot = next_slot[0]
                    next_slot[0] = slot + 1.0 / rate
                    delay = slot - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                t0 = time.perf_counter()
                try:
                    async with session.post(f"{url}/predict", json={"instances": [rows[row]]},
                                            headers={user_header: user}) as reply:
                        body = await reply.read()
                        status = reply.status
                        variant = reply.headers.get("X-Variant", "?")
                        request_id = reply.headers.get("X-Request-ID", "")
                except (TimeoutError, aiohttp.ClientError):
                    _reraise_if_cancelled()
                    status, variant, request_id, body = 0, "?", "", b""
                result.latencies_ms.append((time.perf_counter() - t0) * 1000.0)
                result.sent += 1
                result.statuses[status] += 1
                if progress is not None and task_id is not None:
                    progress.advance(task_id)
                if status != 200:
                    result.errors += 1
                    continue
                result.ok += 1
                result.by_variant[variant] += 1
                result.request_ids.append(request_id)
                prediction = json.loads(body)["predictions"][0]
                correct = int(prediction == labels[row])
                result.correct_by_variant[variant] += correct
                if feedback and request_id:
                    task = asyncio.create_task(send_feedback(request_id, correct))
                    feedback_tasks.add(task)
                    task.add_done_callback(feedback_tasks.discard)

        try:
            await asyncio.gather(*(worker(plan[i::concurrency]) for i in range(concurrency)))
            result.seconds = time.monotonic() - started
            if feedback_tasks:
                await asyncio.gather(*feedback_tasks)
        finally:  # interrupted (Ctrl-C): no feedback may outlive the session
            pending = list(feedback_tasks)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
    return result


def _reraise_if_cancelled() -> None:
    """Keep a cancellation (Ctrl-C) that the HTTP client reported as one of its own errors.

    A request cancelled at the wrong moment can surface as a client error; caught as a failed
    request, the worker would go on sending and Ctrl-C would not stop the load.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def add_load_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `balancer load`."""
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="the balancer's public URL")
    parser.add_argument("--requests", type=int, default=1000, help="how many /predict requests (bounded)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--users", type=int, default=200, help="simulated users (sticky ids)")
    parser.add_argument("--rate", type=float, help="requests per second (default: as fast as possible)")
    parser.add_argument("--feedback", action="store_true", help="post ground truth to /feedback")
    parser.add_argument("--duration", type=float, default=300.0, help="stop after this many seconds")
    parser.add_argument("--holdout", default=None, help="held-out rows (default artifacts/holdout.json)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def load_command(args: argparse.Namespace) -> int:
    """Run `balancer load`."""
    console = Console(stderr=args.json)
    for name in ("requests", "concurrency", "users"):
        if getattr(args, name) < 1:
            console.print(f"[red]--{name} must be >= 1, got {getattr(args, name)}[/red]")
            return 2
    try:
        rows, labels = load_holdout(args.holdout or default_holdout_path())
    except FileNotFoundError as exc:
        console.print(f"[red]{exc}[/red]")
        return 2
    with Progress(TextColumn("[bold]load"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        result = asyncio.run(run_load(
            args.url, requests=args.requests, concurrency=args.concurrency, users=args.users, rows=rows,
            labels=labels, rate=args.rate, feedback=args.feedback, duration_s=args.duration, seed=args.seed,
            progress=progress,
        ))
    summary = result.summary()
    if args.json:
        print(json.dumps(summary))
    else:
        print_summary(console, summary)
    return 0 if result.ok else 1


def print_summary(console: Console, summary: dict[str, Any]) -> None:
    """A readable table of a load run."""
    table = Table(title="load summary", show_header=False)
    latency = summary["latency_ms"]
    for label, value in (
        ("sent", summary["sent"]), ("ok", summary["ok"]), ("errors", summary["errors"]),
        ("feedback sent", summary["feedback_sent"]), ("throughput", f"{summary['throughput_rps']} req/s"),
        ("latency p50 / p95 / p99", f"{latency['p50']} / {latency['p95']} / {latency['p99']} ms"),
        ("by variant", ", ".join(f"{k}: {v}" for k, v in sorted(summary["by_variant"].items()))),
        ("accuracy by variant", ", ".join(f"{k}: {v:.3f}" for k, v in sorted(summary["accuracy_by_variant"].items()))),
    ):
        table.add_row(label, str(value))
    console.print(table)
