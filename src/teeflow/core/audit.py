"""The audit log: an append-only, hash-chained record of every step of every task.

Pure: building entries, signing payloads, and verifying a whole chain offline.

Each entry is {seq, task_id, kind, body, signer, signature, prev_hash, hash} where
hash = SHA-256(prev_hash || canonical({seq, task_id, kind, body, signer, signature})).
Who signs which kind:
- `submitted`: the initiator (ed25519); body holds the spec and its digest.
- `approved` / `rejected`: a dataset owner (ed25519); body {spec_digest}. The same
  signature is what the executor checks before it accepts a batch.
- `attested`: a provider (ed25519); body: the executor's TLS key hash and the claims
  it appraised.
- `received`, `computed`, `released`, `wiped`: the executor (ecdsa-p256, its TLS key,
  whose hash an owner's `attested` entry of the same task vouches for).
- scheduler bookkeeping (`accepted`, `running`, `failed`, `cancelled`): unsigned
  (signer "scheduler"); the chain still covers them.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from teeflow.core.crypto import verify_signature
from teeflow.core.errors import AuthError, TeeflowError
from teeflow.core.wire import canonical

GENESIS = "0" * 64
SCHEDULER = "scheduler"
OWNER_KINDS = ("approved", "rejected")
EXECUTOR_KINDS = ("admitted", "received", "computed", "released", "wiped")


class AuditError(TeeflowError):
    """The chain or a signature in it does not verify; `seq` names the first bad entry."""

    code = "audit"

    def __init__(self, seq: int, message: str) -> None:
        super().__init__(f"entry {seq}: {message}")
        self.seq = seq


def signed_payload(task_id: str, kind: str, body: Mapping[str, Any]) -> bytes:
    """What the signer of an entry signs."""
    return b"teeflow-audit-v1\x00" + canonical({"task_id": task_id, "kind": kind,
                                                "body": dict(body)})


def ed25519_signer(public_key_b64: str) -> str:
    return f"ed25519:{public_key_b64}"


def p256_signer(spki_der: bytes) -> str:
    return f"p256:{base64.b64encode(spki_der).decode()}"


def sign_p256(key: ec.EllipticCurvePrivateKey, payload: bytes) -> str:
    return base64.b64encode(key.sign(payload, ec.ECDSA(hashes.SHA256()))).decode()


def p256_key_hash(signer: str) -> str:
    """SHA-256 (hex) of the executor's SubjectPublicKeyInfo named by a p256 signer."""
    return hashlib.sha256(base64.b64decode(signer.removeprefix("p256:"))).hexdigest()


def verify_entry_signature(task_id: str, kind: str, body: Mapping[str, Any], signer: str,
                           signature: str) -> None:
    payload = signed_payload(task_id, kind, body)
    try:
        sig = base64.b64decode(signature, validate=True)
    except ValueError as exc:
        raise AuthError("signature is not base64") from exc
    if signer.startswith("ed25519:"):
        verify_signature(signer.removeprefix("ed25519:"), sig, payload)
    elif signer.startswith("p256:"):
        try:
            key = serialization.load_der_public_key(base64.b64decode(signer[5:]))
            if not isinstance(key, ec.EllipticCurvePublicKey):
                raise AuthError("p256 signer is not an EC key")
            key.verify(sig, payload, ec.ECDSA(hashes.SHA256()))
        except (ValueError, InvalidSignature) as exc:
            raise AuthError("executor signature does not verify") from exc
    else:
        raise AuthError(f"unknown signer type {signer.split(':')[0]!r}")


@dataclass(frozen=True)
class Entry:
    seq: int
    task_id: str
    kind: str
    body: dict[str, Any]
    signer: str
    signature: str
    prev_hash: str
    hash: str

    def to_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "task_id": self.task_id, "kind": self.kind, "body": self.body,
                "signer": self.signer, "signature": self.signature,
                "prev_hash": self.prev_hash, "hash": self.hash}


def entry_hash(prev_hash: str, seq: int, task_id: str, kind: str, body: Mapping[str, Any],
               signer: str, signature: str) -> str:
    content = canonical({"seq": seq, "task_id": task_id, "kind": kind, "body": dict(body),
                         "signer": signer, "signature": signature})
    return hashlib.sha256(bytes.fromhex(prev_hash) + content).hexdigest()


def chain(prev: Entry | None, task_id: str, kind: str, body: Mapping[str, Any],
          signer: str = SCHEDULER, signature: str = "") -> Entry:
    """The next entry after `prev` (None for the first)."""
    seq = 1 if prev is None else prev.seq + 1
    prev_hash = GENESIS if prev is None else prev.hash
    return Entry(seq, task_id, kind, dict(body), signer, signature, prev_hash,
                 entry_hash(prev_hash, seq, task_id, kind, body, signer, signature))


def verify_chain(entries: Iterable[Entry]) -> int:
    """Check every link and every signature; return how many entries were checked.

    Raises AuditError naming the first entry that is out of place, altered, or
    signed by someone who had no business signing it.
    """
    prev_hash, expected_seq, count = GENESIS, 1, 0
    owners: dict[str, set[str]] = {}      # task -> owner keys (from the submitted spec)
    initiators: dict[str, str] = {}
    executors: dict[str, set[str]] = {}   # task -> executor key hashes owners attested
    for e in entries:
        if e.seq != expected_seq:
            raise AuditError(e.seq, f"expected entry {expected_seq} (an entry is missing)")
        if e.prev_hash != prev_hash:
            raise AuditError(e.seq, "does not follow the previous entry (chain broken)")
        if entry_hash(e.prev_hash, e.seq, e.task_id, e.kind, e.body, e.signer,
                      e.signature) != e.hash:
            raise AuditError(e.seq, "content does not match its hash (edited)")
        _check_signer(e, owners, initiators, executors)
        prev_hash, expected_seq, count = e.hash, e.seq + 1, count + 1
    return count


def _check_signer(e: Entry, owners: dict[str, set[str]], initiators: dict[str, str],
                  executors: dict[str, set[str]]) -> None:
    if e.signer == SCHEDULER:
        if e.kind in ("submitted", "attested", *OWNER_KINDS, *EXECUTOR_KINDS):
            raise AuditError(e.seq, f"a {e.kind} entry must be signed by a party")
        return
    try:
        verify_entry_signature(e.task_id, e.kind, e.body, e.signer, e.signature)
    except AuthError as exc:
        raise AuditError(e.seq, f"{e.kind} signature: {exc}") from None
    if e.kind == "submitted":
        spec = e.body.get("spec", {})
        initiators[e.task_id] = e.signer
        owners[e.task_id] = {ed25519_signer(d.get("owner_key", ""))
                             for d in spec.get("datasets", [])}
        if spec.get("initiator_key") and ed25519_signer(spec["initiator_key"]) != e.signer:
            raise AuditError(e.seq, "submitted by a key that is not the spec's initiator")
    elif e.kind in (*OWNER_KINDS, "attested"):
        if e.signer not in owners.get(e.task_id, set()):
            raise AuditError(e.seq, f"{e.kind} signed by a key that owns no dataset of the task")
        if e.kind == "attested":
            executors.setdefault(e.task_id, set()).add(str(e.body.get("tls_key_sha256")))
    elif e.kind in EXECUTOR_KINDS:
        if p256_key_hash(e.signer) not in executors.get(e.task_id, set()):
            raise AuditError(e.seq, f"{e.kind} signed by an executor key no owner attested")
