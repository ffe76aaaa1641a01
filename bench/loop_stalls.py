"""How long the outcome log stalls the event loop: SQLite in a writer process (used) against a writer thread.

    python -m bench.loop_stalls [--rate 5000] [--seconds 6]

While Python's sqlite3 binds a statement's parameters it holds the GIL, and C code does not
hand it back, so when that happens in the balancer's process the event loop cannot run: every
request waiting on it is delayed. The balancer therefore commits from a writer process
(`balancer.store_writer`); in its own process only encoding each row as it is recorded, and copying
the encoded rows out at each flush, holds the GIL.
This runs an event loop that records a request row at `--rate` rows per second and otherwise
spins, noting every gap between two of its iterations; a gap over 1 ms is a stall. One run
goes through the real `EventLog`, one through a thread in the same process calling the same
`StoreWriter` every 0.2 s (how the balancer wrote before), and one records nothing: the stalls
the machine causes by itself (the hypervisor's steal, other processes), which the other two
also suffer. Each run notes the steal during it.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from balancer import store
from balancer.events import EventLog
from balancer.store_writer import StoreWriter
from bench.procstat import machine_times, steal_share
from bench.store_insert import synthetic_row

STALL_S = 0.001


@dataclass(frozen=True)
class Stalls:
    """Event-loop gaps over STALL_S in one run."""

    writer: str  # one of WRITERS
    rows: int
    seconds: float
    gaps: list[float]  # every gap over STALL_S, in seconds
    steal: float = math.nan  # share of the machine's CPU time the hypervisor took during the run

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


WRITERS = ("writer process", "writer thread", "no outcome log")
FLUSH_INTERVAL_S = 0.2


class _Log(Protocol):
    written_requests: int

    def record_request(self, row: tuple[Any, ...]) -> None: ...

    def close(self) -> None: ...


class NoLog:
    """Records nothing: the baseline of stalls the machine causes without any outcome log."""

    def __init__(self) -> None:
        self.written_requests = 0

    def record_request(self, row: tuple[Any, ...]) -> None:
        """Count the row, keep nothing."""
        self.written_requests += 1

    def close(self) -> None:
        """Nothing to stop."""


class ThreadWriter:
    """The outcome log as it was: a thread in the balancer's process commits every FLUSH_INTERVAL_S."""

    def __init__(self, path: Path) -> None:
        self.writer = StoreWriter(store.connect(path))
        self.columns: list[Any] = []
        self.written_requests = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def record_request(self, row: tuple[Any, ...]) -> None:
        """Queue a row (on the event loop)."""
        self.columns.extend(row)

    def _flush(self) -> None:
        columns, self.columns = self.columns, []
        outcome = self.writer.write(columns, [], [])
        if outcome.error is not None:
            raise RuntimeError(outcome.error)
        self.written_requests += outcome.inserted

    def _run(self) -> None:
        while not self.stopping.wait(FLUSH_INTERVAL_S):
            self._flush()

    def close(self) -> None:
        """Stop the thread and commit the rest."""
        self.stopping.set()
        self.thread.join()
        self._flush()
        self.writer.connection.close()


async def _spin(log: _Log, rate: float, seconds: float) -> tuple[int, list[float]]:
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
            log.record_request(synthetic_row(recorded, now))
            recorded += 1
        await asyncio.sleep(0)
    return recorded, gaps


def measure(writer: str, rate: float, seconds: float) -> Stalls:
    """One run into a fresh store with `writer` (one of WRITERS)."""
    if writer not in WRITERS:
        raise ValueError(f"writer must be one of {WRITERS}, got {writer!r}")
    with tempfile.TemporaryDirectory(prefix="bench-stalls-") as folder:
        path = Path(folder) / "outcomes.db"
        log: _Log = (EventLog(path, flush_interval_s=FLUSH_INTERVAL_S) if writer == WRITERS[0]
                     else ThreadWriter(path) if writer == WRITERS[1] else NoLog())
        try:
            before = machine_times()
            rows, gaps = asyncio.run(_spin(log, rate, seconds))
            steal = steal_share(before, machine_times())
        finally:
            log.close()
        if log.written_requests != rows:
            raise AssertionError(f"stored {log.written_requests} of {rows} rows")
    return Stalls(writer=writer, rows=rows, seconds=seconds, gaps=gaps, steal=steal)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=5000.0, help="rows recorded per second")
    parser.add_argument("--seconds", type=float, default=6.0)
    args = parser.parse_args()
    for writer in WRITERS:
        stalls = measure(writer, args.rate, args.seconds)
        print(f"{writer:15s}: {len(stalls.gaps)} stalls over {STALL_S * 1000:g} ms in {stalls.seconds:g} s "
              f"({stalls.rows} rows), p50 {stalls.percentile(0.5) * 1000:.2f} ms, max {stalls.percentile(1.0) * 1000:.2f} ms, "
              f"{stalls.stalled_share * 100:.2f} % of the time; steal {stalls.steal * 100:.1f} %")


if __name__ == "__main__":
    main()
