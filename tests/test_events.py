"""The outcome log and its writer process: every row exactly once, whatever the batch size; duplicates ignored and
counted; a refused record dropped and reported without blocking the others; a dead writer replaced."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from balancer import events, store, store_writer
from balancer.events import EventLog
from bench.store_insert import synthetic_row, synthetic_rows

REPO = Path(__file__).resolve().parent.parent


MAX = store_writer.MAX_ROWS_PER_STATEMENT


@pytest.mark.parametrize("max_rows", [MAX, store_writer.ROW_LIMIT, 1, 100])
@pytest.mark.parametrize("count", [0, 1, 2, 3, MAX - 1, MAX, MAX + 1, 2 * MAX + 7, store_writer.ROW_LIMIT + 5])
def test_insert_requests_stores_every_row_once(tmp_path: Path, count: int, max_rows: int) -> None:
    connection = store.connect(tmp_path / "outcomes.db")
    rows = synthetic_rows(count)
    store_writer.insert_requests(connection, rows, store_writer.insert_statements(max_rows))
    stored = connection.execute(f"SELECT {', '.join(store.REQUEST_COLUMNS)} FROM requests ORDER BY request_id").fetchall()
    assert stored == sorted(rows)


def test_statements_are_the_maximum_then_the_powers_of_two_below_it() -> None:
    assert list(store_writer.insert_statements(256)) == [256, 128, 64, 32, 16, 8, 4, 2, 1]
    assert list(store_writer.insert_statements(100)) == [100, 64, 32, 16, 8, 4, 2, 1]
    assert list(store_writer.insert_statements(1)) == [1]
    assert store_writer.insert_statements(3)[3].count("?") == 3 * len(store.REQUEST_COLUMNS)
    for wrong in (0, store_writer.ROW_LIMIT + 1):
        with pytest.raises(ValueError, match="max_rows must be between 1 and"):
            store_writer.insert_statements(wrong)


def test_a_statement_never_binds_more_than_the_maximum(tmp_path: Path) -> None:
    connection = store.connect(tmp_path / "outcomes.db")
    bound: list[int] = []
    connection.set_trace_callback(lambda sql: bound.append(sql.count("),(") + 1) if sql.startswith("INSERT") else None)
    store_writer.insert_requests(connection, synthetic_rows(2 * MAX + 7))
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


def test_nullable_text_columns_store_null_and_keep_zero_like_text(tmp_path: Path) -> None:
    connection = store.connect(tmp_path / "outcomes.db")
    row = synthetic_rows(1)[0]
    empty = row[:5] + (None, "random", None) + row[8:10] + (None,)
    zero_text = (row[0] + "z",) + row[1:5] + ("0", "random", "0") + row[8:10] + ("0",)
    store_writer.insert_requests(connection, [empty, zero_text])
    stored = connection.execute("SELECT upstream, unit_id, error, typeof(error) FROM requests ORDER BY request_id").fetchall()
    assert stored == [(None, None, None, "null"), ("0", "0", "0", "text")]


def test_a_record_the_store_refuses_is_dropped_and_reported_and_the_rest_written(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "outcomes.db", flush_interval_s=60)  # flushes only when the test says so
    good = synthetic_rows(300)
    for row in good[:150]:
        log.record_request(row)
    log.record_request(good[150][:10])  # one column short: SQLite refuses it
    log.record_request(good[151][:2] + (None,) + good[151][3:])  # NULL experiment: NOT NULL constraint
    for row in good[152:]:
        log.record_request(row)
    log.record_feedback(good[0][0], 0.5)
    log.flush()
    assert log.pending == 0 and log.rejected_records == 2 and log.written_requests == 298
    assert log.last_error is not None and "IntegrityError" in log.last_error
    log.record_request(synthetic_rows(301)[300])  # the log goes on
    log.close()
    with sqlite3.connect(tmp_path / "outcomes.db") as connection:
        assert connection.execute("SELECT COUNT(*) FROM requests").fetchone() == (299,)
        assert connection.execute("SELECT value FROM feedback").fetchall() == [(0.5,)]


def test_a_record_that_cannot_be_sent_is_dropped_and_the_rest_written(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "outcomes.db", flush_interval_s=60)
    rows = synthetic_rows(3)
    log.record_request(rows[0])
    log.record_request(rows[1][:10] + (object(),))
    log.record_request(rows[2])
    assert log.pending == 2  # refused as it was recorded
    log.flush()
    assert (log.rejected_records, log.pending, log.written_requests) == (1, 0, 2)
    assert log.last_error is not None and "column 10: a object cannot be stored" in log.last_error
    log.close()


def test_a_config_record_marshal_cannot_carry_is_dropped_and_the_batch_goes_with_the_next_flush(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "outcomes.db", flush_interval_s=60)
    rows = synthetic_rows(10)
    for row in rows:
        log.record_request(row)
    log.record_feedback(rows[0][0], 1.0)
    log._configs.append((7, "hash", 0.0, object(), "running", "model_a", "{}", "body"))  # no caller makes one
    log.flush()  # the header frame fails: nothing is sent, the writer is replaced, the rest is kept
    assert (log.rejected_records, log.pending, log.written_requests) == (1, 11, 0)
    assert log.last_error == "a record could not be sent to the store writer"
    log.flush()
    assert (log.pending, log.written_requests, log.written_feedback, log.last_error) == (0, 10, 1, None)
    log.close()


def test_a_writer_that_dies_is_replaced_and_nothing_is_lost(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "outcomes.db", flush_interval_s=60)
    rows = iter(synthetic_rows(1500))
    for _ in range(500):
        log.record_request(next(rows))
    log.flush()
    first = log._process
    assert first is not None
    first.kill()
    first.wait()
    for _ in range(500):
        log.record_request(next(rows))
    log.flush()  # seen dead before sending: replaced at once
    assert log.pending == 0 and log.writer_restarts == 1

    second = log._process
    assert second is not None and second is not first
    second.kill()
    second.wait()
    second.poll = lambda: None  # type: ignore[method-assign]  # dies unnoticed: the batch meets a broken pipe
    for _ in range(500):
        log.record_request(next(rows))
    log.flush()
    assert log.pending == 500 and log.last_error is not None and "store writer failed" in log.last_error
    log.flush()  # a new writer takes the kept batch
    assert log.pending == 0 and log.last_error is None and log._process is not second
    log.close()
    with sqlite3.connect(tmp_path / "outcomes.db") as connection:
        assert connection.execute("SELECT COUNT(*) FROM requests").fetchone() == (1500,)
    assert log.written_requests == 1500 and log.duplicate_requests == 0


def test_the_writer_commits_what_it_was_sent_when_the_balancer_is_killed(tmp_path: Path) -> None:
    path = tmp_path / "outcomes.db"
    script = (
        "import os, signal, sys\n"
        "from balancer.events import EventLog\n"
        "from bench.store_insert import synthetic_rows\n"
        f"log = EventLog({str(path)!r}, flush_interval_s=60)\n"
        "for row in synthetic_rows(2000):\n"
        "    log.record_request(row)\n"
        "log.flush()\n"
        "for row in synthetic_rows(2100)[2000:]:\n"
        "    log.record_request(row)\n"  # never sent: lost with the process
        "print(log._process.pid, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == -signal.SIGKILL, result.stderr
    writer_pid = int(result.stdout.split()[0])
    deadline = time.monotonic() + 10
    while _alive(writer_pid) and time.monotonic() < deadline:  # the writer sees its stdin end and exits
        time.sleep(0.05)
    assert not _alive(writer_pid)
    with sqlite3.connect(path) as connection:
        assert connection.execute("SELECT COUNT(*) FROM requests").fetchone() == (2000,)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by init) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def test_recent_variants_keep_every_uncommitted_id_and_the_last_committed_ones(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "outcomes.db", flush_interval_s=60, recent_ids=3)
    rows = synthetic_rows(10)
    for row in rows[:5]:
        log.record_request(row)
    # not committed yet: all known, however many (feedback must find them before the store does)
    assert [log.recent_variant(row[0]) for row in rows[:5]] == [row[4] for row in rows[:5]]
    log.flush()
    assert [log.recent_variant(row[0]) for row in rows[:5]] == [row[4] for row in rows[:5]]
    for row in rows[5:]:
        log.record_request(row)
    log.flush()
    # the newer batch holds `recent_ids` committed ids, so the older one is forgotten in memory
    assert [log.recent_variant(row[0]) for row in rows] == [None] * 5 + [row[4] for row in rows[5:]]
    assert log.variant_of(rows[0][0]) == rows[0][4]  # found in the store
    assert log.variant_of("never-logged") is None
    log.close()


def test_a_committed_id_is_found_in_the_store_while_a_flush_waits_for_the_writer(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "outcomes.db", flush_interval_s=60, recent_ids=0, writer_priority="normal")
    rows = synthetic_rows(2)
    log.record_request(rows[0])
    log.flush()
    assert log.recent_variant(rows[0][0]) is None  # committed, and not remembered in memory
    writer = log._process
    assert writer is not None
    os.kill(writer.pid, signal.SIGSTOP)  # the next batch waits for the writer's answer
    try:
        log.record_request(rows[1])
        flushing = threading.Thread(target=log.flush)
        flushing.start()
        time.sleep(0.2)
        assert flushing.is_alive()
        found: list[str | None] = []
        lookup = threading.Thread(target=lambda: found.append(log.variant_of(rows[0][0])))
        lookup.start()
        lookup.join(timeout=2.0)
        assert found == [rows[0][4]]  # before: it waited for the flush's lock, as long as the writer was stopped
    finally:
        os.kill(writer.pid, signal.SIGCONT)
    flushing.join(timeout=10)
    assert log.written_requests == 2
    log.close()


def test_small_committed_batches_share_a_few_dicts(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "outcomes.db", flush_interval_s=60, recent_ids=80)
    rows = synthetic_rows(200)
    for row in rows:
        log.record_request(row)
        log.flush()  # one id per batch, as at a low request rate
    generations = log._committed
    assert len(generations) <= events.COMMITTED_GENERATIONS + 2
    remembered = [row for row in rows if log.recent_variant(row[0]) is not None]
    assert 80 <= len(remembered) <= 80 + 80 // events.COMMITTED_GENERATIONS  # about `recent_ids`, the newest
    assert remembered == rows[-len(remembered):]
    log.close()


def test_ids_of_a_failed_batch_stay_known_until_it_is_committed(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "outcomes.db", flush_interval_s=60, recent_ids=0)
    rows = synthetic_rows(3)
    log.record_request(rows[0])
    log.flush()  # starts the writer
    writer = log._process
    assert writer is not None
    writer.kill()
    writer.wait()
    writer.poll = lambda: None  # type: ignore[method-assign]  # dies unnoticed: the batch meets a broken pipe
    log.record_request(rows[1])
    log.flush()  # the batch is kept
    assert log.last_error is not None and log.pending == 1
    log.record_request(rows[2])
    assert [log.recent_variant(row[0]) for row in rows[1:]] == [row[4] for row in rows[1:]]
    log.flush()  # a new writer commits both batches
    assert log.last_error is None and log.pending == 0 and log._process is not writer
    # recent_ids 0: committed ids are read from the store only
    assert [log.recent_variant(row[0]) for row in rows] == [None] * 3
    assert [log.variant_of(row[0]) for row in rows] == [row[4] for row in rows]
    log.close()


def writer_scheduling(log: EventLog) -> tuple[int, int]:
    """(policy, niceness) of the log's running writer process."""
    assert log._process is not None
    nice = int(Path(f"/proc/{log._process.pid}/stat").read_text().rsplit(")", 1)[1].split()[16])
    return os.sched_getscheduler(log._process.pid), nice


