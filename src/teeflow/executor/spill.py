"""Inputs that do not fit the executor's memory budget go to disk, sealed.

Each spilled dataset is one file of records: a batch's Arrow IPC encoding, encrypted with
AES-256-GCM under a key made for that file and held only in this process (never written,
never sent). The record's index is the nonce and the associated data, so records cannot be
reordered, dropped from the middle or swapped between files without failing to decrypt.
The file is deleted when the input is wiped.

Spill files (and DuckDB's encrypted temp folders) live in this run's own directory
(`RunDir`); a start removes what dead runs left, whose keys died with them.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import struct
import tempfile
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from teeflow.core.errors import ComputeError

_LEN = struct.Struct(">Q")
MAX_RECORD = 1 << 31


class SealedSpill:
    def __init__(self, schema: pa.Schema, directory: str | Path | None = None) -> None:
        self.schema = schema
        self._aead = AESGCM(AESGCM.generate_key(bit_length=256))
        fd, name = tempfile.mkstemp(prefix=SPILL_PREFIX, dir=directory)
        self.path = Path(name)
        self._file = os.fdopen(fd, "r+b")
        self.count = 0
        self.nbytes = 0  # the batches' in-memory size, for accounting

    def append(self, batch: pa.RecordBatch) -> None:
        index = struct.pack(">Q", self.count).rjust(12, b"\0")
        # Encrypt straight from Arrow's buffer (format 'b' cast to bytes): no extra copy.
        sealed = self._aead.encrypt(index, memoryview(batch.serialize()).cast("B"), index)
        self._file.seek(0, os.SEEK_END)
        self._file.write(_LEN.pack(len(sealed)))
        self._file.write(sealed)
        del sealed
        self.count += 1
        self.nbytes += batch.nbytes

    def batches(self) -> Iterator[pa.RecordBatch]:
        """The batches in order, decrypted one at a time."""
        self._file.flush()
        with open(self.path, "rb") as f:
            for i in range(self.count):
                head = f.read(_LEN.size)
                if len(head) != _LEN.size:
                    raise ComputeError("spilled input is truncated")
                (size,) = _LEN.unpack(head)
                if size > MAX_RECORD:
                    raise ComputeError("spilled input record is too large")
                index = struct.pack(">Q", i).rjust(12, b"\0")
                try:
                    data = self._aead.decrypt(index, f.read(size), index)
                except InvalidTag:
                    raise ComputeError("spilled input does not decrypt (altered on disk)") \
                        from None
                yield pa.ipc.read_record_batch(pa.py_buffer(data), self.schema)

    def close(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


# -- this run's directory, and what dead runs left ---------------------------------------
SPILL_PREFIX = "teeflow-spill-"
SQL_PREFIX = "teeflow-sql-"  # compute/sql/session.py's DuckDB temp folders
RUN_PREFIX = "run-"


@dataclass(frozen=True)
class Wiped:
    """What a start removed of dead runs: counts only."""

    runs: int = 0
    spill_files: int = 0
    sql_dirs: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"runs": self.runs, "spill_files": self.spill_files, "sql_dirs": self.sql_dirs}


class RunDir:
    """One executor run's own directory under the spill root: its spill files and DuckDB's
    temp folders (`sql/`), and a `lock` file this process holds an exclusive flock on while
    it lives. The lock dies with the process however it dies, so a later start knows which
    run directories are dead (their AES keys died with them: the files are only noise now)
    and removes them, while leaving live runs that share the root alone.

    Made under a hidden name and renamed once locked, so no start ever sees a live run
    directory without its lock held. Removed when this object is collected or the
    interpreter exits; a SIGKILL leaves it to the next start.
    """

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else \
            Path(tempfile.gettempdir()) / f"teeflow-executor-{os.getuid()}"
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.wiped = wipe_dead_runs(self.root)
        staging = Path(tempfile.mkdtemp(prefix=".new-", dir=self.root))
        fd = os.open(staging / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.path = self.root / (RUN_PREFIX + staging.name.removeprefix(".new-"))
        os.rename(staging, self.path)
        self.spill = self.path
        self.sql = self.path / "sql"
        self.sql.mkdir(mode=0o700)
        self._finalizer = weakref.finalize(self, _remove_run, self.path, fd)

    def close(self) -> None:
        self._finalizer()


def _remove_run(path: Path, fd: int) -> None:
    shutil.rmtree(path, ignore_errors=True)
    os.close(fd)


def wipe_dead_runs(root: Path) -> Wiped:
    """Remove every run directory under `root` whose lock nobody holds, and the spill
    files and SQL temp folders an older executor left at the top of `root`."""
    runs = spill_files = sql_dirs = 0
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(RUN_PREFIX) and entry.is_dir():
            if _alive(entry / "lock"):
                continue
            spill_files += sum(1 for f in entry.glob(SPILL_PREFIX + "*"))
            sql_dirs += sum(1 for d in entry.glob(f"sql/{SQL_PREFIX}*"))
            shutil.rmtree(entry, ignore_errors=True)
            runs += 1
        elif entry.name.startswith(SPILL_PREFIX) and entry.is_file():
            entry.unlink(missing_ok=True)
            spill_files += 1
        elif entry.name.startswith(SQL_PREFIX) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
            sql_dirs += 1
    return Wiped(runs, spill_files, sql_dirs)


def _alive(lock: Path) -> bool:
    """Whether a live process holds `lock` (a missing lock means a dead, half-made run)."""
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
