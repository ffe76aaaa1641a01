"""The outcome store: one SQLite database (WAL) holding every request, feedback and config version.

This module owns the schema and how a connection is opened. Writing in batches off
the event loop lives in `events`; reading for the comparison lives in `report`.

Tables:

``requests``   one row per proxied request.
    request_id TEXT PRIMARY KEY, ts REAL (unix seconds at arrival), experiment TEXT,
    config_version INTEGER, variant TEXT, upstream TEXT (NULL if none was tried),
    assignment TEXT (see ``ASSIGNMENT_KINDS``), unit_id TEXT (sticky key value or NULL),
    status INTEGER (HTTP status sent to the client), latency_ms REAL (arrival to answer),
    error TEXT (NULL when the upstream answered).

``feedback``   delayed ground truth, at most one value per request (last write wins).
    request_id TEXT PRIMARY KEY, ts REAL, value REAL.

``configs``    every config version the balancer applied.
    version INTEGER PRIMARY KEY, hash TEXT, ts REAL (when applied), experiment TEXT,
    status TEXT, control TEXT, weights TEXT (JSON object variant -> weight), body TEXT (YAML).

``requests`` and ``feedback`` are WITHOUT ROWID tables: a row is stored once, in its primary key's
B-tree, not in a table and again in the key's index, so the file is 23 % smaller
(`python -m bench.store_insert --schemas`); the writer's instructions per row did not change
measurably (`python -m bench.instructions`: the balancer's ids sort by arrival, so the index was appended to).
Stores created before keep their rowid tables and work the same: nothing reads a rowid.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Final

ASSIGNMENT_KINDS: Final = (
    "sticky",  # hashed from the unit key
    "random",  # random strategy
    "random_no_key",  # sticky strategy, but the request carried no key
    "forced",  # X-Variant override header
    "paused",  # experiment paused: everyone on the control
    "winner",  # experiment stopped: everyone on the winner
    "fallback",  # assigned variant was down; served by the control instead
)

SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS requests (
    request_id     TEXT PRIMARY KEY,
    ts             REAL NOT NULL,
    experiment     TEXT NOT NULL,
    config_version INTEGER NOT NULL,
    variant        TEXT NOT NULL,
    upstream       TEXT,
    assignment     TEXT NOT NULL,
    unit_id        TEXT,
    status         INTEGER NOT NULL,
    latency_ms     REAL NOT NULL,
    error          TEXT
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS feedback (
    request_id TEXT PRIMARY KEY,
    ts         REAL NOT NULL,
    value      REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS configs (
    version    INTEGER PRIMARY KEY,
    hash       TEXT NOT NULL,
    ts         REAL NOT NULL,
    experiment TEXT NOT NULL,
    status     TEXT NOT NULL,
    control    TEXT NOT NULL,
    weights    TEXT NOT NULL,
    body       TEXT NOT NULL
);
"""

# The schema of stores created before the WITHOUT ROWID tables; they are still opened and written as they are.
ROWID_SCHEMA: Final = SCHEMA.replace(") WITHOUT ROWID;", ");")

REQUEST_COLUMNS: Final = (
    "request_id",
    "ts",
    "experiment",
    "config_version",
    "variant",
    "upstream",
    "assignment",
    "unit_id",
    "status",
    "latency_ms",
    "error",
)


def connect(path: str | Path, *, read_only: bool = False, cached_statements: int = 128) -> sqlite3.Connection:
    """Open the store, creating the schema when writable; WAL so readers never block the writer."""
    path = Path(path)
    if read_only:
        if not path.exists():
            raise FileNotFoundError(f"outcome store {str(path)!r} does not exist")
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        connection.execute("PRAGMA busy_timeout = 5000")
        return connection
    path.parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(path, check_same_thread=False, isolation_level=None, cached_statements=cached_statements)
    connection.execute("PRAGMA busy_timeout = 5000")
    connection.execute("PRAGMA journal_mode = WAL")
    # NORMAL in WAL mode: a committed batch survives a process crash (kill -9);
    # only an OS crash or power loss can lose the last few batches.
    connection.execute("PRAGMA synchronous = NORMAL")
    connection.executescript(SCHEMA)
    return connection
