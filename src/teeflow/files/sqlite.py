"""One way to open the small SQLite files nodes keep for themselves (ledgers, records).

Autocommit: every change is an explicit `BEGIN IMMEDIATE` transaction, which also serializes
two processes sharing the file; WAL with a full sync, so a spend or a claim survives a crash
the moment its transaction ends.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path


def open_db(path: Path | None, dir_mode: int = 0o777) -> sqlite3.Connection:
    """The connection for `path` (None: in memory, for a node that keeps no state)."""
    if path is None:
        return sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
    path.parent.mkdir(mode=dir_mode, parents=True, exist_ok=True)
    db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None,
                         timeout=30.0)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    return db
