"""Executor registration: the scheduler probes only the address an executor proves.

The registrant sends its RA-TLS certificate and, signed with the key that certificate
binds (the executor's attested key, made inside the TEE), the address it serves at and
the node key registering it. Everything is checked before any connection is made:
the certificate's evidence must bind its key and the signature must verify under it, so
a registrant without that key cannot make the scheduler connect anywhere. Only then is
the address probed, and it must present that very certificate (a copied certificate
at another server's address fails here). What is recorded is still unverified evidence:
a listing and a routing hint; every owner appraises an executor itself.
"""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives import serialization

from teeflow.attestation.describe import claimed_measurements
from teeflow.attestation.ratls import read_certificate_evidence
from teeflow.core import api, audit
from teeflow.core.crypto import load_cert
from teeflow.core.errors import AttestationError, AuthError
from teeflow.net.executor_client import fetch_certificate, parse_address
from teeflow.scheduler.store import Store


def _der(cert: bytes) -> bytes:
    return load_cert(cert).public_bytes(serialization.Encoding.DER)


def check_registration(address: str, cert_pem: str, signature: str, host_key: str) -> str:
    """The normalised address, once the registration proves the attested key signed it
    for this host; AuthError (nothing contacted) otherwise."""
    host, port = parse_address(address)
    address = f"{host}:{port}"
    try:
        cert = load_cert(cert_pem.encode())
        read_certificate_evidence(cert_pem.encode())  # its evidence binds this key
    except (AuthError, AttestationError) as exc:
        raise AuthError(f"executor registration: the certificate is not an RA-TLS "
                        f"certificate: {exc}") from None
    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    task_id, kind, body = api.executor_registration(address, host_key)
    try:
        audit.verify_entry_signature(task_id, kind, body, audit.p256_signer(spki), signature)
    except AuthError:
        raise AuthError(f"executor registration for {address}: not signed by the "
                        "certificate's attested key for this address and node") from None
    return address


def register_executor(store: Store, address: str, cert_pem: str, signature: str,
                      host_key: str) -> dict[str, Any]:
    address = check_registration(address, cert_pem, signature, host_key)
    served = fetch_certificate(address)
    if _der(served) != _der(cert_pem.encode()):
        raise AuthError(f"executor registration: {address} presents another certificate "
                        "than the one registered")
    found = read_certificate_evidence(served)
    measurements = claimed_measurements(found.tee, found.quote)
    store.register_executor(address, served.decode(), found.tee, measurements, host_key)
    return {"address": address, "tee": found.tee, "measurements": measurements}
