"""Running a task's computation over its held inputs, once every input is in; then the
inputs are wiped, whatever the outcome. Once the data is read, only a catalogued public
error (teeflow.compute.errors) is reported as itself; any other failure, and every crash,
by its type only, also in the host's log: no message or traceback from inside may leave
the enclave.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import pyarrow as pa

from teeflow import compute
from teeflow.compute.errors import is_public, public
from teeflow.compute.rows import Source
from teeflow.core.errors import AttestationError, PeerError, StateError, TeeflowError
from teeflow.executor.inputs import batches_of, give_back
from teeflow.executor.pool.seat import Seats
from teeflow.executor.release import Release
from teeflow.executor.states import TASK, TaskEvent, TaskState, missing_inputs
from teeflow.executor.tasks import Task, Tasks

log = logging.getLogger("teeflow.executor")
# a pool's own failures (a member refused or lost): their messages name members, no data
POOL_ERRORS = (AttestationError, PeerError)


class Runner:
    def __init__(self, tasks: Tasks, release: Release, seats: Seats | None = None) -> None:
        self.tasks = tasks
        self.release = release
        self.seats = seats  # this executor's part in pool tasks (executor/pool/seat.py)

    def run(self, task_id: str, background: bool = True) -> str:
        with self.tasks.lock:
            task = self.tasks.get(task_id)
            if not TASK.allows(task.status, TaskEvent.RUN) or task.fed is not None:
                return str(task.status)  # a federated task finishes with its last round
            if task.pool_keys is not None and (self.seats is None
                                               or task.pool_keys[0] != self.seats.me):
                raise StateError(f"task {task_id}: a pool task is run by its lead only")
            missing = missing_inputs(task.uploads)
            if missing:
                raise StateError(f"task {task_id}: still waiting for {missing}")
            task.step(TaskEvent.RUN)
        if background:
            threading.Thread(target=self._compute, args=(task,), daemon=True).start()
        else:
            self._compute(task)
        return str(TaskState.RUNNING)

    def _compute(self, task: Task) -> None:
        try:
            self._compute_once(task)
        finally:  # done or failed, its inputs are wiped: their memory goes back too
            give_back()

    def _compute_once(self, task: Task) -> None:
        spec = task.spec
        self.tasks.settle(task)  # every input's `received` entry is in before the run
        try:  # before any data is read: messages quote only the spec and the schemas
            comp = compute.get(spec.compute)
            comp.check_schemas({d.name: task.schemas[d.name] for d in spec.datasets},
                               task.params)
        except TeeflowError as exc:
            with self.tasks.lock:
                self.tasks.fail(task, str(exc))
            return
        except Exception as exc:
            self._crashed(task, exc)
            return
        inputs: dict[str, int] | None = None  # a pool's, over every member
        try:
            if task.pool_keys is not None:
                value, inputs = self._run_pool(task)
            elif task.spills:  # larger than the memory budget: stream it
                value = self._run_streamed(task, comp)
            else:
                tables = [(d.name, pa.Table.from_batches(task.inputs[d.name],
                                                         task.schemas[d.name]))
                          for d in spec.datasets]
                value = comp.run(tables, task.params)
                del tables
            plaintext, sealed = self.release.seal_all(task, value, inputs)
        except Exception as exc:  # never let an inner message leave the enclave
            if is_public(exc) or isinstance(exc, POOL_ERRORS):
                with self.tasks.lock:
                    self.tasks.fail(task, str(exc))
            else:
                self._crashed(task, exc)
            return
        with self.tasks.lock:
            self.tasks.wipe(task, "computed")
            if TASK.allows(task.status, TaskEvent.FINISH):  # not cancelled meanwhile
                self.release.done(task, TaskEvent.FINISH, plaintext, sealed)
        log.info("task %s done; inputs wiped", spec.task_id)

    def _crashed(self, task: Task, exc: BaseException) -> None:
        """A failure whose message is not public: its type and the task id, nothing else."""
        log.error("task %s: computation failed (%s)", task.spec.task_id, type(exc).__name__)
        with self.tasks.lock:
            self.tasks.fail(task, f"computation {task.spec.compute} failed "
                                  f"({type(exc).__name__})")

    def _run_pool(self, task: Task) -> tuple[dict[str, Any], dict[str, int]]:
        """This executor leads the task's pool (a member is called in by its lead)."""
        from teeflow.executor.pool import lead  # Dask only for pools

        if self.seats is None or task.pool_keys is None or task.pool_keys[0] != self.seats.me:
            raise StateError(f"task {task.spec.task_id}: only the pool's lead runs it")
        return lead.run(self.seats, task, task.params)

    def _run_streamed(self, task: Task, comp: compute.Computation) -> dict[str, Any]:
        budget = self.tasks.memory.limit
        if comp.run_stream is None:
            raise public("too_large_for_memory", computation=comp.name, limit=budget)
        sources = [Source(d.name, task.schemas[d.name], task.received[d.name]["rows"],
                          batches_of(task.inputs[d.name], task.spills.get(d.name)))
                   for d in task.spec.datasets]
        return comp.run_stream(sources, {**task.params, "_memory_budget": f"{budget}B"})
