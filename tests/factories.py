"""Builders for signed task specs, approvals and executors, shared by the tests."""

from __future__ import annotations

import base64
from collections.abc import Sequence

from teeflow import compute
from teeflow.attestation.policy import load_policy
from teeflow.attestation.simulated import code_measurement
from teeflow.core import audit, wire
from teeflow.core.crypto import KeySigner


def simulated_policy(measurement: str | None = None) -> dict:
    return load_policy({"tee_types": ["simulated"], "allow_simulated": True,
                        "simulated": {"measurement": [measurement or code_measurement()]}}
                       ).to_dict()


def receiver(key: KeySigner) -> wire.Receiver:
    return wire.Receiver(key.public_key(), key.encryption_public_key())


def make_spec(datasets: Sequence[tuple[str, str, KeySigner, str]], initiator: KeySigner,
              compute_name: str = "model_aggregation", params: dict | None = None,
              task_id: str = "task0001", receivers: Sequence[KeySigner] | None = None,
              policy: dict | None = None) -> wire.TaskSpec:
    """datasets: (name, owner name, owner key, schema fingerprint)."""
    return wire.TaskSpec(
        task_id=task_id, compute=compute_name,
        code_digest=compute.get(compute_name).code_digest, params=dict(params or {}),
        datasets=tuple(wire.DatasetRef(n, o, k.public_key(), fp) for n, o, k, fp in datasets),
        executor_policy=policy or simulated_policy(),
        receivers=tuple(receiver(r) for r in (receivers or [initiator])),
        initiator_key=initiator.public_key())


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
