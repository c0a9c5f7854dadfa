"""Streaming one dataset across a pool's members: every batch is cut into one slice per
member (member k gets slice k of each batch), so each holds about 1/N of the rows and
no row goes to two members. Each member's stream is its own signed upload (signed for
the whole pool's attested keys, wire.upload_message); one failed stream stops them all,
and the members it reached fail the task (an upload without its end marker never counts).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa

from teeflow.core.crypto import Signer
from teeflow.core.errors import PeerError
from teeflow.net.executor_client import ExecutorClient

DEPTH = 4  # batches queued per member: the slowest member paces the stream
_END = object()


def slices(batch: pa.RecordBatch, members: int) -> list[pa.RecordBatch]:
    """The batch cut into `members` contiguous slices of near-equal size (zero-copy)."""
    n = batch.num_rows
    cuts = [n * k // members for k in range(members + 1)]
    return [batch.slice(cuts[k], cuts[k + 1] - cuts[k]) for k in range(members)]


def upload_parts(clients: list[ExecutorClient], task_id: str, dataset: str, signer: Signer,
                 schema: pa.Schema, batches: Iterator[pa.RecordBatch],
                 progress: Callable[[int], None] | None, spec_digest: str,
                 keys: list[str]) -> list[dict[str, Any]]:
    """Each member's receipt, in pool order; the first failure, raised, stops every stream."""
    queues: list[queue.Queue[Any]] = [queue.Queue(DEPTH) for _ in clients]
    receipts: list[dict[str, Any] | None] = [None] * len(clients)
    errors: list[BaseException] = []
    stop = threading.Event()

    def drain(k: int) -> Iterator[pa.RecordBatch]:
        while True:
            item = queues[k].get()
            if item is _END:
                return
            if stop.is_set() or isinstance(item, BaseException):
                raise PeerError(f"dataset {dataset!r}: the upload to another pool member "
                                "failed; this part is abandoned")
            yield item

    def send(k: int) -> None:
        try:
            receipts[k] = clients[k].upload(task_id, dataset, signer, schema, drain(k),
                                            spec_digest=spec_digest, pool=keys)
        except BaseException as exc:
            errors.append(exc)
            stop.set()
            while True:  # unblock the reader
                try:
                    queues[k].get_nowait()
                except queue.Empty:
                    break

    threads = [threading.Thread(target=send, args=(k,), daemon=True,
                                name=f"teeflow-part-{k}") for k in range(len(clients))]
    for t in threads:
        t.start()
    try:
        for batch in batches:
            for k, part in enumerate(slices(batch, len(clients))):
                _put(queues[k], part, stop)
                if stop.is_set():
                    break
            if stop.is_set():
                break
            if progress is not None:
                progress(batch.num_rows)
    except BaseException as exc:
        errors.append(exc)
        stop.set()
    finally:
        for q in queues:
            _put(q, _END if not stop.is_set() else PeerError("stopped"), None)
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
    return [r or {} for r in receipts]


def _put(q: queue.Queue[Any], item: Any, stop: threading.Event | None) -> None:
    """Put, giving up once another stream failed (its reader may be gone)."""
    while True:
        try:
            q.put(item, timeout=0.2)
            return
        except queue.Full:
            if stop is not None and stop.is_set():
                return
            if stop is None:  # the final marker: make room, the reader is gone or stopping
                try:
                    q.get_nowait()
                except queue.Empty:
                    pass
