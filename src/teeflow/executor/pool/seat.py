"""This executor's seat in pool tasks: its pool identity, its answers to the other members'
appraisals, admitting them in turn, and its Dask worker holding its parts of the inputs.

Every member appraises every other one itself (admission.py) before a Dask link forms:
over a Flight channel pinned to the key the scheduler named for that member (and that
every provider attested and signed its upload for), it asks `pool-evidence` with a fresh
nonce of its own. The answer is the member's pool certificate (CA=false, identity.py) and
evidence binding that certificate's key and the nonce. Because the channel is pinned to
the member's executor key, the pool key is that executor's own, not another enclave's.

A member's worker holds its parts (held.py) until the lead concludes the task on it
(`conclude_on_worker`, run by Dask), or the link to the lead breaks: then the member fails
its task and wipes it. Either way nothing of the inputs stays behind.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from teeflow.attestation.evidence import NONCE_LEN, Evidence
from teeflow.attestation.policy import Verifier, load_policy
from teeflow.attestation.registry import TeeBackend, make_verifiers
from teeflow.core import wire
from teeflow.core.crypto import load_cert
from teeflow.core.errors import (
    AttestationError,
    AuthError,
    EvidenceFormatError,
    InputError,
    MemberRefused,
    PeerError,
    StateError,
    UnknownTask,
)
from teeflow.executor.inputs import batches_of
from teeflow.executor.pool import held
from teeflow.executor.pool.admission import Candidate, Roster, admit
from teeflow.executor.pool.identity import MemberIdentity, answer_nonce, make_member_identity
from teeflow.executor.pool.links import Links
from teeflow.executor.states import TASK, InputState, TaskEvent, TaskState, missing_inputs
from teeflow.executor.tasks import Task, Tasks
from teeflow.net.executor_client import attested_connect

log = logging.getLogger("teeflow.executor")
JOIN_TIMEOUT = 60.0  # seconds a member's worker has to reach the lead's Dask scheduler
MAX_ANSWER = 256 * 1024

# held key -> what concludes the task on the member holding it (its worker runs it)
_CONCLUDE: dict[str, Callable[[bool], None]] = {}


def held_key(digest: str, member: str) -> str:
    """Where a member's parts of a task are held (held.py): per member, so in-process
    pools (tests) keep each member's parts apart."""
    return f"{digest}/{member}"


def conclude_on_worker(keys: dict[str, str], ok: bool, dask_worker: Any = None) -> bool:
    """Run by Dask on a member's worker, in that member's process: end its part of the
    task (wipe it; `ok`: the lead sealed the result)."""
    key = keys.get(str(dask_worker.name)) if dask_worker is not None else None
    end = _CONCLUDE.pop(key, None) if key else None
    if end is not None:
        end(ok)
    return end is not None


def held_rows(keys: dict[str, str], dask_worker: Any = None) -> dict[str, int]:
    """Run by Dask on a member's worker: the rows of each dataset it holds (counts only)."""
    return {d: t.num_rows for d, t in held.tables(keys[str(dask_worker.name)]).items()}


@dataclass
class _Joined:
    ended: threading.Event = field(default_factory=threading.Event)
    stop: asyncio.Event | None = None
    loop: asyncio.AbstractEventLoop | None = None


