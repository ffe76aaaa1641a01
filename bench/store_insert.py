"""CPU per stored request record, for the ways of inserting a batch into the outcome store.

    python -m bench.store_insert [--rows 60000] [--batch 1200]

The outcome store's writer process uses the first (`balancer.store_writer`); the others are what it
replaced. Each method writes the same synthetic rows into a fresh store, in batches of one
transaction each, as the writer does; the figure is process CPU seconds per row.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from balancer import store, store_writer

Row = tuple[Any, ...]
_COLUMNS = ", ".join(store.REQUEST_COLUMNS)
_PLACEHOLDERS = "(" + ", ".join("?" * len(store.REQUEST_COLUMNS)) + ")"
_JSON_EACH = "INSERT OR IGNORE INTO requests ({}) SELECT {} FROM json_each(?)".format(
    _COLUMNS, ", ".join(f"json_extract(value, '$[{index}]')" for index in range(len(store.REQUEST_COLUMNS))),
)
_ONE_ROW = f"INSERT OR IGNORE INTO requests ({_COLUMNS}) VALUES {_PLACEHOLDERS}"

def _json_each(connection: sqlite3.Connection, rows: list[Row]) -> None:
    connection.execute(_JSON_EACH, (json.dumps(rows),))


def _executemany(connection: sqlite3.Connection, rows: list[Row]) -> None:
    connection.executemany(_ONE_ROW, rows)


_WHOLE_BATCH = store_writer.insert_statements(store_writer.ROW_LIMIT)


def _whole_batch(connection: sqlite3.Connection, rows: list[Row]) -> None:
    store_writer.insert_requests(connection, rows, _WHOLE_BATCH)


METHODS: dict[str, Callable[[sqlite3.Connection, list[Row]], None]] = {
    f"multi-row VALUES, cached statements of at most {store_writer.MAX_ROWS_PER_STATEMENT} rows (used)": store_writer.insert_requests,
    "multi-row VALUES, one statement per batch (before)": _whole_batch,
    "one JSON parameter + json_each (before that)": _json_each,
    "executemany": _executemany,
}


def synthetic_row(index: int, ts: float) -> Row:
    """Row `index`, shaped like the balancer's: a sortable id, two variants, a sticky unit, a latency."""
    return (f"0123456789{index:010x}{index * 7919 % (1 << 48):012x}", ts, "bench", 1,
            "model_a" if index % 2 else "model_b", "127.0.0.1:9101", "sticky", f"user-{index % 1000}", 200, 1.25, None)


def synthetic_rows(count: int) -> list[Row]:
    """`count` rows one millisecond apart."""
    now = time.time()
    return [synthetic_row(index, now + index / 1000) for index in range(count)]


def measure(method: Callable[[sqlite3.Connection, list[Row]], None], rows: list[Row], batch: int) -> float:
    """CPU microseconds per row, writing `rows` into a fresh store `batch` rows per transaction."""
    with tempfile.TemporaryDirectory() as directory:
        connection = store.connect(Path(directory) / "outcomes.db")
        started = time.process_time()
        for start in range(0, len(rows), batch):
            connection.execute("BEGIN IMMEDIATE")
            method(connection, rows[start:start + batch])
            connection.execute("COMMIT")
        seconds = time.process_time() - started
        stored = connection.execute("SELECT COUNT(*) FROM requests").fetchone()[0]
        connection.close()
    if stored != len(rows):
        raise AssertionError(f"stored {stored} of {len(rows)} rows")
    return seconds / len(rows) * 1e6


def run(rows: int = 60_000, batch: int = 1_200, repeats: int = 2) -> dict[str, float]:
    """Best of `repeats` per method, in µs of CPU per row."""
    data = synthetic_rows(rows)
    return {name: min(measure(method, data, batch) for _ in range(repeats)) for name, method in METHODS.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=60_000)
    parser.add_argument("--batch", type=int, default=1_200, help="rows per transaction (a flush)")
    args = parser.parse_args()
    for name, micros in run(args.rows, args.batch).items():
        print(f"{micros:6.1f} µs/row  {name}")


if __name__ == "__main__":
    main()
