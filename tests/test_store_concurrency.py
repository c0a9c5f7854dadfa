"""Many owners approving at once, against the real SQLite file: every task ends approved
exactly once, each approval is in the log once, and the log still verifies.

Two shapes: threads sharing the scheduler's one Store (what the scheduler does), and
processes each with a Store of their own on the same file (two connections, each with
its own view of the log: a stale read there must not become a lost or doubled write).
"""

from __future__ import annotations

import json
import multiprocessing
import threading
from collections import Counter
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from teeflow.core import audit
from teeflow.core.crypto import KeySigner
from teeflow.core.errors import OverBudget, StateError
from teeflow.scheduler import service
from teeflow.scheduler.service import Scheduler
from teeflow.scheduler.store import Store
from tests.factories import make_spec, sign_entry, submit_signature

TASKS = 20


def _key(seed: int) -> KeySigner:
    """Fixed keys: a spawned process re-imports this module and must hold the same ones."""
    return KeySigner(ed25519.Ed25519PrivateKey.from_private_bytes(bytes([seed]) * 32))


OWNERS = [_key(i + 1) for i in range(4)]
INITIATOR = _key(9)
ADDRESS = "127.0.0.1:9"


def _spec(i: int):
    return make_spec([(f"d{j}", f"owner{j}", k, f"f{j}") for j, k in enumerate(OWNERS)],
                     INITIATOR, task_id=f"task{i:04d}")


def _create_all(path: Path) -> list:
    store = Store(path)
    specs = [_spec(i) for i in range(TASKS)]
    for spec in specs:
        store.create_task(spec.to_dict(), spec.digest(), ADDRESS,
                          submit_signature(spec, INITIATOR))
    store.close()
    return specs


def _approve(store: Store, spec, owner: KeySigner) -> str:
    signature = sign_entry(owner, spec.task_id, "approved", {"spec_digest": spec.digest()})
    return store.approve(spec.task_id, owner.public_key(), "approved", signature, "approved",
                         owners=spec.owner_keys())


def _check(path: Path, outcomes: list[str]) -> None:
    store = Store(path)
    try:
        assert {t.state for t in store.tasks()} == {"approved"}
        entries = store.audit_log()
        audit.verify_chain(entries)
        kinds = Counter((e.task_id, e.kind) for e in entries)
        for i in range(TASKS):
            task_id = f"task{i:04d}"
            assert kinds[(task_id, "approved")] == len(OWNERS)
            assert kinds[(task_id, "consented")] == 1
            assert len(store.approvals(task_id)) == len(OWNERS)
        assert [e.seq for e in entries] == list(range(1, len(entries) + 1))
    finally:
        store.close()
    # exactly one approver per task saw its approval complete consent
    assert Counter(outcomes) == {"approved": TASKS, "submitted": TASKS * (len(OWNERS) - 1)}


