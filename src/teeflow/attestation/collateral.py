"""Where DCAP collateral comes from: a local bundle file, or a PCS/PCCS with a disk cache.

Collateral is Intel-signed data (TCB info, QE identity, CRLs and their issuer
chains) in the JSON form of `dcap_qvl.QuoteCollateralV3.to_json()`. The
verifier checks every signature in it against Intel's root, so a source needs
no trust of its own: wrong, stale or tampered collateral only makes
verification fail. Sources never read a clock; freshness is judged against
the verification time they are given.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from teeflow.core.errors import ConfigError, EvidenceFormatError, TeeflowError, VerificationError

MAX_COLLATERAL = 1024 * 1024
MAX_BUNDLE = 16 * 1024 * 1024
_FMSPC = re.compile(r"^[0-9A-Fa-f]{12}$")
_TCB_ID_TO_TEE = {"SGX": "sgx", "TDX": "tdx"}


@dataclass(frozen=True)
class CollateralRequest:
    """What a source needs to pick collateral for one quote (read from the quote, unverified)."""

    tee: str  # "sgx" or "tdx"
    fmspc: str  # 12 upper-case hex digits, from the PCK certificate in the quote
    ca: str  # "processor" or "platform": the PCK CA that issued that certificate


class CollateralSource(Protocol):
    def collateral(self, request: CollateralRequest, quote: bytes, at: int) -> bytes:
        """Collateral JSON for `quote`, meant to be valid at unix time `at`."""
        ...


@dataclass(frozen=True)
class CollateralSummary:
    tee: str
    fmspc: str
    next_update: int  # the earlier of the TCB info's and the QE identity's nextUpdate


def _timestamp(raw: Any, where: str) -> int:
    if not isinstance(raw, str):
        raise ValueError(f"{where} is not a date string")
    when = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    if when.tzinfo is None:  # Intel writes UTC ("...Z"); never fall back to local time
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp())


def summarize_collateral(raw: Any) -> CollateralSummary:
    """TEE type, FMSPC and expiry of one collateral object (a dict or its JSON bytes).

    Reads the signed TCB info and QE identity without checking signatures
    (the verifier does that); raises ValueError when the shape is wrong.
    """
    if isinstance(raw, bytes | str):
        if len(raw) > MAX_COLLATERAL:
            raise ValueError(f"collateral larger than {MAX_COLLATERAL} bytes")
        try:
            raw = json.loads(raw)
        except RecursionError as exc:
            raise ValueError("collateral JSON nests too deeply") from exc
    if not isinstance(raw, dict):
        raise ValueError("collateral is not a JSON object")
    try:
        tcb_info = json.loads(raw["tcb_info"])
        qe_identity = json.loads(raw["qe_identity"])
        tee = _TCB_ID_TO_TEE[tcb_info["id"]]
        fmspc = tcb_info["fmspc"]
        next_update = min(
            _timestamp(tcb_info["nextUpdate"], "tcb_info.nextUpdate"),
            _timestamp(qe_identity["nextUpdate"], "qe_identity.nextUpdate"),
        )
    except KeyError as exc:
        raise ValueError(f"collateral lacks field {exc} or names an unknown TCB type") from exc
    except (TypeError, RecursionError) as exc:
        raise ValueError(f"collateral TCB info or QE identity is malformed: {exc}") from exc
    if not isinstance(fmspc, str) or not _FMSPC.match(fmspc):
        raise ValueError(f"tcb_info.fmspc {fmspc!r} is not 12 hex digits")
    return CollateralSummary(tee=tee, fmspc=fmspc.upper(), next_update=next_update)


class BundleCollateral:
    """Collateral from a local JSON file, loaded once.

    The file holds either one collateral object, or a mapping from FMSPC
    (hex) to a collateral object or to {"sgx": collateral, "tdx": collateral}
    (a TDX platform has both kinds under one FMSPC).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        where = f"collateral bundle {self.path}"
        try:
            with self.path.open("rb") as f:
                data = f.read(MAX_BUNDLE + 1)
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read: {exc.strerror or exc}") from exc
        if len(data) > MAX_BUNDLE:
            raise ConfigError(f"{where}: larger than {MAX_BUNDLE} bytes")
        try:
            top = json.loads(data)
        except (ValueError, RecursionError) as exc:
            raise ConfigError(f"{where}: not JSON: {exc}") from exc
        if not isinstance(top, dict):
            raise ConfigError(f"{where}: expected a JSON object")
        entries: list[tuple[str, str | None, Any]] = []
        if "tcb_info" in top:
            entries.append((where, None, top))
        else:
            for key, value in top.items():
                if not isinstance(key, str) or not _FMSPC.match(key):
                    raise ConfigError(f"{where}: key {key!r} is not an FMSPC (12 hex digits)")
                if isinstance(value, dict) and "tcb_info" not in value:
                    for tee, sub in value.items():
                        if tee not in ("sgx", "tdx"):
                            raise ConfigError(f"{where}.{key}.{tee}: expected 'sgx' or 'tdx'")
                        entries.append((f"{where}.{key}.{tee}", key, sub))
                else:
                    entries.append((f"{where}.{key}", key, value))
        self._index: dict[tuple[str, str], bytes] = {}
        for entry_where, key, value in entries:
            try:
                summary = summarize_collateral(value)
            except ValueError as exc:
                raise ConfigError(f"{entry_where}: not DCAP collateral: {exc}") from exc
            if key is not None and key.upper() != summary.fmspc:
                raise ConfigError(
                    f"{entry_where}: keyed by FMSPC {key.upper()} but its TCB info is for "
                    f"{summary.fmspc}"
                )
            slot = (summary.tee, summary.fmspc)
            if slot in self._index:
                raise ConfigError(
                    f"{entry_where}: second {summary.tee} collateral for FMSPC {summary.fmspc}"
                )
            encoded = json.dumps(value, separators=(",", ":")).encode()
            if len(encoded) > MAX_COLLATERAL:
                raise ConfigError(f"{entry_where}: larger than {MAX_COLLATERAL} bytes")
            self._index[slot] = encoded

    def available(self) -> list[tuple[str, str]]:
        """(tee, FMSPC) pairs this bundle has collateral for."""
        return sorted(self._index)

    def collateral(self, request: CollateralRequest, quote: bytes, at: int) -> bytes:
        del quote, at  # a bundle is whatever it is; verification judges its age
        found = self._index.get((request.tee, request.fmspc))
        if found is None:
            have = ", ".join(f"{t} {f}" for t, f in self.available()) or "nothing"
            raise VerificationError(
                f"collateral bundle {self.path} has no {request.tee} collateral for "
                f"FMSPC {request.fmspc} (it has: {have})"
            )
        return found


