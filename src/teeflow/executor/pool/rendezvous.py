"""The exchange that carries certificates, nonces and evidence between would-be members.

Untrusted, like the network: anyone may write here, so a member believes nothing it reads
until admission has appraised it, and a wrong value can only make admission (or a pinned
handshake) fail. Today it is a shared folder on one machine; the scheduler, which routes
and records and never sees data, will relay these messages between hosts. Every read is
capped; every wait has a deadline (a pool that does not form fails, it does not hang).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from teeflow.core.errors import InputError, PeerError

MAX_MESSAGE = 128 * 1024
POLL = 0.05
KINDS = ("cert", "nonce", "answer", "scheduler", "worker", "done", "failed")


class Rendezvous:
    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def _path(self, kind: str, sender: str, to: str | None) -> Path:
        if kind not in KINDS:
            raise InputError(f"unknown rendezvous message kind {kind!r}")
        for name in (sender, to or "x"):
            if not name.replace("-", "").replace("_", "").isalnum() or not name.isascii():
                raise InputError(f"member name {name[:64]!r} is not [A-Za-z0-9_-]")
        return self.folder / kind / (sender if to is None else f"{sender}__{to}")

    def publish(self, kind: str, sender: str, body: bytes, to: str | None = None) -> None:
        """Write one message, whole or not at all (a reader never sees half of it)."""
        if len(body) > MAX_MESSAGE:
            raise InputError(f"rendezvous message larger than {MAX_MESSAGE} bytes")
        path = self._path(kind, sender, to)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(body)
        os.replace(tmp, path)

    def read(self, kind: str, sender: str, to: str | None = None) -> bytes | None:
        path = self._path(kind, sender, to)
        try:
            with path.open("rb") as f:
                body = f.read(MAX_MESSAGE + 1)
        except FileNotFoundError:
            return None
        if len(body) > MAX_MESSAGE:
            raise PeerError(f"{kind} from {sender!r} is larger than {MAX_MESSAGE} bytes")
        return body

    def wait(self, kind: str, senders: list[str], deadline: float,
             to: str | None = None) -> dict[str, bytes]:
        """One message of `kind` from each sender (to `to`), or PeerError at the deadline
        (time.monotonic()) naming who is missing. A peer that published `failed` ends the
        wait at once."""
        got: dict[str, bytes] = {}
        while True:
            for sender in senders:
                if sender not in got:
                    body = self.read(kind, sender, to)
                    if body is not None:
                        got[sender] = body
                    elif self.read("failed", sender) is not None:
                        raise PeerError(f"member {sender!r} gave up before its {kind}")
            if len(got) == len(senders):
                return got
            if time.monotonic() > deadline:
                missing = sorted(set(senders) - set(got))
                raise PeerError(f"no {kind} from {', '.join(map(repr, missing))} in time")
            time.sleep(POLL)
