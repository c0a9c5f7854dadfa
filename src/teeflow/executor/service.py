"""The TEE executor's logic, with no networking: tasks, uploads, runs, results, wiping.

Runs inside the enclave. It must never hand an input back to anyone: there is
no method here that returns input rows. The result goes only to the task's
initiator, and inputs are dropped as soon as the computation ends.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from teeflow import compute
from teeflow.attestation.evidence import NONCE_LEN, Evidence, bind_report_data
from teeflow.attestation.registry import TeeBackend
from teeflow.compute import federated
from teeflow.compute.rows import Source
from teeflow.core import audit, wire
from teeflow.core.crypto import verify_signature
from teeflow.core.errors import (
    AuthError,
    ComputeError,
    InputError,
    SchemaMismatch,
    StateError,
    TeeflowError,
    UnknownTask,
)
from teeflow.core.schemas import schema_fingerprint
from teeflow.core.seal import SUITE_NAME, seal
from teeflow.executor.spill import SealedSpill

log = logging.getLogger("teeflow.executor")

CHALLENGE_TTL = 120.0
MAX_CHALLENGES = 10_000


@dataclass
class _Task:
    spec: wire.TaskSpec
    params: dict[str, Any]
    status: str = "waiting"  # waiting, running, done, failed, released, cancelled
    inputs: dict[str, list[pa.RecordBatch]] = field(default_factory=dict)
    receiving: set[str] = field(default_factory=set)
    received: dict[str, dict[str, int]] = field(default_factory=dict)
    sealed: dict[str, bytes] = field(default_factory=dict)  # receiver sign key -> envelope
    error: str | None = None
    audit: list[dict[str, Any]] = field(default_factory=list)
    digests: dict[str, _Digest] = field(default_factory=dict)
    spills: dict[str, SealedSpill] = field(default_factory=dict)
    schemas: dict[str, pa.Schema] = field(default_factory=dict)
    fed: _Fed | None = None

    def wipe(self) -> None:
        self.inputs.clear()


@dataclass
class _Fed:
    """A federated task's rounds: the global model and this round's updates."""

    rounds: int
    round: int = 0
    weights: np.ndarray | None = None
    features: list[str] | None = None
    updates: dict[str, tuple[np.ndarray, int, float]] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class UploadRequest:
    task_id: str
    dataset: str
    challenge: bytes
    signature: bytes

    @classmethod
    def decode(cls, data: bytes) -> UploadRequest:
        body = wire.parse_json(data, "upload request")
        try:
            return cls(str(body["task_id"]), str(body["dataset"]),
                       bytes.fromhex(body["challenge"]), bytes.fromhex(body["signature"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(
                "upload request: needs task_id, dataset, challenge, signature") from exc


@dataclass(frozen=True)
class FlRequest:
    kind: str  # "fl-model" or "fl-update"
    task_id: str
    dataset: str
    round: int
    challenge: bytes
    signature: bytes

    @classmethod
    def from_dict(cls, kind: str, body: dict[str, Any]) -> FlRequest:
        try:
            return cls(kind, str(body["task_id"]), str(body["dataset"]), int(body["round"]),
                       bytes.fromhex(body["challenge"]), bytes.fromhex(body["signature"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(
                f"{kind}: needs task_id, dataset, round, challenge, signature") from exc


class Executor:
    """All state of one executor process. Thread-safe; Flight calls come concurrently."""

    def __init__(self, backend: TeeBackend, tls_key: ec.EllipticCurvePrivateKey,
                 clock: Callable[[], float] = time.monotonic, memory_budget: int | None = None,
                 spill_dir: str | None = None) -> None:
        """`memory_budget`: bytes of input held in memory across tasks; beyond it inputs
        are spilled, sealed, to `spill_dir` (under Gramine: the encrypted mount)."""
        self.backend = backend
        self.memory_budget = memory_budget
        self.spill_dir = spill_dir
        self._memory_held = 0
        spki = tls_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        self.tls_spki_hash = hashlib.sha256(spki).digest()
        self.signer = audit.p256_signer(spki)
        self._tls_key = tls_key
        self._clock = clock
        self._lock = threading.Lock()
        self._tasks: dict[str, _Task] = {}
        self._challenges: dict[bytes, float] = {}

    @property
    def simulated(self) -> bool:
        return self.backend.tee == "simulated"

    # -- attestation -------------------------------------------------------
    def evidence(self, nonce: bytes) -> Evidence:
        if not 16 <= len(nonce) <= 64:
            raise InputError("nonce must be 16 to 64 bytes")
        return self.backend.evidence(bind_report_data(self.tls_spki_hash, nonce))

    def challenge(self) -> bytes:
        """A single-use random value a caller signs to prove who it is."""
        now = self._clock()
        value = secrets.token_bytes(NONCE_LEN)
        with self._lock:
            expired = [c for c, t in self._challenges.items() if t < now]
            for c in expired:
                del self._challenges[c]
            if len(self._challenges) >= MAX_CHALLENGES:
                raise StateError("too many outstanding challenges; try again later")
            self._challenges[value] = now + CHALLENGE_TTL
        return value

    def _take_challenge(self, value: bytes) -> None:
        with self._lock:
            expires = self._challenges.pop(value, None)
        if expires is None or expires < self._clock():
            raise AuthError("challenge unknown, already used or expired")

    def _record(self, task: _Task, kind: str, body: dict[str, Any]) -> None:
        """Sign an audit entry with the attested TLS key. Caller holds the lock."""
        payload = audit.signed_payload(task.spec.task_id, kind, body)
        task.audit.append({"kind": kind, "body": body, "signer": self.signer,
                           "signature": audit.sign_p256(self._tls_key, payload)})

    # -- tasks -------------------------------------------------------------
    def create_task(self, spec: wire.TaskSpec, approvals: list[dict[str, str]],
                    schemas: dict[str, pa.Schema] | None = None) -> None:
        """Accept a task only with every owner's signature on its digest. The full checks
        (the SQL output policy among them) run here, before any data moves: the parameters,
        and, given the catalogued schemas (each must have the fingerprint the owners signed),
        the schemas too."""
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
        for approval in approvals:
            signer, signature = approval.get("signer", ""), approval.get("signature", "")
            try:
                audit.verify_entry_signature(spec.task_id, "approved", body, signer, signature)
            except AuthError:
                continue
            signed.add(signer.removeprefix("ed25519:"))
        missing = [k for k in spec.owner_keys() if k not in signed]
        if missing:
            owners = sorted({d.owner for d in spec.datasets if d.owner_key in missing})
            raise AuthError(f"task {spec.task_id}: no valid approval from owner(s) {owners}")
        with self._lock:
            if spec.task_id in self._tasks:
                if self._tasks[spec.task_id].spec == spec:
                    return  # a retried create is harmless
                raise StateError(f"task {spec.task_id} exists with another spec")
            task = _Task(spec=spec, params=params)
            if comp.layout == "federated":
                task.fed = _Fed(rounds=params["rounds"])
            self._tasks[spec.task_id] = task
        log.info("task %s created: %s over %s", spec.task_id, spec.compute,
                 [d.name for d in spec.datasets])

    def _task(self, task_id: str) -> _Task:
        task = self._tasks.get(task_id)
        if task is None:
            raise UnknownTask(f"executor has no task {task_id!r}")
        return task

    def status(self, task_id: str) -> dict[str, Any]:
        with self._lock:
            task = self._task(task_id)
            return {
                "task_id": task_id,
                "status": task.status,
                "error": task.error,
                "expected": [d.name for d in task.spec.datasets],
                "received": {k: dict(v) for k, v in task.received.items()},
                "receiving": sorted(task.receiving),
                "inputs_held": sorted(set(task.inputs) | set(task.spills)),
                "spilled": {k: v.nbytes for k, v in task.spills.items()},
                "digesting": sorted(k for k, d in task.digests.items() if d.running),
                "simulated": self.simulated,
                "taken_by": sorted(k for k in (r.sign_key for r in task.spec.receivers)
                                   if k not in task.sealed) if task.status in (
                                       "done", "released") else [],
                "audit": list(task.audit),
            }

    def _fail(self, task: _Task, message: str) -> None:
        """Mark failed and drop every input. Caller holds the lock."""
        if task.status in ("waiting", "running"):
            task.status = "failed"
            task.error = message
        self._wipe(task, "failed")
        log.warning("task %s failed: %s", task.spec.task_id, message)

    def _reserve(self, nbytes: int) -> bool:
        """Count `nbytes` against the memory budget if they fit."""
        with self._lock:
            if self.memory_budget is not None and self._memory_held + nbytes > self.memory_budget:
                return False
            self._memory_held += nbytes
            return True

    def _release(self, held: list[pa.RecordBatch], spill: SealedSpill | None) -> None:
        with self._lock:
            self._memory_held -= sum(b.nbytes for b in held)
        held.clear()
        if spill is not None:
            spill.close()

    def _wipe(self, task: _Task, reason: str) -> None:
        """Drop every input of a task, in memory and on disk. Caller holds the lock."""
        held = sorted(set(task.inputs) | set(task.spills))
        self._memory_held -= sum(b.nbytes for batches in task.inputs.values() for b in batches)
        for spill in task.spills.values():
            spill.close()
        task.spills.clear()
        task.wipe()
        if held or task.received:
            self._record(task, "wiped", {"inputs": held, "reason": reason})

    def _settle(self, task: _Task) -> None:
        """Let running digests record their `received` entries before a `wiped` one."""
        for digest in list(task.digests.values()):
            digest.wait()

    def cancel(self, task_id: str, signer_key: str, signature: bytes) -> None:
        """Stop a task and wipe it, for its initiator or one of its owners."""
        with self._lock:
            task = self._task(task_id)
        if signer_key != task.spec.initiator_key and signer_key not in task.spec.owner_keys():
            raise AuthError(f"only the initiator or an owner can cancel task {task_id}")
        verify_signature(signer_key, signature, wire.cancel_message(task_id))
        self._settle(task)
        with self._lock:
            if task.status in ("waiting", "running", "done"):
                task.status = "cancelled"
                task.sealed.clear()
            self._wipe(task, "cancelled")

    # -- uploads -----------------------------------------------------------
    def _begin_upload(self, request: UploadRequest, schema: pa.Schema) -> _Task:
        """Authenticate an upload and check its schema before any batch is read."""
        self._take_challenge(request.challenge)
        with self._lock:
            task = self._task(request.task_id)
            ref = task.spec.dataset(request.dataset)
            message = wire.upload_message(request.task_id, request.dataset, request.challenge,
                                          self.tls_spki_hash)
            verify_signature(ref.owner_key, request.signature, message)
            if task.status != "waiting":
                raise StateError(f"task {request.task_id} is {task.status}, not taking uploads")
            if task.fed is not None:
                raise InputError(f"task {request.task_id} is federated: data stays with its "
                                 "owners")
            if request.dataset in task.inputs or request.dataset in task.receiving:
                raise StateError(f"dataset {request.dataset!r} was already uploaded")
            seen = schema_fingerprint(schema)
            if seen != ref.fingerprint:
                message = (f"dataset {request.dataset!r}: uploaded schema {seen[:12]} is not the "
                           f"catalogued {ref.fingerprint[:12]}")
                self._fail(task, message)
                raise SchemaMismatch(message)
            task.receiving.add(request.dataset)
            return task

    def receive(self, request: UploadRequest, schema: pa.Schema,
                messages: Iterable[tuple[pa.RecordBatch | None, bytes | None]]) -> dict[str, int]:
        """Take a whole upload or nothing: a broken stream fails the task and wipes it.

        `messages` are (batch, app_metadata) pairs as they arrive. The upload counts
        only if it closes with the sender's end marker giving the same row and batch
        counts: a sender that dies mid-stream looks to Flight like a clean end.
        """
        task = self._begin_upload(request, schema)
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
                    if spill is None and self._reserve(batch.nbytes):
                        held.append(batch)
                    else:  # over the memory budget: the rest of this input goes to disk
                        spill = spill or SealedSpill(schema, self.spill_dir)
                        spill.append(batch)
                    rows += batch.num_rows
                    nbytes += batch.nbytes
                if meta:
                    end = wire.parse_json(meta, "upload end marker")
                if task.status != "waiting":
                    raise StateError(f"task {request.task_id} became {task.status} mid-upload")
            count = len(held) + (spill.count if spill else 0)
            wire.check_end_marker(end, rows, count, request.dataset)
        except BaseException as exc:
            self._release(held, spill)
            self._settle(task)
            with self._lock:
                task.receiving.discard(request.dataset)
                reason = exc if isinstance(exc, TeeflowError) else "stream broken"
                self._fail(task, f"upload of {request.dataset!r} failed after {rows} rows: "
                                 f"{reason}")
            raise
        with self._lock:
            task.receiving.discard(request.dataset)
            if task.status != "waiting":
                self._release(held, spill)
                raise StateError(f"task {request.task_id} is {task.status}; upload dropped")
            task.inputs[request.dataset] = held
            task.schemas[request.dataset] = schema
            if spill is not None:
                task.spills[request.dataset] = spill
            task.received[request.dataset] = {"rows": rows, "bytes": nbytes}
            # Hashed after the transfer, off the upload's path; runs wait for it.
            task.digests[request.dataset] = _Digest(
                _batches_of(held, spill),
                lambda sha256: self._received(task, request.dataset, rows, nbytes, sha256))
        log.info("task %s: received %s (%d rows)", request.task_id, request.dataset, rows)
        return {"rows": rows, "bytes": nbytes}

    def _received(self, task: _Task, dataset: str, rows: int, nbytes: int, sha256: str) -> None:
        with self._lock:
            self._record(task, "received", {"dataset": dataset, "rows": rows, "bytes": nbytes,
                                            "sha256": sha256})

    # -- running -----------------------------------------------------------
    def run(self, task_id: str, background: bool = True) -> str:
        with self._lock:
            task = self._task(task_id)
            if task.status != "waiting" or task.fed is not None:
                return task.status  # a federated task finishes with its last round
            missing = [d.name for d in task.spec.datasets if d.name not in task.inputs]
            if missing:
                raise StateError(f"task {task_id}: still waiting for {missing}")
            task.status = "running"
        if background:
            threading.Thread(target=self._compute, args=(task,), daemon=True).start()
        else:
            self._compute(task)
        return "running"

    def _compute(self, task: _Task) -> None:
        spec = task.spec
        self._settle(task)  # every input's `received` entry is in before the run
        try:
            comp = compute.get(spec.compute)
            comp.check_schemas({d.name: task.schemas[d.name] for d in spec.datasets},
                               task.params)
            if task.spills:  # larger than the memory budget: stream it
                value = self._run_streamed(task, comp)
            else:
                tables = [(d.name, pa.Table.from_batches(task.inputs[d.name],
                                                         task.schemas[d.name]))
                          for d in spec.datasets]
                value = comp.run(tables, task.params)
                del tables
            plaintext, sealed = self._seal_all(task, value)
        except TeeflowError as exc:
            with self._lock:
                self._fail(task, str(exc))
            return
        except Exception as exc:  # never let an inner message leave the enclave
            log.exception("task %s: computation crashed", spec.task_id)
            with self._lock:
                self._fail(task, f"computation {spec.compute} failed ({type(exc).__name__})")
            return
        with self._lock:
            self._wipe(task, "computed")
            if task.status == "running":
                self._done(task, plaintext, sealed)
        log.info("task %s done; inputs wiped", spec.task_id)

    def _run_streamed(self, task: _Task, comp: compute.Computation) -> dict[str, Any]:
        if comp.run_stream is None:
            total = sum(v["bytes"] for v in task.received.values())
            raise ComputeError(f"{comp.name} needs its whole input in memory ({total} bytes), "
                               f"more than the executor's budget of {self.memory_budget} bytes")
        sources = [Source(d.name, task.schemas[d.name], task.received[d.name]["rows"],
                          _batches_of(task.inputs[d.name], task.spills.get(d.name)))
                   for d in task.spec.datasets]
        return comp.run_stream(sources, {**task.params,
                                         "_memory_budget": f"{self.memory_budget}B"})

    def _seal_all(self, task: _Task, value: dict[str, Any]) -> tuple[bytes, dict[str, bytes]]:
        spec = task.spec
        plaintext = wire.canonical({
            "task_id": spec.task_id,
            "compute": spec.compute,
            "code_digest": compute.get(spec.compute).code_digest,
            "spec_digest": spec.digest(),
            "tee": self.backend.tee,
            "simulated": self.simulated,
            "inputs": {k: v["rows"] for k, v in task.received.items()},
            "result": value,
        })
        return plaintext, {r.sign_key: self._envelope(spec, r, plaintext)
                           for r in spec.receivers}

    def _done(self, task: _Task, plaintext: bytes, sealed: dict[str, bytes]) -> None:
        """Caller holds the lock."""
        spec = task.spec
        task.status = "done"
        task.sealed = sealed
        self._record(task, "computed", {
            "compute": spec.compute, "code_digest": compute.get(spec.compute).code_digest,
            "spec_digest": spec.digest(),
            "result_sha256": hashlib.sha256(plaintext).hexdigest(),
            "receivers": sorted(sealed)})

    # -- federated rounds ------------------------------------------------------
    def _federated(self, request: FlRequest, payload: bytes) -> _Task:
        """Authenticate a round message from a dataset's owner."""
        self._take_challenge(request.challenge)
        with self._lock:
            task = self._task(request.task_id)
            ref = task.spec.dataset(request.dataset)
            message = wire.fl_message(request.kind, request.task_id, request.dataset,
                                      request.round, request.challenge, self.tls_spki_hash,
                                      payload)
            verify_signature(ref.owner_key, request.signature, message)
            if task.fed is None:
                raise InputError(f"task {request.task_id} is not federated")
        return task

    def fl_model(self, request: FlRequest) -> dict[str, Any]:
        """The current global model, to a dataset's owner."""
        task = self._federated(request, b"")
        with self._lock:
            fed = task.fed
            assert fed is not None
            return {"round": fed.round, "rounds": fed.rounds, "status": task.status,
                    "weights": None if fed.weights is None else fed.weights.tolist(),
                    "sent": request.dataset in fed.updates}

    def fl_update(self, request: FlRequest, update: dict[str, Any]) -> dict[str, Any]:
        """One owner's update for the current round; the last one closes the round."""
        payload = wire.canonical(update)
        task = self._federated(request, payload)
        with self._lock:
            fed = task.fed
            assert fed is not None
            if task.status != "waiting":
                raise StateError(f"task {request.task_id} is {task.status}")
            if request.round != fed.round:
                raise StateError(f"round {request.round} is not the current round {fed.round}")
            if request.dataset in fed.updates:
                raise StateError(f"{request.dataset!r} already sent round {fed.round}")
            features = update.get("features")
            if fed.features is None:
                if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
                    raise InputError("update needs the list of feature names")
                fed.features = list(features)
            elif features != fed.features:
                raise SchemaMismatch(f"{request.dataset!r} trains on other features")
            n_weights = None if fed.weights is None else fed.weights.size
            checked = federated.check_update(update, n_weights)
            if checked[0].size != len(fed.features) + 1:
                raise InputError("update weights do not match its features")
            fed.updates[request.dataset] = checked
            self._record(task, "received", {
                "dataset": request.dataset, "round": fed.round, "rows": checked[1],
                "sha256": hashlib.sha256(payload).hexdigest()})
            task.received[request.dataset] = {"rows": checked[1], "bytes": len(payload)}
            if len(fed.updates) < len(task.spec.datasets):
                return {"round": fed.round, "closed": False}
            ordered = [fed.updates[d.name] for d in task.spec.datasets]
            fed.weights, loss = federated.aggregate(ordered)
            fed.history.append({"round": fed.round, "loss": loss})
            fed.updates.clear()
            fed.round += 1
            if fed.round < fed.rounds:
                return {"round": fed.round - 1, "closed": True}
            value = federated.result(fed.features, fed.weights, fed.history,
                                     sum(n for _, n, _ in ordered), task.params)
            plaintext, sealed = self._seal_all(task, value)
            self._done(task, plaintext, sealed)
        log.info("task %s: %d federated rounds done", request.task_id, fed.rounds)
        return {"round": fed.round - 1, "closed": True}

    def _envelope(self, spec: wire.TaskSpec, receiver: wire.Receiver, plaintext: bytes) -> bytes:
        """The result sealed to one receiver, signed with the attested key."""
        sealed = seal(plaintext, receiver.enc_key, spec.digest())
        body = {"spec_digest": spec.digest(), "receiver": receiver.sign_key,
                "sealed_sha256": hashlib.sha256(sealed).hexdigest()}
        return wire.canonical({
            "task_id": spec.task_id, "tee": self.backend.tee, "simulated": self.simulated,
            "suite": SUITE_NAME, "sealed": base64.b64encode(sealed).decode(), **body,
            "signer": self.signer,
            "signature": audit.sign_p256(self._tls_key,
                                         audit.signed_payload(spec.task_id, "result", body))})

    def take_result(self, task_id: str, receiver_key: str, challenge: bytes,
                    signature: bytes) -> bytes:
        """A receiver's sealed result, once; when every receiver has it, nothing is left."""
        self._take_challenge(challenge)
        with self._lock:
            task = self._task(task_id)
            if task.spec.receiver(receiver_key) is None:
                raise AuthError(f"this key is not a receiver of task {task_id}")
            message = wire.result_message(task_id, challenge, self.tls_spki_hash)
            verify_signature(receiver_key, signature, message)
            envelope = task.sealed.pop(receiver_key, None)
            if task.status not in ("done", "released") or envelope is None:
                raise StateError(f"task {task_id} is {task.status}; no result to take")
            self._record(task, "released", {"to": receiver_key})
            if not task.sealed:
                task.status = "released"
        return envelope

    def held_bytes(self, task_id: str) -> int:
        """How many input bytes the executor still holds for a task (for tests and audit)."""
        with self._lock:
            task = self._task(task_id)
            return (sum(b.nbytes for batches in task.inputs.values() for b in batches)
                    + sum(s.nbytes for s in task.spills.values()))




