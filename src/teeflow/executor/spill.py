"""Inputs that do not fit the executor's memory budget go to disk, sealed.

Each spilled dataset is one file of records: a batch's Arrow IPC encoding, encrypted with
AES-256-GCM under a key made for that file and held only in this process (never written,
never sent). The record's index is the nonce and the associated data, so records cannot be
reordered, dropped from the middle or swapped between files without failing to decrypt.
The file is deleted when the input is wiped.
"""

from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import Iterator
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
        fd, name = tempfile.mkstemp(prefix="teeflow-spill-", dir=directory)
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
