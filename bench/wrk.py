"""Saturation runs with wrk: the command line, and its summary line parsed into a result."""

from __future__ import annotations

import json
import math
import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.errors import BenchError

LUA_SCRIPT = Path(__file__).with_name("post.lua")
SUMMARY_PREFIX = "BENCH_JSON "


@dataclass(frozen=True)
class WrkResult:
    """What one wrk run saw (from the summary line post.lua's done() prints)."""

    requests: int
    seconds: float
    errors: int
    p50_ms: float
    p99_ms: float

    @property
    def requests_per_second(self) -> float:
        """Completed requests per second of the run."""
        return self.requests / self.seconds if self.seconds > 0 else 0.0


def parse_wrk_output(stdout: str) -> WrkResult:
    """The run's result from wrk's stdout; BenchError if post.lua's summary line is missing."""
    for line in stdout.splitlines():
        if line.startswith(SUMMARY_PREFIX):
            summary = json.loads(line[len(SUMMARY_PREFIX):])
            break
    else:
        raise BenchError(f"wrk printed no {SUMMARY_PREFIX.strip()} line; its output was:\n{stdout[-2000:]}")
    errors = sum(summary[key] for key in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts"))
    return WrkResult(
        requests=int(summary["requests"]), seconds=summary["duration_us"] / 1e6, errors=int(errors),
        p50_ms=summary["latency_p50_us"] / 1000, p99_ms=summary["latency_p99_us"] / 1000,
    )


def wrk_command(url: str, *, threads: int, connections: int, seconds: float, wrk: str = "wrk") -> list[str]:
    """The wrk command line of a saturation run against `url` (wrk takes whole seconds only: rounded up)."""
    return [wrk, "-t", str(threads), "-c", str(connections), "-d", f"{max(1, math.ceil(seconds))}s", "--timeout", "5s",
            "-s", str(LUA_SCRIPT), url]


def wrk_environment(*, body_file: Path, users: int, spread: Sequence[str] = ()) -> dict[str, str]:
    """The variables post.lua reads: body, user count, and the addresses a direct run spreads over."""
    return {"BENCH_BODY_FILE": str(body_file), "BENCH_USERS": str(users), "BENCH_TARGETS": ",".join(spread)}


def run_wrk(command: list[str], environment: dict[str, str], seconds: float,
            cpus: set[int] | None = None) -> WrkResult:
    """Run wrk (on `cpus` if given; killed if it outlives its duration by 30 s) and parse its summary."""
    try:
        completed = subprocess.run(command, env={**os.environ, **environment}, capture_output=True, text=True,
                                   timeout=seconds + 30, check=False,
                                   preexec_fn=None if cpus is None else lambda: os.sched_setaffinity(0, cpus))
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"wrk did not finish within {seconds + 30:g}s: {' '.join(command)}") from exc
    if completed.returncode != 0:
        output = (completed.stderr.strip() or completed.stdout.strip())[-1000:]
        raise BenchError(f"wrk exited with {completed.returncode}: {' '.join(command)}\n{output}")
    return parse_wrk_output(completed.stdout)
