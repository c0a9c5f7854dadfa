"""Attacks on the executor's intake over real loopback Flight: an owner of one dataset of a
task (a stranger may make such a task itself) uploads crafted Arrow data under a correctly
signed request. Each attack must fail that upload with a named error, fail the task, and
wipe every input of it (the honest co-owner's too); nothing reaches a computation.

The malformed batches are well-formed when built (pyarrow checks them) and broken afterwards
by writing over one of their buffers in place, so the client's IPC writer sends them as they
are: Flight's own reader checks structure cheaply, and only a full validation catches the rest.
"""

from __future__ import annotations

import contextlib
import ctypes
import struct
import sys
import threading
from collections.abc import Callable

import pyarrow as pa
import pyarrow.flight as fl
import pytest
from cryptography.hazmat.primitives import serialization

from teeflow.attestation.ratls import make_ratls_identity
from teeflow.attestation.simulated import SimulatedBackend
from teeflow.core import wire
from teeflow.core.crypto import KeySigner
from teeflow.core.schemas import schema_fingerprint
from teeflow.executor.server import ExecutorFlightServer
from teeflow.executor.service import Executor
from teeflow.net.executor_client import ExecutorClient
from tests.factories import Serving, approval, attested_client, make_spec

TASK = "task0001"
HONEST = pa.table({"v": pa.array([11, 22, 33], pa.int64())})
MARKER = "zq-marker-7731"  # a cell value that must never appear in an error


def _i32(*values: int) -> pa.Buffer:
    return pa.py_buffer(bytearray(struct.pack(f"<{len(values)}i", *values)))


def _overwrite(buf: pa.Buffer, data: bytes) -> None:
    ctypes.memmove(buf.address, data, len(data))


def _strings(offsets_after: tuple[int, ...] | None = None, data_after: bytes | None = None
             ) -> tuple[pa.Array, Callable[[], None]]:
    """["abc", "def"] (the marker in front), and how to break it afterwards."""
    text = (MARKER + "abcdef").encode()
    n = len(MARKER)
    offsets, data = _i32(0, n + 3, n + 6), pa.py_buffer(bytearray(text))
    array = pa.Array.from_buffers(pa.string(), 2, [None, offsets, data])

    def breaks() -> None:
        if offsets_after is not None:
            _overwrite(offsets, struct.pack(f"<{len(offsets_after)}i", *offsets_after))
        if data_after is not None:
            _overwrite(data, data_after)

    return array, breaks


def _malformed(kind: str) -> pa.RecordBatch:
    """A one-column batch of `kind`, broken after pyarrow checked it."""
    n = len(MARKER)
    if kind == "offsets_beyond_data":
        array, breaks = _strings(offsets_after=(0, n + 3, 1 << 20))
    elif kind == "offsets_decreasing":
        array, breaks = _strings(offsets_after=(0, n + 5, 2))
    elif kind == "invalid_utf8":
        array, breaks = _strings(data_after=b"\xff\xfe")
    elif kind == "dictionary_index_out_of_range":
        indices = _i32(0, 1)
        array = pa.DictionaryArray.from_arrays(
            pa.Array.from_buffers(pa.int32(), 2, [None, indices]), pa.array([MARKER, "y"]))

        def breaks() -> None:
            _overwrite(indices, struct.pack("<2i", 0, 1 << 20))
    elif kind == "list_child_shorter_than_offsets":
        offsets = _i32(0, 2, 3)
        array = pa.Array.from_buffers(pa.list_(pa.int64()), 2, [None, offsets],
                                      children=[pa.array([1, 2, 3], pa.int64())])

        def breaks() -> None:
            _overwrite(offsets, struct.pack("<3i", 0, 2, 1 << 20))
    elif kind == "struct_child_malformed":
        child, breaks = _strings(offsets_after=(0, n + 5, 2))
        array = pa.StructArray.from_arrays([child], ["s"])
    else:
        raise AssertionError(kind)
    batch = pa.RecordBatch.from_arrays([array], ["c"])
    breaks()
    return batch


