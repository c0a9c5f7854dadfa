"""HTTP client of the scheduler's API, shared by providers, the SDK and the CLI."""

from __future__ import annotations

from typing import Any

import httpx

from teeflow.core.errors import PeerError, TeeflowError, Unreachable, from_code


class SchedulerClient:
    def __init__(self, url: str, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        if not self.url.startswith(("http://", "https://")):
            self.url = "http://" + self.url
        self._http = httpx.Client(base_url=self.url, timeout=timeout)

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
                raise from_code(err["code"], err["message"])
            except (ValueError, KeyError, TypeError) as exc:
                if isinstance(exc, TeeflowError):
                    raise
                raise PeerError(f"scheduler answered {resp.status_code}: {resp.text[:200]}") \
                    from None
        return resp.json()

    def register_node(self, name: str, public_key: str) -> None:
        self._call("POST", "/v1/nodes", json={"name": name, "public_key": public_key})

    def add_dataset(self, owner: str, name: str, schema_b64: str, rows: int) -> dict[str, Any]:
        return self._call("POST", "/v1/datasets",
                          json={"owner": owner, "name": name, "schema": schema_b64, "rows": rows})

    def datasets(self) -> list[dict[str, Any]]:
        return self._call("GET", "/v1/datasets")

    def assignments(self, node: str, wait: float) -> list[dict[str, Any]]:
        return self._call("GET", f"/v1/nodes/{node}/assignments", params={"wait": wait},
                          timeout=wait + 30)

    def report(self, task_id: str, dataset: str, node: str, state: str, rows: int = 0,
               error: str | None = None, attested: dict[str, Any] | None = None) -> None:
        self._call("POST", f"/v1/tasks/{task_id}/assignments/{dataset}",
                   json={"node": node, "state": state, "rows": rows, "error": error,
                         "attested": attested})

    def submit(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", "/v1/tasks", json=body, timeout=120)

    def tasks(self) -> list[dict[str, Any]]:
        return self._call("GET", "/v1/tasks")

    def task(self, task_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/tasks/{task_id}")

    def cancel(self, task_id: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/tasks/{task_id}/cancel")
