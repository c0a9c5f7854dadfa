"""The Python SDK: build and sign a task, wait for its owners and its run, open its result.

    from teeflow.sdk import Client
    client = Client("https://127.0.0.1:8700#sha256:<fingerprint>",  # pinned, from the invite
                    key="~/.config/teeflow/key.pem", policy=policy,
                    name="carol", invite="tfi_...")    # registers carol's keys if needed
    task = client.submit(["train_party_1", "train_party_2"], executor="127.0.0.1:8815",
                         compute="logistic_regression", params={"label": "y"})
    client.wait(task["id"])
    result = client.result(task["id"])       # appraises the executor, opens the sealed result
    result.value["coefficients"]            # in the model's column order
    result.to_sklearn().predict(frame)       # a fitted scikit-learn estimator
    # a sql or user_code task: result.to_arrow(), .to_pandas(), .to_polars()

Every spec this client signs is recorded next to its key (files/signed_specs.py): a result
is taken only for that digest, from that executor (sdk/pin.py), whatever the scheduler says.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import secrets
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from teeflow import compute
from teeflow.attestation.collateral import CollateralSource
from teeflow.attestation.evidence import Claims
from teeflow.attestation.policy import AppraisalPolicy
from teeflow.attestation.registry import make_verifiers
from teeflow.compute.params import param_text
from teeflow.core import audit, wire
from teeflow.core.answers import CatalogEntry, ResultEnvelope
from teeflow.core.crypto import Identity
from teeflow.core.errors import (
    AuthError,
    ConfigError,
    InputError,
    NotReleased,
    TaskFailed,
    TeeflowError,
)
from teeflow.core.seal import open_sealed
from teeflow.files.checkpoints import checkpoint_path
from teeflow.files.keys import load_existing_key, load_or_create_key
from teeflow.files.signed_specs import SignedSpecs, specs_path
from teeflow.net.executor_client import attested_connect
from teeflow.net.scheduler_client import SchedulerClient
from teeflow.sdk import pin
from teeflow.sdk.results import Result, ordered

DEFAULT_HOME = Path("~/.config/teeflow").expanduser()
FAILED = ("failed", "cancelled", "rejected")
DEFAULT_EXPIRES = 24 * 3600  # seconds from build_spec until the owners' consent lapses


class Client:
    def __init__(self, scheduler: str, key: Identity | str | Path | None = None,
                 policy: AppraisalPolicy | None = None,
                 collateral: CollateralSource | None = None, amd_ark: bytes | None = None,
                 name: str | None = None, invite: str | None = None,
                 specs: SignedSpecs | Path | None = None) -> None:
        """`specs`: where the specs this key signs are recorded (default: next to the key
        file, `<key>.specs.sqlite`; memory only for a key given in code)."""
        key_file = checkpoints = None
        if key is None or isinstance(key, (str, Path)):
            key_file = Path(key or DEFAULT_HOME / "key.pem").expanduser()
            # a key is made only when registering under a name, never for a mistyped path
            key = load_or_create_key(key_file) if name is not None else \
                load_existing_key(key_file, "`teeflow init` or Client(name=...)")
            checkpoints = checkpoint_path(key_file)
        self.identity: Identity = key
        if not isinstance(specs, SignedSpecs):
            specs = SignedSpecs(specs or (specs_path(key_file) if key_file else None))
        self.signed = specs
        # `scheduler`: the pinned URL from the invitation, https://HOST:PORT#sha256:...;
        # every answer is checked against the log checkpoint kept next to the key
        self.scheduler = SchedulerClient(scheduler, self.identity, checkpoints=checkpoints)
        self.policy = policy
        self.verifiers = make_verifiers(collateral, amd_ark)
        if name is not None:
            self.scheduler.register_node(name, invite)

    def close(self) -> None:
        self.scheduler.close()
        self.signed.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _policy(self, policy: AppraisalPolicy | None) -> AppraisalPolicy:
        policy = policy or self.policy
        if policy is None:
            raise ConfigError("policy: give an appraisal policy (which executors you trust)")
        return policy

    def datasets(self) -> list[dict[str, Any]]:
        return self.scheduler.datasets()

    # -- tasks -----------------------------------------------------------------
    def build_spec(self, datasets: Sequence[str], compute_name: str,
                   params: dict[str, Any] | None = None,
                   receivers: Sequence[wire.Receiver] | None = None,
                   policy: AppraisalPolicy | None = None,
                   code_digest: str = "", deadline: int | None = None,
                   executor_key: str | None = None, expires: int | None = None,
                   runs: int = 1, pool: int | None = None) -> wire.TaskSpec:
        """The spec to sign. ``code_digest`` is the one the chosen executor published for
        ``compute_name`` (see ``executor_catalog``); the parameters and the catalogued
        schemas are checked here first, as far as the catalog can without the engine.
        ``deadline`` (unix seconds; default none: the scheduler's ``--task-deadline`` from
        submission, and the executor's own default): past it the scheduler fails the task
        and the executor wipes its inputs if it has not started to run. The consent it asks
        for is spent once: a fresh nonce, ``expires`` (unix seconds, default 24 hours from
        now), ``runs`` (how many runs the owners allow) and ``executor_key`` (SHA-256 of
        the attested TLS key of the one executor it is for)."""
        catalog = {d["name"]: d for d in self.scheduler.datasets()}
        refs = []
        for name in datasets:
            if name not in catalog:
                raise InputError(f"unknown dataset {name!r}")
            d = catalog[name]
            refs.append(wire.DatasetRef(name, d["owner"], d["owner_key"], d["fingerprint"],
                                        d.get("rules_digest")))
        comp = compute.get(compute_name)
        raw = {k: param_text(k, v, comp.param(k)) for k, v in (params or {}).items()}
        # e.g. federated's min_parties, counted in distinct owners
        comp.parties_ok(len({r.owner_key for r in refs}), comp.precheck(raw))
        me = wire.Receiver(self.identity.public_key(), self.identity.encryption_public_key())
        return wire.TaskSpec(
            task_id=secrets.token_hex(8), compute=comp.name, code_digest=code_digest,
            params=raw, datasets=tuple(refs),
            executor_policy=self._policy(policy).to_dict(),
            receivers=tuple(receivers or (me,)), initiator_key=self.identity.public_key(),
            deadline=deadline,
            nonce=secrets.token_hex(16),
            expires=int(time.time() + DEFAULT_EXPIRES) if expires is None else expires,
            runs=runs, executor_key=executor_key,
            # whose word ends the task and lets its result out (executor/verdicts.py)
            scheduler_key=self.scheduler.log_key(), pool=pool)

    def executor_catalog(self, executor: str,
                         policy: AppraisalPolicy | None = None) -> dict[str, CatalogEntry]:
        """The computations an executor runs, with their code digests, read over a channel
        pinned to the key its evidence binds, after appraising it with your policy."""
        return self._appraise(executor, policy)[0]

    def _appraise(self, executor: str, policy: AppraisalPolicy | None = None
                  ) -> tuple[dict[str, CatalogEntry], str, Claims]:
        """The executor's catalog, its attested key's SHA-256 (hex) and its claims."""
        client, claims = attested_connect(executor, self._policy(policy), self.verifiers)
        with client:
            return client.catalog(), client.tls_key_hash.hex(), claims

    def choose_executor(self, policy: AppraisalPolicy | None = None) -> str:
        """The first registered executor that your policy accepts when you appraise it now
        (a dead or refused one is skipped)."""
        reasons = []
        for ex in self.scheduler.executors():
            try:
                client, _ = attested_connect(ex["address"], self._policy(policy),
                                             self.verifiers)
            except TeeflowError as exc:
                reasons.append(f"{ex['address']}: {exc}")
                continue
            client.close()
            return str(ex["address"])
        detail = "; ".join(reasons) if reasons else "none is registered"
        raise InputError(f"no registered executor satisfies your policy ({detail})")

    def submit(self, datasets: Sequence[str], executor: str | None, compute: str,
               params: dict[str, Any] | None = None,
               receivers: Sequence[wire.Receiver] | None = None,
               deadline: float | None = None, expires: int | None = None,
               runs: int = 1, pool: int | None = None,
               members: Sequence[str] | None = None) -> dict[str, Any]:
        """Sign and submit a task; owners then approve it. `executor=None`: the first
        registered executor your policy accepts, appraised by you now. The spec names the
        code digest that executor publishes over its attested channel and that executor's
        attested key, `deadline` (seconds from now, signed into the spec so the executor
        holds it too; default: the scheduler's `--task-deadline`), and the consent
        it asks for: `expires` (unix seconds; default 24 hours from now) and `runs`. The
        signed digest is recorded here before the signature leaves.

        `pool`: run across that many executors (docs/scale.md), `members` naming them (by
        default the scheduler picks them); the spec then names no single executor key, the
        code digest is the one `executor` publishes, and the result comes from the pool's
        lead, appraised again with your policy when you take it."""
        if deadline is not None and not (math.isfinite(deadline) and deadline > 0):
            raise InputError("deadline: a positive number of seconds from now")
        address = executor or self.choose_executor()
        catalog, executor_key, claims = self._appraise(address)
        if compute not in catalog:
            known = ", ".join(sorted(catalog))
            raise InputError(f"computation {compute!r}: executor {address} does not run it "
                             f"(it runs: {known})")
        spec = self.build_spec(datasets, compute, params, receivers,
                               code_digest=catalog[compute].code_digest,
                               deadline=None if deadline is None else
                               int(time.time() + deadline),
                               executor_key=None if pool else executor_key, expires=expires,
                               runs=runs, pool=pool)
        payload = audit.signed_payload(spec.task_id, "submitted",
                                       {"spec": spec.to_dict(), "spec_digest": spec.digest()})
        self.signed.record(spec, "initiator", "" if pool else address, claims.tee,
                           claims.measurements)
        signature = base64.b64encode(self.identity.sign(payload)).decode()
        if pool:
            return self.scheduler.submit(spec.to_dict(), signature, None,
                                         list(members) if members else None)
        return self.scheduler.submit(spec.to_dict(), signature, address)

    def tasks(self) -> list[dict[str, Any]]:
        return self.scheduler.tasks()

    def task(self, task_id: str) -> dict[str, Any]:
        return self.scheduler.task(task_id)

    def cancel(self, task_id: str) -> dict[str, Any]:
        return self.scheduler.cancel(task_id)

    def decide(self, task_id: str, decision: str,
               expect_digest: str | None = None) -> dict[str, Any]:
        """Sign (`approved`) or refuse (`rejected`) a task's digest as an owner.
        `expect_digest`: the digest of the spec shown to the person deciding; a spec the
        scheduler swaps in after that is refused, not signed."""
        task = self.scheduler.task(task_id)
        spec = wire.TaskSpec.from_dict(task["spec"])
        if spec.digest() != task["spec_digest"]:
            raise AuthError(f"task {task_id}: the scheduler's digest is not the spec's")
        if expect_digest is not None and spec.digest() != expect_digest:
            raise AuthError(f"task {task_id}: the spec changed after it was shown to you "
                            "(not signed)")
        if decision == "approved" and spec.scheduler_key != self.scheduler.log_key():
            # that key's word would end the task and let its result out; no log holds it
            raise AuthError(f"task {task_id}: the spec's scheduler_key is not the key of "
                            "the scheduler you pinned (not signed)")
        payload = audit.signed_payload(task_id, decision, {"spec_digest": spec.digest()})
        if decision == "approved":  # this node's provider uploads only for what it signed
            self.signed.record(spec, "owner")
        return self.scheduler.decide(task_id, decision,
                                     base64.b64encode(self.identity.sign(payload)).decode())

    def wait(self, task_id: str, timeout: float | None = None, poll: float = 0.3,
             on_update: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Block until the task's result is ready; TaskFailed if it fails, is rejected or
        cancelled; TimeoutError after `timeout` seconds, saying what it still waits for."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            task = self.scheduler.task(task_id)
            if on_update is not None:
                on_update(task)
            if task["state"] in FAILED:
                raise TaskFailed(f"task {task_id} {task['state']}: {task.get('error') or ''}")
            if task["state"] in ("done", "released"):
                return task
            if deadline is not None and time.monotonic() > deadline:
                line = (task.get("waiting") or {}).get("text") or ""
                raise TimeoutError(f"task {task_id} still {task['state']} after {timeout}s"
                                   + (f": {line}" if line else ""))
            time.sleep(poll)

    def result(self, task_id: str, policy: AppraisalPolicy | None = None,
               digest: str | None = None) -> Result:
        """Appraise the task's executor with your own policy, take your sealed result from
        it, check the executor's signature on it and open it with your key. Only for the
        spec you signed (recorded at submit) or the `digest` you give: ResultMismatch
        names what differs (task, spec digest, executor, executor evidence or key)."""
        pinned = pin.pin_for(task_id, self.signed.of_task(task_id), digest)
        task = self.scheduler.task(task_id)
        spec = pin.check_task(pinned, task)
        client, claims = attested_connect(pinned.executor or task["executor"],
                                          self._policy(policy), self.verifiers)
        with client:
            pin.check_claims(pinned, claims)
            envelope = _released(lambda: client.take_result(task_id, self.identity,
                                                            spec_digest=pinned.spec_digest))
            executor_key = client.tls_key_hash.hex()
        try:
            sealed = base64.b64decode(envelope.sealed, validate=True)
        except ValueError:
            raise AuthError("result envelope: the sealed result is not base64") from None
        body = envelope.signed_body()
        if not envelope.signer.startswith("p256:") or \
                audit.p256_key_hash(envelope.signer) != executor_key or \
                hashlib.sha256(sealed).hexdigest() != envelope.sealed_sha256:
            raise AuthError("result is not signed by the executor you appraised")
        audit.verify_entry_signature(task_id, "result", body, envelope.signer,
                                     envelope.signature)
        pin.check_envelope(pinned, envelope.task_id, envelope.spec_digest)
        raw = open_sealed(sealed, self.identity.encryption_private_key(), pinned.spec_digest)
        self._check_commitment(task_id, envelope.sealed_sha256, raw, spec)
        opened = json.loads(raw)
        return Result(task_id=task_id, value=ordered(opened["result"]),
                      simulated=bool(opened["simulated"]), tee=opened["tee"], claims=claims,
                      raw=raw, compute=str(opened.get("compute", "")))

    def _check_commitment(self, task_id: str, sealed_sha256: str, raw: bytes,
                          spec: wire.TaskSpec) -> None:
        """The opened result must be the one the `computed` entry commits to, signed by an
        executor key an owner of the task attested: its salted hash, and this receiver's
        ciphertext. That entry is what vouches for an envelope a restarted executor
        re-signed with its new key (executor/store.py)."""
        entries = self.audit_log(task_id)
        owners = {audit.ed25519_signer(d["owner_key"]) for e in entries
                  if e.kind == "submitted" for d in e.body.get("spec", {}).get("datasets", [])}
        attested = set()
        for e in entries:
            if e.kind == "attested" and e.signer in owners:
                audit.verify_entry_signature(task_id, e.kind, e.body, e.signer, e.signature)
                attested.add(str(e.body.get("tls_key_sha256")))
        computed = [e for e in entries if e.kind == "computed" and e.signer.startswith("p256:")
                    and audit.p256_key_hash(e.signer) in attested]
        if not computed:
            raise AuthError("the audit log has no computed entry by an attested executor key")
        pin.check_executor_key(spec, [audit.p256_key_hash(e.signer) for e in computed])
        computed = [e for e in computed if spec.executor_key is None
                    or audit.p256_key_hash(e.signer) == spec.executor_key]
        for e in computed:
            audit.verify_entry_signature(task_id, e.kind, e.body, e.signer, e.signature)
            if e.body.get("spec_digest") != spec.digest() or \
                    e.body.get("result_commitment") != hashlib.sha256(raw).hexdigest() or \
                    e.body.get("sealed_sha256", {}).get(self.identity.public_key()) != \
                    sealed_sha256:
                raise AuthError("result is not the one the executor's computed entry "
                                "commits to")

    # -- executors and audit -------------------------------------------------
    def executors(self, policy: AppraisalPolicy | None = None) -> list[dict[str, Any]]:
        """Registered executors, each appraised now by you: claims, or why refused."""
        out = []
        for ex in self.scheduler.executors():
            row = {"address": ex["address"], "registered_tee": ex["tee"]}
            try:
                client, claims = attested_connect(ex["address"], self._policy(policy),
                                                  self.verifiers)
                client.close()
                row.update(verdict="accepted", tee=claims.tee,
                           measurements=claims.measurements, tcb_status=claims.tcb_status,
                           simulated=claims.simulated)
            except TeeflowError as exc:
                row.update(verdict="refused", reason=str(exc))
            out.append(row)
        return out

    def audit_log(self, task_id: str | None = None) -> list[audit.Entry]:
        return [audit.Entry(**{k: e[k] for k in audit.Entry.__dataclass_fields__})
                for e in self.scheduler.audit(task_id)]


def _released(take: Callable[[], ResultEnvelope], tries: int = 40) -> ResultEnvelope:
    """The scheduler marks a task done a moment before its release reaches the executor:
    ask again for a little while (NotReleased), then give up with that error."""
    for _ in range(tries - 1):
        try:
            return take()
        except NotReleased:
            time.sleep(0.25)
    return take()
