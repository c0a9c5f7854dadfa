"""A data owner's privacy budgets: what each of its datasets may still spend on DP releases.

The budget lives only here, in a SQLite file of the owner's own node (never the scheduler's
state, so the scheduler can neither read nor reset it). The provider debits a dataset when it
signs a task that reads it with a DP computation, in one transaction before its signature
leaves the node; a spec digest is debited at most once per dataset, so signing or uploading
the same spec again costs nothing more. ``privacy_charges`` is the pure rule (spec and config
in, charges out or a refusal naming the dataset); ``Ledger`` is the file.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from teeflow import compute
from teeflow.core import wire
from teeflow.core.errors import ConfigError, InputError, OverBudget, TeeflowError
from teeflow.files.sqlite import open_db

# Spends are compared with this slack, so 10 tasks of 0.1 fit a budget of 1.0 despite
# rounding; it is far below any epsilon a task may ask for.
SLACK = 1e-9


@dataclass(frozen=True)
class PrivacyConfig:
    """A dataset's `[datasets.privacy]` table."""

    epsilon_budget: float
    max_epsilon_per_task: float
    required: bool = False
    identity: str | None = None


@dataclass(frozen=True)
class Charge:
    dataset: str
    epsilon: float
    delta: float
    budget: float


PRIVACY_FIELDS = ("epsilon_budget", "max_epsilon_per_task", "required", "identity")


def load_privacy(raw: Any, where: str) -> PrivacyConfig:
    """Check one `[datasets.privacy]` table; ConfigError names the bad field."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table")
    for key in raw:
        if key not in PRIVACY_FIELDS:
            raise ConfigError(f"{where}.{key}: unknown field")

    def positive(key: str) -> float:
        v = raw[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf"):
            raise ConfigError(f"{where}.{key}: a positive number")
        return float(v)

    if "epsilon_budget" not in raw:
        raise ConfigError(f"{where}.epsilon_budget: required, the total epsilon the dataset "
                          "may ever spend")
    total = positive("epsilon_budget")
    cap = positive("max_epsilon_per_task") if "max_epsilon_per_task" in raw else total
    if cap > total:
        raise ConfigError(f"{where}.max_epsilon_per_task: more than epsilon_budget")
    required = raw.get("required", False)
    if not isinstance(required, bool):
        raise ConfigError(f"{where}.required: true or false")
    identity = raw.get("identity")
    if identity is not None and (not isinstance(identity, str) or not identity):
        raise ConfigError(f"{where}.identity: a column name")
    return PrivacyConfig(total, cap, required, identity)


def privacy_charges(spec: wire.TaskSpec, owner_key: str,
                    privacy: dict[str, PrivacyConfig | None]) -> list[Charge]:
    """What signing ``spec`` costs this owner's datasets (``privacy``: dataset -> its table or
    None), or InputError naming the dataset: a non-DP computation on a dataset that requires
    DP, a DP task over the dataset's per-task cap, or contributions not bounded by the
    identity column the owner declared. Pure: spec and config in, charges out."""
    mine = [d.name for d in spec.datasets if d.owner_key == owner_key]
    if all(privacy.get(name) is None for name in mine):
        return []  # no budget of this owner is read: nothing to check or charge
    comp = compute.get(spec.compute)
    cost = None
    if comp.privacy_cost is not None:
        params = comp.precheck(dict(spec.params))
        cost = comp.privacy_cost(params)
    charges = []
    for name in mine:
        table = privacy.get(name)
        if table is None:
            continue
        if cost is None:
            if table.required:
                raise InputError(f"dataset {name!r} requires differential privacy; "
                                 f"{spec.compute} is not a DP computation")
            continue
        epsilon, delta = cost
        if epsilon > table.max_epsilon_per_task + SLACK:
            raise InputError(f"dataset {name!r}: epsilon {epsilon:g} is over its per-task cap "
                             f"of {table.max_epsilon_per_task:g}")
        if table.identity is not None and params.get("identity") != table.identity:
            raise InputError(f"dataset {name!r}: contributions must be bounded by its "
                             f"identity column {table.identity!r} (parameter 'identity')")
        charges.append(Charge(name, epsilon, delta, table.epsilon_budget))
    return charges


class Ledger:
    """The SQLite file of spends: one row per (dataset, spec digest)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = open_db(self.path)  # every change: one BEGIN IMMEDIATE transaction
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS spends (dataset TEXT NOT NULL, spec_digest TEXT NOT "
            "NULL, task_id TEXT NOT NULL, epsilon REAL NOT NULL CHECK (epsilon >= 0), delta "
            "REAL NOT NULL, at REAL NOT NULL, PRIMARY KEY (dataset, spec_digest))")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS sent (dataset TEXT NOT NULL, spec_digest TEXT NOT "
            "NULL, at REAL NOT NULL, PRIMARY KEY (dataset, spec_digest))")

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def debit(self, spec_digest: str, task_id: str, charges: list[Charge]) -> None:
        """Debit every charge at once, or none: OverBudget names the dataset whose budget it
        would overdraw. A (dataset, spec digest) debited before is not debited again."""
        with self._tx() as db:
            for c in charges:
                if db.execute("SELECT 1 FROM spends WHERE dataset=? AND spec_digest=?",
                              (c.dataset, spec_digest)).fetchone():
                    continue
                spent = db.execute("SELECT COALESCE(SUM(epsilon), 0) FROM spends WHERE "
                                   "dataset=?", (c.dataset,)).fetchone()[0]
                if spent + c.epsilon > c.budget + SLACK:
                    raise OverBudget(
                        f"dataset {c.dataset!r}: privacy budget would be overdrawn (epsilon "
                        f"{c.epsilon:g} asked, {max(0.0, c.budget - spent):g} of "
                        f"{c.budget:g} left)")
                db.execute("INSERT INTO spends VALUES (?,?,?,?,?,?)",
                           (c.dataset, spec_digest, task_id, c.epsilon, c.delta, time.time()))

    def send_once(self, dataset: str, spec_digest: str) -> None:
        """Record that the dataset is being sent for this spec, or OverBudget if it was
        before: each send can give one more noised release of the same spec, and the
        spec was debited once."""
        with self._tx() as db:
            if db.execute("SELECT 1 FROM sent WHERE dataset=? AND spec_digest=?",
                          (dataset, spec_digest)).fetchone():
                raise OverBudget(f"dataset {dataset!r}: already sent once for this DP task; "
                                 "another send could release it again, unpaid (submit a new "
                                 "task)")
            db.execute("INSERT INTO sent VALUES (?,?,?)", (dataset, spec_digest, time.time()))

    def spends(self, dataset: str) -> list[dict[str, Any]]:
        rows = self._db.execute(
            "SELECT spec_digest, task_id, epsilon, delta, at FROM spends WHERE dataset=? "
            "ORDER BY at, spec_digest", (dataset,)).fetchall()
        return [{"spec_digest": r[0], "task_id": r[1], "epsilon": r[2], "delta": r[3],
                 "at": r[4]} for r in rows]

    def report(self, privacy: dict[str, PrivacyConfig | None]) -> list[dict[str, Any]]:
        return summarize(privacy, self.spends)


