"""Run submitted Python code in a child process of the executor: Arrow tables in, one table or
bytes out, and nothing else: no network, no files written, bounded CPU time and memory.

The parent (``run_code``) starts ``python -I -B <this file> <limits>`` in a fresh empty working
directory with an almost empty environment, writes the code and the tables to its stdin
(Arrow IPC streams, framed), and reads the result from its stdout, capped in size and time.
The child applies, in this order, before it reads a byte of input:

1. network: a new, empty network namespace (``unshare(CLONE_NEWNET)``; without root, inside a
   new user namespace). No interface is up in it, not even loopback. Where namespaces are
   unavailable (no privilege, no user namespaces, or a library OS such as Gramine) the child
   runs with only the audit-hook guard below, unless ``REQUIRE_NETNS`` (or
   ``Limits.require_netns``) is set, and then it refuses to run;
2. user: when started as root, it drops to ``nobody`` with no supplementary groups and
   ``PR_SET_NO_NEW_PRIVS``, so it cannot re-enter the host's network namespace, signal or
   trace the executor, or read its private files. If the Python installation is not readable
   by others (pyenv under ``/root``, say), a fixed set of modules (``_PRELOAD``: pyarrow,
   numpy, pandas, common standard modules) is imported first, and the code can import only
   those;
3. limits (``setrlimit``): CPU seconds (``SIGXCPU`` at the limit, ``SIGKILL`` a second
   later), ``RLIMIT_DATA`` at the memory budget (heap and private mappings; the address space
   gets the budget plus room for shared libraries), no core files, file size 0 (a write to a
   file fails), few open files, and when running as ``nobody`` a process count cap;
4. a guard: a PEP 578 audit hook, which Python code cannot remove, refusing sockets,
   subprocesses, ``fork``/``exec``, files opened for writing, file-system changes,
   ``ctypes`` symbol lookups and ``mmap``. An audit hook is not a security boundary by
   itself (native code can get past it); here it is a second layer behind 1-3.

Where the result says which isolation applied: ``Outcome.isolation`` is
``{"network": "netns" | "userns+netns" | "none", "user": "nobody" | "userns" | "unchanged",
"guard": "audit-hook"}``, reported by the child before the user code runs.

Nothing the child says is trusted: its exceptions are reported by built-in type name only (a
message, or a user-defined class name, could quote data), its output is parsed under a cap,
and its exit status is interpreted by the parent.

This file is also the child's program, so its top level imports only the standard library:
the child must unshare while it is still single-threaded, before pyarrow starts threads.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:
    import pyarrow as pa

REQUIRE_NETNS = False  # refuse to run user code when no network namespace can be made
MAX_RESULT_BYTES = 64 << 20
MAX_CODE_BYTES = 256 << 10
STARTUP_SECONDS = 5  # wall-clock allowance for interpreter start, on top of 2 x CPU seconds
VIRTUAL_SLACK = 1 << 30  # address space beyond the memory budget: shared libraries, stacks
MAX_FILES = 64
MAX_PROCESSES = 64
NOBODY = 65534

_CLONE_NEWNET = 0x40000000
_CLONE_NEWUSER = 0x10000000
_PR_SET_NO_NEW_PRIVS = 38
_HEADER = struct.Struct("<I")
_MAX_HEADER = 64 << 10

_NETWORK = ("netns", "userns+netns", "none")
_USER = ("nobody", "userns", "unchanged")
_EXCEPTIONS = frozenset(
    name for name, value in vars(builtins).items()
    if isinstance(value, type) and issubclass(value, BaseException)
)
_ENV = {
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "ARROW_DEFAULT_MEMORY_POOL": "system",  # plain malloc, so RLIMIT_DATA counts it
    "MALLOC_ARENA_MAX": "2",
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


@dataclass(frozen=True)
class Limits:
    cpu_seconds: int = 60
    memory_mb: int = 2048
    max_result_bytes: int = MAX_RESULT_BYTES
    require_netns: bool = REQUIRE_NETNS

    @property
    def wall_seconds(self) -> float:
        return 2 * self.cpu_seconds + STARTUP_SECONDS


@dataclass(frozen=True)
class Outcome:
    """What the user code returned: ``kind`` is "table" (``table`` set) or "bytes"
    (``data`` set); ``isolation`` is what the child applied."""

    kind: str
    table: pa.Table | None
    data: bytes | None
    isolation: dict[str, str]


def _frame(data: bytes) -> bytes:
    return _HEADER.pack(len(data)) + data


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    data = stream.read(n)
    if data is None or len(data) != n:
        raise EOFError("input ended early")
    return data


def _read_frame(stream: BinaryIO, limit: int) -> bytes:
    (n,) = _HEADER.unpack(_read_exact(stream, _HEADER.size))
    if n > limit:
        raise ValueError("frame too large")
    return _read_exact(stream, n)


class _FramedSink(io.RawIOBase):
    """Writes each chunk as a length-prefixed frame; ``end()`` writes the empty frame."""

    def __init__(self, pipe: BinaryIO) -> None:
        super().__init__()
        self._pipe = pipe

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        data = bytes(b)
        if data:
            self._pipe.write(_frame(data))
        return len(data)

    def end(self) -> None:
        self._pipe.write(_frame(b""))

    def close(self) -> None:  # the pipe outlives one table's stream
        self.flush()


class _FramedSource(io.RawIOBase):
    """Reads the frames written by ``_FramedSink`` as one stream, until the empty frame."""

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
            (self._left,) = _HEADER.unpack(_read_exact(self._pipe, _HEADER.size))
            self._done = self._left == 0
        chunk = self._pipe.read(min(len(buffer), self._left))
        if not chunk:
            raise EOFError("input ended inside a frame")
        buffer[: len(chunk)] = chunk
        self._left -= len(chunk)
        return len(chunk)


# --- parent -------------------------------------------------------------------------------------


def _feed(pipe: BinaryIO, code: str, inputs: list[tuple[str, pa.Table]]) -> None:
    """Write the code and the tables to the child's stdin; a child that stopped reading (it
    failed, or hit a limit) just ends the feed."""
    import pyarrow as pa

    try:
        pipe.write(_frame(code.encode("utf-8")))
        pipe.write(_frame(json.dumps([name for name, _ in inputs]).encode()))
        for _, table in inputs:
            sink = _FramedSink(pipe)
            with pa.ipc.new_stream(pa.PythonFile(sink, mode="w"), table.schema) as writer:
                for batch in table.to_batches():
                    writer.write_batch(batch)
            sink.end()
    except Exception:  # noqa: BLE001 - the child stopped reading; its status tells why
        pass
    finally:
        try:
            pipe.close()
        except OSError:
            pass


def _drain(pipe: BinaryIO, cap: int, chunks: list[bytes], state: dict[str, bool]) -> None:
    """Read the child's output up to ``cap`` bytes; past that, stop reading and close the
    pipe, so the child's next write fails and it ends."""
    total = 0
    try:
        while True:
            chunk = pipe.read(1 << 20)
            if not chunk:
                return
            total += len(chunk)
            if total > cap:
                state["too_large"] = True
                chunks.clear()
                return
            chunks.append(chunk)
    finally:
        pipe.close()


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the child's process group (it was started in a session of its own)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        try:
            proc.kill()
        except ProcessLookupError:
            pass


