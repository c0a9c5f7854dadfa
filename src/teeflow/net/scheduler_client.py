"""HTTP client of the scheduler's API, shared by providers, executors, the SDK and CLI.

Every request is signed with the caller's node key (core/auth.py). Bodies are built from
the API's models (core/api.py) and answers checked against them; methods still return
plain JSON values, as their callers expect.

Only HTTPS, and only to the scheduler whose certificate the node pinned at invitation:
the pin ("sha256:" + hex of the DER certificate) is given as `pin` or as the URL's
fragment (`https://host:port#sha256:...`, never sent). The certificate is read once
with no data sent, checked against the pin, and then is the only root the TLS context
trusts (no host name check: the pin says which scheduler, whatever its address).

Every answer is also checked against the transparency log (net/logview.py): the client
sends the tree size of the newest checkpoint it holds, and refuses (LogInconsistent) an
answer whose signed checkpoint does not provably extend it. `checkpoints`: the file that
keeps that checkpoint across runs (files/checkpoints.py); without it, only in memory.
"""

from __future__ import annotations

import hashlib
import ssl
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel

from teeflow.core import api, auth
from teeflow.core import checkpoint as ck
from teeflow.core.crypto import Identity
from teeflow.core.errors import AuthError, ConfigError, PeerError, Unreachable, from_code
from teeflow.core.wire import cancel_message
from teeflow.files.checkpoints import CheckpointFile
from teeflow.net.logview import LogView


class _Signed(httpx.Auth):
    requires_request_body = True

    def __init__(self, identity: Identity) -> None:
        self.identity = identity

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        target = request.url.raw_path.decode("latin-1")
        request.headers.update(auth.sign_request(self.identity, request.method, target,
                                                 request.content, int(time.time())))
        yield request


MAX_CERT_PEM = 64 * 1024


def split_pin(url: str, pin: str | None = None) -> tuple[str, str]:
    """(base URL, pin) of `https://host:port[#sha256:HEX]`; plain HTTP and a missing or
    malformed pin are refused (ConfigError)."""
    base, _, fragment = url.strip().partition("#")
    base = base.rstrip("/")
    if "://" not in base:
        base = "https://" + base
    if not base.startswith("https://"):
        raise ConfigError("scheduler URL: only https:// (plain HTTP is refused)")
    pin = (pin or fragment).strip().lower()
    digest = pin.removeprefix("sha256:")
    if not pin.startswith("sha256:") or len(digest) != 64 or \
            not all(c in "0123456789abcdef" for c in digest):
        raise ConfigError("scheduler pin: give the certificate fingerprint from your "
                          "invitation, sha256:<64 hex digits> (as URL#sha256:... or pin=)")
    return base, pin


def pinned_context(host: str, port: int, pin: str, timeout: float = 10.0) -> ssl.SSLContext:
    """A TLS context that trusts exactly the certificate with fingerprint `pin`."""
    try:
        pem = ssl.get_server_certificate((host, port), timeout=timeout)
    except (OSError, ssl.SSLError) as exc:
        raise Unreachable(f"scheduler {host}:{port} unreachable: {exc}") from exc
    if len(pem) > MAX_CERT_PEM:
        raise AuthError(f"scheduler {host}:{port} presents a certificate over {MAX_CERT_PEM} "
                        "bytes")
    got = "sha256:" + hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest()
    if got != pin:
        raise AuthError(f"scheduler {host}:{port} presents certificate {got}, not the pinned "
                        f"{pin}: not the scheduler you were invited to")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False  # the pin names the scheduler, not its address
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=pem)
    return ctx


