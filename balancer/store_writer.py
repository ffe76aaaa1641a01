"""The outcome store's writer process: commits batches of records to SQLite outside the balancer's process.

    python -m balancer.store_writer --store outcomes.db [--max-rows-per-statement 256]

`balancer.events.EventLog` starts one writer per store and sends it every batch over the
writer's stdin. Binding a row's parameters in Python's sqlite3 takes the GIL for a few
microseconds; in the balancer's process that stalled the event loop and cost a tenth of its
throughput at saturation. Here it runs beside it, on another core when there is one.

Messages on both pipes are frames: a 4-byte big-endian length, then a payload, `marshal`led unless
said otherwise (the two ends are the same interpreter, so the format always matches). A batch is
one header frame `(request frames, feedback rows, config rows)` followed by that many frames of
request rows in `balancer/_rows.c`'s format, encoded by the balancer as it recorded them (see
`balancer.rows`). Where `balancer._store` is built, the writer hands those frames to a SQLite
connection of its own, which binds every row straight from its frame (see `balancer/_store.c`);
elsewhere they decode to a flat list of the rows' columns, row after row, which Python's sqlite3
binds as the parameters of multi-row INSERTs, with no tuple per row to build. The answer is one frame
`(requests inserted, feedback written, rejected records, error)`. A batch is one transaction.
When it fails with an error that may pass (the disk is full, the store is locked) nothing is
written and `error` says why: the sender keeps the batch and retries it. When SQLite refuses a
record itself (a constraint, a value of the wrong type) the writer commits every other record
of the batch and returns the refused ones in `rejected`, so one bad record never blocks the
log. The writer exits when its stdin closes, after answering every batch it read: a balancer
killed with SIGKILL loses only what it had not yet sent.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # the writer process, one thread: before sqlite3 is first imported (see the module)
    from balancer import sqlite_single_thread

    sqlite_single_thread.configure()

import argparse
import importlib
import logging
import marshal
import os
import signal
import sqlite3
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import IO, Any, Final

from balancer import native, store
from balancer import rows as encoded_rows

logger = logging.getLogger(__name__)

FRAME_HEADER = struct.Struct("!I")
# A batch goes in as multi-row `INSERT ... VALUES (...), (...)` statements of fixed sizes:
# MAX_ROWS_PER_STATEMENT rows, then the powers of two below it, whose prepared statements the
# connection caches (`python -m bench.store_insert` compares this with the alternatives).
MAX_ROWS_PER_STATEMENT = 256
ROW_LIMIT = 32_766 // len(store.REQUEST_COLUMNS)  # rows of the largest statement SQLite accepts (32,766 parameters)
# Python 3.11's sqlite3 binds str, int and float directly but sends every None through its
# adapter lookup (a registry miss, then two failed getattr calls raising AttributeError):
# about 3,000 instructions per None, more than the rest of the row. So the nullable text
# columns bind the integer 0 for "no value" and the statement turns it back into NULL with
# NULLIF(?, 0); a text value never equals the integer 0, so nothing else can become NULL.
# The balancer encodes a None in these columns as 0 as it records the row (`balancer.rows.Rows`'
# `none_as_zero`), which costs nothing there, against a Python loop over every column of the batch here.
NULLABLE_TEXT_COLUMNS = ("upstream", "unit_id", "error")
NULLABLE_POSITIONS: Final = tuple(store.REQUEST_COLUMNS.index(name) for name in NULLABLE_TEXT_COLUMNS)
_ROW_PLACEHOLDERS = "(" + ", ".join(
    "NULLIF(?, 0)" if name in NULLABLE_TEXT_COLUMNS else "?" for name in store.REQUEST_COLUMNS
) + ")"
# A request id already stored (a client reusing X-Request-ID) keeps its first record. Only that
# conflict is ignored: `INSERT OR IGNORE` would also skip a row breaking NOT NULL, silently.
_INSERT_PREFIX = "INSERT INTO requests ({}) VALUES ".format(", ".join(store.REQUEST_COLUMNS))
_ON_REUSED_ID = " ON CONFLICT (request_id) DO NOTHING"
# The C connection binds "no value" as NULL itself.
_ROW_PARAMETERS = "(" + ", ".join(["?"] * len(store.REQUEST_COLUMNS)) + ")"
_UPSERT_FEEDBACK = "INSERT OR REPLACE INTO feedback (request_id, ts, value) VALUES (?, ?, ?)"
_INSERT_CONFIG = (
    "INSERT OR REPLACE INTO configs (version, hash, ts, experiment, status, control, weights, body) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
# The writer's work can wait and the balancer's cannot. At this niceness the writer weighs 110
# against the balancer's 1,024, but a woken event loop may still wait for the writer's slice to
# end (4 ms here: `python -m bench.compare --method latency` showed it in the balancer's p99).
NICENESS = 10
# "idle": SCHED_IDLE as well, where the OS has it. The kernel then preempts the writer the moment
# any other task wakes, and runs it in the time the CPUs would otherwise idle. A machine with no
# idle time could starve it: `EventLog` restarts it at "normal" (NICENESS only) for a while when a
# batch takes too long.
PRIORITIES = ("idle", "normal")
# Errors that say nothing about the records (busy, locked, disk full, I/O): retry the whole batch later.
TRANSIENT_ERRORS = (sqlite3.OperationalError,)

Row = tuple[Any, ...]
WIDTH = len(store.REQUEST_COLUMNS)


def insert_statements(max_rows: int = MAX_ROWS_PER_STATEMENT, *, zero_is_null: bool = True) -> dict[int, str]:
    """Rows -> INSERT statement, largest first: `max_rows`, then every power of two below it (`zero_is_null`:
    the nullable text columns take 0 for "no value", see above)."""
    if not 1 <= max_rows <= ROW_LIMIT:
        raise ValueError(f"max_rows must be between 1 and {ROW_LIMIT}, got {max_rows}")
    sizes = [max_rows] + [1 << power for power in range(max_rows.bit_length() - 1, -1, -1) if 1 << power < max_rows]
    row = _ROW_PLACEHOLDERS if zero_is_null else _ROW_PARAMETERS
    return {size: _INSERT_PREFIX + ",".join([row] * size) + _ON_REUSED_ID for size in sizes}


_DEFAULT_INSERTS = insert_statements()


def insert_requests(connection: sqlite3.Connection, rows: Sequence[Row], statements: dict[int, str] = _DEFAULT_INSERTS) -> None:
    """Insert `rows` (columns in `store.REQUEST_COLUMNS` order, reused ids skipped) with the fixed-size `statements`."""
    for row in rows:
        if len(row) != WIDTH:
            raise ValueError(f"a request row has {len(row)} columns, expected {WIDTH}: {row!r}"[:500])
    columns = list(chain.from_iterable(rows))
    for position in NULLABLE_POSITIONS:
        for index in range(position, len(columns), WIDTH):
            if columns[index] is None:
                columns[index] = 0
    insert_columns(connection, columns, statements)


def request_rows(columns: Sequence[Any]) -> list[Row]:
    """A flat list of request columns, row after row, as rows."""
    return [tuple(columns[start:start + WIDTH]) for start in range(0, len(columns), WIDTH)]


def insert_columns(connection: sqlite3.Connection, columns: list[Any], statements: dict[int, str] = _DEFAULT_INSERTS) -> None:
    """Insert request rows given as one flat list of their columns, row after row, with 0 for "no value" in the
    nullable text columns (see above)."""
    if len(columns) % WIDTH:
        raise ValueError(f"{len(columns)} request columns are not whole rows of {WIDTH}")
    start, count = 0, len(columns) // WIDTH
    for size, statement in statements.items():
        while count - start >= size:
            connection.execute(statement, columns[start * WIDTH:(start + size) * WIDTH])
            start += size


@dataclass
class Outcome:
    """What became of one batch."""

    inserted: int = 0  # request rows stored (a reused request id is ignored, not stored)
    feedback: int = 0
    rejected: list[tuple[str, str, str]] = field(default_factory=list)  # (table, record, SQLite's reason)
    error: str | None = None  # set: nothing was written, retry the batch

    def as_message(self) -> tuple[int, int, list[tuple[str, str, str]], str | None]:
        """The answer frame's payload."""
        return self.inserted, self.feedback, self.rejected, self.error


