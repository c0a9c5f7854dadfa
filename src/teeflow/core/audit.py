"""The audit log: an append-only Merkle log (RFC 9162 shape, core/tlog.py) of every step
of every task. Pure: building entries, signing payloads, verifying a log offline.

Each entry is {seq, task_id, kind, body, signer, signature, prev_root, hash,
log_signature}. `seq` is 1-based; the entry is leaf `seq - 1` of the tree. `prev_root`
is the root of the tree of size seq - 1 that the entry extends; `hash` is its RFC 9162
leaf hash over `leaf_data` (seq, task, kind, body, signer, signature, prev_root), and
`log_signature` is the scheduler's Ed25519 signature over the same, so each entry is
pinned to its index and to the tree before it. The scheduler signs checkpoints of the
tree (core/checkpoint.py); a party that holds one can prove any rewrite of what it
covers. Who signs which kind:
- `submitted`: the initiator (ed25519); body holds the spec and its digest.
- `approved` / `rejected`: a dataset owner (ed25519); body {spec_digest}. The same
  signature is what the executor checks before it accepts a batch.
- `attested`: a provider (ed25519); body: the executor's TLS key hash and the claims
  it appraised.
- `received`, `computed`, `released`, `wiped`: the executor (ecdsa-p256, its TLS key,
  whose hash an owner's `attested` entry of the same task vouches for).
- scheduler bookkeeping (`accepted`, `running`, `failed`, `cancelled`): no party's
  signature (signer "scheduler"); the log signature and the tree still cover them.
A party's own signature covers the entry's content; its place in the log is fixed by
the tree, the log signature and the checkpoints the parties hold. A provider also signs
the log head it holds into its `attested` entry (body `log`: size, root), so that entry
is pinned after that tree by the party's own key, whatever the scheduler re-signs.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from teeflow.core import tlog
from teeflow.core.crypto import Signer, verify_signature
from teeflow.core.errors import AuthError, TeeflowError
from teeflow.core.wire import canonical

LEAF_PREFIX = b"teeflow-audit-leaf-v1\x00"
SCHEDULER = "scheduler"
OWNER_KINDS = ("approved", "rejected")
EXECUTOR_KINDS = ("admitted", "received", "computed", "released", "wiped", "aborted")


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
    prev_root: str
    hash: str
    log_signature: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "task_id": self.task_id, "kind": self.kind, "body": self.body,
                "signer": self.signer, "signature": self.signature,
                "prev_root": self.prev_root, "hash": self.hash,
                "log_signature": self.log_signature}

    def leaf_data(self) -> bytes:
        return leaf_data(self.seq, self.task_id, self.kind, self.body, self.signer,
                         self.signature, self.prev_root)


def leaf_data(seq: int, task_id: str, kind: str, body: Mapping[str, Any], signer: str,
              signature: str, prev_root: str) -> bytes:
    """The bytes the tree hashes as this entry's leaf and the scheduler signs."""
    return LEAF_PREFIX + canonical({"seq": seq, "task_id": task_id, "kind": kind,
                                    "body": dict(body), "signer": signer,
                                    "signature": signature, "prev_root": prev_root})


def chain(log: Sequence[Entry] | tlog.Tree, task_id: str, kind: str,
          body: Mapping[str, Any], signer: str = SCHEDULER, signature: str = "",
          log_signer: Signer | None = None) -> Entry:
    """The entry that extends `log` (the entries so far, or their tree); signed by
    `log_signer` (the scheduler's log key) when given."""
    tree = log if isinstance(log, tlog.Tree) else tree_of(log)
    seq, prev_root = len(tree) + 1, tree.root().hex()
    data = leaf_data(seq, task_id, kind, body, signer, signature, prev_root)
    log_sig = "" if log_signer is None else \
        base64.b64encode(log_signer.sign(data)).decode()
    return Entry(seq, task_id, kind, dict(body), signer, signature, prev_root,
                 tlog.leaf_hash(data).hex(), log_sig)


def tree_of(entries: Iterable[Entry]) -> tlog.Tree:
    """The tree over entries' stated leaf hashes (verify_chain checks they are right)."""
    return tlog.Tree([bytes.fromhex(e.hash) for e in entries])


