"""What an executor answers over Flight, as typed, frozen models: its catalog, a task's
status and a receiver's result envelope.

The executor builds them; the scheduler, the providers and the receivers decode them once,
with `decode`, so a broken or hostile executor is a named PeerError, never a KeyError deep in
the caller. (The requests an executor takes are in `teeflow.executor.messages`.) Pure.
"""

from __future__ import annotations

import json
from typing import Any, Literal, TypeVar

from pydantic import Field

from teeflow.core.api import Model, response
from teeflow.core.errors import PeerError

MAX_ANSWER = 16 * 1024 * 1024
TaskStatusName = Literal["waiting", "running", "done", "failed", "released", "cancelled"]
A = TypeVar("A", bound=Model)


class CatalogParam(Model):
    name: str
    type: str
    required: bool
    default: Any = None
    help: str
    min: float | None = None
    min_exclusive: bool | None = None
    max: float | None = None
    max_exclusive: bool | None = None
    choices: list[str] | None = None


class Isolation(Model):
    """What the user-code sandbox gives on this executor (``executor.sandbox.jail``)."""

    level: Literal["full", "incomplete"]
    pieces: dict[str, bool]
    missing: list[str]
    executor_dumpable: bool | None = None


class CatalogEntry(Model):
    """One computation an executor runs, with the digest of the code that runs it."""

    name: str
    description: str
    layout: Literal["rows", "columns", "any", "federated"]
    min_datasets: int = Field(ge=1)
    params: list[CatalogParam]
    # the parameters an owner's approval rule must bind (provider/consent.py)
    revealing: list[str] = Field(default_factory=list)
    code_digest: str = Field(pattern=r"^[0-9a-f]{64}$")
    model_params: dict[str, list[CatalogParam]] | None = None  # vertical's models
    isolation: Isolation | None = None  # user_code's sandbox, as this executor probed it


class Catalog(Model):
    """Everything an executor runs (the `catalog` action)."""

    computations: list[CatalogEntry]


class ExecutorEntry(Model):
    """An audit entry the executor signed with its attested key."""

    kind: str
    body: dict[str, Any]
    signer: str
    signature: str


class TaskStatus(Model):
    """A task's state on the executor: counts and names, never a value of the data."""

    task_id: str
    status: TaskStatusName
    error: str | None
    expected: list[str]
    received: dict[str, dict[str, int]]
    receiving: list[str]
    inputs_held: list[str]
    spilled: dict[str, int]
    digesting: list[str]
    simulated: bool
    taken_by: list[str]
    audit: list[ExecutorEntry]
    run: int = 1  # which run of the spec (a scheduler's abort or release names it)
    granted: bool = False  # the spec's scheduler let the result out


class ResultEnvelope(Model):
    """A result sealed (HPKE) to one receiver, and the executor's signature over
    (spec_digest, receiver, sealed_sha256) with its attested key."""

    task_id: str
    tee: str
    simulated: bool
    suite: str
    sealed: str  # base64 of the HPKE ciphertext
    spec_digest: str
    receiver: str
    sealed_sha256: str
    signer: str
    signature: str

    def signed_body(self) -> dict[str, str]:
        return {"spec_digest": self.spec_digest, "receiver": self.receiver,
                "sealed_sha256": self.sealed_sha256}


class GlobalModel(Model):
    """A federated task's global model, to one of its owners (`fl-model`)."""

    round: int = Field(ge=0)
    rounds: int = Field(ge=1)
    status: TaskStatusName
    weights: list[float] | None
    sent: bool


class RoundReceipt(Model):
    """What the executor says of an owner's update (`fl-update`)."""

    round: int = Field(ge=0)
    closed: bool


def decode(model: type[A], data: bytes | str, what: str) -> A:
    """An executor's JSON answer as `model`; PeerError naming the field if it does not fit."""
    if len(data) > MAX_ANSWER:
        raise PeerError(f"{what}: answer larger than {MAX_ANSWER} bytes")
    try:
        raw = json.loads(data)
    except (ValueError, RecursionError):
        raise PeerError(f"{what}: answer is not JSON") from None
    decoded: A = response(model, raw, what)
    return decoded
