"""The scheduler's HTTP JSON API: authenticate, decode, call `Scheduler` / `Store`, encode.

Every request but /v1/health is signed by a registered node key (core/auth.py);
registration itself is signed by the key being registered, and admitted only by the
operator's invitation or key list (403 "not_invited"). Anything else gets 401 and
changes nothing. Each route names the roles it serves (`needs`, 403 "role"), and a
node sees only the tasks it is party to (service.py: `visible_*`). Served over HTTPS
only (server.py), with the certificate nodes pin. The signature is checked over the raw
body before it is decoded; then every body and answer is a model of core/api.py (the
OpenAPI schema at /openapi.json), and one that does not fit is a 400 "input" error
naming the field.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import TypeAdapter
from starlette.concurrency import run_in_threadpool

from teeflow.core import api, auth
from teeflow.core.checkpoint import SIZE_HEADER
from teeflow.core.crypto import check_encryption_key, check_public_key
from teeflow.core.errors import (
    AuthError,
    ConfigError,
    InputError,
    LogError,
    PeerError,
    RoleRefused,
    StateError,
    TeeflowError,
    UnknownDataset,
    UnknownTask,
)
from teeflow.core.rules import load_rules
from teeflow.core.schemas import schema_fingerprint, schema_from_b64
from teeflow.scheduler.executors import register_executor
from teeflow.scheduler.log import LogServer
from teeflow.scheduler.service import Scheduler
from teeflow.scheduler.store import Store

log = logging.getLogger("teeflow.scheduler")
MAX_BODY = 1024 * 1024
MAX_WAIT = 60.0
MAX_LEAVES = 1000
TICK = 0.5
CALLER = "teeflow.caller"  # scope key: the verified key of a signed request


class Unauthenticated(AuthError):
    """A request that is not signed by a registered key: always 401."""


def _status(exc: TeeflowError) -> int:
    if isinstance(exc, Unauthenticated):
        return 401
    if isinstance(exc, (UnknownDataset, UnknownTask)):
        return 404
    if isinstance(exc, AuthError):
        return 403
    if isinstance(exc, StateError):
        return 409
    if isinstance(exc, (InputError, LogError)):
        return 400
    if isinstance(exc, PeerError):
        return 502
    return 500


async def _raw(request: Request) -> bytes:
    """The request body, read only up to MAX_BODY bytes."""
    declared = request.headers.get("content-length", "0")
    if not declared.isdigit() or int(declared) > MAX_BODY:
        raise InputError(f"request body larger than {MAX_BODY} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise InputError(f"request body larger than {MAX_BODY} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _replay(raw: bytes) -> Callable[[], Coroutine[Any, Any, dict[str, Any]]]:
    """An ASGI receive that hands FastAPI the body already read (and verified)."""
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": raw, "more_body": False}

    return receive


def _caller(request: Request) -> str:
    return str(request.scope[CALLER])


Caller = Annotated[str, Depends(_caller)]
ANY_ROLE = ("owner", "initiator", "executor_host", "auditor")
# who reads the dataset catalog: initiators choose from it, owners see what they offer
# next to others', auditors read everything; an executor host has no use for it
CATALOG_READERS = ("initiator", "owner", "auditor")


def create_app(store: Store, scheduler: Scheduler | None = None, tick: float = TICK,
               clock=time.time) -> FastAPI:
    sched = scheduler or Scheduler(store)
    logs = LogServer(store)

    def needs(*roles: str) -> Any:
        """A route dependency: the caller's node holds one of `roles` (else 403 "role")."""

        def check(request: Request) -> None:
            node = store.node_by_key(_caller(request))
            held = set(node["roles"]) if node else set()
            if not held & set(roles):
                raise RoleRefused(f"{request.method} {request.url.path} is for "
                                  f"{' or '.join(roles)} members; this node is "
                                  f"{', '.join(sorted(held)) or 'none of them'}")

        return Depends(check)

    class Signed(APIRoute):
        """A route whose request must be signed by a registered key. The signature is
        checked over the raw body (capped at MAX_BODY) before FastAPI decodes it into the
        route's model; the caller's key is the `Caller` dependency."""

        registered = True

        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            decode_and_handle = super().get_route_handler()
            registered = self.registered

            async def handler(request: Request) -> Response:
                raw = await _raw(request)
                target = request.scope.get("raw_path", b"").decode("latin-1") or \
                    request.url.path
                if request.url.query:
                    target += "?" + request.url.query
                try:
                    key = auth.verify_request(request.method, target, request.headers, raw,
                                              int(clock()), store.fresh_nonce)
                except AuthError as exc:
                    raise Unauthenticated(str(exc)) from None
                if registered and store.node_by_key(key) is None:
                    raise Unauthenticated("request signed by a key that is not registered")
                if registered:  # only a verified request of a member counts as seen
                    store.mark_seen(key)
                request.scope[CALLER] = key  # for checkpoint_headers, once answered
                # every body is JSON whatever content-type it claims (as the signature
                # covers the body, not that header), so FastAPI decodes it as JSON
                headers = [(k, v) for k, v in request.scope["headers"]
                           if k.lower() != b"content-type"]
                scope = {**request.scope, CALLER: key,
                         "headers": [*headers, (b"content-type", b"application/json")]}
                return await decode_and_handle(Request(scope, _replay(raw)))

            return handler

    class SignedByNewKey(Signed):
        """Registration: signed by the key being registered."""

        registered = False

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        async def monitor() -> None:
            while True:
                await run_in_threadpool(sched.tick)
                await asyncio.sleep(tick)

        job = asyncio.create_task(monitor())
        yield
        job.cancel()

    app = FastAPI(title="teeflow scheduler", lifespan=lifespan)
    signed = APIRouter(route_class=Signed)
    joining = APIRouter(route_class=SignedByNewKey)

    @app.exception_handler(TeeflowError)
    async def teeflow_error(request: Request, exc: TeeflowError) -> JSONResponse:
        code = "unauthenticated" if isinstance(exc, Unauthenticated) else exc.code
        return JSONResponse({"error": {"code": code, "message": str(exc)}},
                            status_code=_status(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        """A body or query that does not fit its model: the 400 "input" error, naming the
        field (never echoing the value)."""
        message = "request " + api.describe(list(exc.errors()))
        return JSONResponse({"error": {"code": InputError.code, "message": message}},
                            status_code=400)

    @app.middleware("http")
    async def checkpoint_headers(request: Request, call_next: Any) -> Response:
        """Every answer to a member carries a fresh signed checkpoint (and the consistency
        proof from the size the caller holds): a node checks the log on every contact. A
        stranger's request gets none (not even the log's size)."""
        response = await call_next(request)
        key = request.scope.get(CALLER)
        if key and store.node_by_key(key) is not None:  # members only: strangers learn
            response.headers.update(logs.headers(request.headers.get(SIZE_HEADER)))
        return response

    @app.get("/v1/health")
    async def health() -> api.Health:
        return api.Health(ok=True)

    @joining.post("/v1/nodes")
    async def register_node(body: api.RegisterNode, key: Caller) -> api.NodeRegistered:
        if body.public_key != key:
            raise Unauthenticated("a node registers its own key: sign with the key you register")
        try:
            check_public_key(key)
            enc_key = check_encryption_key(body.enc_key)
        except AuthError as exc:
            raise InputError(str(exc)) from exc
        roles = store.register_node(body.name, key, enc_key, body.invite)
        return api.NodeRegistered.model_validate({"name": body.name, "roles": roles})

    @signed.get("/v1/nodes", dependencies=[needs(*ANY_ROLE)])
    async def list_nodes(key: Caller) -> list[api.Node]:
        return [api.Node.model_validate(n) for n in store.nodes()]

    @signed.post("/v1/executors", dependencies=[needs("executor_host")])
    async def add_executor(body: api.RegisterExecutor, key: Caller) -> api.ExecutorRegistered:
        return api.ExecutorRegistered(**await run_in_threadpool(
            register_executor, store, body.address, body.cert_pem, body.signature, key))

    @signed.get("/v1/executors", dependencies=[needs(*ANY_ROLE)])
    async def list_executors(key: Caller) -> list[api.Executor]:
        hosts = {n["public_key"]: n["name"] for n in store.nodes()}
        return [api.Executor(**{k: v for k, v in e.items() if k != "host_key"},
                             host=hosts.get(e["host_key"], "")) for e in store.executors()]

    @signed.post("/v1/datasets", dependencies=[needs("owner")])
    async def add_dataset(body: api.AddDataset, key: Caller) -> api.DatasetAdded:
        if store.node_key(body.owner) != key:
            raise AuthError(f"only node {body.owner!r} can catalog its datasets")
        fingerprint = schema_fingerprint(schema_from_b64(body.schema_))
        rules = None
        if body.rules is not None:
            try:
                rules = load_rules(body.rules, f"dataset {body.name!r}: rules")
            except ConfigError as exc:
                raise InputError(str(exc)) from None
        store.add_dataset(body.owner, body.name, body.schema_, fingerprint, body.rows, rules)
        return api.DatasetAdded(name=body.name, fingerprint=fingerprint)

    @signed.get("/v1/datasets", dependencies=[needs(*CATALOG_READERS)])
    async def list_datasets(key: Caller) -> list[api.Dataset]:
        return [api.Dataset(**{k: d[k] for k in api.Dataset.model_fields})
                for d in store.datasets()]

    @signed.post("/v1/tasks", status_code=201, dependencies=[needs("initiator")])
    async def submit(body: api.SubmitTask, key: Caller) -> api.TaskView:
        task = await run_in_threadpool(sched.submit, key, body.model_dump())
        return api.TaskView(**task.to_dict())

    @signed.get("/v1/tasks")
    async def list_tasks(key: Caller) -> list[api.TaskView]:
        return [api.TaskView(**t.to_dict()) for t in sched.visible_tasks(key)]

    @signed.get("/v1/tasks/{task_id}")
    async def get_task(task_id: str, key: Caller) -> api.TaskDetail:
        task = sched.visible_task(key, task_id)
        waiting = sched.waiting(task)
        return api.TaskDetail.model_validate({
            **task.to_dict(), "deadline": sched.deadline_of(task), "spec": task.spec,
            "assignments": store.assignments(task_id), "approvals": store.approvals(task_id),
            "events": store.events(task_id),
            "waiting": waiting.to_dict() if waiting is not None else None})

    @signed.post("/v1/tasks/{task_id}/decision", dependencies=[needs("owner")])
    async def decide(task_id: str, body: api.Decision, key: Caller) -> api.TaskView:
        sched.visible_task(key, task_id)
        task = await run_in_threadpool(sched.decide, key, task_id, body.model_dump())
        return api.TaskView(**task.to_dict())

    @signed.post("/v1/tasks/{task_id}/cancel")
    async def cancel(task_id: str, body: api.Cancel, key: Caller) -> api.TaskView:
        sched.visible_task(key, task_id)
        task = await run_in_threadpool(sched.cancel, key, task_id, body.model_dump())
        return api.TaskView(**task.to_dict())

    @signed.post("/v1/tasks/{task_id}/assignments/{dataset}", dependencies=[needs("owner")])
    async def report(task_id: str, dataset: str, body: api.Report, key: Caller) -> api.Ok:
        sched.visible_task(key, task_id)
        await run_in_threadpool(sched.report, key, task_id, dataset, body.model_dump())
        return api.Ok(ok=True)

    @signed.get("/v1/audit")
    async def audit_log(key: Caller, task: str | None = None) -> list[api.AuditEntry]:
        return [api.AuditEntry(**e.to_dict()) for e in sched.visible_audit(key, task)]

    # -- the transparency log (scheduler/log.py) ------------------------------------------
    @signed.get("/v1/log/checkpoint", dependencies=[needs(*ANY_ROLE)])
    async def log_checkpoint(key: Caller) -> api.Checkpoint:
        return api.Checkpoint(note=logs.cosigned(), log_key=logs.log_key, origin=logs.origin)

    @signed.get("/v1/log/consistency", dependencies=[needs(*ANY_ROLE)])
    async def log_consistency(key: Caller, to: int,
                              from_: Annotated[int, Query(alias="from")]) -> api.LogProof:
        proof = store.log_consistency(from_, to)
        return api.LogProof(size=to, start=from_, proof=[h.hex() for h in proof],
                            root=store.log_root(to).hex())

    @signed.get("/v1/log/inclusion", dependencies=[needs(*ANY_ROLE)])
    async def log_inclusion(key: Caller, index: int, size: int) -> api.LogProof:
        proof = store.log_inclusion(index, size)
        return api.LogProof(size=size, start=index, proof=[h.hex() for h in proof],
                            root=store.log_root(size).hex())

    @signed.get("/v1/log/entries", dependencies=[needs(*ANY_ROLE)])
    async def log_entries(key: Caller, start: int = 1,
                          end: int | None = None) -> list[api.LogLeaf]:
        """Leaves [start, end) (seq numbers, at most MAX_LEAVES): the entry itself where
        the caller may see its task, else only its leaf hash."""
        end = start + MAX_LEAVES if end is None else min(end, start + MAX_LEAVES)
        seen = {e.seq for e in sched.visible_audit(key, None)}
        return [api.LogLeaf(seq=e.seq, hash=e.hash,
                            entry=api.AuditEntry(**e.to_dict()) if e.seq in seen else None)
                for e in store.log_leaves(start, end)]

    @signed.post("/v1/log/cosignatures", dependencies=[needs(*ANY_ROLE)])
    async def log_cosign(body: api.Cosign, key: Caller) -> api.Ok:
        node = store.node_by_key(key)
        logs.cosign(body.size, body.line, key, node["name"] if node else "")
        return api.Ok(ok=True)

    @signed.get("/v1/nodes/{node}/work")
    async def work(node: str, key: Caller, wait: float = 0.0,
                   seen: str = "") -> list[api.WorkItem]:
        """Long poll: a node's approval requests and uploads, as soon as there are any the
        node does not hold yet (`seen`: api.work_digest of what it holds); the store is
        read again only after it changed (or once a second), so a node waiting costs
        next to nothing on either side."""
        if store.node_key(node) != key:
            raise AuthError(f"only node {node!r} can take its own work")
        if not math.isfinite(wait):
            raise InputError("wait: a number of seconds")
        if len(seen) > 64:
            raise InputError("seen: a SHA-256 hex digest")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(max(wait, 0.0), MAX_WAIT)
        version, read_at = -1, 0.0
        items: list[dict[str, Any]] = []
        while True:
            if store.version != version or loop.time() - read_at >= 1.0:
                version, read_at = store.version, loop.time()
                items = store.approval_requests(key) + store.pending_for(node)
                if items and api.work_digest(items) != seen:
                    break
            if loop.time() >= deadline:
                break
            await asyncio.sleep(0.1)
        return [_WORK.validate_python(i) for i in items]

    app.include_router(joining)
    app.include_router(signed)
    return app


_WORK: TypeAdapter[api.WorkItem] = TypeAdapter(api.WorkItem)
