"""One pool member: `python -m teeflow.executor.pool.member --rendezvous DIR --name m1 ...`.

The thin I/O around the pure parts: make an identity, exchange certificates, nonces and
evidence through the (untrusted) rendezvous, admit every peer, then join the Dask cluster
on links pinned to the roster. The first member named in --members runs the Dask
scheduler and, once every member's worker has joined, the computation; it writes the
result to --result (a development pool: the sealed-result path comes with the spec
wiring). Every member prints one line per step; an error is one named line and exit 2.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import click
import pyarrow as pa
import pyarrow.ipc as ipc
from distributed import Client, Scheduler

from teeflow.attestation.evidence import NONCE_LEN, Evidence
from teeflow.attestation.policy import AppraisalPolicy, load_policy
from teeflow.attestation.registry import TeeBackend, make_backend, make_verifiers
from teeflow.core.errors import (
    EvidenceFormatError,
    InputError,
    MemberRefused,
    PeerError,
    TeeflowError,
)
from teeflow.executor.pool import linreg
from teeflow.executor.pool.admission import Candidate, Roster, admit
from teeflow.executor.pool.cluster import pool_config, start_scheduler, start_worker
from teeflow.executor.pool.identity import MemberIdentity, answer_nonce, make_member_identity
from teeflow.executor.pool.rendezvous import Rendezvous
from teeflow.executor.pool.tls import PinnedSecurity
from teeflow.files import read_capped

MAX_POLICY = 64 * 1024
MAX_ADDRESS = 256
LEAVE_GRACE = 5.0


@dataclass(frozen=True)
class MemberConfig:
    rendezvous: Rendezvous
    name: str
    members: list[str]  # every member, this one included; the first runs the scheduler
    policy: AppraisalPolicy
    table: pa.Table
    features: list[str]
    label: str
    deadline: float  # time.monotonic()
    result: Path | None
    stay: bool
    work_dir: str  # the worker's scratch folder, this member's own; removed at the end

    @property
    def peers(self) -> list[str]:
        return [m for m in self.members if m != self.name]

    @property
    def leader(self) -> str:
        return self.members[0]


def say(name: str, message: str) -> None:
    print(f"pool member {name}: {message}", flush=True)


def form_roster(config: MemberConfig, backend: TeeBackend, identity: MemberIdentity) -> Roster:
    """Exchange certificates, nonces and answers; appraise every peer (admission.admit)."""
    rv, me = config.rendezvous, config.name
    rv.publish("cert", me, identity.cert_pem)
    certs = rv.wait("cert", config.peers, config.deadline)
    nonces = {peer: secrets.token_bytes(NONCE_LEN) for peer in config.peers}
    for peer, nonce in nonces.items():
        rv.publish("nonce", me, nonce, to=peer)
    asked = rv.wait("nonce", config.peers, config.deadline, to=me)
    for peer, nonce in asked.items():
        rv.publish("answer", me, answer_nonce(backend, identity, nonce).encode(), to=peer)
    answers = rv.wait("answer", config.peers, config.deadline, to=me)
    candidates = [Candidate(peer, certs[peer], nonces[peer], _evidence(peer, answers[peer]))
                  for peer in config.peers]
    return admit(me, identity.cert_pem, candidates, config.policy, make_verifiers(),
                 at=int(time.time()))


def _evidence(peer: str, body: bytes) -> Evidence:
    try:
        return Evidence.decode(body)
    except EvidenceFormatError as exc:
        raise MemberRefused(peer, "evidence_format", str(exc)) from exc


def _address(body: bytes, what: str) -> str:
    text = body.decode("ascii", "replace")
    if len(body) > MAX_ADDRESS or not text.startswith("tls://"):
        raise PeerError(f"{what} is not a tls:// address")
    return text


async def run(config: MemberConfig, backend: TeeBackend,
              identity: MemberIdentity | None = None) -> None:
    me, rv = config.name, config.rendezvous
    identity = identity or make_member_identity(backend)
    roster = await asyncio.to_thread(form_roster, config, backend, identity)
    say(me, f"admitted {', '.join(roster.names())}")
    security = PinnedSecurity.for_roster(identity, roster)
    linreg.hold_partition(me, config.table, config.features, config.label)
    scheduler = None
    if me == config.leader:
        scheduler = await start_scheduler(security, local_directory=config.work_dir)
        rv.publish("scheduler", me, scheduler.address.encode())
        say(me, f"scheduler listening on {scheduler.address}")
        address = scheduler.address
    else:
        got = await asyncio.to_thread(rv.wait, "scheduler", [config.leader], config.deadline)
        address = _address(got[config.leader], "the scheduler's address")
    worker = await start_worker(address, security, name=me, local_directory=config.work_dir)
    rv.publish("worker", me, worker.address.encode())
    say(me, f"worker listening on {worker.address}")
    try:
        if scheduler is not None:
            await _lead(config, address, security)
        else:
            await asyncio.to_thread(rv.wait, "done", [config.leader], config.deadline)
        if config.stay:
            await _until_stopped(config.deadline)
    finally:
        linreg.drop_partition(me)
        if scheduler is not None:
            await _workers_left(scheduler, config.deadline)
        await worker.close()
        if scheduler is not None:
            await scheduler.close()


async def _workers_left(scheduler: Scheduler, deadline: float) -> None:
    """The leader's scheduler stays up until the other members' workers have gone (a few
    seconds at most), so they leave cleanly instead of finding it closed under them."""
    end = min(deadline, time.monotonic() + LEAVE_GRACE)
    while len(scheduler.workers) > 1 and time.monotonic() < end:
        await asyncio.sleep(0.05)


async def _lead(config: MemberConfig, address: str, security: PinnedSecurity) -> None:
    with pool_config(config.work_dir):
        async with Client(address, security=security, asynchronous=True) as client:
            timeout = max(1.0, config.deadline - time.monotonic())
            await client.wait_for_workers(len(config.members), timeout=timeout)
            info = client.scheduler_info(n_workers=-1)["workers"]
            placement = {w["name"]: addr for addr, w in info.items()}
            if sorted(placement) != sorted(config.members):
                raise PeerError("the workers that joined are not the admitted members")
            result = await linreg.fit_on_pool(client, placement, config.features)
    if config.result is not None:
        tmp = config.result.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, sort_keys=True))
        tmp.replace(config.result)
    config.rendezvous.publish("done", config.name, b"done")
    say(config.name, f"computed {linreg.NAME} over {result['n_samples']} rows on the pool")


async def _until_stopped(deadline: float) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await asyncio.wait_for(stop.wait(), timeout=max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        pass


def load_config(rendezvous: str, name: str, members: str, policy: str, data: str,
                label: str, timeout: float, result: str | None, stay: bool,
                work_dir: str) -> MemberConfig:
    names = [m.strip() for m in members.split(",") if m.strip()]
    if name not in names:
        raise InputError(f"--members: does not name this member {name!r}")
    if len(set(names)) != len(names) or len(names) < 2:
        raise InputError("--members: at least two members, each named once")
    try:
        raw = json.loads(read_capped(Path(policy), MAX_POLICY, "--policy:"))
    except ValueError as exc:
        raise InputError("--policy: not JSON") from exc
    try:
        with ipc.open_file(data) as reader:
            table = reader.read_all()  # this member's partition, in its own memory
    except (OSError, pa.ArrowInvalid) as exc:
        raise InputError(f"--data: not an Arrow IPC file: {type(exc).__name__}") from exc
    features = [c for c in table.column_names if c != label]
    if label not in table.column_names or not features:
        raise InputError("--data: needs the label column and at least one feature")
    return MemberConfig(Rendezvous(Path(rendezvous)), name, names,
                        load_policy(raw, "--policy"), table, features, label,
                        time.monotonic() + timeout, Path(result) if result else None, stay,
                        work_dir)


@click.command()
@click.option("--rendezvous", required=True, help="Folder the members exchange messages in.")
@click.option("--name", required=True, help="This member's name.")
@click.option("--members", required=True, help="Every member's name, comma-separated; the "
              "first runs the Dask scheduler.")
@click.option("--policy", required=True, help="JSON appraisal policy every member must meet.")
@click.option("--data", required=True, help="This member's partition (Arrow IPC file).")
@click.option("--label", default="y", show_default=True)
@click.option("--tee", default="simulated", show_default=True, help="TEE backend.")
@click.option("--measurement", default=None,
              help="Simulated TEE only: the measurement to claim (default: the code's).")
@click.option("--timeout", default=120.0, show_default=True,
              help="Seconds until the member gives up (the pool fails, never hangs).")
@click.option("--result", default=None, help="Where the leader writes the result (JSON).")
@click.option("--stay", is_flag=True, help="Keep serving after the result until SIGTERM.")
def main(rendezvous: str, name: str, members: str, policy: str, data: str, label: str,
         tee: str, measurement: str | None, timeout: float, result: str | None,
         stay: bool) -> None:
    """Run one member of an executor pool."""
    logging.getLogger("distributed").setLevel(logging.WARNING)
    try:
        with tempfile.TemporaryDirectory(prefix=f"teeflow-pool-{name}-") as work_dir:
            config = load_config(rendezvous, name, members, policy, data, label, timeout,
                                 result, stay, work_dir)
            options = {"measurement": measurement} if measurement else {}
            if options and tee != "simulated":
                raise InputError("--measurement: only for the simulated TEE")
            backend = make_backend(tee, **options)
            asyncio.run(run(config, backend))
    except (TeeflowError, TimeoutError, OSError, ValueError) as exc:
        # OSError covers Dask's comm errors (CommClosedError); a peer's, not a traceback
        _fail(rendezvous, name, exc)


def _fail(rendezvous: str, name: str, exc: BaseException) -> None:
    code = getattr(exc, "code", type(exc).__name__)
    print(f"teeflow pool member {name}: error [{code}]: {exc}", file=sys.stderr, flush=True)
    try:
        Rendezvous(Path(rendezvous)).publish("failed", name, code.encode())
    except (TeeflowError, OSError):
        pass
    sys.exit(2)


if __name__ == "__main__":
    main()
