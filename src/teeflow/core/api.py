"""The scheduler's HTTP API as typed, frozen models: every request body and response.

Shared by the server (scheduler/app.py, which publishes them as its OpenAPI schema) and
its client (net/scheduler_client.py). Pure: pydantic only, no network, no files.

Validation is strict (no coercion: "3" is not 3) and closed (an unknown field is an
error), so what a model accepts is exactly what a signature was made over. Errors name
the field and what was expected, never the value sent (`describe`).
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    TypeAdapter,
    ValidationError,
    model_serializer,
)

from teeflow.core.errors import InputError, PeerError
from teeflow.core.wire import OPTIONAL_FIELDS

AssignmentState = Literal["pending", "started", "uploaded", "failed"]
Role = Literal["owner", "initiator", "executor_host", "auditor"]
ROLES: tuple[str, ...] = ("owner", "initiator", "executor_host", "auditor")
MAX_INVITE = 128


def executor_registration(address: str, node_key: str) -> tuple[str, str, dict[str, str]]:
    """(task id, kind, body) of what an executor signs with its attested (TLS) key to
    register at `address` for the node `node_key` (audit.signed_payload's framing; the
    task id is no task's, so it can never pass for a task's entry)."""
    return ("-executor-registration-", "executor_registration",
            {"address": address, "node_key": node_key})


class Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


# -- the task spec, as JSON (wire.TaskSpec is the checked value; docs/task-spec.md) ---------

class SpecDataset(Model):
    name: str
    owner: str
    owner_key: str
    fingerprint: str
    rules: str | None = None  # digest of the owner's analysis rules; absent when none

    @model_serializer(mode="wrap")
    def _absent_rules(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if data.get("rules") is None:
            data.pop("rules", None)
        return data


class SpecReceiver(Model):
    sign_key: str
    enc_key: str


class TaskSpecBody(Model):
    """A task spec as sent and signed; `wire.TaskSpec.from_dict` checks the rest."""

    version: int
    task_id: str
    compute: str
    code_digest: str
    params: dict[str, str]
    datasets: list[SpecDataset] = Field(min_length=1)
    executor_policy: dict[str, Any]
    receivers: list[SpecReceiver] = Field(min_length=1)
    initiator_key: str
    deadline: int | None = None  # unix seconds; absent, not null, when not given
    nonce: str | None = None  # consent spent once (docs/task-spec.md)
    expires: int | None = None
    runs: int | None = None
    executor_key: str | None = None
    scheduler_key: str | None = None
    pool: int | None = None

    @model_serializer(mode="wrap")
    def _absent_deadline(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        for name in OPTIONAL_FIELDS:
            if data.get(name) is None:  # a spec without one keeps its digest
                data.pop(name, None)
        return data


# -- requests ----------------------------------------------------------------------------------

class RegisterNode(Model):
    name: str = Field(min_length=1, max_length=64)
    public_key: str
    enc_key: str
    invite: str | None = Field(None, max_length=MAX_INVITE)  # one-time token from the operator


class RegisterExecutor(Model):
    """Signed by the executor's attested key (the one its RA-TLS certificate binds) over
    `executor_registration(address, caller)`: the scheduler probes only that address."""

    address: str = Field(min_length=3, max_length=300)
    cert_pem: str = Field(max_length=64 * 1024)
    signature: str = Field(max_length=512)


class AddDataset(Model):
    name: str = Field(min_length=1, max_length=128)
    owner: str
    schema_: str = Field(alias="schema")  # base64 Arrow IPC schema
    rows: int = Field(ge=0)
    rules: dict[str, Any] | None = None  # its analysis rules (core/rules.py), published

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, populate_by_name=True,
                              serialize_by_alias=True)


class SubmitTask(Model):
    spec: TaskSpecBody
    signature: str
    executor: str | None = None
    pool: list[str] | None = Field(None, max_length=16)  # a pool spec's members, by address


class Decision(Model):
    decision: Literal["approved", "rejected"]
    signature: str


class Cancel(Model):
    signature: str  # over wire.cancel_message, for the executor


class Attested(Model):
    body: dict[str, Any]
    signature: str


class Report(Model):
    state: AssignmentState
    rows: int = Field(0, ge=0)
    error: str | None = None
    attested: Attested | None = None
    cancel_signature: str | None = None


# -- responses ---------------------------------------------------------------------------------

class Health(Model):
    ok: bool


class Ok(Model):
    ok: bool


class NodeRegistered(Model):
    name: str
    roles: list[Role]


class Node(Model):
    name: str
    public_key: str
    enc_key: str
    roles: list[Role]
    registered_at: float


class ExecutorRegistered(Model):
    address: str
    tee: str
    measurements: dict[str, str]


class Executor(ExecutorRegistered):
    cert_pem: str
    host: str  # the node that registered it (its executor host)
    registered_at: float


class DatasetAdded(Model):
    name: str
    fingerprint: str


class Dataset(Model):
    name: str
    owner: str
    owner_key: str
    fingerprint: str
    rows: int
    schema_b64: str
    rules: dict[str, Any] | None = None  # the owner's analysis rules, canonical form
    rules_digest: str | None = None  # what a spec's dataset carries as `rules`


class TaskView(Model):
    id: str
    state: str
    compute: str
    params: dict[str, str]
    executor: str
    datasets: list[str]
    spec_digest: str
    error: str | None
    created_at: float
    updated_at: float
    deadline: float | None = None  # unix seconds: past it, a task not yet done is failed
    pool: list[str] = []  # a pool task's members' addresses, the lead (executor) first


class Assignment(Model):
    task_id: str
    dataset: str
    node: str
    state: AssignmentState
    rows: int
    error: str | None
    updated_at: float


class Approval(Model):
    task_id: str
    owner_key: str
    decision: Literal["approved", "rejected"]
    signature: str
    at: float


class Event(Model):
    seq: int
    at: float
    event: str
    detail: dict[str, Any]
    signer: str


class Waiter(Model):
    """One party a task waits for (scheduler/waiting.py): names and times, never data."""

    who: str
    what: str
    since: float
    last_seen: float | None


class Waiting(Model):
    for_: list[Waiter] = Field(alias="for")
    text: str

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, populate_by_name=True,
                              serialize_by_alias=True)


class TaskDetail(TaskView):
    spec: TaskSpecBody
    assignments: list[Assignment]
    approvals: list[Approval]
    events: list[Event]
    waiting: Waiting | None = None  # None once the task is final


class AuditEntry(Model):
    seq: int
    task_id: str
    kind: str
    body: dict[str, Any]
    signer: str
    signature: str
    prev_root: str
    hash: str
    log_signature: str = ""


class LogLeaf(Model):
    """One leaf of the log: the entry itself if the caller may read it, else its hash."""

    seq: int
    hash: str
    entry: AuditEntry | None = None


class LogProof(Model):
    """Hex hashes of an inclusion or consistency proof, with the sizes it is for."""

    size: int
    proof: list[str]
    start: int = 0
    root: str = ""


class Checkpoint(Model):
    """The scheduler's signed checkpoint (C2SP note) and the key that signs it."""

    note: str
    log_key: str
    origin: str


