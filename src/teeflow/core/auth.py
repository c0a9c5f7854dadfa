"""Signed requests to the scheduler: who sent it, and that it is not a replay.

Pure: the server side takes the clock value and a nonce check as arguments.
Headers: X-Teeflow-Key (Ed25519 public key), X-Teeflow-Time (unix seconds),
X-Teeflow-Nonce (random hex), X-Teeflow-Signature over
"teeflow-req-v1" METHOD PATH?QUERY TIME NONCE SHA256(BODY), newline-separated.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import Callable, Mapping

from teeflow.core.crypto import Signer, check_public_key, verify_signature
from teeflow.core.errors import AuthError

WINDOW = 300  # seconds of clock skew tolerated; nonces are remembered at least this long
KEY, TIME, NONCE, SIGNATURE = ("x-teeflow-key", "x-teeflow-time", "x-teeflow-nonce",
                               "x-teeflow-signature")


def message(method: str, target: str, time: int, nonce: str, body: bytes) -> bytes:
    return "\n".join(["teeflow-req-v1", method.upper(), target, str(time), nonce,
                      hashlib.sha256(body).hexdigest()]).encode()


def sign_request(signer: Signer, method: str, target: str, body: bytes,
                 now: int) -> dict[str, str]:
    nonce = secrets.token_hex(16)
    sig = signer.sign(message(method, target, now, nonce, body))
    return {KEY: signer.public_key(), TIME: str(now), NONCE: nonce,
            SIGNATURE: base64.b64encode(sig).decode()}


def verify_request(method: str, target: str, headers: Mapping[str, str], body: bytes,
                   now: int, fresh_nonce: Callable[[str, str, int], bool]) -> str:
    """The sender's public key, or AuthError. `fresh_nonce(key, nonce, expires)` must
    record the nonce and say whether it was new."""
    key, time_text, nonce, sig_text = (headers.get(h) for h in (KEY, TIME, NONCE, SIGNATURE))
    if not key or not time_text or not nonce or not sig_text:
        raise AuthError("request is not signed (X-Teeflow-* headers missing)")
    check_public_key(key)
    if not (time_text.isascii() and time_text.isdigit()) or abs(int(time_text) - now) > WINDOW:
        raise AuthError("request time is outside the accepted window (clock skew or replay)")
    if not 16 <= len(nonce) <= 64 or not all(c in "0123456789abcdef" for c in nonce):
        raise AuthError("request nonce must be 16 to 64 lower-case hex digits")
    try:
        sig = base64.b64decode(sig_text, validate=True)
    except ValueError as exc:
        raise AuthError("request signature is not base64") from exc
    verify_signature(key, sig, message(method, target, int(time_text), nonce, body))
    if not fresh_nonce(key, nonce, int(time_text) + 2 * WINDOW):
        raise AuthError("request nonce was already used (replay)")
    return key
