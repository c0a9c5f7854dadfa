"""Single-use challenges: random values a caller signs to prove who it is, each taken
once, only before it expires, and only for the task and key it was issued for. The clock
is injected.

Challenges are issued per (task, key), a key named in a task the executor holds, with a
small cap each: one client can use up its own allowance, never another key's.
"""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable

from teeflow.attestation.evidence import NONCE_LEN
from teeflow.core.errors import AuthError, OverBudget

CHALLENGE_TTL = 120.0
MAX_PER_KEY = 8  # outstanding challenges per (task, key)


class Challenges:
    def __init__(self, clock: Callable[[], float], per_key: int = MAX_PER_KEY,
                 ttl: float = CHALLENGE_TTL) -> None:
        self._clock = clock
        self._per_key = per_key
        self._ttl = ttl
        self._lock = threading.Lock()
        # (task digest, key) -> challenge -> expiry, oldest first
        self._issued: dict[tuple[str, str], OrderedDict[bytes, float]] = {}

    def issue(self, task: str, key: str) -> bytes:
        """A challenge for `key` to act on `task` (the spec digest). The caller has checked
        that the task names the key; StateError when the key has its cap outstanding."""
        now = self._clock()
        value = secrets.token_bytes(NONCE_LEN)
        with self._lock:
            queue = self._issued.setdefault((task, key), OrderedDict())
            while queue and next(iter(queue.values())) < now:
                queue.popitem(last=False)
            if len(queue) >= self._per_key:
                raise OverBudget(f"{self._per_key} challenges already outstanding for this key "
                                 "on this task; use or let them expire")
            queue[value] = now + self._ttl
        return value

    def take(self, value: bytes, task: str, key: str) -> None:
        """Spend a challenge issued for (`task`, `key`), or AuthError if it was never
        issued for them, is spent or expired."""
        with self._lock:
            queue = self._issued.get((task, key))
            expires = queue.pop(value, None) if queue is not None else None
            if queue is not None and not queue:
                del self._issued[(task, key)]
        if expires is None or expires < self._clock():
            raise AuthError("challenge unknown, already used or expired")

    def forget(self, task: str) -> None:
        """Drop every challenge of a task that ended."""
        with self._lock:
            for k in [k for k in self._issued if k[0] == task]:
                del self._issued[k]
