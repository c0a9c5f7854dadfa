"""Sealing results to their receivers with HPKE (RFC 9180), bound to the task digest.

Suite: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20-Poly1305, base mode.
The `info` string carries the task digest, so a sealed result opens only as the
result of the task whose spec the owners signed.
"""

from __future__ import annotations

import base64

from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.hpke import AEAD, KDF, KEM, Suite

from teeflow.core.errors import AuthError

SUITE = Suite(KEM.X25519, KDF.HKDF_SHA256, AEAD.CHACHA20_POLY1305)
SUITE_NAME = "DHKEM(X25519,HKDF-SHA256)/HKDF-SHA256/ChaCha20Poly1305"


def _info(task_digest: str) -> bytes:
    return b"teeflow-result-v1:" + task_digest.encode()


def seal(plaintext: bytes, receiver_key_b64: str, task_digest: str) -> bytes:
    try:
        key = x25519.X25519PublicKey.from_public_bytes(
            base64.b64decode(receiver_key_b64, validate=True))
    except ValueError as exc:
        raise AuthError("receiver encryption key is not a base64 X25519 key") from exc
    return SUITE.encrypt(plaintext, key, info=_info(task_digest))


def open_sealed(ciphertext: bytes, private_key: x25519.X25519PrivateKey,
                task_digest: str) -> bytes:
    """The plaintext, or AuthError if this key or this task digest does not open it."""
    try:
        return SUITE.decrypt(ciphertext, private_key, info=_info(task_digest))
    except Exception as exc:  # cryptography raises InvalidTag and friends
        raise AuthError("sealed result does not open with this key for this task") from exc
