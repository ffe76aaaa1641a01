"""The outcome log's batch insert: every row exactly once, whatever the batch size; duplicates ignored and counted."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from balancer import events, store
from balancer.events import EventLog
from bench.store_insert import synthetic_rows


MAX = events.MAX_ROWS_PER_STATEMENT


@pytest.mark.parametrize("max_rows", [MAX, events.ROW_LIMIT, 1, 100])
@pytest.mark.parametrize("count", [0, 1, 2, 3, MAX - 1, MAX, MAX + 1, 2 * MAX + 7, events.ROW_LIMIT + 5])
def test_insert_requests_stores_every_row_once(tmp_path: Path, count: int, max_rows: int) -> None:
    connection = store.connect(tmp_path / "outcomes.db")
    rows = synthetic_rows(count)
    events.insert_requests(connection, rows, events.insert_statements(max_rows))
    stored = connection.execute(f"SELECT {', '.join(store.REQUEST_COLUMNS)} FROM requests ORDER BY request_id").fetchall()
    assert stored == sorted(rows)


def test_statements_are_the_maximum_then_the_powers_of_two_below_it() -> None:
    assert list(events.insert_statements(256)) == [256, 128, 64, 32, 16, 8, 4, 2, 1]
    assert list(events.insert_statements(100)) == [100, 64, 32, 16, 8, 4, 2, 1]
    assert list(events.insert_statements(1)) == [1]
    assert events.insert_statements(3)[3].count("?") == 3 * len(store.REQUEST_COLUMNS)
    for wrong in (0, events.ROW_LIMIT + 1):
        with pytest.raises(ValueError, match="max_rows must be between 1 and"):
            events.insert_statements(wrong)


def test_a_statement_never_binds_more_than_the_maximum(tmp_path: Path) -> None:
    connection = store.connect(tmp_path / "outcomes.db")
    bound: list[int] = []
    connection.set_trace_callback(lambda sql: bound.append(sql.count("),(") + 1) if sql.startswith("INSERT") else None)
    events.insert_requests(connection, synthetic_rows(2 * MAX + 7))
    assert bound == [MAX, MAX, 4, 2, 1]


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
