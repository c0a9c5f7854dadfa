"""Shared fixtures. Servers bind port 0; every process a test starts is stopped."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

VECTORS = Path(__file__).resolve().parents[2] / "shared" / "attestation-vectors"

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")


@pytest.fixture
def vectors() -> Path:
    if not (VECTORS / "sgx_quote").exists():
        pytest.skip(f"attestation vectors not found at {VECTORS} (../shared beside the repo)")
    return VECTORS
