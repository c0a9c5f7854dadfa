"""Shared fixtures. Servers bind port 0; every process or server a test starts is stopped.

Builders that are plain functions and classes live in tests/factories.py; the fixtures
here hand out the ones with a lifetime (a running server, an app with its lifespan).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow.flight as fl
import pytest

from teeflow.attestation.simulated import SimulatedBackend
from teeflow.executor.server import build
from tests.factories import Serving

VECTORS = Path(__file__).resolve().parents[2] / "shared" / "attestation-vectors"

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")


@pytest.fixture
def vectors() -> Path:
    if not (VECTORS / "sgx_quote").exists():
        pytest.skip(f"attestation vectors not found at {VECTORS} (../shared beside the repo)")
    return VECTORS


@pytest.fixture
def serve() -> Iterator[Callable[[fl.FlightServerBase], Serving]]:
    """serve(server) runs a Flight server from a thread; each is stopped at teardown."""
    running: list[Serving] = []

    def start(server: fl.FlightServerBase) -> Serving:
        running.append(Serving(server))
        return running[-1]

    yield start
    for s in running:
        s.stop()


@pytest.fixture
def executor_server(serve) -> Serving:
    """A real simulated executor (the Flight server `teeflow executor` runs), on port 0."""
    return serve(build(SimulatedBackend()))
