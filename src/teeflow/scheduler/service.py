"""The scheduler's logic: accept tasks, route assignments, follow executors, record it all.

It never sees a row of data: it tells providers where to send theirs and asks
executors only for status.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any, Protocol

from teeflow.core import wire
from teeflow.core.crypto import check_public_key
from teeflow.core.datasets import schema_from_b64
from teeflow.core.errors import InputError, PeerError, StateError, TeeflowError, Unreachable
from teeflow.core.executor_client import ExecutorClient, parse_address
from teeflow.executor import compute
from teeflow.scheduler.store import Store, Task

log = logging.getLogger("teeflow.scheduler")
UNREACHABLE_GRACE = 60.0


class ExecutorLink(Protocol):
    def action(self, kind: str, body: bytes = b"") -> bytes: ...
    def action_json(self, kind: str, body: bytes = b"") -> Any: ...
    def close(self) -> None: ...


def _unverified(address: str) -> ExecutorLink:
    return ExecutorClient(address, None)


class Scheduler:
    def __init__(self, store: Store,
                 connect: Callable[[str], ExecutorLink] = _unverified) -> None:
        self.store = store
        self._connect = connect
        self._unreachable_since: dict[str, float] = {}

    def submit(self, body: dict[str, Any]) -> Task:
        names = body.get("datasets")
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise InputError("datasets: give a non-empty list of dataset names")
        if len(set(names)) != len(names):
            raise InputError("datasets: a dataset is named twice")
        executor = str(body.get("executor", ""))
        parse_address(executor)
        initiator_key = check_public_key(str(body.get("initiator_key", "")))
        params = body.get("params") or {}
        if not isinstance(params, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in params.items()):
            raise InputError("params: must map names to string values")
        comp = compute.get(str(body.get("compute", "")))
        checked = comp.check_params(dict(params))
        catalog = [self.store.dataset(n) for n in names]
        comp.check_schemas({d["name"]: schema_from_b64(d["schema_b64"]) for d in catalog},
                           checked)
        task_id = uuid.uuid4().hex[:16]
        spec = wire.TaskSpec(
            task_id=task_id, compute=comp.name, params=dict(params),
            datasets=tuple(wire.DatasetRef(d["name"], d["owner"], self.store.node_key(d["owner"]),
                                           d["fingerprint"]) for d in catalog),
            initiator_key=initiator_key)
        self.store.create_task(task_id, comp.name, dict(params), executor, initiator_key,
                               spec.to_dict())
        try:
            link = self._connect(executor)
            try:
                link.action("create-task", spec.encode())
            finally:
                link.close()
        except TeeflowError as exc:
            self.store.transition(task_id, "fail", {"reason": str(exc)}, error=str(exc))
            raise
        self.store.transition(task_id, "accept", {"executor": executor})
        return self.store.task(task_id)

    def report(self, task_id: str, dataset: str, node: str, body: dict[str, Any]) -> None:
        """A provider's progress or outcome for one of its assignments."""
        state = str(body.get("state", ""))
        rows = body.get("rows", 0) or 0
        if not isinstance(rows, int) or rows < 0:
            raise InputError("rows: a non-negative whole number")
        error = body.get("error")
        error = str(error)[:2000] if error else None
        task = self.store.task(task_id)
        self.store.update_assignment(task_id, dataset, node, state, rows, error)
        detail = {"dataset": dataset, "node": node, "rows": rows}
        attested = body.get("attested")
        if state == "started" and isinstance(attested, dict) and task.state == "uploading":
            claims = {k: attested.get(k) for k in ("tee", "measurements", "debug", "tcb_status",
                                                     "simulated")}
            self.store.transition(task_id, "attest", {**detail, "claims": claims})
        elif state == "started" and rows == 0 and task.state in ("accepted", "uploading"):
            self.store.transition(task_id, "upload", {**detail, "step": "started"})
        elif state == "uploaded" and task.state == "uploading":
            self.store.transition(task_id, "upload", {**detail, "step": "uploaded"})
        elif state == "failed" and task.state not in ("released", "failed", "cancelled"):
            reason = f"{node} could not upload {dataset}: {error}"
            self.store.transition(task_id, "fail", {**detail, "reason": error}, error=reason)
            self._tell_executor(task.executor, "cancel", task_id)

    def cancel(self, task_id: str) -> Task:
        task = self.store.task(task_id)
        self.store.transition(task_id, "cancel", {"by": "request"})
        self._tell_executor(task.executor, "cancel", task_id)
        return self.store.task(task_id)

    def _tell_executor(self, executor: str, kind: str, task_id: str) -> Any:
        link = self._connect(executor)
        try:
            return link.action_json(kind, task_id.encode())
        finally:
            link.close()

    def tick(self) -> None:
        """One pass over live tasks: start runs, follow executors, fail what is lost."""
        for task in self.store.tasks(active_only=True):
            try:
                self._follow(task)
            except StateError as exc:  # a concurrent change won; next tick sees it
                log.debug("task %s: %s", task.id, exc)
            except TeeflowError as exc:
                log.warning("task %s: %s", task.id, exc)

    def _follow(self, task: Task) -> None:
        if task.state == "submitted":
            return
        try:
            status = self._tell_executor(task.executor, "status", task.id)
        except (Unreachable, PeerError) as exc:
            first = self._unreachable_since.setdefault(task.id, time.time())
            if time.time() - first > UNREACHABLE_GRACE:
                self.store.transition(task.id, "fail", {"reason": str(exc)},
                                      error=f"executor lost: {exc}")
            return
        self._unreachable_since.pop(task.id, None)
        remote = status["status"]
        if remote == "failed":
            self.store.transition(task.id, "fail", {"reason": status.get("error")},
                                  error=status.get("error") or "executor failed the task")
        elif remote == "cancelled":
            self.store.transition(task.id, "cancel", {"by": "executor"})
        elif task.state == "uploading" and remote == "waiting":
            assignments = self.store.assignments(task.id)
            if all(a["state"] == "uploaded" for a in assignments) and \
                    sorted(status["received"]) == sorted(a["dataset"] for a in assignments):
                self._tell_executor(task.executor, "run", task.id)
                self.store.transition(task.id, "run", {"inputs": status["received"]})
        elif task.state == "uploading" and remote in ("running", "done", "released"):
            self.store.transition(task.id, "run", {"inputs": status["received"]})
        elif task.state == "running" and remote in ("done", "released"):
            self.store.transition(task.id, "finish", {"inputs_wiped": True})
        elif task.state == "done" and remote == "released":
            self.store.transition(task.id, "release", {"to": "initiator"})
