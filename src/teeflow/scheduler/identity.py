"""The scheduler's own identity, kept in its data dir and made on first start:

- `scheduler-tls-key.pem` + `scheduler-tls-cert.pem`: a P-256 key and a self-signed
  certificate the HTTPS API serves; nodes pin its SHA-256 (from their invitation);
- `scheduler-signing-key.pem`: an Ed25519 key for what the scheduler signs itself
  (e.g. log checkpoints); owner-only, like every key file.

Nothing here trusts the scheduler: the identity only lets nodes know they talk to the
same scheduler every time.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from teeflow.core.crypto import KeySigner, load_cert
from teeflow.core.errors import ConfigError
from teeflow.files.keys import load_or_create_key

TLS_KEY = "scheduler-tls-key.pem"
TLS_CERT = "scheduler-tls-cert.pem"
SIGNING_KEY = "scheduler-signing-key.pem"
CERT_VALIDITY = datetime.timedelta(days=3650)  # pinned by fingerprint, not by date


@dataclass(frozen=True)
class SchedulerIdentity:
    cert_file: Path
    key_file: Path
    signing_key_file: Path

    @property
    def cert_pem(self) -> bytes:
        return self.cert_file.read_bytes()

    @property
    def fingerprint(self) -> str:
        """What nodes pin: "sha256:" + hex SHA-256 of the DER certificate."""
        return cert_fingerprint(self.cert_pem)

    def signer(self) -> KeySigner:
        return load_or_create_key(self.signing_key_file)


def cert_fingerprint(cert: bytes) -> str:
    der = load_cert(cert).public_bytes(serialization.Encoding.DER)
    return "sha256:" + hashlib.sha256(der).hexdigest()


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _certificate(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "teeflow scheduler")])
    names: list[x509.GeneralName] = [x509.DNSName("localhost"),
                                     x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + CERT_VALIDITY)
            .add_extension(x509.SubjectAlternativeName(names), False)
            # a root nodes pin, that can sign no other certificate
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), True)
            .sign(key, hashes.SHA256()))


def load_or_create(data_dir: str | Path) -> SchedulerIdentity:
    """The identity in `data_dir`, made there (owner-only files) if it has none yet."""
    d = Path(data_dir)
    d.mkdir(parents=True, exist_ok=True)
    ident = SchedulerIdentity(d / TLS_CERT, d / TLS_KEY, d / SIGNING_KEY)
    if not ident.key_file.exists():
        key = ec.generate_private_key(ec.SECP256R1())
        _write_private(ident.key_file, key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        ident.cert_file.unlink(missing_ok=True)
    if not ident.cert_file.exists():
        loaded = serialization.load_pem_private_key(ident.key_file.read_bytes(), password=None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"{ident.key_file}: not the scheduler's P-256 TLS key")
        ident.cert_file.write_bytes(
            _certificate(loaded).public_bytes(serialization.Encoding.PEM))
    ident.signer()  # make the signing key now, so the operator can publish its public half
    return ident