class _Digest:
    """SHA-256 over a received dataset's batches (their Arrow IPC encoding), on a thread of
    its own; `done` gets the hex digest. hashlib releases the GIL on large buffers."""

    def __init__(self, batches: Callable[[], Iterator[pa.RecordBatch]],
                 done: Callable[[str], None]) -> None:
        self._thread = threading.Thread(target=self._work, args=(batches, done), daemon=True)
        self._thread.start()

    @staticmethod
    def _work(batches: Callable[[], Iterator[pa.RecordBatch]],
              done: Callable[[str], None]) -> None:
        h = hashlib.sha256()
        for batch in batches():
            # The IPC encoding covers exactly this batch's rows, even for a slice that
            # shares larger buffers (one batch at a time, so the copy stays small).
            h.update(memoryview(batch.serialize()))
        done(h.hexdigest())

    def wait(self) -> None:
        self._thread.join()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()


def _batches_of(held: list[pa.RecordBatch], spill: SealedSpill | None
                ) -> Callable[[], Iterator[pa.RecordBatch]]:
    """A fresh pass over an input: its in-memory batches, then its spilled ones."""
    held = list(held)

    def batches() -> Iterator[pa.RecordBatch]:
        yield from held
        if spill is not None:
            yield from spill.batches()

    return batches
