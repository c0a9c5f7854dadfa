"""The executor's Flight request bodies, as frozen typed models, decoded once at the edge.

Every body is capped (`wire.parse_json`) before it is parsed. A wrong type, a missing
or an unknown field is an `InputError` naming the message and the field; the value sent
is never echoed back (it may come from anyone, and errors reach other parties' logs).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    ValidationError,
)

from teeflow.core import wire
from teeflow.core.errors import InputError

MAX_REPORTED = 3  # validation errors named in one message
KEYWORD_ONLY = frozenset({"spec_digest"})  # optional fields, never given by position


def _hex(value: object) -> bytes:
    if isinstance(value, bytes):  # built in Python, not decoded from JSON
        return value
    if not isinstance(value, str):
        raise ValueError("must be a hex string")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise ValueError("must be a hex string") from None


HexBytes = Annotated[bytes, PlainValidator(_hex), PlainSerializer(bytes.hex, return_type=str)]


def _where(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc) or "body"


class Message(BaseModel):
    """A Flight body. Positional construction follows the field order (as a dataclass)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)
    KIND: ClassVar[str] = "message"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        positional = [f for f in type(self).model_fields if f not in KEYWORD_ONLY]
        if len(args) > len(positional):
            raise TypeError(f"{type(self).__name__}: too many arguments")
        super().__init__(**dict(zip(positional, args, strict=False)), **kwargs)

    @classmethod
    def decode(cls, data: bytes) -> Self:
        """The model from a JSON body, capped before it is read."""
        return cls.parse(wire.parse_json(data, cls.KIND))

    @classmethod
    def parse(cls, body: dict[str, Any]) -> Self:
        try:
            return cls.model_validate(body)
        except ValidationError as exc:
            # Not chained: the foreign error carries the values sent.
            raise InputError(f"{cls.KIND}: {_describe(exc)}") from None


_SAYS = {
    "missing": "is missing",
    "extra_forbidden": "is not a known field",
    "string_type": "must be a string",
    "int_type": "must be an integer",
    "dict_type": "must be an object",
    "list_type": "must be a list",
    "model_type": "must be an object",
}


def _describe(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    named = []
    for error in errors[:MAX_REPORTED]:
        kind = error["type"]
        if kind == "value_error":  # our own validators' messages, which name no value
            what = error["msg"].removeprefix("Value error, ")
        else:
            what = _SAYS.get(kind, f"is not valid ({kind})")
        named.append(f"field {_where(error['loc'])!r} {what}")
    more = len(errors) - MAX_REPORTED
    return "; ".join(named) + (f"; and {more} more" if more > 0 else "")


class _TaskMessage(Message):
    """A body about one task: named by its spec digest (the executor's id for it), or by
    its task id alone where that is unambiguous on this executor. Each subclass declares
    `task_id` and `spec_digest` (keyword-only)."""

    @property
    def ref(self) -> str:
        fields = self.__dict__
        return str(fields.get("spec_digest") or fields["task_id"])


class UploadRequest(_TaskMessage):
    """The do_put descriptor: which input, under a signed single-use challenge."""

    KIND: ClassVar[str] = "upload request"
    task_id: str
    dataset: str
    challenge: HexBytes
    signature: HexBytes
    spec_digest: str | None = None


class ChallengeRequest(_TaskMessage):
    """Ask for a challenge for `key` (an owner or receiver of the task) to sign."""

    KIND: ClassVar[str] = "challenge request"
    task_id: str
    key: str
    at: int
    signature: HexBytes  # by `key`, over wire.challenge_message
    spec_digest: str | None = None


FlKind = Literal["fl-model", "fl-update"]


class FlRequest(_TaskMessage):
    """The signed part of a federated-round call, as the executor checks it."""

    KIND: ClassVar[str] = "federated request"
    kind: FlKind
    task_id: str
    dataset: str
    round: int
    challenge: HexBytes
    signature: HexBytes
    spec_digest: str | None = None


class _FlCall(Message):
    task_id: str
    dataset: str
    round: int
    challenge: HexBytes
    signature: HexBytes
    spec_digest: str | None = None

    def request(self) -> FlRequest:
        kind: FlKind = "fl-update" if isinstance(self, FlUpdate) else "fl-model"
        return FlRequest(kind=kind, task_id=self.task_id, dataset=self.dataset,
                         round=self.round, challenge=self.challenge, signature=self.signature,
                         spec_digest=self.spec_digest)


class FlModel(_FlCall):
    """The fl-model body: an owner asks for the current global model."""

    KIND: ClassVar[str] = "fl-model"


class FlUpdate(_FlCall):
    """The fl-update body: an owner's update for the current round."""

    KIND: ClassVar[str] = "fl-update"
    update: dict[str, Any]


class Approval(Message):
    """One owner's signature on the spec digest, as the scheduler relays it."""

    KIND: ClassVar[str] = "approval"
    signer: str
    signature: str


class PoolMember(Message):
    """One member of a pool task: where it serves and its attested TLS key's SHA-256."""

    KIND: ClassVar[str] = "pool member"
    address: str = Field(min_length=3, max_length=300)
    key: str = Field(pattern="^[0-9a-f]{64}$")


class PoolEvidence(Message):
    """A pool member asks another for its pool certificate and evidence for a nonce."""

    KIND: ClassVar[str] = "pool-evidence"
    spec_digest: str = Field(pattern="^[0-9a-f]{64}$")
    nonce: HexBytes


class PoolJoin(Message):
    """The lead calls a member into its Dask scheduler, signed with its pool key."""

    KIND: ClassVar[str] = "pool-join"
    spec_digest: str = Field(pattern="^[0-9a-f]{64}$")
    scheduler: str = Field(max_length=256)
    signature: HexBytes


class CreateTask(Message):
    """A spec, every owner's approval and, optionally, the catalogued schemas (base64 IPC)."""

    KIND: ClassVar[str] = "create-task"
    spec: dict[str, Any]
    approvals: list[Approval]
    schemas: dict[str, str] = {}
    rules: dict[str, dict[str, Any]] = {}  # analysis rules of the datasets that have any
    initiator_signature: str | None = None  # its signature on the spec, as the scheduler got it
    pool: list[PoolMember] = Field(default=[], max_length=16)  # a pool spec's members, in order


class ResultRequest(_TaskMessage):
    """A receiver asks for its sealed result, under a signed single-use challenge."""

    KIND: ClassVar[str] = "result request"
    task_id: str
    receiver: str
    challenge: HexBytes
    signature: HexBytes
    spec_digest: str | None = None


class CancelRequest(_TaskMessage):
    """The initiator or an owner cancels a task."""

    KIND: ClassVar[str] = "cancel"
    task_id: str
    key: str
    signature: HexBytes
    spec_digest: str | None = None


class RegistrationRequest(Message):
    """The executor host's operator asks for this executor's signed registration."""

    KIND: ClassVar[str] = "registration request"
    address: str
    node_key: str

    def checked(self) -> RegistrationRequest:
        from teeflow.core.crypto import check_public_key
        from teeflow.core.errors import AuthError
        from teeflow.net.executor_client import parse_address

        try:
            check_public_key(self.node_key)
        except AuthError:
            raise InputError(f"{self.KIND}: field 'node_key' is not a base64 Ed25519 key"
                             ) from None
        parse_address(self.address)
        return self


class Verdict(_TaskMessage):
    """The scheduler's signed word on a task: abort it, or release its result."""

    KIND: ClassVar[str] = "verdict"
    task_id: str
    run: int
    signature: HexBytes
    spec_digest: str | None = None