class Seats:
    """This executor's part in every pool task it holds."""

    def __init__(self, backend: TeeBackend, tasks: Tasks,
                 verifiers: dict[str, Verifier] | None = None,
                 links: Links | None = None) -> None:
        """`verifiers`: how this member appraises the others (SGX and TDX peers need the
        executor's Intel collateral, SEV-SNP peers its AMD root; default: simulated only).
        `links`: where its Dask links listen and are reached (default: loopback)."""
        self.backend = backend
        self.tasks = tasks
        self.verifiers = verifiers if verifiers is not None else make_verifiers()
        self.links = links if links is not None else Links()
        self._lock = threading.Lock()
        self._identity: MemberIdentity | None = None
        self._joined: dict[str, _Joined] = {}

    @property
    def me(self) -> str:
        return self.tasks.notary.tls_spki_hash.hex()

    def identity(self) -> MemberIdentity:
        """This executor's pool identity, made once (a fresh key inside the TEE)."""
        with self._lock:
            if self._identity is None:
                self._identity = make_member_identity(self.backend)
            return self._identity

    def pool_task(self, digest: str) -> Task:
        with self.tasks.lock:
            task = self.tasks.get(digest)
        if task.pool_keys is None or task.digest != digest:
            raise UnknownTask(f"executor has no pool task {digest[:16]!r}")
        return task

    # -- answering a peer's appraisal --------------------------------------------
    def evidence(self, digest: str, nonce: bytes) -> dict[str, str]:
        """This member's pool certificate and fresh evidence for a peer's nonce, for a
        live pool task this executor holds (anyone else learns nothing of it)."""
        if len(nonce) != NONCE_LEN:
            raise InputError(f"pool-evidence: the nonce must be {NONCE_LEN} bytes")
        task = self.pool_task(digest)
        if not task.live:
            raise StateError(f"pool task {task.spec.task_id} is {task.status}")
        identity = self.identity()
        return {"cert_pem": identity.cert_pem.decode("ascii"),
                "evidence": base64.b64encode(
                    answer_nonce(self.backend, identity, nonce).encode()).decode("ascii")}

    # -- appraising the others -------------------------------------------------
    def admit_peers(self, task: Task) -> Roster:
        """Appraise every other member of the task's pool; the roster or MemberRefused."""
        assert task.pool_keys is not None and task.pool_addresses is not None
        policy = load_policy(task.spec.executor_policy, "executor_policy")
        verifiers = self.verifiers
        candidates = []
        for key, address in zip(task.pool_keys, task.pool_addresses, strict=True):
            if key != self.me:
                candidates.append(self._candidate(task, key, address, policy, verifiers))
        return admit(self.me, self.identity().cert_pem, candidates, policy, verifiers,
                     at=int(time.time()))

    def _candidate(self, task: Task, key: str, address: str, policy: Any,
                   verifiers: Any) -> Candidate:
        try:
            client, _ = attested_connect(address, policy, verifiers)
        except AttestationError as exc:
            raise MemberRefused(key[:16], "executor", str(exc)) from exc
        with client:
            if client.tls_key_hash.hex() != key:
                raise MemberRefused(key[:16], "tls_key", f"{address} attests another key than "
                                    "the one the pool names")
            nonce = secrets.token_bytes(NONCE_LEN)
            body = client.action("pool-evidence", wire.canonical(
                {"spec_digest": task.digest, "nonce": nonce.hex()}))
        cert, evidence = _answer(key, body)
        return Candidate(key, cert, nonce, evidence)

    # -- joining the lead's Dask scheduler ------------------------------------------
    def join(self, digest: str, scheduler: str, signature: bytes) -> dict[str, str]:
        """Admit the others, then, on the lead's signed word (its pool key, as admitted),
        join its scheduler with a worker pinned to the roster and hold this member's parts.
        Refused, the task untouched, until every part is in or if the worker cannot join."""
        from teeflow.executor.pool.cluster import start_worker
        from teeflow.executor.pool.tls import PinnedSecurity

        if not scheduler.startswith("tls://") or len(scheduler) > 256:
            raise InputError("pool-join: the scheduler must be a tls:// address")
        task = self.pool_task(digest)
        assert task.pool_keys is not None
        with self.tasks.lock:
            missing = missing_inputs(task.uploads)
            if task.status != TaskState.WAITING or missing:
                raise StateError(f"pool task {task.spec.task_id}: still waiting for "
                                 f"{missing}" if missing else
                                 f"pool task {task.spec.task_id} is {task.status}")
        with self._lock:
            if digest in self._joined:
                raise StateError(f"pool task {task.spec.task_id}: already joining")
            self._joined[digest] = joined = _Joined()
        key = held_key(digest, self.me)
        try:
            roster = self.admit_peers(task)
            lead = next(m for m in roster.members if m.name == task.pool_keys[0])
            check_lead_signature(lead.cert_pem, digest, scheduler, signature)
            security = PinnedSecurity.for_roster(self.identity(), roster)
            ready = threading.Event()
            failure: list[BaseException] = []

            async def serve() -> None:
                joined.loop, joined.stop = asyncio.get_running_loop(), asyncio.Event()
                try:
                    worker = await asyncio.wait_for(
                        start_worker(scheduler, security, name=self.me, links=self.links),
                        JOIN_TIMEOUT)
                except BaseException as exc:
                    failure.append(exc)
                    ready.set()
                    return
                ready.set()
                try:  # until the lead closes its scheduler, or this executor stops
                    await asyncio.wait([asyncio.ensure_future(worker.finished()),
                                        asyncio.ensure_future(joined.stop.wait())],
                                       return_when=asyncio.FIRST_COMPLETED)
                finally:
                    await worker.close()

            with self.tasks.lock:  # held before the worker is known to the lead
                if task.status != TaskState.WAITING:
                    raise StateError(f"pool task {task.spec.task_id} is {task.status}")
                held.hold(key, parts_of(task))
            threading.Thread(target=self._serve, args=(task, key, joined, serve),
                             daemon=True, name="teeflow-pool-worker").start()
            if not ready.wait(JOIN_TIMEOUT + 5) or failure:
                raise PeerError(f"pool task {task.spec.task_id}: could not join the lead's "
                                "scheduler" + (f" ({type(failure[0]).__name__})"
                                               if failure else ""))
            with self.tasks.lock:
                if task.status != TaskState.WAITING:
                    raise StateError(f"pool task {task.spec.task_id} is {task.status}")
                task.step(TaskEvent.RUN)
                _CONCLUDE[key] = lambda ok: self._conclude(task, ok)
        except BaseException:
            held.drop(key)
            with self._lock:
                self._joined.pop(digest, None)
            raise
        log.info("pool task %s: joined the pool as %s", task.spec.task_id, self.me[:16])
        return {"worker": self.me}

    def _serve(self, task: Task, key: str, joined: _Joined,
               serve: Callable[[], Any]) -> None:
        try:
            asyncio.run(serve())
        except Exception as exc:  # a broken link: the same end as a lost lead
            log.warning("pool task %s: worker stopped (%s)", task.spec.task_id,
                        type(exc).__name__)
        finally:
            end = _CONCLUDE.pop(key, None)
            if end is not None:  # the lead never concluded: lost, it failed, or we stop
                with self.tasks.lock:
                    self.tasks.fail(task, "this member's link to the pool's lead ended "
                                          "before the lead concluded the task")
            held.drop(key)
            joined.ended.set()
            with self._lock:
                self._joined.pop(task.digest, None)

    def _conclude(self, task: Task, ok: bool) -> None:
        """The lead's word: the task is computed (ok) or failed; wipe this member's parts."""
        held.drop(held_key(task.digest, self.me))
        with self.tasks.lock:
            if ok and TASK.allows(task.status, TaskEvent.FINISH):
                self.tasks.wipe(task, "computed")
                task.step(TaskEvent.FINISH)  # its result is the lead's to hand out
                task.step(TaskEvent.CLOSE)
            else:
                self.tasks.fail(task, "the pool's lead failed the task")
        log.info("pool task %s: concluded (%s); inputs wiped", task.spec.task_id,
                 "computed" if ok else "failed")
        with self._lock:
            joined = self._joined.get(task.digest)
        if joined is not None and joined.loop is not None and joined.stop is not None:
            # leave once the lead has this answer: it waits for its workers to go
            loop, stop = joined.loop, joined.stop
            loop.call_soon_threadsafe(loop.call_later, 0.2, stop.set)

    def close(self) -> None:
        with self._lock:
            joined = list(self._joined.values())
        for j in joined:
            if j.loop is not None and j.stop is not None:
                j.loop.call_soon_threadsafe(j.stop.set)


