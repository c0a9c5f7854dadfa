"""The task state machine as a table. Pure: no I/O.

    submitted -approved-> submitted (one owner signed) ... -consented-> approved
    approved -accept-> accepted -upload-> uploading -run-> running -finish-> done
    done -close-> released (every receiver has taken its sealed result)
    submitted -rejected-> rejected
    any live state -fail-> failed, -cancel-> cancelled

`released`, `rejected`, `failed` and `cancelled` are final.
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
