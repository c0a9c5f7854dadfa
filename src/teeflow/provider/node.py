"""A data owner's node: outbound only. Long-polls the scheduler, signs the task specs
its rules allow, appraises executors, uploads.

Sends a byte of data only for a spec this node signed (its own record says so, not only
a signature the scheduler relays), to the executor that spec names by its attested key,
whose evidence passed both this node's own policy and the policy inside that spec, over a
channel pinned to the key that evidence binds; and only as many times as the spec allows,
before it expires (provider/ledger.py).
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from teeflow import compute
from teeflow.attestation.policy import load_policy, satisfies
from teeflow.attestation.registry import make_verifiers
from teeflow.core import api, audit, wire
from teeflow.core.crypto import Identity
from teeflow.core.errors import (
    AttestationError,
    AuthError,
    ConfigError,
    ConsentExpired,
    InputError,
    LogInconsistent,
    OverBudget,
    TeeflowError,
    Unreachable,
)
from teeflow.core.schemas import schema_fingerprint, schema_to_b64
from teeflow.files.checkpoints import checkpoint_path
from teeflow.files.datasets import read_schema
from teeflow.files.keys import load_existing_key, load_or_create_key
from teeflow.files.signed_specs import SignedSpecs
from teeflow.net.executor_client import attested_connect
from teeflow.net.retry import FIRST_WAIT, LONGEST_WAIT, patiently
from teeflow.net.scheduler_client import SchedulerClient
from teeflow.provider.budget import Ledger, PrivacyGuard
from teeflow.provider.catalog import Catalog
from teeflow.provider.config import ProviderConfig
from teeflow.provider.consent import approval_body, check_signed_by
from teeflow.provider.federated import take_part
from teeflow.provider.ledger import UploadLedger
from teeflow.provider.parts import upload_parts

log = logging.getLogger("teeflow.provider")
REPORT_EVERY = 1.0
OUTCOME_RETRY = 24 * 3600.0  # seconds an outcome report is retried
# uploads this node runs at once: the executor's default cap per owner key (Budgets), so
# many tasks at once queue here instead of being refused there
UPLOAD_SLOTS = 2
ROOM_WAIT = 600.0  # seconds an upload waits for an executor that has no room yet


class Provider:
    def __init__(self, config: ProviderConfig, identity: Identity | None = None) -> None:
        self.config = config
        # the key is made on the first start only, the one that spends an invitation; a
        # mistyped key_file later must not become a new identity
        self.identity = identity or (
            load_or_create_key(config.key_file) if config.invite else
            load_existing_key(config.key_file, "the first start, with an invitation,"))
        # the newest log checkpoint this node saw, next to its key: checked on every contact
        self.scheduler = SchedulerClient(config.scheduler, self.identity,
                                         checkpoints=checkpoint_path(config.key_file))
        self.verifiers = make_verifiers(config.collateral, config.amd_ark)
        self._busy: set[tuple[str, ...]] = set()
        # approval requests no rule signs: left for a person, not considered (or logged)
        # again on every poll while they wait
        self._parked: set[tuple[str, ...]] = set()
        self._upload_slots = threading.BoundedSemaphore(UPLOAD_SLOTS)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        # privacy budgets: debited here, before this node's signature or data leaves it
        self.privacy = PrivacyGuard(Ledger(config.budget_path), self.identity.public_key(),
                                    {d.name: d.privacy for d in config.datasets})
        self.signed = SignedSpecs(config.specs_path)  # what this key signed, and where
        self.ledger = UploadLedger(config.ledger_path)  # consent spent once
        self.catalog = Catalog(config.datasets)  # each file as catalogued; a bad one offline

    def register(self) -> None:
        """Announce this node's keys and its datasets' schemas and sizes (never rows)."""
        cfg = self.config
        self.scheduler.register_node(cfg.name, cfg.invite)
        for d in self.catalog.online():
            schema = read_schema(d.path)
            self.scheduler.add_dataset(cfg.name, d.name, schema_to_b64(schema),
                                       self.catalog.record(d.name).rows,
                                       rules=d.rules.to_dict() if d.rules else None)
            log.info("catalogued %s (%s)", d.name, d.path)

    def stop(self) -> None:
        self._stop.set()

    def run_forever(self) -> None:
        # a scheduler that is down (or not up yet) is waited for, not a reason to exit
        patiently(self.register, "scheduler not reachable to register", log,
                  stop=self._stop)
        seen = ""  # what this node holds already: the long poll waits while it is all
        down = FIRST_WAIT  # backoff while the scheduler is unreachable
        while not self._stop.is_set():
            try:
                work = self.scheduler.work(self.config.name, self.config.poll_wait, seen)
                seen = api.work_digest(work)
            except Unreachable as exc:
                log.warning("%s; retrying in %.0fs", exc, down)
                self._stop.wait(down)
                down = min(down * 2, LONGEST_WAIT)
                continue
            except LogInconsistent as exc:  # the scheduler rewrote what this node saw
                log.error("stopping: %s", exc)
                raise
            down = FIRST_WAIT
            keys = [(i["kind"], i["task_id"], i.get("dataset", ""), i["spec_digest"])
                    for i in work]
            with self._lock:
                self._parked &= set(keys)  # decided by hand, cancelled, or gone
            for item, key in zip(work, keys, strict=True):
                with self._lock:
                    if key in self._busy or key in self._parked:
                        continue
                    self._busy.add(key)
                threading.Thread(target=self._handle_guarded, args=(item, key),
                                 daemon=True).start()

    def _handle_guarded(self, item: dict[str, Any], key: tuple[str, ...]) -> None:
        try:
            if item["kind"] == "approve":
                if self.consider(item) is None:
                    with self._lock:
                        self._parked.add(key)
            else:
                self.handle(item)
        except Exception:
            log.exception("task %s: %s failed", item.get("task_id"), item.get("kind"))
        finally:
            with self._lock:
                self._busy.discard(key)

    def _log_anchor(self) -> dict[str, Any]:
        """The log head this node holds, for an entry it signs: its own signature then
        pins the entry after that tree (core/audit.py checks it), whatever the scheduler
        later re-signs."""
        held = self.scheduler.log.snapshot()
        return {} if held is None else {"log": {"size": held.size, "root": held.root.hex()}}

    # -- consent -------------------------------------------------------------
    def check_spec(self, spec: wire.TaskSpec) -> None:
        """This node's datasets in the spec are the ones it holds, with their schemas."""
        me = self.identity.public_key()
        for ref in spec.datasets:
            if ref.owner_key != me:
                continue
            mine = self.config.dataset(ref.name)
            if mine is None:
                raise InputError(f"spec names dataset {ref.name!r}, which this node does not hold")
            self.catalog.check(ref.name)  # the file is still what was catalogued
            if schema_fingerprint(read_schema(mine.path)) != ref.fingerprint:
                raise InputError(f"spec's schema for {ref.name!r} is not this node's file's")
            mine_rules = mine.rules.digest() if mine.rules else None
            if ref.rules != mine_rules:  # the executor enforces the rules this digest names
                raise InputError(f"spec's analysis rules for {ref.name!r} are not this node's")
        check_consent_fields(spec)
        self._check_scheduler(spec)
        try:
            load_policy(spec.executor_policy, "executor_policy")
        except ConfigError as exc:
            raise InputError(str(exc)) from exc

    def _check_scheduler(self, spec: wire.TaskSpec) -> None:
        """The spec names this node's scheduler: its word ends the task and lets the
        result out (executor/verdicts.py), so no other key may hold that."""
        if spec.scheduler_key != self.scheduler.log_key():
            raise InputError(f"task {spec.task_id}: the spec's scheduler_key is not the "
                             "key of this node's scheduler")

    def consider(self, item: dict[str, Any]) -> str | None:
        """Sign an approval request if a rule in the config allows it; else leave it."""
        spec = wire.TaskSpec.from_dict(item["spec"])
        if spec.digest() != item.get("spec_digest"):
            log.warning("task %s: digest does not match its spec; ignoring", spec.task_id)
            return None
        me = self.identity.public_key()
        try:
            self.check_spec(spec)
            self.privacy.check(spec)
            approve = any(rule.matches(spec, me) for rule in self.config.approve)
            if approve:
                self.privacy.charge(spec)
        except (InputError, OverBudget, ConsentExpired) as exc:
            self.decide(spec, "rejected")
            log.warning("task %s: rejected: %s", spec.task_id, exc)
            return "rejected"
        if approve:
            self.decide(spec, "approved")
            log.info("task %s: approved by rule", spec.task_id)
            return "approved"
        why = "; ".join(f"approve[{i}]: {rule.mismatch(spec, me)}"
                        for i, rule in enumerate(self.config.approve)) or "no [[approve]] rules"
        log.info("task %s: no rule approves it; waiting for `teeflow approve` (%s)",
                 spec.task_id, why)
        return None

    def decide(self, spec: wire.TaskSpec, decision: str) -> None:
        if decision == "approved":  # recorded before the signature leaves
            self.signed.record(spec, "owner")
        signature = self.identity.sign(audit.signed_payload(spec.task_id, decision,
                                                            approval_body(spec)))
        self.scheduler.decide(spec.task_id, decision, base64.b64encode(signature).decode())

    # -- uploads -------------------------------------------------------------
    def handle(self, item: dict[str, Any]) -> dict[str, Any] | None:
        """One assignment: check the spec is ours, appraise the executor, stream the dataset."""
        task_id, name, executor = item["task_id"], item["dataset"], item["executor"]
        try:
            self.scheduler.report(task_id, name, "started")
        except TeeflowError as exc:  # taken by an earlier poll, or the task ended
            log.info("task %s: not starting %s: %s", task_id, name, exc)
            return None
        dataset = self.config.dataset(name)
        try:
            if dataset is None:
                raise InputError(f"this node does not hold dataset {name!r}")
            spec = wire.TaskSpec.from_dict(item["spec"])
            if spec.task_id != task_id or spec.dataset(name).owner_key != \
                    self.identity.public_key():
                raise AuthError(f"assignment does not match the spec of task {task_id}")
            check_signed_by(spec, item.get("approvals", []), self.identity.public_key())
            if not self.signed.signed(spec.digest(), "owner"):
                raise AuthError(f"task {task_id}: this node never signed spec "
                                f"{spec.digest()[:16]} (not in its own record of what it "
                                "signed)")
            check_consent_fields(spec)
            self._check_scheduler(spec)
            mine_rules = dataset.rules.digest() if dataset.rules else None
            if spec.dataset(name).rules != mine_rules:  # also for a spec signed by hand
                raise InputError(f"spec's analysis rules for {name!r} are not this node's; "
                                 "not uploading")
            self.privacy.before_upload(spec, name)  # debited (also if signed by hand), once
            spec_policy = load_policy(spec.executor_policy, "executor_policy")
            pool = [str(a) for a in item.get("pool") or []]
            if (spec.pool is not None or pool) and len(pool) != (spec.pool or 0):
                raise InputError(f"task {task_id}: the spec asks for a pool of {spec.pool}, "
                                 f"the scheduler names {len(pool)} member(s)")
            if pool and pool[0] != executor:
                raise InputError(f"task {task_id}: the pool's lead is not the task's executor")
            receipt = self._send_when_room(task_id, name, pool or [executor], spec,
                                           spec_policy, dataset.path)
        except AttestationError as exc:
            log.warning("task %s: refusing executor %s: %s", task_id, executor, exc)
            self._report_failure(task_id, name, f"attestation refused: {exc}")
            return None
        except TeeflowError as exc:
            log.warning("task %s: upload of %s failed: %s", task_id, name, exc)
            self._report_failure(task_id, name, str(exc))
            return None
        except Exception as exc:  # local trouble (file, Arrow); its text may quote data
            log.exception("task %s: upload of %s failed", task_id, name)
            self._report_failure(task_id, name, f"provider error ({type(exc).__name__})")
            return None
        self._report_until_heard(task_id, name, "uploaded", rows=int(receipt.get("rows", 0)))
        log.info("task %s: uploaded %s (%s rows)", task_id, name, receipt.get("rows"))
        return receipt

    def _send_when_room(self, task_id: str, name: str, members: list[str],
                        spec: wire.TaskSpec, spec_policy: Any, path: Any) -> dict[str, Any]:
        """Send, at most UPLOAD_SLOTS uploads at once (federated rounds take no slot: they
        wait on the other parties). An executor with no room yet (OverBudget: uploads by
        this key or overall) is asked again with backoff, for up to ROOM_WAIT."""
        claimed: dict[str, int] = {}
        executor = members[0]
        if compute.get(spec.compute).layout == "federated":
            return self._send(task_id, name, executor, spec, spec_policy, path, claimed)
        delay, deadline = 1.0, time.monotonic() + ROOM_WAIT
        while True:
            with self._upload_slots:
                try:
                    if spec.pool is not None:
                        return self._send_parts(task_id, name, members, spec, spec_policy,
                                                path, claimed)
                    return self._send(task_id, name, executor, spec, spec_policy, path,
                                      claimed)
                except OverBudget as exc:
                    if time.monotonic() > deadline or self._stop.is_set():
                        raise
                    log.info("task %s: executor has no room for %s yet (%s); trying again",
                             task_id, name, exc)
            self._stop.wait(delay)
            delay = min(delay * 2, 15.0)

    def _send(self, task_id: str, name: str, executor: str, spec: wire.TaskSpec,
              spec_policy: Any, path: Any, claimed: dict[str, int]) -> dict[str, Any]:
        """Appraise the executor under both policies, record the attestation, upload.
        `claimed`: the run of the spec this upload spent, by executor key (a retry for
        room spends none again)."""
        source = self.catalog.open(name)  # checked against its catalogue record, each try
        try:
            client, claims = attested_connect(executor, self.config.policy, self.verifiers)
        except BaseException:
            source.close()  # refused before the upload began: no handle left open
            raise
        with client, source:
            satisfies(claims, spec_policy)
            seen = client.tls_key_hash.hex()
            if spec.executor_key is not None and seen != spec.executor_key:
                raise AttestationError(
                    f"executor_key: the spec is for executor key {spec.executor_key[:16]}, "
                    f"{executor} attests key {seen[:16]}")
            if spec.compute == "user_code":
                _check_isolation(client, self.config.policy, spec_policy)
            # the executor's view matters only to an upload this node began before (it
            # claimed a run for this executor): a first one costs no status RPC
            there = _executor_view(client, spec) if seen not in claimed and \
                self.ledger.claimed_for(spec.digest(), name, seen) else None
            if there is not None and name in there.received:
                # sent before this node restarted, its outcome not yet reported
                return {"rows": int(there.received[name].get("rows", 0)), "resumed": True}
            if seen not in claimed:  # before any byte leaves
                resume = there.run if there is not None and name not in there.receiving \
                    else None
                claimed[seen] = self.ledger.claim(spec, name, seen, resume=resume)
            run = claimed[seen]
            log.info("task %s: upload of %s, run %d of %d", task_id, name, run,
                     spec.run_limit)
            body = {"executor": executor, "tls_key_sha256": client.tls_key_hash.hex(),
                    "spec_digest": spec.digest(), "claims": claims.to_dict(),
                    "run": run,  # which of the spec's runs this upload is
                    **self._log_anchor()}
            signature = self.identity.sign(audit.signed_payload(task_id, "attested", body))
            self._try_report(task_id, name, "started", attested={
                "body": body, "signature": base64.b64encode(signature).decode()})
            log.info("task %s: executor %s attested: %s %s", task_id, executor, claims.tee,
                     claims.measurements)
            comp = compute.get(spec.compute)
            if comp.layout == "federated":  # rows stay here; only updates leave
                receipt = take_part(client, task_id, name, path,
                                    comp.precheck(dict(spec.params)), self.identity,
                                    spec_digest=spec.digest())
            else:
                receipt = client.upload(task_id, name, self.identity,
                                        read_schema(path),
                                        self._paced(self.catalog.batches(name, source)),
                                        _Progress(self, task_id, name),
                                        spec_digest=spec.digest())
        return receipt

    def _send_parts(self, task_id: str, name: str, members: list[str], spec: wire.TaskSpec,
                    spec_policy: Any, path: Any, claimed: dict[str, int]) -> dict[str, Any]:
        """A pool task: appraise every member under both policies, record each attestation,
        then stream a part of the dataset to each (provider/parts.py). A pool upload is
        never resumed: one cut short fails the task on the members it reached."""
        clients: list[Any] = []
        source = self.catalog.open(name)
        try:
            attested = []
            for address in members:
                client, claims = attested_connect(address, self.config.policy, self.verifiers)
                clients.append(client)
                satisfies(claims, spec_policy)
                attested.append((address, client.tls_key_hash.hex(), claims))
            keys = [key for _, key, _ in attested]
            if len(set(keys)) != len(keys):
                raise AttestationError("two pool members attest the same key")
            if keys[0] not in claimed:  # before any byte leaves, once per pool
                claimed[keys[0]] = self.ledger.claim(spec, name, keys[0])
            run = claimed[keys[0]]
            for index, (address, key, claims) in enumerate(attested):
                body = {"executor": address, "tls_key_sha256": key,
                        "spec_digest": spec.digest(), "claims": claims.to_dict(), "run": run,
                        "pool_member": index, **self._log_anchor()}
                signature = self.identity.sign(audit.signed_payload(task_id, "attested", body))
                self._try_report(task_id, name, "started", attested={
                    "body": body, "signature": base64.b64encode(signature).decode()})
            log.info("task %s: %d pool members attested; streaming %s in %d parts", task_id,
                     len(members), name, len(members))
            receipts = upload_parts(clients, task_id, name, self.identity, read_schema(path),
                                    self._paced(self.catalog.batches(name, source)),
                                    _Progress(self, task_id, name), spec.digest(), keys)
        finally:
            for client in clients:
                client.close()
            source.close()
        return {"rows": sum(int(r.get("rows", 0)) for r in receipts),
                "parts": [int(r.get("rows", 0)) for r in receipts]}

    def _paced(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        """Keep to the configured upload rate, if any (links shared with other traffic)."""
        rate = self.config.upload_rows_per_second
        start, sent = time.monotonic(), 0
        for batch in batches:
            yield batch
            sent += batch.num_rows
            if rate:
                ahead = sent / rate - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)

    def _try_report(self, task_id: str, name: str, state: str, **extra: Any) -> bool:
        """Progress is best effort: a scheduler restart must not break an upload."""
        try:
            self.scheduler.report(task_id, name, state, **extra)
            return True
        except TeeflowError as exc:
            log.info("task %s: progress report not delivered: %s", task_id, exc)
            return False

    def _report_until_heard(self, task_id: str, name: str, state: str, **extra: Any) -> None:
        """Outcomes must arrive: retried with backoff while the scheduler is unreachable
        (for OUTCOME_RETRY; the task's deadline ends it at the scheduler if never heard)."""
        try:
            patiently(lambda: self.scheduler.report(task_id, name, state, **extra),
                      f"task {task_id}: {state} report not delivered", log,
                      give_up_after=OUTCOME_RETRY, stop=self._stop)
        except Unreachable as exc:
            log.warning("task %s: gave up reporting %s: %s", task_id, state, exc)
        except TeeflowError as exc:
            log.warning("task %s: scheduler refused %s report: %s", task_id, state, exc)

    def _report_failure(self, task_id: str, name: str, message: str) -> None:
        self._report_until_heard(task_id, name, "failed", error=message)


