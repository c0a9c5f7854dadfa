"""A node's view of the scheduler's transparency log: the newest checkpoint it has seen,
and the check every answer of the scheduler goes through.

Each answer carries the scheduler's signed checkpoint and the consistency proof from the
tree size this node sent (scheduler/log.py). The node accepts the checkpoint only if it
is signed by the log key it saw first, and the proof shows the new tree contains the one
it held; else LogInconsistent, and the node goes no further. A log the scheduler's
operator rewrote, truncated, reordered or forked is caught this way by any node that
saw a head from before.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable

from teeflow.core import checkpoint as ck
from teeflow.core import tlog
from teeflow.core.checkpoint import decode_proof, origin_of
from teeflow.core.errors import LogError, LogInconsistent
from teeflow.files.checkpoints import CheckpointFile

# fetch(old size, new size) -> the scheduler's consistency proof between them
Fetch = Callable[[int, int], list[bytes]]


class LogView:
    def __init__(self, file: CheckpointFile | None = None) -> None:
        self.file = file
        self.log_key: str | None = None
        self.note: str | None = None
        self.held: ck.Checkpoint | None = None
        self._lock = threading.RLock()
        loaded = file.load() if file is not None else None
        if loaded is not None:
            key, note = loaded
            try:
                self.held = ck.open_checkpoint(note, origin_of(key), key)
            except LogError as exc:
                raise LogInconsistent(f"checkpoint file {file.path if file else ''}: "
                                      f"{exc}") from None
            self.log_key, self.note = key, note

    @property
    def origin(self) -> str | None:
        return origin_of(self.log_key) if self.log_key else None

    def snapshot(self) -> ck.Checkpoint | None:
        with self._lock:
            return self.held

    def open(self, note: str, key: str) -> ck.Checkpoint:
        """A checkpoint signed by the log key this node trusts (the first one it saw)."""
        with self._lock:
            if self.log_key is not None and key != self.log_key:
                raise LogInconsistent("the scheduler's checkpoint is signed by another log "
                                      "key than the one this node saw first")
        try:
            return ck.open_checkpoint(note, origin_of(key), key)
        except (LogError, ValueError) as exc:
            raise LogInconsistent(f"the scheduler's checkpoint does not verify: {exc}") \
                from None

    def observe(self, note_b64: str | None, key: str | None, proof_b64: str | None,
                sent: ck.Checkpoint | None, fetch: Fetch) -> ck.Checkpoint:
        """Check one answer's checkpoint against what this node held when it asked."""
        if not note_b64 or not key:
            raise LogInconsistent("the scheduler's answer carries no signed checkpoint")
        try:
            note = base64.b64decode(note_b64, validate=True).decode()
        except (ValueError, UnicodeDecodeError):
            raise LogInconsistent("the scheduler's checkpoint header is not base64") from None
        cp = self.open(note, key)
        if sent is not None:
            if cp.size < sent.size:
                raise LogInconsistent(f"the log shrank from {sent.size} to {cp.size} entries "
                                      "(truncated or rolled back)")
            if proof_b64 is None:
                raise LogInconsistent("the scheduler sent no consistency proof from the "
                                      f"checkpoint of size {sent.size} this node holds")
            try:
                proof = decode_proof(proof_b64)
            except LogError as exc:
                raise LogInconsistent(f"the scheduler's consistency proof: {exc}") from None
            self._consistent(sent, cp, proof)
        with self._lock:
            cur = self.held
            if cur is not None and cur != sent:  # another answer moved it meanwhile
                self._reconcile(cur, cp, fetch)
            if cur is None or cp.size > cur.size:
                self.held, self.note, self.log_key = cp, note, key
                if self.file is not None:
                    self.file.save(key, note)
        return cp

    @staticmethod
    def _consistent(old: ck.Checkpoint, new: ck.Checkpoint, proof: list[bytes]) -> None:
        try:
            tlog.verify_consistency(old.size, new.size, old.root, new.root, proof)
        except LogError as exc:
            raise LogInconsistent(f"the scheduler's log (size {new.size}) is not an "
                                  f"extension of the checkpoint of size {old.size} this node "
                                  f"holds: {exc}") from None

    def _reconcile(self, a: ck.Checkpoint, b: ck.Checkpoint, fetch: Fetch) -> None:
        """Two checkpoints of the same log must be one the prefix of the other."""
        old, new = (a, b) if a.size <= b.size else (b, a)
        if old.size == new.size:
            if old.root != new.root:
                raise LogInconsistent(f"two different trees of size {old.size}: the "
                                      "scheduler shows different logs (a fork)")
            return
        try:
            proof = fetch(old.size, new.size)
        except LogError as exc:
            raise LogInconsistent(f"the scheduler cannot prove size {old.size} consistent "
                                  f"with size {new.size}: {exc}") from None
        self._consistent(old, new, proof)

    def compare(self, note: str, fetch: Fetch) -> ck.Checkpoint:
        """Check another party's checkpoint (passed on out of band) against this node's:
        both of this log, and one a prefix of the other; else LogInconsistent (a fork)."""
        with self._lock:
            key, held = self.log_key, self.held
        if key is None or held is None:
            raise LogInconsistent("this node holds no checkpoint to compare with")
        other = self.open(note, key)
        self._reconcile(held, other, fetch)
        return other
