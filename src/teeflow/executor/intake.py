"""Uploads: authenticate one (a signed single-use challenge, by the dataset's owner),
check its schema before a batch is read, stream it in, hold it in memory or spill it
sealed, insist on the sender's end marker, then digest it off the upload's path.

An upload counts whole or not at all: a broken one fails the task and wipes it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import pyarrow as pa

from teeflow.core import wire
from teeflow.core.crypto import verify_signature
from teeflow.core.errors import InputError, SchemaMismatch, StateError, TeeflowError
from teeflow.core.schemas import schema_fingerprint
from teeflow.executor.challenges import Challenges
from teeflow.executor.inputs import Digest, batches_of
from teeflow.executor.messages import UploadRequest
from teeflow.executor.spill import SealedSpill
from teeflow.executor.states import INPUT, TASK, InputEvent, InputState, TaskEvent
from teeflow.executor.tasks import Task, Tasks

log = logging.getLogger("teeflow.executor")


class Intake:
    def __init__(self, tasks: Tasks, challenges: Challenges, spill_dir: str | None) -> None:
        self.tasks = tasks
        self.challenges = challenges
        self.spill_dir = spill_dir

    def _begin(self, request: UploadRequest, schema: pa.Schema) -> Task:
        """Authenticate an upload and check its schema before any batch is read."""
        with self.tasks.lock:
            task = self.tasks.get(request.ref)
            ref = task.spec.dataset(request.dataset)
        self.challenges.take(request.challenge, task.digest, ref.owner_key)
        with self.tasks.lock:
            message = wire.upload_message(task.spec.task_id, request.dataset, request.challenge,
                                          self.tasks.notary.tls_spki_hash)
            verify_signature(ref.owner_key, request.signature, message)
            if not TASK.allows(task.status, TaskEvent.UPLOAD):
                raise StateError(f"task {request.task_id} is {task.status}, not taking uploads")
            if task.fed is not None:
                raise InputError(f"task {request.task_id} is federated: data stays with its "
                                 "owners")
            if not INPUT.allows(task.uploads[request.dataset], InputEvent.BEGIN):
                raise StateError(f"dataset {request.dataset!r} was already uploaded")
            seen = schema_fingerprint(schema)
            if seen != ref.fingerprint:
                mismatch = (f"dataset {request.dataset!r}: uploaded schema {seen[:12]} is not the "
                            f"catalogued {ref.fingerprint[:12]}")
                self.tasks.fail(task, mismatch)
                raise SchemaMismatch(mismatch)
            task.step_input(request.dataset, InputEvent.BEGIN)
            return task

    def receive(self, request: UploadRequest, schema: pa.Schema,
                messages: Iterable[tuple[pa.RecordBatch | None, bytes | None]]) -> dict[str, int]:
        """Take a whole upload or nothing: a broken stream fails the task and wipes it.

        `messages` are (batch, app_metadata) pairs as they arrive. The upload counts
        only if it closes with the sender's end marker giving the same row and batch
        counts: a sender that dies mid-stream looks to Flight like a clean end.
        """
        task = self._begin(request, schema)
        memory = self.tasks.memory
        held: list[pa.RecordBatch] = []
        spill: SealedSpill | None = None
        rows = nbytes = 0
        try:
            end: dict[str, Any] | None = None
            for batch, meta in messages:
                if end is not None:
                    raise InputError(f"dataset {request.dataset!r}: data after the end marker")
                if batch is not None:
                    if batch.schema != schema:
                        raise SchemaMismatch(
                            f"dataset {request.dataset!r}: a batch changed schema")
                    if spill is None and memory.reserve(batch.nbytes):
                        held.append(batch)
                    else:  # over the memory budget: the rest of this input goes to disk
                        spill = spill or SealedSpill(schema, self.spill_dir)
                        spill.append(batch)
                    rows += batch.num_rows
                    nbytes += batch.nbytes
                if meta:
                    end = wire.parse_json(meta, "upload end marker")
                if not TASK.allows(task.status, TaskEvent.UPLOAD):
                    raise StateError(f"task {request.task_id} became {task.status} mid-upload")
            count = len(held) + (spill.count if spill else 0)
            wire.check_end_marker(end, rows, count, request.dataset)
        except BaseException as exc:
            self._drop(held, spill)
            self.tasks.settle(task)
            with self.tasks.lock:
                self._wipe_receiving(task, request.dataset)
                reason = exc if isinstance(exc, TeeflowError) else "stream broken"
                self.tasks.fail(task, f"upload of {request.dataset!r} failed after {rows} rows: "
                                      f"{reason}")
            raise
        with self.tasks.lock:
            if not TASK.allows(task.status, TaskEvent.UPLOAD):
                self._wipe_receiving(task, request.dataset)
                self._drop(held, spill)
                raise StateError(f"task {request.task_id} is {task.status}; upload dropped")
            task.step_input(request.dataset, InputEvent.END)
            task.inputs[request.dataset] = held
            task.schemas[request.dataset] = schema
            if spill is not None:
                task.spills[request.dataset] = spill
            task.received[request.dataset] = {"rows": rows, "bytes": nbytes}
            # Hashed after the transfer, off the upload's path; runs wait for it.
            task.digests[request.dataset] = Digest(
                batches_of(held, spill),
                lambda sha256: self._digested(task, request.dataset, rows, nbytes, sha256))
        log.info("task %s: received %s (%d rows)", request.task_id, request.dataset, rows)
        return {"rows": rows, "bytes": nbytes}

    @staticmethod
    def _wipe_receiving(task: Task, dataset: str) -> None:
        """The upload of `dataset` ends without counting. Caller holds the lock."""
        if task.uploads[dataset] == InputState.RECEIVING:
            task.step_input(dataset, InputEvent.WIPE)

    def _drop(self, held: list[pa.RecordBatch], spill: SealedSpill | None) -> None:
        self.tasks.memory.free(sum(b.nbytes for b in held))
        held.clear()
        if spill is not None:
            spill.close()

    def _digested(self, task: Task, dataset: str, rows: int, nbytes: int, sha256: str) -> None:
        with self.tasks.lock:
            self.tasks.record(task, "received", {"dataset": dataset, "rows": rows,
                                                 "bytes": nbytes, "sha256": sha256})
