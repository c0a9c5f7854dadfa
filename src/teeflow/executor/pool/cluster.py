"""A Dask scheduler and workers on pinned TLS, nothing else listening.

Dask also starts an HTTP server on every scheduler and worker (dashboard, health,
Prometheus metrics, JSON state) in plaintext, outside the pinned security; the pool
serves no routes and closes that port as soon as the node is up, so each node listens
only on its tls:// address. Where: `Links`, the executor's `--pool-host` (an address of
its machine the other members reach; default 127.0.0.1) and `--pool-ports LO-HI` (for a
firewall or network policy; default any free port).
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import dask
from distributed import Scheduler, Worker
from distributed.core import Server

from teeflow.core.errors import StateError
from teeflow.executor.pool.links import Links
from teeflow.executor.pool.tls import PinnedSecurity

_Node = TypeVar("_Node", Scheduler, Worker)
LOOPBACK = Links()  # a pool on one machine: 127.0.0.1, any free port


def _free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as tornado binds
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


async def _bind(links: Links, what: str, make: Callable[[int], _Node],
                start: Callable[[_Node], Awaitable[object]]) -> _Node:
    """The first of `links.ports` that binds; StateError naming the range if none does."""
    for port in links.ports:
        if port and not _free(links.host, port):
            continue  # tried first: a bind that fails inside Dask leaks tornado's socket
        node = make(port)
        try:
            await start(node)
            return node
        except (OSError, RuntimeError) as exc:  # Dask: "failed to start" from the OSError
            if not isinstance(exc, OSError) and not isinstance(exc.__cause__, OSError):
                raise
            await node.close()  # taken (by another pool task, or another program)
    raise StateError(f"pool: no free port for the Dask {what} on {links.host} in "
                     f"{links.ports[0]}-{links.ports[-1]}")

# No plaintext routes. Dask runs the (pickled) tasks any connected client sends: only the
# admitted members can connect, and they run attested code.
_CONFIG = {
    "distributed.scheduler.http.routes": [],
    "distributed.worker.http.routes": [],
    "distributed.comm.require-encryption": True,
    # a task that reads rows is pinned to the worker holding them; no stealing either way
    "distributed.scheduler.work-stealing": False,
}


@contextmanager
def pool_config(scratch: str | None = None) -> Iterator[None]:
    """Dask's config for pool nodes; `scratch` is the member's own folder for the files
    every Dask server keeps (default: the system's temporary folder)."""
    extra = {"temporary-directory": scratch} if scratch else {}
    with dask.config.set({**_CONFIG, **extra}):
        yield


def _close_http(node: Server) -> None:
    http = getattr(node, "http_server", None)
    if http is not None:
        http.stop()


async def start_scheduler(security: PinnedSecurity, links: Links = LOOPBACK,
                          local_directory: str | None = None) -> Scheduler:
    host = links.host
    with pool_config(local_directory):
        scheduler = await _bind(links, "scheduler", lambda port: Scheduler(
            host=host, port=port, protocol="tls", security=security, dashboard=False,
            dashboard_address=f"{host}:0"), _started)
    _close_http(scheduler)
    return scheduler


async def _started(node: Server) -> None:
    await node


async def start_worker(scheduler_address: str, security: PinnedSecurity, name: str,
                       links: Links = LOOPBACK, nthreads: int = 1,
                       local_directory: str | None = None) -> Worker:
    if not scheduler_address.startswith("tls://"):
        raise ValueError("a pool worker joins only a tls:// scheduler")
    host = links.host
    with pool_config(local_directory):
        worker = await _bind(links, "worker", lambda port: Worker(
            scheduler_address, host=host, port=port, protocol="tls", security=security,
            name=name, nthreads=nthreads, dashboard=False, dashboard_address=f"{host}:0",
            local_directory=local_directory,
            memory_limit=0), _started)  # no spilling to Dask's disk: the member's budget
    _close_http(worker)
    return worker
