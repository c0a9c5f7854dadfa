"""Executor registration: the scheduler reads the certificate an address serves and
records what its RA-TLS evidence claims. Unverified: a listing and a routing hint;
every owner appraises an executor itself before sending it anything."""

from __future__ import annotations

from typing import Any

from teeflow.attestation.describe import claimed_measurements
from teeflow.attestation.ratls import read_certificate_evidence
from teeflow.net.executor_client import fetch_certificate, parse_address
from teeflow.scheduler.store import Store


def register_executor(store: Store, address: str) -> dict[str, Any]:
    host, port = parse_address(address)
    address = f"{host}:{port}"
    cert = fetch_certificate(address)
    found = read_certificate_evidence(cert)
    measurements = claimed_measurements(found.tee, found.quote)
    store.register_executor(address, cert.decode(), found.tee, measurements)
    return {"address": address, "tee": found.tee, "measurements": measurements}
