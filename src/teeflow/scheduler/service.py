"""The scheduler's logic: take signed tasks, collect owners' signatures, route
assignments, follow executors, and record it all in the audit log.

It never sees a row of data, and it cannot make a signature: every consent it
relays was signed by an owner's key and is checked again by the executor.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from teeflow import compute
from teeflow.attestation.policy import AppraisalPolicy, load_policy
from teeflow.core import answers, audit, wire
from teeflow.core.answers import ExecutorEntry, TaskStatus
from teeflow.core.crypto import (
    check_encryption_key,
    check_public_key,
    spki_sha256,
    verify_signature,
)
from teeflow.core.errors import (
    AuthError,
    ConfigError,
    InputError,
    OverBudget,
    PeerError,
    StateError,
    TeeflowError,
    UnknownTask,
    Unreachable,
)
from teeflow.core.schemas import schema_from_b64
from teeflow.net.executor_client import ExecutorClient, parse_address
from teeflow.scheduler import waiting as waits
from teeflow.scheduler.store import Store, Task

log = logging.getLogger("teeflow.scheduler")
UNREACHABLE_GRACE = 60.0  # seconds an executor may not answer before its tasks fail
DISPATCH_RETRY = 2.0  # seconds before an executor that was full is asked again
UNKNOWN_GRACE = 10.0  # seconds an executor may not know a task it accepted (restarted)
NOTICE_RETRY = 5.0  # seconds between tries to tell an executor that a task ended
TASK_DEADLINE = 3600.0  # seconds from submission, for a spec that names no deadline
PROBE_TIMEOUT = 2.0  # seconds an executor has to answer `info` before it is skipped


class ExecutorLink(Protocol):
    def action(self, kind: str, body: bytes = b"") -> bytes: ...
    def action_json(self, kind: str, body: bytes = b"") -> Any: ...
    def close(self) -> None: ...


def _unverified(address: str) -> ExecutorLink:
    return ExecutorClient(address, None)


def probe_executor(address: str) -> None:
    """The executor answers `info` within PROBE_TIMEOUT, else Unreachable or PeerError."""
    with ExecutorClient(address, None, timeout=PROBE_TIMEOUT) as link:
        link.action("info")


def _policy_refusal(policy: AppraisalPolicy, executor: dict[str, Any]) -> str | None:
    """Why an executor's registered claims do not fit a spec's policy, or None (owners
    re-check live evidence; this only routes)."""
    tee = executor["tee"]
    if tee not in policy.tee_types:
        return f"its TEE {tee!r} is not one the policy accepts"
    if tee == "simulated" and not policy.allow_simulated:
        return "it is simulated and the policy does not allow simulated"
    for name, accepted in policy.measurements.get(tee, {}).items():
        if executor["measurements"].get(name) not in accepted:
            return f"its {name} is not one the policy accepts"
    return None


def _is_hex(text: str) -> bool:
    try:
        bytes.fromhex(text)
    except ValueError:
        return False
    return True


class Scheduler:
    def __init__(self, store: Store,
                 connect: Callable[[str], ExecutorLink] = _unverified,
                 task_deadline: float = TASK_DEADLINE,
                 probe: Callable[[str], None] = probe_executor,
                 unreachable_grace: float = UNREACHABLE_GRACE) -> None:
        """`task_deadline`: seconds from submission to the deadline of a task whose spec
        names none; `probe`: raises if an executor does not answer (automatic choice);
        `unreachable_grace`: seconds an executor may not answer before its tasks fail."""
        self.store = store
        self._connect = connect
        self.task_deadline = task_deadline
        self._probe = probe
        self.unreachable_grace = unreachable_grace
        self._taken: dict[str, list[str]] = {}  # spec digest -> receivers who took results
        self._unreachable_since: dict[str, float] = {}
        self._unknown_since: dict[str, float] = {}
        self._notice_next: dict[str, float] = {}  # task -> when to tell its executor again
        # approved tasks being handed to their executor (one hand-over at a time), and
        # those the executor had no room for yet: asked again after this time
        self._dispatching: set[str] = set()
        self._queued: dict[str, float] = {}
        self._dispatch_lock = threading.Lock()

    # -- visibility ----------------------------------------------------------
    def parties(self, task: Task) -> set[str]:
        """The keys a task is shown to: its initiator, the owners of its datasets, its
        receivers, and the host of each executor holding part of it (every pool member's)."""
        spec = task.spec
        keys = {spec["initiator_key"], *(d["owner_key"] for d in spec["datasets"]),
                *(r["sign_key"] for r in spec["receivers"])}
        hosts = {self.store.executor_host(address) for address in task.members}
        return keys | {h for h in hosts if h}

    def can_see(self, key: str, task: Task) -> bool:
        """A party to the task, or an auditor (who reads everything)."""
        node = self.store.node_by_key(key)
        if node is not None and "auditor" in node["roles"]:
            return True
        return key in self.parties(task)

    def visible_task(self, key: str, task_id: str) -> Task:
        """The task if `key` may see it; else UnknownTask, as if there were none (a
        stranger learns nothing, not even that the id is taken)."""
        task = self.store.task(task_id)
        if not self.can_see(key, task):
            raise UnknownTask(f"unknown task {task_id!r}")
        return task

    def visible_tasks(self, key: str) -> list[Task]:
        return [t for t in self.store.tasks() if self.can_see(key, t)]

    def visible_audit(self, key: str, task_id: str | None) -> list[audit.Entry]:
        """Audit entries of one visible task, or of every task `key` may see."""
        if task_id is not None:  # an unknown and an unseen task look the same: empty
            try:
                self.visible_task(key, task_id)
            except UnknownTask:
                return []
            return self.store.audit_log(task_id)
        node = self.store.node_by_key(key)
        if node is not None and "auditor" in node["roles"]:
            return self.store.audit_log()
        seen = {t.id for t in self.visible_tasks(key)}
        return [e for e in self.store.audit_log() if e.task_id in seen]

    # -- submission ----------------------------------------------------------
    def submit(self, caller_key: str, body: dict[str, Any]) -> Task:
        """A task spec signed by its initiator (the caller)."""
        raw_spec, signature = body.get("spec"), body.get("signature")
        if not isinstance(raw_spec, dict) or not isinstance(signature, str):
            raise InputError("submit: needs spec and the initiator's signature")
        spec = wire.TaskSpec.from_dict(raw_spec)
        if spec.initiator_key != caller_key:
            raise AuthError("submit: the spec names another initiator than the caller")
        if spec.scheduler_key not in (None, self.store.log_signer.public_key()):
            # its word ends the task and lets the result out (executor/verdicts.py); a
            # spec naming none is left to the owners, whose providers refuse to sign it
            raise InputError("submit: the spec's scheduler_key is not this scheduler's "
                             "log key")
        digest = spec.digest()
        audit.verify_entry_signature(spec.task_id, "submitted",
                                     {"spec": spec.to_dict(), "spec_digest": digest},
                                     audit.ed25519_signer(caller_key), signature)
        for i, r in enumerate(spec.receivers):
            try:
                check_public_key(r.sign_key)
                check_encryption_key(r.enc_key)
            except AuthError as exc:
                raise InputError(f"receiver {i}: {exc}") from exc
        try:
            policy = load_policy(spec.executor_policy, "executor_policy")
        except ConfigError as exc:
            raise InputError(str(exc)) from exc
        comp = compute.get(spec.compute)
        # the executor runs the full checks (these among them)
        comp.parties_ok(len(spec.owner_keys()), comp.precheck(dict(spec.params)))
        schemas = {}
        for ref in spec.datasets:
            entry = self.store.dataset(ref.name)
            if (entry["owner"], entry["owner_key"], entry["fingerprint"]) != (
                    ref.owner, ref.owner_key, ref.fingerprint):
                raise InputError(f"dataset {ref.name!r}: the spec's owner or schema is not "
                                 "the catalogued one")
            if entry["rules_digest"] != ref.rules:
                raise InputError(f"dataset {ref.name!r}: the spec's analysis rules digest is "
                                 "not the one its owner published")
            schemas[ref.name] = schema_from_b64(entry["schema_b64"])
        comp.precheck(dict(spec.params), schemas)
        if spec.pool is not None:
            pool = self._pick_pool(policy, spec.pool, body.get("pool"))
            executor = pool[0]
        else:
            if body.get("pool"):
                raise InputError("submit: pool members given for a spec without a pool")
            executor = self._registered(str(body.get("executor") or "")
                                        or self._pick_executor(policy))
            pool = None
        now = time.time()
        if spec.deadline is not None and spec.deadline <= now:
            raise InputError(f"task {spec.task_id}: its deadline has passed")
        self.store.create_task(spec.to_dict(), digest, executor, signature,
                               deadline=waits.task_deadline(spec.deadline, now,
                                                              self.task_deadline), pool=pool)
        return self.store.task(spec.task_id)

    def _registered(self, executor: str) -> str:
        """HOST:PORT of a registered executor: the scheduler connects only to executors that
        proved their address."""
        host, port = parse_address(executor)
        if self.store.executor_host(f"{host}:{port}") is None:
            raise InputError(f"executor {executor!r} is not registered with this scheduler")
        return f"{host}:{port}"

    def _pick_pool(self, policy: AppraisalPolicy, size: int, named: Any) -> list[str]:
        """The pool's members: the ones the initiator named, each registered, or the first
        `size` registered executors that fit the policy and answer (the lead first)."""
        if named:
            if not isinstance(named, list) or len(named) != size:
                raise InputError(f"submit: the spec asks for a pool of {size}; name that many")
            pool = [self._registered(str(a)) for a in named]
            if len(set(pool)) != size:
                raise InputError("submit: a pool member is named twice")
            return pool
        pool, skipped = self._answering(policy, size)
        if len(pool) == size:
            return pool
        raise InputError(f"a pool of {size} needs {size} registered executors that satisfy "
                         f"the task's executor policy and answer; {len(pool)} do"
                         + (": " + "; ".join(skipped) if skipped else ""))

    def _pick_executor(self, policy: AppraisalPolicy) -> str:
        """The first registered executor whose registered claims fit the policy and that
        answers a short probe; else InputError naming each one and why it was skipped."""
        found, skipped = self._answering(policy, 1)
        if found:
            return found[0]
        raise InputError("no registered executor satisfies the task's executor policy and "
                         "answers: " + ("; ".join(skipped) or "none is registered"))

    def _answering(self, policy: AppraisalPolicy, want: int) -> tuple[list[str], list[str]]:
        """Up to `want` registered executors that fit the policy and answer a probe, in
        registration order, and why each one before them was skipped."""
        found: list[str] = []
        skipped: list[str] = []
        for ex in self.store.executors():
            address = str(ex["address"])
            reason = _policy_refusal(policy, ex)
            if reason is None:
                try:
                    self._probe(address)
                except TeeflowError as exc:
                    reason = f"it does not answer ({exc})"
                else:
                    self.store.mark_seen(address)
                    found.append(address)
                    if len(found) == want:
                        break
                    continue
            skipped.append(f"{address}: {reason}")
        return found, skipped

    # -- waiting and deadlines -------------------------------------------------
    def waiting(self, task: Task, now: float | None = None) -> waits.Waiting | None:
        """Who the task waits for, since when, and when each was last seen."""
        spec = task.spec
        keys = [*(d["owner_key"] for d in spec["datasets"]),
                *(r["sign_key"] for r in spec["receivers"])]
        names = {n["public_key"]: n["name"] for n in self.store.nodes()
                 if n["public_key"] in keys}
        return waits.waiting_for(
            task.state, spec, task.created_at, task.executor,
            self.store.approvals(task.id), self.store.assignments(task.id),
            self.store.events(task.id), self.store.last_seen([*keys, task.executor]),
            names, time.time() if now is None else now, self._taken.get(task.spec_digest))

    def deadline_of(self, task: Task) -> float:
        return task.deadline if task.deadline is not None else \
            task.created_at + self.task_deadline

    def _past_deadline(self, task: Task) -> bool:
        """Fail a live task past its deadline, naming what it waited for (`done` is left:
        its result is being taken)."""
        now = time.time()
        deadline = self.deadline_of(task)
        if task.state not in waits.DEADLINE_STATES or now < deadline:
            return False
        reason = waits.deadline_reason(self.waiting(task, now), deadline, task.created_at,
                                         now)
        self.end_task(task.id, "fail", {"reason": reason}, error=reason)
        return True

    # -- consent -------------------------------------------------------------
    def decide(self, caller_key: str, task_id: str, body: dict[str, Any]) -> Task:
        """An owner's signed approval or rejection of a task's digest."""
        decision, signature = body.get("decision"), body.get("signature")
        if decision not in ("approved", "rejected") or not isinstance(signature, str):
            raise InputError("decision: 'approved' or 'rejected', with a signature")
        task = self.store.task(task_id)
        spec = wire.TaskSpec.from_dict(task.spec)
        owners = spec.owner_keys()
        if caller_key not in owners:
            raise AuthError(f"only an owner of task {task_id}'s data can decide on it")
        audit.verify_entry_signature(task_id, decision, {"spec_digest": task.spec_digest},
                                     audit.ed25519_signer(caller_key), signature)
        state = self.store.approve(task_id, caller_key, decision, signature, decision,
                                   owners=owners)
        if state == "approved":
            self._dispatch(self.store.task(task_id))
        return self.store.task(task_id)

    def _dispatch(self, task: Task) -> None:
        """Hand the spec and every owner's signature to the executor, once at a time per
        task. An executor with no room yet (OverBudget: its live tasks per initiator) keeps
        the task `approved`, queued: the tick asks again (the executor refuses it once its
        deadline has passed, and it fails then)."""
        with self._dispatch_lock:
            if task.id in self._dispatching:
                return
            self._dispatching.add(task.id)
        try:
            task = self.store.task(task.id)  # not a stale copy: handed over once
            if task.state == "approved":
                self._hand_over(task)
        finally:
            with self._dispatch_lock:
                self._dispatching.discard(task.id)

    def _hand_over(self, task: Task) -> None:
        approvals = [{"signer": audit.ed25519_signer(a["owner_key"]),
                      "signature": a["signature"]}
                     for a in self.store.approvals(task.id) if a["decision"] == "approved"]
        pool = [{"address": a, "key": spki_sha256(self.store.executor_cert(a).encode()).hex()}
                for a in task.pool]
        try:
            for member in task.members:
                self._create_at(task, member, approvals, pool)
        except OverBudget as exc:
            if task.id not in self._queued:
                log.info("task %s: queued, the executor has no room yet: %s", task.id, exc)
            self._queued[task.id] = time.time() + DISPATCH_RETRY
            return
        except TeeflowError as exc:
            self._queued.pop(task.id, None)
            self.end_task(task.id, "fail", {"reason": str(exc)}, error=str(exc))
            return
        self._queued.pop(task.id, None)
        self.store.transition(task.id, "accept", {"executor": task.executor})

    def _create_at(self, task: Task, executor: str, approvals: list[dict[str, str]],
                   pool: list[dict[str, str]]) -> None:
        """Hand the task to one executor (a pool task to each member, naming them all)."""
        extra = {"pool": pool} if pool else {}
        link = self._connect(executor)
        try:
            link.action("create-task", wire.canonical({**extra,
                "spec": task.spec, "approvals": approvals,
                # catalogued schemas, so the executor checks the task fully before any
                # data moves (it checks each against the fingerprint its owner signed)
                "schemas": {d["name"]: self.store.dataset(d["name"])["schema_b64"]
                            for d in task.spec["datasets"]},
                # the owners' published analysis rules; the executor checks each
                # against the digest its owner signed
                "rules": {d["name"]: self.store.dataset(d["name"])["rules"]
                          for d in task.spec["datasets"] if d.get("rules")},
                # the initiator's own signature, so its budgets are charged only for
                # tasks it really submitted
                "initiator_signature": self._submit_signature(task)}))
        finally:
            link.close()

    def _submit_signature(self, task: Task) -> str:
        return next((e.signature for e in self.store.audit_log(task.id)
                     if e.kind == "submitted"), "")

    def _check_anchor(self, task_id: str, body: dict[str, Any]) -> None:
        """The log head a provider signed into its entry is a prefix of this log (it only
        grows until the entry lands), else a bad anchor would fail every later check of
        the log: refused, nothing recorded."""
        try:
            anchor = audit.log_anchor(audit.Entry(0, task_id, "attested", body, "party", "",
                                                  "", ""))
        except audit.AuditError:
            raise InputError("attested: log needs size and a 32-byte hex root") from None
        if anchor is not None and (anchor[0] > self.store.log_head()[0] or
                                   self.store.log_root(anchor[0]) != anchor[1]):
            raise InputError("attested: log is not a head of this scheduler's log")

    # -- providers -----------------------------------------------------------
    def report(self, caller_key: str, task_id: str, dataset: str, body: dict[str, Any]) -> None:
        """A provider's progress or outcome for one of its assignments."""
        node = self.store.node_by_key(caller_key)
        if node is None:
            raise AuthError("caller is not a registered node")
        state = str(body.get("state", ""))
        rows = body.get("rows", 0) or 0
        if not isinstance(rows, int) or rows < 0:
            raise InputError("rows: a non-negative whole number")
        error = body.get("error")
        error = str(error)[:2000] if error else None
        task = self.store.task(task_id)
        self.store.update_assignment(task_id, dataset, node["name"], state, rows, error)
        detail = {"dataset": dataset, "node": node["name"], "rows": rows}
        attested = body.get("attested")
        if state == "started" and isinstance(attested, dict) and task.state == "uploading":
            entry_body, signature = attested.get("body"), attested.get("signature")
            if not isinstance(entry_body, dict) or not isinstance(signature, str):
                raise InputError("attested: needs the signed body and its signature")
            audit.verify_entry_signature(task_id, "attested", entry_body,
                                         audit.ed25519_signer(caller_key), signature)
            self._check_anchor(task_id, entry_body)
            self.store.transition(task_id, "attested", entry_body,
                                  signer=audit.ed25519_signer(caller_key), signature=signature)
        elif state == "started" and rows == 0 and task.state in ("accepted", "uploading"):
            self.store.transition(task_id, "upload", {**detail, "step": "started"})
        elif state == "uploaded" and task.state == "uploading":
            self.store.transition(task_id, "upload", {**detail, "step": "uploaded"})
        elif state == "failed" and task.state not in ("released", "failed", "cancelled"):
            reason = f"{node['name']} could not upload {dataset}: {error}"
            # the owner's own signed cancel first: the executor records who stopped it
            self._cancel_at_executor(task, caller_key, body.get("cancel_signature"))
            self.end_task(task_id, "fail", {**detail, "reason": error}, error=reason)

    def cancel(self, caller_key: str, task_id: str, body: dict[str, Any]) -> Task:
        """The initiator or an owner stops a task; its signed word goes on to the executor."""
        task = self.store.task(task_id)
        spec = wire.TaskSpec.from_dict(task.spec)
        if caller_key != spec.initiator_key and caller_key not in spec.owner_keys():
            raise AuthError(f"only the initiator or an owner can cancel task {task_id}")
        signature = body.get("signature")
        if not isinstance(signature, str):
            raise InputError("cancel: needs the caller's signature for the executor")
        verify_signature(caller_key, bytes.fromhex(signature) if _is_hex(signature) else b"",
                         wire.cancel_message(task_id))
        if self.store.granted(task_id):
            raise StateError(f"task {task_id}: its result was released; too late to cancel")
        if task.state not in ("submitted", "approved"):  # the executor records who cancelled
            self._cancel_at_executor(task, caller_key, signature)
        self.end_task(task_id, "cancel", {"by": audit.ed25519_signer(caller_key)})
        return self.store.task(task_id)

    def end_task(self, task_id: str, event: str, detail: dict[str, Any],
                 error: str | None = None, result_lost: bool = False,
                 known: TaskStatus | None = None) -> str:
        """Fail or cancel a live task: the one place the scheduler ends a task itself. Its
        executor is told (signed abort), now and after any restart until it confirms.
        `known`: the executor's status of the task, just read (not asked again)."""
        assert event in ("fail", "cancel")
        state = self.store.end(task_id, event, detail, error=error, result_lost=result_lost)
        self._notice_next.pop(task_id, None)
        self._deliver(task_id, known)
        return state

    def _sign(self, message: bytes) -> str:
        return self.store.log_signer.sign(message).hex()

    def _deliver(self, task_id: str, known: TaskStatus | None = None) -> None:
        """Tell an ended task's executor to fail and wipe it; record what it then signs
        (`aborted`, `wiped`). Kept until the executor confirms or no longer holds it.
        Its status is asked before (unless `known`) and, only if an abort went, after."""
        if time.time() < self._notice_next.get(task_id, 0.0):
            return
        task = self.store.task(task_id)
        if task.spec.get("scheduler_key") is None:  # no word of ours counts there
            self.store.notice_delivered(task_id)
            return
        try:
            for member in task.members:  # a pool task: every member holds part of it
                self._abort_at(task, member, known if member == task.executor else None)
        except TeeflowError as exc:
            self._notice_next[task_id] = time.time() + NOTICE_RETRY
            log.info("task %s: executor not yet told it ended: %s", task_id, exc)
            return
        self._notice_next.pop(task_id, None)
        self.store.notice_delivered(task_id)

    def _abort_at(self, task: Task, executor: str, known: TaskStatus | None) -> None:
        """Tell one executor the task ended (signed abort), unless it holds nothing of it
        any more; record the entries it signed."""
        try:
            status = known if known is not None else self._status(executor, task.spec_digest)
            ended = ("failed", "cancelled") if executor == task.executor else \
                ("failed", "cancelled", "released")  # a member whose part is done
            if status.status not in ended or status.inputs_held:
                link = self._connect(executor)
                try:
                    link.action("abort", wire.canonical({
                        "task_id": task.id, "spec_digest": task.spec_digest,
                        "run": status.run,
                        "signature": self._sign(wire.abort_message(task.spec_digest,
                                                                   status.run))}))
                finally:
                    link.close()
                status = self._status(executor, task.spec_digest)
            self._record_executor_entries(task, status.audit)
        except UnknownTask:
            pass  # the executor holds nothing of it (never had it, or restarted)

    def _grant(self, task: Task, run: int) -> None:
        """Record the release, then sign the word that lets the executor hand it out."""
        self.store.grant_release(task.id, run)
        if task.spec.get("scheduler_key") is None:
            return  # such a spec's result is out without our word
        self._tell_verdict(task, "release", wire.release_message(task.spec_digest, run), run)

    def _tell_verdict(self, task: Task, kind: str, message: bytes, run: int) -> None:
        link = self._connect(task.executor)
        try:
            link.action(kind, wire.canonical({"task_id": task.id,
                                              "spec_digest": task.spec_digest,
                                              "run": run, "signature": self._sign(message)}))
        finally:
            link.close()

    def _cancel_at_executor(self, task: Task, key: str, signature: Any) -> None:
        if not isinstance(signature, str):
            log.warning("task %s: no signed cancel to pass on; the executor keeps waiting "
                        "until its inputs expire", task.id)
            return
        try:
            link = self._connect(task.executor)
            try:
                link.action("cancel", wire.canonical({"task_id": task.id, "key": key,
                                                      "signature": signature,
                                                      "spec_digest": task.spec_digest}))
            finally:
                link.close()
        except TeeflowError as exc:
            log.warning("task %s: executor not told of cancel: %s", task.id, exc)

    def _tell_executor(self, executor: str, kind: str, task: str) -> Any:
        """`task`: the spec digest, the executor's id for a task (ids alone may collide)."""
        link = self._connect(executor)
        try:
            return link.action_json(kind, task.encode())
        finally:
            link.close()

    # -- following executors -------------------------------------------------
    def tick(self) -> None:
        """One pass over live tasks: start runs, follow executors, fail what is lost."""
        for task in self.store.tasks(active_only=True):
            try:
                if not self._past_deadline(task):
                    self._follow(task)
            except StateError as exc:  # a concurrent change won; next tick sees it
                log.debug("task %s: %s", task.id, exc)
            except TeeflowError as exc:
                log.warning("task %s: %s", task.id, exc)
        for task_id in self.store.notices():
            try:
                self._deliver(task_id)
            except TeeflowError as exc:
                log.warning("task %s: %s", task_id, exc)

    def _status(self, executor: str, task: str) -> TaskStatus:
        link = self._connect(executor)
        try:
            status = answers.decode(TaskStatus, link.action("status", task.encode()),
                                    "executor status")
        finally:
            link.close()
        self.store.mark_seen(executor)  # it answered: for the waiting line
        if status.status == "done":  # who took a result: only a `done` task waits on it
            self._taken[task] = list(status.taken_by)
        else:
            self._taken.pop(task, None)
        return status

    def _record_executor_entries(self, task: Task, entries: list[ExecutorEntry]) -> None:
        """Append the executor's signed entries, but only from a key an owner attested
        (others wait for a later tick; the chain must always verify)."""
        attested = {str(e.body.get("tls_key_sha256")) for e in self.store.audit_log(task.id)
                    if e.kind == "attested"}
        for e in entries:
            kind, body, signer, signature = e.kind, e.body, e.signer, e.signature
            if not signature or self.store.has_signature(signature):
                continue
            if kind not in audit.EXECUTOR_KINDS or \
                    not signer.startswith("p256:") or audit.p256_key_hash(signer) not in attested:
                continue
            try:
                audit.verify_entry_signature(task.id, kind, body, signer, signature)
            except AuthError as exc:
                log.warning("task %s: dropping executor entry: %s", task.id, exc)
                continue
            self.store.append(task.id, kind, body, signer, signature)

    def _record_members(self, task: Task) -> None:
        """A pool task's other members' signed entries (their `wiped`), best effort: one not
        reached now is asked again if the task later ends early (_deliver)."""
        for member in task.members[1:]:
            try:
                self._record_executor_entries(task,
                                              self._status(member, task.spec_digest).audit)
            except TeeflowError as exc:
                log.info("task %s: member %s not read: %s", task.id, member, exc)

    def _follow(self, task: Task) -> None:
        if task.state == "approved":  # queued, or its hand-over was cut short
            if time.time() >= self._queued.get(task.id, 0.0):
                self._dispatch(task)
            return
        if task.state == "submitted":
            return
        asked = time.time()  # a call that hangs to its timeout counts from its start
        try:
            status = self._status(task.executor, task.spec_digest)  # its id there
        except UnknownTask:
            # it held the task (accepted) and no longer does: it restarted, its inputs gone
            first = self._unknown_since.setdefault(task.id, time.time())
            if time.time() - first <= UNKNOWN_GRACE:
                return
            if self.store.granted(task.id):  # restarted without its state dir: gone
                self.end_task(task.id, "fail", {"reason": "executor lost the result"},
                              error=f"executor {task.executor} lost the result after its "
                                    "release was granted (restarted without a state dir); "
                                    "receivers who had not taken it cannot now",
                              result_lost=True)
            else:
                self.end_task(task.id, "fail", {"reason": "executor lost the task"},
                              error=f"executor {task.executor} no longer holds the task "
                                    "(it restarted?)")
            return
        except (Unreachable, PeerError) as exc:
            first = self._unreachable_since.setdefault(task.id, asked)
            if time.time() - first > self.unreachable_grace and \
                    not self.store.granted(task.id):
                self.end_task(task.id, "fail", {"reason": str(exc)},
                              error=f"executor lost: {exc}")
            return
        self._unreachable_since.pop(task.id, None)
        self._unknown_since.pop(task.id, None)
        self._record_executor_entries(task, status.audit)
        remote = status.status
        if remote == "failed":  # its status just read: _deliver need not ask it again
            self.end_task(task.id, "fail", {"reason": status.error},
                          error=status.error or "executor failed the task", known=status)
        elif remote == "cancelled":
            self.end_task(task.id, "cancel", {"by": "executor"}, known=status)
        elif task.state == "uploading" and remote == "waiting":
            assignments = self.store.assignments(task.id)
            if all(a["state"] == "uploaded" for a in assignments) and \
                    sorted(status.received) == sorted(a["dataset"] for a in assignments):
                self._tell_executor(task.executor, "run", task.spec_digest)
                self.store.transition(task.id, "run", {"inputs": status.received})
        elif task.state == "uploading" and remote in ("running", "done", "released"):
            self.store.transition(task.id, "run", {"inputs": status.received})
        elif task.state == "running" and remote in ("done", "released"):
            self._record_members(task)
            self.store.transition(task.id, "finish", {})
            self._grant(task, status.run)
        elif task.state == "done" and remote == "done" and not status.granted:
            self._grant(task, status.run)  # recorded once; told until the executor has it
        elif task.state == "done" and remote == "released":
            self.store.transition(task.id, "close", {})
