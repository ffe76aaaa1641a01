"""CPU per stored request record, for the ways of inserting a batch into the outcome store.

    python -m bench.store_insert [--rows 60000] [--batch 1200] [--schemas]

The outcome store's writer process uses the first (`balancer.store_writer`); the others are what it
replaced. Each method writes the same synthetic rows into a fresh store, in batches of one
transaction each, as the writer does; the figure is process CPU seconds per row.
`--schemas` instead compares the writer's method on the store's schema (WITHOUT ROWID tables)
with the rowid schema of earlier stores (`store.ROWID_SCHEMA`), and the resulting file sizes.
"""

from __future__ import annotations

import argparse
import contextlib
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


def measure_store(method: Callable[[sqlite3.Connection, list[Row]], None], rows: list[Row], batch: int, *,
                  schema: str = store.SCHEMA) -> tuple[float, int]:
    """CPU microseconds per row, writing `rows` into a fresh store (created with `schema`) `batch` rows per
    transaction, and the store's size in bytes after a checkpoint."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "outcomes.db"
        with contextlib.closing(sqlite3.connect(path)) as creating:
            creating.executescript(schema)
        connection = store.connect(path)
        started = time.process_time()
        for start in range(0, len(rows), batch):
            connection.execute("BEGIN IMMEDIATE")
            method(connection, rows[start:start + batch])
            connection.execute("COMMIT")
        seconds = time.process_time() - started
        stored = connection.execute("SELECT COUNT(*) FROM requests").fetchone()[0]
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        connection.close()
        size = path.stat().st_size
    if stored != len(rows):
        raise AssertionError(f"stored {stored} of {len(rows)} rows")
    return seconds / len(rows) * 1e6, size


def run(rows: int = 60_000, batch: int = 1_200, repeats: int = 2) -> dict[str, float]:
    """Best of `repeats` per method, in µs of CPU per row."""
    data = synthetic_rows(rows)
    return {name: min(measure_store(method, data, batch)[0] for _ in range(repeats)) for name, method in METHODS.items()}


SCHEMAS = {"WITHOUT ROWID tables (used)": store.SCHEMA, "rowid tables (stores created before)": store.ROWID_SCHEMA}


def run_schemas(rows: int = 60_000, batch: int = 1_200, repeats: int = 3) -> dict[str, tuple[float, int]]:
    """Schema -> (best of `repeats` in µs of CPU per row, store bytes), the schemas measured alternately."""
    data = synthetic_rows(rows)
    results: dict[str, list[tuple[float, int]]] = {name: [] for name in SCHEMAS}
    for _ in range(repeats):
        for name, schema in SCHEMAS.items():
            results[name].append(measure_store(store_writer.insert_requests, data, batch, schema=schema))
    return {name: (min(micros for micros, _ in runs), runs[-1][1]) for name, runs in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=60_000)
    parser.add_argument("--batch", type=int, default=1_200, help="rows per transaction (a flush)")
    parser.add_argument("--schemas", action="store_true", help="compare the store's schemas instead of the methods")
    args = parser.parse_args()
    if args.schemas:
        for name, (micros, size) in run_schemas(args.rows, args.batch).items():
            print(f"{micros:6.2f} µs/row  {size / args.rows:6.1f} bytes/row  {name}")
        return
    for name, micros in run(args.rows, args.batch).items():
        print(f"{micros:6.1f} µs/row  {name}")


if __name__ == "__main__":
    main()
