"""Results: sealed, inside the enclave, to each receiver the signed task names, and
handed to each receiver once, under a signed single-use challenge. When the last
receiver has its envelope, nothing of the result is left here.

Never sends plaintext: only envelopes sealed to a receiver's key leave this module, and
nothing a reader of the audit log can test a guess of the result against. The `computed`
entry commits to the result two ways, neither of which anyone without the result can check:

    result_commitment  SHA-256 of the sealed plaintext, which holds a fresh random 32-byte
                       `salt`: only a receiver (who opened it) has the salt, so hashing
                       guessed results yields nothing; every receiver gets the same
                       plaintext, so each can check it got the one result committed to.
    sealed_sha256      per receiver, SHA-256 of its HPKE ciphertext (random: an ephemeral
                       key), the same value its envelope's signature covers; it ties an
                       envelope served later (re-signed after a restart, see store.py) to
                       the computation that an owner-attested key recorded.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from typing import TYPE_CHECKING, Any

from teeflow import compute
from teeflow.core import wire
from teeflow.core.answers import ResultEnvelope
from teeflow.core.crypto import verify_signature
from teeflow.core.errors import AuthError, NotReleased, StateError
from teeflow.core.seal import SUITE_NAME, seal
from teeflow.executor.challenges import Challenges
from teeflow.executor.notary import Notary
from teeflow.executor.states import RESULT, ResultEvent, TaskEvent
from teeflow.executor.tasks import Task, Tasks
from teeflow.executor.verdicts import released

if TYPE_CHECKING:
    from teeflow.executor.store import ResultStore


class Release:
    def __init__(self, tasks: Tasks, challenges: Challenges, tee: str,
                 store: ResultStore | None = None) -> None:
        self.tasks = tasks
        self.challenges = challenges
        self.tee = tee
        self.store = store

    @property
    def simulated(self) -> bool:
        return self.tee == "simulated"

    def seal_all(self, task: Task, value: dict[str, Any],
                 inputs: dict[str, int] | None = None) -> tuple[bytes, dict[str, bytes]]:
        """The result's plaintext (to commit to, never to send) and its envelope per
        receiver. The plaintext carries a random salt, so its hash reveals nothing."""
        spec = task.spec
        # compact, not canonical: a result may hold NaN (a metric), and nobody re-encodes it
        plaintext = wire.compact_json({
            "task_id": spec.task_id,
            "compute": spec.compute,
            "code_digest": compute.get(spec.compute).code_digest,
            "spec_digest": spec.digest(),
            "tee": self.tee,
            "simulated": self.simulated,
            # a pool's lead holds only its part: it gives the rows over every member
            "inputs": inputs if inputs is not None else
            {k: v["rows"] for k, v in task.received.items()},
            "result": value,
            "salt": secrets.token_hex(32),
        })
        return plaintext, {r.sign_key: self._envelope(spec, r, plaintext)
                           for r in spec.receivers}

    def done(self, task: Task, event: TaskEvent, plaintext: bytes,
             sealed: dict[str, bytes]) -> None:
        """The computation is over (`event`: finish or last-round). Caller holds the lock."""
        spec = task.spec
        task.step(event)
        task.sealed = sealed
        for receiver in sealed:
            task.step_result(receiver, ResultEvent.SEAL)
        self.tasks.record(task, "computed", {
            "compute": spec.compute, "code_digest": compute.get(spec.compute).code_digest,
            "spec_digest": spec.digest(),
            "result_commitment": hashlib.sha256(plaintext).hexdigest(),
            "sealed_sha256": {r: ResultEnvelope.model_validate_json(e).sealed_sha256
                              for r, e in sorted(sealed.items())},
            "receivers": sorted(sealed)})
        if self.store is not None:
            self.store.save(task)

    def _envelope(self, spec: wire.TaskSpec, receiver: wire.Receiver, plaintext: bytes) -> bytes:
        """The result sealed to one receiver, signed with the attested key."""
        return sign_envelope(self.tasks.notary, spec, receiver.sign_key,
                             seal(plaintext, receiver.enc_key, spec.digest()), self.tee)

    def take(self, task_id: str, receiver_key: str, challenge: bytes,
             signature: bytes) -> bytes:
        """A receiver's sealed result, once; when every receiver has it, nothing is left."""
        with self.tasks.lock:
            task = self.tasks.get(task_id, receiver_key)  # spec digest, or an unambiguous id
            task_id = task.spec.task_id
            if task.spec.receiver(receiver_key) is None:
                raise AuthError(f"this key is not a receiver of task {task_id}")
        # spent also when the answer is NotReleased: a receiver asking again early must not
        # use up the few challenges its key may hold outstanding
        self.challenges.take(challenge, task.digest, receiver_key)
        with self.tasks.lock:
            if not released(task):
                raise NotReleased(f"task {task_id}: its scheduler has not released the "
                                  "result yet")
            message = wire.result_message(task_id, challenge, self.tasks.notary.tls_spki_hash)
            verify_signature(receiver_key, signature, message)
            if not RESULT.allows(task.results[receiver_key], ResultEvent.TAKE):
                raise StateError(f"task {task_id} is {task.status}; no result to take")
            envelope = task.sealed.pop(receiver_key)
            task.step_result(receiver_key, ResultEvent.TAKE)
            task.step(TaskEvent.TAKE if task.sealed else TaskEvent.CLOSE)
            self.tasks.record(task, "released", {"to": receiver_key})
            if self.store is not None:
                self.store.save(task)
        return envelope


def sign_envelope(notary: Notary, spec: wire.TaskSpec, receiver_key: str, sealed: bytes,
                  tee: str) -> bytes:
    """An envelope for a sealed result: the ciphertext and the attested key's signature
    over (spec_digest, receiver, sealed_sha256). Also used to re-sign a stored ciphertext,
    unchanged, with a restarted executor's new key."""
    body = {"spec_digest": spec.digest(), "receiver": receiver_key,
            "sealed_sha256": hashlib.sha256(sealed).hexdigest()}
    return wire.canonical(ResultEnvelope(
        task_id=spec.task_id, tee=tee, simulated=tee == "simulated", suite=SUITE_NAME,
        sealed=base64.b64encode(sealed).decode(), **body, signer=notary.signer,
        signature=notary.sign(spec.task_id, "result", body)).model_dump())
