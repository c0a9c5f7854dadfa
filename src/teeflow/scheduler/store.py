"""The scheduler's state in SQLite: nodes, the dataset catalog, tasks, assignments, events.

It routes and records; it never holds a row of anyone's data. Every task state
change goes through `transition`, which consults the table in `state.py` and
writes the new state and its event in one transaction.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from teeflow.core.errors import AuthError, StateError, UnknownDataset, UnknownTask
from teeflow.scheduler.state import FINAL, next_state

SCHEMA = """
CREATE TABLE IF NOT EXISTS nodes (
    name TEXT PRIMARY KEY, public_key TEXT NOT NULL, registered_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS datasets (
    name TEXT PRIMARY KEY, owner TEXT NOT NULL REFERENCES nodes(name),
    schema_b64 TEXT NOT NULL, fingerprint TEXT NOT NULL, rows INTEGER NOT NULL,
    registered_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY, state TEXT NOT NULL, compute TEXT NOT NULL, params TEXT NOT NULL,
    executor TEXT NOT NULL, initiator_key TEXT NOT NULL, spec TEXT NOT NULL,
    error TEXT, created_at REAL NOT NULL, updated_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS assignments (
    task_id TEXT NOT NULL REFERENCES tasks(id), dataset TEXT NOT NULL, node TEXT NOT NULL,
    state TEXT NOT NULL, rows INTEGER NOT NULL DEFAULT 0, error TEXT, updated_at REAL NOT NULL,
    PRIMARY KEY (task_id, dataset));
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, task_id TEXT NOT NULL, at REAL NOT NULL,
    event TEXT NOT NULL, state TEXT NOT NULL, detail TEXT NOT NULL);
"""

ASSIGNMENT_STATES = ("pending", "started", "uploaded", "failed")


@dataclass(frozen=True)
class Task:
    id: str
    state: str
    compute: str
    params: dict[str, str]
    executor: str
    initiator_key: str
    spec: dict[str, Any]
    error: str | None
    created_at: float
    updated_at: float

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "state": self.state, "compute": self.compute,
                "params": self.params, "executor": self.executor,
                "datasets": [d["name"] for d in self.spec["datasets"]],
                "error": self.error, "created_at": self.created_at,
                "updated_at": self.updated_at}


class Store:
    """SQLite-backed state; `Store(":memory:")` gives the in-memory backend."""

    def __init__(self, path: str | Path) -> None:
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        with self._lock:
            if str(path) != ":memory:":
                self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _tx(self):
        return _Tx(self._db, self._lock)

    # -- nodes and catalog -------------------------------------------------
    def register_node(self, name: str, public_key: str) -> None:
        with self._tx() as db:
            row = db.execute("SELECT public_key FROM nodes WHERE name=?", (name,)).fetchone()
            if row is None:
                db.execute("INSERT INTO nodes VALUES (?,?,?)", (name, public_key, time.time()))
            elif row["public_key"] != public_key:
                raise AuthError(f"node {name!r} is registered with another key")

    def node_key(self, name: str) -> str:
        with self._lock:
            row = self._db.execute("SELECT public_key FROM nodes WHERE name=?", (name,)).fetchone()
        if row is None:
            raise AuthError(f"node {name!r} is not registered")
        return str(row["public_key"])

    def nodes(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM nodes ORDER BY name").fetchall()
        return [dict(r) for r in rows]

    def add_dataset(self, owner: str, name: str, schema_b64: str, fingerprint: str,
                    rows: int) -> None:
        with self._tx() as db:
            if db.execute("SELECT 1 FROM nodes WHERE name=?", (owner,)).fetchone() is None:
                raise AuthError(f"node {owner!r} is not registered")
            row = db.execute("SELECT owner FROM datasets WHERE name=?", (name,)).fetchone()
            if row is not None and row["owner"] != owner:
                raise AuthError(f"dataset {name!r} belongs to {row['owner']!r}")
            db.execute("INSERT OR REPLACE INTO datasets VALUES (?,?,?,?,?,?)",
                       (name, owner, schema_b64, fingerprint, rows, time.time()))

    def dataset(self, name: str) -> dict[str, Any]:
        with self._lock:
            row = self._db.execute("SELECT * FROM datasets WHERE name=?", (name,)).fetchone()
        if row is None:
            raise UnknownDataset(f"unknown dataset {name!r}")
        return dict(row)

    def datasets(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM datasets ORDER BY name").fetchall()
        return [dict(r) for r in rows]

    # -- tasks -------------------------------------------------------------
    def create_task(self, task_id: str, compute: str, params: dict[str, str], executor: str,
                    initiator_key: str, spec: dict[str, Any]) -> None:
        now = time.time()
        with self._tx() as db:
            db.execute("INSERT INTO tasks VALUES (?,?,?,?,?,?,?,?,?,?)",
                       (task_id, "submitted", compute, json.dumps(params), executor,
                        initiator_key, json.dumps(spec), None, now, now))
            for d in spec["datasets"]:
                db.execute("INSERT INTO assignments VALUES (?,?,?,?,?,?,?)",
                           (task_id, d["name"], d["owner"], "pending", 0, None, now))
            db.execute("INSERT INTO events (task_id, at, event, state, detail) VALUES (?,?,?,?,?)",
                       (task_id, now, "submit", "submitted", json.dumps({"compute": compute})))

    def transition(self, task_id: str, event: str, detail: dict[str, Any] | None = None,
                   error: str | None = None) -> str:
        """Apply `event`; raises StateError (and changes nothing) if the table forbids it."""
        with self._tx() as db:
            row = db.execute("SELECT state FROM tasks WHERE id=?", (task_id,)).fetchone()
            if row is None:
                raise UnknownTask(f"unknown task {task_id!r}")
            new = next_state(row["state"], event)
            now = time.time()
            db.execute("UPDATE tasks SET state=?, updated_at=?, error=COALESCE(?, error) "
                       "WHERE id=?", (new, now, error, task_id))
            db.execute("INSERT INTO events (task_id, at, event, state, detail) VALUES (?,?,?,?,?)",
                       (task_id, now, event, new, json.dumps(detail or {})))
        return new

    def task(self, task_id: str) -> Task:
        with self._lock:
            row = self._db.execute("SELECT * FROM tasks WHERE id=?", (task_id,)).fetchone()
        if row is None:
            raise UnknownTask(f"unknown task {task_id!r}")
        return _task(row)

    def tasks(self, active_only: bool = False) -> list[Task]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM tasks ORDER BY created_at").fetchall()
        tasks = [_task(r) for r in rows]
        return [t for t in tasks if t.state not in FINAL] if active_only else tasks

    def events(self, task_id: str) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM events WHERE task_id=? ORDER BY seq", (task_id,)).fetchall()
        return [{**dict(r), "detail": json.loads(r["detail"])} for r in rows]

    # -- assignments -------------------------------------------------------
    def assignments(self, task_id: str) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM assignments WHERE task_id=? ORDER BY dataset", (task_id,)).fetchall()
        return [dict(r) for r in rows]

    def pending_for(self, node: str) -> list[dict[str, Any]]:
        """Work a node should start: pending assignments of accepted or uploading tasks."""
        with self._lock:
            rows = self._db.execute(
                "SELECT a.task_id, a.dataset, t.executor, t.compute, t.spec FROM assignments a "
                "JOIN tasks t ON t.id = a.task_id WHERE a.node=? AND a.state='pending' "
                "AND t.state IN ('accepted','uploading') ORDER BY t.created_at", (node,)).fetchall()
        return [{**dict(r), "spec": json.loads(r["spec"])} for r in rows]

    def update_assignment(self, task_id: str, dataset: str, node: str, state: str,
                          rows: int = 0, error: str | None = None) -> None:
        if state not in ASSIGNMENT_STATES:
            raise StateError(f"unknown assignment state {state!r}")
        with self._tx() as db:
            row = db.execute("SELECT node, state FROM assignments WHERE task_id=? AND dataset=?",
                             (task_id, dataset)).fetchone()
            if row is None:
                raise UnknownTask(f"no assignment of {dataset!r} in task {task_id!r}")
            if row["node"] != node:
                raise AuthError(f"assignment of {dataset!r} belongs to {row['node']!r}")
            if row["state"] in ("uploaded", "failed"):
                raise StateError(f"assignment of {dataset!r} is already {row['state']}")
            db.execute("UPDATE assignments SET state=?, rows=?, error=?, updated_at=? "
                       "WHERE task_id=? AND dataset=?",
                       (state, rows, error, time.time(), task_id, dataset))


def _task(row: sqlite3.Row) -> Task:
    return Task(id=row["id"], state=row["state"], compute=row["compute"],
                params=json.loads(row["params"]), executor=row["executor"],
                initiator_key=row["initiator_key"], spec=json.loads(row["spec"]),
                error=row["error"], created_at=row["created_at"], updated_at=row["updated_at"])


class _Tx:
    """BEGIN IMMEDIATE .. COMMIT under the store lock; ROLLBACK on any error."""

    def __init__(self, db: sqlite3.Connection, lock: threading.RLock) -> None:
        self.db, self.lock = db, lock

    def __enter__(self) -> sqlite3.Connection:
        self.lock.acquire()
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.db.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self.lock.release()
