"""The store's schema: new stores keep requests and feedback in WITHOUT ROWID tables, and stores created before
with rowid tables are still written and read the same."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import pytest

from balancer import store
from balancer.events import EventLog
from balancer.report import build_report
from balancer.report_synthetic import write_synthetic_store
from bench.store_insert import synthetic_rows


def _rowid_store(path: Path) -> Path:
    with contextlib.closing(sqlite3.connect(path)) as connection:
        connection.executescript(store.ROWID_SCHEMA)
    return path


@pytest.mark.parametrize("table", ["requests", "feedback"])
def test_new_stores_keep_rows_in_their_primary_key_tree(tmp_path: Path, table: str) -> None:
    connection = store.connect(tmp_path / "outcomes.db")
    with pytest.raises(sqlite3.OperationalError, match="no such column: rowid"):
        connection.execute(f"SELECT rowid FROM {table}")
    connection.execute("SELECT rowid FROM configs")  # configs keeps its INTEGER PRIMARY KEY rowid


def test_a_request_without_an_id_is_refused(tmp_path: Path) -> None:
    connection = store.connect(tmp_path / "outcomes.db")
    with pytest.raises(sqlite3.IntegrityError, match="NOT NULL constraint failed: requests.request_id"):
        connection.execute("INSERT INTO requests VALUES (NULL, 1.0, 'e', 1, 'a', NULL, 'random', NULL, 200, 1.0, NULL)")


def test_a_store_with_rowid_tables_is_written_as_before(tmp_path: Path) -> None:
    path = _rowid_store(tmp_path / "outcomes.db")
    log = EventLog(path, flush_interval_s=0.05)
    rows = synthetic_rows(700)
    for row in rows:
        log.record_request(row)
    log.flush()
    log.record_request(rows[0][:8] + (503, 9.0, "again"))  # a reused id keeps its first record here too
    log.record_feedback(rows[1][0], 1.0)
    log.close()
    with contextlib.closing(sqlite3.connect(path)) as connection:
        assert connection.execute("SELECT COUNT(*), COUNT(DISTINCT rowid) FROM requests").fetchone() == (700, 700)
        assert connection.execute("SELECT status FROM requests WHERE request_id = ?", (rows[0][0],)).fetchone() == (200,)
        assert connection.execute("SELECT request_id, value FROM feedback").fetchall() == [(rows[1][0], 1.0)]
    assert log.written_requests == 701 and log.duplicate_requests == 1


def test_both_schemas_give_the_same_report(tmp_path: Path) -> None:
    new, old = tmp_path / "new.db", _rowid_store(tmp_path / "old.db")
    for path in (new, old):
        write_synthetic_store(path, requests=20_000, seed=3)
    reports = [build_report(path) for path in (old, new)]
    for report in reports:
        del report["generated_at"]  # the wall clock, which may tick between the two
    assert reports[0] == reports[1]