def _wait_unreaped(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Wait for the child to exit without reaping it (so its process group id stays ours to
    signal); False on timeout."""
    waitid = getattr(os, "waitid", None)
    if waitid is None:  # pragma: no cover - not Linux
        try:
            proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    deadline = time.monotonic() + timeout
    delay = 0.002
    while waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is None:
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(2 * delay, 0.05)
    return True


def _take(data: bytes) -> tuple[dict[str, Any], bytes] | None:
    if len(data) < _HEADER.size:
        return None
    (n,) = _HEADER.unpack_from(data)
    if n > _MAX_HEADER or len(data) < _HEADER.size + n:
        return None
    try:
        value = json.loads(data[_HEADER.size:_HEADER.size + n])
    except ValueError:
        return None
    return (value, data[_HEADER.size + n:]) if isinstance(value, dict) else None


def run_code(code: str, inputs: list[tuple[str, pa.Table]], limits: Limits) -> Outcome:
    """Run ``code``'s ``run(tables)`` in a sandboxed child; raises ComputeError saying which
    limit or failure stopped it (never quoting what the code printed or raised)."""
    import pyarrow as pa

    from teeflow.core.errors import ComputeError  # not at top level: the child runs this file

    config = {
        "cpu_seconds": int(limits.cpu_seconds),
        "memory_mb": int(limits.memory_mb),
        "require_netns": bool(limits.require_netns),
        "path": [p for p in sys.path if p and os.path.isabs(p) and os.path.isdir(p)],
    }
    cap = limits.max_result_bytes + 2 * _MAX_HEADER
    chunks: list[bytes] = []
    state = {"too_large": False, "timed_out": False}
    workdir = tempfile.mkdtemp(prefix="teeflow-usercode-")
    os.chmod(workdir, 0o755)  # the child may run as nobody; it cannot write there anyway
    proc: subprocess.Popen[bytes] | None = None
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-B", os.path.abspath(__file__), json.dumps(config)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            cwd=workdir, env=dict(_ENV), close_fds=True, start_new_session=True,
        )
        assert proc.stdin is not None and proc.stdout is not None
        feeder = threading.Thread(target=_feed, args=(proc.stdin, code, inputs), daemon=True)
        reader = threading.Thread(
            target=_drain, args=(proc.stdout, cap, chunks, state), daemon=True
        )
        feeder.start()
        reader.start()
        state["timed_out"] = not _wait_unreaped(proc, limits.wall_seconds)
        _kill(proc)  # also whatever the child left in its group, while that group still exists
        proc.wait()
        reader.join(timeout=10)
        feeder.join(timeout=10)
    finally:
        if proc is not None and proc.poll() is None:
            _kill(proc)
            proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)

    if state["timed_out"]:
        raise ComputeError(
            f"user code exceeded the wall-clock limit of {limits.wall_seconds:g} s"
        )
    if state["too_large"]:
        raise ComputeError(f"user code result is larger than {limits.max_result_bytes} bytes")
    code_ = proc.returncode
    if code_ == -signal.SIGXCPU:
        raise ComputeError(
            f"user code exceeded its CPU time limit (cpu_seconds={limits.cpu_seconds})"
        )
    data = b"".join(chunks)
    first = _take(data)
    second = _take(first[1]) if first else None
    if second is None:
        if code_ == -signal.SIGKILL:
            raise ComputeError(
                f"user code was killed at its CPU time limit (cpu_seconds="
                f"{limits.cpu_seconds}) or for lack of memory (memory_mb={limits.memory_mb})"
            )
        if code_ is not None and code_ < 0:
            raise ComputeError(
                f"user code process died of signal {signal.Signals(-code_).name}"
            )
        raise ComputeError(f"user code process ended without a result (exit status {code_})")
    isolation, (status, payload) = first[0], second
    network, user = isolation.get("network"), isolation.get("user")
    if network not in _NETWORK or user not in _USER or isolation.get("guard") != "audit-hook":
        raise ComputeError("user code process returned a malformed result")
    isolation = {"network": network, "user": user, "guard": "audit-hook"}

    if not status.get("ok"):
        problem = status.get("problem")
        if problem == "isolation":
            raise ComputeError(
                "user code refused: no network namespace could be created and one is required"
            )
        if problem == "startup":
            raise ComputeError("user code process could not load pyarrow")
        if problem == "no_run":
            raise ComputeError("user code defines no function run(tables)")
        if problem == "bad_return":
            got = status.get("type")
            got = got if got in ("NoneType", "str", "int", "float", "dict", "list", "tuple",
                                 "bool") else "another type"
            raise ComputeError(f"user code's run() must return a pyarrow.Table or bytes, got {got}")
        name = status.get("exception")
        if name == "MemoryError":
            raise ComputeError(f"user code ran out of memory (memory_mb={limits.memory_mb})")
        if name == "SyntaxError":
            raise ComputeError("user code does not compile (SyntaxError)")
        shown = name if name in _EXCEPTIONS else "an exception of its own"
        raise ComputeError(f"user code raised {shown}")
    if code_ != 0:
        raise ComputeError(f"user code process ended with exit status {code_}")
    kind = status.get("kind")
    if kind == "bytes":
        return Outcome("bytes", None, payload, isolation)
    if kind == "table":
        try:
            table = pa.ipc.open_stream(pa.py_buffer(payload)).read_all()
        except (pa.ArrowInvalid, OSError):
            raise ComputeError("user code process returned a malformed table") from None
        return Outcome("table", table, None, isolation)
    raise ComputeError("user code process returned a malformed result")


# --- child --------------------------------------------------------------------------------------


def _unshare_network() -> str:
    """Enter a new, empty network namespace; "none" when the system does not allow it."""
    unshare = getattr(os, "unshare", None)  # Python 3.12+
    if unshare is None:
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)

            def unshare(flags: int) -> None:
                if libc.unshare(flags) != 0:
                    raise OSError(ctypes.get_errno(), "unshare failed")
        except (OSError, AttributeError):
            return "none"
    try:
        unshare(_CLONE_NEWNET)
        return "netns"
    except OSError:
        pass
    try:
        unshare(_CLONE_NEWUSER | _CLONE_NEWNET)
        return "userns+netns"
    except OSError:
        return "none"


# Modules loaded before dropping to nobody when the Python installation is not readable by
# others (for instance pyenv under /root): afterwards the user code can import only these.
_PRELOAD = (
    "pyarrow.compute", "numpy", "pandas", "math", "cmath", "statistics", "collections",
    "itertools", "functools", "operator", "json", "base64", "hashlib", "hmac", "datetime",
    "decimal", "fractions", "random", "re", "struct", "heapq", "bisect", "copy",
    "dataclasses", "typing", "enum", "string", "textwrap", "zlib", "array", "csv",
)


def _others_can_read(path: str) -> bool:
    """Whether a user with no relation to the owner can list ``path`` and reach it."""
    import stat

    path = os.path.realpath(path)
    parts = path.split(os.sep)
    for i in range(1, len(parts) + 1):
        prefix = os.sep.join(parts[:i]) or os.sep
        try:
            mode = os.stat(prefix).st_mode
        except OSError:
            return False
        need = stat.S_IXOTH | (stat.S_IROTH if i == len(parts) else 0)
        if mode & need != need:
            return False
    return True


def _drop_privileges(network: str) -> str:
    """Started as root: become nobody, with no groups and no way to regain privileges."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.geteuid() != 0 or network == "userns+netns":
        return "userns" if network == "userns+netns" else "unchanged"
    if not all(_others_can_read(p) for p in sys.path if os.path.isdir(p)):
        import importlib

        for name in _PRELOAD:
            try:
                importlib.import_module(name)
            except ImportError:
                pass
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    return "nobody"


def _set_limits(config: dict[str, Any], user: str) -> None:
    import resource

    def cap(which: int, soft: int, hard: int | None = None) -> None:
        _, current = resource.getrlimit(which)
        hard = soft if hard is None else hard
        if current != resource.RLIM_INFINITY:
            soft, hard = min(soft, current), min(hard, current)
        resource.setrlimit(which, (soft, hard))

    cpu = int(config["cpu_seconds"])
    memory = int(config["memory_mb"]) << 20
    cap(resource.RLIMIT_CORE, 0)
    cap(resource.RLIMIT_CPU, cpu, cpu + 1)
    cap(resource.RLIMIT_DATA, memory)
    cap(resource.RLIMIT_AS, memory + VIRTUAL_SLACK)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the size fails, not kills
    cap(resource.RLIMIT_FSIZE, 0)
    cap(resource.RLIMIT_NOFILE, MAX_FILES)
    if user == "nobody":  # counts nobody's processes only; for another user it would count ours
        cap(resource.RLIMIT_NPROC, MAX_PROCESSES)


_BLOCKED = (
    "socket.", "subprocess.", "os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork",
    "os.forkpty", "os.kill", "os.killpg", "os.startfile", "pty.", "os.remove", "os.rename",
    "os.rmdir", "os.mkdir", "os.symlink", "os.link", "os.chmod", "os.chown", "os.truncate",
    "os.utime", "os.setxattr", "os.removexattr", "os.chflags", "shutil.", "ctypes.dlopen",
    "ctypes.dlsym", "ctypes.cdata", "ctypes.PyObj_FromPtr", "mmap.", "resource.setrlimit",
    "resource.prlimit", "webbrowser.", "sys.remote_exec",
)
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


def _install_guard() -> None:
    blocked = _BLOCKED
    write_flags = _WRITE_FLAGS

    def guard(event: str, args: tuple[Any, ...]) -> None:
        if event == "open":
            mode = args[1] if len(args) > 1 else None
            flags = args[2] if len(args) > 2 else 0
            if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & write_flags
            ):
                raise PermissionError(f"sandbox: {event} for writing is not allowed")
        elif event.startswith(blocked):
            raise PermissionError(f"sandbox: {event} is not allowed")

    sys.addaudithook(guard)


