"""A party's own record of the task specs it signed, in a small SQLite file next to its key
(`<key_file>.specs.sqlite`): task id, spec digest, in which role, the executor it chose
(its address, the SHA-256 of its attested TLS key, its TEE and measurements) and when.

What the scheduler later says about a task is checked against this record, never the other
way round: the initiator takes a result only for the digest it signed (sdk/pin.py), and a
provider uploads only for a digest it signed itself (provider/node.py). Nothing here is a
secret; it holds no data and no key.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from teeflow.core import wire
from teeflow.core.errors import InputError
from teeflow.files.sqlite import open_db

ROLES = ("initiator", "owner")


def specs_path(key_file: Path) -> Path:
    return key_file.with_name(key_file.name + ".specs.sqlite")


@dataclass(frozen=True)
class SignedSpec:
    task_id: str
    spec_digest: str
    role: str
    executor: str = ""  # HOST:PORT, as the initiator chose it ("" if not recorded)
    executor_key: str = ""  # SHA-256 of the attested TLS key, hex ("" if not recorded)
    tee: str = ""
    measurements: dict[str, str] = field(default_factory=dict)
    at: float = 0.0


class SignedSpecs:
    """The file (or, with `path=None`, memory only: a key given in code, not from a file)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db = open_db(path)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS signed (task_id TEXT NOT NULL, spec_digest TEXT NOT "
            "NULL, role TEXT NOT NULL, executor TEXT NOT NULL, executor_key TEXT NOT NULL, "
            "tee TEXT NOT NULL, measurements TEXT NOT NULL, at REAL NOT NULL, "
            "PRIMARY KEY (spec_digest, role))")
        self._db.execute("CREATE INDEX IF NOT EXISTS signed_task ON signed(task_id, role)")

    def close(self) -> None:
        self._db.close()

    def record(self, spec: wire.TaskSpec, role: str, executor: str = "", tee: str = "",
               measurements: dict[str, str] | None = None) -> None:
        """Before the signature leaves this node. Signing the same digest again keeps the
        first record."""
        if role not in ROLES:
            raise InputError(f"signed spec record: unknown role {role!r}")
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO signed VALUES (?,?,?,?,?,?,?,?)",
                (spec.task_id, spec.digest(), role, executor, spec.executor_key or "", tee,
                 json.dumps(measurements or {}, sort_keys=True), time.time()))

    def signed(self, spec_digest: str, role: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM signed WHERE spec_digest=? AND role=?",
                                    (spec_digest, role)).fetchone() is not None

    def of_task(self, task_id: str, role: str = "initiator") -> list[SignedSpec]:
        """Every spec this node signed in `role` under the task id (normally one)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT task_id, spec_digest, role, executor, executor_key, tee, measurements, "
                "at FROM signed WHERE task_id=? AND role=? ORDER BY at", (task_id, role)
            ).fetchall()
        return [SignedSpec(r[0], r[1], r[2], r[3], r[4], r[5], _measurements(r[6]), r[7])
                for r in rows]


def _measurements(text: str) -> dict[str, str]:
    value: Any = json.loads(text)
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}
