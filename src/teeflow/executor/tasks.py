"""The executor's task records: creating a task (only with every owner's signature), its
status, failing, cancelling and wiping it. Every record sits behind one lock.

No method here returns an input's rows; status names datasets and counts only.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from teeflow import compute
from teeflow.core import audit, wire
from teeflow.core.crypto import verify_signature
from teeflow.core.errors import AuthError, InputError, SchemaMismatch, StateError, UnknownTask
from teeflow.core.schemas import schema_fingerprint
from teeflow.executor.inputs import Digest, MemoryBudget
from teeflow.executor.messages import Approval
from teeflow.executor.notary import Notary
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

    def step(self, event: TaskEvent) -> None:
        self.status = TaskState(TASK.next_state(self.status, event))

    def step_input(self, dataset: str, event: InputEvent) -> None:
        self.uploads[dataset] = InputState(INPUT.next_state(self.uploads[dataset], event))

    def step_result(self, receiver: str, event: ResultEvent) -> None:
        self.results[receiver] = ResultState(RESULT.next_state(self.results[receiver], event))

    def held_bytes(self) -> int:
        return (sum(b.nbytes for batches in self.inputs.values() for b in batches)
                + sum(s.nbytes for s in self.spills.values()))


def _approval(a: Approval | Mapping[str, Any]) -> Approval:
    return a if isinstance(a, Approval) else Approval.parse(dict(a))


class Tasks:
    """Every task of one executor. Callers take `lock` around `get` and the steps."""

    def __init__(self, notary: Notary, memory: MemoryBudget) -> None:
        self.lock = threading.Lock()
        self.notary = notary
        self.memory = memory
        self._tasks: dict[str, Task] = {}

    def create(self, spec: wire.TaskSpec, approvals: Iterable[Approval | Mapping[str, Any]],
               schemas: Mapping[str, pa.Schema] | None = None) -> None:
        """Accept a task only with every owner's signature on its digest. The full checks
        (the SQL output policy among them) run here, before any data moves: the parameters,
        and, given the catalogued schemas (each must have the fingerprint the owners signed),
        the schemas too."""
        checked = [_approval(a) for a in approvals]
        comp = compute.get(spec.compute)
        if spec.code_digest != comp.code_digest:
            raise AuthError(f"computation {spec.compute}: the spec names code "
                            f"{spec.code_digest[:16]}, this executor runs "
                            f"{comp.code_digest[:16]}")
        params = comp.check_params(dict(spec.params))
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
        with self.lock:
            if spec.task_id in self._tasks:
                if self._tasks[spec.task_id].spec == spec:
                    return  # a retried create is harmless
                raise StateError(f"task {spec.task_id} exists with another spec")
            task = Task(spec=spec, params=params,
                        results={r.sign_key: ResultState(RESULT.initial) for r in spec.receivers})
            if comp.layout == "federated":
                task.fed = Fed(rounds=params["rounds"])
            else:
                task.uploads = {d.name: InputState(INPUT.initial) for d in spec.datasets}
            self._tasks[spec.task_id] = task
        log.info("task %s created: %s over %s", spec.task_id, spec.compute,
                 [d.name for d in spec.datasets])

    def adopt(self, task: Task) -> None:
        """Hold a task restored from disk (executor/store.py), unless its id is taken."""
        with self.lock:
            self._tasks.setdefault(task.spec.task_id, task)

    def get(self, task_id: str) -> Task:
        task = self._tasks.get(task_id)
        if task is None:
            raise UnknownTask(f"executor has no task {task_id!r}")
        return task

    def record(self, task: Task, kind: str, body: dict[str, Any]) -> None:
        """Sign an audit entry with the attested TLS key. Caller holds the lock."""
        task.audit.append(self.notary.entry(task.spec.task_id, kind, body))

    def status(self, task_id: str, simulated: bool) -> dict[str, Any]:
        with self.lock:
            task = self.get(task_id)
            return {
                "task_id": task_id,
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
            }

    def fail(self, task: Task, message: str) -> None:
        """Mark failed, if it still can be, and drop every input. Caller holds the lock."""
        if TASK.allows(task.status, TaskEvent.FAIL):
            task.step(TaskEvent.FAIL)
            task.error = message
        self.wipe(task, "failed")
        log.warning("task %s failed: %s", task.spec.task_id, message)

    def wipe(self, task: Task, reason: str) -> None:
        """Drop every input of a task, in memory and on disk. Caller holds the lock."""
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

    def cancel(self, task_id: str, signer_key: str, signature: bytes) -> None:
        """Stop a task and wipe it, for its initiator or one of its owners."""
        with self.lock:
            task = self.get(task_id)
        if signer_key != task.spec.initiator_key and signer_key not in task.spec.owner_keys():
            raise AuthError(f"only the initiator or an owner can cancel task {task_id}")
        verify_signature(signer_key, signature, wire.cancel_message(task_id))
        self.settle(task)
        with self.lock:
            if TASK.allows(task.status, TaskEvent.CANCEL):
                task.step(TaskEvent.CANCEL)
                task.sealed.clear()
                for receiver, state in task.results.items():
                    if RESULT.allows(state, ResultEvent.DROP):
                        task.step_result(receiver, ResultEvent.DROP)
            self.wipe(task, "cancelled")

    def held_bytes(self, task_id: str) -> int:
        """How many input bytes the executor still holds for a task (for tests and audit)."""
        with self.lock:
            return self.get(task_id).held_bytes()
