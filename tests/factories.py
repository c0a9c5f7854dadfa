"""Builders shared by the tests: signed task specs and approvals, executor keys and entries,
Flight servers on port 0, a signed client of the scheduler's app, and the CLI run as a
subprocess."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pyarrow.flight as fl
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from teeflow import compute
from teeflow.attestation.policy import AppraisalPolicy, load_policy
from teeflow.attestation.registry import make_verifiers
from teeflow.attestation.simulated import code_measurement
from teeflow.core import audit, auth, wire
from teeflow.core.crypto import KeySigner
from teeflow.net.executor_client import ExecutorClient, attested_connect
from teeflow.scheduler.app import create_app
from teeflow.scheduler.service import Scheduler
from teeflow.scheduler.store import Store

with warnings.catch_warnings():
    # starlette warns at import when it finds httpx rather than httpx2; nothing we can act on
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from fastapi.testclient import TestClient


FAR_FUTURE = 4_102_444_800  # 2100-01-01, unix seconds
SRC = Path(__file__).resolve().parents[1] / "src"


def simulated_policy(measurement: str | None = None) -> dict:
    return load_policy({"tee_types": ["simulated"], "allow_simulated": True,
                        "simulated": {"measurement": [measurement or code_measurement()]}}
                       ).to_dict()


def receiver(key: KeySigner) -> wire.Receiver:
    return wire.Receiver(key.public_key(), key.encryption_public_key())


def make_spec(datasets: Sequence[tuple[str, str, KeySigner, str]], initiator: KeySigner,
              compute_name: str = "model_aggregation", params: dict | None = None,
              task_id: str = "task0001", receivers: Sequence[KeySigner] | None = None,
              policy: dict | None = None, **consent: Any) -> wire.TaskSpec:
    """datasets: (name, owner name, owner key, schema fingerprint). A nonce and an expiry
    (far ahead: tests move their clocks), the same for the same task id and initiator so
    that building a spec twice gives one digest, unless `consent` says (nonce, expires,
    runs, executor_key)."""
    seed = f"{task_id}:{initiator.public_key()}".encode()
    consent = {"nonce": hashlib.sha256(seed).hexdigest()[:32], "expires": FAR_FUTURE,
               **consent}
    return wire.TaskSpec(
        task_id=task_id, compute=compute_name,
        code_digest=compute.get(compute_name).code_digest, params=dict(params or {}),
        datasets=tuple(wire.DatasetRef(n, o, k.public_key(), fp) for n, o, k, fp in datasets),
        executor_policy=policy or simulated_policy(),
        receivers=tuple(receiver(r) for r in (receivers or [initiator])),
        initiator_key=initiator.public_key(), **consent)


def sign_entry(key: KeySigner, task_id: str, kind: str, body: dict) -> str:
    return base64.b64encode(key.sign(audit.signed_payload(task_id, kind, body))).decode()


def submit_signature(spec: wire.TaskSpec, initiator: KeySigner) -> str:
    return sign_entry(initiator, spec.task_id, "submitted",
                      {"spec": spec.to_dict(), "spec_digest": spec.digest()})


def approval(spec: wire.TaskSpec, owner: KeySigner, decision: str = "approved") -> dict:
    """As the scheduler relays it to the executor."""
    return {"signer": audit.ed25519_signer(owner.public_key()),
            "signature": sign_entry(owner, spec.task_id, decision,
                                    {"spec_digest": spec.digest()})}


# -- keys ----------------------------------------------------------------------------------


def p256_signer(key: ec.EllipticCurvePrivateKey) -> str:
    """The audit signer name of an executor's P-256 (TLS) key."""
    return audit.p256_signer(key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))


def executor_entry(key: ec.EllipticCurvePrivateKey, task_id: str, kind: str,
                   body: dict) -> dict:
    """An audit entry signed by an executor's key, as the executor's status carries it."""
    return {"kind": kind, "body": body, "signer": p256_signer(key),
            "signature": audit.sign_p256(key, audit.signed_payload(task_id, kind, body))}


# -- executors -----------------------------------------------------------------------------


def appraisal_policy(measurement: str | None = None) -> AppraisalPolicy:
    """A policy that accepts the simulated executor of this tree (or `measurement`)."""
    return load_policy(simulated_policy(measurement))


def attested_client(address: str, policy: AppraisalPolicy | None = None) -> ExecutorClient:
    """A client of the executor at `address`, attested under `policy` as a provider would."""
    client, _ = attested_connect(address, policy or appraisal_policy(), make_verifiers())
    return client


class Serving:
    """A Flight server on port 0, served from a thread until stop()."""

    def __init__(self, server: fl.FlightServerBase) -> None:
        self.server = server
        self.thread = threading.Thread(target=server.serve, daemon=True)
        self.thread.start()
        self.address = f"127.0.0.1:{server.port}"

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join(timeout=10)