KINDS = ["offsets_beyond_data", "offsets_decreasing", "invalid_utf8",
         "dictionary_index_out_of_range", "list_child_shorter_than_offsets",
         "struct_child_malformed"]


def _server(serve, **options) -> Serving:
    """A real executor with constructor options (the Flight server `teeflow executor` runs)."""
    backend = SimulatedBackend()
    cert, key_pem = make_ratls_identity(backend)
    key = serialization.load_pem_private_key(key_pem, password=None)
    executor = Executor(backend, key, **options)  # type: ignore[arg-type]
    return serve(ExecutorFlightServer(executor, "grpc+tls://127.0.0.1:0", cert, key_pem))


def _task(running: Serving, attacker: KeySigner, honest: KeySigner, schema: pa.Schema) -> None:
    initiator = KeySigner.generate()
    spec = make_spec([("d1", "mallory", attacker, schema_fingerprint(schema)),
                      ("d2", "alice", honest, schema_fingerprint(HONEST.schema))], initiator)
    running.server.executor.create_task(spec, [approval(spec, attacker), approval(spec, honest)])


def _open(client: ExecutorClient, owner: KeySigner, dataset: str, schema: pa.Schema):
    """A do_put under a correctly signed, single-use upload request (as `upload` makes it)."""
    challenge = client.challenge(TASK, owner)
    signature = owner.sign(wire.upload_message(TASK, dataset, challenge, client.tls_key_hash))
    command = wire.canonical({"task_id": TASK, "dataset": dataset,
                              "challenge": challenge.hex(), "signature": signature.hex()})
    return client._client.do_put(fl.FlightDescriptor.for_command(command), schema)


def _send(client: ExecutorClient, owner: KeySigner, schema: pa.Schema,
          batches: list[pa.RecordBatch], end: bytes | None = None) -> Exception | None:
    """Send an upload of d1 as a raw client would; the error the executor answered, if any."""
    try:
        writer, meta = _open(client, owner, "d1", schema)
        with writer:
            for batch in batches:
                writer.write_batch(batch)
            rows = sum(b.num_rows for b in batches)
            writer.write_metadata(pa.py_buffer(end or wire.end_marker(rows, len(batches))))
            writer.done_writing()
            meta.read()
    except (fl.FlightError, OSError) as exc:
        return exc
    return None


def _assert_failed_and_wiped(running: Serving, error: Exception | None, named: str) -> None:
    executor = running.server.executor
    status = executor.status(TASK)
    assert error is not None, "the executor accepted the upload"
    assert status["status"] == "failed", status
    assert named in status["error"], status["error"]
    assert MARKER not in status["error"] and MARKER not in str(error)
    assert executor.held_bytes(TASK) == 0
    assert status["inputs_held"] == []
    assert executor.run(TASK, background=False) == "failed"  # nothing runs
    assert executor.status(TASK)["status"] == "failed"


@pytest.fixture
def honest_first(serve):
    """An executor where the honest co-owner's d2 is already received; mallory owns d1."""
    def start(schema: pa.Schema, **options) -> tuple[Serving, ExecutorClient, KeySigner]:
        running = _server(serve, **options)
        attacker, honest = KeySigner.generate(), KeySigner.generate()
        _task(running, attacker, honest, schema)
        client = attested_client(running.address)
        client.upload(TASK, "d2", honest, HONEST.schema, HONEST.to_batches())
        assert running.server.executor.held_bytes(TASK) > 0
        return running, client, attacker

    clients: list[ExecutorClient] = []

    def tracked(schema: pa.Schema, **options):
        running, client, attacker = start(schema, **options)
        clients.append(client)
        return running, client, attacker

    yield tracked
    for c in clients:
        c.close()


