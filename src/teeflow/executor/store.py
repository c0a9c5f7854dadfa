"""Finished results on disk, so a restarted executor still serves them to their receivers.

Never writes plaintext or a key: only what already left, or may leave, the enclave (the
spec, row counts, signed audit entries) and each receiver's HPKE ciphertext. Under Gramine
the state dir is on the encrypted mount (sealed to this enclave's measurement), so only
the measured code can have written what a later start reads.

Layout, one file per finished task, replaced atomically (write, fsync, rename):

    <state_dir>/results/<spec digest>.json
        {"version": 1, "spec": {...}, "status": "done", "expires_at": <unix seconds>,
         "received": {dataset: {"rows", "bytes"}}, "audit": [signed entries],
         "sealed": {receiver sign key: base64 ciphertext, for those not yet taken},
         "taken": [receiver sign keys]}

A file goes when its last receiver took its envelope, when the task is cancelled, and
when it expires (`ttl`, 7 days by default; checked at start and before every take).

A restart makes a new attested TLS key inside the TEE, and the old one is gone, so no
receiver could trust an envelope signed by it (that key's attestation is not the one it
appraises now). So at load the executor re-signs each stored ciphertext, unchanged, with
its new key: the envelope signs (spec_digest, receiver, sealed_sha256) anew, and a
`restored` entry, signed by the new key, names the previous signer and each ciphertext's
SHA-256. A receiver (sdk/client.py) then checks two things: the envelope is signed by the
executor it appraises now, and its ciphertext's hash and its opened plaintext's
commitment are the ones in the `computed` entry that an owner-attested key signed. The
second check is what makes a re-signed envelope trustworthy where the disk is not sealed
to the enclave (simulated, or a TDX/SEV-SNP VM without an encrypted disk): a host that
plants a ciphertext of its own making gets it re-signed, but cannot match the computed
entry's commitment to a salted plaintext it never saw. A load also refuses (and removes)
a file whose ciphertexts do not hash to its own computed entry, or whose computation is
not the code this executor runs.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from teeflow import compute
from teeflow.core import wire
from teeflow.core.answers import ResultEnvelope
from teeflow.core.errors import TeeflowError
from teeflow.executor.release import sign_envelope
from teeflow.executor.states import RESULT, ResultEvent, ResultState, TaskState
from teeflow.executor.tasks import Task, Tasks

log = logging.getLogger("teeflow.executor")

VERSION = 1
DEFAULT_TTL = 7 * 24 * 3600.0
MAX_FILE = 1 << 30  # a result file larger than this is not read


class ResultStore:
    """The finished tasks of one executor's state dir. Callers hold `tasks.lock` around
    `save` and `forget`; `load` runs once, before the executor serves."""

    def __init__(self, state_dir: str | Path, ttl: float = DEFAULT_TTL,
                 wall: Callable[[], float] = time.time) -> None:
        self.dir = Path(state_dir) / "results"
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.ttl = ttl
        self.wall = wall
        self._expires: dict[str, float] = {}  # task id -> unix time its results go

    def _path(self, digest: str) -> Path:
        """One file per task, named by its spec digest (two tasks may share an id)."""
        if len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
            raise ValueError("a task's state file is named by its spec digest")
        return self.dir / f"{digest}.json"

    # -- writing ---------------------------------------------------------------------
    def save(self, task: Task) -> None:
        """Keep a finished task's untaken envelopes; drop the file once none is left."""
        digest = task.spec.digest()
        if task.status != TaskState.DONE or not task.sealed:
            self.forget(digest)
            return
        expires = self._expires.setdefault(digest, self.wall() + self.ttl)
        sealed = {r: ResultEnvelope.model_validate_json(e).sealed
                  for r, e in sorted(task.sealed.items())}
        record = {"version": VERSION, "spec": task.spec.to_dict(), "status": str(task.status),
                  "expires_at": expires, "received": task.received, "audit": task.audit,
                  "sealed": sealed, "run": task.run, "granted": task.granted,
                  "taken": sorted(r for r, s in task.results.items() if s == ResultState.TAKEN)}
        _write_atomically(self._path(digest), json.dumps(record).encode())

    def forget(self, digest: str) -> None:
        self._expires.pop(digest, None)
        self._path(digest).unlink(missing_ok=True)

    def expired(self) -> list[str]:
        """Spec digests of the tasks whose results are past their expiry now."""
        now = self.wall()
        return [t for t, at in self._expires.items() if at <= now]

    # -- reading, once at start --------------------------------------------------------
    def load(self, tasks: Tasks, tee: str) -> dict[str, int]:
        """Hold every stored, unexpired task again, its envelopes re-signed with this
        run's key. Returns counts (restored, expired, refused) for the start's record."""
        counts = {"restored": 0, "expired": 0, "refused": 0}
        for stale in self.dir.glob(".tmp-*"):  # a write a kill cut short
            stale.unlink(missing_ok=True)
        for path in sorted(self.dir.glob("*.json")):
            try:
                record = _read(path)
                if record["expires_at"] <= self.wall():
                    counts["expired"] += 1
                    path.unlink(missing_ok=True)
                    continue
                task = self._restore(record, tasks, tee)
            except (TeeflowError, ValueError, KeyError, TypeError, OSError) as exc:
                log.warning("state file %s not restored (%s); removed", path.name,
                            type(exc).__name__)
                counts["refused"] += 1
                path.unlink(missing_ok=True)
                continue
            self._expires[task.spec.digest()] = float(record["expires_at"])
            tasks.adopt(task)
            counts["restored"] += 1
        return counts

    def _restore(self, record: dict[str, Any], tasks: Tasks, tee: str) -> Task:
        if record["version"] != VERSION or record["status"] != str(TaskState.DONE):
            raise ValueError("unknown state record")
        spec = wire.TaskSpec.from_dict(record["spec"])
        comp = compute.get(spec.compute)
        if spec.code_digest != comp.code_digest:
            raise ValueError("computed by other code")
        computed = [e for e in record["audit"] if e["kind"] == "computed"]
        if len(computed) != 1:
            raise ValueError("no computed entry")
        committed = computed[0]["body"]["sealed_sha256"]
        taken = set(record["taken"])
        # under analysis rules the query was checked against them at create-task; the
        # plain output policy of check_params does not apply to it
        check = comp.check_params if not any(d.rules for d in spec.datasets) else (
            comp.precheck_params or comp.check_params)
        task = Task(spec=spec, params=check(dict(spec.params)),
                    status=TaskState.DONE, received=record["received"],
                    audit=list(record["audit"]), digest=spec.digest(),
                    run=int(record.get("run", 1)), granted=record.get("granted") is True)
        restored = {}
        for receiver in spec.receivers:
            key = receiver.sign_key
            if key in taken:
                task.results[key] = ResultState(RESULT.next_state(
                    RESULT.next_state(RESULT.initial, ResultEvent.SEAL), ResultEvent.TAKE))
                continue
            sealed = base64.b64decode(record["sealed"][key], validate=True)
            digest = hashlib.sha256(sealed).hexdigest()
            if committed.get(key) != digest:
                raise ValueError("a ciphertext is not the one committed to")
            task.sealed[key] = sign_envelope(tasks.notary, spec, key, sealed, tee)
            task.results[key] = ResultState(RESULT.next_state(RESULT.initial,
                                                              ResultEvent.SEAL))
            restored[key] = digest
        if not restored:
            raise ValueError("nothing left to serve")
        tasks.record(task, "restored", {"spec_digest": spec.digest(),
                                        "previous_signer": computed[0]["signer"],
                                        "sealed_sha256": restored})
        return task


def _read(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        data = f.read(MAX_FILE + 1)
    if len(data) > MAX_FILE:
        raise ValueError("state file too large")
    record = json.loads(data)
    if not isinstance(record, dict):
        raise ValueError("state file is not an object")
    return record


def _write_atomically(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
