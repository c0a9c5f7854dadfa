"""Federated rounds: each owner trains on its own data and sends only its update; the
executor averages a round once every owner's update is in (DP-FedAvg if the owners asked:
clipped and noised), and seals the model after the last round; with `final_only` it hands
out no model between rounds and averages once, at the end. Every round message is signed
by the dataset's owner under a single-use challenge. No owner's update is ever handed to anyone.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

from teeflow.compute import federated
from teeflow.core import wire
from teeflow.core.crypto import verify_signature
from teeflow.core.errors import InputError, SchemaMismatch, StateError
from teeflow.executor.challenges import Challenges
from teeflow.executor.messages import FlRequest
from teeflow.executor.release import Release
from teeflow.executor.states import (
    TASK,
    RoundEvent,
    TaskEvent,
    after_close,
    round_event,
)
from teeflow.executor.tasks import Fed, Task, Tasks

log = logging.getLogger("teeflow.executor")


class Rounds:
    def __init__(self, tasks: Tasks, challenges: Challenges, release: Release) -> None:
        self.tasks = tasks
        self.challenges = challenges
        self.release = release

    def _authenticate(self, request: FlRequest, payload: bytes) -> tuple[Task, Fed]:
        """Authenticate a round message from a dataset's owner."""
        with self.tasks.lock:
            task = self.tasks.get(request.ref)
            ref = task.spec.dataset(request.dataset)
        self.challenges.take(request.challenge, task.digest, ref.owner_key)
        with self.tasks.lock:
            message = wire.fl_message(request.kind, task.spec.task_id, request.dataset,
                                      request.round, request.challenge,
                                      self.tasks.notary.tls_spki_hash, payload)
            verify_signature(ref.owner_key, request.signature, message)
            if task.fed is None:
                raise InputError(f"task {request.task_id} is not federated")
            return task, task.fed

    def model(self, request: FlRequest) -> dict[str, Any]:
        """The current global model, to a dataset's owner."""
        task, fed = self._authenticate(request, b"")
        with self.tasks.lock:
            # final_only: no global model until the end, and then only to the receivers
            shown = None if task.params.get("final_only") else fed.weights
            return {"round": fed.round, "rounds": fed.rounds, "status": str(task.status),
                    "weights": None if shown is None else shown.tolist(),
                    "sent": request.dataset in fed.updates}

    def update(self, request: FlRequest, update: dict[str, Any]) -> dict[str, Any]:
        """One owner's update for the current round; the last one closes the round."""
        payload = wire.canonical(update)
        task, fed = self._authenticate(request, payload)
        with self.tasks.lock:
            if not TASK.allows(task.status, TaskEvent.ROUND):
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
            self.tasks.record(task, "received", {
                "dataset": request.dataset, "round": fed.round, "rows": checked[1],
                "sha256": hashlib.sha256(payload).hexdigest()})
            task.received[request.dataset] = {"rows": checked[1], "bytes": len(payload)}
            if round_event(fed.updates, (d.name for d in task.spec.datasets)) == \
                    RoundEvent.UPDATE:
                fed.step(RoundEvent.UPDATE)
                return {"round": fed.round, "closed": False}
            ordered = [fed.updates[d.name] for d in task.spec.datasets]
            closed = fed.round
            next_event = after_close(closed, fed.rounds)
            if task.params.get("final_only") and next_event == RoundEvent.OPEN:
                # one-shot averaging: nothing is averaged (or shown) until the last round
                loss: float | None = federated.aggregate(ordered)[1]
            else:
                fed.weights, loss = federated.aggregate(ordered, task.params, fed.weights)
            fed.step(RoundEvent.CLOSE)
            noised = federated.privacy_note(task.params) is not None
            fed.history.append({"round": fed.round} if noised or loss is None
                               else {"round": fed.round, "loss": loss})
            fed.updates.clear()
            fed.step(next_event)
            fed.round += 1
            if next_event == RoundEvent.OPEN:
                return {"round": closed, "closed": True}
            assert fed.weights is not None
            value = federated.result(fed.features, fed.weights, fed.history,
                                     sum(n for _, n, _ in ordered), task.params)
            plaintext, sealed = self.release.seal_all(task, value)
            self.release.done(task, TaskEvent.LAST_ROUND, plaintext, sealed)
        log.info("task %s: %d federated rounds done", request.task_id, fed.rounds)
        return {"round": closed, "closed": True}
