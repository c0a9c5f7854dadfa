"""user_code: signed Python code run in a sandboxed child process."""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import hashlib
import io
import json
import os
import socket
import subprocess
import textwrap
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.datasets import load_breast_cancer

from teeflow.compute import usercode
from teeflow.core.errors import ComputeError, ParameterError
from teeflow.executor import sandbox
from teeflow.executor.sandbox import frames
from teeflow.executor.sandbox import parent as sandbox_parent

MEANS = """
import pyarrow as pa
import pyarrow.compute as pc

def run(tables):
    merged = pa.concat_tables(tables.values())
    names = [c for c in merged.column_names if c != "target"]
    return pa.table({
        "feature": names,
        "mean": [pc.mean(merged[c]).as_py() for c in names],
        "n": [merged.num_rows] * len(names),
    })
"""


@pytest.fixture(scope="module")
def cancer() -> pd.DataFrame:
    data = load_breast_cancer(as_frame=True)
    df = data.data.copy()
    df.columns = [c.replace(" ", "_") for c in df.columns]
    df["target"] = data.target.astype("int64")
    return df


@pytest.fixture(scope="module")
def inputs(cancer) -> list[tuple[str, pa.Table]]:
    return [
        ("hospital_a", pa.Table.from_pandas(cancer.iloc[:300], preserve_index=False)),
        ("hospital_b", pa.Table.from_pandas(cancer.iloc[300:], preserve_index=False)),
    ]


def _params(code: str, **extra: str) -> dict:
    code = textwrap.dedent(code)
    raw = {"code": code, "code_sha256": hashlib.sha256(code.encode()).hexdigest(), **extra}
    return usercode.check_params(raw)


def _run(inputs, code: str, **extra: str) -> dict:
    params = _params(code, **extra)
    usercode.check_schemas({ds: t.schema for ds, t in inputs}, params)
    out = usercode.run(inputs, params)
    json.dumps(out)
    return out


def test_table_result_matches_plaintext(inputs, cancer):
    got = _run(inputs, MEANS)
    assert got["kind"] == "table"
    assert got["columns"] == ["feature", "mean", "n"]
    features = [c for c in cancer.columns if c != "target"]
    assert [r[0] for r in got["rows"]] == features
    assert [r[1] for r in got["rows"]] == pytest.approx(cancer[features].mean().tolist())
    assert {r[2] for r in got["rows"]} == {len(cancer)}
    assert got["code_sha256"] == hashlib.sha256(MEANS.encode()).hexdigest()
    assert got["isolation"]["guard"] == "audit-hook"
    if os.geteuid() == 0:  # as root here: own network namespace, and run as nobody
        assert got["isolation"] == {"network": "netns", "user": "nobody", "guard": "audit-hook"}


def test_bytes_result(inputs):
    got = _run(inputs, """
        import json
        def run(tables):
            print("stdout is not the result channel")
            return json.dumps({k: t.num_rows for k, t in tables.items()}).encode()
    """)
    assert got["kind"] == "bytes"
    assert json.loads(base64.b64decode(got["base64"])) == {"hospital_a": 300, "hospital_b": 269}


def test_changed_digest_refused_before_any_process(inputs, monkeypatch):
    params = _params(MEANS)
    tampered = MEANS.replace("pc.mean", "pc.max")
    with pytest.raises(ParameterError, match="user code digest .* is not the signed code_sha256"):
        usercode.check_params({"code": tampered, "code_sha256": params["code_sha256"]})

    def no_process(*args, **kwargs):
        raise AssertionError("a process was started")

    monkeypatch.setattr(subprocess, "Popen", no_process)
    with pytest.raises(ParameterError, match="is not the signed code_sha256"):
        usercode.run(inputs, {**params, "code": tampered})
    with pytest.raises(ParameterError, match="is not the signed code_sha256"):
        usercode.run(inputs, {**params, "code": params["code"] + " "})  # one byte more


