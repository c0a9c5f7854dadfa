"""Uploads: authenticate one (a signed single-use challenge, by the dataset's owner),
check its schema before a batch is read, stream it in, check every batch in full, hold it
in memory or spill it sealed, insist on the sender's end marker, then digest it off the
upload's path.

An upload counts whole or not at all: a broken one (a malformed or oversized batch, an
oversized message, a sender that goes quiet) fails the task and wipes every input of it.
Nothing of a batch that failed its checks is held, spilled or computed on, and no error
says what was in it: Arrow's own messages quote offsets and values, so they never leave.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import pyarrow as pa

from teeflow.core import wire
from teeflow.core.crypto import verify_signature
from teeflow.core.errors import (
    AuthError,
    InputError,
    SchemaMismatch,
    StateError,
    TeeflowError,
)
from teeflow.core.schemas import schema_fingerprint
from teeflow.executor.challenges import Challenges
from teeflow.executor.inputs import Digest, batches_of
from teeflow.executor.messages import UploadRequest
from teeflow.executor.spill import SealedSpill
from teeflow.executor.states import INPUT, TASK, InputEvent, InputState, TaskEvent
from teeflow.executor.tasks import Task, Tasks

log = logging.getLogger("teeflow.executor")

MAX_BATCH_BYTES = 64 * 1024 * 1024  # buffers of one record batch
MAX_METADATA = 4096  # app metadata of one message: only the end marker travels there
UPLOAD_IDLE_TIMEOUT = 60.0  # seconds an upload may go without a message


def check_batch(batch: pa.RecordBatch, schema: pa.Schema, dataset: str, index: int,
                max_bytes: int, full: bool = True) -> None:
    """Refuse a batch unless it has the signed schema, fits `max_bytes` and (with `full`)
    is well-formed Arrow throughout: offsets, dictionary indices, nested children, UTF-8.

    The size is read from the buffers' own sizes first: `nbytes` follows offsets, which
    are not yet checked. The message names the batch and the column, never a value.
    """
    if batch.schema != schema:
        raise SchemaMismatch(f"dataset {dataset!r}: batch {index} changed schema")
    if batch.get_total_buffer_size() > max_bytes:
        raise InputError(f"dataset {dataset!r}: batch {index} is larger than {max_bytes} bytes")
    if not full:
        return
    for name, column in zip(schema.names, batch.columns, strict=True):
        try:
            column.validate(full=True)
        except pa.ArrowException:
            raise InputError(f"dataset {dataset!r}: batch {index}, column {name!r}: malformed "
                             "Arrow data") from None
    if batch.nbytes > max_bytes:
        raise InputError(f"dataset {dataset!r}: batch {index} is larger than {max_bytes} bytes")


class _Upload:
    """One upload in flight: what it holds so far and when its sender must next be heard.
    `lock` orders the receiving thread against the watchdog that may cut it."""

    def __init__(self, task: Task, dataset: str, deadline: float,
                 hang_up: Callable[[], object] | None = None) -> None:
        self.task = task
        self.dataset = dataset
        self.deadline = deadline
        self.hang_up = hang_up  # breaks the sender's connection, so the reading thread returns
        self.held: list[pa.RecordBatch] = []
        self.spill: SealedSpill | None = None
        self.cut = False  # the watchdog dropped it
        self.settled = False  # it ended (counted or not): the watchdog leaves it alone
        self.lock = threading.Lock()


class Watchdog:
    """Cuts uploads whose sender goes quiet: `expire` runs, on this watchdog's thread, for
    an upload whose deadline has passed. The thread runs only while uploads are in flight.

    Flight's server cannot cancel a stream it is reading (apache/arrow#43819): what it held
    is dropped and its task failed here, at the deadline, whatever the sender does; then the
    upload's `hang_up` (the server passes one that shuts the sender's connection down, see
    hangup.py) makes the blocked read return, so the receiving thread is freed too.
    """

    def __init__(self, expire: Callable[[_Upload], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._expire = expire
        self._clock = clock
        self._uploads: set[_Upload] = set()
        self._wake = threading.Condition()
        self._running = False

    def watch(self, upload: _Upload) -> None:
        with self._wake:
            self._uploads.add(upload)
            if not self._running:
                self._running = True
                threading.Thread(target=self._run, name="teeflow-upload-watchdog",
                                 daemon=True).start()

    def forget(self, upload: _Upload) -> None:
        with self._wake:
            self._uploads.discard(upload)

    def _run(self) -> None:
        while True:
            with self._wake:
                if not self._uploads:
                    self._running = False
                    return
                now = self._clock()
                expired = {u for u in self._uploads if u.deadline <= now}
                self._uploads -= expired
                if not expired:
                    # Deadlines only move later: waking early just looks again.
                    self._wake.wait(min(u.deadline for u in self._uploads) - now)
                    continue
            for upload in expired:
                try:
                    self._expire(upload)
                except Exception:  # one failed cut must not stop the watchdog
                    log.exception("cutting a stalled upload failed")


class Intake:
    def __init__(self, tasks: Tasks, challenges: Challenges, spill_dir: str | None,
                 validate_batches: bool = True, max_batch_bytes: int = MAX_BATCH_BYTES,
                 idle_timeout: float = UPLOAD_IDLE_TIMEOUT) -> None:
        self.tasks = tasks
        self.challenges = challenges
        self.spill_dir = spill_dir
        self.validate_batches = validate_batches
        self.max_batch_bytes = max_batch_bytes
        self.idle_timeout = idle_timeout
        self.watchdog = Watchdog(self._cut)

    def _begin(self, request: UploadRequest, schema: pa.Schema) -> Task:
        """Authenticate an upload and check its schema before any batch is read."""
        with self.tasks.lock:
            task = self.tasks.get(request.ref)
            ref = task.spec.dataset(request.dataset)
        self.challenges.take(request.challenge, task.digest, ref.owner_key)
        with self.tasks.lock:
            message = wire.upload_message(task.spec.task_id, request.dataset, request.challenge,
                                          self.tasks.notary.tls_spki_hash, task.pool_keys)
            try:
                verify_signature(ref.owner_key, request.signature, message)
            except AuthError:
                if task.pool_keys is None:
                    raise
                raise AuthError(f"dataset {request.dataset!r}: the upload is not signed for "
                                "this executor's pool (its owner attested other members)"
                                ) from None
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
                messages: Iterable[tuple[pa.RecordBatch | None, bytes | None]],
                hang_up: Callable[[], object] | None = None) -> dict[str, int]:
        """Take a whole upload or nothing: a broken stream fails the task and wipes it.

        `messages` are (batch, app_metadata) pairs as they arrive. The upload counts
        only if it closes with the sender's end marker giving the same row and batch
        counts: a sender that dies mid-stream looks to Flight like a clean end.
        """
        task = self._begin(request, schema)
        dataset = request.dataset
        memory = self.tasks.memory
        upload = _Upload(task, dataset, time.monotonic() + self.idle_timeout, hang_up)
        self.watchdog.watch(upload)
        rows = nbytes = count = 0
        try:
            end: dict[str, Any] | None = None
            for batch, meta in messages:
                upload.deadline = time.monotonic() + self.idle_timeout
                if end is not None:
                    raise InputError(f"dataset {dataset!r}: data after the end marker")
                if batch is not None:
                    check_batch(batch, schema, dataset, count, self.max_batch_bytes,
                                self.validate_batches)
                    with upload.lock:
                        if upload.cut:
                            raise InputError(f"dataset {dataset!r}: upload was cut")
                        if upload.spill is None and memory.reserve(batch.nbytes):
                            upload.held.append(batch)
                        else:  # over the memory budget: the rest of this input goes to disk
                            upload.spill = upload.spill or SealedSpill(schema, self.spill_dir)
                            upload.spill.append(batch)
                    rows += batch.num_rows
                    nbytes += batch.nbytes
                    count += 1
                if meta:
                    if len(meta) > MAX_METADATA:
                        raise InputError(f"dataset {dataset!r}: message metadata larger than "
                                         f"{MAX_METADATA} bytes")
                    end = wire.parse_json(meta, "upload end marker")
                if not TASK.allows(task.status, TaskEvent.UPLOAD):
                    raise StateError(f"task {request.task_id} became {task.status} mid-upload")
            wire.check_end_marker(end, rows, count, dataset)
            self.watchdog.forget(upload)
            with upload.lock:
                if upload.cut:
                    raise InputError(f"dataset {dataset!r}: upload was cut")
                upload.settled = True
        except BaseException as exc:
            self.watchdog.forget(upload)
            with upload.lock:
                was_cut, upload.settled = upload.cut, True
                self._drop(upload)
            if not was_cut:  # a cut upload's task was failed by the watchdog
                self.tasks.settle(task)
                with self.tasks.lock:
                    self._wipe_receiving(task, dataset)
                    reason = exc if isinstance(exc, TeeflowError) else "stream broken"
                    self.tasks.fail(task, f"upload of {dataset!r} failed after {rows} rows: "
                                          f"{reason}")
            raise
        held, spill = upload.held, upload.spill
        with self.tasks.lock:
            if not TASK.allows(task.status, TaskEvent.UPLOAD):
                self._wipe_receiving(task, dataset)
                self._drop(upload)
                raise StateError(f"task {request.task_id} is {task.status}; upload dropped")
            task.step_input(dataset, InputEvent.END)
            task.inputs[dataset] = held
            task.schemas[dataset] = schema
            if spill is not None:
                task.spills[dataset] = spill
            task.received[dataset] = {"rows": rows, "bytes": nbytes}
            # Hashed after the transfer, off the upload's path; runs wait for it.
            task.digests[dataset] = Digest(
                batches_of(held, spill),
                lambda sha256: self._digested(task, dataset, rows, nbytes, sha256))
        log.info("task %s: received %s (%d rows)", request.task_id, dataset, rows)
        return {"rows": rows, "bytes": nbytes}

    def _cut(self, upload: _Upload) -> None:
        """The watchdog's verdict on a quiet upload: drop it, fail its task, wipe it."""
        with upload.lock:
            if upload.settled:
                return
            upload.cut = True
            self._drop(upload)
        task = upload.task
        self.tasks.settle(task)
        with self.tasks.lock:
            self._wipe_receiving(task, upload.dataset)
            self.tasks.fail(task, f"upload of {upload.dataset!r} idle for {self.idle_timeout:g} "
                                  "s: cut")
        if upload.hang_up is not None:
            upload.hang_up()

    @staticmethod
    def _wipe_receiving(task: Task, dataset: str) -> None:
        """The upload of `dataset` ends without counting. Caller holds the lock."""
        if task.uploads[dataset] == InputState.RECEIVING:
            task.step_input(dataset, InputEvent.WIPE)

    def _drop(self, upload: _Upload) -> None:
        """Forget what an upload held so far; a second call finds nothing."""
        self.tasks.memory.free(sum(b.nbytes for b in upload.held))
        upload.held = []
        if upload.spill is not None:
            upload.spill.close()
            upload.spill = None

    def _digested(self, task: Task, dataset: str, rows: int, nbytes: int, sha256: str) -> None:
        with self.tasks.lock:
            self.tasks.record(task, "received", {"dataset": dataset, "rows": rows,
                                                 "bytes": nbytes, "sha256": sha256})
