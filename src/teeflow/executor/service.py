"""The TEE executor, with no networking: one facade over its parts.

    tasks       the task records: create (only with every owner's signature), status,
                fail, cancel, wipe
    challenges  single-use challenges that callers sign
    intake      uploads: authenticate, stream, end marker, hold or spill, digest
    runner      run a computation over the held inputs, then wipe them
    rounds      federated rounds
    release     seal the result to each receiver, hand it over once
    states      every lifecycle above as a table

Runs inside the enclave. It must never hand an input back to anyone: no method here
returns input rows. The result goes only to the task's receivers, sealed, and inputs
are dropped as soon as the computation ends.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pyarrow as pa
from cryptography.hazmat.primitives.asymmetric import ec

from teeflow.attestation.evidence import Evidence, bind_report_data
from teeflow.attestation.registry import TeeBackend
from teeflow.core import wire
from teeflow.core.errors import InputError
from teeflow.executor.challenges import Challenges
from teeflow.executor.inputs import MemoryBudget
from teeflow.executor.intake import MAX_BATCH_BYTES, UPLOAD_IDLE_TIMEOUT, Intake
from teeflow.executor.messages import Approval, FlRequest, UploadRequest
from teeflow.executor.notary import Notary
from teeflow.executor.release import Release
from teeflow.executor.rounds import Rounds
from teeflow.executor.runner import Runner
from teeflow.executor.tasks import Tasks

__all__ = ["Executor", "FlRequest", "UploadRequest"]


class Executor:
    """All state of one executor process. Thread-safe; Flight calls come concurrently."""

    def __init__(self, backend: TeeBackend, tls_key: ec.EllipticCurvePrivateKey,
                 clock: Callable[[], float] = time.monotonic, memory_budget: int | None = None,
                 spill_dir: str | None = None, upload_idle_timeout: float = UPLOAD_IDLE_TIMEOUT,
                 max_batch_bytes: int = MAX_BATCH_BYTES, validate_batches: bool = True) -> None:
        """`memory_budget`: bytes of input held in memory across tasks; beyond it inputs
        are spilled, sealed, to `spill_dir` (under Gramine: the encrypted mount).
        `upload_idle_timeout`: seconds an upload may go without a message before it is
        cut and its task failed. `max_batch_bytes`: the largest record batch taken.
        `validate_batches=False` skips the full check of each batch's Arrow structure:
        only for measuring what that check costs (bench/upload.py), never in service."""
        self.backend = backend
        self.memory_budget = memory_budget
        self.spill_dir = spill_dir
        notary = Notary(tls_key)
        self.tls_spki_hash = notary.tls_spki_hash
        self.signer = notary.signer
        self._challenges = Challenges(clock)
        self._tasks = Tasks(notary, MemoryBudget(memory_budget))
        self._intake = Intake(self._tasks, self._challenges, spill_dir, validate_batches,
                              max_batch_bytes, upload_idle_timeout)
        self._release = Release(self._tasks, self._challenges, backend.tee)
        self._runner = Runner(self._tasks, self._release)
        self._rounds = Rounds(self._tasks, self._challenges, self._release)

    @property
    def simulated(self) -> bool:
        return self.backend.tee == "simulated"

    # -- attestation and challenges ------------------------------------------
    def evidence(self, nonce: bytes) -> Evidence:
        if not 16 <= len(nonce) <= 64:
            raise InputError("nonce must be 16 to 64 bytes")
        return self.backend.evidence(bind_report_data(self.tls_spki_hash, nonce))

    def challenge(self) -> bytes:
        """A single-use random value a caller signs to prove who it is."""
        return self._challenges.issue()

    # -- tasks -------------------------------------------------------------
    def create_task(self, spec: wire.TaskSpec, approvals: Iterable[Approval | Mapping[str, Any]],
                    schemas: Mapping[str, pa.Schema] | None = None) -> None:
        self._tasks.create(spec, approvals, schemas)

    def status(self, task_id: str) -> dict[str, Any]:
        return self._tasks.status(task_id, self.simulated)

    def cancel(self, task_id: str, signer_key: str, signature: bytes) -> None:
        self._tasks.cancel(task_id, signer_key, signature)

    def held_bytes(self, task_id: str) -> int:
        return self._tasks.held_bytes(task_id)

    # -- data, runs, rounds, results ------------------------------------------
    def receive(self, request: UploadRequest, schema: pa.Schema,
                messages: Iterable[tuple[pa.RecordBatch | None, bytes | None]]) -> dict[str, int]:
        return self._intake.receive(request, schema, messages)

    def run(self, task_id: str, background: bool = True) -> str:
        return self._runner.run(task_id, background)

    def fl_model(self, request: FlRequest) -> dict[str, Any]:
        return self._rounds.model(request)

    def fl_update(self, request: FlRequest, update: dict[str, Any]) -> dict[str, Any]:
        return self._rounds.update(request, update)

    def take_result(self, task_id: str, receiver_key: str, challenge: bytes,
                    signature: bytes) -> bytes:
        return self._release.take(task_id, receiver_key, challenge, signature)
