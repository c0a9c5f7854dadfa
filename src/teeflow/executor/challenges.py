"""Single-use challenges: random values a caller signs to prove who it is, each taken
once and only before it expires. The clock is injected."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable

from teeflow.attestation.evidence import NONCE_LEN
from teeflow.core.errors import AuthError, StateError

CHALLENGE_TTL = 120.0
MAX_CHALLENGES = 10_000


class Challenges:
    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._expiry: dict[bytes, float] = {}

    def issue(self) -> bytes:
        now = self._clock()
        value = secrets.token_bytes(NONCE_LEN)
        with self._lock:
            expired = [c for c, t in self._expiry.items() if t < now]
            for c in expired:
                del self._expiry[c]
            if len(self._expiry) >= MAX_CHALLENGES:
                raise StateError("too many outstanding challenges; try again later")
            self._expiry[value] = now + CHALLENGE_TTL
        return value

    def take(self, value: bytes) -> None:
        """Spend a challenge, or AuthError if it was never issued, is spent or expired."""
        with self._lock:
            expires = self._expiry.pop(value, None)
        if expires is None or expires < self._clock():
            raise AuthError("challenge unknown, already used or expired")
