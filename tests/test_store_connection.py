"""The store writer's C connection (balancer/_store.c): it stores what Python's sqlite3 stores, in one transaction
per batch; a record SQLite refuses is found and reported as before; a locked store writes nothing and says so; a
damaged frame is an error, never a partial write."""

from __future__ import annotations

import contextlib
import math
import random
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from balancer import native, store, store_writer
from balancer import rows as python_rows
from bench.store_insert import synthetic_rows
from tests.test_rows import NULLABLE, c_rows, frame_of, varied_rows

TABLES = {
    "requests": ", ".join(store.REQUEST_COLUMNS),
    "feedback": "request_id, ts, value",
    "configs": "version, hash, ts, experiment, status, control, weights, body",
}
INSERTS = list(store_writer.insert_statements(zero_is_null=False).values())
CONFIG = (3, "abc123", 1_700_000_000.5, "exp", "running", "model_a", '{"model_a": 50, "model_b": 50}', "body: ✓")


def c_store() -> ModuleType:
    c_rows()  # skips (or fails under BALANCER_REQUIRE_NATIVE) where nothing is built
    import balancer._store as module  # type: ignore[import-not-found]  # built by `make native`

    return module


@contextlib.contextmanager
def writer(path: Path, *, fast: bool, busy_timeout_ms: int = 5000) -> Iterator[store_writer.StoreWriter]:
    connection = store.connect(path)
    c_store()
    connection_c = store_writer.fast_connection(str(path), busy_timeout_ms=busy_timeout_ms) if fast else None
    try:
        yield store_writer.StoreWriter(connection, fast=connection_c)
    finally:
        if connection_c is not None:
            connection_c.close()
        connection.close()


