"""The executor's lifecycle tables (executor/states.py): every edge, every missing edge,
and the safety properties as reachability over the tables."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable

import pytest

from teeflow.core.errors import StateError
from teeflow.executor.states import (
    INPUT,
    RESULT,
    ROUND,
    TABLES,
    TASK,
    InputState,
    ResultState,
    RoundEvent,
    RoundState,
    Table,
    TaskState,
    after_close,
    missing_inputs,
    round_event,
)

T, In, R, S = TaskState, InputState, RoundState, ResultState

# The design's tables; a new edge must be added here on purpose.
EXPECTED: dict[str, dict[tuple[str, str], str]] = {
    "task": {
        (T.WAITING, "upload"): T.WAITING,
        (T.WAITING, "round"): T.WAITING,
        (T.WAITING, "run"): T.RUNNING,
        (T.RUNNING, "finish"): T.DONE,
        (T.WAITING, "last-round"): T.DONE,
        (T.DONE, "take"): T.DONE,
        (T.DONE, "close"): T.RELEASED,
        (T.WAITING, "fail"): T.FAILED,
        (T.RUNNING, "fail"): T.FAILED,
        (T.WAITING, "cancel"): T.CANCELLED,
        (T.RUNNING, "cancel"): T.CANCELLED,
        (T.DONE, "cancel"): T.CANCELLED,
    },
    "input": {
        (In.ABSENT, "begin"): In.RECEIVING,
        (In.RECEIVING, "end"): In.RECEIVED,
        (In.ABSENT, "wipe"): In.WIPED,
        (In.RECEIVING, "wipe"): In.WIPED,
        (In.RECEIVED, "wipe"): In.WIPED,
    },
    "federated round": {
        (R.COLLECTING, "update"): R.COLLECTING,
        (R.COLLECTING, "close"): R.CLOSED,
        (R.CLOSED, "open"): R.COLLECTING,
        (R.CLOSED, "finish"): R.FINISHED,
    },
    "result": {
        (S.PENDING, "seal"): S.SEALED,
        (S.SEALED, "take"): S.TAKEN,
        (S.PENDING, "drop"): S.DROPPED,
        (S.SEALED, "drop"): S.DROPPED,
    },
}
FINAL = {
    "task": {"released", "failed", "cancelled"},
    "input": {"wiped"},
    "federated round": {"finished"},
    "result": {"taken", "dropped"},
}
INITIAL = {"task": "waiting", "input": "absent", "federated round": "collecting",
           "result": "pending"}
BY_NAME = {t.name: t for t in TABLES}


@pytest.mark.parametrize("table", TABLES, ids=lambda t: t.name)
def test_table_is_exactly_the_design(table: Table):
    assert dict(table.transitions) == EXPECTED[table.name]
    assert set(table.final) == FINAL[table.name]
    assert table.initial == INITIAL[table.name]
    assert all(s in table.states and t in table.states
               for (s, _), t in table.transitions.items())
    assert table.initial not in table.final


def _all_pairs() -> list[tuple[Table, str, str]]:
    pairs = []
    for table in TABLES:
        events = sorted(table.events | {e for t in TABLES for e in t.events} | {"", "nonsense"})
        pairs += [(table, s, e) for s, e in itertools.product(table.states, events)]
    return pairs


@pytest.mark.parametrize("table,state,event", _all_pairs(),
                         ids=lambda v: v.name if isinstance(v, Table) else str(v))
def test_every_pair(table: Table, state: str, event: str):
    """Every (state, event) of every table: the table's next state, or StateError."""
    expected = EXPECTED[table.name].get((state, event))
    if expected is None:
        assert not table.allows(state, event)
        with pytest.raises(StateError, match=f"{table.name} in state {str(state)!r}"):
            table.next_state(state, event)
    else:
        assert table.allows(state, event)
        assert table.next_state(state, event) == expected


@pytest.mark.parametrize("table", TABLES, ids=lambda t: t.name)
def test_nothing_after_a_final_state(table: Table):
    for state in table.final:
        assert not [e for (s, e) in table.transitions if s == state]


@pytest.mark.parametrize("table", TABLES, ids=lambda t: t.name)
def test_unknown_state_raises(table: Table):
    with pytest.raises(StateError):
        table.next_state("paused", sorted(table.events)[0])


@pytest.mark.parametrize("table", TABLES, ids=lambda t: t.name)
def test_every_state_is_reachable_and_every_live_state_can_end(table: Table):
    assert _reachable(table, table.initial) == set(table.states)
    for state in table.states:
        assert _reachable(table, state) & table.final


def _reachable(table: Table, start: str, avoid: Iterable[str] = ()) -> set[str]:
    """States reachable from `start` without entering any state in `avoid`."""
    blocked = set(avoid)
    seen, frontier = set(), {start}
    while frontier:
        state = frontier.pop()
        seen.add(state)
        frontier |= {t for (s, _), t in table.transitions.items()
                     if s == state and t not in seen and t not in blocked}
    return seen