def parts_of(task: Task) -> dict[str, pa.Table]:
    """This member's part of every input, as tables (caller holds the tasks' lock)."""
    return {d.name: pa.Table.from_batches(
        list(batches_of(task.inputs.get(d.name, []), task.spills.get(d.name))()),
        task.schemas[d.name]) for d in task.spec.datasets
        if task.uploads.get(d.name) == InputState.RECEIVED}


def join_message(digest: str, scheduler: str) -> bytes:
    """What the lead signs with its pool key to call a member into its scheduler."""
    return b"teeflow-pool-join-v1\x00" + wire.canonical(
        {"spec_digest": digest, "scheduler": scheduler})


def check_lead_signature(cert_pem: bytes, digest: str, scheduler: str,
                         signature: bytes) -> None:
    try:
        key = load_cert(cert_pem).public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey)
        key.verify(signature, join_message(digest, scheduler), ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, AssertionError, ValueError):
        raise AuthError("pool-join: not signed by the pool's lead") from None


def _answer(key: str, body: bytes) -> tuple[bytes, Evidence]:
    """A peer's pool-evidence answer: (its certificate, its evidence), or MemberRefused."""
    if len(body) > MAX_ANSWER:
        raise MemberRefused(key[:16], "answer", "its pool-evidence answer is too large")
    try:
        parsed = json.loads(body)
        cert = parsed["cert_pem"].encode("ascii")
        evidence = Evidence.decode(base64.b64decode(parsed["evidence"], validate=True))
    except (ValueError, KeyError, TypeError, AttributeError, EvidenceFormatError):
        raise MemberRefused(key[:16], "answer", "its pool-evidence answer is not a "
                            "certificate and evidence") from None
    return cert, evidence
