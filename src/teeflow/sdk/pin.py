"""A result is taken only for the spec this party signed: the checks, pure (records, the
scheduler's task row, the executor's claims and envelope in; the pinned spec out, or a
ResultMismatch naming what differs: task, spec digest, executor, executor evidence or
executor key). The scheduler's word is never what a result is checked against.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from teeflow.attestation.evidence import Claims
from teeflow.core import wire
from teeflow.core.errors import InputError, ResultMismatch
from teeflow.files.signed_specs import SignedSpec


@dataclass(frozen=True)
class Pin:
    """What a result must match: from this node's record, or a digest the user gives."""

    task_id: str
    spec_digest: str
    executor: str = ""
    tee: str = ""
    measurements: dict[str, str] = field(default_factory=dict)


def _short(text: str) -> str:
    return text[:16]


def pin_for(task_id: str, records: Sequence[SignedSpec], digest: str | None = None) -> Pin:
    """The pin for `task_id`: the one spec this key signed for it, or the `digest` given
    (with what the record knows of it, if it is one this key signed)."""
    if digest is not None:
        if len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
            raise InputError("digest: a SHA-256 in lower-case hex (64 characters)")
        records = [r for r in records if r.spec_digest == digest]
        if not records:
            return Pin(task_id, digest)
    if not records:
        raise ResultMismatch("task", f"this key signed no spec for task {task_id[:64]!r}; "
                                     "give the digest you signed (teeflow result --digest)")
    if len({r.spec_digest for r in records}) > 1:
        raise ResultMismatch("task", f"this key signed several specs named {task_id[:64]!r}; "
                                     "give the digest of the one you mean (--digest)")
    r = records[0]
    return Pin(r.task_id, r.spec_digest, r.executor, r.tee, dict(r.measurements))


def check_task(pin: Pin, task: dict[str, Any]) -> wire.TaskSpec:
    """The scheduler's task row against the pin; the spec, which hashes to the pinned
    digest (so its executor key, receivers and task id are the ones signed)."""
    said = str(task.get("spec_digest", ""))
    if said != pin.spec_digest:
        raise ResultMismatch("spec digest", f"the scheduler says task {pin.task_id} has spec "
                                            f"{_short(said)}, you signed {_short(pin.spec_digest)}")
    spec = wire.TaskSpec.from_dict(task.get("spec", {}))
    if spec.digest() != pin.spec_digest:
        raise ResultMismatch("spec digest", f"the spec the scheduler gives for task "
                                            f"{pin.task_id} does not hash to the one you signed")
    if spec.task_id != pin.task_id:
        raise ResultMismatch("task", f"you asked for task {pin.task_id}, the spec you signed is "
                                     f"task {spec.task_id}")
    if pin.executor and task.get("executor") != pin.executor:
        raise ResultMismatch("executor", f"the scheduler points task {pin.task_id} at executor "
                                         f"{str(task.get('executor'))[:100]}, you chose "
                                         f"{pin.executor}")
    return spec


def check_claims(pin: Pin, claims: Claims) -> None:
    """The executor serving the result now measures what the one appraised at submission
    did (its key may be new: a restart makes one; see executor/store.py)."""
    if pin.tee and (claims.tee != pin.tee or dict(claims.measurements) != pin.measurements):
        raise ResultMismatch("executor evidence", f"the executor serving task {pin.task_id} "
                                                  f"is {claims.tee} {_digests(claims.measurements)}"
                                                  f", you chose {pin.tee} "
                                                  f"{_digests(pin.measurements)}")


def _digests(measurements: dict[str, str]) -> str:
    return ",".join(f"{k}={_short(v)}" for k, v in sorted(measurements.items()))


def check_envelope(pin: Pin, task_id: str, spec_digest: str) -> None:
    """The envelope (signed by the attested key) names the pinned task and digest."""
    if task_id != pin.task_id:
        raise ResultMismatch("task", f"the result is for task {task_id[:64]}, you asked for "
                                     f"{pin.task_id}")
    if spec_digest != pin.spec_digest:
        raise ResultMismatch("spec digest", f"the result is sealed for spec "
                                            f"{_short(spec_digest)}, you signed "
                                            f"{_short(pin.spec_digest)}")


def check_executor_key(spec: wire.TaskSpec, computed_keys: Sequence[str]) -> None:
    """Some `computed` entry is signed by the executor key the signed spec names."""
    if spec.executor_key is not None and spec.executor_key not in computed_keys:
        raise ResultMismatch("executor key", f"no computed entry of task {spec.task_id} is "
                                             f"signed by executor key "
                                             f"{_short(spec.executor_key)} that you signed for")
