"""TEE backends by name: the executor side (make evidence) and the provider side (verify it).

A new TEE type plugs in here; the provider and executor logic never name one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from teeflow.attestation.collateral import BundleCollateral, CachedPcsCollateral, CollateralSource
from teeflow.attestation.dcap import DcapVerifier
from teeflow.attestation.evidence import Evidence
from teeflow.attestation.policy import Verifier
from teeflow.attestation.simulated import SimulatedBackend, SimulatedVerifier
from teeflow.core.errors import ConfigError
from teeflow.files import read_capped

BACKENDS = ("simulated", "sgx", "tdx", "sev-snp")


class TeeBackend(Protocol):
    tee: str

    def evidence(self, report_data: bytes) -> Evidence:
        """Evidence from this TEE carrying the given 64 bytes of report data."""
        ...


def make_backend(name: str, **options: Any) -> TeeBackend:
    """The executor's evidence source. Options: `debug` (simulated), `attestation_dir`
    (sgx: Gramine's /dev/attestation), `tsm_root` (tdx, sev-snp: configfs-tsm)."""
    if name == "simulated":
        return SimulatedBackend(**options)
    if name == "sgx":
        from teeflow.attestation.gramine_sgx import GramineSgxBackend

        return GramineSgxBackend(options.get("attestation_dir") or "/dev/attestation")
    if name in ("tdx", "sev-snp"):
        from teeflow.attestation.configfs_tsm import TsmBackend

        return TsmBackend(name, options.get("tsm_root") or "/sys/kernel/config/tsm/report")
    raise ConfigError(f"tee: unknown TEE backend {name!r} (have: {', '.join(BACKENDS)})")


def collateral_source(raw: Any, base: Path, where: str = "collateral") -> CollateralSource | None:
    """A [collateral] table: `bundle = FILE`, or `pccs_url = URL` with `cache_dir = DIR`."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table")
    for key in raw:
        if key not in ("bundle", "pccs_url", "cache_dir", "amd_ark"):
            raise ConfigError(f"{where}.{key}: unknown field")
    if "bundle" not in raw and "pccs_url" not in raw and "amd_ark" in raw:
        return None  # SEV-SNP only
    if "bundle" in raw:
        if "pccs_url" in raw:
            raise ConfigError(f"{where}: give bundle or pccs_url, not both")
        path = Path(str(raw["bundle"])).expanduser()
        return BundleCollateral(path if path.is_absolute() else base / path)
    if "pccs_url" in raw:
        url = raw["pccs_url"]
        if not isinstance(url, str) or not url.startswith(("https://", "http://")):
            raise ConfigError(f"{where}.pccs_url: an http(s) URL")
        cache = Path(str(raw.get("cache_dir", "~/.cache/teeflow/collateral"))).expanduser()
        return CachedPcsCollateral(url, cache if cache.is_absolute() else base / cache)
    raise ConfigError(f"{where}: give bundle = FILE or pccs_url = URL")


def amd_ark(raw: Any, base: Path, where: str = "collateral") -> bytes | None:
    """The AMD root key (PEM) a [collateral] table's `amd_ark = FILE` names, if any."""
    if not isinstance(raw, dict) or "amd_ark" not in raw:
        return None
    path = Path(str(raw["amd_ark"])).expanduser()
    path = path if path.is_absolute() else base / path
    return read_capped(path, 64 * 1024, f"{where}.amd_ark:")


def make_verifiers(collateral: CollateralSource | None = None,
                   amd_root: bytes | None = None) -> dict[str, Verifier]:
    """Verifiers for every TEE type this node can check.

    SGX and TDX need Intel collateral, SEV-SNP a trusted AMD root key; without
    them those verifiers are absent and appraisal refuses such evidence, naming
    the missing verifier.
    """
    verifiers: dict[str, Verifier] = {"simulated": SimulatedVerifier()}
    if collateral is not None:
        verifiers["sgx"] = DcapVerifier("sgx", collateral)
        verifiers["tdx"] = DcapVerifier("tdx", collateral)
    if amd_root is not None:
        from teeflow.attestation.sevsnp import SevSnpVerifier

        verifiers["sev-snp"] = SevSnpVerifier(amd_root)
    return verifiers
