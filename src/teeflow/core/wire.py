"""Typed wire models with one canonical encoding: the JSON Canonicalization Scheme (JCS,
RFC 8785) for everything signed or hashed.

JCS has no NaN or infinity and keeps integers to what an IEEE double holds exactly; such a
value in content to be signed is refused with an InputError naming where it is, never what
it is (it may be derived from data).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

import rfc8785

from teeflow.core.errors import InputError

MAX_MESSAGE = 1024 * 1024
MAX_SAFE_INTEGER = 2**53 - 1  # RFC 8785 / I-JSON (RFC 7493): integers a double holds exactly


def _refuse_unrepresentable(obj: Any, path: str) -> None:
    """InputError naming the first value, by its path, that JCS cannot encode."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise InputError(f"{path}: NaN or infinity cannot be signed (RFC 8785 JSON)")
    elif isinstance(obj, int):
        if abs(obj) > MAX_SAFE_INTEGER:
            raise InputError(f"{path}: integer beyond +/-(2**53 - 1) cannot be signed "
                             "(RFC 8785 JSON)")
    elif isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, str):
                raise InputError(f"{path}: an object key that is not a string")
            _refuse_unrepresentable(value, f"{path}.{key}")
    elif isinstance(obj, list | tuple):
        for i, value in enumerate(obj):
            _refuse_unrepresentable(value, f"{path}[{i}]")
    else:
        raise InputError(f"{path}: a {type(obj).__name__} is not JSON")


def canonical(obj: Any) -> bytes:
    """RFC 8785 (JCS) bytes of a JSON value: what every signature and digest is taken over."""
    _refuse_unrepresentable(obj, "$")
    try:
        return rfc8785.dumps(obj)
    except rfc8785.CanonicalizationError as exc:  # e.g. a lone surrogate in a string
        raise InputError(f"not representable in RFC 8785 JSON: {type(exc).__name__}") from None


def compact_json(obj: Any) -> bytes:
    """Sorted-key compact JSON that is neither signed nor re-encoded to be checked, so may
    hold NaN or infinity (written as Python's json writes them), e.g. a result's metrics.
    Not canonical: never sign or compare what this returns."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def jcs_int(text: str) -> int | float:
    """A JSON integer as JCS means it: a double. Exact beyond 2**53 only as a float (JCS
    writes a float such as 1e17 without an exponent, which json.loads would make an int)."""
    value = int(text)
    return value if abs(value) <= MAX_SAFE_INTEGER else float(value)


def loads(data: bytes | str) -> Any:
    """JSON as canonical() writes it back: integers beyond 2**53 become the doubles they are."""
    return json.loads(data, parse_int=jcs_int)


def parse_json(data: bytes, what: str) -> dict[str, Any]:
    if len(data) > MAX_MESSAGE:
        raise InputError(f"{what}: larger than {MAX_MESSAGE} bytes")
    try:
        body = loads(data)
    except (ValueError, RecursionError) as exc:
        raise InputError(f"{what}: not JSON") from exc
    if not isinstance(body, dict):
        raise InputError(f"{what}: expected a JSON object")
    return body


def _field(body: dict[str, Any], name: str, kind: type, what: str) -> Any:
    value = body.get(name)
    if not isinstance(value, kind):
        raise InputError(f"{what}: field {name!r} missing or not {kind.__name__}")
    return value


@dataclass(frozen=True)
class DatasetRef:
    """One input of a task: which dataset, whose, the schema it must have, and the digest of
    its owner's analysis rules (core/rules.py) if it has any."""

    name: str
    owner: str
    owner_key: str
    fingerprint: str
    rules: str | None = None

    def to_dict(self) -> dict[str, Any]:
        body = {"name": self.name, "owner": self.owner, "owner_key": self.owner_key,
                "fingerprint": self.fingerprint}
        if self.rules is not None:  # absent, not null: specs without rules keep their digest
            body["rules"] = self.rules
        return body

    @classmethod
    def from_dict(cls, body: dict[str, Any]) -> DatasetRef:
        w = "dataset"
        rules = body.get("rules")
        if "rules" in body and not isinstance(rules, str):
            raise InputError("dataset: field 'rules' must be a digest string")
        return cls(_field(body, "name", str, w), _field(body, "owner", str, w),
                   _field(body, "owner_key", str, w), _field(body, "fingerprint", str, w),
                   rules)


@dataclass(frozen=True)
class Receiver:
    """Who may open the result: a signing key (to take it) and an X25519 key (to open it)."""

    sign_key: str
    enc_key: str

    def to_dict(self) -> dict[str, str]:
        return {"sign_key": self.sign_key, "enc_key": self.enc_key}


SPEC_VERSION = 1
OPTIONAL_FIELDS = ("deadline", "nonce", "expires", "runs", "executor_key", "scheduler_key",
                   "pool")
MAX_RUNS = 1000
MAX_POOL = 16  # executors in one pool (executor/pool/)