def _send(out: BinaryIO, value: dict[str, Any]) -> None:
    out.write(_frame(json.dumps(value).encode()))
    out.flush()


def _exception(exc: BaseException) -> dict[str, Any]:
    name = type(exc).__name__
    return {"ok": False, "exception": name if name in _EXCEPTIONS else "UserException"}


def _execute(stdin: BinaryIO, out: BinaryIO) -> None:
    import pyarrow as pa
    import pyarrow.ipc  # noqa: F401

    try:
        code = _read_frame(stdin, MAX_CODE_BYTES).decode("utf-8")
        names = json.loads(_read_frame(stdin, _MAX_HEADER))
        tables = {}
        for name in names:
            source = io.BufferedReader(_FramedSource(stdin), buffer_size=1 << 16)
            tables[str(name)] = pa.ipc.open_stream(source).read_all()
            while source.read(1 << 16):  # up to this table's end frame
                pass
        stdin.close()
    except MemoryError as exc:
        _send(out, _exception(exc))
        return
    namespace: dict[str, Any] = {"__name__": "teeflow_user_code", "__builtins__": builtins}
    try:
        exec(compile(code, "<user code>", "exec"), namespace)
        fn = namespace.get("run")
        if not callable(fn):
            _send(out, {"ok": False, "problem": "no_run"})
            return
        result = fn(tables)
    except BaseException as exc:  # noqa: BLE001 - reported by type, whatever it is
        _send(out, _exception(exc))
        return
    del tables
    if isinstance(result, pa.RecordBatch):
        result = pa.Table.from_batches([result])
    if isinstance(result, pa.Table):
        _send(out, {"ok": True, "kind": "table"})
        with pa.ipc.new_stream(out, result.schema) as writer:
            writer.write_table(result)
    elif isinstance(result, bytes | bytearray | memoryview):
        _send(out, {"ok": True, "kind": "bytes"})
        out.write(bytes(result))
    else:
        _send(out, {"ok": False, "problem": "bad_return", "type": type(result).__name__})


def _child_main() -> None:
    config = json.loads(sys.argv[1])
    out = os.fdopen(os.dup(1), "wb")  # the result channel; fd 1 itself goes to /dev/null
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process

    network = _unshare_network()  # first, while single-threaded
    isolation = {"network": network, "user": "unchanged", "guard": "audit-hook"}
    if network == "none" and config["require_netns"]:
        _send(out, isolation)
        _send(out, {"ok": False, "problem": "isolation"})
        os._exit(0)
    sys.path[:] = list(config["path"])
    try:
        import resource  # noqa: F401 - loaded while the Python installation is readable

        import pyarrow  # noqa: F401
        import pyarrow.ipc  # noqa: F401
    except BaseException:  # noqa: BLE001
        _send(out, isolation)
        _send(out, {"ok": False, "problem": "startup"})
        os._exit(0)
    isolation["user"] = _drop_privileges(network)
    _set_limits(config, isolation["user"])
    _install_guard()
    _send(out, isolation)  # before the user code runs, which could write to this channel
    _execute(sys.stdin.buffer, out)
    out.flush()
    os._exit(0)  # no atexit handlers or lingering threads of the user code


if __name__ == "__main__":
    _child_main()