def summarize(privacy: dict[str, PrivacyConfig | None],
              spends_of: Callable[[str], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per dataset: total, spent, remaining and the tasks (spec digests) that spent it."""
    out = []
    for name, table in privacy.items():
        spends = spends_of(name)
        spent = sum(s["epsilon"] for s in spends)
        total = table.epsilon_budget if table else None
        out.append({
            "dataset": name,
            "epsilon_budget": total,
            "max_epsilon_per_task": table.max_epsilon_per_task if table else None,
            "required": table.required if table else False,
            "identity": table.identity if table else None,
            "spent": spent,
            "remaining": max(0.0, total - spent) if total is not None else None,
            "spends": spends,
        })
    return out


class PrivacyGuard:
    """The provider's calls: ``check`` (may this spec be signed at all?), ``charge`` (debit
    it, before this node's signature leaves) and ``before_upload``. Each raises a
    TeeflowError naming the dataset."""

    def __init__(self, ledger: Ledger, owner_key: str,
                 privacy: dict[str, PrivacyConfig | None]) -> None:
        self.ledger, self.owner_key, self.privacy = ledger, owner_key, privacy

    def check(self, spec: wire.TaskSpec) -> list[Charge]:
        try:
            return privacy_charges(spec, self.owner_key, self.privacy)
        except TeeflowError:
            raise
        except Exception as exc:  # a foreign failure: refuse, quoting only its kind
            raise InputError(f"privacy check failed ({type(exc).__name__})") from exc

    def charge(self, spec: wire.TaskSpec) -> list[Charge]:
        charges = self.check(spec)
        if charges:
            self.ledger.debit(spec.digest(), spec.task_id, charges)
        return charges

    def before_upload(self, spec: wire.TaskSpec, dataset: str) -> None:
        """Before a byte of ``dataset`` leaves for ``spec``: the spec is debited (it may
        have been signed by hand, around this node), and a DP-charged dataset goes out once
        per spec: a scheduler that assigns the same signed task to a second executor gets
        no second noised release of it."""
        if any(c.dataset == dataset for c in self.charge(spec)):
            self.ledger.send_once(dataset, spec.digest())
