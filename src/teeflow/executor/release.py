"""Results: sealed, inside the enclave, to each receiver the signed task names, and
handed to each receiver once, under a signed single-use challenge. When the last
receiver has its envelope, nothing of the result is left here.

Never sends plaintext: only envelopes sealed to a receiver's key leave this module.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

from teeflow import compute
from teeflow.core import wire
from teeflow.core.answers import ResultEnvelope
from teeflow.core.crypto import verify_signature
from teeflow.core.errors import AuthError, StateError
from teeflow.core.seal import SUITE_NAME, seal
from teeflow.executor.challenges import Challenges
from teeflow.executor.states import RESULT, ResultEvent, TaskEvent
from teeflow.executor.tasks import Task, Tasks


class Release:
    def __init__(self, tasks: Tasks, challenges: Challenges, tee: str) -> None:
        self.tasks = tasks
        self.challenges = challenges
        self.tee = tee

    @property
    def simulated(self) -> bool:
        return self.tee == "simulated"

    def seal_all(self, task: Task, value: dict[str, Any]) -> tuple[bytes, dict[str, bytes]]:
        """The result's plaintext (to hash, never to send) and its envelope per receiver."""
        spec = task.spec
        # compact, not canonical: a result may hold NaN (a metric), and nobody re-encodes it
        plaintext = wire.compact_json({
            "task_id": spec.task_id,
            "compute": spec.compute,
            "code_digest": compute.get(spec.compute).code_digest,
            "spec_digest": spec.digest(),
            "tee": self.tee,
            "simulated": self.simulated,
            "inputs": {k: v["rows"] for k, v in task.received.items()},
            "result": value,
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
            "result_sha256": hashlib.sha256(plaintext).hexdigest(),
            "receivers": sorted(sealed)})

    def _envelope(self, spec: wire.TaskSpec, receiver: wire.Receiver, plaintext: bytes) -> bytes:
        """The result sealed to one receiver, signed with the attested key."""
        sealed = seal(plaintext, receiver.enc_key, spec.digest())
        body = {"spec_digest": spec.digest(), "receiver": receiver.sign_key,
                "sealed_sha256": hashlib.sha256(sealed).hexdigest()}
        notary = self.tasks.notary
        return wire.canonical(ResultEnvelope(
            task_id=spec.task_id, tee=self.tee, simulated=self.simulated, suite=SUITE_NAME,
            sealed=base64.b64encode(sealed).decode(), **body, signer=notary.signer,
            signature=notary.sign(spec.task_id, "result", body)).model_dump())

    def take(self, task_id: str, receiver_key: str, challenge: bytes,
             signature: bytes) -> bytes:
        """A receiver's sealed result, once; when every receiver has it, nothing is left."""
        with self.tasks.lock:
            task = self.tasks.get(task_id, receiver_key)  # spec digest, or an unambiguous id
            task_id = task.spec.task_id
            if task.spec.receiver(receiver_key) is None:
                raise AuthError(f"this key is not a receiver of task {task_id}")
        self.challenges.take(challenge, task.digest, receiver_key)
        with self.tasks.lock:
            message = wire.result_message(task_id, challenge, self.tasks.notary.tls_spki_hash)
            verify_signature(receiver_key, signature, message)
            if not RESULT.allows(task.results[receiver_key], ResultEvent.TAKE):
                raise StateError(f"task {task_id} is {task.status}; no result to take")
            envelope = task.sealed.pop(receiver_key)
            task.step_result(receiver_key, ResultEvent.TAKE)
            task.step(TaskEvent.TAKE if task.sealed else TaskEvent.CLOSE)
            self.tasks.record(task, "released", {"to": receiver_key})
        return envelope