def _is_hex(text: Any, low: int, high: int) -> bool:
    return (isinstance(text, str) and low <= len(text) <= high and len(text) % 2 == 0
            and all(c in "0123456789abcdef" for c in text))


def _check_consent_fields(body: dict[str, Any]) -> None:
    """The consent fields, where present: InputError names the field, never its value."""
    if "nonce" in body and not _is_hex(body["nonce"], 32, 64):
        raise InputError("task spec: nonce must be 16 to 32 random bytes in lower-case hex")
    expires = body.get("expires")
    if "expires" in body and (type(expires) is not int or not 0 < expires <= MAX_SAFE_INTEGER):
        raise InputError("task spec: expires must be a positive integer (unix seconds)")
    runs = body.get("runs")
    if "runs" in body and (type(runs) is not int or not 1 <= runs <= MAX_RUNS):
        raise InputError(f"task spec: runs must be a whole number from 1 to {MAX_RUNS}")
    if "executor_key" in body and not _is_hex(body["executor_key"], 64, 64):
        raise InputError("task spec: executor_key must be a SHA-256 in lower-case hex")
    key = body.get("scheduler_key")
    if "scheduler_key" in body and not (isinstance(key, str) and len(key) == 44):
        raise InputError("task spec: scheduler_key must be a base64 Ed25519 public key")
    pool = body.get("pool")
    if "pool" in body and (type(pool) is not int or not 2 <= pool <= MAX_POOL):
        raise InputError(f"task spec: pool must be a whole number from 2 to {MAX_POOL}")
    if "pool" in body and "executor_key" in body:
        raise InputError("task spec: a pool spec names no single executor_key")


@dataclass(frozen=True)
class TaskSpec:
    """The task every owner signs. See docs/task-spec.md for the canonical encoding.

    Its SHA-256 digest over that encoding commits to the computation and its code,
    the parameters, each input (owner key, name, schema), the executors allowed to
    run it and who receives the result.
    """

    task_id: str
    compute: str
    code_digest: str
    params: dict[str, str]
    datasets: tuple[DatasetRef, ...]
    executor_policy: dict[str, Any]
    receivers: tuple[Receiver, ...]
    initiator_key: str
    version: int = SPEC_VERSION
    deadline: int | None = None  # unix seconds; absent: the executor's default
    # consent spent once (docs/task-spec.md): a fresh random nonce, when the consent lapses
    # (unix seconds), how many runs it allows (absent: 1), and the one executor it is for
    # (SHA-256 of its attested TLS key, as the initiator appraised it)
    nonce: str | None = None
    expires: int | None = None
    runs: int | None = None
    executor_key: str | None = None
    # the scheduler's signing key (base64 Ed25519), whose signed word the executor takes to
    # end the task (abort) or to hand its result out (release): the owners sign which
    # scheduler decides, so the scheduler and the executor cannot disagree on the outcome
    scheduler_key: str | None = None
    # how many executors the task runs across (executor/pool/): each holds a part of every
    # input and must meet executor_policy; absent: one executor
    pool: int | None = None

    @property
    def run_limit(self) -> int:
        """How many runs the owners' consent allows (1 unless the spec says)."""
        return 1 if self.runs is None else self.runs

    def to_dict(self) -> dict[str, Any]:
        body = {"version": self.version, "task_id": self.task_id, "compute": self.compute,
                "code_digest": self.code_digest, "params": dict(self.params),
                "datasets": [d.to_dict() for d in self.datasets],
                "executor_policy": self.executor_policy,
                "receivers": [r.to_dict() for r in self.receivers],
                "initiator_key": self.initiator_key}
        # absent, not null: older specs keep their digest
        for name in OPTIONAL_FIELDS:
            if getattr(self, name) is not None:
                body[name] = getattr(self, name)
        return body

    def encode(self) -> bytes:
        return canonical(self.to_dict())

    def digest(self) -> str:
        return hashlib.sha256(self.encode()).hexdigest()

    def dataset(self, name: str) -> DatasetRef:
        for d in self.datasets:
            if d.name == name:
                return d
        raise InputError(f"dataset {name!r} is not an input of task {self.task_id}")

    def owner_keys(self) -> list[str]:
        """Each distinct owner key once, in dataset order."""
        return list(dict.fromkeys(d.owner_key for d in self.datasets))

    def receiver(self, sign_key: str) -> Receiver | None:
        return next((r for r in self.receivers if r.sign_key == sign_key), None)

    @classmethod
    def from_dict(cls, body: dict[str, Any]) -> TaskSpec:
        w = "task spec"
        if not isinstance(body, dict):
            raise InputError("task spec: expected a JSON object")
        if type(body.get("version")) is not int or body["version"] != SPEC_VERSION:
            raise InputError(f"task spec: version must be {SPEC_VERSION}")
        params = _field(body, "params", dict, w)
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in params.items()):
            raise InputError("task spec: params must map strings to strings")
        raw_sets = _field(body, "datasets", list, w)
        if not raw_sets or not all(isinstance(d, dict) for d in raw_sets):
            raise InputError("task spec: datasets must be a non-empty list of objects")
        datasets = tuple(DatasetRef.from_dict(d) for d in raw_sets)
        if len({d.name for d in datasets}) != len(datasets):
            raise InputError("task spec: a dataset is named twice")
        raw_recv = _field(body, "receivers", list, w)
        if not raw_recv or not all(isinstance(r, dict) for r in raw_recv):
            raise InputError("task spec: receivers must be a non-empty list of objects")
        receivers = tuple(Receiver(_field(r, "sign_key", str, "receiver"),
                                   _field(r, "enc_key", str, "receiver")) for r in raw_recv)
        task_id = _field(body, "task_id", str, w)
        if not 8 <= len(task_id) <= 64 or not task_id.isalnum():
            raise InputError("task spec: task_id must be 8 to 64 letters or digits")
        deadline = body.get("deadline")
        if "deadline" in body and (type(deadline) is not int
                                   or not 0 < deadline <= MAX_SAFE_INTEGER):
            raise InputError("task spec: deadline must be a positive integer (unix seconds)")
        _check_consent_fields(body)
        spec = cls(task_id, _field(body, "compute", str, w), _field(body, "code_digest", str, w),
                   params, datasets, _field(body, "executor_policy", dict, w), receivers,
                   _field(body, "initiator_key", str, w), deadline=deadline,
                   nonce=body.get("nonce"), expires=body.get("expires"), runs=body.get("runs"),
                   executor_key=body.get("executor_key"),
                   scheduler_key=body.get("scheduler_key"), pool=body.get("pool"))
        if spec.to_dict() != body:
            raise InputError("task spec: unknown or extra fields")
        return spec

    @classmethod
    def decode(cls, data: bytes) -> TaskSpec:
        return cls.from_dict(parse_json(data, "task spec"))


