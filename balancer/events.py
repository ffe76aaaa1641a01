"""The durable outcome log: request records and feedback, queued on the event loop, committed by a writer process.

The event loop only appends in memory (no I/O, no locks): a request row is encoded as it is
recorded, a few dozen bytes onto one buffer (`balancer.rows`), so none of its objects lives until the
flush; feedback and config records go onto lists. A sender thread takes the buffer and swaps
the lists every `flush_interval_s` and hands them to the store's writer process
(`balancer.store_writer`), which commits each batch in one SQLite transaction and answers
with what it stored. SQLite's work, and the GIL it holds while binding parameters, stays
out of the balancer's process. A crash of the balancer (kill -9) loses at most the records
of the last flush window; the writer still commits every batch it was sent. A writer that
dies is restarted and its unanswered batch sent again. `close()` flushes everything.
"""

from __future__ import annotations

import json
import logging
import marshal
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any, Final

from balancer import rows as encoded_rows
from balancer import store, store_writer

logger = logging.getLogger(__name__)

REQUEST_WIDTH: Final = len(store.REQUEST_COLUMNS)
WRITER_STOP_TIMEOUT_S = 30.0
# Committed request ids are remembered in about this many dicts (see EventLog.__init__).
COMMITTED_GENERATIONS = 8
# A writer at "idle" priority that has not committed a batch this long after it was sent (or the
# flush interval, if longer) is starved: the machine has no idle CPU time. It is killed, and the
# batch goes at once to a writer at "normal" priority; after WRITER_NORMAL_FOR_S, "idle" again.
WRITER_STARVED_S = 1.0
WRITER_NORMAL_FOR_S = 60.0
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)


class WriterGone(Exception):
    """The writer process ended or its pipe broke before answering a batch."""


