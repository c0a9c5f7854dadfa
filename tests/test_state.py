"""The task state machine table (scheduler/state.py): every edge, and every missing edge."""

from __future__ import annotations

import itertools

import pytest

from teeflow.core.errors import StateError
from teeflow.scheduler.state import (
    ASSIGNMENT_FINAL,
    ASSIGNMENT_STATES,
    ASSIGNMENT_TRANSITIONS,
    EVENTS,
    FINAL,
    LIVE,
    STATES,
    TRANSITIONS,
    next_assignment,
    next_state,
)

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


# -- a provider's upload of one dataset, as it reports it --------------------------------------

ASSIGNMENT_EDGES = {
    ("pending", "started"): "started",
    ("started", "started"): "started",
    ("pending", "uploaded"): "uploaded",
    ("started", "uploaded"): "uploaded",
    ("pending", "failed"): "failed",
    ("started", "failed"): "failed",
}


REPORTS = (*ASSIGNMENT_STATES, "done", "")


@pytest.mark.parametrize("state,reported", list(itertools.product(ASSIGNMENT_STATES, REPORTS)))
def test_every_assignment_report(state, reported):
    """Every (state, report) pair: exactly the listed edges exist; the rest are refused,
    naming why."""
    if (state, reported) in ASSIGNMENT_EDGES:
        assert next_assignment(state, reported, "d") == ASSIGNMENT_EDGES[(state, reported)]
        return
    if reported not in ASSIGNMENT_STATES:
        match = "unknown assignment state"
    elif state in ASSIGNMENT_FINAL:
        match = f"already {state}"
    else:
        match = f"cannot go from {state} to {reported}"
    with pytest.raises(StateError, match=match):
        next_assignment(state, reported, "d")


def test_assignment_table_is_the_listed_edges():
    assert ASSIGNMENT_TRANSITIONS == ASSIGNMENT_EDGES


def test_no_upload_is_undone_or_resumed_after_it_ended():
    """Reachability: from a final state nothing is reachable; `pending` is never re-entered,
    so an upload that started cannot be offered to its provider again as new work."""
    reachable = {"pending"}
    frontier = ["pending"]
    while frontier:
        state = frontier.pop()
        for (before, _), after in ASSIGNMENT_TRANSITIONS.items():
            if before == state and after not in reachable:
                reachable.add(after)
                frontier.append(after)
    assert reachable == set(ASSIGNMENT_STATES)
    assert not [e for e in ASSIGNMENT_TRANSITIONS if e[0] in ASSIGNMENT_FINAL]
    assert "pending" not in ASSIGNMENT_TRANSITIONS.values()
