"""The scheduler's HTTP JSON API: authenticate, decode, call `Scheduler` / `Store`, encode.

Every request but /v1/health is signed by a registered node key (core/auth.py);
registration itself is signed by the key being registered. Anything else gets
401 and changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from teeflow.core import auth
from teeflow.core.crypto import check_encryption_key, check_public_key
from teeflow.core.errors import (
    AuthError,
    InputError,
    PeerError,
    StateError,
    TeeflowError,
    UnknownDataset,
    UnknownTask,
)
from teeflow.core.schemas import schema_fingerprint, schema_from_b64
from teeflow.scheduler.executors import register_executor
from teeflow.scheduler.service import Scheduler
from teeflow.scheduler.store import Store

log = logging.getLogger("teeflow.scheduler")
MAX_BODY = 1024 * 1024
MAX_WAIT = 60.0
TICK = 0.5


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
    if isinstance(exc, InputError):
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


def _json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw) if raw else {}
    except (ValueError, RecursionError) as exc:
        raise InputError("request body is not JSON") from exc
    if not isinstance(body, dict):
        raise InputError("request body must be a JSON object")
    return body


def create_app(store: Store, scheduler: Scheduler | None = None, tick: float = TICK,
               clock=time.time) -> FastAPI:
    sched = scheduler or Scheduler(store)

    async def signed(request: Request, registered: bool = True) -> tuple[str, dict[str, Any]]:
        """(caller key, JSON body) of a request signed by a (registered) key."""
        raw = await _raw(request)
        target = request.scope.get("raw_path", b"").decode("latin-1") or request.url.path
        if request.url.query:
            target += "?" + request.url.query
        try:
            key = auth.verify_request(request.method, target, request.headers, raw,
                                      int(clock()), store.fresh_nonce)
        except AuthError as exc:
            raise Unauthenticated(str(exc)) from None
        if registered and store.node_by_key(key) is None:
            raise Unauthenticated("request signed by a key that is not registered")
        return key, _json(raw)

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

    @app.exception_handler(TeeflowError)
    async def teeflow_error(request: Request, exc: TeeflowError) -> JSONResponse:
        code = "unauthenticated" if isinstance(exc, Unauthenticated) else exc.code
        return JSONResponse({"error": {"code": code, "message": str(exc)}},
                            status_code=_status(exc))

    @app.get("/v1/health")
    async def health() -> dict[str, Any]:
        return {"ok": True}

    @app.post("/v1/nodes")
    async def register_node(request: Request) -> dict[str, Any]:
        key, body = await signed(request, registered=False)
        name = str(body.get("name", ""))
        if not name or len(name) > 64:
            raise InputError("name: give a node name of 1 to 64 characters")
        if body.get("public_key") != key:
            raise Unauthenticated("a node registers its own key: sign with the key you register")
        try:
            check_public_key(key)
            enc_key = check_encryption_key(str(body.get("enc_key", "")))
        except AuthError as exc:
            raise InputError(str(exc)) from exc
        store.register_node(name, key, enc_key)
        return {"name": name}

    @app.get("/v1/nodes")
    async def list_nodes(request: Request) -> list[dict[str, Any]]:
        await signed(request)
        return store.nodes()

    @app.post("/v1/executors")
    async def add_executor(request: Request) -> dict[str, Any]:
        _, body = await signed(request)
        return await run_in_threadpool(register_executor, store, str(body.get("address", "")))

    @app.get("/v1/executors")
    async def list_executors(request: Request) -> list[dict[str, Any]]:
        await signed(request)
        return store.executors()

    @app.post("/v1/datasets")
    async def add_dataset(request: Request) -> dict[str, Any]:
        key, body = await signed(request)
        name, owner = str(body.get("name", "")), str(body.get("owner", ""))
        if not name or len(name) > 128:
            raise InputError("name: give a dataset name of 1 to 128 characters")
        if store.node_key(owner) != key:
            raise AuthError(f"only node {owner!r} can catalog its datasets")
        schema_b64 = str(body.get("schema", ""))
        fingerprint = schema_fingerprint(schema_from_b64(schema_b64))
        rows = body.get("rows")
        if not isinstance(rows, int) or rows < 0:
            raise InputError("rows: give the dataset's row count")
        store.add_dataset(owner, name, schema_b64, fingerprint, rows)
        return {"name": name, "fingerprint": fingerprint}

    @app.get("/v1/datasets")
    async def list_datasets(request: Request) -> list[dict[str, Any]]:
        await signed(request)
        return [{k: d[k] for k in ("name", "owner", "owner_key", "fingerprint", "rows",
                                   "schema_b64")} for d in store.datasets()]

    @app.post("/v1/tasks", status_code=201)
    async def submit(request: Request) -> dict[str, Any]:
        key, body = await signed(request)
        task = await run_in_threadpool(sched.submit, key, body)
        return task.to_dict()

    @app.get("/v1/tasks")
    async def list_tasks(request: Request) -> list[dict[str, Any]]:
        await signed(request)
        return [t.to_dict() for t in store.tasks()]

    @app.get("/v1/tasks/{task_id}")
    async def get_task(task_id: str, request: Request) -> dict[str, Any]:
        await signed(request)
        task = store.task(task_id)
        return {**task.to_dict(), "spec": task.spec, "assignments": store.assignments(task_id),
                "approvals": store.approvals(task_id), "events": store.events(task_id)}

    @app.post("/v1/tasks/{task_id}/decision")
    async def decide(task_id: str, request: Request) -> dict[str, Any]:
        key, body = await signed(request)
        return (await run_in_threadpool(sched.decide, key, task_id, body)).to_dict()

    @app.post("/v1/tasks/{task_id}/cancel")
    async def cancel(task_id: str, request: Request) -> dict[str, Any]:
        key, body = await signed(request)
        return (await run_in_threadpool(sched.cancel, key, task_id, body)).to_dict()

    @app.post("/v1/tasks/{task_id}/assignments/{dataset}")
    async def report(task_id: str, dataset: str, request: Request) -> dict[str, Any]:
        key, body = await signed(request)
        await run_in_threadpool(sched.report, key, task_id, dataset, body)
        return {"ok": True}

    @app.get("/v1/audit")
    async def audit_log(request: Request, task: str | None = None) -> list[dict[str, Any]]:
        await signed(request)
        return [e.to_dict() for e in store.audit_log(task)]

    @app.get("/v1/nodes/{node}/work")
    async def work(node: str, request: Request, wait: float = 0.0) -> list[dict[str, Any]]:
        """Long poll: a node's approval requests and uploads, as soon as there are any."""
        key, _ = await signed(request)
        if store.node_key(node) != key:
            raise AuthError(f"only node {node!r} can take its own work")
        if not math.isfinite(wait):
            raise InputError("wait: a number of seconds")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(max(wait, 0.0), MAX_WAIT)
        while True:
            items = store.approval_requests(key) + store.pending_for(node)
            if items or loop.time() >= deadline:
                return items
            await asyncio.sleep(0.1)

    return app
