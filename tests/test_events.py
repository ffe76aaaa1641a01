"""The outcome log's batch insert: every row exactly once, whatever the batch size; duplicates ignored and counted."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from balancer import events, store
from balancer.events import EventLog
from bench.store_insert import synthetic_rows


@pytest.mark.parametrize("count", [0, 1, 2, events._ROWS_PER_STATEMENT - 1, events._ROWS_PER_STATEMENT,
                                   2 * events._ROWS_PER_STATEMENT + 7])
def test_insert_requests_stores_every_row_once(tmp_path: Path, count: int) -> None:
    connection = store.connect(tmp_path / "outcomes.db")
    rows = synthetic_rows(count)
    events.insert_requests(connection, rows)
    stored = connection.execute(f"SELECT {', '.join(store.REQUEST_COLUMNS)} FROM requests ORDER BY request_id").fetchall()
    assert stored == sorted(rows)


def test_event_log_writes_batches_and_counts_reused_request_ids(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "outcomes.db", flush_interval_s=0.05)
    rows = synthetic_rows(1500)
    for row in rows:
        log.record_request(row)
    log.flush()
    log.record_request(rows[0][:8] + (503, 9.0, "again"))  # a client reusing an X-Request-ID: the first record stays
    log.record_feedback(rows[1][0], 1.0)
    log.close()
    with sqlite3.connect(tmp_path / "outcomes.db") as connection:
        assert connection.execute("SELECT COUNT(*) FROM requests").fetchone() == (1500,)
        assert connection.execute("SELECT status FROM requests WHERE request_id = ?", (rows[0][0],)).fetchone() == (200,)
        assert connection.execute("SELECT value FROM feedback").fetchall() == [(1.0,)]
    assert log.written_requests == 1501 and log.duplicate_requests == 1 and log.written_feedback == 1


def test_a_batch_the_store_refuses_is_kept_and_the_error_shown(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "outcomes.db", flush_interval_s=60)  # flushes only when the test says so
    log.record_request(synthetic_rows(1)[0][:10])  # one column short: SQLite refuses the statement
    log.flush()
    assert log.last_error is not None and "bindings" in log.last_error and log.pending == 1
    log._requests.clear()  # this bad row would be retried forever (see the note on poison rows)
    log.close()
