"""Registering an executor by hand: the executor's `registration` action."""

from __future__ import annotations

import json

import pyarrow.flight as fl
import pytest

from teeflow.cli.cluster import LocalCluster
from teeflow.files.keys import load_or_create_key
from tests.factories import run_cli


@pytest.fixture
def cluster(tmp_path):
    with LocalCluster(tmp_path) as c:
        c.start_scheduler()
        c.start_executor(register=False)
        yield c


def _action(address: str, body: bytes) -> list[bytes]:
    client = fl.FlightClient(f"grpc+tls://{address}", disable_server_verification=True)
    try:
        return [r.body.to_pybytes() for r in client.do_action(fl.Action("registration", body))]
    finally:
        client.close()


def test_registration_action_signs_for_the_asked_address_and_key(cluster, tmp_path):
    key = load_or_create_key(tmp_path / "host.key")
    body = json.dumps({"address": cluster.executor_address,
                       "node_key": key.public_key()}).encode()
    answer = json.loads(_action(cluster.executor_address, body)[0])
    assert answer["address"] == cluster.executor_address
    assert "BEGIN CERTIFICATE" in answer["cert_pem"]
    assert answer["signature"]


@pytest.mark.parametrize(("body", "named"), [
    (b"not json", "registration request"),
    (json.dumps({"address": "127.0.0.1:1"}).encode(), "node_key"),
    (json.dumps({"address": "127.0.0.1:1", "node_key": "AAAA"}).encode(), "node_key"),
    (json.dumps({"address": "nowhere", "node_key": "x"}).encode(), "node_key"),
    (json.dumps({"address": "nowhere",
                 "node_key": "A" * 43 + "="}).encode(), "HOST:PORT"),
    (json.dumps({"address": "127.0.0.1:1", "node_key": "A" * 43 + "=",
                 "extra": 1}).encode(), "extra"),
])
def test_malformed_registration_body_gets_a_named_error(cluster, body, named):
    with pytest.raises(fl.FlightError) as err:
        _action(cluster.executor_address, body)
    assert named in str(err.value)


def _teeflow(cluster, key, *args: str):
    return run_cli("--scheduler", cluster.scheduler_url, "--key", str(key), *args,
                   timeout=120)


def _host(cluster, tmp_path, role: str = "executor_host"):
    key = tmp_path / f"op-{role}.key"
    joined = _teeflow(cluster, key, "init", "--name", f"op-{role}", "--invite",
                      cluster.invite(role, name=f"op-{role}"))
    assert joined.returncode == 0, joined.stderr
    return key


def _listed(cluster) -> list[str]:
    from teeflow.net.scheduler_client import SchedulerClient

    with SchedulerClient(cluster.scheduler_url, cluster.initiator) as c:
        return [e["address"] for e in c.executors()]


def test_executor_registered_by_hand_is_listed(cluster, tmp_path):
    assert cluster.executor_address not in _listed(cluster)
    done = _teeflow(cluster, _host(cluster, tmp_path), "register-executor",
                    cluster.executor_address, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["address"] == cluster.executor_address
    assert cluster.executor_address in _listed(cluster)


def test_registration_for_another_servers_address_is_refused(cluster, tmp_path):
    other = cluster.start_executor(name="other", register=False)
    done = _teeflow(cluster, _host(cluster, tmp_path), "register-executor",
                    cluster.executor_address, "--advertise", other)
    assert done.returncode != 0
    assert "scheduler refused" in done.stderr + done.stdout
    assert other not in _listed(cluster)


def test_key_without_executor_host_role_is_refused(cluster, tmp_path):
    done = _teeflow(cluster, _host(cluster, tmp_path, "initiator"), "register-executor",
                    cluster.executor_address)
    assert done.returncode != 0
    assert "scheduler refused" in done.stderr + done.stdout
    assert cluster.executor_address not in _listed(cluster)


def test_unreachable_executor_is_named(cluster, tmp_path):
    done = _teeflow(cluster, _host(cluster, tmp_path), "register-executor", "127.0.0.1:1")
    assert done.returncode != 0
    assert "unreachable" in done.stderr + done.stdout
