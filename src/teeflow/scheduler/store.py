"""The scheduler's state in SQLite: members (invitations, the operator's key list, and
the nodes that joined, with their roles), executors, the dataset catalog, tasks,
assignments, approvals, seen request nonces, the audit log (a Merkle log, core/audit.py
and core/tlog.py, each entry signed by the scheduler's log key at its index) and the
cosignatures members sent for its checkpoints.

It routes and records; it never holds a row of anyone's data. Every task state
change goes through `transition` (or `approve`), which reads the state, consults the
table in `state.py`, writes the new state only if the state is still the one read, and
appends the audit entry, all in one `BEGIN IMMEDIATE` transaction. The in-memory Merkle
tree is caught up with the file at the start of each transaction, so another connection
to the same file (a second process, the operator's CLI) can never make this one append
at an index already taken. The audit log is the task
history: one log over all tasks (see core/audit.py).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from teeflow.core import audit, tlog, wire
from teeflow.core.crypto import KeySigner, Signer
from teeflow.core.errors import (
    AuthError,
    InputError,
    NotInvited,
    StateError,
    UnknownDataset,
    UnknownTask,
)
from teeflow.core.rules import DatasetRules, load_rules
from teeflow.scheduler.state import ASSIGNMENT_STATES, FINAL, next_assignment, next_state

SCHEMA = """
CREATE TABLE IF NOT EXISTS nodes (
    name TEXT PRIMARY KEY, public_key TEXT NOT NULL UNIQUE, enc_key TEXT NOT NULL,
    registered_at REAL NOT NULL, roles TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS invitations (
    token_sha256 TEXT PRIMARY KEY, roles TEXT NOT NULL, name TEXT, expires REAL NOT NULL,
    created_at REAL NOT NULL, used_at REAL, used_by TEXT);
CREATE TABLE IF NOT EXISTS members (
    public_key TEXT PRIMARY KEY, roles TEXT NOT NULL, name TEXT);
CREATE TABLE IF NOT EXISTS executors (
    address TEXT PRIMARY KEY, cert_pem TEXT NOT NULL, tee TEXT NOT NULL,
    measurements TEXT NOT NULL, registered_at REAL NOT NULL, host_key TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS datasets (
    name TEXT PRIMARY KEY, owner TEXT NOT NULL REFERENCES nodes(name),
    schema_b64 TEXT NOT NULL, fingerprint TEXT NOT NULL, rows INTEGER NOT NULL,
    registered_at REAL NOT NULL, rules TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY, state TEXT NOT NULL, compute TEXT NOT NULL, params TEXT NOT NULL,
    executor TEXT NOT NULL, initiator_key TEXT NOT NULL, spec TEXT NOT NULL,
    spec_digest TEXT NOT NULL, error TEXT, created_at REAL NOT NULL, updated_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS assignments (
    task_id TEXT NOT NULL REFERENCES tasks(id), dataset TEXT NOT NULL, node TEXT NOT NULL,
    state TEXT NOT NULL, rows INTEGER NOT NULL DEFAULT 0, error TEXT, updated_at REAL NOT NULL,
    PRIMARY KEY (task_id, dataset));
CREATE TABLE IF NOT EXISTS approvals (
    task_id TEXT NOT NULL REFERENCES tasks(id), owner_key TEXT NOT NULL,
    decision TEXT NOT NULL, signature TEXT NOT NULL, at REAL NOT NULL,
    PRIMARY KEY (task_id, owner_key));
CREATE TABLE IF NOT EXISTS nonces (
    key TEXT NOT NULL, nonce TEXT NOT NULL, expires INTEGER NOT NULL,
    PRIMARY KEY (key, nonce));
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY, task_id TEXT NOT NULL, at REAL NOT NULL, kind TEXT NOT NULL,
    body TEXT NOT NULL, signer TEXT NOT NULL, signature TEXT NOT NULL,
    prev_root TEXT NOT NULL, hash TEXT NOT NULL, log_signature TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS audit_task ON audit(task_id);
CREATE TABLE IF NOT EXISTS notices (
    task_id TEXT PRIMARY KEY REFERENCES tasks(id), created_at REAL NOT NULL,
    delivered_at REAL);
CREATE TABLE IF NOT EXISTS cosignatures (
    size INTEGER NOT NULL, root TEXT NOT NULL, public_key TEXT NOT NULL, line TEXT NOT NULL,
    at REAL NOT NULL, PRIMARY KEY (size, public_key));
CREATE TABLE IF NOT EXISTS seen (
    who TEXT PRIMARY KEY, at REAL NOT NULL);
"""
BUSY_TIMEOUT = 60.0  # seconds a writer waits for another connection's transaction
ROLES = ("owner", "initiator", "executor_host", "auditor")
INVITE_PREFIX = "tfi_"
INVITE_TTL = 7 * 86400.0
SEEN_EVERY = 5.0  # seconds: at most one last-seen write per node (or executor) this often


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_roles(roles: Collection[str]) -> str:
    """Roles as stored (sorted, comma-joined); InputError for an unknown or empty set."""
    unknown = sorted(set(roles) - set(ROLES))
    if unknown or not roles:
        raise InputError(f"roles: give one or more of {', '.join(ROLES)}"
                         + (f" (not {', '.join(map(repr, unknown))})" if unknown else ""))
    return ",".join(sorted(set(roles)))


def _node(row: sqlite3.Row) -> dict[str, Any]:
    return {**dict(row), "roles": row["roles"].split(",") if row["roles"] else []}


@dataclass(frozen=True)
class Task:
    id: str
    state: str
    compute: str
    params: dict[str, str]
    executor: str
    initiator_key: str
    spec: dict[str, Any]
    spec_digest: str
    error: str | None
    created_at: float
    updated_at: float
    deadline: float | None = None  # unix seconds; None: a task from before deadlines
    pool: tuple[str, ...] = ()  # a pool task's members' addresses, the lead (executor) first

    @property
    def members(self) -> list[str]:
        """Every executor holding part of the task: the pool's members, or its executor."""
        return list(self.pool) if self.pool else [self.executor]

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "state": self.state, "compute": self.compute,
                "params": self.params, "executor": self.executor, "pool": list(self.pool),
                "datasets": [d["name"] for d in self.spec["datasets"]],
                "spec_digest": self.spec_digest, "error": self.error,
                "created_at": self.created_at, "updated_at": self.updated_at,
                "deadline": self.deadline}


class Store:
    """SQLite-backed state; `Store(":memory:")` gives the in-memory backend.

    `log_signer`: the scheduler's log key (identity.py); a fresh one if not given."""

    def __init__(self, path: str | Path, log_signer: Signer | None = None) -> None:
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None,
                                   timeout=BUSY_TIMEOUT)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        self.log_signer: Signer = log_signer or KeySigner.generate()
        self._tree = tlog.Tree()
        self.version = 0  # counts this connection's commits: long polls re-read on a change
        self._seen_written: dict[str, float] = {}
        with self._lock:
            if str(path) != ":memory:":
                self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._upgrade_audit()
            self._db.executescript(SCHEMA)
            self._upgrade()
            self._load_tree()

    def _upgrade_audit(self) -> None:
        """A hash-chained log from before the Merkle log: re-entered, in order, as leaves
        of the tree, signed by this log key (the parties' own signatures cover only the
        content, so they still verify)."""
        have = {r["name"] for r in self._db.execute("PRAGMA table_info(audit)")}
        if "prev_hash" not in have:
            return
        old = self._db.execute("SELECT * FROM audit ORDER BY seq").fetchall()
        self._db.execute("DROP TABLE audit")
        self._db.executescript(SCHEMA)
        for r in old:
            self._append(self._db, r["task_id"], r["kind"], json.loads(r["body"]),
                         r["signer"], r["signature"], at=r["at"])

    def _load_tree(self) -> None:
        self._tree = tlog.Tree([bytes.fromhex(r["hash"]) for r in
                                self._db.execute("SELECT hash FROM audit ORDER BY seq")])

    def _sync_tree(self) -> None:
        """Catch the tree up with leaves another connection appended (under the lock; in a
        write transaction, so nothing can append between this and our own append)."""
        size = self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM audit").fetchone()[0]
        if size == len(self._tree):
            return
        if size < len(self._tree):  # pragma: no cover - the file lost leaves we saw
            self._load_tree()
            return
        for r in self._db.execute("SELECT hash FROM audit WHERE seq > ? ORDER BY seq",
                                  (len(self._tree),)):
            self._tree.append(bytes.fromhex(r["hash"]))

    def _upgrade(self) -> None:
        """A database from before closed membership: its nodes get no roles (so they can
        do nothing until the operator lists them with `--members`), its executors no
        host. Fail closed, nothing guessed."""
        for table, column in (("nodes", "roles"), ("executors", "host_key"),
                              ("datasets", "rules")):
            have = {r["name"] for r in self._db.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} TEXT NOT NULL "
                                 "DEFAULT ''")
        # a task from before deadlines gets none stored: the scheduler's default then runs
        # from its creation (service.py)
        columns = {r["name"] for r in self._db.execute("PRAGMA table_info(tasks)")}
        if "deadline" not in columns:
            self._db.execute("ALTER TABLE tasks ADD COLUMN deadline REAL")
        if "pool" not in columns:  # tasks from before pools ran on one executor
            self._db.execute("ALTER TABLE tasks ADD COLUMN pool TEXT NOT NULL DEFAULT ''")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _tx(self):
        return _Tx(self)

    def _rows(self, sql: str, *args: Any) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # -- request nonces ----------------------------------------------------
    def fresh_nonce(self, key: str, nonce: str, expires: int) -> bool:
        """Record a request nonce; False if this key used it before (a replay)."""
        with self._tx() as db:
            db.execute("DELETE FROM nonces WHERE expires < ?", (int(time.time()),))
            try:
                db.execute("INSERT INTO nonces VALUES (?,?,?)", (key, nonce, expires))
            except sqlite3.IntegrityError:
                return False
        return True

    # -- last seen ----------------------------------------------------------
    def mark_seen(self, who: str, now: float | None = None) -> None:
        """`who` (a node's key after an authenticated request, or an executor's address
        after it answered) was seen now. Written at most once per SEEN_EVERY per `who`,
        and outside `_tx`: no version bump, so long polls are not woken by it."""
        now = time.time() if now is None else now
        if now - self._seen_written.get(who, float("-inf")) < SEEN_EVERY:
            return
        with self._lock:
            self._seen_written[who] = now
            self._db.execute("INSERT INTO seen VALUES (?,?) ON CONFLICT(who) DO UPDATE SET "
                             "at=MAX(at, excluded.at)", (who, now))

    def last_seen(self, who: Collection[str]) -> dict[str, float]:
        """who -> unix time last seen, for those ever seen."""
        wanted = sorted(set(who))
        if not wanted:
            return {}
        marks = ",".join("?" * len(wanted))
        return {r["who"]: float(r["at"]) for r in
                self._rows(f"SELECT who, at FROM seen WHERE who IN ({marks})", *wanted)}

    # -- membership: invitations, the operator's key list, nodes -----------
    def invite(self, roles: Collection[str], name: str | None = None,
               ttl: float = INVITE_TTL) -> str:
        """A fresh one-time invitation token; only its SHA-256 is kept."""
        stored = check_roles(roles)
        if not ttl > 0:
            raise InputError("invitation lifetime must be positive")
        token = INVITE_PREFIX + secrets.token_urlsafe(32)
        now = time.time()
        with self._tx() as db:
            db.execute("INSERT INTO invitations VALUES (?,?,?,?,?,NULL,NULL)",
                       (_token_hash(token), stored, name, now + ttl, now))
        return token

    def set_members(self, members: Collection[tuple[str, Collection[str], str | None]]) -> None:
        """The operator's key list (public key, roles, name or None), replacing the last
        one; nodes already joined under a listed key take its roles."""
        rows = [(key, check_roles(roles), name) for key, roles, name in members]
        with self._tx() as db:
            db.execute("DELETE FROM members")
            for key, roles, name in rows:
                db.execute("INSERT INTO members VALUES (?,?,?)", (key, roles, name))
                db.execute("UPDATE nodes SET roles=? WHERE public_key=?", (roles, key))

    def register_node(self, name: str, public_key: str, enc_key: str,
                      invite: str | None = None) -> list[str]:
        """Admit a node (its roles) by the operator's key list or by spending `invite`,
        in one transaction; a node already joined under this name and key needs neither.
        NotInvited if neither admits it; nothing is stored then."""
        with self._tx() as db:
            row = db.execute("SELECT * FROM nodes WHERE name=?", (name,)).fetchone()
            other = db.execute("SELECT name FROM nodes WHERE public_key=?",
                               (public_key,)).fetchone()
            if row is not None and row["public_key"] == public_key:
                return _node(row)["roles"]
            # admission first: a stranger learns nothing of who is registered (a conflict
            # below rolls the spent invitation back with the rest)
            roles = self._admit(db, name, public_key, invite)
            if row is not None or other is not None:
                taken = f"node {name!r}" if row is not None else f"key of {other['name']!r}"
                raise AuthError(f"{taken} is registered with another key or name")
            db.execute("INSERT INTO nodes VALUES (?,?,?,?,?)",
                       (name, public_key, enc_key, time.time(), roles))
        return roles.split(",")

    @staticmethod
    def _admit(db: sqlite3.Connection, name: str, public_key: str, invite: str | None) -> str:
        member = db.execute("SELECT roles, name FROM members WHERE public_key=?",
                            (public_key,)).fetchone()
        if member is not None and member["name"] in (None, name):
            return str(member["roles"])
        if not invite:
            raise NotInvited("registration refused: this key has no invitation (ask the "
                             "scheduler's operator for one: teeflow scheduler invite)")
        now = time.time()
        inv = db.execute("SELECT * FROM invitations WHERE token_sha256=?",
                         (_token_hash(invite),)).fetchone()
        if inv is None:
            raise NotInvited("registration refused: unknown invitation token")
        if inv["used_at"] is not None:
            raise NotInvited("registration refused: invitation already used")
        if inv["expires"] < now:
            raise NotInvited("registration refused: invitation expired")
        if inv["name"] is not None and inv["name"] != name:
            raise NotInvited("registration refused: invitation is for another node name")
        spent = db.execute("UPDATE invitations SET used_at=?, used_by=? WHERE token_sha256=? "
                           "AND used_at IS NULL", (now, public_key, inv["token_sha256"]))
        if spent.rowcount != 1:  # pragma: no cover - the write lock makes this the only tx
            raise NotInvited("registration refused: invitation already used")
        return str(inv["roles"])

    def node_by_key(self, public_key: str) -> dict[str, Any] | None:
        rows = self._rows("SELECT * FROM nodes WHERE public_key=?", public_key)
        return _node(rows[0]) if rows else None

    def node(self, name: str) -> dict[str, Any]:
        rows = self._rows("SELECT * FROM nodes WHERE name=?", name)
        if not rows:
            raise AuthError(f"node {name!r} is not registered")
        return _node(rows[0])

    def node_key(self, name: str) -> str:
        return str(self.node(name)["public_key"])

    def nodes(self) -> list[dict[str, Any]]:
        return [_node(r) for r in self._rows("SELECT * FROM nodes ORDER BY name")]

    def register_executor(self, address: str, cert_pem: str, tee: str,
                          measurements: dict[str, str], host_key: str = "") -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO executors VALUES (?,?,?,?,?,?)",
                       (address, cert_pem, tee, json.dumps(measurements), time.time(),
                        host_key))

    def executors(self) -> list[dict[str, Any]]:
        rows = self._rows("SELECT * FROM executors ORDER BY address")
        return [{**dict(r), "measurements": json.loads(r["measurements"])} for r in rows]

    def executor_cert(self, address: str) -> str:
        """The certificate (PEM) the executor at `address` registered with."""
        rows = self._rows("SELECT cert_pem FROM executors WHERE address=?", address)
        if not rows:
            raise InputError(f"executor {address!r} is not registered with this scheduler")
        return str(rows[0]["cert_pem"])

    def executor_host(self, address: str) -> str | None:
        """The key of the node that registered the executor at `address`."""
        rows = self._rows("SELECT host_key FROM executors WHERE address=?", address)
        return str(rows[0]["host_key"]) if rows else None

    def add_dataset(self, owner: str, name: str, schema_b64: str, fingerprint: str,
                    rows: int, rules: DatasetRules | None = None) -> None:
        with self._tx() as db:
            if db.execute("SELECT 1 FROM nodes WHERE name=?", (owner,)).fetchone() is None:
                raise AuthError(f"node {owner!r} is not registered")
            row = db.execute("SELECT owner FROM datasets WHERE name=?", (name,)).fetchone()
            if row is not None and row["owner"] != owner:
                raise AuthError(f"dataset {name!r} belongs to {row['owner']!r}")
            db.execute("INSERT OR REPLACE INTO datasets (name, owner, schema_b64, fingerprint, "
                       "rows, registered_at, rules) VALUES (?,?,?,?,?,?,?)",
                       (name, owner, schema_b64, fingerprint, rows, time.time(),
                        "" if rules is None else wire.canonical(rules.to_dict()).decode()))

    def dataset(self, name: str) -> dict[str, Any]:
        rows = self._rows("SELECT d.*, n.public_key AS owner_key FROM datasets d "
                          "JOIN nodes n ON n.name = d.owner WHERE d.name=?", name)
        if not rows:
            raise UnknownDataset(f"unknown dataset {name!r}")
        return _dataset(rows[0])

    def datasets(self) -> list[dict[str, Any]]:
        rows = self._rows("SELECT d.*, n.public_key AS owner_key FROM datasets d "
                          "JOIN nodes n ON n.name = d.owner ORDER BY d.name")
        return [_dataset(r) for r in rows]

    # -- audit log -----------------------------------------------------------
    def _append(self, db: sqlite3.Connection, task_id: str, kind: str, body: dict[str, Any],
                signer: str, signature: str, at: float | None = None) -> audit.Entry:
        """Leaf len(tree) of the log; the tree is reloaded if the transaction rolls back."""
        entry = audit.chain(self._tree, task_id, kind, body, signer, signature,
                            self.log_signer)
        db.execute("INSERT INTO audit VALUES (?,?,?,?,?,?,?,?,?,?)",
                   (entry.seq, task_id, time.time() if at is None else at, kind,
                    json.dumps(entry.body), signer, signature, entry.prev_root, entry.hash,
                    entry.log_signature))
        self._tree.append(bytes.fromhex(entry.hash))
        return entry

    def append(self, task_id: str, kind: str, body: dict[str, Any], signer: str,
               signature: str) -> None:
        """Record a signed entry that changes no state (e.g. the executor's)."""
        with self._tx() as db:
            self._append(db, task_id, kind, body, signer, signature)

    def audit_log(self, task_id: str | None = None) -> list[audit.Entry]:
        if task_id is None:
            return [_entry(r) for r in self._rows("SELECT * FROM audit ORDER BY seq")]
        return [_entry(r) for r in
                self._rows("SELECT * FROM audit WHERE task_id=? ORDER BY seq", task_id)]

    # -- the Merkle log: tree heads, proofs, leaves, cosignatures -------------
    def log_head(self, since: int | None = None) -> tuple[int, bytes, list[bytes] | None]:
        """(size, root) of the log now and, given `since` (a size a party holds), the
        consistency proof from it, all from one state (None if `since` is past the end)."""
        with self._lock:
            self._sync_tree()
            size = len(self._tree)
            proof = None
            if since is not None and 0 <= since <= size:
                proof = self._tree.consistency(since, size)
            return size, self._tree.root(size), proof

    def log_root(self, size: int) -> bytes:
        with self._lock:
            self._sync_tree()
            return self._tree.root(size)

    def log_consistency(self, old: int, new: int) -> list[bytes]:
        with self._lock:
            self._sync_tree()
            return self._tree.consistency(old, new)

    def log_inclusion(self, index: int, size: int) -> list[bytes]:
        with self._lock:
            self._sync_tree()
            return self._tree.inclusion(index, size)

    def log_leaves(self, start: int, end: int) -> list[audit.Entry]:
        """Entries with seq in [start, end)."""
        return [_entry(r) for r in self._rows(
            "SELECT * FROM audit WHERE seq >= ? AND seq < ? ORDER BY seq", start, end)]

    def add_cosignature(self, size: int, root: bytes, public_key: str, line: str) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO cosignatures VALUES (?,?,?,?,?)",
                       (size, root.hex(), public_key, line, time.time()))

    def cosignatures(self, size: int, root: bytes) -> list[dict[str, Any]]:
        return [dict(r) for r in self._rows(
            "SELECT * FROM cosignatures WHERE size=? AND root=? ORDER BY public_key",
            size, root.hex())]

    def has_signature(self, signature: str) -> bool:
        return bool(self._rows("SELECT 1 FROM audit WHERE signature=? LIMIT 1", signature))

    # -- tasks -------------------------------------------------------------
    def create_task(self, spec: dict[str, Any], spec_digest: str, executor: str,
                    signature: str, deadline: float | None = None,
                    pool: list[str] | None = None) -> None:
        """A submitted task, its assignments and its signed `submitted` entry, at once;
        for a pool task also the members chosen (`pool`, the lead first), in the log."""
        now = time.time()
        task_id = spec["task_id"]
        with self._tx() as db:
            if db.execute("SELECT 1 FROM tasks WHERE id=?", (task_id,)).fetchone():
                raise StateError(f"task {task_id} already exists")
            db.execute("INSERT INTO tasks (id, state, compute, params, executor, "
                       "initiator_key, spec, spec_digest, error, created_at, updated_at, "
                       "deadline, pool) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                       (task_id, "submitted", spec["compute"], json.dumps(spec["params"]),
                        executor, spec["initiator_key"], json.dumps(spec), spec_digest, None,
                        now, now, deadline, json.dumps(pool) if pool else ""))
            for d in spec["datasets"]:
                db.execute("INSERT INTO assignments VALUES (?,?,?,?,?,?,?)",
                           (task_id, d["name"], d["owner"], "pending", 0, None, now))
            self._append(db, task_id, "submitted", {"spec": spec, "spec_digest": spec_digest},
                         audit.ed25519_signer(spec["initiator_key"]), signature)
            if pool:
                self._append(db, task_id, "pool", {"members": list(pool)}, audit.SCHEDULER, "")

    def transition(self, task_id: str, event: str, detail: dict[str, Any] | None = None,
                   error: str | None = None, signer: str = audit.SCHEDULER,
                   signature: str = "") -> str:
        """Apply `event`; raises StateError (and changes nothing) if the table forbids it."""
        with self._tx() as db:
            row = db.execute("SELECT state FROM tasks WHERE id=?", (task_id,)).fetchone()
            if row is None:
                raise UnknownTask(f"unknown task {task_id!r}")
            new = next_state(row["state"], event)
            _set_state(db.execute("UPDATE tasks SET state=?, updated_at=?, error=COALESCE(?, "
                                  "error) WHERE id=? AND state=?",
                                  (new, time.time(), error, task_id, row["state"])), task_id)
            self._append(db, task_id, event, detail or {}, signer, signature)
        return new

    def end(self, task_id: str, event: str, detail: dict[str, Any],
            error: str | None = None, result_lost: bool = False) -> str:
        """Fail or cancel a task, and note (in the same transaction, so a restart keeps it)
        that its executor must be told, if it may hold the task. A task whose release this
        scheduler granted ends only when its result is taken: StateError, unless
        `result_lost` (its executor no longer holds it)."""
        with self._tx() as db:
            row = db.execute("SELECT state FROM tasks WHERE id=?", (task_id,)).fetchone()
            if row is None:
                raise UnknownTask(f"unknown task {task_id!r}")
            if row["state"] == "done" and not result_lost and db.execute(
                    "SELECT 1 FROM audit WHERE task_id=? AND kind='release-granted'",
                    (task_id,)).fetchone():
                raise StateError(f"task {task_id}: its result was released to its receivers; "
                                 "it ends when they take it")
            new = next_state(row["state"], event)
            _set_state(db.execute("UPDATE tasks SET state=?, updated_at=?, error=COALESCE(?, "
                                  "error) WHERE id=? AND state=?",
                                  (new, time.time(), error, task_id, row["state"])), task_id)
            self._append(db, task_id, event, detail, audit.SCHEDULER, "")
            if row["state"] != "submitted":  # it may have been handed to the executor
                db.execute("INSERT OR IGNORE INTO notices VALUES (?,?,NULL)",
                           (task_id, time.time()))
        return new

    def notices(self) -> list[str]:
        """Ended tasks whose executor has not yet confirmed it dropped them."""
        return [r["task_id"] for r in self._rows(
            "SELECT task_id FROM notices WHERE delivered_at IS NULL ORDER BY created_at")]

    def notice_delivered(self, task_id: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE notices SET delivered_at=? WHERE task_id=?",
                       (time.time(), task_id))

    def grant_release(self, task_id: str, run: int) -> None:
        """Record, once, that this scheduler lets a done task's result out (before it
        signs the word that lets the executor hand it over)."""
        with self._tx() as db:
            row = db.execute("SELECT state, spec_digest FROM tasks WHERE id=?",
                             (task_id,)).fetchone()
            if row is None:
                raise UnknownTask(f"unknown task {task_id!r}")
            if row["state"] not in ("done", "released"):
                raise StateError(f"task {task_id} is {row['state']}; no result to release")
            if not db.execute("SELECT 1 FROM audit WHERE task_id=? AND kind='release-granted' "
                              "AND json_extract(body, '$.run')=?", (task_id, run)).fetchone():
                self._append(db, task_id, "release-granted",
                             {"spec_digest": row["spec_digest"], "run": run},
                             audit.SCHEDULER, "")

    def granted(self, task_id: str) -> bool:
        """Whether this scheduler let the done task's result out (`release-granted`)."""
        return bool(self._rows("SELECT 1 FROM tasks t JOIN audit a ON a.task_id = t.id WHERE "
                               "t.id=? AND t.state='done' AND a.kind='release-granted'",
                               task_id))

    def set_executor(self, task_id: str, executor: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE tasks SET executor=? WHERE id=?", (executor, task_id))

    def task(self, task_id: str) -> Task:
        rows = self._rows("SELECT * FROM tasks WHERE id=?", task_id)
        if not rows:
            raise UnknownTask(f"unknown task {task_id!r}")
        return _task(rows[0])

    def tasks(self, active_only: bool = False) -> list[Task]:
        tasks = [_task(r) for r in self._rows("SELECT * FROM tasks ORDER BY created_at")]
        return [t for t in tasks if t.state not in FINAL] if active_only else tasks

    def events(self, task_id: str) -> list[dict[str, Any]]:
        """A task's history: its audit entries, in order."""
        rows = self._rows("SELECT seq, at, kind, body, signer FROM audit WHERE task_id=? "
                          "ORDER BY seq", task_id)
        return [{"seq": r["seq"], "at": r["at"], "event": r["kind"],
                 "detail": json.loads(r["body"]),
                 "signer": r["signer"].split(":")[0]} for r in rows]

    # -- approvals -----------------------------------------------------------
    def approve(self, task_id: str, owner_key: str, decision: str, signature: str,
                event: str, all_in: bool = False,
                owners: Collection[str] | None = None) -> str:
        """Record one owner's signed decision and the transition(s) it causes, at once.
        With `owners` (every owner key of the spec), whether this approval completes
        consent is decided inside the same transaction, so two owners approving at once
        cannot both miss that the other has signed (`all_in` says it for the caller)."""
        with self._tx() as db:
            row = db.execute("SELECT state, spec_digest FROM tasks WHERE id=?",
                             (task_id,)).fetchone()
            if row is None:
                raise UnknownTask(f"unknown task {task_id!r}")
            if db.execute("SELECT 1 FROM approvals WHERE task_id=? AND owner_key=?",
                          (task_id, owner_key)).fetchone():
                raise StateError(f"this owner already decided on task {task_id}")
            state = next_state(row["state"], event)
            db.execute("INSERT INTO approvals VALUES (?,?,?,?,?)",
                       (task_id, owner_key, decision, signature, time.time()))
            body = {"spec_digest": row["spec_digest"]}
            self._append(db, task_id, event, body, audit.ed25519_signer(owner_key), signature)
            if owners is not None:
                signed = {r["owner_key"] for r in db.execute(
                    "SELECT owner_key FROM approvals WHERE task_id=? AND decision='approved'",
                    (task_id,)).fetchall()}
                all_in = set(owners) <= signed
            if all_in and event == "approved":
                state = next_state(state, "consented")
                self._append(db, task_id, "consented", {}, audit.SCHEDULER, "")
            _set_state(db.execute("UPDATE tasks SET state=?, updated_at=? WHERE id=? AND "
                                  "state=?", (state, time.time(), task_id, row["state"])),
                       task_id)
        return state

    def approvals(self, task_id: str) -> list[dict[str, Any]]:
        return [dict(r) for r in self._rows(
            "SELECT * FROM approvals WHERE task_id=? ORDER BY at", task_id)]

    def approval_requests(self, owner_key: str) -> list[dict[str, Any]]:
        """Submitted tasks using this owner's data that it has not decided on yet."""
        rows = self._rows(
            "SELECT t.id, t.spec, t.spec_digest FROM tasks t WHERE t.state='submitted' AND "
            "NOT EXISTS (SELECT 1 FROM approvals a WHERE a.task_id=t.id AND a.owner_key=?) "
            "ORDER BY t.created_at", owner_key)
        out = []
        for r in rows:
            spec = json.loads(r["spec"])
            if any(d["owner_key"] == owner_key for d in spec["datasets"]):
                out.append({"kind": "approve", "task_id": r["id"], "spec": spec,
                            "spec_digest": r["spec_digest"]})
        return out

    # -- assignments -------------------------------------------------------
    def assignments(self, task_id: str) -> list[dict[str, Any]]:
        return [dict(r) for r in self._rows(
            "SELECT * FROM assignments WHERE task_id=? ORDER BY dataset", task_id)]

    def pending_for(self, node: str) -> list[dict[str, Any]]:
        """Uploads a node should start, or take up again after a restart (it keeps track
        of the one it is running): assignments not yet uploaded of accepted or uploading
        tasks."""
        rows = self._rows(
            "SELECT a.task_id, a.dataset, t.executor, t.pool, t.compute, t.spec, t.spec_digest "
            "FROM assignments a JOIN tasks t ON t.id = a.task_id WHERE a.node=? AND "
            "a.state IN ('pending','started') AND t.state IN ('accepted','uploading') "
            "ORDER BY t.created_at", node)
        return [{**dict(r), "kind": "upload", "spec": json.loads(r["spec"]),
                 "pool": json.loads(r["pool"]) if r["pool"] else [],
                 "approvals": self.approvals(r["task_id"])} for r in rows]

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
            state = next_assignment(row["state"], state, dataset)
            db.execute("UPDATE assignments SET state=?, rows=?, error=?, updated_at=? "
                       "WHERE task_id=? AND dataset=?",
                       (state, rows, error, time.time(), task_id, dataset))


def _task(row: sqlite3.Row) -> Task:
    return Task(id=row["id"], state=row["state"], compute=row["compute"],
                params=json.loads(row["params"]), executor=row["executor"],
                initiator_key=row["initiator_key"], spec=json.loads(row["spec"]),
                spec_digest=row["spec_digest"], error=row["error"],
                created_at=row["created_at"], updated_at=row["updated_at"],
                deadline=row["deadline"],
                pool=tuple(json.loads(row["pool"])) if row["pool"] else ())


def _entry(row: sqlite3.Row) -> audit.Entry:
    return audit.Entry(seq=row["seq"], task_id=row["task_id"], kind=row["kind"],
                       body=json.loads(row["body"]), signer=row["signer"],
                       signature=row["signature"], prev_root=row["prev_root"],
                       hash=row["hash"], log_signature=row["log_signature"])


def _set_state(cursor: sqlite3.Cursor, task_id: str) -> None:
    """A state write is conditional on the state read in the same transaction: if anything
    else changed it meanwhile, nothing is written (StateError, the transaction rolls back)."""
    if cursor.rowcount != 1:  # pragma: no cover - BEGIN IMMEDIATE makes this unreachable
        raise StateError(f"task {task_id} changed state meanwhile; try again")


class _Tx:
    """BEGIN IMMEDIATE .. COMMIT under the store lock; the tree is first caught up with
    other connections' writes; ROLLBACK (and the tree reloaded) on any error."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.db, self.lock = store._db, store._lock
        self.began: Callable[[], None] = store._sync_tree
        self.rolled_back: Callable[[], None] = store._load_tree

    def __enter__(self) -> sqlite3.Connection:
        self.lock.acquire()
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self.lock.release()
            raise
        try:
            self.began()
        except BaseException:
            self.db.execute("ROLLBACK")
            self.lock.release()
            raise
        return self.db

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.db.execute("ROLLBACK" if exc_type else "COMMIT")
            if exc_type:
                self.rolled_back()
            else:
                self.store.version += 1
        finally:
            self.lock.release()


def _dataset(row: sqlite3.Row) -> dict[str, Any]:
    """A catalog entry; its analysis rules (as published) and their digest, or None."""
    out = dict(row)
    raw = out.get("rules") or ""
    out["rules"] = load_rules(json.loads(raw)).to_dict() if raw else None
    out["rules_digest"] = load_rules(out["rules"]).digest() if raw else None
    return out
