"""user_code: a Python file submitted with the task, run in a sandboxed child process.

The file defines ``run(tables: dict[str, pyarrow.Table]) -> pyarrow.Table | bytes``; ``tables``
maps each dataset name to its table. Its SHA-256 (``code_sha256``) is part of the task spec the
owners sign, and the code itself travels as the ``code`` parameter. Code whose digest is not
the signed one is refused, in ``check_params`` and again in ``run`` before any process starts.

The child runs under bubblewrap and seccomp (``isolation``: "full", the only level; a host
that cannot give all of it refuses the task at create-task, naming the missing piece). It has
no network, writes no file, and runs under CPU-time (``cpu_seconds``) and memory
(``memory_mb``) limits; see ``teeflow.executor.sandbox`` for what exactly is applied. The result
says which isolation applied (``isolation``). A failure is reported by its kind only (limit
reached, exception type), never by a message the code produced.

The result is ``{"kind": "table", "columns": [...], "rows": [[...], ...], "arrow": "..."}`` or
``{"kind": "bytes", "base64": "..."}``, plus ``code_sha256`` and ``isolation``.

This module also holds ``table_json``, the conversion of a result table to JSON-ready values
(shared with ``sql``), with the same table as a base64 Arrow IPC stream (``arrow``): the
types JSON loses (int64 beyond 2**53, decimals, timestamps, NaN, nulls in an int column) are
kept there, and the SDK's ``Result.to_arrow()`` reads it.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import hashlib
import hmac
import math
import re
import uuid
from typing import Any

import pyarrow as pa

from teeflow.compute.errors import public, user_code_error
from teeflow.compute.params import Param, parse_params
from teeflow.core.errors import ComputeError, ParameterError, SchemaMismatch, TeeflowError

NAME = "user_code"
DESCRIPTION = (
    "Python code submitted with the task (its SHA-256 signed by the owners): run(tables) gets "
    "{dataset: pyarrow.Table} and returns a table or bytes; runs with no network, no file "
    "writes, and CPU and memory limits"
)
LAYOUT = "any"
MIN_DATASETS = 1
USES = (
    "teeflow.compute.errors",
    "teeflow.compute.params",
    # the whole sandbox: what runs the code is part of what the owners sign
    "teeflow.executor.sandbox",
    "teeflow.executor.sandbox.frames",
    "teeflow.executor.sandbox.parent",
    "teeflow.executor.sandbox.jail",
    "teeflow.executor.sandbox.child",
)

MAX_CODE_BYTES = 256 << 10  # the sandbox frame limit; tests check the two agree
MAX_CELLS = 5_000_000
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")

PARAMS: tuple[Param, ...] = (
    Param(
        "code_sha256", "str", required=True,
        help="SHA-256 (hex) of the code's UTF-8 text, as signed by the owners",
    ),
    Param(
        "code", "str", required=True,
        help=f"the Python source defining run(tables), at most {MAX_CODE_BYTES} bytes",
    ),
    Param(
        "cpu_seconds", "int", default=60, low=1, high=3600,
        help="CPU time the code may use; it is stopped at the limit",
    ),
    Param(
        "memory_mb", "int", default=2048, low=64, high=1 << 20,
        help="memory (MiB) the code's process may allocate, inputs included",
    ),
    Param(
        "isolation", "str", default="full", choices=("full",),
        help="the sandbox isolation demanded (full: bubblewrap with its own uid, network, pid "
             "and mount namespaces, seccomp, rlimits); refused where the executor lacks it",
    ),
)


# The code decides everything the result shows (an approval rule binds it by digest).
REVEALING = ("code",)


def verify_digest(code: Any, signed: Any) -> str:
    """The code's digest, if it is the signed one; ParameterError otherwise."""
    if not isinstance(signed, str) or not _HEX64.match(signed):
        raise ParameterError("parameter 'code_sha256': required, 64 hexadecimal digits")
    if not isinstance(code, str) or not code:
        raise ParameterError("parameter 'code': required (the Python source text)")
    try:
        data = code.encode("utf-8")
    except UnicodeEncodeError:
        raise ParameterError("parameter 'code': not encodable as UTF-8") from None
    if len(data) > MAX_CODE_BYTES:
        raise ParameterError(f"parameter 'code': larger than {MAX_CODE_BYTES} bytes")
    actual = hashlib.sha256(data).hexdigest()
    if not hmac.compare_digest(actual, signed.lower()):
        raise ParameterError(
            f"parameter 'code': user code digest {actual[:16]}... is not the signed "
            f"code_sha256 {signed.lower()[:16]}...; refusing to run it"
        )
    return actual


