"""The TEE executor, with no networking: one facade over its parts.

    tasks       the task records, under their spec digests: create (only with every
                owner's signature), status, fail, cancel, wipe; budgets and deadlines
    challenges  single-use challenges that callers sign, per (task, key) with a cap each
    store       finished results (ciphertext only) on disk, re-signed after a restart
    spill       sealed spill files, in this run's own directory; a start wipes dead runs'
    intake      uploads: authenticate, stream, end marker, hold or spill, digest
    runner      run a computation over the held inputs, then wipe them
    rounds      federated rounds
    release     seal the result to each receiver, hand it over once
    states      every lifecycle above as a table

Runs inside the enclave. It must never hand an input back to anyone: no method here
returns input rows. The result goes only to the task's receivers, sealed, and inputs
are dropped as soon as the computation ends, or when the task's deadline passes.

Admission: every call but `evidence` names a task this executor holds and a key that task
names; what one key may hold at once (challenges, uploads, bytes, live tasks) is capped
(`tasks.Budgets`), so one client cannot lock out another.

At start (`__init__`): what a dead run left in the spill root (its spill files and DuckDB
temp folders, unreadable since its keys died with it) is removed, and the counts are in
`startup` (the `info` action) and a log line: those runs' tasks are unknown now, so there
is no task to record an audit entry under. Finished results in the state dir are loaded
and re-signed with this run's key, each with a `restored` entry (see store.py).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
from cryptography.hazmat.primitives.asymmetric import ec

from teeflow.attestation.evidence import Evidence, bind_report_data
from teeflow.attestation.policy import Verifier
from teeflow.attestation.registry import TeeBackend
from teeflow.core import wire
from teeflow.core.crypto import verify_signature
from teeflow.core.errors import AuthError, ConsentExpired, InputError, StateError
from teeflow.executor import verdicts
from teeflow.executor.challenges import Challenges
from teeflow.executor.inputs import MemoryBudget
from teeflow.executor.intake import MAX_BATCH_BYTES, UPLOAD_IDLE_TIMEOUT, Intake
from teeflow.executor.messages import Approval, FlRequest, UploadRequest
from teeflow.executor.notary import Notary
from teeflow.executor.pool.links import Links
from teeflow.executor.pool.seat import Seats
from teeflow.executor.release import Release
from teeflow.executor.rounds import Rounds
from teeflow.executor.runner import Runner
from teeflow.executor.runs import RunLedger
from teeflow.executor.spill import RunDir
from teeflow.executor.states import RESULT, TASK, ResultEvent, TaskEvent, TaskState
from teeflow.executor.store import DEFAULT_TTL, ResultStore
from teeflow.executor.tasks import Budgets, PoolSeat, Task, Tasks, UploadSlots

log = logging.getLogger("teeflow.executor")
SQL_TEMP_ROOT_ENV = "TEEFLOW_SQL_TEMP_ROOT"  # compute/sql/session.py reads it

__all__ = ["Executor", "FlRequest", "UploadRequest"]

CHALLENGE_REQUEST_SKEW = 300.0  # seconds a signed challenge request is good for


def _unset_sql_root(path: str) -> None:
    """Once a run's directory is gone, DuckDB goes back to TMPDIR (tests make many)."""
    if os.environ.get(SQL_TEMP_ROOT_ENV) == path:
        del os.environ[SQL_TEMP_ROOT_ENV]


