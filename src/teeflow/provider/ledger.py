"""A data owner's consent ledger: every upload this node made, per spec digest and dataset,
in a SQLite file of its own (`<key_file>.uploads.sqlite`, next to its key; never the
scheduler's state, which can neither read nor reset it).

A signed spec allows `runs` uploads of each of the owner's datasets (one unless it says);
the one after is refused, whichever executor the scheduler names. The claim is taken in
one BEGIN IMMEDIATE transaction before the first byte leaves, so two threads (or two
processes sharing the file) cannot both take the last run, and it survives a restart. A
claim is never given back: an upload that broke may have delivered rows, so it counts.

An upload taken up again after this node restarted keeps its run only where the executor
it claimed the run for (the same attested key: the same enclave instance, whose keys die
with it) is on that same run and holds no upload of the dataset for it: that enclave takes
one upload of a dataset per run and fails the task if one broke off, so resending cannot
feed a second run. Anything else takes a new run.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from teeflow.core import wire
from teeflow.core.errors import ConsentExpired, ConsentSpent
from teeflow.files.sqlite import open_db


class UploadLedger:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = open_db(self.path)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS uploads (spec_digest TEXT NOT NULL, dataset TEXT NOT "
            "NULL, run INTEGER NOT NULL CHECK (run >= 1), task_id TEXT NOT NULL, executor_key "
            "TEXT NOT NULL, at REAL NOT NULL, PRIMARY KEY (spec_digest, dataset, run))")

    def close(self) -> None:
        self._db.close()

    def claim(self, spec: wire.TaskSpec, dataset: str, executor_key: str,
              now: float | None = None, resume: int | None = None) -> int:
        """Take the next run of `dataset` under `spec` for the executor whose attested key
        hashes to `executor_key` (hex); its run number, or ConsentSpent / ConsentExpired.
        `resume`: the run that executor is on and holds no upload of `dataset` for: if
        this node claimed that very run for it, the claim is kept, not taken again."""
        at = time.time() if now is None else now
        if spec.expires is not None and spec.expires <= at:
            raise ConsentExpired(f"task {spec.task_id}: its consent expired at unix time "
                                 f"{spec.expires}")
        digest = spec.digest()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if resume is not None and self._db.execute(
                        "SELECT 1 FROM uploads WHERE spec_digest=? AND dataset=? AND run=? "
                        "AND executor_key=? AND task_id=?",
                        (digest, dataset, resume, executor_key, spec.task_id)).fetchone():
                    self._db.execute("ROLLBACK")  # that run, taken up again (module note)
                    return resume
                done = self._db.execute(
                    "SELECT COUNT(*) FROM uploads WHERE spec_digest=? AND dataset=?",
                    (digest, dataset)).fetchone()[0]
                if done >= spec.run_limit:
                    raise ConsentSpent(
                        f"dataset {dataset!r}: already uploaded {done} time(s) for spec "
                        f"{digest[:16]} of task {spec.task_id}, which allows "
                        f"{spec.run_limit}")
                self._db.execute("INSERT INTO uploads VALUES (?,?,?,?,?,?)",
                                 (digest, dataset, done + 1, spec.task_id, executor_key, at))
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        return int(done + 1)

    def claimed_for(self, spec_digest: str, dataset: str, executor_key: str) -> bool:
        """Whether this node claimed a run of `dataset` under the spec for that executor
        (an upload taken up again), so only then is the executor's view of it needed."""
        return self._db.execute(
            "SELECT 1 FROM uploads WHERE spec_digest=? AND dataset=? AND executor_key=?",
            (spec_digest, dataset, executor_key)).fetchone() is not None

    def uploads(self, spec_digest: str) -> list[dict[str, Any]]:
        rows = self._db.execute(
            "SELECT dataset, run, task_id, executor_key, at FROM uploads WHERE spec_digest=? "
            "ORDER BY dataset, run", (spec_digest,)).fetchall()
        return [{"dataset": r[0], "run": r[1], "task_id": r[2], "executor_key": r[3],
                 "at": r[4]} for r in rows]
