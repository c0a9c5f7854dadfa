"""Arrow schemas on the wire: a fingerprint that owners sign, and a capped IPC encoding."""

from __future__ import annotations

import base64
import hashlib
import json

import pyarrow as pa

from teeflow.core.errors import InputError

MAX_SCHEMA = 64 * 1024


def schema_fingerprint(schema: pa.Schema) -> str:
    """SHA-256 over column names, types and nullability; metadata does not count."""
    fields = [[f.name, str(f.type), f.nullable] for f in schema]
    return hashlib.sha256(json.dumps(fields, separators=(",", ":")).encode()).hexdigest()


def schema_to_b64(schema: pa.Schema) -> str:
    return base64.b64encode(schema.serialize().to_pybytes()).decode()


def schema_from_b64(text: str) -> pa.Schema:
    if len(text) > MAX_SCHEMA:
        raise InputError(f"schema larger than {MAX_SCHEMA} bytes")
    try:
        return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(text, validate=True)))
    except (ValueError, OSError, pa.ArrowException) as exc:
        raise InputError("schema is not a base64 Arrow IPC schema") from exc
