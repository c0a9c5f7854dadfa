"""A provider's side of federated rounds: its rows stay here; only updates leave,
and only to the attested executor."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from teeflow.compute import federated
from teeflow.core.answers import GlobalModel
from teeflow.core.crypto import Signer
from teeflow.core.errors import ComputeError, TaskFailed
from teeflow.files.datasets import iter_batches, read_schema
from teeflow.net.executor_client import ExecutorClient

POLL = 0.05
ROUND_TIMEOUT = 600.0


def load_xy(path: Path, params: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """This node's features and 0/1 label, read in batches into one float64 matrix."""
    features = federated.features_for(read_schema(path), params)
    table = pa.Table.from_batches(list(iter_batches(path)))
    columns = [table.column(f).to_numpy(zero_copy_only=False).astype(np.float64)
               for f in features]
    x = np.column_stack(columns) if columns else np.empty((table.num_rows, 0))
    y = table.column(params["label"]).to_numpy(zero_copy_only=False).astype(np.float64)
    if not np.all(np.isfinite(x)) or not np.all(np.isin(y, (0.0, 1.0))):
        raise ComputeError("federated training needs finite features and a 0/1 label")
    return x, y, features


def take_part(client: ExecutorClient, task_id: str, dataset: str, path: Path,
              params: dict[str, Any], signer: Signer, progress=None,
              spec_digest: str | None = None) -> dict[str, Any]:
    """Every round: wait for the global model, train on local rows, send the update."""
    x, y, features = load_xy(path, params)
    own = np.zeros(len(features) + 1)
    for round_ in range(params["rounds"]):
        deadline = time.monotonic() + ROUND_TIMEOUT
        while True:
            state = client.federated("fl-model", task_id, dataset, round_, signer,
                                     spec_digest=spec_digest)
            assert isinstance(state, GlobalModel)
            if state.status in ("failed", "cancelled"):
                raise TaskFailed(f"task {task_id} {state.status} during round {round_}")
            if state.round == round_ and not state.sent:
                break
            if time.monotonic() > deadline:
                raise TaskFailed(f"round {round_} did not open within {ROUND_TIMEOUT:.0f}s")
            time.sleep(POLL)
        if state.weights is not None and len(state.weights) != len(features) + 1:
            raise TaskFailed(f"task {task_id}: the executor's model has "
                             f"{len(state.weights)} weights, not {len(features) + 1}")
        # no global model (the first round, or final_only): go on from this node's own
        weights = (own if state.weights is None
                   else np.asarray(state.weights, dtype=np.float64))
        new, loss = federated.local_update(x, y, weights, params)
        own = new
        update = {"weights": new.tolist(), "n_samples": int(x.shape[0]), "loss": loss,
                  "features": features}
        client.federated("fl-update", task_id, dataset, round_, signer, update,
                         spec_digest=spec_digest)
        if progress is not None:
            progress(round_ + 1)
    return {"rows": int(x.shape[0]), "rounds": params["rounds"]}
