"""The durable outcome log: request records and feedback, written in batches off the event loop.

The event loop only appends tuples to in-memory lists (no I/O, no locks). A writer
thread swaps the lists every `flush_interval_s` and commits them to SQLite in one
transaction. A crash (kill -9) loses at most the records of the last flush window;
`close()` flushes everything.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections import OrderedDict
from itertools import chain
from pathlib import Path
from typing import Any

from balancer import store

logger = logging.getLogger(__name__)

# A batch goes in as multi-row `INSERT ... VALUES (...), (...)` statements of fixed sizes.
# While a statement's parameters are bound the writer holds the GIL, and C code does not
# hand it back: the event loop stalls for as long as that takes. So no statement binds
# more than MAX_ROWS_PER_STATEMENT rows, and the other sizes are the powers of two below it,
# whose prepared statements the connection caches (`python -m bench.store_insert`
# compares the methods; `python -m bench.loop_stalls` measures the stalls).
_ROW_PLACEHOLDERS = "(" + ", ".join("?" * len(store.REQUEST_COLUMNS)) + ")"
_INSERT_PREFIX = "INSERT OR IGNORE INTO requests ({}) VALUES ".format(", ".join(store.REQUEST_COLUMNS))
ROW_LIMIT = 32_766 // len(store.REQUEST_COLUMNS)  # rows of the largest statement SQLite accepts (32,766 parameters)
MAX_ROWS_PER_STATEMENT = 256
_UPSERT_FEEDBACK = "INSERT OR REPLACE INTO feedback (request_id, ts, value) VALUES (?, ?, ?)"
_INSERT_CONFIG = (
    "INSERT OR REPLACE INTO configs (version, hash, ts, experiment, status, control, weights, body) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)


class EventLog:
    """Buffers request and feedback records and commits them from a writer thread."""

    def __init__(self, path: str | Path, *, flush_interval_s: float = 0.2, recent_ids: int = 200_000,
                 max_rows_per_statement: int = MAX_ROWS_PER_STATEMENT) -> None:
        self.path = Path(path)
        self.flush_interval_s = flush_interval_s
        self._insert_statements = insert_statements(max_rows_per_statement)
        self._connection = store.connect(self.path, cached_statements=len(self._insert_statements) + 8)
        self._reader = store.connect(self.path)
        self._requests: list[tuple[Any, ...]] = []
        self._feedback: list[tuple[str, float, float]] = []
        self._configs: list[tuple[Any, ...]] = []
        self._recent: OrderedDict[str, str] = OrderedDict()  # request id -> variant
        self._recent_capacity = recent_ids
        self._wake = threading.Event()
        self._stopping = False
        self._flush_lock = threading.Lock()
        self.written_requests = 0
        self.written_feedback = 0
        self.duplicate_requests = 0
        self.last_error: str | None = None
        self._writer = threading.Thread(target=self._run, name="event-log-writer", daemon=True)
        self._writer.start()

    # hot path: called on the event loop, no I/O
    def record_request(self, row: tuple[Any, ...]) -> None:
        """Queue one request record (columns in `store.REQUEST_COLUMNS` order)."""
        self._requests.append(row)
        recent = self._recent
        recent[row[0]] = row[4]
        if len(recent) > self._recent_capacity:
            recent.popitem(last=False)

    def record_feedback(self, request_id: str, value: float) -> None:
        """Queue ground truth for a request (last value wins)."""
        self._feedback.append((request_id, time.time(), value))

    def record_config(self, version: int, config_hash: str, experiment: Any, body: str) -> None:
        """Queue a config version row (experiment is a `config.Experiment`)."""
        self._configs.append((
            version, config_hash, time.time(), experiment.name, experiment.status,
            experiment.control_name, json.dumps(experiment.weights), body,
        ))
        self._wake.set()

    def recent_variant(self, request_id: str) -> str | None:
        """The variant of a request this process logged recently (flushed or not), else None."""
        return self._recent.get(request_id)

    # off the loop
    def variant_of(self, request_id: str) -> str | None:
        """The variant of a logged request, or None if unknown. Blocking: call in a thread."""
        variant = self._recent.get(request_id)
        if variant is not None:
            return variant
        with self._flush_lock:
            row = self._reader.execute("SELECT variant FROM requests WHERE request_id = ?", (request_id,)).fetchone()
        return None if row is None else str(row[0])

    def latest_config(self) -> tuple[int, str] | None:
        """(version, hash) of the newest config in the store, or None. Blocking."""
        row = self._reader.execute("SELECT version, hash FROM configs ORDER BY version DESC LIMIT 1").fetchone()
        return (int(row[0]), str(row[1])) if row else None

    def flush(self) -> None:
        """Commit everything buffered so far. Blocking; safe from any thread."""
        with self._flush_lock:
            requests, self._requests = self._requests, []
            feedback, self._feedback = self._feedback, []
            configs, self._configs = self._configs, []
            if not (requests or feedback or configs):
                return
            try:
                self._write(requests, feedback, configs)
            except sqlite3.Error as exc:
                # Keep the batch for the next attempt rather than lose it.
                self.last_error = str(exc)
                logger.error("writing %d records to %s failed: %s; will retry", len(requests) + len(feedback), self.path, exc)
                self._requests[:0] = requests
                self._feedback[:0] = feedback
                self._configs[:0] = configs

    def _write(self, requests: list[tuple[Any, ...]], feedback: list[tuple[str, float, float]], configs: list[tuple[Any, ...]]) -> None:
        connection = self._connection
        connection.execute("BEGIN IMMEDIATE")
        try:
            if configs:
                connection.executemany(_INSERT_CONFIG, configs)
            if requests:
                before = connection.total_changes
                insert_requests(connection, requests, self._insert_statements)
                inserted = connection.total_changes - before
                self.duplicate_requests += len(requests) - inserted
            if feedback:
                connection.executemany(_UPSERT_FEEDBACK, feedback)
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        self.written_requests += len(requests)
        self.written_feedback += len(feedback)
        self.last_error = None

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait(self.flush_interval_s)
            self._wake.clear()
            try:
                self.flush()
            except Exception:  # never let the writer die; the next round retries
                logger.exception("event log flush failed")
                time.sleep(self.flush_interval_s)

    def close(self) -> None:
        """Stop the writer and flush everything still buffered."""
        self._stopping = True
        self._wake.set()
        self._writer.join(timeout=30)
        self.flush()
        self._connection.close()
        self._reader.close()

    @property
    def pending(self) -> int:
        """Records buffered but not yet committed."""
        return len(self._requests) + len(self._feedback)


def insert_statements(max_rows: int = MAX_ROWS_PER_STATEMENT) -> dict[int, str]:
    """Rows -> INSERT statement, largest first: `max_rows`, then every power of two below it."""
    if not 1 <= max_rows <= ROW_LIMIT:
        raise ValueError(f"max_rows must be between 1 and {ROW_LIMIT}, got {max_rows}")
    sizes = [max_rows] + [1 << power for power in range(max_rows.bit_length() - 1, -1, -1) if 1 << power < max_rows]
    return {size: _INSERT_PREFIX + ",".join([_ROW_PLACEHOLDERS] * size) for size in sizes}


_DEFAULT_INSERTS = insert_statements()


def insert_requests(connection: sqlite3.Connection, rows: list[tuple[Any, ...]],
                    statements: dict[int, str] = _DEFAULT_INSERTS) -> None:
    """INSERT OR IGNORE `rows` (columns in `store.REQUEST_COLUMNS` order) with the fixed-size `statements`."""
    start, count = 0, len(rows)
    for size, statement in statements.items():
        while count - start >= size:
            connection.execute(statement, list(chain.from_iterable(rows[start:start + size])))
            start += size
