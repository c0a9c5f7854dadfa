"""The sandbox's outer walls, on the parent side: the bubblewrap command line, the seccomp
filters (compiled by libseccomp), and the probe that finds out, by starting one real sandboxed
child, which isolation this host gives (``probe``). ``require`` refuses, naming the missing
piece, where that isolation is not complete; user code never runs without it.

The pieces (``PIECES``), each checked from inside a real child, never assumed:

- ``sandbox``: bubblewrap (``bwrap``) is installed and starts the child;
- ``uid``: the child runs as ``nobody`` (65534) in the host's user namespace, not the
  executor's uid: it needs the executor to be root, which bwrap uses to build the sandbox and
  the child uses once to drop to nobody (``/proc/self/uid_map`` and ``status`` are read);
- ``network``: an empty network namespace (only a loopback interface, down);
- ``seccomp``: a filter is in force (``Seccomp: 2``) that refuses ptrace, process_vm_*,
  sockets, new namespaces and mounts, fork (clone without CLONE_THREAD), and, loaded by the
  child before the user code, execve;
- ``parent``: a private pid namespace: no process of the host (the executor) is visible, so
  neither its ``/proc/<pid>/mem``, ``environ`` nor ``fd`` can be named;
- ``mount``: a private mount namespace holding only read-only binds of the interpreter, its
  libraries and teeflow (a file the probe creates in the host's temp folder is absent);
- ``privileges``: no capabilities and ``no_new_privs``;
- ``rlimits``: no core files, file size 0, the process-count cap.

This module never holds or passes a key: the child inherits only its stdin, stdout and the
read end of a pipe with the seccomp program, which bwrap reads and closes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import shutil
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Any

PIECES = ("sandbox", "uid", "network", "seccomp", "parent", "mount", "privileges", "rlimits")
LEVELS = ("full",)  # what a spec or a policy may demand; only complete isolation runs code
NOBODY = 65534

_SCMP_ACT_ALLOW = 0x7FFF0000
_SCMP_CMP_MASKED_EQ = 7
_CLONE_THREAD = 0x00010000

# Refused inside the sandbox (EPERM), on top of what the namespaces already take away.
_DENIED = (
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_open", "pidfd_getfd",
    "socket", "socketpair", "connect", "bind", "listen", "accept", "accept4",
    "mount", "umount2", "pivot_root", "chroot", "unshare", "setns", "open_tree", "move_mount",
    "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
    "fork", "vfork", "keyctl", "add_key", "request_key", "bpf", "perf_event_open",
    "userfaultfd", "kexec_load", "kexec_file_load", "init_module", "finit_module",
    "delete_module", "reboot", "swapon", "swapoff", "iopl", "ioperm", "open_by_handle_at",
    "name_to_handle_at", "io_uring_setup", "io_uring_enter", "io_uring_register", "acct",
    "quotactl", "lookup_dcookie", "personality", "uselib", "syslog",
)
_DENIED_AFTER_START = ("execve", "execveat")  # loaded by the child itself, after bwrap's exec


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


def _libseccomp() -> Any:
    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    lib = ctypes.CDLL(name, use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_uint, ctypes.POINTER(_ArgCmp)]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    return lib


def _errno_action(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)  # SCMP_ACT_ERRNO


def compile_filter(denied: tuple[str, ...], threads_only: bool) -> bytes:
    """A classic-BPF seccomp program (libseccomp's export) that allows everything except the
    ``denied`` system calls (EPERM), and with ``threads_only`` a clone that is not a thread
    (EPERM) and clone3 (ENOSYS, so the C library falls back to clone, which is checked)."""
    lib = _libseccomp()
    ctx = lib.seccomp_init(_SCMP_ACT_ALLOW)
    if not ctx:
        raise OSError("seccomp_init failed")
    try:
        def add(name: str, action: int, *cmps: _ArgCmp) -> None:
            nr = lib.seccomp_syscall_resolve_name(name.encode())
            if nr < 0:  # not a system call on this architecture
                return
            array = (_ArgCmp * len(cmps))(*cmps) if cmps else None
            rc = lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), array)
            if rc != 0:
                raise OSError(-rc, f"seccomp rule for {name} failed")

        for name in denied:
            add(name, _errno_action(errno.EPERM))
        if threads_only:
            add("clone", _errno_action(errno.EPERM),
                _ArgCmp(0, _SCMP_CMP_MASKED_EQ, _CLONE_THREAD, 0))
            add("clone3", _errno_action(errno.ENOSYS))
        read, write = os.pipe()
        try:
            rc = lib.seccomp_export_bpf(ctx, write)
            os.close(write)
            write = -1
            if rc != 0:
                raise OSError(-rc, "seccomp_export_bpf failed")
            chunks = []
            while chunk := os.read(read, 1 << 16):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(read)
            if write >= 0:
                os.close(write)
    finally:
        lib.seccomp_release(ctx)


def _binds() -> list[str]:
    """The folders the child needs, read-only: the interpreter's installation, the shared
    libraries, the import path (site-packages, this teeflow's source root)."""
    want = {sys.base_prefix, sys.prefix, os.path.dirname(os.path.realpath(sys.executable)),
            "/usr/lib", "/usr/lib64", "/lib64", "/usr/local/lib"}
    want.update(p for p in sys.path if p and os.path.isabs(p) and os.path.isdir(p))
    real = sorted({os.path.realpath(p) for p in want if os.path.isdir(p)})
    kept: list[str] = []
    for path in real:  # drop folders inside one already bound
        if not any(path == k or path.startswith(k.rstrip("/") + "/") for k in kept):
            kept.append(path)
    return kept


def _ancestors(path: str) -> list[str]:
    parts = path.strip("/").split("/")[:-1]
    return ["/" + "/".join(parts[: i + 1]) for i in range(len(parts))]


def interpreter() -> str:
    return os.path.realpath(sys.executable)


def command(seccomp_fd: int, env: dict[str, str], python_args: list[str]) -> list[str]:
    """The bwrap command line that starts ``interpreter() python_args`` sandboxed. As root,
    bwrap builds the namespaces itself (no user namespace, which would map the child onto the
    executor's uid) and leaves the child only CAP_SETUID/CAP_SETGID, spent at once to become
    nobody; otherwise it makes a user namespace (and the ``uid`` piece is missing)."""
    bwrap = shutil.which("bwrap") or "bwrap"
    argv = [bwrap, "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
            "--unshare-cgroup-try", "--die-with-parent", "--new-session", "--cap-drop", "ALL"]
    if os.geteuid() == 0:
        argv += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        argv = [argv[0], "--unshare-all", "--unshare-user", "--disable-userns",
                "--uid", str(NOBODY), "--gid", str(NOBODY), *argv[1:]]
    argv += ["--clearenv"]
    for key, value in sorted(env.items()):
        argv += ["--setenv", key, value]
    for top in ("lib", "lib64", "lib32"):  # merged /usr: the loader is under /lib*
        if os.path.islink(f"/{top}"):
            argv += ["--symlink", os.readlink(f"/{top}"), f"/{top}"]
    binds = _binds()
    parents = sorted({os.path.dirname(p.rstrip("/")) for p in binds}
                     | {a for p in binds for a in _ancestors(p)}, key=lambda p: p.count("/"))
    for folder in parents:  # bwrap would make them 0700: nobody could not pass through
        if folder != "/":
            argv += ["--perms", "0755", "--dir", folder]
    for path in binds:
        argv += ["--ro-bind", path, path]
    argv += ["--proc", "/proc", "--dev", "/dev", "--chdir", "/", "--seccomp", str(seccomp_fd),
             "--", interpreter(), *python_args]
    return argv


def seccomp_pipe(program: bytes) -> int:
    """The read end of a pipe holding ``program`` (small: it fits the pipe's buffer)."""
    read, write = os.pipe()
    try:
        os.write(write, program)
    finally:
        os.close(write)
    return read


@dataclass(frozen=True)
class Isolation:
    """What the probe found: each piece present or absent (with why, never a data value)."""

    pieces: dict[str, bool]
    why: dict[str, str] = field(default_factory=dict)

    @property
    def missing(self) -> list[str]:
        return [p for p in PIECES if not self.pieces.get(p)]

    @property
    def level(self) -> str:
        return "full" if not self.missing else "incomplete"

    def report(self) -> dict[str, Any]:
        return {"level": self.level, "pieces": {p: bool(self.pieces.get(p)) for p in PIECES},
                "missing": self.missing}


PROBE_CODE = """
import json, os, resource

def run(tables):
    status = {}
    for line in open("/proc/self/status").read().splitlines():
        key, _, value = line.partition(":")
        status[key] = value.strip()
    with open("/proc/net/dev") as f:
        interfaces = [line.split(":")[0].strip() for line in f if ":" in line]
    with open("/proc/self/uid_map") as f:
        uid_map = f.read().split()
    pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    return json.dumps({
        "uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(), "uid_map": uid_map,
        "groups": os.getgroups(), "seccomp": status.get("Seccomp"),
        "no_new_privs": status.get("NoNewPrivs"), "cap_eff": status.get("CapEff"),
        "cap_prm": status.get("CapPrm"), "interfaces": interfaces, "pids": pids,
        "self": os.getpid(), "sentinel": os.path.exists(SENTINEL),
        "core": resource.getrlimit(resource.RLIMIT_CORE),
        "fsize": resource.getrlimit(resource.RLIMIT_FSIZE),
        "nproc": resource.getrlimit(resource.RLIMIT_NPROC),
    }).encode()
"""


def judge(seen: dict[str, Any]) -> Isolation:
    """The pieces, from what a probe child saw of itself."""
    pieces: dict[str, bool] = {"sandbox": True}
    why: dict[str, str] = {}
    uid_map = [str(x) for x in seen.get("uid_map", [])]
    host_userns = uid_map == ["0", "0", "4294967295"]  # no user namespace: host uids
    mapped = len(uid_map) == 3 and uid_map[1] == str(NOBODY)  # nobody of the host
    pieces["uid"] = (seen.get("uid") == seen.get("euid") == seen.get("gid") == NOBODY
                     and not seen.get("groups") and (host_userns or mapped)
                     and os.geteuid() != NOBODY)
    if not pieces["uid"]:
        why["uid"] = "the child would run as the executor's own uid (the executor is not root)"
    pieces["network"] = seen.get("interfaces") == ["lo"]
    pieces["seccomp"] = seen.get("seccomp") == "2"
    pids = seen.get("pids") or []
    pieces["parent"] = bool(pids) and set(pids) <= {1, seen.get("self")}
    pieces["mount"] = seen.get("sentinel") is False
    zero = "0000000000000000"
    pieces["privileges"] = (seen.get("no_new_privs") == "1" and seen.get("cap_eff") == zero
                            and seen.get("cap_prm") == zero)
    pieces["rlimits"] = (list(seen.get("core") or []) == [0, 0]
                         and list(seen.get("fsize") or []) == [0, 0]
                         and 0 < (list(seen.get("nproc") or [0])[0]) <= 1024)
    return Isolation(pieces, why)


_lock = threading.Lock()
_probed: Isolation | None = None


def probe(refresh: bool = False) -> Isolation:
    """The isolation this host gives a child, found once by starting a real one."""
    global _probed
    with _lock:
        if _probed is None or refresh:
            _probed = _probe()
        return _probed


def _probe() -> Isolation:
    absent = {p: False for p in PIECES}
    if shutil.which("bwrap") is None:
        return Isolation(absent, {"sandbox": "bubblewrap (bwrap) is not installed"})
    try:
        compile_filter(_DENIED, threads_only=True)
    except (OSError, AttributeError):
        return Isolation(absent, {"seccomp": "libseccomp is not available"})
    from teeflow.core.errors import ComputeError
    from teeflow.executor.sandbox import parent

    fd, sentinel = tempfile.mkstemp(prefix="teeflow-probe-")
    os.close(fd)
    try:
        code = f"SENTINEL = {sentinel!r}\n" + PROBE_CODE
        outcome = parent.start(code, [], parent.Limits(cpu_seconds=10, memory_mb=512))
    except ComputeError:
        return Isolation(absent, {"sandbox": "bubblewrap could not start a sandboxed child"})
    finally:
        os.unlink(sentinel)
    try:
        seen = json.loads(outcome.data or b"")
    except ValueError:
        seen = None
    if not isinstance(seen, dict):
        return Isolation(absent, {"sandbox": "the probe child returned a malformed answer"})
    return judge(seen)


def require(level: str = "full", isolation: Isolation | None = None) -> Isolation:
    """The isolation, if it meets ``level``; ComputeError naming the missing pieces if not."""
    from teeflow.core.errors import ComputeError

    if level not in LEVELS:
        raise ComputeError(f"unknown user code isolation level {level!r}")
    got = probe() if isolation is None else isolation
    missing = got.missing
    if missing:
        reasons = "; ".join(f"{p}: {got.why[p]}" for p in missing if p in got.why)
        raise ComputeError(
            f"user code refused: isolation {level!r} is incomplete here, missing "
            f"{', '.join(missing)}" + (f" ({reasons})" if reasons else "")
        )
    return got