@pytest.mark.parametrize("kind", KINDS)
def test_malformed_batch_fails_the_task_and_wipes_every_input(honest_first, kind):
    batch = _malformed(kind)
    with pytest.raises(pa.ArrowInvalid):
        batch.validate(full=True)  # the attack is real: this batch is malformed
    running, client, attacker = honest_first(batch.schema)
    error = _send(client, attacker, batch.schema, [batch])
    _assert_failed_and_wiped(running, error, "malformed")


def test_a_batch_over_the_size_cap_fails_the_task(honest_first):
    big = pa.record_batch({"c": pa.array(range(4096), pa.int64())})  # 32 KiB of values
    running, client, attacker = honest_first(big.schema, max_batch_bytes=16 * 1024)
    error = _send(client, attacker, big.schema, [big])
    _assert_failed_and_wiped(running, error, "larger than")


def test_oversized_metadata_fails_the_task(honest_first):
    small = pa.record_batch({"c": pa.array([1, 2], pa.int64())})
    padded = wire.canonical({"end": True, "rows": 2, "batches": 1, "pad": "x" * 64 * 1024})
    running, client, attacker = honest_first(small.schema)
    error = _send(client, attacker, small.schema, [small], end=padded)
    _assert_failed_and_wiped(running, error, "metadata")


def test_well_formed_upload_still_counts(honest_first):
    good = pa.record_batch({"c": pa.array([MARKER, "b"])})
    running, client, attacker = honest_first(good.schema)
    assert _send(client, attacker, good.schema, [good]) is None
    assert running.server.executor.status(TASK)["status"] != "failed"


def test_a_stalled_upload_is_cut_and_the_task_wiped(honest_first):
    """One batch, then nothing with the stream kept open: past the idle timeout the task
    fails and every input is wiped, while the stalled client still holds its stream."""
    small = pa.record_batch({"c": pa.array([1, 2], pa.int64())})
    running, client, attacker = honest_first(small.schema, upload_idle_timeout=0.3)
    executor = running.server.executor
    writer, meta = _open(client, attacker, "d1", small.schema)
    try:
        writer.write_batch(small)
        for _ in range(600):  # generous: the deadline is 0.3 s
            if executor.status(TASK)["status"] == "failed":
                break
            threading.Event().wait(0.05)
        status = executor.status(TASK)
        assert status["status"] == "failed" and "idle" in status["error"], status
        assert executor.held_bytes(TASK) == 0 and status["inputs_held"] == []
    finally:
        try:
            writer.close()
        except (fl.FlightError, OSError):
            pass
    assert executor.held_bytes(TASK) == 0


def _threads_reading_uploads() -> int:
    """Threads of this process now inside the executor's upload reader (server._messages)."""
    count = 0
    for frame in sys._current_frames().values():
        while frame is not None:
            if frame.f_code.co_name == "_messages" and \
                    frame.f_code.co_filename.endswith("executor/server.py"):
                count += 1
                break
            frame = frame.f_back
    return count


def test_a_cut_upload_frees_its_thread_by_hanging_up(honest_first):
    """Past the idle timeout the stalled sender's connection is shut down, so the thread
    reading its stream returns (Flight cannot cancel the read itself), although the sender,
    which never writes again, still holds its stream open."""
    small = pa.record_batch({"c": pa.array([1, 2], pa.int64())})
    running, client, attacker = honest_first(small.schema, upload_idle_timeout=0.3)
    executor = running.server.executor
    writer, _ = _open(client, attacker, "d1", small.schema)
    try:
        writer.write_batch(small)
        for _ in range(200):
            if _threads_reading_uploads():
                break
            threading.Event().wait(0.05)
        assert _threads_reading_uploads() == 1  # the stalled upload pins a reading thread
        for _ in range(600):  # generous: the deadline is 0.3 s
            if executor.status(TASK)["status"] == "failed" and not _threads_reading_uploads():
                break
            threading.Event().wait(0.05)
        assert executor.status(TASK)["status"] == "failed"
        assert _threads_reading_uploads() == 0, "the stalled sender still pins a thread"
    finally:
        with contextlib.suppress(fl.FlightError, OSError):
            writer.close()