def check_entry(e: Entry, log_key: str | None) -> None:
    """The entry's content matches its leaf hash, and (with `log_key`) the scheduler
    signed it at this index over this previous tree."""
    data = e.leaf_data()
    if tlog.leaf_hash(data).hex() != e.hash:
        raise AuditError(e.seq, "content does not match its hash (edited)")
    if log_key is not None:
        try:
            verify_signature(log_key, base64.b64decode(e.log_signature, validate=True), data)
        except (AuthError, ValueError):
            raise AuditError(e.seq, "the scheduler's log signature over its index and "
                                    "previous tree does not verify") from None


def verify_entries(entries: Iterable[Entry], log_key: str | None = None) -> int:
    """Check each entry by itself (hash, log signature, who signed it), in order, for a
    subset of the log such as one party's tasks; return how many."""
    owners: dict[str, set[str]] = {}
    initiators: dict[str, str] = {}
    executors: dict[str, set[str]] = {}
    count = 0
    for e in entries:
        check_entry(e, log_key)
        _check_signer(e, owners, initiators, executors)
        count += 1
    return count


def verify_chain(entries: Iterable[Entry], log_key: str | None = None) -> int:
    """Check a whole log: consecutive indices, each entry extending the tree before it,
    every hash and signature (the scheduler's too, with `log_key`); return the count.

    Raises AuditError naming the first entry that is out of place, altered, or
    signed by someone who had no business signing it. A log rewritten from some point
    on and re-signed by the scheduler's key passes this; only a checkpoint held from
    before the rewrite shows it (the consistency proof fails).
    """
    tree = tlog.Tree()
    owners: dict[str, set[str]] = {}
    initiators: dict[str, str] = {}
    executors: dict[str, set[str]] = {}
    agreeing: set[str] = set()  # tasks whose spec names a scheduler key
    granted: set[str] = set()  # ... and whose release that scheduler recorded
    for e in entries:
        expected = len(tree) + 1
        if e.seq != expected:
            raise AuditError(e.seq, f"expected entry {expected} (an entry is missing)")
        if e.prev_root != tree.root().hex():
            raise AuditError(e.seq, "does not extend the tree before it (reordered, "
                                    "inserted or re-chained)")
        check_entry(e, log_key)
        _check_signer(e, owners, initiators, executors)
        _check_release(e, agreeing, granted)
        anchor = log_anchor(e)
        if anchor is not None and (anchor[0] > len(tree) or tree.root(anchor[0]) != anchor[1]):
            raise AuditError(e.seq, f"its signer saw a log of size {anchor[0]} that is not "
                                    "this log's prefix (entries before it removed, moved "
                                    "or rewritten)")
        tree.append(bytes.fromhex(e.hash))
    return len(tree)


def log_anchor(e: Entry) -> tuple[int, bytes] | None:
    """(size, root) of the log head a party signed into its entry's body (`log`), if any;
    AuditError if it is malformed. Only party-signed entries count."""
    if e.signer == SCHEDULER or "log" not in e.body:
        return None
    a = e.body["log"]
    try:
        size, root = a["size"], bytes.fromhex(a["root"])
        if not isinstance(size, int) or size < 0 or len(root) != 32:
            raise ValueError
    except (TypeError, KeyError, ValueError):
        raise AuditError(e.seq, "log: needs size and a 32-byte hex root") from None
    return size, root


def _check_release(e: Entry, agreeing: set[str], granted: set[str]) -> None:
    """A result of a spec that names its scheduler leaves only after that scheduler
    recorded `release-granted` (executor/verdicts.py)."""
    if e.kind == "submitted" and isinstance(e.body.get("spec"), dict) and \
            e.body["spec"].get("scheduler_key"):
        agreeing.add(e.task_id)
    elif e.kind == "release-granted" and e.signer == SCHEDULER:
        granted.add(e.task_id)
    elif e.kind == "released" and e.task_id in agreeing and e.task_id not in granted:
        raise AuditError(e.seq, "a result released with no release-granted entry before it")


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
