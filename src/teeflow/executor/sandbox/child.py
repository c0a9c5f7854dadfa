"""The sandboxed child's program: isolate this process, then load the user code, run its
``run(tables)`` and send the result (see the package docstring for the steps and their order).

It runs next to user code, so it imports as little as it can: the standard library and
``frames``, never the parent side (``parent``, ``subprocess``, ``threading``), and nothing at
module level that could start a thread: it must unshare while it is still single-threaded,
before pyarrow starts threads. The parent starts it with ``python -I -B -c`` and
``main()`` (``parent.BOOT``).
"""

from __future__ import annotations

import builtins
import io
import json
import os
import signal
import sys
from typing import Any, BinaryIO

from teeflow.executor.sandbox import frames

VIRTUAL_SLACK = 1 << 30  # address space beyond the memory budget: shared libraries, stacks
MAX_FILES = 64
MAX_PROCESSES = 64
NOBODY = 65534

_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2


def _network() -> str:
    """"netns" when this process sees an empty network namespace (loopback only, the one
    bwrap made), "none" otherwise."""
    try:
        with open("/proc/net/dev") as f:
            interfaces = [line.split(":")[0].strip() for line in f if ":" in line]
    except OSError:
        return "none"
    return "netns" if interfaces == ["lo"] else "none"


def _deny_exec(program: bytes) -> bool:
    """Load the parent's second seccomp program (execve refused), on top of bwrap's. bwrap set
    ``no_new_privs`` already; a filter can only be added, never removed."""
    import ctypes

    class Filter(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]

    if not program or len(program) % 8:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    prog = Filter(len(program) // 8, program)
    libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    return libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) == 0


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


def _drop_privileges() -> str:
    """Started as root (bwrap left only CAP_SETUID/CAP_SETGID): become nobody, with no groups
    and no way to regain privileges. Under a user namespace bwrap made us nobody already."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.geteuid() != 0:
        return "nobody" if os.getuid() == NOBODY else "unchanged"
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


def _exception(exc: BaseException) -> dict[str, Any]:
    name = type(exc).__name__
    known = name in frames.BUILTIN_EXCEPTIONS
    return {"ok": False, "exception": name if known else "UserException"}


def _execute(stdin: BinaryIO, out: BinaryIO) -> None:
    import pyarrow as pa
    import pyarrow.ipc  # noqa: F401

    try:
        code = frames.read_frame(stdin, frames.MAX_CODE_BYTES).decode("utf-8")
        names = json.loads(frames.read_frame(stdin, frames.MAX_MESSAGE_BYTES))
        tables = {}
        for name in names:
            source = io.BufferedReader(frames.FramedSource(stdin), buffer_size=1 << 16)
            tables[str(name)] = pa.ipc.open_stream(source).read_all()
            while source.read(1 << 16):  # up to this table's end frame
                pass
        stdin.close()
    except MemoryError as exc:
        frames.write_message(out, _exception(exc))
        return
    namespace: dict[str, Any] = {"__name__": "teeflow_user_code", "__builtins__": builtins}
    try:
        exec(compile(code, "<user code>", "exec"), namespace)
        fn = namespace.get("run")
        if not callable(fn):
            frames.write_message(out, {"ok": False, "problem": "no_run"})
            return
        result = fn(tables)
    except BaseException as exc:  # noqa: BLE001 - reported by type, whatever it is
        frames.write_message(out, _exception(exc))
        return
    del tables
    if isinstance(result, pa.RecordBatch):
        result = pa.Table.from_batches([result])
    if isinstance(result, pa.Table):
        frames.write_message(out, {"ok": True, "kind": "table"})
        with pa.ipc.new_stream(out, result.schema) as writer:
            writer.write_table(result)
    elif isinstance(result, bytes | bytearray | memoryview):
        frames.write_message(out, {"ok": True, "kind": "bytes"})
        out.write(bytes(result))
    else:
        frames.write_message(
            out, {"ok": False, "problem": "bad_return", "type": type(result).__name__}
        )


def main() -> None:
    """The child process: ``sys.argv[1]`` is the parent's JSON config; stdin and stdout are
    the pipes to the parent. Never returns."""
    config = json.loads(sys.argv[1])
    out = os.fdopen(os.dup(1), "wb")  # the result channel; fd 1 itself goes to /dev/null
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process

    isolation = {"network": _network(), "user": _drop_privileges(), "guard": frames.GUARD}
    if isolation["network"] == "none" or isolation["user"] != "nobody":
        frames.write_message(out, isolation)
        frames.write_message(out, {"ok": False, "problem": "isolation"})
        os._exit(0)
    sys.path[:] = list(config["path"])
    try:
        import base64
        import resource  # noqa: F401 - loaded before the guard

        import pyarrow  # noqa: F401
        import pyarrow.ipc  # noqa: F401
    except BaseException:  # noqa: BLE001
        frames.write_message(out, isolation)
        frames.write_message(out, {"ok": False, "problem": "startup"})
        os._exit(0)
    if not _deny_exec(base64.b64decode(config.get("exec_filter", ""))):
        frames.write_message(out, isolation)
        frames.write_message(out, {"ok": False, "problem": "isolation"})
        os._exit(0)
    _set_limits(config, isolation["user"])
    _install_guard()
    frames.write_message(out, isolation)  # before the user code runs, which could write here
    _execute(sys.stdin.buffer, out)
    out.flush()
    os._exit(0)  # no atexit handlers or lingering threads of the user code
