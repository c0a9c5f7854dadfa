"""The executor's Flight server: decode, call `Executor`, encode. Nothing else.

TLS terminates here, inside the TEE, with a key generated in this process.
There is no do_get and no flight listing: inputs cannot be read back.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.flight as fl
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import BaseModel

from teeflow import compute
from teeflow.attestation.ratls import make_ratls_identity
from teeflow.attestation.registry import TeeBackend
from teeflow.core import wire
from teeflow.core.answers import (
    Catalog,
    CatalogEntry,
    GlobalModel,
    RoundReceipt,
    TaskStatus,
)
from teeflow.core.errors import InputError, TeeflowError
from teeflow.core.schemas import schema_from_b64
from teeflow.executor import hangup, hardening
from teeflow.executor.inputs import few_arenas
from teeflow.executor.messages import (
    CancelRequest,
    ChallengeRequest,
    CreateTask,
    FlModel,
    FlUpdate,
    PoolEvidence,
    PoolJoin,
    RegistrationRequest,
    ResultRequest,
    UploadRequest,
    Verdict,
)
from teeflow.executor.service import Executor
from teeflow.executor.tasks import PoolSeat
from teeflow.net.flight_errors import to_flight
from teeflow.net.listen import write_port_file

log = logging.getLogger("teeflow.executor")
MAX_ACTION_BODY = 1024 * 1024
REAP_EVERY = 30.0  # seconds between deadline passes


def _task_id(body: bytes) -> str:
    """A task's spec digest (its id on this executor) or, where unambiguous, its task id."""
    text = body.decode("utf-8", "replace").strip()
    if not text or len(text) > 128:
        raise InputError("action body must be a spec digest or a task id")
    return text


def _json(obj: Any) -> list[fl.Result]:
    return [fl.Result(pa.py_buffer(json.dumps(obj).encode()))]


def _raw(data: bytes) -> list[fl.Result]:
    return [fl.Result(pa.py_buffer(data))]


Handler = Callable[["ExecutorFlightServer", bytes], list[fl.Result]]


def _info(server: ExecutorFlightServer, body: bytes) -> list[fl.Result]:
    return _json({"tee": server.executor.backend.tee, "simulated": server.executor.simulated,
                  "startup": server.executor.startup})


def _answer(answer: BaseModel) -> list[fl.Result]:
    """A typed answer (core.answers), in the form its readers decode."""
    return [fl.Result(pa.py_buffer(answer.model_dump_json().encode()))]


def _catalog(server: ExecutorFlightServer, body: bytes) -> list[fl.Result]:
    return _answer(Catalog(computations=[
        CatalogEntry.model_validate(
            {**c, "isolation": hardening.isolation()} if c["name"] == "user_code" else c
        ) for c in compute.describe_all()
    ]))


def _certificate(server: ExecutorFlightServer, body: bytes) -> list[fl.Result]:
    return _raw(server.cert_pem)


def _evidence(server: ExecutorFlightServer, body: bytes) -> list[fl.Result]:
    return _raw(server.executor.evidence(body).encode())


def _challenge(server: ExecutorFlightServer, body: bytes) -> list[fl.Result]:
    req = ChallengeRequest.decode(body)
    return _raw(server.executor.challenge(req.ref, req.key, req.at, req.signature))


def _create_task(server: ExecutorFlightServer, body: bytes) -> list[fl.Result]:
    req = CreateTask.decode(body)
    server.executor.create_task(wire.TaskSpec.from_dict(req.spec), req.approvals,
                                {k: schema_from_b64(v) for k, v in req.schemas.items()},
                                req.initiator_signature, req.rules,
                                [PoolSeat(m.address, m.key) for m in req.pool] or None)
    return _json({"accepted": True})


def _run(server: ExecutorFlightServer, body: bytes) -> list[fl.Result]:
    return _json({"status": server.executor.run(_task_id(body))})


def _status(server: ExecutorFlightServer, body: bytes) -> list[fl.Result]:
    return _answer(TaskStatus.model_validate(server.executor.status(_task_id(body))))


def _result(server: ExecutorFlightServer, body: bytes) -> list[fl.Result]:
    req = ResultRequest.decode(body)
    return _raw(server.executor.take_result(req.ref, req.receiver, req.challenge,
                                            req.signature))


