"""How long the outcome log's writer thread stalls the event loop, by rows per INSERT statement.

    python -m bench.loop_stalls [--rate 5000] [--seconds 6] [--rows 256 2978]

While SQLite binds a statement's parameters, the writer thread holds the GIL and C code does
not hand it back, so the event loop cannot run: every request waiting on it is delayed. This
runs an event loop that records a request row at `--rate` rows per second into a real
`EventLog` (flushing every 0.2 s, as the balancer does) and otherwise spins, noting every gap
between two of its iterations. A gap over 1 ms is a stall. Each `--rows` value is one run with
that many rows per statement at most (`EventLog(max_rows_per_statement=...)`); the largest
SQLite accepts is `balancer.events.ROW_LIMIT`.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from balancer.events import ROW_LIMIT, EventLog

STALL_S = 0.001


@dataclass(frozen=True)
class Stalls:
    """Event-loop gaps over STALL_S in one run."""

    max_rows: int
    rows: int
    seconds: float
    gaps: list[float]  # every gap over STALL_S, in seconds

    @property
    def stalled_share(self) -> float:
        """Fraction of the run's wall time the loop spent in stalls."""
        return sum(self.gaps) / self.seconds

    def percentile(self, fraction: float) -> float:
        """The gap at `fraction` of the stalls (0 when there were none)."""
        if not self.gaps:
            return 0.0
        ordered = sorted(self.gaps)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _row(index: int, now: float) -> tuple[object, ...]:
    return (f"0123456789{index:010x}{index * 7919 % (1 << 48):012x}", now, "bench", 1,
            "model_a" if index % 2 else "model_b", "127.0.0.1:9101", "sticky", f"user-{index % 1000}", 200, 1.25, None)


async def _spin(log: EventLog, rate: float, seconds: float) -> tuple[int, list[float]]:
    """Record rows at `rate` for `seconds`, spinning the loop; (rows recorded, gaps over STALL_S)."""
    gaps: list[float] = []
    start = last = time.perf_counter()
    recorded = 0
    while (now := time.perf_counter()) - start < seconds:
        if now - last > STALL_S:
            gaps.append(now - last)
        last = now
        due = int((now - start) * rate)
        while recorded < due:
            log.record_request(_row(recorded, now))
            recorded += 1
        await asyncio.sleep(0)
    return recorded, gaps


def measure(max_rows: int, rate: float, seconds: float) -> Stalls:
    """One run into a fresh store."""
    with tempfile.TemporaryDirectory(prefix="bench-stalls-") as folder:
        log = EventLog(Path(folder) / "outcomes.db", flush_interval_s=0.2, max_rows_per_statement=max_rows)
        try:
            rows, gaps = asyncio.run(_spin(log, rate, seconds))
        finally:
            log.close()
        if log.written_requests != rows:
            raise AssertionError(f"stored {log.written_requests} of {rows} rows")
    return Stalls(max_rows=max_rows, rows=rows, seconds=seconds, gaps=gaps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=5000.0, help="rows recorded per second")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--rows", type=int, nargs="+", default=[256, ROW_LIMIT], help="rows per statement, one run each")
    args = parser.parse_args()
    for max_rows in args.rows:
        stalls = measure(max_rows, args.rate, args.seconds)
        print(f"{max_rows:5d} rows/statement: {len(stalls.gaps)} stalls over {STALL_S * 1000:g} ms in {stalls.seconds:g} s "
              f"({stalls.rows} rows), p50 {stalls.percentile(0.5) * 1000:.2f} ms, max {stalls.percentile(1.0) * 1000:.2f} ms, "
              f"{stalls.stalled_share * 100:.2f} % of the time")


if __name__ == "__main__":
    main()
