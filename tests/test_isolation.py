"""user_code's sandbox, attacked: code that tries to read the executor (its memory, environment,
fds), trace it, reach the network, start processes or write files must fail, and where the
isolation is incomplete user_code is refused, naming the missing piece, before any process
starts. The parent here is the test process, made non-dumpable as the executor makes itself."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import textwrap

import pyarrow as pa
import pytest

from teeflow.attestation.policy import load_policy
from teeflow.compute import usercode
from teeflow.core.errors import ComputeError, ConfigError, ParameterError
from teeflow.executor import hardening
from teeflow.executor.sandbox import jail

pytestmark = pytest.mark.skipif(
    shutil.which("bwrap") is None or os.geteuid() != 0,
    reason="needs bubblewrap and root (make sysdeps installs it; without root the sandbox "
           "cannot give the child a uid of its own and user_code is refused)",
)

SECRET = "teeflow-secret-marker-7f3a"
INPUTS = [("a", pa.table({"x": [1, 2, 3]}))]


@pytest.fixture(scope="module", autouse=True)
def executor_like():
    """Like the executor: a secret in this process's environment, non-dumpable."""
    os.environ["TEEFLOW_TEST_SECRET"] = SECRET
    hardening.harden()
    yield
    os.environ.pop("TEEFLOW_TEST_SECRET", None)


def _run(code: str) -> dict:
    code = textwrap.dedent(code)
    params = usercode.check_params(
        {"code": code, "code_sha256": hashlib.sha256(code.encode()).hexdigest()}
    )
    return usercode.run(INPUTS, params)


def _attempt(body: str) -> str:
    """Run ``body`` (statements using ``ppid``) in user code; what happened, by type name."""
    got = _run(f"""
        import os
        def run(tables):
            ppid = {os.getpid()}
            try:
{textwrap.indent(textwrap.dedent(body), " " * 16)}
                status = "succeeded"
            except BaseException as exc:
                status = type(exc).__name__
            return status.encode()
    """)
    import base64

    return base64.b64decode(got["base64"]).decode()


def test_probe_reports_full_isolation():
    report = hardening.isolation()
    assert report["level"] == "full", report
    assert set(report["pieces"]) == set(jail.PIECES) and report["missing"] == []
    assert report["executor_dumpable"] is False


@pytest.mark.parametrize("path", ["mem", "environ", "fd/0", "maps", "cmdline"])
def test_parent_proc_unreachable(path):
    status = _attempt(f"""
        with open(f"/proc/{{ppid}}/{path}", "rb") as f:
            data = f.read(1 << 20)
        assert b"{SECRET}" not in data and data
    """)
    assert status != "succeeded"


def test_parent_fds_unreachable():
    status = _attempt("""
        fds = os.listdir(f"/proc/{ppid}/fd")
        os.open(f"/proc/{ppid}/fd/{fds[0]}", os.O_RDONLY)
    """)
    assert status != "succeeded"
    own = _attempt("""
        links = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                links.append(os.readlink(f"/proc/self/fd/{fd}"))
            except FileNotFoundError:  # the listing's own fd, closed by now
                pass
        assert all(link.startswith(("pipe:", "/dev/null", "/proc/")) or
                   link.startswith("/root/.pyenv") or link.startswith("/work/") for link in links)
        assert not [link for link in links if "socket:" in link or "key" in link]
    """)
    assert own == "succeeded"  # the child holds its pipes and /dev/null, nothing of ours


def test_ptrace_of_parent_refused():
    status = _attempt("""
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.ptrace(16, ppid, 0, 0) != 0:  # PTRACE_ATTACH
            raise PermissionError(ctypes.get_errno())
    """)
    assert status != "succeeded"


def test_secret_not_in_child_environment():
    status = _attempt(f"""
        assert "{SECRET}" not in open("/proc/self/environ").read()
        assert "{SECRET}" in open("/proc/1/environ").read()
    """)
    assert status != "succeeded"


def test_socket_to_loopback_refused():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.setblocking(False)
    try:
        port = server.getsockname()[1]
        for how in ("import socket\nsocket.create_connection(('127.0.0.1', %d), timeout=2)",
                    "import _socket\n_socket.socket().connect(('127.0.0.1', %d))"):
            assert _attempt(how % port) != "succeeded"
        with pytest.raises(BlockingIOError):
            server.accept()
    finally:
        server.close()


@pytest.mark.parametrize("body", [
    "pid = os.fork()\nif pid == 0:\n    os._exit(0)",
    "import subprocess\nsubprocess.run(['/bin/sh', '-c', 'true'])",
    "import posix\nposix.fork()",
    "import posix\nposix.execv('/bin/sh', ['sh'])",
    # past the audit hook: the C library's fork and exec, through ctypes
    "import ctypes\nlibc = ctypes.CDLL(None)\nassert libc.fork() >= 0",
    "import ctypes\nlibc = ctypes.CDLL(None)\n"
    "libc.execv(b'/root/.pyenv/versions/3.11.7/bin/python3.11', None)\nraise OSError",
])
def test_processes_refused(body):
    assert _attempt(body) != "succeeded"