def _fl_model(server: ExecutorFlightServer, body: bytes) -> list[fl.Result]:
    return _answer(GlobalModel.model_validate(
        server.executor.fl_model(FlModel.decode(body).request())))


def _fl_update(server: ExecutorFlightServer, body: bytes) -> list[fl.Result]:
    req = FlUpdate.decode(body)
    return _answer(RoundReceipt.model_validate(
        server.executor.fl_update(req.request(), req.update)))


def _cancel(server: ExecutorFlightServer, body: bytes) -> list[fl.Result]:
    req = CancelRequest.decode(body)
    server.executor.cancel(req.ref, req.key, req.signature)
    return _json({"cancelled": True})


def _registration(server: ExecutorFlightServer, body: bytes) -> list[fl.Result]:
    # Signing for any address the caller names is safe: the scheduler probes that address
    # and it must present this same certificate, so a registration for another server's
    # address is refused there.
    req = RegistrationRequest.decode(body).checked()
    cert_pem, signature = server.registration(req.address, req.node_key)
    return _json({"address": req.address, "cert_pem": cert_pem, "signature": signature})


def _abort(server: ExecutorFlightServer, body: bytes) -> list[fl.Result]:
    req = Verdict.decode(body)
    return _json({"status": server.executor.abort(req.ref, req.run, req.signature)})


def _release(server: ExecutorFlightServer, body: bytes) -> list[fl.Result]:
    req = Verdict.decode(body)
    return _json({"granted": server.executor.grant_release(req.ref, req.run, req.signature)})


def _pool_evidence(server: ExecutorFlightServer, body: bytes) -> list[fl.Result]:
    req = PoolEvidence.decode(body)
    return _json(server.executor.pool_evidence(req.spec_digest, req.nonce))


def _pool_join(server: ExecutorFlightServer, body: bytes) -> list[fl.Result]:
    req = PoolJoin.decode(body)
    return _json(server.executor.pool_join(req.spec_digest, req.scheduler, req.signature))


# action name -> (what it does, its handler)
ACTIONS: dict[str, tuple[str, Handler]] = {
    "info": ("TEE type and whether it is simulated", _info),
    "catalog": ("the computations this executor runs: parameters and code digests", _catalog),
    "certificate": ("the executor's TLS certificate (PEM)", _certificate),
    "evidence": ("evidence binding the TLS key and the body's nonce", _evidence),
    "challenge": ("a single-use value for a task's owner or receiver to sign", _challenge),
    "create-task": ("register a task spec (JSON)", _create_task),
    "run": ("start the computation of a task whose inputs are all in", _run),
    "status": ("a task's status; never any data", _status),
    "result": ("the result, to the initiator only (signed challenge)", _result),
    "fl-model": ("a federated task's global model, to an owner (signed)", _fl_model),
    "fl-update": ("an owner's update for the current round (signed)", _fl_update),
    "registration": ("this executor's signed registration for an address and node key",
                     _registration),
    "cancel": ("cancel a task and wipe its inputs (initiator or owner, signed)", _cancel),
    "abort": ("end a task and wipe it (signed by the scheduler its spec names)", _abort),
    "release": ("let a done task's result out (signed by the spec's scheduler)", _release),
    "pool-evidence": ("a pool member's certificate and evidence for another member's nonce",
                      _pool_evidence),
    "pool-join": ("join the lead's Dask scheduler (signed by the pool's lead)", _pool_join),
}


