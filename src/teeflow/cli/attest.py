"""`teeflow attest`: operators check evidence by hand, offline."""

from __future__ import annotations

import json
from pathlib import Path

import click

from teeflow.cli.common import load_policy_file
from teeflow.core.errors import InputError
from teeflow.files import read_capped

MAX_FILE = 1024 * 1024


def _read(path: Path, what: str) -> bytes:
    return read_capped(path, MAX_FILE, what, InputError)


@click.group()
def attest() -> None:
    """Verify or decode TEE evidence (quotes, RA-TLS certificates)."""


@attest.command()
@click.argument("quote_file", type=click.Path(path_type=Path))
@click.option("--collateral", type=click.Path(path_type=Path), default=None,
              help="Collateral JSON (or bundle) for SGX/TDX quotes.")
@click.option("--amd-ark", type=click.Path(path_type=Path), default=None,
              help="Trusted AMD root key (PEM) for SEV-SNP evidence.")
@click.option("--at", "at", type=int, required=True, help="Verification time, unix seconds.")
@click.option("--policy", type=click.Path(path_type=Path), default=None,
              help="Also appraise against this [policy] (report data is not checked).")
def verify(quote_file: Path, collateral: Path | None, amd_ark: Path | None, at: int,
           policy: Path | None) -> None:
    """Verify a quote; print the verified claims as JSON, or the failed check and exit 1."""
    from teeflow.attestation.collateral import BundleCollateral
    from teeflow.attestation.describe import describe_quote
    from teeflow.attestation.evidence import Evidence
    from teeflow.attestation.policy import appraise
    from teeflow.attestation.registry import make_verifiers

    quote = _read(quote_file, "quote")
    tee = describe_quote(quote)["tee"]
    verifiers = make_verifiers(BundleCollateral(collateral) if collateral else None,
                               _read(amd_ark, "AMD root key") if amd_ark else None)
    if tee not in verifiers:
        raise InputError(f"a {tee} quote needs " +
                         ("--amd-ark" if tee == "sev-snp" else "--collateral"))
    if policy is not None:
        claims = appraise(Evidence(tee, quote), load_policy_file(policy), verifiers,
                          expected_report_data=None, at=at)
    else:
        claims = verifiers[tee].verify(quote, at)
    click.echo(json.dumps(claims.to_dict(), indent=2))


@attest.command()
@click.argument("path", type=click.Path(path_type=Path))
def show(path: Path) -> None:
    """Decode a quote or an RA-TLS certificate without judging it."""
    from teeflow.attestation.describe import describe_quote

    data = _read(path, "file")
    if data.lstrip().startswith(b"-----BEGIN CERTIFICATE") or data[:1] == b"\x30":
        from teeflow.attestation.describe import describe_certificate

        click.echo(json.dumps(describe_certificate(data), indent=2))
        return
    click.echo(json.dumps(describe_quote(data), indent=2))