def check_consent_fields(spec: wire.TaskSpec, now: float | None = None) -> None:
    """A spec this node signs or serves asks for consent once: a nonce and an expiry not
    passed. (Its `executor_key`, where given, is checked against the attested key.)"""
    missing = [n for n in ("nonce", "expires") if getattr(spec, n) is None]
    if missing:
        raise InputError(f"task {spec.task_id}: spec has no {' or '.join(missing)} (consent "
                         "is given for a stated number of runs, until an expiry)")
    if spec.expires is not None and spec.expires <= (time.time() if now is None else now):
        raise ConsentExpired(f"task {spec.task_id}: its consent expired at unix time "
                             f"{spec.expires}")


class _Progress:
    """Counts rows sent and tells the scheduler about once a second."""

    def __init__(self, provider: Provider, task_id: str, dataset: str) -> None:
        self.provider, self.task_id, self.dataset = provider, task_id, dataset
        self.rows = 0
        self.last = time.monotonic()

    def __call__(self, rows: int) -> None:
        self.rows += rows
        if time.monotonic() - self.last >= REPORT_EVERY:
            self.last = time.monotonic()
            self.provider._try_report(self.task_id, self.dataset, "started", rows=self.rows)


def _executor_view(client: Any, spec: wire.TaskSpec) -> Any:
    """The executor's status of this spec's task (its run, what it holds whole) while it
    waits for uploads, else None (not created there yet, gone, or past its uploads: the
    upload says why)."""
    try:
        status = client.status(spec.digest())
    except TeeflowError:
        return None
    return status if status.status == "waiting" else None  # only then is an upload due


def _check_isolation(client: Any, *policies: Any) -> None:
    """Before a user_code upload: the attested executor reports (in its catalog) the sandbox
    isolation each policy demands, or AttestationError names what is missing."""
    demanded = [p.user_code_isolation for p in policies if p.user_code_isolation]
    if not demanded:
        return
    isolation = client.catalog()["user_code"].isolation
    if isolation is None or isolation.level != "full":
        missing = ", ".join(isolation.missing) if isolation is not None else "its report"
        raise AttestationError(
            f"user_code_isolation {demanded[0]!r} demanded, executor's sandbox lacks {missing}"
        )