class ExecutorFlightServer(fl.FlightServerBase):
    def __init__(self, executor: Executor, location: str, cert_pem: bytes, key_pem: bytes):
        super().__init__(location, tls_certificates=[fl.CertKeyPair(cert_pem, key_pem)])
        self.executor = executor
        self.cert_pem = cert_pem
        self._key_pem = key_pem

    def registration(self, address: str, node_key: str) -> tuple[str, str]:
        """(certificate, signature): this executor's proof, with its attested key, that it
        serves at `address` and is registered by `node_key` (scheduler/executors.py)."""
        from teeflow.core import api, audit

        key = serialization.load_pem_private_key(self._key_pem, password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        task_id, kind, body = api.executor_registration(address, node_key)
        return self.cert_pem.decode(), audit.sign_p256(key, audit.signed_payload(
            task_id, kind, body))

    def list_actions(self, context: fl.ServerCallContext) -> list[tuple[str, str]]:
        return [(name, about) for name, (about, _) in ACTIONS.items()]

    def do_action(self, context: fl.ServerCallContext, action: fl.Action) -> list[fl.Result]:
        body = action.body.to_pybytes() if action.body is not None else b""
        try:
            if len(body) > MAX_ACTION_BODY:
                raise InputError(f"action body larger than {MAX_ACTION_BODY} bytes")
            entry = ACTIONS.get(action.type)
            if entry is None:
                raise InputError(f"unknown action {action.type!r}")
            return entry[1](self, body)
        except TeeflowError as exc:
            raise to_flight(exc) from None

    def do_put(self, context: fl.ServerCallContext, descriptor: fl.FlightDescriptor,
               reader: fl.MetadataRecordBatchReader, writer: fl.FlightMetadataWriter) -> None:
        try:
            if descriptor.descriptor_type != fl.DescriptorType.CMD:
                raise InputError("upload descriptor must be a command")
            request = UploadRequest.decode(descriptor.command)
            peer, port = context.peer(), self.port
            stats = self.executor.receive(request, reader.schema, _messages(reader),
                                          hang_up=lambda: hangup.hang_up(peer, port))
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
          memory_budget: int | None = None, spill_dir: str | None = None,
          **options: Any) -> ExecutorFlightServer:
    """`options`: the Executor's other keyword options (state_dir, result_ttl,
    upload_idle_timeout, ...)."""
    hardening.harden()  # before the key exists: no other process may read this one's memory
    few_arenas()  # before the server's threads start
    cert_pem, key_pem = make_ratls_identity(backend)
    key = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TypeError("RA-TLS identity must be an EC key")
    executor = Executor(backend, key, memory_budget=memory_budget, spill_dir=spill_dir,
                        reap_every=REAP_EVERY, **options)
    return ExecutorFlightServer(executor, f"grpc+tls://{host}:{port}", cert_pem, key_pem)


def announce(scheduler: str, address: str, server: ExecutorFlightServer,
             invite: str | None = None) -> None:
    """Register with a scheduler (a pinned https URL) under a node key made in this
    process, joining with the operator's invitation (role executor_host). The
    registration is signed with the attested key for `address`, which the scheduler then
    probes; owners still appraise the executor live. This is the executor's only contact
    with the scheduler: its client checks the log's checkpoints like every node's, in
    memory (the executor keeps no state of the log; its entries reach the log through
    the scheduler's polling and are checked by the parties)."""
    from teeflow.core.crypto import KeySigner, key_id
    from teeflow.net.retry import patiently
    from teeflow.net.scheduler_client import SchedulerClient

    identity = KeySigner.generate()
    cert_pem, signature = server.registration(address, identity.public_key())

    def register() -> None:
        with SchedulerClient(scheduler, identity) as client:
            client.register_node(f"executor-{key_id(identity.public_key())}", invite)
            client.register_executor(address, cert_pem, signature)

    try:  # a scheduler that is down is waited for (with backoff), as long as it takes
        patiently(register, f"registration with {scheduler}", log)
    except TeeflowError as exc:  # it answered and refused: say why, keep serving
        log.error("registration with %s refused: %s", scheduler, exc)
        return
    log.info("registered with scheduler %s as %s", scheduler, address)


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
          memory_budget: int | None = None, spill_dir: str | None = None,
          invite: str | None = None, **options: Any) -> None:
    if memory_budget is not None:
        _return_freed_memory()
    server = build(backend, host, port, memory_budget, spill_dir, **options)
    address = f"{host}:{server.port}"
    write_port_file(port_file, address)
    if scheduler:
        threading.Thread(target=announce, args=(scheduler, advertise or address, server,
                                                invite), daemon=True).start()
    print(f"teeflow executor ({backend.tee}) listening on grpc+tls://{address}", flush=True)
    # shutdown() waits for serve() to return, so it must not run on serve()'s thread.
    signal.signal(signal.SIGTERM,
                  lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    try:
        server.serve()
    finally:
        server.executor.close()
