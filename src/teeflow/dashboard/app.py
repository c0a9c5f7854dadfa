"""The dashboard's web app: pages over the CLI's own client, acting with this party's key.

Any page the user visits elsewhere could try to drive it (CSRF, DNS rebinding), so:
every request must carry the per-start token (given once in the printed URL, then an
HttpOnly SameSite=Strict cookie); every POST carries the page's CSRF token; the Host
header must be the bound loopback address; no CORS header is ever sent.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import threading
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from teeflow.cli.common import kv, metrics_lines, signer_label, signer_names
from teeflow.cli.initiator import columns_of, policy_summary, rules_summary, spec_lines
from teeflow.core import audit, wire
from teeflow.core.errors import InputError, TeeflowError
from teeflow.dashboard import facts
from teeflow.dashboard.html import LIVE_JS, Markup, fmt, join, lines, link, page, table
from teeflow.sdk import Client
from teeflow.sdk.results import Result

COOKIE = "teeflow_dashboard"
MAX_FORM = 64 * 1024
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; connect-src 'self'; "
                               "style-src 'unsafe-inline'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff",
    # not no-referrer: under it a browser's form POST says `Origin: null`
    "Referrer-Policy": "same-origin", "Cache-Control": "no-store",
}


def refused(status: int, why: str) -> Response:
    return Response(why + "\n", status_code=status, media_type="text/plain", headers=HEADERS)


def create_app(client: Client, host: str, token: str | None = None) -> FastAPI:
    """The app for `client`, answering only requests whose Host is `host` (HOST:PORT)."""
    token = token or secrets.token_urlsafe(32)
    csrf = secrets.token_urlsafe(32)
    lock = threading.Lock()  # one client, one request at a time
    results: dict[str, Result] = {}
    me = audit.ed25519_signer(client.identity.public_key())
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    app.state.token, app.state.csrf = token, csrf
    # cookies are not kept apart by port: each dashboard on this host has its own name
    cookie = f"{COOKIE}_{host.rsplit(':', 1)[-1]}"

    @app.middleware("http")
    async def guard(request: Request,
                    call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        if request.headers.get("host", "") != host:
            return refused(421, "wrong Host header (only the bound loopback address)")
        given = request.query_params.get("token")
        if given is not None and hmac.compare_digest(given, token):
            back = RedirectResponse(request.url.path, status_code=303, headers=HEADERS)
            back.set_cookie(cookie, token, httponly=True, samesite="strict", path="/")
            return back
        if not hmac.compare_digest(request.cookies.get(cookie, ""), token):
            return refused(403, "open the URL `teeflow dashboard` printed (with its token)")
        if request.method not in ("GET", "HEAD", "POST"):
            return refused(405, "method not allowed")
        if request.method == "POST":
            origin = request.headers.get("origin")
            if origin is not None and origin != f"http://{host}":
                return refused(403, "cross-origin POST refused")
            body = await request.body()
            if len(body) > MAX_FORM:
                return refused(413, "form too large")
            form = {k: v[-1] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}
            if not hmac.compare_digest(form.get("csrf", ""), csrf):
                return refused(403, "missing or wrong CSRF token (reload the page)")
            request.state.form = form
        response = await call_next(request)
        response.headers.update(HEADERS)
        return response

    @app.exception_handler(TeeflowError)
    async def failed(request: Request, exc: TeeflowError) -> HTMLResponse:
        body = fmt('<p class="bad">{}: {}</p>', type(exc).__name__, str(exc))
        return HTMLResponse(page("error", body, whoami()), status_code=400)

    names_cache: dict[str, str] = {}

    def whoami() -> str:
        if not names_cache:
            try:
                with lock:
                    nodes = client.scheduler.nodes()
                mine = [n["name"] for n in nodes
                        if n["public_key"] == client.identity.public_key()]
                names_cache["me"] = mine[0] if mine else "(not registered)"
            except TeeflowError:
                return ""
        return f"you: {names_cache['me']}"

    def html(title: str, body: Markup, live: str | None = None) -> HTMLResponse:
        """`live`: the version the page shows (taken before its facts were read)."""
        return HTMLResponse(page(title, body, whoami(), live))

    def form_of(request: Request) -> dict[str, str]:
        return dict(request.state.form)

    def hidden() -> Markup:
        return fmt('<input type="hidden" name="csrf" value="{}">', csrf)

    @app.get("/live.js")
    def live_js() -> Response:
        return Response(LIVE_JS, media_type="text/javascript")

    def version() -> str:
        """What a live page watches: every task's state and the log's size."""
        with lock:
            found = [(t["id"], t["state"]) for t in client.tasks()]
            held = client.scheduler.log.snapshot()
        size = held.size if held else 0
        return hashlib.sha256(json.dumps([found, size]).encode()).hexdigest()

    @app.get("/live")
    def live() -> JSONResponse:
        return JSONResponse({"version": version()})

    @app.get("/")
    def tasks() -> HTMLResponse:
        shown_at = version()  # first: a change while the page is made reloads it
        with lock:
            found = client.tasks()
        rows = [(link(f"/tasks/{t['id']}", t["id"]), t["state"], t["compute"],
                 ", ".join(t["datasets"]), t["executor"], t.get("error") or "")
                for t in found]
        return html("tasks", table(("id", "state", "compute", "datasets", "executor",
                                    "error"), rows), live=shown_at)

    def verified(task_id: str | None) -> list[audit.Entry]:
        entries = client.audit_log(task_id)
        audit.verify_entries(entries, client.scheduler.log.log_key)
        return entries

    @app.get("/tasks/{task_id}")
    def task_page(task_id: str) -> HTMLResponse:
        shown_at = version()  # first: a change while the page is made reloads it
        with lock:
            task = client.task(task_id)
            names = signer_names(client, [task])
            try:
                entries: list[audit.Entry] | None = verified(task_id)
                verdict = fmt('<p class="ok">{} log entries; each one\'s hash, log '
                              'signature and signer verified by you</p>',
                              len(entries or []))
            except TeeflowError as exc:
                entries = None
                verdict = fmt('<p class="bad">the log of this task does not verify: {}</p>',
                              str(exc))
        at = {ev["seq"]: ev.get("at") for ev in task.get("events", [])}
        parts = [fmt("<p>state (the scheduler's word): <b id=state>{}</b> &middot; "
                     "{} on {}</p>", task["state"], task["compute"], task["executor"])]
        if task.get("error"):
            parts.append(fmt('<p class="bad">error: {}</p>', task["error"]))
        parts.append(verdict)
        if entries is not None:
            waiting = facts.awaited(task, entries)
            parts.append(fmt("<p>awaiting: <span id=awaited>{}</span></p>",
                             ", ".join(waiting) or "nobody"))
            parts.append(Markup("<h2>timeline (audit log)</h2>") + table(
                ("#", "step", "signed by", "at (scheduler's clock)", "detail"),
                [(x.seq, x.kind, signer_label(x.signer, names), _when(at.get(x.seq)),
                  json.dumps(x.body)[:200]) for x in entries]))
        parts.append(Markup("<h2>uploads</h2>") + table(
            ("dataset", "node", "state", "rows"),
            [(a["dataset"], a["node"], a["state"], a["rows"]) for a in task["assignments"]]))
        if task["state"] in ("done", "released") or task_id in results:
            parts.append(link(f"/tasks/{task_id}/result", "result"))
        return html(f"task {task_id}", join(parts), live=shown_at)

    @app.get("/approvals")
    def approvals() -> HTMLResponse:
        shown_at = version()  # first: a change while the page is made reloads it
        with lock:
            waiting = facts.waiting_for_me(client.tasks(), client.audit_log(), me)
        rows = [(link(f"/approve/{t['id']}", t["id"]), t["compute"], ", ".join(t["datasets"]))
                for t in waiting]
        body = table(("task", "compute", "datasets"), rows) if rows else \
            Markup("<p>nothing waits for your approval</p>")
        return html("approvals waiting for you", body, live=shown_at)

    @app.get("/approve/{task_id}")
    def approve_page(task_id: str) -> HTMLResponse:
        with lock:
            task = client.task(task_id)
            names = signer_names(client, [task])
        # what is shown is what is signed: the digest of the spec as displayed
        shown = wire.TaskSpec.from_dict(task["spec"]).digest()
        body = join([
            lines(spec_lines(task, names)),
            fmt("<details><summary>the whole spec</summary><pre>{}</pre></details>",
                json.dumps(task["spec"], indent=2)),
            fmt('<form method="post" action="/approve/{}">{}'
                '<input type="hidden" name="digest" value="{}">'
                '<button id=approve name="decision" value="approved">approve</button>'
                '<button id=reject name="decision" value="rejected">reject</button></form>',
                task_id, hidden(), shown)])
        return html(f"approve task {task_id}?", body)

    @app.post("/approve/{task_id}")
    def decide(task_id: str, request: Request) -> RedirectResponse:
        form = form_of(request)
        decision = form.get("decision", "")
        if decision not in ("approved", "rejected") or not form.get("digest"):
            raise InputError("a decision (approved or rejected) and the digest shown")
        with lock:
            client.decide(task_id, decision, expect_digest=form["digest"])
        return RedirectResponse(f"/tasks/{task_id}", status_code=303)

    @app.get("/submit")
    def submit_page() -> HTMLResponse:
        with lock:
            found = client.datasets()
        boxes = join(fmt('<label><input type="checkbox" name="ds_{}" value="1"> {} '
                         '({})</label><br>', d["name"], d["name"], d["owner"]) for d in found)
        body = fmt('<form method="post" action="/submit">{}<p>{}</p>'
                   '<p>computation <input name="compute" id=compute value="logistic_regression">'
                   '</p><p>parameters (KEY=VALUE, one a line)<br><textarea name="params" '
                   'id=params rows=4 cols=40></textarea></p><p>executor HOST:PORT (empty: the '
                   'first your policy accepts) <input name="executor"></p>'
                   '<button id=submit>submit</button></form>', hidden(), boxes)
        return html("submit a task", body)

    @app.post("/submit")
    def submit(request: Request) -> RedirectResponse:
        form = form_of(request)
        names = [k[3:] for k in form if k.startswith("ds_")]
        if not names:
            raise InputError("name at least one dataset")
        params = kv(tuple(p.strip() for p in form.get("params", "").splitlines()
                          if p.strip()), "parameter")
        with lock:
            task = client.submit(names, form.get("executor", "").strip() or None,
                                 form.get("compute", "").strip(), params)
        return RedirectResponse(f"/tasks/{task['id']}", status_code=303)

    @app.get("/tasks/{task_id}/result")
    def result_page(task_id: str) -> HTMLResponse:
        got = results.get(task_id)
        if got is None:
            body = fmt('<form method="post" action="/tasks/{}/result">{}<p>appraise the '
                       'executor with your policy and take the result (once)</p>'
                       '<button id=take>take the result</button></form>', task_id, hidden())
            return html(f"result of {task_id}", body)
        mark = fmt('<p class="warn">SIMULATED TEE: not a hardware attestation</p>') \
            if got.simulated else Markup("")
        body = join([mark, fmt("<p>opened with your key; tee {}, computation {}</p>",
                               got.tee, got.compute),
                     lines(metrics_lines(got.value)),
                     fmt("<pre id=result>{}</pre>", json.dumps(got.value, indent=2)[:200_000])])
        return html(f"result of {task_id}", body)

    @app.post("/tasks/{task_id}/result")
    def take(task_id: str) -> RedirectResponse:
        with lock:
            if task_id not in results:
                results[task_id] = client.result(task_id)
        return RedirectResponse(f"/tasks/{task_id}/result", status_code=303)

    @app.get("/datasets")
    def datasets() -> HTMLResponse:
        with lock:
            found = client.datasets()
        rows = [(d["name"], d["owner"], f"{d['rows']:,}",
                 lines(f"{c['name']}: {c['type']}" for c in columns_of(d)),
                 lines([rules_summary(d.get("rules"))])) for d in found]
        return html("datasets", table(("name", "owner", "rows", "columns", "rules"), rows))

    @app.get("/executors")
    def executors() -> HTMLResponse:
        with lock:
            found = client.executors()
        rows = []
        for x in found:
            if x["verdict"] == "accepted":
                meas = ", ".join(f"{k}={v}" for k, v in x["measurements"].items())
                tee = x["tee"] + (" (simulated)" if x["simulated"] else "")
                rows.append((x["address"], Markup('<span class="ok">accepted</span>'), tee,
                             meas, x["tcb_status"]))
            else:
                rows.append((x["address"], Markup('<span class="bad">refused</span>'),
                             x["registered_tee"], x["reason"], ""))
        pol = client.policy.to_dict() if client.policy else None
        head = fmt("<p>appraised now by you, against your policy: {}</p>",
                   policy_summary(pol) if pol else "none given (--policy)")
        return html("executors", head + table(("address", "verdict", "tee", "measurement",
                                               "tcb status"), rows))

    @app.get("/audit")
    def audit_page() -> HTMLResponse:
        shown_at = version()  # first: a change while the page is made reloads it
        from teeflow.net.logcheck import verify_party

        with lock:
            try:
                r = verify_party(client.scheduler)
                verdict = fmt('<p class="ok" id=verdict>log OK: checkpoint size {} root {}.. '
                              'extends the one you held; {} entries of your tasks included, '
                              'every signature verified; cosigned by {}</p>', r["size"],
                              r["root"][:16], r["entries"], ", ".join(r["cosigners"]) or
                              "nobody yet")
            except TeeflowError as exc:
                verdict = fmt('<p class="bad" id=verdict>the log does NOT verify: {}</p>',
                              str(exc))
            entries = client.audit_log()
            names = signer_names(client, [{"spec": x.body["spec"]} for x in entries
                                          if x.kind == "submitted"
                                          and isinstance(x.body.get("spec"), dict)])
        rows = [(x.seq, link(f"/tasks/{x.task_id}", x.task_id), x.kind,
                 signer_label(x.signer, names), json.dumps(x.body)[:160]) for x in entries]
        return html("audit log", verdict + table(("#", "task", "step", "signed by",
                                                  "detail"), rows), live=shown_at)

    return app


def _when(at: Any) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(at)) if at else ""
