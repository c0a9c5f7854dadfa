"""The task state machine as a table. Pure: no I/O.

    submitted -accept-> accepted -upload-> uploading -run-> running
              -finish-> done -release-> released
    any live state -fail-> failed, -cancel-> cancelled

`released`, `failed` and `cancelled` are final.
"""

from __future__ import annotations

from teeflow.core.errors import StateError

STATES = ("submitted", "accepted", "uploading", "running", "done",
          "released", "failed", "cancelled")
FINAL = frozenset({"released", "failed", "cancelled"})
LIVE = ("submitted", "accepted", "uploading", "running", "done")

TRANSITIONS: dict[tuple[str, str], str] = {
    ("submitted", "accept"): "accepted",
    ("accepted", "upload"): "uploading",
    ("uploading", "upload"): "uploading",
    ("uploading", "attest"): "uploading",  # a provider accepted the executor's evidence
    ("uploading", "run"): "running",
    ("running", "finish"): "done",
    ("done", "release"): "released",
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
