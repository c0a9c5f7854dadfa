"""Where a pool member's Dask links listen and are reached (`teeflow executor --pool-host
--pool-ports`): a concrete address of the machine, ports from a range a firewall opens,
the next free one when one is taken, a named error when none is; and a pool task whose
members each bind their own address (127.0.0.x, all loopback) computes as on one."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
from collections.abc import Iterator

import pytest

from teeflow.attestation.simulated import SimulatedBackend
from teeflow.core.errors import ConfigError, StateError
from teeflow.executor.pool.cluster import start_scheduler, start_worker
from teeflow.executor.pool.identity import make_member_identity
from teeflow.executor.pool.links import Links, parse_links
from teeflow.executor.pool.tls import PinnedSecurity
from teeflow.executor.server import build
from tests.factories import Serving, run_cli
from tests.test_pool_tasks import (
    Member,
    _run,
    _single_value,
    close,
    p,  # noqa: F401  (the fixture: a pool task's parties)
)

BACKEND = SimulatedBackend()


@pytest.mark.parametrize("host,ports,named", [
    ("0.0.0.0", None, "--pool-host"),
    ("::", None, "--pool-host"),
    ("::1", None, "IPv4"),
    ("224.0.0.1", None, "--pool-host"),
    ("member-1.example", None, "--pool-host"),
    (None, "9000", None),
    (None, "9000-8999", "--pool-ports"),
    (None, "0-10", "--pool-ports"),
    (None, "9000-70000", "--pool-ports"),
    (None, "1-5000", "--pool-ports"),
    (None, "a-b", "--pool-ports"),
])
def test_pool_options_are_checked_naming_the_option(host, ports, named):
    if named is None:
        assert list(parse_links(host, ports).ports) == [9000]
        return
    with pytest.raises(ConfigError, match=re.escape(named)):
        parse_links(host, ports)


def test_defaults_are_loopback_and_any_port():
    links = parse_links(None, None)
    assert links.host == "127.0.0.1" and list(links.ports) == [0]
    assert parse_links("10.1.2.3", "7000-7002") == Links("10.1.2.3", range(7000, 7003))


def test_a_bad_pool_option_stops_the_executor_before_it_serves(tmp_path):
    port_file = tmp_path / "port"
    done = run_cli("executor", "--listen", "127.0.0.1:0", "--port-file", str(port_file),
                   "--pool-host", "0.0.0.0", timeout=60)
    assert done.returncode != 0 and "--pool-host" in done.stderr
    assert not port_file.exists()


def _free_range(host: str, n: int) -> tuple[int, list[socket.socket]]:
    """A first port p with p..p+n-1 free on `host` right now, and a socket holding p."""
    for _ in range(50):
        probe = socket.socket()
        probe.bind((host, 0))
        first = probe.getsockname()[1]
        taken = [probe]
        try:
            for port in range(first + 1, first + n):
                with socket.socket() as s:
                    s.bind((host, port))
            probe.listen()
            return first, taken
        except OSError:
            probe.close()
    raise AssertionError("no free port range on loopback")


def test_the_next_free_port_of_the_range_is_taken_and_none_is_a_named_error(tmp_path):
    m1, m2 = (make_member_identity(BACKEND) for _ in range(2))
    bundle = (m1.cert_pem + m2.cert_pem).decode()
    first, held = _free_range("127.0.0.2", 3)

    async def main() -> tuple[str, str]:
        links = Links("127.0.0.2", range(first, first + 3))
        scheduler = await start_scheduler(PinnedSecurity(m1, bundle), links,
                                          local_directory=str(tmp_path))
        try:
            worker = await start_worker(scheduler.address, PinnedSecurity(m2, bundle), "m2",
                                        links=links, local_directory=str(tmp_path))
            try:
                with pytest.raises(StateError, match=f"127.0.0.2 in {first}-{first + 2}"):
                    await start_scheduler(PinnedSecurity(m1, bundle), links,
                                          local_directory=str(tmp_path))
                return scheduler.address, worker.address
            finally:
                await worker.close()
        finally:
            await scheduler.close()

    try:
        scheduler, worker = asyncio.run(main())
    finally:
        for s in held:
            s.close()
    assert scheduler == f"tls://127.0.0.2:{first + 1}"  # first is another program's
    assert worker == f"tls://127.0.0.2:{first + 2}"


@pytest.fixture
def spread() -> Iterator[list[Member]]:
    """Two simulated executors on Flight whose Dask links bind 127.0.0.2 and 127.0.0.3."""
    members: list[Member] = []
    try:
        for host in ("127.0.0.2", "127.0.0.3"):
            server = build(BACKEND, pool_links=Links(host))
            members.append(Member(server, Serving(server)))
        yield members
    finally:
        for m in members:
            m.stop()


def test_a_pool_whose_members_bind_their_own_addresses_computes_as_one(spread, p,  # noqa: F811
                                                                      caplog):
    with caplog.at_level(logging.INFO, logger="teeflow"):
        _, body = _run(spread, p)
    close(body["result"], _single_value(p), 1e-6)
    said = [r.getMessage() for r in caplog.records if "Dask scheduler at" in r.getMessage()]
    assert said and all("tls://127.0.0.2:" in m for m in said), said

