"""The parent side of the sandbox: start the child with its isolation settings, feed it the
code and the tables, read its result under a cap and a deadline, and judge its exit.

Nothing the child says is trusted: its exceptions are reported by built-in type name only (a
message, or a user-defined class name, could quote data), its output is parsed under a cap,
and its exit status is interpreted here. The child process never imports this module.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import BinaryIO

import pyarrow as pa

import teeflow
from teeflow.core.errors import ComputeError
from teeflow.executor.sandbox import frames, jail

REQUIRE_NETNS = True  # kept for callers; the sandbox always has its own network namespace
MAX_RESULT_BYTES = 64 << 20
STARTUP_SECONDS = 5  # wall-clock allowance for interpreter start, on top of 2 x CPU seconds

# The child's command line after ``python -I -B -c``: the directory holding this teeflow
# package goes first on its path (-I drops PYTHONPATH, and an installed copy of teeflow must
# not stand in for this one), then ``main`` reads the config, the next argument.
BOOT = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); "
    "from teeflow.executor.sandbox.child import main; main()"
)
_SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(teeflow.__file__)))
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
    isolation: str = "full"  # the level demanded (jail.LEVELS); run_code refuses below it

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


def _feed(pipe: BinaryIO, code: str, inputs: list[tuple[str, pa.Table]]) -> None:
    """Write the code and the tables to the child's stdin; a child that stopped reading (it
    failed, or hit a limit) just ends the feed."""
    try:
        pipe.write(frames.frame(code.encode("utf-8")))
        pipe.write(frames.frame(json.dumps([name for name, _ in inputs]).encode()))
        for _, table in inputs:
            sink = frames.FramedSink(pipe)
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


def run_code(code: str, inputs: list[tuple[str, pa.Table]], limits: Limits) -> Outcome:
    """Run ``code``'s ``run(tables)`` in a sandboxed child; raises ComputeError saying which
    limit or failure stopped it (never quoting what the code printed or raised), or, before
    any process starts, which isolation piece is missing here (``jail.require``)."""
    jail.require(limits.isolation)
    return start(code, inputs, limits)


def start(code: str, inputs: list[tuple[str, pa.Table]], limits: Limits) -> Outcome:
    """``run_code`` without the isolation check (the probe uses it to find the isolation)."""
    if shutil.which("bwrap") is None:
        raise ComputeError("user code refused: bubblewrap (bwrap) is not installed")
    try:
        outer = jail.compile_filter(jail._DENIED, threads_only=True)
        inner = jail.compile_filter(jail._DENIED_AFTER_START, threads_only=False)
    except (OSError, AttributeError):
        raise ComputeError("user code refused: libseccomp is not available") from None
    config = {
        "cpu_seconds": int(limits.cpu_seconds),
        "memory_mb": int(limits.memory_mb),
        "require_netns": True,
        "path": [p for p in sys.path if p and os.path.isabs(p) and os.path.isdir(p)],
        "exec_filter": base64.b64encode(inner).decode("ascii"),
    }
    cap = limits.max_result_bytes + 2 * frames.MAX_MESSAGE_BYTES
    chunks: list[bytes] = []
    state = {"too_large": False, "timed_out": False}
    workdir = tempfile.mkdtemp(prefix="teeflow-usercode-")
    os.chmod(workdir, 0o755)  # the child may run as nobody; it cannot write there anyway
    proc: subprocess.Popen[bytes] | None = None
    seccomp_fd = jail.seccomp_pipe(outer)
    try:
        argv = jail.command(seccomp_fd, dict(_ENV),
                            ["-I", "-B", "-c", BOOT, _SOURCE_ROOT, json.dumps(config)])
        # Only the pipes and the seccomp program's pipe (bwrap reads and closes it) reach the
        # child: close_fds, and the executor's key is in its memory, never in a file or an fd.
        proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            cwd=workdir, env={}, close_fds=True, pass_fds=(seccomp_fd,),
            start_new_session=True,
        )
        os.close(seccomp_fd)
        seccomp_fd = -1
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
        if seccomp_fd >= 0:
            os.close(seccomp_fd)
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
    if code_ is not None and 128 < code_ < 128 + 65:  # bwrap: the child died of signal N
        code_ = 128 - code_
    if code_ == -signal.SIGXCPU:
        raise ComputeError(
            f"user code exceeded its CPU time limit (cpu_seconds={limits.cpu_seconds})"
        )
    data = b"".join(chunks)
    first = frames.take_message(data)
    second = frames.take_message(first[1]) if first else None
    if first is None or second is None:
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
    guard = isolation.get("guard")
    if network not in frames.NETWORK or user not in frames.USER or guard != frames.GUARD:
        raise ComputeError("user code process returned a malformed result")
    isolation = {"network": network, "user": user, "guard": frames.GUARD}

    if not status.get("ok"):
        problem = status.get("problem")
        if problem == "isolation":
            raise ComputeError(
                "user code refused: the sandboxed child found its isolation incomplete"
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
        shown = name if name in frames.BUILTIN_EXCEPTIONS else "an exception of its own"
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
