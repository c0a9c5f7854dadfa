"""A local cluster of real processes on loopback: scheduler, executor, providers.

Used by `teeflow demo` and the end-to-end tests. Every server binds port 0 and
reports the port it got through a file; `stop()` ends every process it started.
The cluster plays the scheduler's operator too: every node joins with its own one-time
invitation (`invite`), and reaches the scheduler over HTTPS pinned to its certificate.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from teeflow.attestation.simulated import code_measurement
from teeflow.core.crypto import KeySigner
from teeflow.core.errors import PeerError
from teeflow.files.keys import load_or_create_key, save_key

START_TIMEOUT = 60.0


@dataclass
class Party:
    node: str
    dataset: str
    path: Path


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return _toml_str(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no TOML for a {type(value).__name__}")


# Never approved by a generated rule: what they show is whatever their text says, so an
# owner binds each text by digest (`bind`), or signs by hand.
FREE_TEXT = ("sql", "user_code")


def approve_toml(datasets: list[str], receivers: list[tuple[str, str]],
                 bind: dict[str, dict[str, Any]] | None = None, max_pool: int = 1) -> str:
    """Approval rules for these datasets and receivers ((sign_key, enc_key) pairs): a rule
    for each computation but sql and user_code, with each parameter that can reveal rows
    held to its default; and one rule per computation in `bind`, with those constraints
    (`[approve.params]` entries, e.g. {"query_sha256": "..."}) and the rest held to their
    defaults; each allowing pools of up to `max_pool` executors."""
    from teeflow import compute

    quote = ", ".join
    shared = (f"datasets = [{quote(_toml_str(d) for d in datasets)}]\n"
              "receivers = [" + quote(_toml_value({"sign_key": k, "enc_key": e})
                                      for k, e in receivers) + "]\n"
              + (f"max_pool = {int(max_pool)}\n" if max_pool > 1 else ""))

    def rule(names: list[str], params: dict[str, Any]) -> str:
        revealing = dict.fromkeys(r for n in names for r in compute.get(n).revealing)
        if not revealing and not params:
            return ("\n[[approve]]\n"
                    f"compute = [{quote(_toml_str(n) for n in names)}]\n" + shared)
        given = {k.removesuffix("_sha256") for k in params}
        table = {**{r: {"default": True} for r in revealing if r not in given}, **params}
        return ("\n[[approve]]\n"
                f"compute = [{quote(_toml_str(n) for n in names)}]\n" + shared
                + "\n[approve.params]\n"
                + "".join(f"{k} = {_toml_value(v)}\n" for k, v in table.items()))

    # one rule per computation: a constraint binds that name in every computation it lists
    generic = [n for n in compute.names() if n not in FREE_TEXT and n not in (bind or {})]
    return "".join(rule([n], {}) for n in generic) + "".join(
        rule([n], b) for n, b in (bind or {}).items())


def policy_toml(measurement: str, *, allow_simulated: bool = True) -> str:
    return (
        "[policy]\n"
        'tee_types = ["simulated"]\n'
        f"allow_simulated = {'true' if allow_simulated else 'false'}\n"
        "allow_debug = false\n\n"
        "[policy.simulated]\n"
        f"measurement = [{_toml_str(measurement)}]\n"
    )


@dataclass
class LocalCluster:
    workdir: Path
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    scheduler_url: str = ""
    executor_address: str = ""
    initiator_name: str = "initiator"

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "logs").mkdir(exist_ok=True)
        self.initiator_key = self.workdir / "initiator.key"
        self.initiator = load_or_create_key(self.initiator_key)

    # -- processes ---------------------------------------------------------
    def _spawn(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.workdir / "logs" / f"{name}.log", "ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "GRPC_VERBOSITY": "ERROR"}
        proc = subprocess.Popen([sys.executable, "-m", "teeflow.cli.main", *args],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)
        log.close()
        self.processes[name] = proc
        return proc

    def _wait_port(self, name: str, port_file: Path) -> str:
        deadline = time.monotonic() + START_TIMEOUT
        proc = self.processes[name]
        while time.monotonic() < deadline:
            if port_file.exists():
                return port_file.read_text().strip()
            if proc.poll() is not None:
                raise PeerError(f"{name} exited with {proc.returncode}; see "
                                f"{self.workdir / 'logs' / (name + '.log')}")
            time.sleep(0.05)
        raise PeerError(f"{name} did not start within {START_TIMEOUT:.0f}s")

    def start_scheduler(self, db_name: str = "scheduler.sqlite", *extra: str) -> str:
        """The scheduler's pinned URL, https://HOST:PORT#sha256:..., as an invitation
        gives it."""
        from teeflow.scheduler.identity import load_or_create

        port_file = self.workdir / "scheduler.port"
        port_file.unlink(missing_ok=True)
        self.db = self.workdir / db_name
        load_or_create(self.workdir)  # the operator's: before the process, so no race
        self._spawn("scheduler", "scheduler", "--db", str(self.db), "--data-dir",
                    str(self.workdir), "--listen", "127.0.0.1:0", "--port-file",
                    str(port_file), *extra)
        address = self._wait_port("scheduler", port_file)
        self.fingerprint = load_or_create(self.workdir).fingerprint
        self.scheduler_url = f"https://{address}#{self.fingerprint}"
        self.scheduler_address = address
        self.join_initiator()
        return self.scheduler_url

    def invite(self, *roles: str, name: str | None = None) -> str:
        """A one-time invitation, as `teeflow scheduler invite` makes it."""
        from teeflow.scheduler.store import Store

        store = Store(self.db)
        try:
            return store.invite(roles, name)
        finally:
            store.close()

    def join_initiator(self) -> None:
        """Register the initiator by its invitation; once joined it needs none again."""
        from teeflow.net.scheduler_client import SchedulerClient

        with SchedulerClient(self.scheduler_url, self.initiator) as client:
            client.register_node(self.initiator_name,
                                 self.invite("initiator", name=self.initiator_name))

    def start_executor(self, *extra: str, name: str = "executor",
                       register: bool = True, listen: str = "127.0.0.1:0") -> str:
        """`register=False`: the executor does not announce itself (as the Gramine one,
        whose argv is fixed); register it with `teeflow register-executor`. `listen`: an
        address of its own, to restart one where it was."""
        port_file = self.workdir / f"{name}.port"
        port_file.unlink(missing_ok=True)
        announce = (["--register", self.scheduler_url, "--invite",
                     self.invite("executor_host")] if register else [])
        self._spawn(name, "executor", "--tee", "simulated", "--listen", listen,
                    "--port-file", str(port_file), *announce, *extra)
        address = self._wait_port(name, port_file)
        if name == "executor":
            self.executor_address = address
        return address

    def write_provider_config(self, party: Party, policy: str | None = None,
                              approve: bool = True,
                              bind: dict[str, dict[str, Any]] | None = None,
                              dataset_toml: str = "", poll_wait: int = 5,
                              node_toml: str = "", max_pool: int = 1) -> Path:
        """The party's config; with `approve`, rules for results that go only to the
        initiator (`approve_toml`; `bind` adds per-computation constraints). `dataset_toml`:
        tables of the party's dataset, such as its `[datasets.rules]`; `node_toml`: more
        `[node]` settings; `poll_wait`: its long poll, in seconds (tests take 1);
        `max_pool`: the largest pool its rules approve (1: none)."""
        key_file = self.workdir / f"{party.node}.key"
        if not key_file.exists():
            save_key(KeySigner.generate(), key_file)
        config = self.workdir / f"{party.node}.toml"
        config.write_text(
            "[node]\n"
            f"name = {_toml_str(party.node)}\n"
            f"key_file = {_toml_str(str(key_file))}\n"
            f"scheduler = {_toml_str(self.scheduler_url)}\n"
            f"invite = {_toml_str(self.invite('owner', name=party.node))}\n"
            f"poll_wait = {int(poll_wait)}\n{node_toml}\n"
            "[[datasets]]\n"
            f"name = {_toml_str(party.dataset)}\n"
            f"path = {_toml_str(str(party.path.resolve()))}\n"
            + dataset_toml + "\n"
            + (policy or policy_toml(code_measurement()))
            + (approve_toml([party.dataset], [self.receiver], bind, max_pool)
               if approve else "")
        )
        return config

    @property
    def receiver(self) -> tuple[str, str]:
        """The initiator's (sign_key, enc_key): the receiver the generated rules accept."""
        return self.initiator.public_key(), self.initiator.encryption_public_key()

    def start_provider(self, party: Party, policy: str | None = None,
                       approve: bool = True,
                       bind: dict[str, dict[str, Any]] | None = None,
                       dataset_toml: str = "", poll_wait: int = 5,
                       max_pool: int = 1) -> subprocess.Popen:
        config = self.write_provider_config(party, policy, approve, bind, dataset_toml,
                                            poll_wait, max_pool=max_pool)
        return self._spawn(f"provider-{party.node}", "provider", "--config", str(config))

    def wait_for_datasets(self, names: list[str], timeout: float = START_TIMEOUT) -> None:
        from teeflow.net.scheduler_client import SchedulerClient

        deadline = time.monotonic() + timeout
        with SchedulerClient(self.scheduler_url, self.initiator) as client:
            while time.monotonic() < deadline:
                have = {d["name"] for d in client.datasets()}
                if set(names) <= have:
                    return
                for name, proc in self.processes.items():
                    if proc.poll() is not None:
                        raise PeerError(f"{name} exited with {proc.returncode}; see its log in "
                                        f"{self.workdir / 'logs'}")
                time.sleep(0.1)
        raise PeerError(f"datasets {names} not catalogued within {timeout:.0f}s")

    def wait_for_executor(self, address: str, timeout: float = START_TIMEOUT) -> None:
        """Until the executor has registered itself with the scheduler."""
        from teeflow.net.scheduler_client import SchedulerClient

        deadline = time.monotonic() + timeout
        with SchedulerClient(self.scheduler_url, self.initiator) as client:
            while time.monotonic() < deadline:
                if any(e["address"] == address for e in client.executors()):
                    return
                time.sleep(0.1)
        raise PeerError(f"executor {address} did not register within {timeout:.0f}s")

    def stop_process(self, name: str, sig: int = signal.SIGTERM) -> None:
        proc = self.processes.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        for name in list(self.processes):
            self.stop_process(name)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