@pytest.mark.parametrize(("priority", "policy"), [("idle", os.SCHED_IDLE), ("normal", os.SCHED_OTHER)])
def test_the_writer_runs_at_a_lower_priority_than_the_balancer(tmp_path: Path, priority: str, policy: int) -> None:
    log = EventLog(tmp_path / "outcomes.db", flush_interval_s=60, writer_priority=priority)
    log.record_request(synthetic_rows(1)[0])
    log.flush()  # the writer has started and answered
    assert writer_scheduling(log) == (policy, min(19, os.nice(0) + store_writer.NICENESS))
    assert log.running_priority == priority and log.writer_escalations == 0
    log.close()


def test_an_unknown_writer_priority_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="writer_priority must be one of \\('idle', 'normal'\\), got 'high'"):
        EventLog(tmp_path / "outcomes.db", writer_priority="high")


def test_an_idle_writer_that_does_not_answer_in_time_is_replaced_at_normal_priority_for_a_while(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "outcomes.db", flush_interval_s=60, writer_starved_s=0.0, writer_normal_for_s=0.5)
    rows = synthetic_rows(30)
    log.record_request(rows[0])
    log.flush()  # no batch is answered in 0 s: the watchdog kills the writer, the batch goes to a normal one
    assert log.writer_escalations == 1 and log.writer_restarts == 0 and log.pending == 0 and log.last_error is None
    assert log.running_priority == "normal" and writer_scheduling(log)[0] == os.SCHED_OTHER
    normal_writer = log._process
    log.record_request(rows[1])
    log.flush()  # a normal writer has no watchdog: it stays
    assert log._process is normal_writer and log.writer_escalations == 1
    time.sleep(0.6)
    log.record_request(rows[2])
    log.flush()  # the while is over: a writer at idle, and (nothing being in time here) a normal one again
    assert log._process is not normal_writer and log.writer_escalations == 2 and log.writer_restarts == 0
    log.close()
    with sqlite3.connect(tmp_path / "outcomes.db") as connection:
        assert connection.execute("SELECT COUNT(*) FROM requests").fetchone()[0] == 3


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="needs Linux's SCHED_IDLE")
def test_a_writer_starved_by_a_busy_cpu_is_replaced_and_the_batch_committed(tmp_path: Path) -> None:
    """A real scheduler: an idle-priority writer sharing a CPU with a busy process gets almost none of it.

    The batch is large enough that the writer cannot commit it in the watchdog's 0.5 s on the few
    milliseconds of CPU SCHED_IDLE leaves it: with the C connection, 1,500 rows once fitted."""
    count = 20_000
    cpu = min(os.sched_getaffinity(0))
    hog = subprocess.Popen([sys.executable, "-c", "import os, time\nos.sched_setaffinity(0, {%d})\n"
                            "end = time.monotonic() + 60\nwhile time.monotonic() < end: pass" % cpu])
    try:
        log = EventLog(tmp_path / "outcomes.db", flush_interval_s=60, writer_starved_s=0.5)
        rows = synthetic_rows(count)
        log.record_request(rows[0])
        log.flush()  # started and answered while the CPUs were free
        assert log._process is not None and log.running_priority == "idle"
        os.sched_setaffinity(log._process.pid, {cpu})  # the writer now competes with the busy process
        time.sleep(0.2)
        for row in rows[1:]:
            log.record_request(row)
        started = time.monotonic()
        log.flush()
        seconds = time.monotonic() - started
        assert log.writer_escalations == 1 and log.running_priority == "normal" and log.pending == 0
        assert seconds < 5, f"the batch took {seconds:.2f}s"
        print(f"\n{count - 1:,} rows committed {seconds:.2f}s after the flush began (watchdog 0.5 s)")
        log.close()
    finally:
        hog.kill()
        hog.wait()
    with sqlite3.connect(tmp_path / "outcomes.db") as connection:
        assert connection.execute("SELECT COUNT(*) FROM requests").fetchone()[0] == count
