"""A pool member's TLS identity: a fresh key and a self-signed certificate whose RA-TLS
evidence binds that key, and fresh evidence for a peer's nonce.

The certificate is the executor's RA-TLS format (attestation/ratls.py) with one
difference: BasicConstraints CA=false. Members trust each other's certificates as TLS
anchors; the executor's certificates say CA=true (gRPC pins them as roots), and a trust
anchor with CA=true would let its key sign a certificate for any other key, which OpenSSL
would then accept as that member. With CA=false only the pinned certificate itself verifies.
"""

from __future__ import annotations

import datetime
import hashlib
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from teeflow.attestation.evidence import Evidence, bind_report_data
from teeflow.attestation.ratls import make_ratls_identity
from teeflow.attestation.registry import TeeBackend
from teeflow.core.crypto import load_cert, self_signed_certificate, spki_sha256

POOL_TLS_NAME = "teeflow-pool-member"


@dataclass(frozen=True)
class MemberIdentity:
    """What a member holds: its certificate (public) and key (never leaves the TEE)."""

    cert_pem: bytes
    key_pem: bytes = field(repr=False)  # never in a log line or a traceback

    @property
    def spki_sha256(self) -> bytes:
        return spki_sha256(self.cert_pem)


def make_member_identity(backend: TeeBackend, *,
                         now: datetime.datetime | None = None) -> MemberIdentity:
    """A fresh P-256 key and its CA=false self-signed certificate carrying evidence for it."""
    cert_pem, key_pem = make_ratls_identity(backend, now=now, certify=member_certificate)
    return MemberIdentity(cert_pem=cert_pem, key_pem=key_pem)


def member_certificate(key: ec.EllipticCurvePrivateKey, evidence: x509.ExtensionType,
                       now: datetime.datetime | None = None) -> x509.Certificate:
    """A self-signed, CA=false certificate for `key` with the evidence extension."""
    return self_signed_certificate(key, [evidence], now=now,
                                   common_name=member_cn(key.public_key()),
                                   dns_name=POOL_TLS_NAME, ca=False)


def member_cn(public_key: ec.EllipticCurvePublicKey) -> str:
    """A subject name of the member's own: OpenSSL finds trust anchors by subject name, and
    with two anchors of one name it may try the wrong one and refuse the right peer."""
    spki = public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    return f"{POOL_TLS_NAME}-{hashlib.sha256(spki).hexdigest()[:32]}"


def answer_nonce(backend: TeeBackend, identity: MemberIdentity, nonce: bytes) -> Evidence:
    """Fresh evidence binding this member's TLS key and a peer's nonce."""
    return backend.evidence(bind_report_data(identity.spki_sha256, nonce))


def fingerprint(cert_pem: bytes) -> str:
    """SHA-256 of the certificate's DER, hex: what a member pins."""
    der = load_cert(cert_pem).public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()