# -- safety properties ------------------------------------------------------------------


def test_a_task_starts_consented():
    """A task record exists only once create_task checked every owner's signature: its
    first state already is the consented one, and no edge leads back into it but uploads
    and rounds while it waits."""
    assert TASK.initial == "waiting"
    into_waiting = {(s, e) for (s, e), t in TASK.transitions.items() if t == "waiting"}
    assert into_waiting == {("waiting", "upload"), ("waiting", "round")}


def test_no_release_before_compute():
    """No path reaches released without passing done."""
    assert "released" not in _reachable(TASK, "waiting", avoid={"done"})
    assert {s for (s, _), t in TASK.transitions.items() if t == "released"} == {"done"}
    # and no result is sealed or taken before the computation is over
    assert "taken" not in _reachable(RESULT, "pending", avoid={"sealed"})


def test_no_second_release_to_the_same_receiver():
    """Each receiver's result is taken at most once: every path from pending passes
    `take` at most once."""
    def takes(state: str, depth: int = 0) -> int:
        assert depth < 10, "cycle"
        counts = [takes(t, depth + 1) + (e == "take")
                  for (s, e), t in RESULT.transitions.items() if s == state]
        return max(counts, default=0)

    assert takes(RESULT.initial) == 1
    assert not RESULT.allows("taken", "take")


def test_a_task_ends_only_through_its_tables():
    assert _reachable(TASK, "running") == {"running", "done", "released", "failed",
                                           "cancelled"}
    assert "failed" not in _reachable(TASK, "done")  # a computed task is never failed


# The executor as a whole: one task with two inputs. A task runs only when every input
# is received (the guard `missing_inputs`); uploads come only while the task waits; a
# task that leaves the live states wipes its inputs.
DATASETS = ("a", "b")
Product = tuple[str, tuple[str, ...]]


def _moves(state: Product) -> Iterable[tuple[str, Product]]:
    task, inputs = state
    for i, current in enumerate(inputs):
        for (s, e), t in INPUT.transitions.items():
            if s != current or e == "wipe":
                continue  # wiping follows a task's leaving; modelled below
            if TASK.allows(task, "upload"):
                yield f"{e}:{DATASETS[i]}", (task, inputs[:i] + (t,) + inputs[i + 1:])
    for (s, e), t in TASK.transitions.items():
        if s != task or e in ("upload", "round", "last-round"):
            continue  # uploads above; rounds belong to federated tasks, which upload nothing
        if e == "run" and missing_inputs(dict(zip(DATASETS, inputs, strict=True))):
            continue
        after = inputs
        if t in ("failed", "cancelled") or e == "finish":
            after = tuple(INPUT.next_state(x, "wipe") if INPUT.allows(x, "wipe") else x
                          for x in inputs)
        yield e, (t, after)


def _explore(start: Product, moves: Callable[[Product], Iterable[tuple[str, Product]]]
             ) -> list[tuple[Product, str, Product]]:
    edges, seen, frontier = [], {start}, [start]
    while frontier:
        state = frontier.pop()
        for event, after in moves(state):
            edges.append((state, event, after))
            if after not in seen:
                seen.add(after)
                frontier.append(after)
    return edges


def test_no_run_without_every_input_received():
    start: Product = (TASK.initial, (INPUT.initial,) * len(DATASETS))
    edges = _explore(start, _moves)
    runs = [(before, after) for before, event, after in edges if event == "run"]
    assert runs  # the happy path exists
    for (_, inputs), (task, _) in runs:
        assert inputs == ("received",) * len(DATASETS) and task == "running"
    # and nothing is received once the task has left waiting
    for (task, _), event, _after in edges:
        if event.startswith("end:"):
            assert task == "waiting"
    # once a task has ended, it holds no input
    ended = {after for _, _, after in edges if after[0] in TASK.final | {"done"}}
    assert ended and all(set(inputs) <= {"wiped"} for _, inputs in ended)


def test_missing_inputs_guard():
    assert missing_inputs({"a": "received", "b": "received"}) == []
    assert missing_inputs({"a": "received", "b": "receiving", "c": "absent"}) == ["b", "c"]
    assert missing_inputs({"a": "wiped"}) == ["a"]


def test_a_round_closes_only_with_every_owners_update():
    assert round_event({"a"}, ["a", "b"]) == RoundEvent.UPDATE
    assert round_event({"a", "b"}, ["a", "b"]) == RoundEvent.CLOSE
    assert round_event(set(), ["a"]) == RoundEvent.UPDATE
    assert [after_close(r, 3) for r in range(3)] == ["open", "open", "finish"]
    # finished only through a closed round
    assert "finished" not in _reachable(ROUND, "collecting", avoid={"closed"})


def test_state_values_are_the_wire_strings():
    assert [str(s) for s in TaskState] == ["waiting", "running", "done", "released",
                                           "failed", "cancelled"]
    assert BY_NAME["task"] is TASK and BY_NAME["input"] is INPUT
