"""Links of an executor pool (executor/pool/): Dask over mutual TLS pinned to exactly the
admitted members' certificates.

In-process: a scheduler and workers on loopback, each probed the way an attacker would (a
raw TLS handshake with some certificate, a plaintext connection) beside a member's probe
that must succeed. End to end: three member processes started as a user does, port 0,
admit each other, form the cluster and compute a linear regression equal to the single
executor's; a stranger and a plaintext client are refused at every port; a member with a
wrong measurement or whose certificate's key is not the one its evidence binds is not
admitted, and the others say which member and why.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import dask
import numpy as np
import psutil
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from distributed import Scheduler
from distributed.comm import connect

from teeflow.attestation.simulated import SimulatedBackend, code_measurement
from teeflow.compute import linreg
from teeflow.executor.pool.cluster import start_scheduler, start_worker
from teeflow.executor.pool.identity import MemberIdentity, make_member_identity
from teeflow.executor.pool.tls import PinnedSecurity, pinned_context

ROOT = Path(__file__).resolve().parents[1]
BACKEND = SimulatedBackend()
MEMBERS = ["m1", "m2", "m3"]
FEATURES = ["a", "b", "c"]
POOL_START = 120.0  # seconds a loaded machine may take to start three members


# --- probes ------------------------------------------------------------------------------

def _host_port(address: str) -> tuple[str, int]:
    host, port = address.rsplit("://", 1)[-1].rsplit(":", 1)
    return host, int(port)


def greeted(address: str, ctx: ssl.SSLContext | None) -> bool:
    """Whether the server at `address` speaks to us: Dask greets a connection it accepted
    with its handshake message. `ctx` None probes in plaintext."""
    raw = socket.create_connection(_host_port(address), timeout=10)
    try:
        if ctx is None:
            raw.sendall(b"\x00" * 64)  # what a plaintext Dask comm would send first
            return raw.recv(1) != b""
        with ctx.wrap_socket(raw) as tls:
            return tls.recv(1) != b""
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
        return False
    finally:
        raw.close()


async def dask_connect(address: str, args: dict) -> None:
    """Open a Dask comm and do Dask's handshake; raises if the peer will not talk."""
    comm = await connect(address, timeout=5, **args)
    await comm.close()


def client_context(identity: MemberIdentity, trusted: str) -> ssl.SSLContext:
    return pinned_context(identity, trusted, ssl.Purpose.SERVER_AUTH)


def child_of(parent: MemberIdentity) -> MemberIdentity:
    """A certificate for a fresh key, signed by `parent`'s key."""
    issuer = x509.load_pem_x509_certificate(parent.cert_pem)
    parent_key = serialization.load_pem_private_key(parent.key_pem, None)
    assert isinstance(parent_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "child")]))
            .issuer_name(issuer.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
            .sign(parent_key, hashes.SHA256()))
    return MemberIdentity(cert.public_bytes(serialization.Encoding.PEM),
                          key.private_bytes(serialization.Encoding.PEM,
                                            serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))


# --- in process ------------------------------------------------------------------------

def test_only_admitted_certificates_get_through_and_plaintext_never(tmp_path):
    """A scheduler and a worker of members m1, m2 (their certificates the whole bundle);
    and a member never talks to a server that is not one of them."""
    m1, m2, stranger = (make_member_identity(BACKEND) for _ in range(3))
    bundle = (m1.cert_pem + m2.cert_pem).decode()
    everyone = bundle + stranger.cert_pem.decode()  # the prober trusts the servers

    async def main() -> dict[str, bool]:
        scheduler = await start_scheduler(PinnedSecurity(m1, bundle),
                                          local_directory=str(tmp_path))
        worker = await start_worker(scheduler.address, PinnedSecurity(m2, bundle), "m2",
                                    local_directory=str(tmp_path))
        # a stranger's scheduler, as if the (untrusted) rendezvous gave out its address
        fake = await start_scheduler(PinnedSecurity(stranger, everyone),
                                     local_directory=str(tmp_path))
        with dask.config.set({"temporary-directory": str(tmp_path)}):
            plain = Scheduler(host="127.0.0.1", port=0, dashboard_address="127.0.0.1:0")
            await plain  # a Dask scheduler as shipped, with no TLS: the probe's control
        try:
            probes = {
                "member": (scheduler.address, client_context(m2, everyone)),
                "member at worker": (worker.address, client_context(m1, everyone)),
                "stranger": (scheduler.address, client_context(stranger, everyone)),
                "stranger at worker": (worker.address, client_context(stranger, everyone)),
                "child of a member": (scheduler.address,
                                      client_context(child_of(m2), everyone)),
                "plaintext": (scheduler.address, None),
                "plaintext at worker": (worker.address, None),
                "plaintext to plain Dask": (plain.address, None),
                "member to a stranger's scheduler": (fake.address,
                                                     client_context(m2, bundle)),
                "anyone to a stranger's scheduler": (fake.address,
                                                     client_context(m2, everyone)),
            }
            seen = {name: await asyncio.to_thread(greeted, address, ctx)
                    for name, (address, ctx) in probes.items()}
            # A member refuses to speak plaintext even to a peer that would.
            args = PinnedSecurity(m1, bundle).get_connection_args("client")
            with pytest.raises(RuntimeError, match="encryption required"):
                await connect(plain.address, timeout=5, **args)
            return seen
        finally:
            await worker.close()
            await scheduler.close()
            await plain.close()
            await fake.close()

    seen = asyncio.run(main())
    assert seen == {"member": True, "member at worker": True, "stranger": False,
                    "stranger at worker": False, "child of a member": False,
                    "plaintext": False, "plaintext at worker": False,
                    "plaintext to plain Dask": True,
                    "member to a stranger's scheduler": False,
                    "anyone to a stranger's scheduler": True}