class SchedulerClient:
    def __init__(self, url: str, identity: Identity, timeout: float = 30.0,
                 pin: str | None = None, checkpoints: Path | None = None,
                 log: LogView | None = None) -> None:
        self.url, self.pin = split_pin(url, pin)
        self.identity = identity
        self.log = log or LogView(CheckpointFile(checkpoints) if checkpoints else None)
        self._timeout = timeout
        self._client: httpx.Client | None = None

    @property
    def _http(self) -> httpx.Client:
        """Connected on first use, so a node may start before its scheduler."""
        if self._client is None:
            parsed = httpx.URL(self.url)
            host, port = parsed.host, parsed.port or 443
            self._client = httpx.Client(base_url=self.url, timeout=self._timeout,
                                        auth=_Signed(self.identity),
                                        verify=pinned_context(host, port, self.pin))
        return self._client

    @_http.setter
    def _http(self, client: httpx.Client) -> None:
        self._client = client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def __enter__(self) -> SchedulerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, timeout: float | None = None,
              body: BaseModel | None = None, answer: Any = None, observe: bool = True,
              **kw: Any) -> Any:
        """`body` is sent as its JSON; the reply's checkpoint is checked against the one
        held (unless `observe` is False: the proofs that check asks for itself), then the
        reply against the `answer` type."""
        headers = {}
        if body is not None:
            kw["content"] = body.model_dump_json(by_alias=True).encode()
            headers["content-type"] = "application/json"
        sent = self.log.snapshot()
        if sent is not None:
            headers[ck.SIZE_HEADER] = str(sent.size)
        kw["headers"] = headers
        try:
            if timeout is not None:
                kw["timeout"] = timeout
            resp = self._http.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise Unreachable(f"scheduler {self.url} unreachable: {exc}") from exc
        # a success must carry a checkpoint that checks; an error need not (a refused
        # stranger gets none) but is checked if it does
        if observe and (resp.status_code < 400 or ck.CHECKPOINT_HEADER in resp.headers):
            h = resp.headers
            self.log.observe(h.get(ck.CHECKPOINT_HEADER), h.get(ck.KEY_HEADER),
                             h.get(ck.PROOF_HEADER), sent, self._consistency_proof)
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

    def register_node(self, name: str, invite: str | None = None) -> dict[str, Any]:
        """Join with an invitation token (or as a key on the scheduler's member list);
        a node already registered under this name and key needs none."""
        return self._call("POST", "/v1/nodes", body=api.request(api.RegisterNode, {
            "name": name, "public_key": self.identity.public_key(),
            "enc_key": self.identity.encryption_public_key(), "invite": invite},
            "register node"), answer=api.NodeRegistered)

    def nodes(self) -> list[dict[str, Any]]:
        return self._call("GET", "/v1/nodes", answer=list[api.Node])

    def register_executor(self, address: str, cert_pem: str, signature: str) -> dict[str, Any]:
        """`signature`: by the executor's attested key, over `api.executor_registration`."""
        body = api.request(api.RegisterExecutor, {"address": address, "cert_pem": cert_pem,
                                                  "signature": signature}, "register executor")
        return self._call("POST", "/v1/executors", body=body, answer=api.ExecutorRegistered)

    def executors(self) -> list[dict[str, Any]]:
        return self._call("GET", "/v1/executors", answer=list[api.Executor])

    def add_dataset(self, owner: str, name: str, schema_b64: str, rows: int,
                    rules: dict[str, Any] | None = None) -> dict[str, Any]:
        fields: dict[str, Any] = {"owner": owner, "name": name, "schema": schema_b64,
                                  "rows": rows}
        if rules is not None:
            fields["rules"] = rules
        body = api.request(api.AddDataset, fields, "add dataset")
        return self._call("POST", "/v1/datasets", body=body, answer=api.DatasetAdded)

    def datasets(self) -> list[dict[str, Any]]:
        return self._call("GET", "/v1/datasets", answer=list[api.Dataset])

    def work(self, node: str, wait: float, seen: str = "") -> list[dict[str, Any]]:
        """Long poll; `seen` (api.work_digest of the last answer): wait while it still holds."""
        params: dict[str, Any] = {"wait": wait}
        if seen:
            params["seen"] = seen
        return self._call("GET", f"/v1/nodes/{node}/work", params=params,
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
               executor: str | None = None, pool: list[str] | None = None) -> dict[str, Any]:
        body = api.request(api.SubmitTask, {"spec": spec, "signature": signature,
                                            "executor": executor, "pool": pool}, "submit")
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

    # -- the transparency log ------------------------------------------------------------
    def _consistency_proof(self, old: int, new: int) -> list[bytes]:
        reply = self._call("GET", "/v1/log/consistency", params={"from": old, "to": new},
                           answer=api.LogProof, observe=False)
        return [bytes.fromhex(h) for h in reply["proof"]]

    def log_key(self) -> str:
        """The scheduler's log key, as this client holds it (first seen, then pinned)."""
        if self.log.log_key is None:
            self.checkpoint()
        if self.log.log_key is None:
            raise PeerError("scheduler sent no log key")
        return self.log.log_key

    def checkpoint(self) -> dict[str, Any]:
        """The newest checkpoint with its cosignatures (checked like every answer)."""
        return self._call("GET", "/v1/log/checkpoint", answer=api.Checkpoint)

    def inclusion(self, index: int, size: int) -> list[bytes]:
        reply = self._call("GET", "/v1/log/inclusion", params={"index": index, "size": size},
                           answer=api.LogProof)
        return [bytes.fromhex(h) for h in reply["proof"]]

    def consistency(self, old: int, new: int) -> list[bytes]:
        return self._consistency_proof(old, new)

    def log_entries(self, start: int = 1, end: int | None = None) -> list[dict[str, Any]]:
        params = {"start": start} | ({"end": end} if end is not None else {})
        return self._call("GET", "/v1/log/entries", params=params, answer=list[api.LogLeaf])

    def cosign(self, name: str, timestamp: int | None = None) -> ck.Checkpoint:
        """Cosign the checkpoint this node holds (it checked it on receipt)."""
        held = self.log.snapshot()
        if held is None:
            self.checkpoint()
            held = self.log.snapshot()
        assert held is not None
        line = ck.cosign(held, name, self.identity,
                         int(time.time()) if timestamp is None else timestamp).line()
        self._call("POST", "/v1/log/cosignatures", answer=api.Ok,
                   body=api.Cosign(size=held.size, line=line))
        return held

    def compare(self, note: str) -> ck.Checkpoint:
        """Check another party's checkpoint against this node's (a fork shows here)."""
        self.checkpoint()
        return self.log.compare(note, self._consistency_proof)


__all__ = ["SchedulerClient"]