@pytest.mark.parametrize("path", ["/tmp/escape", "/work/escape", "/escape", "/dev/shm/escape"])
def test_writes_outside_refused(path):
    status = _attempt(f"""
        fd = os.open("{path}", os.O_WRONLY | os.O_CREAT)
        os.write(fd, b"x")
    """)
    assert status != "succeeded"
    assert not os.path.exists(path)


def test_native_write_refused(tmp_path):
    target = tmp_path / "escape"
    status = _attempt(f"""
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.open(b"{target}", 0o101, 0o644)  # O_WRONLY | O_CREAT
        if fd < 0 or libc.write(fd, b"x", 1) != 1:
            raise OSError(ctypes.get_errno())
    """)
    assert status != "succeeded"
    assert not target.exists()


def test_incomplete_isolation_refused_naming_the_piece(monkeypatch):
    pieces = {p: True for p in jail.PIECES}
    pieces["seccomp"] = False
    fake = jail.Isolation(pieces, {"seccomp": "libseccomp is not available"})
    monkeypatch.setattr(jail, "probe", lambda refresh=False: fake)

    def no_process(*args, **kwargs):
        raise AssertionError("a process was started")

    monkeypatch.setattr(subprocess, "Popen", no_process)
    code = "def run(tables):\n    return b''\n"
    raw = {"code": code, "code_sha256": hashlib.sha256(code.encode()).hexdigest()}
    with pytest.raises(ParameterError, match="isolation 'full' is incomplete here, missing "
                                             "seccomp .seccomp: libseccomp is not available"):
        usercode.check_params(raw)
    checked = usercode.precheck_params(raw)  # the scheduler's check needs no sandbox
    with pytest.raises(ComputeError, match="missing seccomp"):
        usercode.run(INPUTS, checked)
    assert hardening.isolation()["missing"] == ["seccomp"]


def test_judge_names_each_missing_piece():
    seen = {"uid": 65534, "euid": 65534, "gid": 65534, "uid_map": ["0", "0", "4294967295"],
            "groups": [], "seccomp": "2", "no_new_privs": "1", "cap_eff": "0" * 16,
            "cap_prm": "0" * 16, "interfaces": ["lo"], "pids": [1, 2], "self": 2,
            "sentinel": False, "core": [0, 0], "fsize": [0, 0], "nproc": [64, 64]}
    assert jail.judge(seen).missing == []
    for change, piece in [({"uid_map": ["65534", "1000", "1"]}, "uid"),
                          ({"interfaces": ["lo", "eth0"]}, "network"),
                          ({"seccomp": "0"}, "seccomp"), ({"pids": [1, 2, 77]}, "parent"),
                          ({"sentinel": True}, "mount"), ({"no_new_privs": "0"}, "privileges"),
                          ({"fsize": [-1, -1]}, "rlimits")]:
        assert jail.judge({**seen, **change}).missing == [piece]


def test_policy_field_checked():
    base = {"tee_types": ["simulated"], "allow_simulated": True,
            "simulated": {"measurement": ["00" * 32]}}
    assert load_policy({**base, "user_code_isolation": "full"}).user_code_isolation == "full"
    assert load_policy(base).user_code_isolation is None
    with pytest.raises(ConfigError, match="user_code_isolation: expected one of full"):
        load_policy({**base, "user_code_isolation": "partial"})
    with pytest.raises(ConfigError, match="user_code_isolatoin: unknown field"):
        load_policy({**base, "user_code_isolatoin": "full"})
    json.dumps(load_policy({**base, "user_code_isolation": "full"}).to_dict())


def test_walls_hold_without_the_audit_hook():
    """The outer layer alone (bwrap + seccomp, no audit hook): fork, sockets, ptrace, unshare
    and writes fail in a child that runs plain Python as nobody."""
    script = textwrap.dedent(f"""
        import ctypes, os, socket
        os.setgroups([]); os.setgid(65534); os.setuid(65534)
        libc = ctypes.CDLL(None, use_errno=True)
        out = {{}}
        for name, call in [("fork", os.fork), ("socket", socket.socket),
                           ("unshare", lambda: libc.unshare(0x10000000)),
                           ("write", lambda: open("/escape", "w"))]:
            try:
                pid = call()
                if name == "fork" and pid == 0:
                    os._exit(0)
                failed = name == "unshare" and pid != 0
                out[name] = ctypes.get_errno() if failed else "succeeded"
            except OSError as exc:
                out[name] = exc.errno
        out["ptrace"] = libc.ptrace(16, {os.getpid()}, 0, 0)
        out["proc"] = os.path.exists("/proc/{os.getpid()}/mem")
        print(out)
    """)
    fd = jail.seccomp_pipe(jail.compile_filter(jail._DENIED, threads_only=True))
    try:
        argv = jail.command(fd, {}, ["-I", "-c", script])
        done = subprocess.run(argv, pass_fds=(fd,), capture_output=True, text=True, env={},
                              timeout=60, check=False)
    finally:
        os.close(fd)
    assert done.returncode == 0, done.stderr[-500:]
    out = eval(done.stdout)  # noqa: S307 - our own child's repr of a dict of ints and bools
    assert "succeeded" not in out.values() and out["ptrace"] == -1 and out["proc"] is False
