"""Talking to an executor over Flight: pinned and attested, or (for routing only) unverified.

`attested_connect` is the I/O around the pure `appraise`: it reads the
executor's certificate, pins it, asks for evidence over the pinned channel
with a fresh nonce, and returns only if the evidence binds that certificate's
key and that nonce and passes the caller's own policy.
"""

from __future__ import annotations

import json
import secrets
import ssl
import time
from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow as pa
import pyarrow.flight as fl

from teeflow.attestation.evidence import Claims, Evidence, bind_report_data
from teeflow.attestation.policy import AppraisalPolicy, Verifier, appraise
from teeflow.attestation.ratls import read_certificate_evidence
from teeflow.core import answers, wire
from teeflow.core.answers import (
    Catalog,
    CatalogEntry,
    GlobalModel,
    ResultEnvelope,
    RoundReceipt,
    TaskStatus,
)
from teeflow.core.crypto import EXECUTOR_TLS_NAME, MAX_CERT, Signer, load_cert, spki_sha256
from teeflow.core.errors import InputError, TeeflowError, Unreachable
from teeflow.net.flight_errors import from_flight

CALL_TIMEOUT = 30.0


def parse_address(address: str) -> tuple[str, int]:
    text = address.removeprefix("grpc+tls://").strip()
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(f"executor address {address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def fetch_certificate(address: str, timeout: float = 10.0) -> bytes:
    """The certificate the executor presents. Unverified: appraisal decides."""
    host, port = parse_address(address)
    try:
        pem = ssl.get_server_certificate((host, port), timeout=timeout)
    except (OSError, ssl.SSLError) as exc:
        raise Unreachable(f"executor {address} unreachable: {exc}") from exc
    data = pem.encode()
    if len(data) > MAX_CERT:
        raise InputError("executor certificate too large")
    load_cert(data)
    return data


class ExecutorClient:
    def __init__(self, address: str, cert_pem: bytes | None,
                 timeout: float = CALL_TIMEOUT) -> None:
        host, port = parse_address(address)
        self.address = f"{host}:{port}"
        self.cert_pem = cert_pem
        if cert_pem is None:  # routing only: the scheduler never sends data
            self._client = fl.FlightClient(f"grpc+tls://{host}:{port}",
                                           disable_server_verification=True)
        else:
            self._client = fl.FlightClient(f"grpc+tls://{host}:{port}", tls_root_certs=cert_pem,
                                           override_hostname=EXECUTOR_TLS_NAME)
        self._options = fl.FlightCallOptions(timeout=timeout)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> ExecutorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def tls_key_hash(self) -> bytes:
        if self.cert_pem is None:
            raise InputError("unpinned connection has no attested key")
        return spki_sha256(self.cert_pem)

    def action(self, kind: str, body: bytes = b"") -> bytes:
        try:
            results = list(self._client.do_action(fl.Action(kind, body), options=self._options))
        except fl.FlightError as exc:
            raise from_flight(exc, self.address) from exc
        except OSError as exc:
            raise Unreachable(f"executor {self.address} unreachable: {exc}") from exc
        return results[0].body.to_pybytes() if results else b""

    def action_json(self, kind: str, body: bytes = b"") -> Any:
        return json.loads(self.action(kind, body))

    def evidence(self, nonce: bytes) -> Evidence:
        return Evidence.decode(self.action("evidence", nonce))

    def status(self, task: str) -> TaskStatus:
        """`task`: the spec digest (the executor's id for it), or an unambiguous task id."""
        return answers.decode(TaskStatus, self.action("status", task.encode()),
                              "executor status")

    def challenge(self, task_id: str, signer: Signer, spec_digest: str | None = None) -> bytes:
        """A single-use challenge for `signer`, an owner or receiver of the task, to sign."""
        at = int(time.time())
        signature = signer.sign(wire.challenge_message(task_id, self.tls_key_hash, at))
        return self.action("challenge", wire.canonical(_named(
            {"task_id": task_id, "key": signer.public_key(), "at": at,
             "signature": signature.hex()}, spec_digest)))

    def upload(self, task_id: str, dataset: str, signer: Signer, schema: pa.Schema,
               batches: Iterable[pa.RecordBatch], progress=None,
               spec_digest: str | None = None, pool: list[str] | None = None
               ) -> dict[str, Any]:
        """Stream batches under a signed, single-use challenge. Returns the executor's receipt.
        Name the task by its `spec_digest` too: its task id alone may be taken by another.
        `pool`: a pool member's part, signed with every member's attested key, in order."""
        challenge = self.challenge(task_id, signer, spec_digest)
        signature = signer.sign(wire.upload_message(task_id, dataset, challenge,
                                                    self.tls_key_hash, pool))
        command = wire.canonical(_named({"task_id": task_id, "dataset": dataset,
                                         "challenge": challenge.hex(),
                                         "signature": signature.hex()}, spec_digest))
        descriptor = fl.FlightDescriptor.for_command(command)
        try:
            writer, meta = self._client.do_put(descriptor, schema, options=self._options_long())
            with writer:
                rows = count = 0
                for batch in batches:
                    writer.write_batch(batch)
                    rows += batch.num_rows
                    count += 1
                    if progress is not None:
                        progress(batch.num_rows)
                writer.write_metadata(pa.py_buffer(wire.end_marker(rows, count)))
                writer.done_writing()
                receipt = meta.read()
        except fl.FlightError as exc:
            raise from_flight(exc, self.address) from exc
        return json.loads(receipt.to_pybytes()) if receipt is not None else {}

    def _options_long(self) -> fl.FlightCallOptions:
        return fl.FlightCallOptions(timeout=3600.0)

    def federated(self, kind: str, task_id: str, dataset: str, round_: int, signer: Signer,
                  update: dict[str, Any] | None = None, spec_digest: str | None = None
                  ) -> GlobalModel | RoundReceipt:
        """A signed federated-round call: `fl-model` (read the global model) or `fl-update`
        (send this owner's update), answered with a GlobalModel or a RoundReceipt."""
        challenge = self.challenge(task_id, signer, spec_digest)
        payload = wire.canonical(update) if update is not None else b""
        signature = signer.sign(wire.fl_message(kind, task_id, dataset, round_, challenge,
                                                self.tls_key_hash, payload))
        body: dict[str, Any] = {"task_id": task_id, "dataset": dataset, "round": round_,
                                "challenge": challenge.hex(), "signature": signature.hex()}
        if update is not None:
            body["update"] = update
        data = self.action(kind, wire.canonical(_named(body, spec_digest)))
        if kind == "fl-model":
            return answers.decode(GlobalModel, data, kind)
        return answers.decode(RoundReceipt, data, kind)

    def catalog(self) -> dict[str, CatalogEntry]:
        """The computations this executor runs, by name, with the digest of their code. Only
        worth trusting over an attested, pinned channel (``attested_connect``): then it comes
        from the measured code itself."""
        listing = answers.decode(Catalog, self.action("catalog"), "executor catalog")
        return {c.name: c for c in listing.computations}

    def take_result(self, task_id: str, signer: Signer,
                    spec_digest: str | None = None) -> ResultEnvelope:
        """The result envelope sealed to `signer`'s identity (a receiver of the task); its
        signature and seal are for the caller to check (`sdk.Client.result`)."""
        challenge = self.challenge(task_id, signer, spec_digest)
        signature = signer.sign(wire.result_message(task_id, challenge, self.tls_key_hash))
        return answers.decode(ResultEnvelope, self.action("result", wire.canonical(_named(
            {"task_id": task_id, "receiver": signer.public_key(), "challenge": challenge.hex(),
             "signature": signature.hex()}, spec_digest))), "result envelope")


def _named(body: dict[str, Any], spec_digest: str | None) -> dict[str, Any]:
    """A request body naming its task by spec digest too, when the caller knows it."""
    return {**body, "spec_digest": spec_digest} if spec_digest is not None else body


def attested_connect(address: str, policy: AppraisalPolicy, verifiers: Mapping[str, Verifier],
                     at: int | None = None) -> tuple[ExecutorClient, Claims]:
    """A client pinned to the executor's certificate, and the claims that justify it.

    Two appraisals, both against `policy`: the RA-TLS evidence inside the
    certificate (it binds the certificate's key), then fresh evidence for a nonce
    chosen here, asked over the pinned channel (it proves the TEE is live now).
    Raises (and closes the client) if either fails.
    """
    cert = fetch_certificate(address)
    when = int(time.time()) if at is None else at
    embedded = read_certificate_evidence(cert)
    appraise(embedded.evidence(), policy, verifiers,
             expected_report_data=embedded.report_data, at=when)
    client = ExecutorClient(address, cert)
    try:
        nonce = secrets.token_bytes(32)
        evidence = client.evidence(nonce)
        claims = appraise(evidence, policy, verifiers,
                          expected_report_data=bind_report_data(spki_sha256(cert), nonce),
                          at=when)
    except TeeflowError:
        client.close()
        raise
    return client, claims