def check_params(raw: dict[str, Any]) -> dict[str, Any]:
    """The full check, on the executor: the parameters, then that this host gives the
    isolation they demand (a real sandboxed child is started once to find out), so a task is
    refused at create-task, before any data moves, naming the missing piece."""
    checked = precheck_params(raw)
    from teeflow.executor.sandbox import jail  # only inside the executor

    try:
        jail.require(checked["isolation"])
    except ComputeError as exc:
        raise ParameterError(f"parameter 'isolation': {exc}") from None
    return checked


def precheck_params(raw: dict[str, Any]) -> dict[str, Any]:
    """The checks that need no sandbox (the scheduler's and the initiator's)."""
    if not isinstance(raw, dict):
        raise ParameterError(f"{NAME}: parameters must be a mapping of names to strings")
    digest = verify_digest(raw.get("code"), raw.get("code_sha256"))  # before anything else
    checked = parse_params(NAME, PARAMS, raw)
    checked["code"] = raw["code"]  # the exact text the digest covers, not a stripped copy
    checked["code_sha256"] = digest
    try:
        compile(checked["code"], "<user code>", "exec", dont_inherit=True)
    except SyntaxError as exc:
        raise ParameterError(
            f"parameter 'code': syntax error at line {exc.lineno}: {exc.msg}"
        ) from None
    except (ValueError, RecursionError, MemoryError) as exc:
        raise ParameterError(f"parameter 'code': does not compile ({type(exc).__name__})") from None
    return checked


def check_schemas(schemas: dict[str, pa.Schema], params: dict[str, Any]) -> None:
    if not schemas:
        raise SchemaMismatch(f"{NAME} needs at least one dataset, got none")


def run(inputs: list[tuple[str, pa.Table]], params: dict[str, Any]) -> dict[str, Any]:
    code = params["code"]
    digest = verify_digest(code, params["code_sha256"])
    check_schemas({ds: t.schema for ds, t in inputs}, params)
    from teeflow.executor import sandbox  # the child process: only inside the executor

    limits = sandbox.Limits(
        cpu_seconds=int(params.get("cpu_seconds", 60)),
        memory_mb=int(params.get("memory_mb", 2048)),
        isolation=str(params.get("isolation", "full")),
    )
    try:
        outcome = sandbox.run_code(code, inputs, limits)
    except TeeflowError as exc:
        raise user_code_error(exc) from None
    out: dict[str, Any]
    if outcome.kind == "table" and outcome.table is not None:
        out = {"kind": "table", **table_json(outcome.table)}
    else:
        out = {"kind": "bytes", "base64": base64.b64encode(outcome.data or b"").decode("ascii")}
    out["code_sha256"] = digest
    out["isolation"] = dict(outcome.isolation)
    out["isolation_level"] = limits.isolation
    return out


# --- JSON-ready tables --------------------------------------------------------------------------


def _json_value(v: Any) -> Any:
    if v is None or isinstance(v, bool | int | str):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, decimal.Decimal):
        f = float(v)
        return f if math.isfinite(f) else None
    if isinstance(v, bytes | bytearray):
        return base64.b64encode(bytes(v)).decode("ascii")
    if isinstance(v, dt.timedelta):
        return v.total_seconds()
    if isinstance(v, dt.datetime | dt.date | dt.time):
        return v.isoformat()
    if isinstance(v, uuid.UUID):
        return str(v)
    if isinstance(v, dict):
        return {str(k): _json_value(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_json_value(x) for x in v]
    return str(v)


def table_json(table: pa.Table, max_cells: int = MAX_CELLS) -> dict[str, Any]:
    """``{"columns": [...], "rows": [[...], ...]}`` with JSON-ready values: non-finite floats
    become null, decimals floats, bytes base64, dates and times ISO 8601 text."""
    cells = table.num_rows * max(table.num_columns, 1)
    if cells > max_cells:
        raise public("result_too_large", computation="result table", limit=max_cells,
                     unit="cells")
    columns = [[_json_value(v) for v in col.to_pylist()] for col in table.columns]
    rows = [list(r) for r in zip(*columns, strict=True)] if columns else []
    return {"columns": list(table.column_names), "rows": rows, "arrow": table_ipc(table)}


def table_ipc(table: pa.Table) -> str:
    """The table as a base64 Arrow IPC stream (zstd-compressed when pyarrow has it), its
    schema metadata dropped (a user's table may carry anything there)."""
    table = table.replace_schema_metadata(None)
    codec = "zstd" if pa.Codec.is_available("zstd") else None
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema,
                           options=pa.ipc.IpcWriteOptions(compression=codec)) as writer:
        writer.write_table(table)
    return base64.b64encode(sink.getvalue().to_pybytes()).decode("ascii")