class Executor:
    """All state of one executor process. Thread-safe; Flight calls come concurrently."""

    def __init__(self, backend: TeeBackend, tls_key: ec.EllipticCurvePrivateKey,
                 clock: Callable[[], float] = time.monotonic, memory_budget: int | None = None,
                 spill_dir: str | None = None, budgets: Budgets | None = None,
                 now: Callable[[], float] = time.time, reap_every: float | None = None,
                 state_dir: str | None = None, result_ttl: float = DEFAULT_TTL,
                 upload_idle_timeout: float = UPLOAD_IDLE_TIMEOUT,
                 max_batch_bytes: int = MAX_BATCH_BYTES, validate_batches: bool = True,
                 verifiers: dict[str, Verifier] | None = None,
                 pool_links: Links | None = None) -> None:
        """`memory_budget`: bytes of input held in memory across tasks; beyond it inputs
        are spilled, sealed, to this run's directory under `spill_dir` (default: under
        TMPDIR; under Gramine: the encrypted mount). `clock` times challenges; `now` (unix
        seconds) is what deadlines and result expiry are read against; `reap_every`:
        seconds between passes of a thread that fails tasks past their deadline (None: no
        thread, call `reap`). `state_dir`: where finished results wait, sealed, for their
        receivers across restarts, for `result_ttl` seconds (default: `<spill_dir>/state`
        if a spill dir is given, else memory only). `upload_idle_timeout`: seconds an upload
        may go without a message before it is cut and its task failed. `max_batch_bytes`:
        the largest record batch taken. `validate_batches=False` skips the full check of
        each batch's Arrow structure: only for measuring what that check costs
        (bench/upload.py), never in service. `verifiers`: how this executor appraises the
        other members of a pool task (default: simulated evidence only); `pool_links`: where
        its Dask links for pool tasks listen and are reached (default: loopback)."""
        self.backend = backend
        self.memory_budget = memory_budget
        self._run_dir = RunDir(spill_dir)
        self.spill_dir = str(self._run_dir.spill)
        os.environ[SQL_TEMP_ROOT_ENV] = str(self._run_dir.sql)
        weakref.finalize(self, _unset_sql_root, str(self._run_dir.sql))
        notary = Notary(tls_key)
        self.tls_spki_hash = notary.tls_spki_hash
        self.signer = notary.signer
        self._challenges = Challenges(clock)
        if state_dir is None and spill_dir is not None:
            state_dir = os.path.join(spill_dir, "state")
        # digests admitted to run, kept with the results so a restart forgets neither
        runs = RunLedger(Path(state_dir) / "runs.sqlite" if state_dir else None)
        self._tasks = Tasks(notary, MemoryBudget(memory_budget), budgets, now, runs)
        self._uploads = UploadSlots(self._tasks.budgets)
        self._stop = threading.Event()
        if reap_every is not None:
            threading.Thread(target=self._reaper, args=(reap_every,), daemon=True,
                             name="teeflow-reaper").start()
        self._store = ResultStore(state_dir, result_ttl, now) if state_dir else None
        self._intake = Intake(self._tasks, self._challenges, self.spill_dir, validate_batches,
                              max_batch_bytes, upload_idle_timeout)
        self._release = Release(self._tasks, self._challenges, backend.tee, self._store)
        self._seats = Seats(backend, self._tasks, verifiers, pool_links)  # its part in pools
        self._runner = Runner(self._tasks, self._release, self._seats)
        self._rounds = Rounds(self._tasks, self._challenges, self._release)
        loaded = self._store.load(self._tasks, backend.tee) if self._store else {}
        self.startup: dict[str, Any] = {"wiped": self._run_dir.wiped.as_dict(),
                                        "results": loaded, "durable": self._store is not None}
        log.info("executor start: removed %d dead run(s): %d spill file(s), %d SQL temp "
                 "folder(s); results %s", self._run_dir.wiped.runs,
                 self._run_dir.wiped.spill_files, self._run_dir.wiped.sql_dirs,
                 loaded or "kept in memory only (no state dir)")

    @property
    def simulated(self) -> bool:
        return self.backend.tee == "simulated"

    # -- attestation and challenges ------------------------------------------
    def evidence(self, nonce: bytes) -> Evidence:
        if not 16 <= len(nonce) <= 64:
            raise InputError("nonce must be 16 to 64 bytes")
        return self.backend.evidence(bind_report_data(self.tls_spki_hash, nonce))

    def challenge(self, task: str, key: str, at: int, signature: bytes) -> bytes:
        """A single-use random value `key` signs to act on `task` (spec digest, or an
        unambiguous id): only for an owner or a receiver the task names, asking with its
        signature (so nobody spends another key's allowance), a few at a time."""
        with self._tasks.lock:
            held = self._tasks.get(task, key)
            spec = held.spec
        if key not in spec.owner_keys() and spec.receiver(key) is None:
            raise AuthError(f"this key is not an owner and not a receiver of task "
                            f"{spec.task_id}: its signature counts for nothing there")
        if abs(at - self._tasks.now()) > CHALLENGE_REQUEST_SKEW:
            raise AuthError(f"challenge request not timed within {CHALLENGE_REQUEST_SKEW:.0f}s "
                            "of the executor's clock")
        verify_signature(key, signature, wire.challenge_message(spec.task_id,
                                                                self.tls_spki_hash, at))
        return self._challenges.issue(held.digest, key)

    # -- deadlines -------------------------------------------------------------
    def reap(self) -> list[str]:
        """Fail and wipe every task waiting past its deadline (the digests reaped)."""
        reaped = self._tasks.reap()
        for digest in reaped:
            self._challenges.forget(digest)
        return reaped

    def _reaper(self, every: float) -> None:
        while not self._stop.wait(every):
            self.reap()

    def close(self) -> None:
        """Stop the reaper and remove this run's spill directory (also done when the object
        is collected)."""
        self._stop.set()
        self._seats.close()
        self._run_dir.close()
        _unset_sql_root(str(self._run_dir.sql))

    # -- tasks -------------------------------------------------------------
    def create_task(self, spec: wire.TaskSpec, approvals: Iterable[Approval | Mapping[str, Any]],
                    schemas: Mapping[str, pa.Schema] | None = None,
                    initiator_signature: str | None = None,
                    rules: Mapping[str, Any] | None = None,
                    pool: list[PoolSeat] | None = None) -> None:
        self._tasks.create(spec, approvals, schemas, initiator_signature, rules, pool)

    def status(self, task_id: str) -> dict[str, Any]:
        return self._tasks.status(task_id, self.simulated)

    def cancel(self, task_id: str, signer_key: str, signature: bytes) -> None:
        self._tasks.cancel(task_id, signer_key, signature)
        if self._store is not None:
            with self._tasks.lock:
                task = self._tasks.get(task_id, signer_key)
                if task.status == TaskState.CANCELLED:
                    self._store.forget(task.digest)

    def abort(self, task_id: str, run: int, signature: bytes) -> str:
        """The spec's scheduler ended the task: fail, wipe, drop results (verdicts.py)."""
        status = verdicts.abort(self._tasks, task_id, run, signature)
        if self._store is not None:
            with self._tasks.lock:
                task = self._tasks.get(task_id)
                if task.status != TaskState.DONE:
                    self._store.forget(task.digest)
        return status

    def grant_release(self, task_id: str, run: int, signature: bytes) -> bool:
        """The spec's scheduler recorded the release: receivers may take the result."""
        verdicts.grant(self._tasks, task_id, run, signature)
        if self._store is not None:
            with self._tasks.lock:
                self._store.save(self._tasks.get(task_id))
        return True

    def held_bytes(self, task_id: str) -> int:
        return self._tasks.held_bytes(task_id)

    # -- data, runs, rounds, results ------------------------------------------
    def receive(self, request: UploadRequest, schema: pa.Schema,
                messages: Iterable[tuple[pa.RecordBatch | None, bytes | None]],
                hang_up: Callable[[], object] | None = None) -> dict[str, int]:
        """An upload, admitted first: signed by the dataset's owner (checked here, spent
        by intake), within the concurrent-upload caps (refused at once, the task
        untouched), and its bytes within the task's and the initiator's budgets.
        `hang_up` breaks the sender's connection if the upload is cut for going quiet."""
        with self._tasks.lock:
            task = self._tasks.get(request.ref)
            owner = task.spec.dataset(request.dataset).owner_key
        try:
            verify_signature(owner, request.signature, wire.upload_message(
                task.spec.task_id, request.dataset, request.challenge, self.tls_spki_hash,
                task.pool_keys))
        except AuthError:
            if task.pool_keys is None:
                raise
            raise AuthError(f"dataset {request.dataset!r}: the upload is not signed for this "
                            "executor's pool (its owner attested other members)") from None
        if not TASK.allows(task.status, TaskEvent.UPLOAD):
            raise StateError(f"task {task.spec.task_id} is {task.status}, not taking uploads")
        if task.spec.expires is not None and task.spec.expires <= self._tasks.now():
            raise ConsentExpired(f"task {task.spec.task_id}: its consent expired at unix time "
                                 f"{task.spec.expires}")
        with self._uploads.slot(task.digest, owner):
            return self._intake.receive(request, schema, self._charged(task, messages),
                                        hang_up)

    def _charged(self, task: Task, messages: Iterable[tuple[pa.RecordBatch | None, bytes | None]]
                 ) -> Iterator[tuple[pa.RecordBatch | None, bytes | None]]:
        for batch, meta in messages:
            if batch is not None:
                self._tasks.charge(task, batch.nbytes)
            yield batch, meta

    def run(self, task_id: str, background: bool = True) -> str:
        return self._runner.run(task_id, background)

    def pool_evidence(self, digest: str, nonce: bytes) -> dict[str, str]:
        """This member's pool certificate and evidence for another member's nonce."""
        return self._seats.evidence(digest, nonce)

    def pool_join(self, digest: str, scheduler: str, signature: bytes) -> dict[str, str]:
        """Join the lead's Dask scheduler for a pool task (executor/pool/seat.py)."""
        return self._seats.join(digest, scheduler, signature)

    def fl_model(self, request: FlRequest) -> dict[str, Any]:
        return self._rounds.model(request)

    def fl_update(self, request: FlRequest, update: dict[str, Any]) -> dict[str, Any]:
        return self._rounds.update(request, update)

    def take_result(self, task_id: str, receiver_key: str, challenge: bytes,
                    signature: bytes) -> bytes:
        self.expire_results()
        return self._release.take(task_id, receiver_key, challenge, signature)

    def expire_results(self) -> list[str]:
        """Drop the envelopes of every finished task past its expiry, here and on disk."""
        if self._store is None:
            return []
        gone = self._store.expired()
        with self._tasks.lock:
            for digest in gone:
                task = self._tasks.get(digest)
                task.sealed.clear()
                for receiver, state in task.results.items():
                    if RESULT.allows(state, ResultEvent.DROP):
                        task.step_result(receiver, ResultEvent.DROP)
                self._tasks.record(task, "expired", {"spec_digest": task.digest})
                self._store.forget(digest)
        return gone
