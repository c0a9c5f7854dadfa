"""The executor's run ledger: how many times each spec digest was admitted to run here.

A signed spec allows `runs` runs (one unless it says); the executor admits a digest only
while fewer have been admitted, so a scheduler replaying a finished task (or a task after an
executor restart, when its record in memory is gone) is refused. The file is in the state
dir (`<state_dir>/runs.sqlite`; under Gramine the encrypted mount), every admission one
BEGIN IMMEDIATE transaction; with no state dir it lives in memory, for this run only.
It holds digests and counts, nothing of any data.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from teeflow.core.errors import ConsentSpent
from teeflow.files.sqlite import open_db


class RunLedger:
    def __init__(self, path: Path | None = None) -> None:
        self._lock = threading.Lock()
        self._db = open_db(path, dir_mode=0o700)
        self._db.execute("CREATE TABLE IF NOT EXISTS runs (spec_digest TEXT NOT NULL, run "
                         "INTEGER NOT NULL CHECK (run >= 1), task_id TEXT NOT NULL, at REAL "
                         "NOT NULL, PRIMARY KEY (spec_digest, run))")

    def close(self) -> None:
        self._db.close()

    def count(self, spec_digest: str) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM runs WHERE spec_digest=?",
                                        (spec_digest,)).fetchone()[0])

    def admit(self, spec_digest: str, task_id: str, limit: int) -> int:
        """The next run's number, or ConsentSpent if `limit` runs were admitted already."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                done = self._db.execute("SELECT COUNT(*) FROM runs WHERE spec_digest=?",
                                        (spec_digest,)).fetchone()[0]
                if done >= limit:
                    raise ConsentSpent(f"task {task_id}: spec {spec_digest[:16]} already ran "
                                       f"{done} time(s) here, and allows {limit}")
                self._db.execute("INSERT INTO runs VALUES (?,?,?,?)",
                                 (spec_digest, done + 1, task_id, time.time()))
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        return int(done + 1)
