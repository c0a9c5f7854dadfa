"""The Python SDK: submit a task, wait for it, take its result as Python objects.

    from teeflow.sdk import Client
    client = Client("http://127.0.0.1:8700", key="~/.config/teeflow/key.pem", policy=policy)
    task = client.submit(["train_party_1", "train_party_2"], executor="127.0.0.1:8815",
                         compute="logistic_regression", params={"label": "y"})
    client.wait(task["id"])
    result = client.result(task["id"])       # appraises the executor first
    result.value["coefficients"], result.to_pandas()
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from teeflow.attestation.evidence import Claims
from teeflow.attestation.policy import AppraisalPolicy
from teeflow.attestation.registry import make_verifiers
from teeflow.core.crypto import KeySigner, Signer, load_or_create_key
from teeflow.core.errors import ConfigError, TaskFailed
from teeflow.core.executor_client import attested_connect
from teeflow.core.scheduler_client import SchedulerClient

DEFAULT_HOME = Path("~/.config/teeflow").expanduser()
FAILED = ("failed", "cancelled")


@dataclass(frozen=True)
class Result:
    """A task's result, and the executor's claims as you appraised them."""

    task_id: str
    value: dict[str, Any]
    simulated: bool
    tee: str
    claims: Claims
    raw: bytes

    def to_pandas(self):
        """Coefficients or aggregated parameters as a DataFrame (name, value)."""
        import pandas as pd

        for key in ("coefficients", "parameters"):
            if isinstance(self.value.get(key), dict):
                items = list(self.value[key].items())
                if "intercept" in self.value:
                    items.append(("intercept", self.value["intercept"]))
                return pd.DataFrame(items, columns=["name", "value"])
        return pd.json_normalize(self.value)


class Client:
    def __init__(self, scheduler: str, key: Signer | str | Path | None = None,
                 policy: AppraisalPolicy | None = None) -> None:
        self.scheduler = SchedulerClient(scheduler)
        if key is None or isinstance(key, (str, Path)):
            key = load_or_create_key(Path(key or DEFAULT_HOME / "key.pem").expanduser())
        self.signer: Signer = key
        self.policy = policy

    def close(self) -> None:
        self.scheduler.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def datasets(self) -> list[dict[str, Any]]:
        return self.scheduler.datasets()

    def submit(self, datasets: Sequence[str], executor: str, compute: str,
               params: dict[str, Any] | None = None) -> dict[str, Any]:
        body = {"datasets": list(datasets), "executor": executor, "compute": compute,
                "params": {k: str(v) for k, v in (params or {}).items()},
                "initiator_key": self.signer.public_key()}
        return self.scheduler.submit(body)

    def tasks(self) -> list[dict[str, Any]]:
        return self.scheduler.tasks()

    def task(self, task_id: str) -> dict[str, Any]:
        return self.scheduler.task(task_id)

    def cancel(self, task_id: str) -> dict[str, Any]:
        return self.scheduler.cancel(task_id)

    def wait(self, task_id: str, timeout: float | None = None, poll: float = 0.3,
             on_update: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Block until the task's result is ready; TaskFailed if it fails or is cancelled."""
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
                raise TimeoutError(f"task {task_id} still {task['state']} after {timeout}s")
            time.sleep(poll)

    def result(self, task_id: str, policy: AppraisalPolicy | None = None) -> Result:
        """Appraise the task's executor with your own policy, then take the result from it."""
        policy = policy or self.policy
        if policy is None:
            raise ConfigError("policy: give an appraisal policy to check the executor "
                              "before taking a result from it")
        task = self.scheduler.task(task_id)
        client, claims = attested_connect(task["executor"], policy, make_verifiers())
        with client:
            raw = client.take_result(task_id, self.signer)
        body = json.loads(raw)
        return Result(task_id=task_id, value=body["result"], simulated=bool(body["simulated"]),
                      tee=body["tee"], claims=claims, raw=raw)


def new_key() -> KeySigner:
    return KeySigner.generate()
