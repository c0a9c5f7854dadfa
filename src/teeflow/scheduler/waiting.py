"""What a live task is waiting for, and for how long: pure, from its state, approvals,
assignments, history and the times its nodes were last seen (time is an argument).

Names only (node names, dataset names, executor addresses, states): never a data value,
never a provider's error text.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from teeflow.core.durations import format_span


@dataclass(frozen=True)
class Waiter:
    who: str  # a node's name, or an executor's address
    what: str  # "signature", "upload of d2", "the executor", "result taken by carol"
    since: float
    last_seen: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"who": self.who, "what": self.what, "since": self.since,
                "last_seen": self.last_seen}


@dataclass(frozen=True)
class Waiting:
    waiters: tuple[Waiter, ...]
    text: str

    def to_dict(self) -> dict[str, Any]:
        return {"for": [w.to_dict() for w in self.waiters], "text": self.text}


def _phrase(w: Waiter) -> str:
    if w.what == "the executor":
        return f"the executor {w.who}"
    if w.what.startswith("result taken by"):
        return f"{w.who} to take the result"
    return f"{w.who}'s {w.what}"


def _seen(w: Waiter, now: float) -> str:
    if w.last_seen is None:
        return f"{w.who} never seen"
    return f"{w.who} last seen {format_span(now - w.last_seen)} ago"


def describe(waiters: Iterable[Waiter], now: float) -> str:
    """'bob's signature and carol's upload of d2; bob last seen 5s ago, carol never seen'."""
    ws = list(waiters)
    if not ws:
        return ""
    seen = dict.fromkeys(_seen(w, now) for w in ws)  # one per who, in order
    return " and ".join(_phrase(w) for w in ws) + "; " + ", ".join(seen)


def text_of(waiters: Iterable[Waiter], now: float) -> str:
    """The one line: 'waiting 2m for bob's signature; bob last seen 5s ago'."""
    ws = list(waiters)
    if not ws:
        return ""
    since = min(w.since for w in ws)
    return f"waiting {format_span(now - since)} for {describe(ws, now)}"


def _event_at(events: Iterable[Mapping[str, Any]], kind: str, default: float) -> float:
    """When the last `kind` event was recorded (the state's start), else `default`."""
    at = [float(e["at"]) for e in events if e.get("event", e.get("kind")) == kind]
    return at[-1] if at else default


def waiting_for(state: str, spec: Mapping[str, Any], created_at: float, executor: str,
                approvals: Iterable[Mapping[str, Any]],
                assignments: Iterable[Mapping[str, Any]],
                events: Iterable[Mapping[str, Any]], last_seen: Mapping[str, float],
                names: Mapping[str, str], now: float,
                taken_by: Iterable[str] | None = None) -> Waiting | None:
    """Who a task in `state` waits for; None once it is final.

    `last_seen`: public key or executor address -> unix time; `names`: public key -> node
    name (receivers); `taken_by`: receiver keys the executor says took their result."""
    events = list(events)
    owners: dict[str, str] = {}  # owner name -> key, in spec order
    for d in spec.get("datasets", []):
        owners.setdefault(str(d["owner"]), str(d["owner_key"]))
    ex = Waiter(executor, "the executor", 0.0, last_seen.get(executor))
    waiters: list[Waiter] = []
    if state == "submitted":
        decided = {a["owner_key"] for a in approvals}
        waiters = [Waiter(name, "signature", created_at, last_seen.get(key))
                   for name, key in owners.items() if key not in decided]
    elif state == "approved":
        waiters = [Waiter(ex.who, ex.what, _event_at(events, "consented", created_at),
                          ex.last_seen)]
    elif state in ("accepted", "uploading"):
        since = _event_at(events, "accept", created_at)
        keys = {str(d["name"]): str(d["owner_key"]) for d in spec.get("datasets", [])}
        rows = list(assignments)
        waiters = [Waiter(str(a["node"]), f"upload of {a['dataset']}", since,
                          last_seen.get(keys.get(str(a["dataset"]), "")))
                   for a in rows if a["state"] in ("pending", "started")]
        if not waiters:  # every input sent: the executor is to confirm and run
            last = max([float(a["updated_at"]) for a in rows] or [since])
            waiters = [Waiter(ex.who, ex.what, last, ex.last_seen)]
    elif state == "running":
        waiters = [Waiter(ex.who, ex.what, _event_at(events, "run", created_at),
                          ex.last_seen)]
    elif state == "done":
        since = _event_at(events, "finish", created_at)
        taken = set(taken_by or ())
        for r in spec.get("receivers", []):
            key = str(r["sign_key"])
            if key in taken:
                continue
            who = names.get(key) or f"receiver {key[:12]}"
            waiters.append(Waiter(who, f"result taken by {who}", since, last_seen.get(key)))
    else:
        return None
    return Waiting(tuple(waiters), text_of(waiters, now))


def task_deadline(spec_deadline: int | float | None, created_at: float,
                  default: float) -> float:
    """The spec's own (signed, the executor holds it too), else the scheduler's default."""
    return float(spec_deadline) if spec_deadline is not None else created_at + default


def deadline_reason(waiting: Waiting | None, deadline: float, created_at: float,
                    now: float) -> str:
    """'deadline passed after 30m: waiting for bob's upload of d2; bob last seen 3m ago'."""
    head = f"deadline passed after {format_span(deadline - created_at)}"
    if waiting is None or not waiting.waiters:
        return head
    return f"{head}: waiting for {describe(waiting.waiters, now)}"


# `done` is not failed at its deadline: the result exists and is being taken (it ends
# when every receiver has taken it, or the executor expires it)
DEADLINE_STATES = ("submitted", "approved", "accepted", "uploading", "running")
