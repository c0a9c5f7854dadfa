"""A Dask scheduler and workers on pinned TLS, nothing else listening.

Dask also starts an HTTP server on every scheduler and worker (dashboard, health,
Prometheus metrics, JSON state) in plaintext, outside the pinned security; the pool
serves no routes and closes that port as soon as the node is up, so each node listens
only on its tls:// address. Addresses bind 127.0.0.1 (loopback pools) and port 0.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import dask
from distributed import Scheduler, Worker
from distributed.core import Server

from teeflow.executor.pool.tls import PinnedSecurity

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


async def start_scheduler(security: PinnedSecurity, host: str = "127.0.0.1",
                          local_directory: str | None = None) -> Scheduler:
    with pool_config(local_directory):
        scheduler = Scheduler(host=host, port=0, protocol="tls", security=security,
                              dashboard=False, dashboard_address=f"{host}:0")
        await scheduler
    _close_http(scheduler)
    return scheduler


async def start_worker(scheduler_address: str, security: PinnedSecurity, name: str,
                       host: str = "127.0.0.1", nthreads: int = 1,
                       local_directory: str | None = None) -> Worker:
    if not scheduler_address.startswith("tls://"):
        raise ValueError("a pool worker joins only a tls:// scheduler")
    with pool_config(local_directory):
        worker = Worker(scheduler_address, host=host, port=0, protocol="tls",
                        security=security, name=name, nthreads=nthreads,
                        dashboard=False, dashboard_address=f"{host}:0",
                        local_directory=local_directory,
                        memory_limit=0)  # no spilling to Dask's disk: the member's budget
        await worker
    _close_http(worker)
    return worker