def test_params():
    with pytest.raises(ParameterError, match="'code_sha256': required, 64 hexadecimal"):
        usercode.check_params({"code": "def run(t): pass"})
    with pytest.raises(ParameterError, match="'code': required"):
        usercode.check_params({"code_sha256": "0" * 64})
    big = "#" * (256 * 1024 + 1)
    digest = hashlib.sha256(big.encode()).hexdigest()
    with pytest.raises(ParameterError, match="larger than 262144 bytes"):
        usercode.check_params({"code": big, "code_sha256": digest})
    with pytest.raises(ParameterError, match="syntax error at line 1"):
        _params("def run(:")
    with pytest.raises(ParameterError, match="'cpu_seconds'"):
        _params(MEANS, cpu_seconds="0")
    with pytest.raises(ParameterError, match="unknown parameter"):
        _params(MEANS, network="yes")
    code = "def run(tables):\n    return b''\n"
    upper = hashlib.sha256(code.encode()).hexdigest().upper()
    checked = usercode.check_params({"code": code, "code_sha256": upper, "memory_mb": "256"})
    assert checked["code"] == code and checked["code_sha256"] == upper.lower()
    assert checked["cpu_seconds"] == 60 and checked["memory_mb"] == 256


def test_cpu_limit(inputs):
    with pytest.raises(ComputeError, match=r"CPU time limit \(cpu_seconds=1\)"):
        _run(inputs, """
            def run(tables):
                while True:
                    pass
        """, cpu_seconds="1")


def test_memory_limit(inputs):
    with pytest.raises(ComputeError, match=r"ran out of memory \(memory_mb=200\)"):
        _run(inputs, """
            def run(tables):
                data = bytearray(1 << 30)
                return bytes(data[:10])
        """, memory_mb="200")


def test_no_network(inputs):
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.setblocking(False)
    port = server.getsockname()[1]
    try:
        got = _run(inputs, f"""
            import pyarrow as pa
            def run(tables):
                import socket
                try:
                    socket.create_connection(("127.0.0.1", {port}), timeout=2)
                    status = "connected"
                except BaseException as exc:
                    status = type(exc).__name__
                try:
                    with open("/proc/self/net/dev") as f:
                        interfaces = [line.split(":")[0].strip() for line in f if ":" in line]
                except OSError:
                    interfaces = []
                return pa.table({{"status": [status], "interfaces": [",".join(interfaces)]}})
        """)
        [[status, interfaces]] = got["rows"]
        assert status != "connected"
        with pytest.raises(BlockingIOError):
            server.accept()  # nothing ever reached the listener
        if got["isolation"]["network"] != "none":
            assert interfaces == "lo"  # the child's own namespace: loopback only, and down
    finally:
        server.close()


@pytest.mark.parametrize("attempt", [
    'open("out.txt", "w").write("x")',
    'open("/tmp/teeflow-usercode-escape", "a")',
    'os.open("/tmp/teeflow-usercode-escape", os.O_WRONLY | os.O_CREAT)',
    'os.remove("/etc/hostname")',
    'os.system("true")',
    'subprocess.run(["/bin/true"])',
])
def test_file_writes_and_processes_refused(inputs, attempt):
    with pytest.raises(ComputeError, match="user code raised PermissionError"):
        _run(inputs, f"""
            import os, subprocess
            def run(tables):
                {attempt}
                return b"done"
        """)
    assert not os.path.exists("/tmp/teeflow-usercode-escape")


def test_errors_report_the_type_only(inputs):
    with pytest.raises(ComputeError) as err:
        _run(inputs, """
            def run(tables):
                raise ValueError("patient 42 has radius " + str(tables["hospital_a"][0][0]))
        """)
    assert str(err.value) == "user code raised ValueError"
    with pytest.raises(ComputeError, match="^user code raised an exception of its own$"):
        _run(inputs, """
            def run(tables):
                value = tables["hospital_a"][0][0].as_py()
                raise type("Leak_" + str(int(value)), (Exception,), {})()
        """)
    with pytest.raises(ComputeError, match=r"defines no function run\(tables\)"):
        _run(inputs, "x = 1\n")
    with pytest.raises(ComputeError, match="must return a pyarrow.Table or bytes, got dict"):
        _run(inputs, "def run(tables):\n    return {'a': 1}\n")


def test_wall_clock_limit(inputs, monkeypatch):
    monkeypatch.setattr(sandbox_parent, "STARTUP_SECONDS", 0.5)
    with pytest.raises(ComputeError, match=r"wall-clock limit of 2.5 s"):
        _run(inputs, """
            import time
            def run(tables):
                time.sleep(60)
        """, cpu_seconds="1")


