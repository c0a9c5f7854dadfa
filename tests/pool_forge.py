"""Forged pool identities for the attack tests (imported by tests and by tests/pool_rogue.py)."""

from __future__ import annotations

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from teeflow.attestation.ratls import evidence_extension, make_claims, report_data_for_claims
from teeflow.attestation.registry import TeeBackend
from teeflow.executor.pool.identity import MemberIdentity, member_certificate


def _spki(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def other_key_identity(backend: TeeBackend) -> MemberIdentity:
    """A certificate for key A whose (genuine) evidence binds key B: the TEE vouches for a
    key the certificate's holder does not present."""
    presented, attested = (ec.generate_private_key(ec.SECP256R1()) for _ in range(2))
    claims = make_claims(_spki(attested))
    evidence = backend.evidence(report_data_for_claims(claims))
    cert = member_certificate(presented, evidence_extension(evidence.tee, evidence.quote,
                                                            claims))
    key_pem = presented.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())
    return MemberIdentity(cert.public_bytes(serialization.Encoding.PEM), key_pem)
