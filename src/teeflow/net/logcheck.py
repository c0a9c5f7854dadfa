"""What `teeflow audit verify` checks for a party, against the scheduler it talks to:

1. consistency: the scheduler's newest checkpoint extends the one this party held
   (done by every call, net/logview.py);
2. every entry of the party's tasks: its content matches its leaf hash, the scheduler's
   log signature over its index and previous root verifies, the party signatures verify
   and come from who may sign them (core/audit.py);
3. inclusion: each of those entries is leaf seq-1 of the checkpoint's tree, and the tree
   it says it extends (prev_root) is that tree's prefix (a consistency proof from
   size seq-1), so no entry was moved, and nothing before it removed or inserted; the
   log head a provider signed into its entry is a prefix too;
4. cosignatures on the checkpoint: which members' verify.
An auditor (who may read everything) also rebuilds the whole tree from the entries.
"""

from __future__ import annotations

from typing import Any

from teeflow.core import audit, tlog
from teeflow.core import checkpoint as ck
from teeflow.core.errors import LogError, LogInconsistent
from teeflow.net.scheduler_client import SchedulerClient


def _entry(d: dict[str, Any]) -> audit.Entry:
    return audit.Entry(**{k: d[k] for k in audit.Entry.__dataclass_fields__})


def verify_party(sc: SchedulerClient) -> dict[str, Any]:
    note = sc.checkpoint()["note"]
    entries = [_entry(e) for e in sc.audit()]
    held = sc.log.snapshot()
    key = sc.log.log_key
    if held is None or key is None:  # pragma: no cover - every answer sets it
        raise LogInconsistent("no checkpoint after asking the scheduler for one")
    entries = [e for e in entries if e.seq <= held.size]
    audit.verify_entries(entries, key)
    for e in entries:
        try:
            tlog.verify_inclusion(e.seq - 1, held.size, bytes.fromhex(e.hash),
                                  sc.inclusion(e.seq - 1, held.size), held.root)
            tlog.verify_consistency(e.seq - 1, held.size, bytes.fromhex(e.prev_root),
                                    held.root, sc.consistency(e.seq - 1, held.size))
            anchor = audit.log_anchor(e)
            if anchor is not None:  # the head its signer saw is a prefix of this tree
                tlog.verify_consistency(anchor[0], held.size, anchor[1], held.root,
                                        sc.consistency(anchor[0], held.size))
        except (LogError, ValueError) as exc:
            raise LogInconsistent(f"entry {e.seq} ({e.kind} of task {e.task_id}) is not "
                                  f"where it says in the checkpoint of size {held.size}: "
                                  f"{exc}") from None
    whole = _whole_log(sc, held) if _is_auditor(sc) else None
    return {"size": held.size, "root": held.root.hex(), "origin": held.origin,
            "entries": len(entries), "whole_log": whole,
            "cosigners": cosigners(sc, note, held)}


def _is_auditor(sc: SchedulerClient) -> bool:
    me = sc.identity.public_key()
    return any(n["public_key"] == me and "auditor" in n["roles"] for n in sc.nodes())


def _whole_log(sc: SchedulerClient, held: ck.Checkpoint) -> int:
    leaves: list[audit.Entry] = []
    while len(leaves) < held.size:
        page = sc.log_entries(len(leaves) + 1, held.size + 1)
        if not page or any(p["entry"] is None for p in page):
            raise LogInconsistent("the scheduler withheld entries from an auditor")
        leaves += [_entry(p["entry"]) for p in page]
    count = audit.verify_chain(leaves, sc.log.log_key)
    if audit.tree_of(leaves).root() != held.root:
        raise LogInconsistent(f"the entries do not hash to the checkpoint's root of size "
                              f"{held.size}")
    return count


def cosigners(sc: SchedulerClient, note: str, held: ck.Checkpoint) -> list[str]:
    """Names of members whose cosignature on the held checkpoint verifies."""
    try:
        text, sigs = ck.parse_note(note)
        cp = ck.parse_checkpoint(text)
    except LogError:
        return []
    if cp != held:
        return []
    keys = {n["name"]: n["public_key"] for n in sc.nodes()}
    out = []
    for s in sigs:
        if s.name in keys:
            try:
                ck.verify_cosignature(held, s, keys[s.name])
            except LogError:
                continue
            out.append(s.name)
    return sorted(out)