def test_threads_sharing_the_store(tmp_path):
    path = tmp_path / "s.sqlite"
    specs = _create_all(path)
    store = Store(path)
    start = threading.Barrier(TASKS * len(OWNERS))
    outcomes: list[str] = []

    def one(spec, owner):
        start.wait()
        outcomes.append(_approve(store, spec, owner))

    threads = [threading.Thread(target=one, args=(s, o)) for s in specs for o in OWNERS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store.close()
    _check(path, outcomes)


def _owner_process(path: str, owner_index: int, start, results) -> None:
    """One owner's process: its own Store on the file, a thread per task, all at once."""
    store = Store(path)
    owner = OWNERS[owner_index]
    barrier = threading.Barrier(TASKS)
    out: list[str] = []

    def one(i: int) -> None:
        barrier.wait()
        try:
            out.append(_approve(store, _spec(i), owner))
        except Exception as exc:  # reported, so the parent's check names it
            out.append(f"error: {type(exc).__name__}: {exc}")

    start.wait()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(TASKS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store.close()
    results.put(out)


def test_processes_each_with_its_own_connection(tmp_path):
    path = tmp_path / "s.sqlite"
    _create_all(path)
    ctx = multiprocessing.get_context("spawn")  # no inherited SQLite handles
    start, results = ctx.Barrier(len(OWNERS)), ctx.Queue()
    procs = [ctx.Process(target=_owner_process, args=(str(path), i, start, results))
             for i in range(len(OWNERS))]
    for p in procs:
        p.start()
    try:
        outcomes = [o for _ in procs for o in results.get(timeout=120)]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert not [o for o in outcomes if o.startswith("error")]
    _check(path, outcomes)


def test_a_second_approval_by_the_same_owner_changes_nothing(tmp_path):
    path = tmp_path / "s.sqlite"
    specs = _create_all(path)
    store = Store(path)
    start = threading.Barrier(8)
    errors: list[Exception] = []

    def one():
        start.wait()
        try:
            _approve(store, specs[0], OWNERS[0])
        except StateError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 7 and len(store.approvals(specs[0].task_id)) == 1
    assert store.task(specs[0].task_id).state == "submitted"
    store.close()


class _Link:
    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    def action(self, kind: str, body: bytes = b"") -> bytes:
        self.calls.append(kind)
        return b"{}"

    def action_json(self, kind: str, body: bytes = b"") -> dict:
        return {}

    def close(self) -> None:
        pass


@pytest.mark.parametrize("round_", range(3))
def test_scheduler_dispatches_each_task_once(tmp_path, round_):
    """Through Scheduler.decide (signature checks, dispatch): each task is handed to the
    executor once and accepted once, however the owners' decisions interleave."""
    path = tmp_path / "s.sqlite"
    specs = _create_all(path)
    store = Store(path)
    calls: list[str] = []
    sched = Scheduler(store, connect=lambda _address: _Link(calls))
    sched._submit_signature = lambda task: ""  # type: ignore[method-assign]
    store.dataset = lambda name: {"schema_b64": "", "rules": None}  # type: ignore
    start = threading.Barrier(TASKS * len(OWNERS))

    def one(spec, owner):
        start.wait()
        signature = sign_entry(owner, spec.task_id, "approved", {"spec_digest": spec.digest()})
        sched.decide(owner.public_key(), spec.task_id,
                     {"decision": "approved", "signature": signature})

    threads = [threading.Thread(target=one, args=(s, o)) for s in specs for o in OWNERS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls.count("create-task") == TASKS
    assert {t.state for t in store.tasks()} == {"accepted"}
    kinds = Counter((e.task_id, e.kind) for e in store.audit_log())
    assert all(kinds[(s.task_id, "accept")] == 1 for s in specs)
    store.close()


class _FullLink(_Link):
    """An executor with room for `room` tasks: create-task beyond it is OverBudget."""

    def __init__(self, calls: list[str], taken: set[str], room: int) -> None:
        super().__init__(calls)
        self.taken, self.room = taken, room

    def action(self, kind: str, body: bytes = b"") -> bytes:
        self.calls.append(kind)
        if kind == "create-task":
            task_id = json.loads(body)["spec"]["task_id"]
            if task_id not in self.taken and len(self.taken) >= self.room:
                raise OverBudget("its initiator has 4 live tasks here already")
            self.taken.add(task_id)
        return b"{}"


def test_tasks_beyond_the_executors_room_wait_approved_and_go_on(tmp_path, monkeypatch):
    """An executor with no room yet (its live-task cap per initiator) is no reason to fail
    a task: it stays approved, queued, and is handed over once there is room."""
    monkeypatch.setattr(service, "DISPATCH_RETRY", 0.0)
    path = tmp_path / "s.sqlite"
    specs = _create_all(path)
    store = Store(path)
    calls: list[str] = []
    taken: set[str] = set()
    sched = Scheduler(store, connect=lambda _address: _FullLink(calls, taken, room=4))
    sched._submit_signature = lambda task: ""  # type: ignore[method-assign]
    store.dataset = lambda name: {"schema_b64": "", "rules": None}  # type: ignore
    for spec in specs:
        for owner in OWNERS:
            signature = sign_entry(owner, spec.task_id, "approved",
                                   {"spec_digest": spec.digest()})
            sched.decide(owner.public_key(), spec.task_id,
                         {"decision": "approved", "signature": signature})
    states = Counter(t.state for t in store.tasks())
    assert states == {"accepted": 4, "approved": TASKS - 4}
    for _ in range(TASKS):  # room frees up, a task at a time (one leaves per pass here)
        taken.pop()
        sched.tick()
    assert {t.state for t in store.tasks()} == {"accepted"}
    kinds = Counter((e.task_id, e.kind) for e in store.audit_log())
    assert all(kinds[(s.task_id, "accept")] == 1 for s in specs)
    assert not any(k == "fail" for _, k in kinds)
    store.close()