def ca_identity() -> MemberIdentity:
    """A self-signed CA=true certificate, as the executor's RA-TLS certificates are (with a
    name of its own: OpenSSL finds anchors by subject name)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"ca-{os.urandom(8).hex()}")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), True)
            .sign(key, hashes.SHA256()))
    return MemberIdentity(cert.public_bytes(serialization.Encoding.PEM),
                          key.private_bytes(serialization.Encoding.PEM,
                                            serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))


def test_why_members_must_not_be_cas(tmp_path):
    """Were a member's certificate CA=true (as the executor's RA-TLS certificates are), a
    certificate its key signed for any other key would get through the pinned link: why
    admission refuses CA=true member certificates."""
    m1, m2 = make_member_identity(BACKEND), ca_identity()
    bundle = (m1.cert_pem + m2.cert_pem).decode()

    async def main() -> bool:
        scheduler = await start_scheduler(PinnedSecurity(m1, bundle),
                                          local_directory=str(tmp_path))
        try:
            return await asyncio.to_thread(greeted, scheduler.address,
                                           client_context(child_of(m2), bundle))
        finally:
            await scheduler.close()

    assert asyncio.run(main()) is True


# --- end to end ------------------------------------------------------------------------

def _partitions(folder: Path) -> dict[str, pa.Table]:
    rng = np.random.default_rng(11)
    tables = {}
    for name, n in zip(MEMBERS, (400, 250, 350), strict=True):
        x = rng.normal(size=(n, 3)) * [1.0, 10.0, 0.1] + [0.0, 5.0, -1.0]
        y = x @ [1.5, -0.2, 4.0] + 3.0 + rng.normal(scale=0.5, size=n)
        table = pa.table({"a": x[:, 0], "b": x[:, 1], "c": x[:, 2], "y": y})
        with ipc.new_file(folder / f"{name}.arrow", table.schema) as writer:
            writer.write_table(table)
        tables[name] = table
    return tables


class Pool:
    """Member processes started as a user does; every one is killed at the end."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.rendezvous = folder / "rv"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.tables = _partitions(folder)
        policy = {"tee_types": ["simulated"], "allow_simulated": True,
                  "simulated": {"measurement": [code_measurement()]}}
        (folder / "policy.json").write_text(json.dumps(policy))

    def start(self, name: str, *extra: str, program: list[str] | None = None) -> None:
        program = program or ["-m", "teeflow.executor.pool.member"]
        args = [sys.executable, *program, "--rendezvous", str(self.rendezvous),
                "--name", name, "--members", ",".join(MEMBERS),
                "--policy", str(self.folder / "policy.json"),
                "--data", str(self.folder / f"{name}.arrow"),
                "--result", str(self.folder / "result.json"), "--timeout", str(POOL_START),
                *extra]
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        with open(self.folder / f"{name}.log", "wb") as log:
            self.procs[name] = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                                env=env, cwd=ROOT)

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text()

    def wait_exit(self, name: str) -> int:
        return self.procs[name].wait(timeout=POOL_START + 30)

    def wait_file(self, path: Path) -> bytes:
        end = time.monotonic() + POOL_START
        while not path.exists():
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            assert not dead, f"{dead} exited early:\n" + "\n".join(map(self.log, dead))
            assert time.monotonic() < end, f"no {path.name} in time"
            time.sleep(0.1)
        return path.read_bytes()

    def address(self, kind: str, name: str) -> str:
        return self.wait_file(self.rendezvous / kind / name).decode()

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Iterator[Pool]:
    """Three honest members, serving until the module's tests are done (--stay)."""
    running = Pool(tmp_path_factory.mktemp("pool"))
    try:
        for name in MEMBERS:
            running.start(name, "--stay")
        running.wait_file(running.folder / "result.json")
        yield running
    finally:
        running.stop()