def contents(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    with contextlib.closing(sqlite3.connect(path)) as connection:
        return {table: connection.execute(f"SELECT {columns} FROM {table} ORDER BY 1").fetchall()
                for table, columns in TABLES.items()}


def balancer_shaped(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """`rows` with the nullable text columns holding a text or None, as the balancer records them."""
    return [tuple(str(value) if column in NULLABLE and value is not None and not isinstance(value, str) else value
                  for column, value in enumerate(row)) for row in rows]


def write_both(tmp_path: Path, frames: list[bytes], feedback: list[tuple[Any, ...]],
               configs: list[tuple[Any, ...]]) -> tuple[store_writer.Outcome, store_writer.Outcome, int]:
    """The batch written with the C connection and without it, into two stores; both outcomes, and the rows the
    Python connection of the C writer changed."""
    with writer(tmp_path / "c.db", fast=True) as fast, writer(tmp_path / "python.db", fast=False) as slow:
        outcomes = fast.write_frames(frames, feedback, configs), slow.write_frames(frames, feedback, configs)
        python_changes = fast.connection.total_changes
    assert contents(tmp_path / "c.db") == contents(tmp_path / "python.db")
    return outcomes[0], outcomes[1], python_changes


def test_a_clean_batch_goes_through_the_c_connection_and_is_stored_as_pythons_sqlite3_stores_it(tmp_path: Path) -> None:
    rows = synthetic_rows(600)
    rows[3] = rows[3][:5] + (None, "random_no_key", None) + rows[3][8:10] + (None,)
    rows[4] = rows[4][:7] + ("ünïcode-user ✓", 200, math.pi, "x" * 70_000)
    rows.append(rows[10][:1] + rows[11][1:])  # a reused request id: the first record stays
    frames = [frame_of(c_rows(), rows[:256]), frame_of(c_rows(), rows[256:])]
    feedback = [(rows[0][0], 1_700_000_001.0, 0.25), (rows[1][0], 1_700_000_002.0, 1.0), (rows[0][0], 1_700_000_003.0, 0.5)]
    fast, slow, python_changes = write_both(tmp_path, frames, feedback, [CONFIG])
    assert fast.as_message() == slow.as_message() == (600, 3, [], None)
    assert python_changes == 0  # the whole batch went through the C connection
    stored = contents(tmp_path / "c.db")
    assert stored["requests"][4] == rows[4]
    assert stored["requests"][3][5:8] == (None, "random_no_key", None)
    assert stored["feedback"][0] == (rows[0][0], 1_700_000_003.0, 0.5)


def test_records_sqlite_refuses_are_reported_and_the_rest_stored_as_without_it(tmp_path: Path) -> None:
    rows = balancer_shaped(varied_rows(300, seed=3, long_text=500))  # None and NaN in NOT NULL columns: refused
    frames = [frame_of(c_rows(), rows[:150]), frame_of(c_rows(), rows[150:])]
    feedback = [(rows[0][0], 1.0, 2.0), (rows[1][0], None, 1.0)]  # the second: NOT NULL
    fast, slow, _ = write_both(tmp_path, frames, feedback, [CONFIG, (4, None) + CONFIG[2:]])
    assert fast.as_message() == slow.as_message()
    assert 0 < fast.inserted < 300 and fast.feedback == 1
    assert {table for table, _, _ in fast.rejected} == {"requests", "feedback", "configs"}


def test_a_locked_store_writes_nothing_and_says_so_and_the_next_try_commits(tmp_path: Path) -> None:
    path = tmp_path / "outcomes.db"
    frame = frame_of(c_rows(), synthetic_rows(10))
    with writer(path, fast=True, busy_timeout_ms=50) as fast:
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        outcome = fast.write_frames([frame], [], [CONFIG])
        assert outcome.error == "OperationalError: database is locked"
        other.execute("ROLLBACK")
        other.close()
        assert contents(path)["requests"] == []
        assert fast.write_frames([frame], [], [CONFIG]).as_message() == (10, 0, [], None)
    assert len(contents(path)["requests"]) == 10


def test_every_damaged_frame_is_refused_with_nothing_written_and_agrees_with_the_decoder(tmp_path: Path) -> None:
    path = tmp_path / "outcomes.db"
    rows = balancer_shaped(varied_rows(40, seed=11, long_text=300))
    rows = [row[:2] + (row[2] if row[2] is not None else "exp",) + row[3:] for row in rows]
    rows[5] = rows[5][:7] + ("é" * 10,) + rows[5][8:]  # a UTF-8 text: its length and its bytes can be damaged too
    frame = frame_of(c_rows(), rows)
    decode = c_rows().decode
    with writer(path, fast=True) as fast:
        for end in range(len(frame)):
            with pytest.raises(ValueError, match="corrupt rows frame"):
                fast.write_frames([frame[:end]], [], [])
        with pytest.raises(ValueError, match="bytes after the last row"):
            fast.write_frames([frame + b"\x00"], [], [])
        generator = random.Random(5)
        refused = 0
        for _ in range(2_000):
            damaged = bytearray(frame)
            for _ in range(generator.randint(1, 3)):
                damaged[generator.randrange(len(damaged))] = generator.randrange(256)
            try:
                decode(bytes(damaged))
            except ValueError:
                refused += 1
                # found by the C connection, or by the decoder where SQLite refused a damaged value before it
                with pytest.raises(ValueError, match="corrupt rows frame|codec can't decode"):
                    fast.write_frames([bytes(damaged)], [], [])
        assert refused > 500
        assert contents(path)["requests"] == []  # each refused batch was rolled back whole
        assert fast.write_frames([frame], [], []).error is None  # and the connection is usable after every one


def test_a_text_that_is_not_utf8_is_refused_like_the_decoder_refuses_it(tmp_path: Path) -> None:
    frame = bytearray(frame_of(c_rows(), [("id-1", 1.0, "exp", 1, "model_a", None, "random", "é" * 3, 200, 1.0, None)]))
    frame[frame.index("é".encode())] = 0xED  # the start of a UTF-16 surrogate: not UTF-8
    with pytest.raises(UnicodeDecodeError):
        c_rows().decode(bytes(frame))
    with writer(tmp_path / "outcomes.db", fast=True) as fast, pytest.raises(ValueError, match="a text that is not UTF-8"):
        fast.write_frames([bytes(frame)], [], [])


@pytest.mark.parametrize("text", ["", "a", "ü", "✓", "😀", "\U0010ffff", "\ud7ff\ue000"])
def test_every_kind_of_utf8_character_is_accepted(tmp_path: Path, text: str) -> None:
    row = ("id-1", 1.0, "exp", 1, "model_a", None, "random", text * 300, 200, 1.0, None)
    with writer(tmp_path / "outcomes.db", fast=True) as fast:
        assert fast.write_frames([frame_of(c_rows(), [row])], [], []).inserted == 1
    assert contents(tmp_path / "outcomes.db")["requests"] == [row]


def test_executemany_binds_each_kind_of_value_and_refuses_what_it_cannot_store(tmp_path: Path) -> None:
    path = tmp_path / "outcomes.db"
    store.connect(path).close()
    connection = c_store().Connection(str(path), INSERTS)
    connection.execute("CREATE TABLE t (a, b, c, d, e)")
    connection.executemany("INSERT INTO t VALUES (?, ?, ?, ?, ?)",
                           [(None, -(2**63), 2.5, "ü✓", b"\x00\xff"), [1, True, -0.0, "", b""]])
    with contextlib.closing(sqlite3.connect(path)) as reading:
        assert reading.execute("SELECT * FROM t ORDER BY rowid").fetchall() == [
            (None, -(2**63), 2.5, "ü✓", b"\x00\xff"), (1, 1, 0.0, "", b"")]
    for row, message in [((1, 2, 3, 4, object()), "parameter 5: a object cannot be stored"),
                         ((2**63, 0, 0, 0, 0), "parameter 1: the integer does not fit 64 bits"),
                         (("\ud800", 0, 0, 0, 0), "parameter 1: the text is not valid Unicode"),
                         ((1, 2), "the statement has 5 parameters, the row 2 values")]:
        with pytest.raises(sqlite3.ProgrammingError, match=message):
            connection.executemany("INSERT INTO t VALUES (?, ?, ?, ?, ?)", [row])
    with pytest.raises(sqlite3.OperationalError, match="no such table: missing") as raised:
        connection.executemany("INSERT INTO missing VALUES (?)", [(1,)])
    assert raised.value.sqlite_errorcode == sqlite3.SQLITE_ERROR
    connection.execute("CREATE TABLE u (a PRIMARY KEY)")
    connection.executemany("INSERT INTO u VALUES (?)", [(1,)])
    with pytest.raises(sqlite3.IntegrityError, match="UNIQUE constraint failed"):
        connection.executemany("INSERT INTO u VALUES (?)", [(1,)])
    connection.close()
    connection.close()
    with pytest.raises(sqlite3.ProgrammingError, match="the connection is closed"):
        connection.execute("SELECT 1")


def test_a_frame_of_another_width_or_a_missing_store_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "outcomes.db"
    with pytest.raises(sqlite3.OperationalError, match="unable to open database file"):
        c_store().Connection(str(path), INSERTS)  # the writer opens stores balancer.store created
    store.connect(path).close()
    connection = c_store().Connection(str(path), INSERTS)
    narrow = c_rows().Rows(3)
    narrow.append(("a", 1, 2.0))
    with pytest.raises(sqlite3.ProgrammingError, match="the frame's rows have 3 columns, the inserts 11 parameters a row"):
        connection.insert_requests(narrow.take()[0])
    connection.close()


def test_the_writer_uses_the_c_connection_only_where_the_compiled_modules_run(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "outcomes.db"
    store.connect(path).close()
    c_store()
    fast = store_writer.fast_connection(str(path))
    assert type(fast).__name__ == "Connection"
    fast.close()
    monkeypatch.setattr(native, "MODE", "interpreted (BALANCER_PURE_PYTHON is set)")
    assert store_writer.fast_connection(str(path)) is None
    assert python_rows.implementation() is python_rows
