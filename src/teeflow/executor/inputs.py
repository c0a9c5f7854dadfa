"""The inputs a task holds: the memory budget they count against, a pass over one input
(its batches in memory, then its sealed spill), and its digest. Never hands rows out of
the executor: the passes feed the computation and the digest only.
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import threading
from collections.abc import Callable, Iterator

import pyarrow as pa

from teeflow.executor.spill import SealedSpill


def _libc_trim() -> Callable[[], object] | None:
    try:
        trim = ctypes.CDLL(None).malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None
    return lambda: trim(0)


_TRIM = _libc_trim()


def few_arenas(count: int = 2) -> None:
    """At most `count` C heaps (glibc's M_ARENA_MAX), set before the server's threads
    start: each thread that allocates would otherwise get a heap of its own (up to 8 per
    core), each keeping its freed pages, fragmented, after a load has passed."""
    try:
        ctypes.CDLL(None).mallopt(-8, count)  # M_ARENA_MAX; glibc only
    except (OSError, AttributeError):
        pass


def give_back() -> None:
    """Return memory freed by a task (its inputs, the computation's working set) to the
    OS: Arrow's pool and the C heap keep freed pages for reuse, so an executor that ran
    many tasks at once would stay at its peak long after they all ended."""
    gc.collect()
    pa.default_memory_pool().release_unused()
    if _TRIM is not None:
        _TRIM()


class MemoryBudget:
    """Bytes of input held in memory across every task; `None` is no limit."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self._held = 0
        self._lock = threading.Lock()

    def reserve(self, nbytes: int) -> bool:
        """Count `nbytes` against the budget if they fit."""
        with self._lock:
            if self.limit is not None and self._held + nbytes > self.limit:
                return False
            self._held += nbytes
            return True

    def free(self, nbytes: int) -> None:
        with self._lock:
            self._held -= nbytes


def batches_of(held: list[pa.RecordBatch], spill: SealedSpill | None
               ) -> Callable[[], Iterator[pa.RecordBatch]]:
    """A fresh pass over an input: its in-memory batches, then its spilled ones."""
    held = list(held)

    def batches() -> Iterator[pa.RecordBatch]:
        yield from held
        if spill is not None:
            yield from spill.batches()

    return batches


class Digest:
    """SHA-256 over a received dataset's batches (their Arrow IPC encoding), on a thread of
    its own; `done` gets the hex digest. hashlib releases the GIL on large buffers."""

    def __init__(self, batches: Callable[[], Iterator[pa.RecordBatch]],
                 done: Callable[[str], None]) -> None:
        self._thread = threading.Thread(target=self._work, args=(batches, done), daemon=True)
        self._thread.start()

    @staticmethod
    def _work(batches: Callable[[], Iterator[pa.RecordBatch]],
              done: Callable[[str], None]) -> None:
        h = hashlib.sha256()
        for batch in batches():
            # The IPC encoding covers exactly this batch's rows, even for a slice that
            # shares larger buffers (one batch at a time, so the copy stays small).
            h.update(memoryview(batch.serialize()))
        done(h.hexdigest())

    def wait(self) -> None:
        self._thread.join()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()
