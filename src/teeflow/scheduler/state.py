"""The scheduler's lifecycles as tables. Pure: no I/O.

A task:

    submitted -approved-> submitted (one owner signed) ... -consented-> approved
    approved -accept-> accepted -upload-> uploading -run-> running -finish-> done
    done -close-> released (every receiver has taken its sealed result)
    submitted -rejected-> rejected
    any live state -fail-> failed, -cancel-> cancelled

`released`, `rejected`, `failed` and `cancelled` are final.

One provider's upload of one dataset, as the provider reports it (the executor keeps its
own view of the same upload, `executor/states.INPUT`); the event is the reported state:

    pending -started-> started -started-> started (progress)
    pending, started -uploaded-> uploaded;  pending, started -failed-> failed

`uploaded` and `failed` are final.
"""

from __future__ import annotations

from teeflow.core.errors import StateError

STATES = ("submitted", "approved", "accepted", "uploading", "running", "done",
          "released", "rejected", "failed", "cancelled")
FINAL = frozenset({"released", "rejected", "failed", "cancelled"})
LIVE = ("submitted", "approved", "accepted", "uploading", "running", "done")

TRANSITIONS: dict[tuple[str, str], str] = {
    ("submitted", "approved"): "submitted",  # one owner signed; others still to come
    ("submitted", "consented"): "approved",  # every owner signed the spec digest
    ("submitted", "rejected"): "rejected",
    ("approved", "accept"): "accepted",
    ("accepted", "upload"): "uploading",
    ("uploading", "upload"): "uploading",
    ("uploading", "attested"): "uploading",  # a provider accepted the executor's evidence
    ("uploading", "run"): "running",
    ("running", "finish"): "done",
    ("done", "close"): "released",
    **{(s, "fail"): "failed" for s in LIVE},
    **{(s, "cancel"): "cancelled" for s in LIVE},
}

EVENTS = frozenset(event for _, event in TRANSITIONS)


def next_state(state: str, event: str) -> str:
    """The state after `event`, or StateError if the table has no such edge."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise StateError(f"task in state {state!r} cannot take event {event!r}") from None


ASSIGNMENT_STATES = ("pending", "started", "uploaded", "failed")
ASSIGNMENT_FINAL = frozenset({"uploaded", "failed"})
ASSIGNMENT_TRANSITIONS: dict[tuple[str, str], str] = {
    ("pending", "started"): "started",
    ("started", "started"): "started",  # progress: rows so far
    **{(s, "uploaded"): "uploaded" for s in ("pending", "started")},
    **{(s, "failed"): "failed" for s in ("pending", "started")},
}


def next_assignment(state: str, reported: str, dataset: str) -> str:
    """An assignment's state after its provider reports `reported`, or StateError."""
    if reported not in ASSIGNMENT_STATES:
        raise StateError(f"unknown assignment state {reported!r}")
    if state in ASSIGNMENT_FINAL:
        raise StateError(f"assignment of {dataset!r} is already {state}")
    try:
        return ASSIGNMENT_TRANSITIONS[(state, reported)]
    except KeyError:
        raise StateError(f"assignment of {dataset!r} cannot go from {state} to "
                         f"{reported}") from None
