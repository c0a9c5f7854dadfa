"""The task state machine table (scheduler/state.py): every edge, and every missing edge."""

from __future__ import annotations

import itertools

import pytest

from teeflow.core.errors import StateError
from teeflow.scheduler.state import EVENTS, FINAL, LIVE, STATES, TRANSITIONS, next_state

HAPPY = [
    ("submitted", "accept", "accepted"),
    ("accepted", "upload", "uploading"),
    ("uploading", "upload", "uploading"),
    ("uploading", "run", "running"),
    ("running", "finish", "done"),
    ("done", "release", "released"),
]


def test_happy_path():
    state = "submitted"
    for before, event, after in HAPPY:
        assert state == before
        state = next_state(state, event)
        assert state == after
    assert state == "released"
    assert state in FINAL


def test_states_partition_into_live_and_final():
    assert set(LIVE) | FINAL == set(STATES)
    assert not set(LIVE) & FINAL
    assert all(s in STATES and t in STATES for (s, _), t in TRANSITIONS.items())


@pytest.mark.parametrize("state", LIVE)
@pytest.mark.parametrize("event,target", [("fail", "failed"), ("cancel", "cancelled")])
def test_fail_and_cancel_from_every_live_state(state, event, target):
    assert next_state(state, event) == target


@pytest.mark.parametrize("state", sorted(FINAL))
@pytest.mark.parametrize("event", sorted(EVENTS) + ["submit", "nonsense"])
def test_final_states_take_no_event(state, event):
    with pytest.raises(StateError, match=f"{state!r}.*{event!r}"):
        next_state(state, event)


# The design's table; a new edge must be added here on purpose.
EXPECTED = (
    {(b, e): a for b, e, a in HAPPY}
    | {("uploading", "attest"): "uploading"}  # a provider accepted the executor's evidence
    | {(s, "fail"): "failed" for s in LIVE}
    | {(s, "cancel"): "cancelled" for s in LIVE}
)


def test_table_is_exactly_the_design():
    assert TRANSITIONS == EXPECTED


def test_attest_only_while_uploading():
    assert next_state("uploading", "attest") == "uploading"
    for state in STATES:
        if state != "uploading":
            with pytest.raises(StateError):
                next_state(state, "attest")


@pytest.mark.parametrize(
    "state,event",
    [(s, e) for s, e in itertools.product(STATES, sorted(EVENTS) + ["", "ACCEPT", "submit"])
     if (s, e) not in TRANSITIONS],
)
def test_every_pair_not_in_the_table_raises(state, event):
    with pytest.raises(StateError):
        next_state(state, event)


def test_unknown_state_raises():
    with pytest.raises(StateError):
        next_state("paused", "run")
