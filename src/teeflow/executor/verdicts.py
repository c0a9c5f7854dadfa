"""The scheduler's word on how a task ends, taken only from the scheduler its spec names.

The owners sign `scheduler_key` into the spec; with it the scheduler signs

    abort    (spec digest, run): it failed or cancelled the task. The executor fails it
             (cancels a done one, as long as no result was let out), drops every input and
             every sealed result, and records `aborted` and `wiped`.
    release  (spec digest, run): it recorded `release-granted` in its log. Only then does
             the executor hand the sealed result of that run to a receiver.

So the two cannot disagree: a result leaves only after the log says so, and once the
scheduler has failed a task no result of it leaves (its abort is refused only after a
release it granted itself). `run` ties each word to one run: a replay of an old abort
cannot end a later run of the same spec. A spec without `scheduler_key` takes neither
word, and its result is released without one (providers refuse to sign such a spec).
"""

from __future__ import annotations

from teeflow.core import wire
from teeflow.core.crypto import verify_signature
from teeflow.core.errors import AuthError, StateError
from teeflow.executor.states import RESULT, ResultEvent, TaskEvent, TaskState
from teeflow.executor.tasks import Task, Tasks


def _check(task: Task, run: int, signature: bytes, message: bytes, what: str) -> None:
    key = task.spec.scheduler_key
    if key is None:
        raise AuthError(f"task {task.spec.task_id}: its spec names no scheduler key; "
                        f"no {what} is taken for it")
    verify_signature(key, signature, message)
    if run != task.run:
        raise StateError(f"task {task.spec.task_id}: the {what} is for run {run}, this is "
                         f"run {task.run}")


def abort(tasks: Tasks, ref: str, run: int, signature: bytes) -> str:
    """End a task by its scheduler's signed word; its status after (repeating is harmless)."""
    with tasks.lock:
        task = tasks.get(ref)
    _check(task, run, signature, wire.abort_message(task.digest, run), "abort")
    tasks.settle(task)  # running digests record `received` before `wiped`
    with tasks.lock:
        if task.granted and task.status in (TaskState.DONE, TaskState.RELEASED):
            raise StateError(f"task {task.spec.task_id}: its scheduler let the result out "
                             "already")
        if task.status in (TaskState.WAITING, TaskState.RUNNING, TaskState.DONE):
            # a computed task is never failed (states.py): a done one is cancelled
            task.step(TaskEvent.CANCEL if task.status == TaskState.DONE else TaskEvent.FAIL)
            task.error = "ended by the scheduler"
            task.sealed.clear()
            for receiver, state in task.results.items():
                if RESULT.allows(state, ResultEvent.DROP):
                    task.step_result(receiver, ResultEvent.DROP)
            tasks.record(task, "aborted", {"spec_digest": task.digest, "run": run})
        tasks.wipe(task, "aborted")
        return str(task.status)


def grant(tasks: Tasks, ref: str, run: int, signature: bytes) -> bool:
    """Let a done task's result out, by its scheduler's signed word (repeating is harmless)."""
    with tasks.lock:
        task = tasks.get(ref)
    _check(task, run, signature, wire.release_message(task.digest, run), "release")
    with tasks.lock:
        if task.status not in (TaskState.DONE, TaskState.RELEASED):
            raise StateError(f"task {task.spec.task_id} is {task.status}; no result to "
                             "release")
        task.granted = True
        return True


def released(task: Task) -> bool:
    """Whether a receiver may take this task's result now. Caller holds the lock."""
    return task.granted or task.spec.scheduler_key is None
