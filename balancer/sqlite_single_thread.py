"""Process-wide SQLite settings for a process that uses SQLite from one thread only: the store writer.

In its default (serialized) mode SQLite takes the connection's mutex in every API call, and
with memory statistics on it takes a global mutex in every malloc and free. Python's sqlite3
binds each text parameter with a copy (a malloc, and a free when it is rebound), so a request
row's seven text values cost about 2,300 instructions of locking and accounting in the writer
(`python -m bench.instructions`). One thread needs neither.

Both settings are `sqlite3_config` calls, which SQLite accepts only before it initializes,
and Python's sqlite3 module initializes it on import: `configure()` must run before the first
`import sqlite3` of the process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

logger = logging.getLogger(__name__)

SQLITE_OK = 0
SQLITE_CONFIG_SINGLETHREAD = 1  # sqlite3.h: no mutexes at all
SQLITE_CONFIG_MEMSTATUS = 9  # sqlite3.h: takes an int, 0 turns memory statistics off


def configure() -> bool:
    """Put the process's SQLite library in single-thread mode without memory statistics; False if it could not be."""
    if "_sqlite3" in sys.modules:
        logger.warning("sqlite3 is already imported: SQLite keeps its default (serialized) mode")
        return False
    name = ctypes.util.find_library("sqlite3")
    if name is None:  # a Python whose sqlite3 module carries its own SQLite: nothing to configure from here
        return False
    try:
        library = ctypes.CDLL(name)
    except OSError:
        return False
    return (library.sqlite3_config(SQLITE_CONFIG_SINGLETHREAD) == SQLITE_OK
            and library.sqlite3_config(SQLITE_CONFIG_MEMSTATUS, ctypes.c_int(0)) == SQLITE_OK)