class EventLog:
    """Buffers request and feedback records; a sender thread hands them to the store's writer process."""

    def __init__(self, path: str | Path, *, flush_interval_s: float = 0.2, recent_ids: int = 200_000,
                 max_rows_per_statement: int = store_writer.MAX_ROWS_PER_STATEMENT, writer_priority: str = "idle",
                 writer_starved_s: float | None = None, writer_normal_for_s: float = WRITER_NORMAL_FOR_S) -> None:
        if writer_priority not in store_writer.PRIORITIES:
            raise ValueError(f"writer_priority must be one of {store_writer.PRIORITIES}, got {writer_priority!r}")
        self.path = Path(path)
        self.flush_interval_s = flush_interval_s
        self.writer_priority = writer_priority  # as configured; `running_priority` is the writer's now
        self.running_priority: str | None = None
        self._writer_starved_s = max(WRITER_STARVED_S, flush_interval_s) if writer_starved_s is None else writer_starved_s
        self._writer_normal_for_s = writer_normal_for_s
        self._normal_until = -math.inf  # monotonic time until which the writer runs at "normal"
        self.writer_escalations = 0
        self._in_exchange = 0  # records of the batch the writer has not answered yet
        self._starved_process: subprocess.Popen[bytes] | None = None  # the writer the watchdog killed
        # The watchdog thread: kills `_watched` if it has not answered by `_deadline` (None: nothing to watch).
        self._watch = threading.Condition()
        self._watched: subprocess.Popen[bytes] | None = None
        self._deadline: float | None = None
        store_writer.insert_statements(max_rows_per_statement)  # a bad size fails here, not in the writer
        self._max_rows_per_statement = max_rows_per_statement
        self._reader = store.connect(self.path)  # creates the schema: a store that cannot be opened fails here
        self._process: subprocess.Popen[bytes] | None = None
        # The request rows recorded since the last flush, encoded ("no value" in the nullable text columns as 0,
        # see store_writer), and the frames of rows taken from it but not yet committed (kept after a failure).
        self._rows: Any = encoded_rows.implementation().Rows(REQUEST_WIDTH, store_writer.NULLABLE_POSITIONS)
        self._frames: list[tuple[bytes, int]] = []
        self._malformed: list[tuple[tuple[Any, ...], str]] = []  # (row, why it cannot be stored)
        self._feedback: list[tuple[str, float, float]] = []
        self._configs: list[tuple[Any, ...]] = []
        # Request id -> variant, so feedback joins without reading the store. Every id not yet
        # committed is kept: in `_unsent` (recorded since the last flush began; the event loop's
        # only write) and in `_sending` (the dicts of batches handed to the writer, not yet
        # committed). Of the committed ids, `_committed` keeps about the last `recent_ids` in a few
        # dicts, newest last, each dropped whole once the newer ones hold `recent_ids`. The hot path
        # inserts into one small dict instead of evicting an old id from a large map per request.
        # Only the sender thread replaces these tuples and dicts, each publishing an id in its new
        # place before removing it from the old, so a reader on another thread always finds it.
        self._recent_ids = recent_ids
        self._unsent: dict[str, str] = {}
        self._sending: tuple[dict[str, str], ...] = ()
        self._committed: tuple[dict[str, str], ...] = ()
        self._wake = threading.Event()
        self._stopping = False
        self._flush_lock = threading.Lock()
        self._reader_lock = threading.Lock()  # one reader connection, used from the default executor's threads
        self.written_requests = 0
        self.written_feedback = 0
        self.duplicate_requests = 0
        self.rejected_records = 0
        self.writer_restarts = 0
        self.last_error: str | None = None
        # How long a row another process logs to the same store (a sibling worker's) can take to be committed:
        # feedback for an id neither this process nor the store knows yet is looked up again for that long.
        self.peer_commit_s = 0.0
        # Started now, not at the first flush: its interpreter's start-up (tens of ms of CPU, at normal
        # priority until it lowers its own) then happens before the balancer serves, not in its first second.
        self._writer_process()
        self._sender = threading.Thread(target=self._run, name="event-log-sender", daemon=True)
        self._sender.start()
        self._watchdog = threading.Thread(target=self._watch_writer, name="event-log-watchdog", daemon=True)
        self._watchdog.start()

    # hot path: called on the event loop, no I/O
    def record_request(self, row: tuple[Any, ...]) -> None:
        """Queue one request record (columns in `store.REQUEST_COLUMNS` order)."""
        try:
            self._rows.append(row)
        except (ValueError, OverflowError) as exc:  # the wrong width, or a value no column takes: nothing was written
            self._malformed.append((row, f"{type(exc).__name__}: {exc}"))  # refused at the next flush, and reported
            return
        self._unsent[row[0]] = row[4]

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
        """The variant of a request this process logged recently (committed or not), else None."""
        variant = self._unsent.get(request_id)
        if variant is not None:
            return variant
        for generation in (*self._sending, *reversed(self._committed)):
            variant = generation.get(request_id)
            if variant is not None:
                return variant
        return None

    # off the loop
    def variant_of(self, request_id: str) -> str | None:
        """The variant of a logged request, or None if unknown. Blocking: call in a thread."""
        variant = self.recent_variant(request_id)
        if variant is not None:
            return variant
        # A batch is committed before its ids leave `_sending`, so an id missed above is in the store, if
        # anywhere; the read needs no flush to finish (the writer may be slow, or starved for a second).
        with self._reader_lock:
            row = self._reader.execute("SELECT variant FROM requests WHERE request_id = ?", (request_id,)).fetchone()
        return None if row is None else str(row[0])

    def latest_config(self) -> tuple[int, str] | None:
        """(version, hash) of the newest config in the store, or None. Blocking."""
        with self._reader_lock:
            row = self._reader.execute("SELECT version, hash FROM configs ORDER BY version DESC LIMIT 1").fetchone()
        return (int(row[0]), str(row[1])) if row else None

    def flush(self) -> None:
        """Commit everything buffered so far. Blocking; safe from any thread."""
        with self._flush_lock:
            frame, count = self._rows.take()
            frames, self._frames = self._frames, []
            if count:
                frames.append((frame, count))
            feedback, self._feedback = self._feedback, []
            configs, self._configs = self._configs, []
            if self._unsent:  # a failed batch's ids stay in `_sending` until it is committed
                self._sending = (*self._sending, self._unsent)
                self._unsent = {}
            malformed, self._malformed = self._malformed, []
            refused = [("requests", repr(row)[:500], reason) for row, reason in malformed]
            if not (frames or feedback or configs):
                self._report_rejected(refused)
                return
            rows = sum(count for _, count in frames)
            self._in_exchange = rows + len(feedback)
            try:
                try:
                    inserted, written_feedback, rejected, error = self._exchange(frames, feedback, configs)
                except WriterGone:
                    if not self._escalated():
                        raise
                    inserted, written_feedback, rejected, error = self._exchange(frames, feedback, configs)
            except ValueError:
                # A feedback or config record marshal cannot carry: the batch stopped half-sent, so the
                # writer, which wrote nothing of it, is replaced; the other records go again with the next flush.
                self._stop_writer()
                feedback = self._drop_unsendable("feedback", feedback)
                configs = self._drop_unsendable("configs", configs)
                error = "a record could not be sent to the store writer"
            except (WriterGone, OSError) as exc:
                error = f"the store writer failed: {exc}"
                self._stop_writer()
            finally:
                self._in_exchange = 0
            if error is not None:
                # Keep the batch for the next attempt rather than lose it.
                self._report_rejected(refused)
                self.last_error = error
                logger.error("writing %d records to %s failed: %s; will retry", rows + len(feedback), self.path, error)
                self._frames = frames
                self._feedback[:0] = feedback
                self._configs[:0] = configs
                return
            rejected_requests = sum(1 for table, _, _ in rejected if table == "requests")
            self.written_requests += rows - rejected_requests
            self.duplicate_requests += rows - rejected_requests - inserted
            self.written_feedback += written_feedback
            self.last_error = None
            self._remember_committed()
            self._report_rejected(refused + rejected)

    def _watch_writer(self) -> None:
        """The watchdog thread: a writer at "idle" not answering a batch in time is killed (its transaction
        rolls back; `flush` sends the batch again to a writer at "normal")."""
        with self._watch:
            while not self._stopping:
                if self._deadline is None or self._watched is None:
                    self._watch.wait()
                    continue
                remaining = self._deadline - time.monotonic()
                if remaining > 0:
                    self._watch.wait(remaining)
                    continue
                self._starved_process, self._watched, self._deadline = self._watched, None, None
                self._starved_process.kill()

    def _set_watch(self, process: subprocess.Popen[bytes] | None) -> None:
        """Watch `process` from now for `_writer_starved_s`, or (None) stop watching."""
        with self._watch:
            self._watched = process
            self._deadline = None if process is None else time.monotonic() + self._writer_starved_s
            self._watch.notify()

    def _escalated(self) -> bool:
        """After a writer ended mid-exchange: if the watchdog killed it, run the next at "normal" for a while."""
        if self._process is None or self._process is not self._starved_process:
            return False
        self.writer_escalations += 1
        self._normal_until = time.monotonic() + self._writer_normal_for_s
        logger.warning("the store writer at idle priority did not commit %d records within %gs: no CPU to spare; "
                       "running it at normal priority for %gs", self._in_exchange, self._writer_starved_s,
                       self._writer_normal_for_s)
        self._stop_writer()
        return True

    def _report_rejected(self, rejected: list[tuple[str, str, str]]) -> None:
        """Log and count records refused (table, record, reason), by the store or before (a row of the wrong width or
        with a value no column takes); they are not retried."""
        self.rejected_records += len(rejected)
        for table, record, reason in rejected:
            logger.error("a %s record cannot be stored and was dropped: %s: %s", table, reason, record)
        if rejected:
            self.last_error = f"{len(rejected)} records refused, last: {rejected[-1][2]}"

    def _remember_committed(self) -> None:
        """Move the committed batches' ids from `_sending` to `_committed`, forgetting the oldest beyond `recent_ids`."""
        if self._recent_ids > 0:
            generations = list(self._committed)
            for committed in self._sending:
                if generations and len(generations[-1]) + len(committed) <= self._recent_ids // COMMITTED_GENERATIONS:
                    generations[-1].update(committed)  # a small batch joins the newest dict: lookups scan few dicts
                else:
                    generations.append(committed)
            while sum(map(len, generations[1:])) >= self._recent_ids:
                del generations[0]
            self._committed = tuple(generations)
        self._sending = ()

    def _drop_unsendable(self, table: str, rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        """The rows marshal can carry; the others are logged and counted as rejected."""
        kept = []
        for row in rows:
            try:
                marshal.dumps(row)
            except ValueError as exc:
                self.rejected_records += 1
                logger.error("a %s record cannot be stored and was dropped: %s: %r", table, exc, row)
            else:
                kept.append(row)
        return kept

    def _exchange(self, frames: list[tuple[bytes, int]], feedback: list[tuple[str, float, float]],
                  configs: list[tuple[Any, ...]]) -> tuple[int, int, list[tuple[str, str, str]], str | None]:
        """Send one batch to the writer and wait for its answer (the pipe I/O lets the event loop run)."""
        process = self._writer_process()
        assert process.stdin is not None and process.stdout is not None
        # A starved writer blocks the pipe's writes as well as its answer: the watchdog covers both.
        watched = self.running_priority == "idle"
        if watched:
            self._set_watch(process)
        try:
            store_writer.write_frame(process.stdin, (len(frames), feedback, configs))
            for frame, _ in frames:
                store_writer.write_bytes_frame(process.stdin, frame)
            process.stdin.flush()
            inserted, written_feedback, rejected, error = store_writer.read_frame(process.stdout)
        except (BrokenPipeError, EOFError) as exc:
            raise WriterGone(f"{exc} (exit status {process.poll()})") from exc
        finally:
            if watched:
                self._set_watch(None)
        return inserted, written_feedback, rejected, error

    def _wanted_priority(self) -> str:
        return "normal" if self.writer_priority == "normal" or time.monotonic() < self._normal_until else "idle"

    def _writer_process(self) -> subprocess.Popen[bytes]:
        """The running writer, started (again) if needed, or at another priority."""
        priority = self._wanted_priority()
        if self._process is not None and self._process.poll() is None:
            if priority == self.running_priority:
                return self._process
            self._stop_writer()  # back to "idle" after a while at "normal": only a new process can go up again
        if self._process is not None and self._process is not self._starved_process:
            self.writer_restarts += 1
            logger.warning("the store writer for %s ended (exit status %s); starting another",
                           self.path, self._process.returncode)
            self._stop_writer()
        environment = dict(os.environ)
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_ROOT, environment.get("PYTHONPATH")]))
        self._process = subprocess.Popen(
            [sys.executable, "-m", "balancer.store_writer", "--store", str(self.path),
             "--max-rows-per-statement", str(self._max_rows_per_statement), "--priority", priority],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=environment,
        )
        self.running_priority = priority
        return self._process

    def _stop_writer(self) -> None:
        """Close the writer's pipes and reap it (it exits once its stdin ends)."""
        process, self._process = self._process, None
        self.running_priority = None
        if process is None:
            return
        for stream in (process.stdin, process.stdout):
            _close_quietly(stream)
        try:
            process.wait(timeout=WRITER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            logger.error("the store writer for %s did not stop in %gs; killing it", self.path, WRITER_STOP_TIMEOUT_S)
            process.kill()
            process.wait()

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
        self._sender.join(timeout=30)
        self._set_watch(None)  # wakes the watchdog, which sees `_stopping`
        self._watchdog.join(timeout=5)
        self.flush()
        with self._flush_lock:
            self._stop_writer()
        with self._reader_lock:
            self._reader.close()

    @property
    def pending(self) -> int:
        """Records buffered or being written, not yet committed."""
        return len(self._rows) + sum(count for _, count in self._frames) + len(self._feedback) + self._in_exchange


def _close_quietly(stream: IO[bytes] | None) -> None:
    if stream is not None:
        try:
            stream.close()
        except OSError:
            pass
