"""TEE backends by name: the executor side (make evidence) and the provider side (verify it).

A new TEE type plugs in here; the provider and executor logic never name one.
"""

from __future__ import annotations

from typing import Any, Protocol

from teeflow.attestation.evidence import Evidence
from teeflow.attestation.policy import Verifier
from teeflow.attestation.simulated import SimulatedBackend, SimulatedVerifier
from teeflow.core.errors import ConfigError


class TeeBackend(Protocol):
    tee: str

    def evidence(self, report_data: bytes) -> Evidence:
        """Evidence from this TEE carrying the given 64 bytes of report data."""
        ...


def make_backend(name: str, **options: Any) -> TeeBackend:
    if name == "simulated":
        return SimulatedBackend(**options)
    raise ConfigError(f"tee: unknown or unsupported TEE backend {name!r} (have: simulated)")


def make_verifiers(**options: Any) -> dict[str, Verifier]:
    """Verifiers for every TEE type this build can check."""
    del options
    return {"simulated": SimulatedVerifier()}
