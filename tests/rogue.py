"""The scheduler's operator as the issue plays it: its hands on the scheduler's SQLite file
(the task rows, never the audit table), and on the executors, to which it can hand a task
with the signatures the scheduler holds. What the honest nodes do about it is the test."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from teeflow.core import audit, wire
from teeflow.net.executor_client import ExecutorClient


class Operator:
    def __init__(self, db: Path) -> None:
        self.db = db

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.db, timeout=30)
        db.row_factory = sqlite3.Row
        return db

    def task_row(self, task_id: str) -> dict[str, Any]:
        db = self._connect()
        try:
            return dict(db.execute("SELECT * FROM tasks WHERE id=?", (task_id,)).fetchone())
        finally:
            db.close()

    def point(self, task_id: str, **columns: Any) -> None:
        """Edit the task row: executor, spec (a dict), spec_digest, state."""
        if "spec" in columns:
            columns["spec"] = json.dumps(columns["spec"])
        db = self._connect()
        try:
            with db:
                for name, value in columns.items():
                    assert name in ("executor", "spec", "spec_digest", "state")
                    db.execute(f"UPDATE tasks SET {name}=? WHERE id=?", (value, task_id))
        finally:
            db.close()

    def create_body(self, task_id: str) -> bytes:
        """create-task as the scheduler sends it, from what the scheduler holds."""
        db = self._connect()
        try:
            spec = json.loads(db.execute("SELECT spec FROM tasks WHERE id=?",
                                         (task_id,)).fetchone()[0])
            approvals = [{"signer": audit.ed25519_signer(r["owner_key"]),
                          "signature": r["signature"]} for r in db.execute(
                "SELECT owner_key, signature FROM approvals WHERE task_id=? AND "
                "decision='approved'", (task_id,))]
            submitted = db.execute("SELECT signature FROM audit WHERE task_id=? AND "
                                   "kind='submitted'", (task_id,)).fetchone()[0]
        finally:
            db.close()
        return wire.canonical({"spec": spec, "approvals": approvals,
                               "initiator_signature": submitted})

    def create_at(self, task_id: str, executor: str) -> None:
        """Hand the signed task to `executor` (raises what the executor answers)."""
        with ExecutorClient(executor, None) as ex:
            ex.action("create-task", self.create_body(task_id))

    def send_owners(self, task_id: str, executor: str) -> None:
        """Point the task at `executor` and make its owners' uploads pending again, so
        each provider is asked to upload there."""
        db = self._connect()
        try:
            with db:
                db.execute("UPDATE tasks SET executor=?, state='accepted', error=NULL WHERE "
                           "id=?", (executor, task_id))
                db.execute("UPDATE assignments SET state='pending', rows=0, error=NULL WHERE "
                           "task_id=?", (task_id,))
        finally:
            db.close()
