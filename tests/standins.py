"""Stand-ins for the devices the TEE backends talk to, shared by the backend tests.

configfs-tsm: a real configfs mount reacts to mkdir, to writes and to reads; a
plain directory does not, so `FakeTsmKernel` plays the kernel's part (see its
docstring). Gramine's `/dev/attestation` is a directory of pseudo-files; a
plain directory with the same files stands in for it (`attestation_dir`).
The backends under test are the production code, unchanged.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest


def attestation_dir(where: Path, quote: bytes, *, kind: bytes = b"dcap") -> Path:
    """A stand-in for Gramine's /dev/attestation whose `quote` file holds `quote`."""
    d = where / "attestation"
    d.mkdir()
    (d / "attestation_type").write_bytes(kind)
    (d / "user_report_data").write_bytes(b"")
    (d / "quote").write_bytes(quote)
    return d


Respond = Callable[[bytes], tuple[bytes, bytes | None]]


class FakeTsmKernel:
    """The kernel's side of configfs-tsm, played on a plain directory.

    What a configfs mount does, and how it is played here:
    - mkdir of `root/NAME` fills the new directory with attribute files: the
      wrapped `os.mkdir` (monkeypatched for this test only, delegating every
      other path) creates `provider`, `generation` ("0"), `inblob`, `privlevel`
      and `auxblob` (sev_guest), and `outblob` as a FIFO;
    - reading `outblob` makes the kernel generate the report from `inblob`: a
      serving thread polls (1 ms, non-blocking) for a reader of each pending
      outblob FIFO. The reader is the backend, which has written and closed
      `inblob` before, so the thread then reads `inblob`, sets `generation` to
      the number of writes (plus `extra_writes`, to play a concurrent writer),
      fills `auxblob`, writes the report into the FIFO and closes it: the
      backend's read returns exactly when the kernel's would;
    - rmdir removes the attributes with the directory: the wrapped `os.rmdir`.
    Nothing blocks without bound: an unserved FIFO is dropped once removed, and
    the thread stops at teardown.
    """

    def __init__(self, root: Path, provider: str, respond: Respond) -> None:
        self.root = root
        self.provider = provider
        self.respond = respond
        self.extra_writes = 0
        self.inblobs: list[bytes] = []
        self.privlevels: list[bytes] = []
        self.created: list[Path] = []
        self.errors: list[BaseException] = []
        self._pending: set[Path] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._real_mkdir = os.mkdir
        self._real_rmdir = os.rmdir
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(os, "mkdir", self._mkdir)
        monkeypatch.setattr(os, "rmdir", self._rmdir)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        assert not self._thread.is_alive()

    def _ours(self, path: object) -> Path | None:
        if not isinstance(path, str | os.PathLike):
            return None
        p = Path(os.fspath(path))
        return p if p.parent == self.root else None

    def _mkdir(self, path: os.PathLike[str] | str, mode: int = 0o777, **kw: object) -> None:
        entry = self._ours(path)
        self._real_mkdir(path, mode, **kw)  # type: ignore[arg-type]
        if entry is None:
            return
        (entry / "provider").write_text(self.provider + "\n")
        (entry / "generation").write_text("0\n")
        (entry / "inblob").write_bytes(b"")
        if self.provider == "sev_guest":
            (entry / "privlevel").write_bytes(b"")
            (entry / "auxblob").write_bytes(b"")
        os.mkfifo(entry / "outblob")
        with self._lock:
            self.created.append(entry)
            self._pending.add(entry)

    def _rmdir(self, path: os.PathLike[str] | str, **kw: object) -> None:
        entry = self._ours(path)
        if entry is not None and entry.is_dir():
            for child in entry.iterdir():
                child.unlink()
        self._real_rmdir(path, **kw)  # type: ignore[arg-type]

    def _serve(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                pending = list(self._pending)
            for entry in pending:
                try:
                    fd = os.open(entry / "outblob", os.O_WRONLY | os.O_NONBLOCK)
                except OSError as exc:  # ENXIO: nobody reads it yet
                    if exc.errno == errno.ENOENT:
                        with self._lock:
                            self._pending.discard(entry)
                    continue
                with self._lock:
                    self._pending.discard(entry)
                try:
                    os.set_blocking(fd, True)
                    view = memoryview(self._generate(entry))
                    while view:
                        view = view[os.write(fd, view) :]
                except BrokenPipeError:
                    pass  # the reader stopped at its size cap
                except BaseException as exc:  # reported at teardown
                    self.errors.append(exc)
                finally:
                    os.close(fd)
            self._stop.wait(0.001)

    def _generate(self, entry: Path) -> bytes:
        inblob = (entry / "inblob").read_bytes()
        privlevel = (entry / "privlevel").read_bytes() if self.provider == "sev_guest" else b""
        self.inblobs.append(inblob)
        if privlevel:
            self.privlevels.append(privlevel)
        writes = 1 + (1 if privlevel else 0) + self.extra_writes
        tmp = entry / ".generation"
        tmp.write_text(f"{writes}\n")
        os.replace(tmp, entry / "generation")
        outblob, auxblob = self.respond(inblob)
        if auxblob is not None:
            (entry / "auxblob").write_bytes(auxblob)
        return outblob
