"""The executor's Flight server: decode, call `Executor`, encode. Nothing else.

TLS terminates here, inside the TEE, with a key generated in this process.
There is no do_get and no flight listing: inputs cannot be read back.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from typing import Any

import pyarrow as pa
import pyarrow.flight as fl
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from teeflow import compute
from teeflow.attestation.ratls import make_ratls_identity
from teeflow.attestation.registry import TeeBackend
from teeflow.core import wire
from teeflow.core.errors import InputError, TeeflowError
from teeflow.core.schemas import schema_from_b64
from teeflow.executor.service import Executor, FlRequest, UploadRequest
from teeflow.net.flight_errors import to_flight
from teeflow.net.listen import write_port_file

log = logging.getLogger("teeflow.executor")
MAX_ACTION_BODY = 1024 * 1024


def _task_id(body: bytes) -> str:
    text = body.decode("utf-8", "replace").strip()
    if not text or len(text) > 128:
        raise InputError("action body must be a task id")
    return text


def _json(obj: Any) -> list[fl.Result]:
    return [fl.Result(pa.py_buffer(json.dumps(obj).encode()))]


class ExecutorFlightServer(fl.FlightServerBase):
    def __init__(self, executor: Executor, location: str, cert_pem: bytes, key_pem: bytes):
        super().__init__(location, tls_certificates=[fl.CertKeyPair(cert_pem, key_pem)])
        self.executor = executor
        self.cert_pem = cert_pem

    def list_actions(self, context: fl.ServerCallContext) -> list[tuple[str, str]]:
        return [
            ("info", "TEE type and whether it is simulated"),
            ("catalog", "the computations this executor runs: parameters and code digests"),
            ("certificate", "the executor's TLS certificate (PEM)"),
            ("evidence", "evidence binding the TLS key and the body's nonce"),
            ("challenge", "a single-use value to sign for upload or result"),
            ("create-task", "register a task spec (JSON)"),
            ("run", "start the computation of a task whose inputs are all in"),
            ("status", "a task's status; never any data"),
            ("result", "the result, to the initiator only (signed challenge)"),
            ("fl-model", "a federated task's global model, to an owner (signed)"),
            ("fl-update", "an owner's update for the current round (signed)"),
            ("cancel", "cancel a task and wipe its inputs (initiator or owner, signed)"),
        ]

    def do_action(self, context: fl.ServerCallContext, action: fl.Action) -> list[fl.Result]:
        body = action.body.to_pybytes() if action.body is not None else b""
        try:
            if len(body) > MAX_ACTION_BODY:
                raise InputError(f"action body larger than {MAX_ACTION_BODY} bytes")
            return self._dispatch(action.type, body)
        except TeeflowError as exc:
            raise to_flight(exc) from None

    def _dispatch(self, kind: str, body: bytes) -> list[fl.Result]:
        ex = self.executor
        if kind == "info":
            return _json({"tee": ex.backend.tee, "simulated": ex.simulated})
        if kind == "catalog":
            return _json(compute.describe_all())
        if kind == "certificate":
            return [fl.Result(pa.py_buffer(self.cert_pem))]
        if kind == "evidence":
            return [fl.Result(pa.py_buffer(ex.evidence(body).encode()))]
        if kind == "challenge":
            return [fl.Result(pa.py_buffer(ex.challenge()))]
        if kind == "create-task":
            req = wire.parse_json(body, "create-task")
            approvals = req.get("approvals")
            if not isinstance(req.get("spec"), dict) or not isinstance(approvals, list) or \
                    not all(isinstance(a, dict) for a in approvals):
                raise InputError("create-task: needs spec and a list of approvals")
            schemas = req.get("schemas", {})
            if not isinstance(schemas, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in schemas.items()):
                raise InputError("create-task: schemas must map dataset names to schemas")
            ex.create_task(wire.TaskSpec.from_dict(req["spec"]), approvals,
                           {k: schema_from_b64(v) for k, v in schemas.items()})
            return _json({"accepted": True})
        if kind == "run":
            return _json({"status": ex.run(_task_id(body))})
        if kind == "status":
            return _json(ex.status(_task_id(body)))
        if kind == "result":
            req = wire.parse_json(body, "result request")
            try:
                task_id, receiver = str(req["task_id"]), str(req["receiver"])
                challenge = bytes.fromhex(req["challenge"])
                signature = bytes.fromhex(req["signature"])
            except (KeyError, TypeError, ValueError) as exc:
                raise InputError(
                    "result request: needs task_id, receiver, challenge, signature") from exc
            envelope = ex.take_result(task_id, receiver, challenge, signature)
            return [fl.Result(pa.py_buffer(envelope))]
        if kind in ("fl-model", "fl-update"):
            req = wire.parse_json(body, kind)
            request = FlRequest.from_dict(kind, req)
            if kind == "fl-model":
                return _json(ex.fl_model(request))
            update = req.get("update")
            if not isinstance(update, dict):
                raise InputError("fl-update: needs the update")
            return _json(ex.fl_update(request, update))
        if kind == "cancel":
            req = wire.parse_json(body, "cancel")
            try:
                task_id, key = str(req["task_id"]), str(req["key"])
                signature = bytes.fromhex(req["signature"])
            except (KeyError, TypeError, ValueError) as exc:
                raise InputError("cancel: needs task_id, key and signature") from exc
            ex.cancel(task_id, key, signature)
            return _json({"cancelled": True})
        raise InputError(f"unknown action {kind!r}")

    def do_put(self, context: fl.ServerCallContext, descriptor: fl.FlightDescriptor,
               reader: fl.MetadataRecordBatchReader, writer: fl.FlightMetadataWriter) -> None:
        try:
            if descriptor.descriptor_type != fl.DescriptorType.CMD:
                raise InputError("upload descriptor must be a command")
            request = UploadRequest.decode(descriptor.command)
            stats = self.executor.receive(request, reader.schema, _messages(reader))
        except TeeflowError as exc:
            raise to_flight(exc) from None
        writer.write(pa.py_buffer(json.dumps(stats).encode()))

    def do_get(self, context: fl.ServerCallContext, ticket: fl.Ticket) -> fl.FlightDataStream:
        raise to_flight(InputError("this executor serves no data; inputs cannot be read back"))

    def list_flights(self, context: fl.ServerCallContext, criteria: bytes):  # type: ignore[override]
        return iter(())

    def get_flight_info(self, context: fl.ServerCallContext,
                        descriptor: fl.FlightDescriptor) -> fl.FlightInfo:
        raise to_flight(InputError("this executor lists no flights"))


def _messages(reader: fl.MetadataRecordBatchReader):
    while True:
        try:
            chunk = reader.read_chunk()
        except StopIteration:
            return
        meta = chunk.app_metadata
        yield chunk.data, (meta.to_pybytes() if meta is not None else None)


def build(backend: TeeBackend, host: str = "127.0.0.1", port: int = 0,
          memory_budget: int | None = None, spill_dir: str | None = None
          ) -> ExecutorFlightServer:
    cert_pem, key_pem = make_ratls_identity(backend)
    key = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TypeError("RA-TLS identity must be an EC key")
    executor = Executor(backend, key, memory_budget=memory_budget, spill_dir=spill_dir)
    return ExecutorFlightServer(executor, f"grpc+tls://{host}:{port}", cert_pem, key_pem)


def announce(scheduler: str, address: str) -> None:
    """Register with a scheduler under a node key made in this process. The scheduler
    reads the RA-TLS certificate served at `address`; owners still appraise it live."""
    from teeflow.core.crypto import KeySigner, key_id
    from teeflow.net.scheduler_client import SchedulerClient

    identity = KeySigner.generate()
    for attempt in range(30):
        try:
            with SchedulerClient(scheduler, identity) as client:
                client.register_node(f"executor-{key_id(identity.public_key())}")
                client.register_executor(address)
            log.info("registered with scheduler %s as %s", scheduler, address)
            return
        except TeeflowError as exc:
            log.warning("registration with %s failed (%s); retrying", scheduler, exc)
            threading.Event().wait(min(2.0, 0.2 * (attempt + 1)))


def _return_freed_memory() -> None:
    """Make glibc give large freed blocks back to the system at once. By default it raises
    its mmap threshold as blocks are freed and keeps batch-sized buffers on its heap, so a
    process that streams batches through memory looks (and is) far above its budget."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: allocations above it are mmapped
    except (OSError, AttributeError):  # not glibc: nothing to tune
        log.info("allocator tuning not available")


def serve(backend: TeeBackend, host: str, port: int, port_file: str | None = None,
          scheduler: str | None = None, advertise: str | None = None,
          memory_budget: int | None = None, spill_dir: str | None = None) -> None:
    if memory_budget is not None:
        _return_freed_memory()
    server = build(backend, host, port, memory_budget, spill_dir)
    address = f"{host}:{server.port}"
    write_port_file(port_file, address)
    if scheduler:
        threading.Thread(target=announce, args=(scheduler, advertise or address),
                         daemon=True).start()
    print(f"teeflow executor ({backend.tee}) listening on grpc+tls://{address}", flush=True)
    # shutdown() waits for serve() to return, so it must not run on serve()'s thread.
    signal.signal(signal.SIGTERM,
                  lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    server.serve()