def test_result_size_capped(inputs):
    code = "def run(tables):\n    return b'x' * (2 << 20)\n"
    limits = sandbox.Limits(cpu_seconds=10, memory_mb=512, max_result_bytes=1 << 20)
    with pytest.raises(ComputeError, match="larger than 1048576 bytes"):
        sandbox.run_code(code, inputs, limits)


def test_child_imports_no_parent_side(inputs):
    got = _run(inputs, """
        import json, sys
        def run(tables):
            return json.dumps(sorted(m for m in sys.modules if m.startswith("teeflow"))).encode()
    """)
    loaded = json.loads(base64.b64decode(got["base64"]))
    assert loaded == ["teeflow", "teeflow.executor", "teeflow.executor.sandbox",
                      "teeflow.executor.sandbox.child", "teeflow.executor.sandbox.frames"]


def test_child_runs_this_source_tree(inputs):
    got = _run(inputs, """
        import sys
        def run(tables):
            return sys.modules["teeflow.executor.sandbox.child"].__file__.encode()
    """)
    assert base64.b64decode(got["base64"]).decode() == os.path.join(
        os.path.dirname(sandbox.__file__), "child.py"
    )


@settings(max_examples=50, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=8), st.integers(1, 64))
def test_frames_round_trip(chunks, read_size):
    pipe = io.BytesIO()
    sink = frames.FramedSink(pipe)
    for chunk in chunks:
        sink.write(chunk)
    sink.end()
    pipe.write(frames.frame(b"next"))
    pipe.seek(0)
    source = frames.FramedSource(pipe)
    got = b""
    while part := source.read(read_size):
        got += part
    assert got == b"".join(chunks)
    assert frames.read_frame(pipe, 4) == b"next"  # the source stopped at its end frame


def test_frames_caps_and_malformed_messages():
    with pytest.raises(ValueError, match="frame too large"):
        frames.read_frame(io.BytesIO(frames.frame(b"12345")), 4)
    with pytest.raises(EOFError):
        frames.read_frame(io.BytesIO(frames.frame(b"12345")[:-1]), 8)
    message = frames.frame(b'{"ok": true}') + b"payload"
    assert frames.take_message(message) == ({"ok": True}, b"payload")
    too_large = frames.frame(b" " * frames.MAX_MESSAGE_BYTES + b"{}")
    for bad in (b"", message[:3], message[:8], frames.frame(b"[1]"), frames.frame(b"{"),
                too_large):
        assert frames.take_message(bad) is None


def test_code_digest_covers_the_whole_sandbox():
    from teeflow import compute

    sources = [Path(p) for p in compute.get("user_code").sources]
    package = Path(sandbox.__file__).parent
    assert [p.name for p in sources] == [
        "usercode.py", "errors.py", "params.py", "__init__.py", "frames.py", "parent.py",
        "jail.py", "child.py"
    ]
    assert sorted(sources[3:]) == sorted(package.glob("*.py"))
    assert usercode.MAX_CODE_BYTES == sandbox.MAX_CODE_BYTES  # one limit, stated twice


def test_table_json_values():
    table = pa.table({
        "f": pa.array([1.5, float("nan")]),
        "d": pa.array([decimal.Decimal("1.25"), None], pa.decimal128(5, 2)),
        "b": pa.array([b"\x00\x01", b""]),
        "t": pa.array([dt.date(2024, 1, 2), None]),
        "l": pa.array([[1, 2], []]),
    })
    got = usercode.table_json(table)
    arrow = got.pop("arrow")
    assert got == {"columns": ["f", "d", "b", "t", "l"],
                   "rows": [[1.5, 1.25, "AAE=", "2024-01-02", [1, 2]], [None, None, "", None, []]]}
    # what JSON loses (NaN, the decimal, the date type) the Arrow copy keeps
    back = pa.ipc.open_stream(base64.b64decode(arrow)).read_all()
    assert back.schema.equals(table.schema) and back.drop_columns(["f"]).equals(
        table.drop_columns(["f"]))
    assert back.column("f").to_pylist()[0] == 1.5 and back.column("f").is_nan().to_pylist()[1]
    with pytest.raises(ComputeError, match="more than 4 cells"):
        usercode.table_json(table.select(["f", "d", "b"]), max_cells=4)
