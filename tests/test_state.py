"""The task state machine table (scheduler/state.py): every edge, and every missing edge."""

from __future__ import annotations

import itertools

import pytest

from teeflow.core.errors import StateError
from teeflow.scheduler.state import EVENTS, FINAL, LIVE, STATES, TRANSITIONS, next_state

# Two owners sign, the last signature completes consent, then the run.
HAPPY = [
    ("submitted", "approved", "submitted"),
    ("submitted", "consented", "approved"),
    ("approved", "accept", "accepted"),
    ("accepted", "upload", "uploading"),
    ("uploading", "attested", "uploading"),
    ("uploading", "upload", "uploading"),
    ("uploading", "run", "running"),
    ("running", "finish", "done"),
    ("done", "close", "released"),
]


def test_happy_path():
    state = "submitted"
    for before, event, after in HAPPY:
        assert state == before
        state = next_state(state, event)
        assert state == after
    assert state == "released"
    assert state in FINAL


def test_rejection_is_final():
    assert next_state("submitted", "rejected") == "rejected"
    assert "rejected" in FINAL


def test_states_partition_into_live_and_final():
    assert set(LIVE) | FINAL == set(STATES)
    assert not set(LIVE) & FINAL
    assert all(s in STATES and t in STATES for (s, _), t in TRANSITIONS.items())
    assert FINAL == {"released", "rejected", "failed", "cancelled"}


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
    | {("submitted", "rejected"): "rejected"}
    | {(s, "fail"): "failed" for s in LIVE}
    | {(s, "cancel"): "cancelled" for s in LIVE}
)


def test_table_is_exactly_the_design():
    assert TRANSITIONS == EXPECTED


@pytest.mark.parametrize("event", ["approved", "consented", "rejected"])
def test_consent_only_while_submitted(event):
    """No owner's decision can move a task that is already approved or running."""
    for state in STATES:
        if state != "submitted":
            with pytest.raises(StateError):
                next_state(state, event)


def test_no_run_without_consent():
    """A submitted task reaches the executor only through `consented`."""
    for event in ("accept", "upload", "run", "finish", "close"):
        with pytest.raises(StateError):
            next_state("submitted", event)
    reachable, frontier = set(), {"submitted"}
    while frontier:
        state = frontier.pop()
        reachable.add(state)
        frontier |= {t for (s, e), t in TRANSITIONS.items()
                     if s == state and e != "consented" and t not in reachable}
    assert reachable == {"submitted", "rejected", "failed", "cancelled"}


def test_attested_only_while_uploading():
    assert next_state("uploading", "attested") == "uploading"
    for state in STATES:
        if state != "uploading":
            with pytest.raises(StateError):
                next_state(state, "attested")


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
