"""The scheduler's HTTP JSON API: decode, call `Scheduler` / `Store`, encode."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from teeflow.core.crypto import check_public_key
from teeflow.core.datasets import schema_fingerprint, schema_from_b64
from teeflow.core.errors import (
    AuthError,
    InputError,
    PeerError,
    StateError,
    TeeflowError,
    UnknownDataset,
    UnknownTask,
)
from teeflow.scheduler.service import Scheduler
from teeflow.scheduler.store import Store

log = logging.getLogger("teeflow.scheduler")
MAX_BODY = 1024 * 1024
MAX_WAIT = 60.0
TICK = 0.5


def _status(exc: TeeflowError) -> int:
    if isinstance(exc, (UnknownDataset, UnknownTask)):
        return 404
    if isinstance(exc, AuthError):
        return 401 if "not registered" in str(exc) else 409
    if isinstance(exc, StateError):
        return 409
    if isinstance(exc, InputError):
        return 400
    if isinstance(exc, PeerError):
        return 502
    return 500


async def _body(request: Request) -> dict[str, Any]:
    """The JSON object in the request, read only up to MAX_BODY bytes."""
    declared = request.headers.get("content-length", "0")
    if not declared.isdigit() or int(declared) > MAX_BODY:
        raise InputError(f"request body larger than {MAX_BODY} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise InputError(f"request body larger than {MAX_BODY} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        body = json.loads(raw) if raw else {}
    except (ValueError, RecursionError) as exc:
        raise InputError("request body is not JSON") from exc
    if not isinstance(body, dict):
        raise InputError("request body must be a JSON object")
    return body


def create_app(store: Store, scheduler: Scheduler | None = None, tick: float = TICK) -> FastAPI:
    sched = scheduler or Scheduler(store)

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
        return JSONResponse({"error": {"code": exc.code, "message": str(exc)}},
                            status_code=_status(exc))

    @app.get("/v1/health")
    async def health() -> dict[str, Any]:
        return {"ok": True}

    @app.post("/v1/nodes")
    async def register_node(request: Request) -> dict[str, Any]:
        body = await _body(request)
        name = str(body.get("name", ""))
        if not name or len(name) > 64:
            raise InputError("name: give a node name of 1 to 64 characters")
        try:
            key = check_public_key(str(body.get("public_key", "")))
        except AuthError as exc:
            raise InputError(f"public_key: {exc}") from exc
        store.register_node(name, key)
        return {"name": name}

    @app.get("/v1/nodes")
    async def list_nodes() -> list[dict[str, Any]]:
        return store.nodes()

    @app.post("/v1/datasets")
    async def add_dataset(request: Request) -> dict[str, Any]:
        body = await _body(request)
        name, owner = str(body.get("name", "")), str(body.get("owner", ""))
        if not name or len(name) > 128:
            raise InputError("name: give a dataset name of 1 to 128 characters")
        schema_b64 = str(body.get("schema", ""))
        fingerprint = schema_fingerprint(schema_from_b64(schema_b64))
        rows = body.get("rows")
        if not isinstance(rows, int) or rows < 0:
            raise InputError("rows: give the dataset's row count")
        store.add_dataset(owner, name, schema_b64, fingerprint, rows)
        return {"name": name, "fingerprint": fingerprint}

    @app.get("/v1/datasets")
    async def list_datasets() -> list[dict[str, Any]]:
        return [{k: d[k] for k in ("name", "owner", "fingerprint", "rows", "schema_b64")}
                for d in store.datasets()]

    @app.post("/v1/tasks", status_code=201)
    async def submit(request: Request) -> dict[str, Any]:
        body = await _body(request)
        task = await run_in_threadpool(sched.submit, body)
        return task.to_dict()

    @app.get("/v1/tasks")
    async def list_tasks() -> list[dict[str, Any]]:
        return [t.to_dict() for t in store.tasks()]

    @app.get("/v1/tasks/{task_id}")
    async def get_task(task_id: str) -> dict[str, Any]:
        task = store.task(task_id)
        return {**task.to_dict(), "assignments": store.assignments(task_id),
                "events": store.events(task_id)}

    @app.post("/v1/tasks/{task_id}/cancel")
    async def cancel(task_id: str) -> dict[str, Any]:
        return (await run_in_threadpool(sched.cancel, task_id)).to_dict()

    @app.post("/v1/tasks/{task_id}/assignments/{dataset}")
    async def report(task_id: str, dataset: str, request: Request) -> dict[str, Any]:
        body = await _body(request)
        node = str(body.get("node", ""))
        await run_in_threadpool(sched.report, task_id, dataset, node, body)
        return {"ok": True}

    @app.get("/v1/nodes/{node}/assignments")
    async def assignments(node: str, wait: float = 0.0) -> list[dict[str, Any]]:
        """Long poll: answers as soon as the node has work, or after `wait` seconds."""
        store.node_key(node)
        if not math.isfinite(wait):
            raise InputError("wait: a number of seconds")
        deadline = asyncio.get_running_loop().time() + min(max(wait, 0.0), MAX_WAIT)
        while True:
            work = store.pending_for(node)
            if work or asyncio.get_running_loop().time() >= deadline:
                return work
            await asyncio.sleep(0.1)

    return app
