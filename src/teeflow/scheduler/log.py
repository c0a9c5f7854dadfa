"""The scheduler's side of the transparency log: signed checkpoints of the store's tree,
with the cosignatures members sent, and the headers every answer carries.

Every answer of the API carries `Teeflow-Checkpoint` (base64 of the signed note) and
`Teeflow-Log-Key` (the log's Ed25519 key); a request that names the tree size its
sender holds (`Teeflow-Log-Size`) also gets `Teeflow-Log-Proof`, the consistency proof
from that size to the checkpoint's, computed from the same state. So a node checks the
log on every contact at no extra round trip (net/scheduler_client.py).
"""

from __future__ import annotations

import base64
import threading

from teeflow.core import checkpoint as ck
from teeflow.core.checkpoint import CHECKPOINT_HEADER, KEY_HEADER, PROOF_HEADER, origin_of
from teeflow.core.errors import InputError, NoteError
from teeflow.scheduler.store import Store


class LogServer:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.log_key = store.log_signer.public_key()
        self.origin = origin_of(self.log_key)
        self._cache: tuple[int, bytes, str] | None = None
        self._lock = threading.Lock()

    def sign(self, size: int, root: bytes) -> str:
        """The signed note for (size, root), cached for the newest one."""
        with self._lock:
            if self._cache and self._cache[:2] == (size, root):
                return self._cache[2]
            note = ck.sign_checkpoint(ck.Checkpoint(self.origin, size, root), self.origin,
                                      self.store.log_signer)
            self._cache = (size, root, note)
            return note

    def head(self, since: int | None = None) -> tuple[str, list[bytes] | None]:
        size, root, proof = self.store.log_head(since)
        return self.sign(size, root), proof

    def headers(self, since_header: str | None) -> dict[str, str]:
        since = int(since_header) if since_header and since_header.isdigit() and \
            len(since_header) < 20 else None
        note, proof = self.head(since)
        out = {CHECKPOINT_HEADER: base64.b64encode(note.encode()).decode(),
               KEY_HEADER: self.log_key}
        if proof is not None:
            out[PROOF_HEADER] = ck.encode_proof(proof)
        return out

    def cosigned(self) -> str:
        """The newest checkpoint with every cosignature members sent for it."""
        size, root, _ = self.store.log_head()
        lines = [c["line"] for c in self.store.cosignatures(size, root)]
        return self.sign(size, root) + "".join(lines)

    def cosign(self, size: int, line: str, public_key: str, name: str) -> None:
        """Keep a member's cosignature of the checkpoint of `size`, if it verifies."""
        if not 0 < size <= self.store.log_head()[0]:
            raise InputError(f"size: no checkpoint of size {size} in this log")
        root = self.store.log_root(size)
        try:
            sig = ck.parse_signature_line(line)
            if sig.name != name:
                raise InputError(f"line: a cosignature under this node's name {name!r}")
            ck.verify_cosignature(ck.Checkpoint(self.origin, size, root), sig, public_key)
        except NoteError as exc:
            raise InputError(f"line: {exc}") from None
        self.store.add_cosignature(size, root, public_key, sig.line())