class Cosign(Model):
    """A member's C2SP cosignature line over the checkpoint of tree size `size`."""

    size: int
    line: str


class ApproveWork(Model):
    """A task using this node's data that waits for its decision."""

    kind: Literal["approve"]
    task_id: str
    spec: TaskSpecBody
    spec_digest: str


class UploadWork(Model):
    """An approved task's input this node should stream to the executor."""

    kind: Literal["upload"]
    task_id: str
    dataset: str
    executor: str
    pool: list[str] = []  # a pool task's members, in order: each gets a part of the dataset
    compute: str
    spec: TaskSpecBody
    spec_digest: str
    approvals: list[Approval]


WorkItem = Annotated[ApproveWork | UploadWork, Field(discriminator="kind")]


def work_digest(items: list[dict[str, Any]]) -> str:
    """What a node already holds of its work, as it passes it back on its next long poll
    (`seen`): the scheduler answers when this changes, not while the same items wait (a
    task waiting for a person would otherwise make every poll return at once)."""
    keys = sorted(f"{i.get('kind')} {i.get('task_id')} {i.get('dataset', '')} "
                  f"{i.get('spec_digest')}" for i in items)
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()


# -- validation errors -------------------------------------------------------------------------

def describe(errors: list[Any], skip: tuple[str, ...] = ()) -> str:
    """Which fields were wrong and how; never the values (they may be anyone's data)."""
    parts = []
    for err in errors[:5]:
        loc = [str(p) for p in err.get("loc", ()) if str(p) not in skip]
        parts.append(f"{'.'.join(loc) or 'body'}: {err.get('msg', 'invalid')}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "; ".join(parts) + more


M = TypeVar("M")


def request(model: type[M], data: Any, what: str) -> M:
    """A request model built locally; a bad value is the caller's fault (InputError)."""
    try:
        return TypeAdapter(model).validate_python(data)
    except ValidationError as exc:
        raise InputError(f"{what}: {describe(exc.errors())}") from None


def response(model: Any, data: Any, what: str) -> Any:
    """A peer's answer checked against its model; a mismatch is the peer's fault."""
    try:
        return TypeAdapter(model).validate_python(data)
    except ValidationError as exc:
        raise PeerError(f"{what}: answer does not fit the API: {describe(exc.errors())}") \
            from None
