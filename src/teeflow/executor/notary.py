"""The executor's signatures, all made with the attested TLS key: audit entries and the
result envelopes. Whoever appraised the executor's evidence knows that key, so a
signature by it can only come from the measured code. The key never leaves this object.
"""

from __future__ import annotations

import hashlib
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from teeflow.core import audit


class Notary:
    def __init__(self, tls_key: ec.EllipticCurvePrivateKey) -> None:
        spki = tls_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        self.tls_spki_hash = hashlib.sha256(spki).digest()
        self.signer = audit.p256_signer(spki)
        self._key = tls_key

    def sign(self, task_id: str, kind: str, body: dict[str, Any]) -> str:
        return audit.sign_p256(self._key, audit.signed_payload(task_id, kind, body))

    def entry(self, task_id: str, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        """A signed audit entry."""
        return {"kind": kind, "body": body, "signer": self.signer,
                "signature": self.sign(task_id, kind, body)}
