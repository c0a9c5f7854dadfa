"""HTTP client of the scheduler's API, shared by providers, executors, the SDK and CLI.

Every request is signed with the caller's node key (core/auth.py). Bodies are built from
the API's models (core/api.py) and answers checked against them; methods still return
plain JSON values, as their callers expect.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from typing import Any

import httpx
from pydantic import BaseModel

from teeflow.core import api, auth
from teeflow.core.crypto import Identity
from teeflow.core.errors import PeerError, Unreachable, from_code
from teeflow.core.wire import cancel_message


class _Signed(httpx.Auth):
    requires_request_body = True

    def __init__(self, identity: Identity) -> None:
        self.identity = identity

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        target = request.url.raw_path.decode("latin-1")
        request.headers.update(auth.sign_request(self.identity, request.method, target,
                                                 request.content, int(time.time())))
        yield request


class SchedulerClient:
    def __init__(self, url: str, identity: Identity, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        if not self.url.startswith(("http://", "https://")):
            self.url = "http://" + self.url
        self.identity = identity
        self._http = httpx.Client(base_url=self.url, timeout=timeout, auth=_Signed(identity))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> SchedulerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, timeout: float | None = None,
              body: BaseModel | None = None, answer: Any = None, **kw: Any) -> Any:
        """`body` is sent as its JSON; the reply is checked against the `answer` type."""
        if body is not None:
            kw["content"] = body.model_dump_json(by_alias=True).encode()
            kw["headers"] = {"content-type": "application/json"}
        try:
            if timeout is not None:
                kw["timeout"] = timeout
            resp = self._http.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise Unreachable(f"scheduler {self.url} unreachable: {exc}") from exc
        if resp.status_code >= 400:
            try:
                err = resp.json()["error"]
                code, message = str(err["code"]), str(err["message"])
            except (ValueError, KeyError, TypeError):
                raise PeerError(f"scheduler answered {resp.status_code}: {resp.text[:200]}") \
                    from None
            raise from_code("auth" if code == "unauthenticated" else code, message)
        try:
            reply = resp.json()
        except ValueError:
            raise PeerError(f"scheduler answered {method} {path} with no JSON") from None
        if answer is not None:
            api.response(answer, reply, f"scheduler {method} {path}")
        return reply

    def register_node(self, name: str) -> None:
        self._call("POST", "/v1/nodes", body=api.request(api.RegisterNode, {
            "name": name, "public_key": self.identity.public_key(),
            "enc_key": self.identity.encryption_public_key()}, "register node"),
            answer=api.NodeRegistered)

    def nodes(self) -> list[dict[str, Any]]:
        return self._call("GET", "/v1/nodes", answer=list[api.Node])

    def register_executor(self, address: str) -> dict[str, Any]:
        return self._call("POST", "/v1/executors", body=api.RegisterExecutor(address=address),
                          answer=api.ExecutorRegistered)

    def executors(self) -> list[dict[str, Any]]:
        return self._call("GET", "/v1/executors", answer=list[api.Executor])

    def add_dataset(self, owner: str, name: str, schema_b64: str, rows: int) -> dict[str, Any]:
        body = api.request(api.AddDataset, {"owner": owner, "name": name, "schema": schema_b64,
                                            "rows": rows}, "add dataset")
        return self._call("POST", "/v1/datasets", body=body, answer=api.DatasetAdded)

    def datasets(self) -> list[dict[str, Any]]:
        return self._call("GET", "/v1/datasets", answer=list[api.Dataset])

    def work(self, node: str, wait: float) -> list[dict[str, Any]]:
        return self._call("GET", f"/v1/nodes/{node}/work", params={"wait": wait},
                          timeout=wait + 30, answer=list[api.WorkItem])

    def report(self, task_id: str, dataset: str, state: str, rows: int = 0,
               error: str | None = None, attested: dict[str, Any] | None = None) -> None:
        fields: dict[str, Any] = {"state": state, "rows": rows, "error": error,
                                  "attested": attested}
        if state == "failed":  # an owner's failure stops the task at the executor too
            fields["cancel_signature"] = self.identity.sign(cancel_message(task_id)).hex()
        self._call("POST", f"/v1/tasks/{task_id}/assignments/{dataset}",
                   body=api.request(api.Report, fields, "report"), answer=api.Ok)

    def submit(self, spec: dict[str, Any], signature: str,
               executor: str | None = None) -> dict[str, Any]:
        body = api.request(api.SubmitTask, {"spec": spec, "signature": signature,
                                            "executor": executor}, "submit")
        return self._call("POST", "/v1/tasks", timeout=120, body=body, answer=api.TaskView)

    def decide(self, task_id: str, decision: str, signature: str) -> dict[str, Any]:
        body = api.request(api.Decision, {"decision": decision, "signature": signature},
                           "decision")
        return self._call("POST", f"/v1/tasks/{task_id}/decision", body=body, timeout=120,
                          answer=api.TaskView)

    def tasks(self) -> list[dict[str, Any]]:
        return self._call("GET", "/v1/tasks", answer=list[api.TaskView])

    def task(self, task_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/tasks/{task_id}", answer=api.TaskDetail)

    def cancel(self, task_id: str) -> dict[str, Any]:
        """Signed for the executor too, so the scheduler can pass it on but not forge it."""
        signature = self.identity.sign(cancel_message(task_id)).hex()
        return self._call("POST", f"/v1/tasks/{task_id}/cancel",
                          body=api.Cancel(signature=signature), answer=api.TaskView)

    def audit(self, task_id: str | None = None) -> list[dict[str, Any]]:
        return self._call("GET", "/v1/audit", params={"task": task_id} if task_id else None,
                          answer=list[api.AuditEntry])


__all__ = ["SchedulerClient"]