def _write_batch(executemany: Callable[[str, Sequence[Row]], object], insert_requests: Callable[[], int],
                 feedback: Sequence[Row], configs: Sequence[Row]) -> Outcome:
    """A batch's records on one connection (`insert_requests` stores the request rows and says how many)."""
    outcome = Outcome(feedback=len(feedback))
    if configs:
        executemany(_INSERT_CONFIG, configs)
    outcome.inserted = insert_requests()
    if feedback:
        executemany(_UPSERT_FEEDBACK, feedback)
    return outcome


def fast_connection(path: str, max_rows: int = MAX_ROWS_PER_STATEMENT, busy_timeout_ms: int = 5000) -> Any | None:
    """A `balancer._store.Connection` to the store at `path` (whose schema exists), inserting at most `max_rows` rows
    a statement, where that extension is built from its current source and this process runs the compiled modules
    (see balancer/native.py); else None."""
    if native.MODE != "compiled":
        return None
    try:
        module = importlib.import_module(f"{native.PACKAGE}._store")
    except ImportError:  # left out of the build (no sqlite3.h there): the manifest says so
        return None
    return module.Connection(path, list(insert_statements(max_rows, zero_is_null=False).values()), busy_timeout_ms)


class StoreWriter:
    """Writes batches into one store, one transaction each.

    `fast`: the store's `balancer._store.Connection` (see `fast_connection`), used for every batch that SQLite
    takes whole; `connection` finds the records it refuses, and writes everything where there is no `fast`.
    """

    def __init__(self, connection: sqlite3.Connection, *, max_rows_per_statement: int = MAX_ROWS_PER_STATEMENT,
                 fast: Any | None = None) -> None:
        self.connection = connection
        self.statements = insert_statements(max_rows_per_statement)
        self.fast = fast
        self._decode = encoded_rows.implementation().decode

    def write_frames(self, frames: Sequence[bytes], feedback: Sequence[Row], configs: Sequence[Row]) -> Outcome:
        """Commit the batch (`frames`: its request rows, encoded as `balancer.rows` encodes them), like `write`."""
        fast: Any = self.fast
        if fast is None:
            return self.write(self._columns(frames), feedback, configs)
        return self._commit(fast.execute,
                            lambda: _write_batch(fast.executemany, lambda: sum(map(fast.insert_requests, frames)),
                                                 feedback, configs),
                            lambda: self._write_each(self._columns(frames), feedback, configs))

    def write(self, requests: list[Any], feedback: Sequence[Row], configs: Sequence[Row]) -> Outcome:
        """Commit the batch (`requests`: the rows' columns, row after row); the refused records are left out
        and reported, a transient failure writes nothing."""
        connection = self.connection
        return self._commit(connection.execute,
                            lambda: _write_batch(connection.executemany, lambda: self._insert_columns(requests),
                                                 feedback, configs),
                            lambda: self._write_each(requests, feedback, configs))

    def _commit(self, execute: Callable[[str], object], whole: Callable[[], Outcome],
                each: Callable[[], Outcome]) -> Outcome:
        """`whole` in one transaction on the connection `execute` belongs to; when SQLite refuses a record, `each`
        (one record at a time, on Python's connection) instead; a transient failure writes nothing."""
        try:
            try:
                return self._transaction(execute, whole)
            except TRANSIENT_ERRORS:
                raise
            except sqlite3.Error:  # some record is refused: write them one by one to find it
                return self._transaction(self.connection.execute, each)
        except TRANSIENT_ERRORS as exc:
            return Outcome(error=f"{type(exc).__name__}: {exc}")

    def _columns(self, frames: Sequence[bytes]) -> list[Any]:
        columns: list[Any] = []
        for frame in frames:
            columns.extend(self._decode(frame))
        return columns

    def _insert_columns(self, requests: list[Any]) -> int:
        """Insert request columns through Python's connection; the rows stored."""
        if not requests:
            return 0
        before = self.connection.total_changes
        insert_columns(self.connection, requests, self.statements)
        return self.connection.total_changes - before

    @staticmethod
    def _transaction(execute: Callable[[str], object], body: Callable[[], Outcome]) -> Outcome:
        execute("BEGIN IMMEDIATE")
        try:
            outcome = body()
            execute("COMMIT")
        except BaseException:
            execute("ROLLBACK")
            raise
        return outcome

    def _write_each(self, requests: list[Any], feedback: Sequence[Row], configs: Sequence[Row]) -> Outcome:
        connection = self.connection
        outcome = Outcome()
        one_row = {1: self.statements[1]}
        for table, rows in (("configs", configs), ("requests", request_rows(requests)), ("feedback", feedback)):
            for row in rows:
                connection.execute("SAVEPOINT record")
                before = connection.total_changes
                try:
                    if table == "requests":
                        insert_requests(connection, [row], one_row)
                    else:
                        connection.execute(_INSERT_CONFIG if table == "configs" else _UPSERT_FEEDBACK, row)
                except TRANSIENT_ERRORS:
                    raise
                except (sqlite3.Error, ValueError, TypeError, OverflowError) as exc:
                    connection.execute("ROLLBACK TO record")
                    outcome.rejected.append((table, repr(row)[:500], f"{type(exc).__name__}: {exc}"))
                else:
                    if table == "requests":
                        outcome.inserted += connection.total_changes - before
                    outcome.feedback += table == "feedback"
                connection.execute("RELEASE record")
        return outcome


