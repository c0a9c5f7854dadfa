"""The executor's lifecycles as tables. Pure: no I/O, no clocks, no task data.

A task (one per spec; it exists only once `create_task` checked every owner's
signature, so its first state already means "consented"):

    waiting -upload/round-> waiting -run-> running -finish-> done
    waiting -last-round-> done              (federated: its last round closed)
    done -take-> done (a receiver took its result) -close-> released (the last one did)
    waiting, running -fail-> failed;  waiting, running, done -cancel-> cancelled
    (a done task is cancelled by its scheduler's abort too, before its result is let out)

An input (one per dataset of a task that uploads):

    absent -begin-> receiving -end-> received;  absent, receiving, received -wipe-> wiped

A federated task's rounds:

    collecting -update-> collecting -close-> closed -open-> collecting
    closed -finish-> finished

A receiver's sealed result:

    pending -seal-> sealed -take-> taken;  pending, sealed -drop-> dropped

A guard the tables cannot hold alone: a task runs only when every input is
received (`missing_inputs`), and a round closes only with every owner's update
(`round_event`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum

from teeflow.core.errors import StateError


@dataclass(frozen=True)
class Table:
    """One lifecycle: its states, its final states and every legal edge."""

    name: str
    initial: str
    states: tuple[str, ...]
    final: frozenset[str]
    transitions: Mapping[tuple[str, str], str]

    @property
    def events(self) -> frozenset[str]:
        return frozenset(event for _, event in self.transitions)

    def allows(self, state: str, event: str) -> bool:
        return (state, event) in self.transitions

    def next_state(self, state: str, event: str) -> str:
        """The state after `event`, or StateError if the table has no such edge."""
        try:
            return self.transitions[(state, event)]
        except KeyError:
            raise StateError(
                f"{self.name} in state {str(state)!r} cannot take event {str(event)!r}") from None


# -- tasks ---------------------------------------------------------------------
class TaskState(StrEnum):
    WAITING = "waiting"
    RUNNING = "running"
    DONE = "done"
    RELEASED = "released"
    FAILED = "failed"
    CANCELLED = "cancelled"


class TaskEvent(StrEnum):
    UPLOAD = "upload"  # an upload begins or ends
    ROUND = "round"  # a federated round message is taken
    RUN = "run"
    FINISH = "finish"
    LAST_ROUND = "last-round"
    TAKE = "take"
    CLOSE = "close"
    FAIL = "fail"
    CANCEL = "cancel"


_T, _TE = TaskState, TaskEvent
TASK = Table(
    name="task",
    initial=_T.WAITING,
    states=tuple(TaskState),
    final=frozenset({_T.RELEASED, _T.FAILED, _T.CANCELLED}),
    transitions={
        (_T.WAITING, _TE.UPLOAD): _T.WAITING,
        (_T.WAITING, _TE.ROUND): _T.WAITING,
        (_T.WAITING, _TE.RUN): _T.RUNNING,
        (_T.RUNNING, _TE.FINISH): _T.DONE,
        (_T.WAITING, _TE.LAST_ROUND): _T.DONE,
        (_T.DONE, _TE.TAKE): _T.DONE,
        (_T.DONE, _TE.CLOSE): _T.RELEASED,
        (_T.WAITING, _TE.FAIL): _T.FAILED,
        (_T.RUNNING, _TE.FAIL): _T.FAILED,
        (_T.WAITING, _TE.CANCEL): _T.CANCELLED,
        (_T.RUNNING, _TE.CANCEL): _T.CANCELLED,
        (_T.DONE, _TE.CANCEL): _T.CANCELLED,
    },
)


# -- inputs --------------------------------------------------------------------
class InputState(StrEnum):
    ABSENT = "absent"  # nothing sent yet
    RECEIVING = "receiving"  # an upload is streaming in
    RECEIVED = "received"  # whole, with its end marker; held in memory or a sealed spill
    WIPED = "wiped"  # nothing held, and nothing more will be taken


class InputEvent(StrEnum):
    BEGIN = "begin"
    END = "end"
    WIPE = "wipe"


_I, _IE = InputState, InputEvent
INPUT = Table(
    name="input",
    initial=_I.ABSENT,
    states=tuple(InputState),
    final=frozenset({_I.WIPED}),
    transitions={
        (_I.ABSENT, _IE.BEGIN): _I.RECEIVING,
        (_I.RECEIVING, _IE.END): _I.RECEIVED,
        (_I.ABSENT, _IE.WIPE): _I.WIPED,
        (_I.RECEIVING, _IE.WIPE): _I.WIPED,
        (_I.RECEIVED, _IE.WIPE): _I.WIPED,
    },
)


def missing_inputs(inputs: Mapping[str, str]) -> list[str]:
    """The datasets not yet received, in the given order; a task runs only when empty."""
    return [name for name, state in inputs.items() if state != InputState.RECEIVED]


# -- federated rounds ------------------------------------------------------------
class RoundState(StrEnum):
    COLLECTING = "collecting"  # this round's updates are coming in
    CLOSED = "closed"  # every owner's update is in; aggregated
    FINISHED = "finished"  # the last round closed


class RoundEvent(StrEnum):
    UPDATE = "update"  # an owner's update, others still to come
    CLOSE = "close"  # the last owner's update of the round
    OPEN = "open"  # the next round begins
    FINISH = "finish"  # there is no next round


_R, _RE = RoundState, RoundEvent
ROUND = Table(
    name="federated round",
    initial=_R.COLLECTING,
    states=tuple(RoundState),
    final=frozenset({_R.FINISHED}),
    transitions={
        (_R.COLLECTING, _RE.UPDATE): _R.COLLECTING,
        (_R.COLLECTING, _RE.CLOSE): _R.CLOSED,
        (_R.CLOSED, _RE.OPEN): _R.COLLECTING,
        (_R.CLOSED, _RE.FINISH): _R.FINISHED,
    },
)


def round_event(updates: Iterable[str], owners: Iterable[str]) -> RoundEvent:
    """After an update: the round closes only once every owner's update is in."""
    return RoundEvent.CLOSE if set(owners) <= set(updates) else RoundEvent.UPDATE


def after_close(round_number: int, rounds: int) -> RoundEvent:
    """Once round `round_number` (counted from 0) closed: another round, or the end."""
    return RoundEvent.OPEN if round_number + 1 < rounds else RoundEvent.FINISH


# -- results -------------------------------------------------------------------
class ResultState(StrEnum):
    PENDING = "pending"  # nothing computed yet
    SEALED = "sealed"  # sealed to this receiver, waiting to be taken
    TAKEN = "taken"  # handed over, once; nothing is kept
    DROPPED = "dropped"  # the task was cancelled before this receiver took it


class ResultEvent(StrEnum):
    SEAL = "seal"
    TAKE = "take"
    DROP = "drop"


_S, _SE = ResultState, ResultEvent
RESULT = Table(
    name="result",
    initial=_S.PENDING,
    states=tuple(ResultState),
    final=frozenset({_S.TAKEN, _S.DROPPED}),
    transitions={
        (_S.PENDING, _SE.SEAL): _S.SEALED,
        (_S.SEALED, _SE.TAKE): _S.TAKEN,
        (_S.PENDING, _SE.DROP): _S.DROPPED,
        (_S.SEALED, _SE.DROP): _S.DROPPED,
    },
)

TABLES = (TASK, INPUT, ROUND, RESULT)
