"""The one exception tree of teeflow.

    TeeflowError
    ├── ConfigError            a local config or policy file is wrong (names the field)
    │   └── MissingPackage     an optional package (polars, xgboost) is not installed
    ├── InputError             a caller asked for something invalid
    │   ├── UnknownDataset
    │   ├── UnknownTask
    │   ├── ParameterError     computation parameters that do not fit its schema
    │   ├── SchemaMismatch     uploaded data whose schema is not the catalogued one
    │   ├── DatasetChanged     a dataset file no longer what was catalogued (names which:
    │   │                      rows, size, content)
    │   ├── DatasetOffline     a dataset file that cannot be read or parsed (this one only)
    │   └── ResultKindError    a result asked for as what it is not (a table, a model)
    ├── AttestationError       evidence that is not believed
    │   ├── EvidenceFormatError    malformed or oversized evidence / collateral
    │   ├── VerificationError      a signature, chain or collateral check failed
    │   ├── PolicyRefused          verified, but the appraisal policy says no
    │   └── MemberRefused          a pool member another member did not admit (names it)
    ├── AuthError              a request is not from who it claims to be
    │   ├── NotInvited         a key joins without a valid invitation (closed membership)
    │   ├── RoleRefused        a member asks for what its roles do not allow
    │   └── ResultMismatch     a result that is not for the spec this party signed (names
    │                          which: task, spec digest, executor)
    ├── StateError             an illegal task state transition
    │   ├── OverBudget         refused: a task's, an initiator's or the executor's budget is spent
    │   ├── ConsentSpent       a signed spec already served as many runs as it allows
    │   └── ConsentExpired     a signed spec past its `expires` time
    ├── ComputeError           the computation itself failed
    ├── TaskFailed             a task ended failed or cancelled (carries its reason)
    ├── LogError               the transparency log, a checkpoint or a proof does not verify
    │   ├── NoteError          a malformed or forged signed note (checkpoint, cosignature)
    │   ├── ProofError         an inclusion or consistency proof that does not verify
    │   └── LogInconsistent    the scheduler's log does not extend a checkpoint this party
    │                          holds (rewritten, truncated, forked): the party stops
    └── PeerError              a remote node failed or could not be reached
        └── Unreachable

Local faults (ConfigError, InputError) are separate from a peer's (PeerError).
Messages sent to a peer are these exceptions' own strings, never a traceback; once data is
read, only catalogued ones (teeflow.compute.errors) with no value from the data in them.
"""

from __future__ import annotations


class TeeflowError(Exception):
    """Base of every error teeflow raises on purpose."""

    code = "error"
    # set by teeflow.compute.errors.public: the catalogue entry a computation's error was
    # built from, the only kind that may leave the enclave once the data has been read
    public: str | None = None


class ConfigError(TeeflowError):
    code = "config"


class MissingPackage(ConfigError):
    code = "missing_package"


class InputError(TeeflowError):
    code = "input"


class UnknownDataset(InputError):
    code = "unknown_dataset"


class UnknownTask(InputError):
    code = "unknown_task"


class ParameterError(InputError):
    code = "parameter"


class SchemaMismatch(InputError):
    code = "schema_mismatch"


class DatasetChanged(InputError):
    """A provider's dataset file changed since it was catalogued; `what` names which of
    rows, size, content (never a value)."""

    code = "dataset_changed"


class DatasetOffline(InputError):
    code = "dataset_offline"


class ResultKindError(InputError):
    code = "result_kind"


class AttestationError(TeeflowError):
    code = "attestation"


class EvidenceFormatError(AttestationError):
    code = "evidence_format"


class VerificationError(AttestationError):
    code = "verification"


class PolicyRefused(AttestationError):
    """The evidence verified but fails a policy check; `check` names which."""

    code = "policy_refused"

    def __init__(self, check: str, message: str) -> None:
        super().__init__(f"{check}: {message}")
        self.check = check


class MemberRefused(AttestationError):
    """A would-be member of an executor pool that another member's appraisal refused;
    `member` names it, `check` says which check (a PolicyRefused check, "evidence", ...)."""

    code = "member_refused"

    def __init__(self, member: str, check: str, message: str) -> None:
        super().__init__(f"pool member {member!r} not admitted: {check}: {message}")
        self.member = member
        self.check = check


class AuthError(TeeflowError):
    code = "auth"


class NotInvited(AuthError):
    code = "not_invited"


class RoleRefused(AuthError):
    code = "role"


class ResultMismatch(AuthError):
    """A result whose task, spec digest or executor is not the one this party signed for;
    `field` names which."""

    code = "result_mismatch"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class StateError(TeeflowError):
    code = "state"


class OverBudget(StateError):
    """A budget (held bytes, live tasks, concurrent uploads, challenges) is spent; the
    request may succeed later."""

    code = "over_budget"


class NotReleased(StateError):
    """A done task's result, asked for before its scheduler recorded the release; it may
    succeed shortly."""

    code = "not_released"


class ConsentSpent(StateError):
    """A spec digest already served (uploaded for, or run) as many times as it allows."""

    code = "consent_spent"


class ConsentExpired(StateError):
    """A spec past the `expires` time its signers gave it."""

    code = "consent_expired"


class ComputeError(TeeflowError):
    code = "compute"


class TaskFailed(TeeflowError):
    code = "task_failed"


class LogError(TeeflowError):
    code = "log"


class NoteError(LogError):
    code = "note"


class ProofError(LogError):
    code = "proof"


class LogInconsistent(LogError):
    """What the scheduler shows is not an extension of what this party saw before."""

    code = "log_inconsistent"


class PeerError(TeeflowError):
    code = "peer"


class Unreachable(PeerError):
    code = "unreachable"


_BY_CODE: dict[str, type[TeeflowError]] = {}


def _index(cls: type[TeeflowError]) -> None:
    _BY_CODE[cls.code] = cls
    for sub in cls.__subclasses__():
        _index(sub)


_index(TeeflowError)


def from_code(code: str, message: str) -> TeeflowError:
    """Rebuild an error sent by a peer as {code, message}."""
    cls = _BY_CODE.get(code, PeerError)
    if cls in (PolicyRefused, ResultMismatch):
        check, _, rest = message.partition(": ")
        return cls(check, rest)  # type: ignore[call-arg]
    return cls(message)
