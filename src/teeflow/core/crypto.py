"""Keys, signatures and the executor's TLS certificate.

Node identities are Ed25519 keys. Signing goes through the small `Signer`
interface so a file key, an HSM or a test fake plug in the same way.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
from typing import Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, x25519
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import NameOID

from teeflow.core.errors import AuthError

# The name the executor's certificate carries; clients pin the certificate
# itself, so the name only has to match what they ask gRPC to check.
EXECUTOR_TLS_NAME = "teeflow-executor"


class Signer(Protocol):
    def public_key(self) -> str:
        """The base64 raw Ed25519 public key."""
        ...

    def sign(self, message: bytes) -> bytes: ...


class Identity(Signer, Protocol):
    """A node's keys: Ed25519 to sign, X25519 (for HPKE) to receive sealed results."""

    def encryption_public_key(self) -> str: ...

    def encryption_private_key(self) -> x25519.X25519PrivateKey: ...


class KeySigner:
    """A Signer over an in-memory Ed25519 private key."""

    def __init__(self, key: ed25519.Ed25519PrivateKey) -> None:
        self._key = key

    @classmethod
    def generate(cls) -> KeySigner:
        return cls(ed25519.Ed25519PrivateKey.generate())

    def public_key(self) -> str:
        raw = self._key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return base64.b64encode(raw).decode()

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)

    def encryption_private_key(self) -> x25519.X25519PrivateKey:
        """Derived from the signing key, so one key file holds a node's whole identity."""
        seed = self._key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        raw = HKDF(hashes.SHA256(), 32, salt=None, info=b"teeflow x25519 v1").derive(seed)
        return x25519.X25519PrivateKey.from_private_bytes(raw)

    def encryption_public_key(self) -> str:
        raw = self.encryption_private_key().public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return base64.b64encode(raw).decode()

    def private_pem(self) -> bytes:
        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def verify_signature(public_key_b64: str, signature: bytes, message: bytes) -> None:
    """Raise AuthError unless `signature` is the key's signature over `message`."""
    try:
        raw = base64.b64decode(public_key_b64, validate=True)
        key = ed25519.Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise AuthError("public key is not a base64 Ed25519 key") from exc
    try:
        key.verify(signature, message)
    except InvalidSignature as exc:
        raise AuthError("signature does not verify") from exc


def check_public_key(public_key_b64: str) -> str:
    try:
        raw = base64.b64decode(public_key_b64, validate=True)
        ed25519.Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise AuthError("public key is not a base64 Ed25519 key") from exc
    return public_key_b64


def check_encryption_key(public_key_b64: str) -> str:
    try:
        raw = base64.b64decode(public_key_b64, validate=True)
        x25519.X25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise AuthError("encryption key is not a base64 X25519 key") from exc
    return public_key_b64


def key_id(public_key_b64: str) -> str:
    """A short printable id for a public key."""
    return hashlib.sha256(public_key_b64.encode()).hexdigest()[:16]


CERT_BACKDATE = datetime.timedelta(minutes=5)
CERT_VALIDITY = datetime.timedelta(days=30)


def self_signed_certificate(
    key: ec.EllipticCurvePrivateKey,
    extensions: list[x509.ExtensionType] | None = None,
    *,
    now: datetime.datetime | None = None,
    common_name: str = EXECUTOR_TLS_NAME,
    dns_name: str = EXECUTOR_TLS_NAME,
    ca: bool = True,
) -> x509.Certificate:
    """The executor's certificate for its key (by default). Extra extensions are
    non-critical: a TLS stack refuses a certificate with a critical extension it does not
    know (and Gramine's verifier refuses a critical evidence extension). CA=true lets a
    client pin it as a root; a pool member's says CA=false (executor/pool/identity.py).
    """
    now = now or datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CERT_BACKDATE)
        .not_valid_after(now + CERT_VALIDITY)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns_name)]), False)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), True)
    )
    for ext in extensions or []:
        builder = builder.add_extension(ext, critical=False)
    return builder.sign(key, hashes.SHA256())


def make_tls_identity(
    extensions: list[x509.ExtensionType] | None = None,
) -> tuple[bytes, bytes, ec.EllipticCurvePrivateKey]:
    """A fresh P-256 key and a self-signed certificate: (cert_pem, key_pem, key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = self_signed_certificate(key, extensions)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem, key


MAX_CERT = 64 * 1024


def load_cert(cert: bytes) -> x509.Certificate:
    if len(cert) > MAX_CERT:
        raise AuthError(f"certificate larger than {MAX_CERT} bytes")
    try:
        if cert.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(cert)
        return x509.load_der_x509_certificate(cert)
    except ValueError as exc:
        raise AuthError("not an X.509 certificate") from exc


def spki_sha256(cert: bytes) -> bytes:
    """SHA-256 of the certificate's DER SubjectPublicKeyInfo: what evidence binds."""
    spki = load_cert(cert).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).digest()
