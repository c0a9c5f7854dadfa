"""The executor's task records: creating a task (only with every owner's signature), its
status, failing, cancelling and wiping it, and failing it at its deadline. Every record
sits behind one lock.

A task is held under its spec digest, never under the task id alone: nobody can create,
cancel or block someone else's task by naming its id. A task id is accepted in place of
the digest only where exactly one held task has it (and names the caller's key).

No method here returns an input's rows; status names datasets and counts only.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from teeflow import compute
from teeflow.core import audit, wire
from teeflow.core.crypto import verify_signature
from teeflow.core.errors import (
    AuthError,
    ConsentExpired,
    ConsentSpent,
    InputError,
    OverBudget,
    ParameterError,
    SchemaMismatch,
    StateError,
    UnknownTask,
)
from teeflow.core.rules import DatasetRules, given_rules
from teeflow.core.schemas import schema_fingerprint
from teeflow.executor.inputs import Digest, MemoryBudget
from teeflow.executor.messages import Approval
from teeflow.executor.notary import Notary
from teeflow.executor.runs import RunLedger
from teeflow.executor.spill import SealedSpill
from teeflow.executor.states import (
    INPUT,
    RESULT,
    ROUND,
    TASK,
    InputEvent,
    InputState,
    ResultEvent,
    ResultState,
    RoundState,
    TaskEvent,
    TaskState,
)

log = logging.getLogger("teeflow.executor")

DEFAULT_DEADLINE = 24 * 3600.0  # seconds after create-task, for a spec that names none
GiB = 1024**3


@dataclass(frozen=True)
class Budgets:
    """What one task, one initiator and all clients together may hold at once. On by
    default (README, "Budgets"); an executor may pass larger ones."""

    task_bytes: int = 16 * GiB  # input bytes held (memory and spill) per task
    initiator_bytes: int = 32 * GiB  # the same over an initiator's live tasks
    initiator_tasks: int = 16  # live (not final) tasks per initiator key
    uploads_per_task: int = 8  # concurrent uploads into one task
    uploads_per_key: int = 2  # concurrent uploads by one owner key
    uploads: int = 32  # concurrent uploads overall, below the server's thread pool


@dataclass
class Fed:
    """A federated task's rounds: the global model and this round's updates."""

    rounds: int
    round: int = 0
    state: RoundState = RoundState(ROUND.initial)
    weights: np.ndarray | None = None
    features: list[str] | None = None
    updates: dict[str, tuple[np.ndarray, int, float]] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)

    def step(self, event: str) -> None:
        self.state = RoundState(ROUND.next_state(self.state, event))


@dataclass
class Task:
    spec: wire.TaskSpec
    params: dict[str, Any]
    status: TaskState = TaskState(TASK.initial)
    uploads: dict[str, InputState] = field(default_factory=dict)  # dataset -> its state
    inputs: dict[str, list[pa.RecordBatch]] = field(default_factory=dict)  # held in memory
    spills: dict[str, SealedSpill] = field(default_factory=dict)  # held, sealed, on disk
    schemas: dict[str, pa.Schema] = field(default_factory=dict)
    received: dict[str, dict[str, int]] = field(default_factory=dict)  # rows and bytes
    digests: dict[str, Digest] = field(default_factory=dict)
    results: dict[str, ResultState] = field(default_factory=dict)  # receiver sign key -> state
    sealed: dict[str, bytes] = field(default_factory=dict)  # receiver sign key -> envelope
    error: str | None = None
    audit: list[dict[str, Any]] = field(default_factory=list)
    fed: Fed | None = None
    deadline: float = float("inf")  # unix seconds: past it the task fails and is wiped
    charged: int = 0  # input bytes taken in by uploads (held or in flight) since the last wipe
    digest: str = ""  # of the spec: the executor's id for the task
    budget_key: str = ""  # whose budgets it counts against (tasks.create says how it is chosen)
    run: int = 1  # which run of its spec this is (executor/runs.py)
    granted: bool = False  # the spec's scheduler let its result out (executor/verdicts.py)
    # a pool task's members (executor/pool/): their attested TLS keys (hex) and addresses,
    # in pool order; the first leads. None: a task on this executor alone
    pool_keys: list[str] | None = None
    pool_addresses: list[str] | None = None

    def step(self, event: TaskEvent) -> None:
        self.status = TaskState(TASK.next_state(self.status, event))

    def step_input(self, dataset: str, event: InputEvent) -> None:
        self.uploads[dataset] = InputState(INPUT.next_state(self.uploads[dataset], event))

    def step_result(self, receiver: str, event: ResultEvent) -> None:
        self.results[receiver] = ResultState(RESULT.next_state(self.results[receiver], event))

    def held_bytes(self) -> int:
        return (sum(b.nbytes for batches in self.inputs.values() for b in batches)
                + sum(s.nbytes for s in self.spills.values()))

    def parties(self) -> set[str]:
        """Every key the spec names: initiator, owners, receivers."""
        return ({self.spec.initiator_key} | set(self.spec.owner_keys())
                | {r.sign_key for r in self.spec.receivers})

    @property
    def live(self) -> bool:
        return self.status in (TaskState.WAITING, TaskState.RUNNING)


class UploadSlots:
    """Concurrent uploads, per task, per owner key and overall, each below its cap; the
    excess is refused at once (OverBudget), before it takes a thread for long."""

    def __init__(self, budgets: Budgets) -> None:
        self._budgets = budgets
        self._lock = threading.Lock()
        self._by_task: dict[str, int] = {}
        self._by_key: dict[str, int] = {}
        self._total = 0

    @contextmanager
    def slot(self, task: str, key: str) -> Iterator[None]:
        b = self._budgets
        with self._lock:
            if self._by_key.get(key, 0) >= b.uploads_per_key:
                raise OverBudget(f"{b.uploads_per_key} uploads by this key already running")
            if self._by_task.get(task, 0) >= b.uploads_per_task:
                raise OverBudget(f"{b.uploads_per_task} uploads into this task already running")
            if self._total >= b.uploads:
                raise OverBudget(f"{b.uploads} uploads already running; try again later")
            self._by_key[key] = self._by_key.get(key, 0) + 1
            self._by_task[task] = self._by_task.get(task, 0) + 1
            self._total += 1
        try:
            yield
        finally:
            with self._lock:
                self._total -= 1
                for counts, k in ((self._by_key, key), (self._by_task, task)):
                    counts[k] -= 1
                    if not counts[k]:
                        del counts[k]


def _ruled_params(comp: compute.Computation, spec: wire.TaskSpec,
                  granted: dict[str, DatasetRules], schemas: Mapping[str, pa.Schema] | None
                  ) -> dict[str, Any]:
    """The checked params of a task over datasets with analysis rules: the computation must
    be one every such dataset's rules allow, and the rules travel with the params (`_rules`)
    for the computation to enforce; the SQL check needs the schemas, so they must be given."""
    for name, r in granted.items():
        if spec.compute not in r.computations:
            raise ParameterError(f"dataset {name!r}: its analysis rules allow only "
                                 f"{', '.join(r.computations)}, not {spec.compute}")
    if not schemas:
        raise InputError(f"task {spec.task_id}: a task over datasets with analysis rules "
                         "needs their catalogued schemas at create-task")
    params = (comp.precheck_params or comp.check_params)(dict(spec.params))
    if spec.compute == "sql":
        params["_rules"] = {d.name: granted.get(d.name) for d in spec.datasets}
    return params


def _approval(a: Approval | Mapping[str, Any]) -> Approval:
    return a if isinstance(a, Approval) else Approval.parse(dict(a))


class Tasks:
    """Every task of one executor. Callers take `lock` around `get` and the steps."""

    def __init__(self, notary: Notary, memory: MemoryBudget, budgets: Budgets | None = None,
                 now: Callable[[], float] = time.time, runs: RunLedger | None = None) -> None:
        self.lock = threading.Lock()
        self.runs = runs or RunLedger()  # consent spent once: runs admitted per digest
        self.notary = notary
        self.memory = memory
        self.budgets = budgets or Budgets()
        self.now = now  # wall clock, unix seconds: deadlines are in the signed spec
        self._tasks: dict[str, Task] = {}  # spec digest -> task

    def create(self, spec: wire.TaskSpec, approvals: Iterable[Approval | Mapping[str, Any]],
               schemas: Mapping[str, pa.Schema] | None = None,
               initiator_signature: str | None = None,
               rules: Mapping[str, Any] | None = None,
               pool: list[PoolSeat] | None = None) -> None:
        """Accept a task only with every owner's signature on its digest. The full checks
        (the SQL output policy among them) run here, before any data moves: the parameters,
        and, given the catalogued schemas (each must have the fingerprint the owners signed),
        the schemas too. The task counts against its initiator's budgets only if the
        initiator's own signature on the spec is given and verifies; otherwise against its
        first owner's (who did sign), so nobody can spend another initiator's budget by
        naming its key in a spec of their own.

        `rules`: the analysis rules of the datasets whose spec entry carries a rules digest,
        each checked against that digest; a query they do not grant is refused here.

        `pool`: a pool spec's members as its scheduler chose them (this executor among them);
        every upload must then be signed for exactly these keys (intake.py)."""
        checked = [_approval(a) for a in approvals]
        comp = compute.get(spec.compute)
        if spec.code_digest != comp.code_digest:
            raise AuthError(f"computation {spec.compute}: the spec names code "
                            f"{spec.code_digest[:16]}, this executor runs "
                            f"{comp.code_digest[:16]}")
        granted = given_rules(spec, rules or {})
        if granted:
            params = _ruled_params(comp, spec, granted, schemas)
        else:
            params = comp.check_params(dict(spec.params))
        comp.parties_ok(len(spec.owner_keys()), params)  # e.g. federated's min_parties
        if schemas:
            if sorted(schemas) != sorted(d.name for d in spec.datasets):
                raise InputError(f"task {spec.task_id}: schemas must be given for every "
                                 "dataset of the spec, or for none")
            for ref in spec.datasets:
                if schema_fingerprint(schemas[ref.name]) != ref.fingerprint:
                    raise SchemaMismatch(f"dataset {ref.name!r}: the schema given is not the "
                                         "one its owner signed")
            comp.check_schemas({d.name: schemas[d.name] for d in spec.datasets}, params)
        body = {"spec_digest": spec.digest()}
        signed = set()
        for approval in checked:
            try:
                audit.verify_entry_signature(spec.task_id, "approved", body, approval.signer,
                                             approval.signature)
            except AuthError:
                continue
            signed.add(approval.signer.removeprefix("ed25519:"))
        missing = [k for k in spec.owner_keys() if k not in signed]
        if missing:
            owners = sorted({d.owner for d in spec.datasets if d.owner_key in missing})
            raise AuthError(f"task {spec.task_id}: no valid approval from owner(s) {owners}")
        digest = spec.digest()
        budget_key = _budget_key(spec, initiator_signature)
        now = self.now()
        if spec.deadline is not None and spec.deadline <= now:
            raise InputError(f"task {spec.task_id}: its deadline has passed")
        if spec.expires is not None and spec.expires <= now:
            raise ConsentExpired(f"task {spec.task_id}: its consent expired at unix time "
                                 f"{spec.expires}")
        mine = self.notary.tls_spki_hash.hex()
        seats = check_pool(spec, pool, mine, params)
        if spec.executor_key is not None and spec.executor_key != mine:
            raise AuthError(f"task {spec.task_id}: the spec is for executor key "
                            f"{spec.executor_key[:16]}, this executor's is {mine[:16]}")
        with self.lock:
            held = self._tasks.get(digest)
            if held is not None and held.status not in (TaskState.RELEASED, TaskState.FAILED,
                                                        TaskState.CANCELLED):
                return  # a retried create is harmless
            if held is not None and self.runs.count(digest) >= spec.run_limit:
                raise ConsentSpent(f"task {spec.task_id}: spec {digest[:16]} already ran "
                                   f"{spec.run_limit} time(s) here, all it allows")
            live = sum(1 for t in self._tasks.values()
                       if t.live and t.budget_key == budget_key)
            if live >= self.budgets.initiator_tasks:
                raise OverBudget(f"task {spec.task_id}: its initiator has "
                                 f"{self.budgets.initiator_tasks} live tasks here already")
            run = self.runs.admit(digest, spec.task_id, spec.run_limit)
            task = Task(spec=spec, params=params, digest=digest, budget_key=budget_key, run=run,
                        deadline=float(spec.deadline) if spec.deadline is not None
                        else now + DEFAULT_DEADLINE,
                        results={r.sign_key: ResultState(RESULT.initial) for r in spec.receivers})
            if seats is not None:
                task.pool_keys = [s.key for s in seats]
                task.pool_addresses = [s.address for s in seats]
            if comp.layout == "federated":
                task.fed = Fed(rounds=params["rounds"])
            else:
                task.uploads = {d.name: InputState(INPUT.initial) for d in spec.datasets}
            self._tasks[digest] = task  # a finished earlier run's record gives way
            self.record(task, "admitted", {"spec_digest": digest, "run": run,
                                           "runs": spec.run_limit})
        log.info("task %s created: %s over %s", spec.task_id, spec.compute,
                 [d.name for d in spec.datasets])

    def adopt(self, task: Task) -> None:
        """Hold a task restored from disk (executor/store.py), unless it is held already."""
        with self.lock:
            self._tasks.setdefault(task.spec.digest(), task)

    def get(self, ref: str, key: str | None = None) -> Task:
        """The task whose spec digest is `ref`; or the one held task with id `ref` (if
        several have it: the one naming `key`). Caller holds the lock."""
        task = self._tasks.get(ref)
        if task is not None:
            return task
        named = [t for t in self._tasks.values() if t.spec.task_id == ref]
        if len(named) > 1 and key is not None:
            named = [t for t in named if key in t.parties()]
        if len(named) > 1:
            raise UnknownTask(f"several tasks here are named {ref[:64]!r}; name the spec digest")
        if not named:
            raise UnknownTask(f"executor has no task {ref[:64]!r}")
        return named[0]

    def record(self, task: Task, kind: str, body: dict[str, Any]) -> None:
        """Sign an audit entry with the attested TLS key. Caller holds the lock."""
        task.audit.append(self.notary.entry(task.spec.task_id, kind, body))

    def status(self, ref: str, simulated: bool) -> dict[str, Any]:
        with self.lock:
            task = self.get(ref)
            return {
                "task_id": task.spec.task_id,
                "status": str(task.status),
                "error": task.error,
                "expected": [d.name for d in task.spec.datasets],
                "received": {k: dict(v) for k, v in task.received.items()},
                "receiving": sorted(k for k, s in task.uploads.items()
                                    if s == InputState.RECEIVING),
                "inputs_held": sorted(set(task.inputs) | set(task.spills)),
                "spilled": {k: v.nbytes for k, v in task.spills.items()},
                "digesting": sorted(k for k, d in task.digests.items() if d.running),
                "simulated": simulated,
                "taken_by": sorted(k for k, s in task.results.items() if s == ResultState.TAKEN)
                if task.status in (TaskState.DONE, TaskState.RELEASED) else [],
                "audit": list(task.audit),
                "run": task.run,
                "granted": task.granted,
            }

    def fail(self, task: Task, message: str) -> None:
        """Mark failed, if it still can be, and drop every input. Caller holds the lock.
        A done task is failed only by its scheduler's word (executor/verdicts.py)."""
        if task.live and TASK.allows(task.status, TaskEvent.FAIL):
            task.step(TaskEvent.FAIL)
            task.error = message
        self.wipe(task, "failed")
        log.warning("task %s failed: %s", task.spec.task_id, message)

    def wipe(self, task: Task, reason: str) -> None:
        """Drop every input of a task, in memory and on disk. Caller holds the lock."""
        task.charged = 0
        held = sorted(set(task.inputs) | set(task.spills))
        self.memory.free(sum(b.nbytes for batches in task.inputs.values() for b in batches))
        for spill in task.spills.values():
            spill.close()
        task.spills.clear()
        task.inputs.clear()
        for dataset, state in task.uploads.items():
            if INPUT.allows(state, InputEvent.WIPE):
                task.step_input(dataset, InputEvent.WIPE)
        if held or task.received:
            self.record(task, "wiped", {"inputs": held, "reason": reason})

    @staticmethod
    def settle(task: Task) -> None:
        """Let running digests record their `received` entries before a `wiped` one."""
        for digest in list(task.digests.values()):
            digest.wait()

    def cancel(self, ref: str, signer_key: str, signature: bytes) -> None:
        """Stop a task and wipe it, for its initiator or one of its owners."""
        with self.lock:
            task = self.get(ref, signer_key)
        task_id = task.spec.task_id
        if signer_key != task.spec.initiator_key and signer_key not in task.spec.owner_keys():
            raise AuthError(f"only the initiator or an owner can cancel task {task_id}")
        verify_signature(signer_key, signature, wire.cancel_message(task_id))
        self.settle(task)
        with self.lock:
            if task.granted and task.status == TaskState.DONE:  # the log says it is out
                raise StateError(f"task {task_id}: its scheduler released the result; too "
                                 "late to cancel")
            if TASK.allows(task.status, TaskEvent.CANCEL):
                task.step(TaskEvent.CANCEL)
                task.sealed.clear()
                for receiver, state in task.results.items():
                    if RESULT.allows(state, ResultEvent.DROP):
                        task.step_result(receiver, ResultEvent.DROP)
            self.wipe(task, "cancelled")

    def held_bytes(self, ref: str) -> int:
        """How many input bytes the executor still holds for a task (for tests and audit)."""
        with self.lock:
            return self.get(ref).held_bytes()

    def charge(self, task: Task, nbytes: int) -> None:
        """Count `nbytes` more of input against the task's and its initiator's budgets, or
        OverBudget (the upload fails, and with it the task)."""
        with self.lock:
            if task.charged + nbytes > self.budgets.task_bytes:
                raise OverBudget(f"task {task.spec.task_id}: inputs beyond its budget of "
                                 f"{self.budgets.task_bytes} bytes")
            initiator = sum(t.charged for t in self._tasks.values()
                            if t.budget_key == task.budget_key)
            if initiator + nbytes > self.budgets.initiator_bytes:
                raise OverBudget(f"task {task.spec.task_id}: its initiator's tasks would hold "
                                 f"more than {self.budgets.initiator_bytes} bytes")
            task.charged += nbytes

    def reap(self) -> list[str]:
        """Fail and wipe every task waiting past its deadline; the digests of those reaped.
        A running computation is left to end (its inputs are wiped when it does)."""
        now = self.now()
        with self.lock:
            due = [t for t in self._tasks.values()
                   if t.deadline <= now and t.status == TaskState.WAITING]
        reaped = []
        for task in due:
            self.settle(task)  # its `received` entries first, then `wiped`
            with self.lock:
                if task.status == TaskState.WAITING:
                    self.fail(task, f"deadline passed (unix time {int(task.deadline)}) "
                                    "before every input arrived")
                    reaped.append(task.digest)
        return reaped


