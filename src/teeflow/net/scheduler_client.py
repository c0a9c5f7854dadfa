"""HTTP client of the scheduler's API, shared by providers, executors, the SDK and CLI.

Every request is signed with the caller's node key (core/auth.py).
"""

from __future__ import annotations

import time
from collections.abc import Generator
from typing import Any

import httpx

from teeflow.core import auth
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

    def _call(self, method: str, path: str, timeout: float | None = None, **kw: Any) -> Any:
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
        return resp.json()

    def register_node(self, name: str) -> None:
        self._call("POST", "/v1/nodes", json={
            "name": name, "public_key": self.identity.public_key(),
            "enc_key": self.identity.encryption_public_key()})

    def nodes(self) -> list[dict[str, Any]]:
        return self._call("GET", "/v1/nodes")

    def register_executor(self, address: str) -> dict[str, Any]:
        return self._call("POST", "/v1/executors", json={"address": address})

    def executors(self) -> list[dict[str, Any]]:
        return self._call("GET", "/v1/executors")

    def add_dataset(self, owner: str, name: str, schema_b64: str, rows: int) -> dict[str, Any]:
        return self._call("POST", "/v1/datasets",
                          json={"owner": owner, "name": name, "schema": schema_b64, "rows": rows})

    def datasets(self) -> list[dict[str, Any]]:
        return self._call("GET", "/v1/datasets")

    def work(self, node: str, wait: float) -> list[dict[str, Any]]:
        return self._call("GET", f"/v1/nodes/{node}/work", params={"wait": wait},
                          timeout=wait + 30)

    def report(self, task_id: str, dataset: str, state: str, rows: int = 0,
               error: str | None = None, attested: dict[str, Any] | None = None) -> None:
        body: dict[str, Any] = {"state": state, "rows": rows, "error": error,
                                "attested": attested}
        if state == "failed":  # an owner's failure stops the task at the executor too
            body["cancel_signature"] = self.identity.sign(cancel_message(task_id)).hex()
        self._call("POST", f"/v1/tasks/{task_id}/assignments/{dataset}", json=body)

    def submit(self, spec: dict[str, Any], signature: str,
               executor: str | None = None) -> dict[str, Any]:
        return self._call("POST", "/v1/tasks", timeout=120,
                          json={"spec": spec, "signature": signature, "executor": executor})

    def decide(self, task_id: str, decision: str, signature: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/tasks/{task_id}/decision",
                          json={"decision": decision, "signature": signature}, timeout=120)

    def tasks(self) -> list[dict[str, Any]]:
        return self._call("GET", "/v1/tasks")

    def task(self, task_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/tasks/{task_id}")

    def cancel(self, task_id: str) -> dict[str, Any]:
        """Signed for the executor too, so the scheduler can pass it on but not forge it."""
        signature = self.identity.sign(cancel_message(task_id)).hex()
        return self._call("POST", f"/v1/tasks/{task_id}/cancel", json={"signature": signature})

    def audit(self, task_id: str | None = None) -> list[dict[str, Any]]:
        return self._call("GET", "/v1/audit", params={"task": task_id} if task_id else None)


__all__ = ["SchedulerClient"]
