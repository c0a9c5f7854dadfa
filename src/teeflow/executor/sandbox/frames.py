"""The messages between the executor (parent) and the sandboxed child, and how they are framed.

Every frame is a 4-byte little-endian length and that many bytes. On the child's stdin:

1. the code, UTF-8 (at most ``MAX_CODE_BYTES``);
2. the dataset names, a JSON list (at most ``MAX_MESSAGE_BYTES``);
3. per dataset, one Arrow IPC stream cut into frames (``FramedSink``), ended by an empty frame.

On the child's result channel (its stdout):

1. the isolation applied, a JSON object: ``{"network": one of NETWORK, "user": one of USER,
   "guard": GUARD}``, sent before the user code runs;
2. the status, a JSON object: ``{"ok": true, "kind": "table" | "bytes"}``, or ``{"ok": false}``
   with ``"problem"`` (``"isolation"``, ``"startup"``, ``"no_run"``, ``"bad_return"`` and its
   ``"type"``) or ``"exception"`` (a name from ``BUILTIN_EXCEPTIONS``, else ``"UserException"``);
3. after an ok status, the payload, unframed, up to the end of the stream: an Arrow IPC stream
   for a table, the bytes themselves otherwise.

The child imports this module, so it imports only the standard library, and starts no thread.
"""

from __future__ import annotations

import builtins
import io
import json
import struct
from typing import Any, BinaryIO

MAX_CODE_BYTES = 256 << 10
MAX_MESSAGE_BYTES = 64 << 10  # a JSON message (names, isolation, status)

HEADER = struct.Struct("<I")

NETWORK = ("netns", "userns+netns", "none")
USER = ("nobody", "userns", "unchanged")
GUARD = "audit-hook"
BUILTIN_EXCEPTIONS = frozenset(
    name for name, value in vars(builtins).items()
    if isinstance(value, type) and issubclass(value, BaseException)
)


def frame(data: bytes) -> bytes:
    return HEADER.pack(len(data)) + data


def read_exact(stream: BinaryIO, n: int) -> bytes:
    data = stream.read(n)
    if data is None or len(data) != n:
        raise EOFError("input ended early")
    return data


def read_frame(stream: BinaryIO, limit: int) -> bytes:
    (n,) = HEADER.unpack(read_exact(stream, HEADER.size))
    if n > limit:
        raise ValueError("frame too large")
    return read_exact(stream, n)


def write_message(out: BinaryIO, value: dict[str, Any]) -> None:
    out.write(frame(json.dumps(value).encode()))
    out.flush()


def take_message(data: bytes) -> tuple[dict[str, Any], bytes] | None:
    """The JSON object framed at the start of ``data`` and the bytes after it; None when
    ``data`` does not start with one (too short, too large, not JSON, not an object)."""
    if len(data) < HEADER.size:
        return None
    (n,) = HEADER.unpack_from(data)
    if n > MAX_MESSAGE_BYTES or len(data) < HEADER.size + n:
        return None
    try:
        value = json.loads(data[HEADER.size:HEADER.size + n])
    except ValueError:
        return None
    return (value, data[HEADER.size + n:]) if isinstance(value, dict) else None


class FramedSink(io.RawIOBase):
    """Writes each chunk as a length-prefixed frame; ``end()`` writes the empty frame."""

    def __init__(self, pipe: BinaryIO) -> None:
        super().__init__()
        self._pipe = pipe

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        data = bytes(b)
        if data:
            self._pipe.write(frame(data))
        return len(data)

    def end(self) -> None:
        self._pipe.write(frame(b""))

    def close(self) -> None:  # the pipe outlives one table's stream
        self.flush()


class FramedSource(io.RawIOBase):
    """Reads the frames written by ``FramedSink`` as one stream, until the empty frame."""

    def __init__(self, pipe: BinaryIO) -> None:
        super().__init__()
        self._pipe = pipe
        self._left = 0
        self._done = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._left:
            if self._done:
                return 0
            (self._left,) = HEADER.unpack(read_exact(self._pipe, HEADER.size))
            self._done = self._left == 0
        chunk = self._pipe.read(min(len(buffer), self._left))
        if not chunk:
            raise EOFError("input ended inside a frame")
        buffer[: len(chunk)] = chunk
        self._left -= len(chunk)
        return len(chunk)