def upload_message(task_id: str, dataset: str, challenge: bytes, executor_key: bytes,
                   pool: list[str] | None = None) -> bytes:
    """What a provider signs to upload: binds task, dataset, a fresh challenge, the TLS key
    and, for a pool task, every member's attested TLS key in pool order (so a member takes
    a part only for the pool it is in itself, executor/pool/)."""
    body: dict[str, Any] = {"task_id": task_id, "dataset": dataset,
                            "challenge": challenge.hex(), "executor_key": executor_key.hex()}
    if pool is not None:
        body["pool"] = list(pool)
    return b"teeflow-upload-v1\x00" + canonical(body)


def challenge_message(task_id: str, executor_key: bytes, at: int) -> bytes:
    """What a task's owner or receiver signs to be issued a challenge (`at`: unix seconds,
    so a request is good for a short while only; `executor_key`: for this TEE only)."""
    return b"teeflow-challenge-v1\x00" + canonical(
        {"task_id": task_id, "executor_key": executor_key.hex(), "at": at})


def result_message(task_id: str, challenge: bytes, executor_key: bytes) -> bytes:
    """What a receiver signs to take the sealed result."""
    return b"teeflow-result-v1\x00" + canonical(
        {"task_id": task_id, "challenge": challenge.hex(), "executor_key": executor_key.hex()})


def fl_message(kind: str, task_id: str, dataset: str, round_: int, challenge: bytes,
               executor_key: bytes, payload: bytes) -> bytes:
    """What an owner signs to take part in a federated round (`payload`: the update)."""
    return b"teeflow-fl-v1\x00" + canonical(
        {"kind": kind, "task_id": task_id, "dataset": dataset, "round": round_,
         "challenge": challenge.hex(), "executor_key": executor_key.hex(),
         "payload_sha256": hashlib.sha256(payload).hexdigest()})


def cancel_message(task_id: str) -> bytes:
    """What the initiator or an owner signs to stop a task (repeating it is harmless)."""
    return b"teeflow-cancel-v1\x00" + task_id.encode()


def abort_message(spec_digest: str, run: int) -> bytes:
    """What the scheduler named in a spec signs to end a run of it at the executor (it
    failed or was cancelled there): `run` so that a replay cannot end a later run."""
    return b"teeflow-abort-v1\x00" + canonical({"spec_digest": spec_digest, "run": run})


def release_message(spec_digest: str, run: int) -> bytes:
    """What the scheduler named in a spec signs, once it has recorded the release, to let
    the executor hand the sealed result of that run to its receivers."""
    return b"teeflow-release-v1\x00" + canonical({"spec_digest": spec_digest, "run": run})


def end_marker(rows: int, batches: int) -> bytes:
    """What a sender puts after its last batch."""
    return canonical({"end": True, "rows": rows, "batches": batches})


def check_end_marker(end: dict[str, Any] | None, rows: int, batches: int, dataset: str) -> None:
    if end is None:
        raise InputError(f"dataset {dataset!r}: upload ended after {rows} rows without its end "
                         "marker (sender died or stream cut)")
    if end.get("end") is not True or end.get("rows") != rows or end.get("batches") != batches:
        raise InputError(f"dataset {dataset!r}: end marker says {end.get('rows')} rows in "
                         f"{end.get('batches')} batches, received {rows} in {batches}")