@dataclass(frozen=True)
class PoolSeat:
    """One member of a pool task, as the scheduler names it to each member."""

    address: str
    key: str  # SHA-256 of its attested TLS key (SPKI DER), hex


def check_pool(spec: wire.TaskSpec, pool: list[PoolSeat] | None, mine: str,
               params: dict[str, Any]) -> list[PoolSeat] | None:
    """The seats of a pool spec: exactly `spec.pool` distinct keys, this executor's among
    them, and a computation the pool can run with these params; none for a spec without."""
    if spec.pool is None:
        if pool:
            raise InputError(f"task {spec.task_id}: members given for a spec without a pool")
        return None
    if not pool or len(pool) != spec.pool:
        raise InputError(f"task {spec.task_id}: the spec asks for a pool of {spec.pool}; "
                         f"{len(pool or [])} member(s) given")
    if len({s.key for s in pool}) != len(pool) or len({s.address for s in pool}) != len(pool):
        raise InputError(f"task {spec.task_id}: a pool member is named twice")
    if mine not in {s.key for s in pool}:
        raise AuthError(f"task {spec.task_id}: this executor (key {mine[:16]}) is not one of "
                        "the pool's members")
    from teeflow.executor.pool.compute import check_pool_params  # Dask only for pools

    check_pool_params(spec.compute, params)
    return list(pool)


def _budget_key(spec: wire.TaskSpec, initiator_signature: str | None) -> str:
    """The initiator's key if its signature on the spec (what it gave the scheduler)
    verifies, else the first owner's key."""
    if initiator_signature:
        try:
            audit.verify_entry_signature(
                spec.task_id, "submitted", {"spec": spec.to_dict(), "spec_digest": spec.digest()},
                audit.ed25519_signer(spec.initiator_key), initiator_signature)
            return spec.initiator_key
        except AuthError:
            pass
    return spec.owner_keys()[0]
