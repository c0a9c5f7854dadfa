"""The lead of a pool task (its first member): appraise every other member, start the Dask
scheduler and this member's worker on links pinned to the roster, call every member in
(signed `pool-join`), run the computation across their parts, and conclude the task on
every member. Only the value comes back here, for the executor to seal (runner.py).

A member whose worker leaves before the end fails the task: Dask would otherwise wait
for it forever (every read is pinned to the worker that holds the part).
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from distributed import Client, Scheduler

from teeflow.attestation.policy import load_policy
from teeflow.core import wire
from teeflow.core.errors import MemberRefused, PeerError, StateError
from teeflow.executor.pool import held
from teeflow.executor.pool.cluster import pool_config, start_scheduler, start_worker
from teeflow.executor.pool.compute import run_on_pool
from teeflow.executor.pool.seat import (
    JOIN_TIMEOUT,
    Seats,
    conclude_on_worker,
    held_key,
    held_rows,
    join_message,
    parts_of,
)
from teeflow.executor.pool.tls import PinnedSecurity
from teeflow.executor.tasks import Task
from teeflow.net.executor_client import attested_connect

log = logging.getLogger("teeflow.executor")
WATCH_EVERY = 0.2  # seconds between looks at which workers are still there
LEAVE_GRACE = 5.0
JOIN_RETRY = 0.5  # seconds between asks of a member still taking its parts


class MemberLost(PeerError):
    code = "member_lost"


def run(seats: Seats, task: Task, params: dict[str, Any]
        ) -> tuple[dict[str, Any], dict[str, int]]:
    """The task's value, computed across the pool, and the rows of each dataset over every
    member (what the result says it was computed over); blocking, on the runner's thread."""
    with seats.tasks.lock:
        tables = parts_of(task)
    with tempfile.TemporaryDirectory(prefix="teeflow-pool-") as scratch:
        return asyncio.run(_lead(seats, task, params, tables, scratch))


async def _lead(seats: Seats, task: Task, params: dict[str, Any], tables: dict[str, Any],
                scratch: str) -> tuple[dict[str, Any], dict[str, int]]:
    assert task.pool_keys is not None and task.pool_addresses is not None
    me, identity = seats.me, seats.identity()
    roster = await asyncio.to_thread(seats.admit_peers, task)
    log.info("pool task %s: admitted %d members", task.spec.task_id, len(roster.members) - 1)
    security = PinnedSecurity.for_roster(identity, roster)
    keys = {k: held_key(task.digest, k) for k in task.pool_keys}
    held.hold(keys[me], tables)
    del tables
    scheduler = await start_scheduler(security, seats.links, local_directory=scratch)
    log.info("pool task %s: Dask scheduler at %s", task.spec.task_id, scheduler.address)
    worker = await start_worker(scheduler.address, security, name=me, links=seats.links,
                                local_directory=scratch)
    others = [(k, a) for k, a in zip(task.pool_keys, task.pool_addresses, strict=True)
              if k != me]
    try:
        signature = _sign(identity.key_pem, join_message(task.digest, scheduler.address))
        await asyncio.gather(*(asyncio.to_thread(_call_in, seats, task, key, address,
                                                 scheduler.address, signature)
                               for key, address in others))
        with pool_config(scratch):
            async with Client(scheduler.address, security=security,
                              asynchronous=True) as client:
                workers = _placement(scheduler, task.pool_keys)  # every join returned
                ok = False
                try:
                    value = await _watched(scheduler, workers, _counted(
                        client, workers, keys, task, params))
                    ok = True
                finally:
                    live = {k: a for k, a in workers.items() if a in scheduler.workers}
                    await _conclude(client, live, keys, me, ok)
        return value
    finally:
        held.drop(keys[me])
        end = time.monotonic() + LEAVE_GRACE
        while len(scheduler.workers) > 1 and time.monotonic() < end:
            await asyncio.sleep(0.05)
        await worker.close()
        await scheduler.close()


async def _counted(client: Client, workers: dict[str, str], keys: dict[str, str], task: Task,
                   params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, int]]:
    counts = await client.run(held_rows, keys, workers=list(workers.values()))
    value = await run_on_pool(client, workers, keys, task.spec.compute, params,
                              dict(task.schemas))
    return value, {d.name: sum(c.get(d.name, 0) for c in counts.values())
                   for d in task.spec.datasets}


def _call_in(seats: Seats, task: Task, key: str, address: str, scheduler: str,
             signature: bytes) -> None:
    """Ask a member to join, over a channel pinned to the key the pool names for it."""
    policy = load_policy(task.spec.executor_policy, "executor_policy")
    client, _ = attested_connect(address, policy, seats.verifiers)
    with client:
        if client.tls_key_hash.hex() != key:
            raise MemberRefused(key[:16], "tls_key", f"{address} attests another key than "
                                "the one the pool names")
        body = wire.canonical({"spec_digest": task.digest, "scheduler": scheduler,
                               "signature": signature.hex()})
        end = time.monotonic() + JOIN_TIMEOUT
        while True:
            try:
                client.action("pool-join", body)
                return
            except StateError:  # its last part may still be coming in
                if time.monotonic() > end:
                    raise
                time.sleep(JOIN_RETRY)


def _placement(scheduler: Scheduler, members: list[str]) -> dict[str, str]:
    """Member key -> its worker's address: exactly the pool's members, each once (every
    member's join returned once its worker had registered: one missing now has left)."""
    placement = {str(w.name): addr for addr, w in scheduler.workers.items()}
    gone = [k for k in members if k not in placement]
    if gone:
        raise MemberLost(f"pool member {gone[0][:16]} left before the task ended")
    if sorted(placement) != sorted(members):
        raise PeerError("the workers that joined are not the pool's members")
    return placement


async def _watched(scheduler: Scheduler, workers: dict[str, str], work: Any) -> Any:
    """`work`'s result, or MemberLost as soon as a member's worker leaves."""
    job = asyncio.ensure_future(work)
    try:
        while not job.done():
            gone = [k for k, a in workers.items() if a not in scheduler.workers]
            if gone:
                job.cancel()
                raise MemberLost(f"pool member {gone[0][:16]} left before the task ended")
            await asyncio.wait([job], timeout=WATCH_EVERY)
        return job.result()
    finally:
        if not job.done():
            job.cancel()


async def _conclude(client: Client, workers: dict[str, str], keys: dict[str, str], me: str,
                    ok: bool) -> None:
    """Every other member still linked ends its part (wipes it); best effort when failing:
    a member not reached fails its part when the scheduler closes under it."""
    others = [a for k, a in workers.items() if k != me]
    if not others:
        return
    try:
        await asyncio.wait_for(client.run(conclude_on_worker, keys, ok, workers=others),
                               timeout=JOIN_TIMEOUT)
    except Exception as exc:  # Dask's comm errors too
        if ok:
            raise PeerError(f"could not conclude the task on every member "
                            f"({type(exc).__name__})") from None
        log.warning("pool: members not told the task failed (%s)", type(exc).__name__)


def _sign(key_pem: bytes, message: bytes) -> bytes:
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key.sign(message, ec.ECDSA(hashes.SHA256()))