Fetch = Callable[[str, bytes], bytes]


def dcap_qvl_fetch(url: str, quote: bytes) -> bytes:
    """Fetch collateral for `quote` from the PCS/PCCS at `url` with dcap_qvl (network)."""
    import dcap_qvl

    get = getattr(dcap_qvl, "get_collateral", None)
    if get is None:
        raise ConfigError(
            "this dcap-qvl has no get_collateral: pass fetch= to CachedPcsCollateral, "
            "or use BundleCollateral"
        )

    async def run() -> Any:
        return await get(url, quote)

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        result = asyncio.run(run())
    else:  # called from inside an event loop: run the fetch on a loop of its own
        with ThreadPoolExecutor(max_workers=1) as pool:
            result = pool.submit(asyncio.run, run()).result()
    return str(result.to_json()).encode()


class CachedPcsCollateral:
    """Collateral from a PCS/PCCS at `url`, cached on disk and used offline.

    A cached file is used, without fetching, while `at` is before its
    nextUpdate. Otherwise `fetch(url, quote)` is tried; if it fails and a
    stale cached file exists, the stale file is returned (verification will
    then name what expired), so an offline node keeps working until its
    collateral runs out.
    """

    def __init__(
        self,
        url: str,
        cache_dir: str | os.PathLike[str],
        fetch: Fetch | None = None,
    ) -> None:
        self.url = url
        self.cache_dir = Path(cache_dir)
        self._fetch = fetch or dcap_qvl_fetch

    def cache_path(self, request: CollateralRequest) -> Path:
        for part in (request.tee, request.ca, request.fmspc):
            if not re.fullmatch(r"[A-Za-z0-9]+", part):
                raise EvidenceFormatError(f"quote names an odd collateral key {part!r}")
        return self.cache_dir / f"{request.tee}-{request.ca.lower()}-{request.fmspc.upper()}.json"

    def _read_cache(self, path: Path, request: CollateralRequest) -> tuple[bytes, int] | None:
        try:
            with path.open("rb") as f:
                data = f.read(MAX_COLLATERAL + 1)
            summary = summarize_collateral(data)
        except (OSError, ValueError):
            return None  # missing or unusable: as good as absent, a fetch overwrites it
        if (summary.tee, summary.fmspc) != (request.tee, request.fmspc):
            return None
        return data, summary.next_update

    def collateral(self, request: CollateralRequest, quote: bytes, at: int) -> bytes:
        path = self.cache_path(request)
        cached = self._read_cache(path, request)
        if cached is not None and at <= cached[1]:
            return cached[0]
        what = f"{request.tee} collateral for FMSPC {request.fmspc} from {self.url}"
        try:
            fresh = self._fetch(self.url, quote)
            if not isinstance(fresh, bytes):
                raise TypeError(f"fetch returned {type(fresh).__name__}, not bytes")
            summary = summarize_collateral(fresh)
            if (summary.tee, summary.fmspc) != (request.tee, request.fmspc):
                raise ValueError(f"got {summary.tee} collateral for FMSPC {summary.fmspc}")
        except Exception as exc:
            if cached is not None:
                return cached[0]
            detail = str(exc) if isinstance(exc, TeeflowError) else f"{type(exc).__name__}: {exc}"
            raise VerificationError(f"no cached {what}, and fetching failed: {detail}") from exc
        self._write_cache(path, fresh)
        return fresh

    def _write_cache(self, path: Path, data: bytes) -> None:
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=".collateral-", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError:
            pass  # a cache that cannot be written only costs a refetch next time