def write_frame(stream: IO[bytes], payload: Any) -> None:
    """One frame: length, then the marshalled payload."""
    write_bytes_frame(stream, marshal.dumps(payload))


def write_bytes_frame(stream: IO[bytes], data: bytes) -> None:
    """One frame of an encoded payload: length, then `data`."""
    stream.write(FRAME_HEADER.pack(len(data)) + data)


def read_frame(stream: IO[bytes]) -> Any:
    """The next frame's payload; EOFError when the stream ends (cleanly or mid-frame)."""
    return marshal.loads(read_bytes_frame(stream))


def read_bytes_frame(stream: IO[bytes]) -> bytes:
    """The next frame's payload, as bytes; EOFError when the stream ends (cleanly or mid-frame)."""
    header = _read_exactly(stream, FRAME_HEADER.size)
    return _read_exactly(stream, FRAME_HEADER.unpack(header)[0])


def _read_exactly(stream: IO[bytes], size: int) -> bytes:
    data = stream.read(size)
    if data is None or len(data) != size:
        raise EOFError(f"the stream ended after {0 if not data else len(data)} of {size} bytes")
    return data


def serve(incoming: IO[bytes], outgoing: IO[bytes], writer: StoreWriter) -> int:
    """Answer batches until `incoming` ends; the number of batches written."""
    batches = 0
    while True:
        try:
            count, feedback, configs = read_frame(incoming)
            frames = [read_bytes_frame(incoming) for _ in range(count)]
        except EOFError:
            return batches
        write_frame(outgoing, writer.write_frames(frames, feedback, configs).as_message())
        outgoing.flush()
        batches += 1


def lower_priority(priority: str) -> None:
    """Run this process at `priority` (one of PRIORITIES), below the balancer's."""
    os.nice(NICENESS)
    if priority == "idle" and hasattr(os, "SCHED_IDLE"):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: serve batches from stdin for one store."""
    parser = argparse.ArgumentParser(prog="python -m balancer.store_writer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True, help="the SQLite outcome store")
    parser.add_argument("--max-rows-per-statement", type=int, default=MAX_ROWS_PER_STATEMENT)
    parser.add_argument("--priority", choices=PRIORITIES, default="idle")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s store_writer: %(message)s")
    # Ctrl-C reaches the whole process group; the writer must outlive it to take the balancer's last flush.
    # It stops when the balancer closes the pipe (or dies).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    lower_priority(args.priority)
    connection = store.connect(args.store, cached_statements=len(insert_statements(args.max_rows_per_statement)) + 8)
    fast = fast_connection(args.store, args.max_rows_per_statement)
    try:
        serve(sys.stdin.buffer, sys.stdout.buffer,
              StoreWriter(connection, max_rows_per_statement=args.max_rows_per_statement, fast=fast))
    finally:
        if fast is not None:
            fast.close()
        connection.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
