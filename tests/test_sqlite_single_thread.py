"""The store writer's process-wide SQLite settings (balancer/sqlite_single_thread.py)."""

from __future__ import annotations

import subprocess
import sys

from balancer import sqlite_single_thread
from tests.processes import REPO

# Opens a store the way the writer does, then asks SQLite how much heap it accounts for: with
# memory statistics off the figure stays 0, so it tells whether configure() reached the library
# the sqlite3 module uses.
_PROBE = """
import ctypes, ctypes.util, sys, tempfile
configured = None
if sys.argv[1] == "configure":
    from balancer import sqlite_single_thread
    configured = sqlite_single_thread.configure()
from balancer import store, store_writer
from bench.store_insert import synthetic_rows
with tempfile.TemporaryDirectory() as folder:
    connection = store.connect(folder + "/outcomes.db")
    columns = [column for row in synthetic_rows(300) for column in row]
    outcome = store_writer.StoreWriter(connection).write(columns, [], [])
    stored = connection.execute("SELECT COUNT(*) FROM requests").fetchone()[0]
    used = ctypes.CDLL(ctypes.util.find_library("sqlite3")).sqlite3_memory_used()
    print(configured, outcome.inserted, stored, used)
"""


def _probe(mode: str) -> list[str]:
    result = subprocess.run([sys.executable, "-c", _PROBE, mode], cwd=REPO, capture_output=True, text=True,
                            timeout=60, check=True)
    return result.stdout.split()


def test_configure_before_sqlite3_is_imported_turns_memory_statistics_off_and_the_writer_still_stores_every_row() -> None:
    configured, inserted, stored, used = _probe("configure")
    assert (configured, inserted, stored) == ("True", "300", "300")
    assert used == "0"


def test_without_configure_sqlite_keeps_its_statistics() -> None:
    configured, inserted, stored, used = _probe("default")
    assert (configured, inserted, stored) == ("None", "300", "300")
    assert int(used) > 0


def test_configure_after_sqlite3_is_imported_changes_nothing_and_says_so() -> None:
    import sqlite3  # noqa: F401  (this test process has imported it already; made explicit here)

    assert sqlite_single_thread.configure() is False


def test_the_store_writer_process_configures_sqlite_before_importing_it() -> None:
    source = (REPO / "balancer" / "store_writer.py").read_text()
    configure_at = source.index("sqlite_single_thread.configure()")
    assert configure_at < source.index("import sqlite3")
    assert configure_at < source.index("from balancer import native, store\n")