@pytest.fixture
def fresh_pool(tmp_path) -> Iterator[Pool]:
    running = Pool(tmp_path)
    try:
        yield running
    finally:
        running.stop()


@pytest.mark.e2e
def test_three_members_admit_each_other_and_compute_what_one_executor_does(pool):
    result = json.loads((pool.folder / "result.json").read_text())
    single = linreg.run(list(pool.tables.items()),
                        linreg.check_params({"label": "y", "features": ",".join(FEATURES)}))
    assert result["n_samples"] == single["n_samples"] == 1000
    assert result["intercept"] == pytest.approx(single["intercept"], abs=1e-6)
    for f in FEATURES:
        assert result["coefficients"][f] == pytest.approx(single["coefficients"][f], abs=1e-6)
    for name in MEMBERS:
        assert f"pool member {name}: admitted" in pool.log(name)


@pytest.mark.e2e
def test_each_member_listens_only_on_its_tls_ports(pool):
    """Dask's plaintext HTTP servers (dashboard, metrics) are not left listening."""
    scheduler = pool.address("scheduler", "m1")
    for name in MEMBERS:
        expected = {_host_port(pool.address("worker", name))[1]}
        if name == "m1":
            expected.add(_host_port(scheduler)[1])
        listening = {c.laddr.port for c in psutil.Process(pool.procs[name].pid).net_connections()
                     if c.status == psutil.CONN_LISTEN}
        assert listening == expected, name


@pytest.mark.e2e
def test_a_stranger_is_refused_at_the_scheduler_and_every_worker(pool):
    """Its own RA-TLS certificate, with evidence that would even pass the policy: not
    admitted, so no member's TLS accepts it."""
    stranger = make_member_identity(BACKEND)
    certs = b"".join(pool.wait_file(pool.rendezvous / "cert" / n) for n in MEMBERS)
    ctx = client_context(stranger, (certs + stranger.cert_pem).decode())
    addresses = [pool.address("scheduler", "m1"),
                 *(pool.address("worker", n) for n in MEMBERS)]
    assert [greeted(a, ctx) for a in addresses] == [False] * 4

    security = PinnedSecurity(stranger, (certs + stranger.cert_pem).decode())
    for address in addresses:  # and as Dask itself would connect, to each
        with pytest.raises(OSError):
            asyncio.run(dask_connect(address, security.get_connection_args("client")))


@pytest.mark.e2e
def test_a_plaintext_client_is_refused_at_the_scheduler_and_every_worker(pool):
    addresses = [pool.address("scheduler", "m1"),
                 *(pool.address("worker", n) for n in MEMBERS)]
    assert [greeted(a, None) for a in addresses] == [False] * 4

    for address in addresses:
        with pytest.raises(OSError):
            asyncio.run(dask_connect(address.replace("tls://", "tcp://"), {}))


@pytest.mark.e2e
def test_a_member_with_a_wrong_measurement_is_not_admitted(fresh_pool):
    fresh_pool.start("m1")
    fresh_pool.start("m2")
    fresh_pool.start("m3", "--measurement", "00" * 32)
    codes = {name: fresh_pool.wait_exit(name) for name in MEMBERS}
    assert codes == {"m1": 2, "m2": 2, "m3": 2}
    for name in ("m1", "m2"):
        assert ("pool member 'm3' not admitted: measurement.measurement"
                in fresh_pool.log(name)), fresh_pool.log(name)
    assert not (fresh_pool.rendezvous / "scheduler").exists()
    assert not (fresh_pool.folder / "result.json").exists()


@pytest.mark.e2e
def test_a_member_whose_certificate_is_not_the_key_its_evidence_binds_is_not_admitted(
        fresh_pool):
    fresh_pool.start("m1")
    fresh_pool.start("m2", program=[str(ROOT / "tests" / "pool_rogue.py")])
    fresh_pool.start("m3")
    codes = {name: fresh_pool.wait_exit(name) for name in MEMBERS}
    assert codes == {"m1": 2, "m2": 2, "m3": 2}
    for name in ("m1", "m3"):
        assert "pool member 'm2' not admitted: tls_key" in fresh_pool.log(name)
    assert not (fresh_pool.rendezvous / "scheduler").exists()