# -- the scheduler's HTTP API --------------------------------------------------------------


MEMBER = ("owner", "initiator", "executor_host")  # every role but auditor's (reads all)


class SignedClient:
    """The scheduler app behind a TestClient, called with requests signed as core/auth.py
    signs them (or, for the tests of that, unsigned)."""

    def __init__(self, client: TestClient, store: Store | None = None) -> None:
        self.client = client
        self.store = store

    @staticmethod
    def signed(signer: KeySigner, method: str, target: str, body: object = None,
               now: float | None = None) -> tuple[dict[str, str], bytes]:
        """(headers, body bytes) of a signed request."""
        raw = b"" if body is None else json.dumps(body).encode()
        return auth.sign_request(signer, method, target, raw,
                                 int(time.time() if now is None else now)), raw

    def call(self, signer: KeySigner, method: str, path: str, body: object = None,
             params: dict | None = None, raw: bytes | None = None, now: float | None = None):
        content = raw if raw is not None else b"" if body is None else json.dumps(body).encode()
        target = path + ("?" + urlencode(params) if params else "")
        headers = auth.sign_request(signer, method, target, content,
                                    int(time.time() if now is None else now))
        if content:
            headers["content-type"] = "application/json"
        return self.client.request(method, target, content=content, headers=headers)

    def send(self, method: str, target: str, body: object = None,
             headers: dict[str, str] | None = None):
        """Unsigned, or with headers made by hand."""
        raw = b"" if body is None else json.dumps(body).encode()
        return self.client.request(method, target, content=raw, headers={
            "content-type": "application/json", **(headers or {})})

    def register_node(self, name: str, key: KeySigner, signer: KeySigner | None = None,
                      roles: Sequence[str] = MEMBER, **overrides):
        """POST /v1/nodes for `key`, signed by `signer` (by `key` itself unless given),
        joining with a fresh invitation for `roles` that the operator (the store) makes,
        unless `invite` is given (None: join with none)."""
        if "invite" not in overrides and self.store is not None:
            overrides["invite"] = self.store.invite(roles, name)
        return self.call(signer or key, "POST", "/v1/nodes", {
            "name": name, "public_key": key.public_key(),
            "enc_key": key.encryption_public_key(), **overrides})


@contextmanager
def scheduler_app(store: Store, scheduler: Scheduler | None = None,
                  **app_args: Any) -> Iterator[SignedClient]:
    """The app with its lifespan running; a long tick, so its monitor runs once at start
    and the tests call tick() themselves."""
    with TestClient(create_app(store, scheduler, **{"tick": 3600, **app_args})) as client:
        yield SignedClient(client, store)


def executor_registration(server: Any, address: str, host: KeySigner) -> dict:
    """The body of POST /v1/executors: the executor `server` (an ExecutorFlightServer)
    proves with its attested key that it serves at `address` for node `host`."""
    cert_pem, signature = server.registration(address, host.public_key())
    return {"address": address, "cert_pem": cert_pem, "signature": signature}


def join(store: Store, name: str, key: KeySigner, roles: Sequence[str] = MEMBER) -> None:
    """Register a node straight in the store, with an invitation made for it."""
    store.register_node(name, key.public_key(), key.encryption_public_key(),
                        store.invite(roles, name))


def challenge_for(executor: Any, task: str, signer: KeySigner, as_key: str | None = None,
                  at: int | None = None) -> bytes:
    """A challenge from `executor` (an `Executor`), asked for by `signer` (claiming
    `as_key`, by default its own key) for `task` (spec digest or task id)."""
    when = int(time.time()) if at is None else at
    task_id = executor.status(task)["task_id"]
    signature = signer.sign(wire.challenge_message(task_id, executor.tls_spki_hash, when))
    return executor.challenge(task, as_key or signer.public_key(), when, signature)


def wait_task_state(client: Any, task_id: str, states: set[str], timeout: float = 60) -> dict:
    """Poll an SDK client until the task reaches one of `states` (a bound, not a timed assert)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        task = client.task(task_id)
        if task["state"] in states:
            return task
        time.sleep(0.1)
    raise AssertionError(f"task {task_id} never reached {states}: {client.task(task_id)}")


def run_cli(*args: str, env: Mapping[str, str] | None = None, input: str | None = None,
            columns: int = 80, timeout: float = 180) -> subprocess.CompletedProcess:
    """`teeflow ARGS` as a user runs it: a subprocess of this Python over this tree's source
    (unless PYTHONPATH says otherwise), with os.environ and then `env`; output as text."""
    full = {**os.environ, "COLUMNS": str(columns), **(env or {})}
    full.setdefault("PYTHONPATH", str(SRC))
    return subprocess.run([sys.executable, "-m", "teeflow.cli.main", *args], env=full,
                          input=input, capture_output=True, text=True, timeout=timeout)
