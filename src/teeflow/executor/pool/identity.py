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
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from teeflow.attestation.evidence import Evidence, bind_report_data
from teeflow.attestation.ratls import (
    evidence_extension,
    make_claims,
    read_certificate_evidence,
    report_data_for_claims,
)
from teeflow.attestation.registry import TeeBackend
from teeflow.core.crypto import CERT_BACKDATE, CERT_VALIDITY, load_cert, spki_sha256
from teeflow.core.errors import EvidenceFormatError

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
    key = ec.generate_private_key(ec.SECP256R1())
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    claims = make_claims(spki)
    evidence = backend.evidence(report_data_for_claims(claims))
    if evidence.tee != backend.tee:
        raise EvidenceFormatError(
            f"backend {backend.tee!r} produced evidence for {evidence.tee!r}")
    extension = evidence_extension(evidence.tee, evidence.quote, claims)
    cert = member_certificate(key, extension, now=now)
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    read_certificate_evidence(cert_pem)  # what we emit must be what we accept
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return MemberIdentity(cert_pem=cert_pem, key_pem=key_pem)


def member_certificate(key: ec.EllipticCurvePrivateKey, evidence: x509.ExtensionType, *,
                       now: datetime.datetime | None = None) -> x509.Certificate:
    """A self-signed, CA=false certificate for `key` with the evidence extension."""
    now = now or datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, member_cn(key.public_key()))])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CERT_BACKDATE)
        .not_valid_after(now + CERT_VALIDITY)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(POOL_TLS_NAME)]), False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        .add_extension(evidence, critical=False)
        .sign(key, hashes.SHA256())
    )


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
