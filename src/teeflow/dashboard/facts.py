"""What a task page says beyond the scheduler's word, from verified log entries. Pure."""

from __future__ import annotations

from typing import Any

from teeflow.core import audit


def owners_of(entries: list[audit.Entry]) -> dict[str, str]:
    """Signer -> owner name, from the initiator-signed `submitted` entry's spec."""
    for e in entries:
        if e.kind == "submitted":
            return {audit.ed25519_signer(d["owner_key"]): str(d["owner"])
                    for d in e.body.get("spec", {}).get("datasets", [])}
    return {}


def awaited(task: dict[str, Any], entries: list[audit.Entry]) -> list[str]:
    """Who the task waits for now: owners yet to sign (from the log), else the phase."""
    kinds = {e.kind for e in entries}
    owners = owners_of(entries)
    decided = {e.signer for e in entries if e.kind in audit.OWNER_KINDS}
    if task["state"] in ("rejected", "failed", "cancelled", "released") or "rejected" in kinds:
        return []
    missing = [name for signer, name in owners.items() if signer not in decided]
    if missing:
        return [f"{name} (approval)" for name in missing]
    if "computed" in kinds:
        return ["the receivers (take the result)"]
    return [f"{a['node']} (upload of {a['dataset']}: {a['state']})"
            for a in task.get("assignments", []) if a["state"] != "uploaded"] or \
        ["the executor (run)"]


def waiting_for_me(tasks: list[dict[str, Any]], entries: list[audit.Entry],
                   me: str) -> list[dict[str, Any]]:
    """Tasks still submitted whose log names me (signer `me`) as an owner who has not
    decided yet."""
    out = []
    for t in tasks:
        if t["state"] != "submitted":
            continue
        mine = [e for e in entries if e.task_id == t["id"]]
        if me in owners_of(mine) and not any(e.signer == me and e.kind in audit.OWNER_KINDS
                                             for e in mine):
            out.append(t)
    return out
