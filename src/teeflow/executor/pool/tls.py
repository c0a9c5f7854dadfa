"""Pinned mutual TLS for Dask: each member trusts exactly the admitted members' certificates.

Dask's own Security builds an SSLContext from a CA file (PEM text works too) with
CERT_REQUIRED on both sides, check_hostname off (members are reached by IP) and X.509
strict mode off. That is already pinning when the "CA file" is the bundle of the admitted
members' self-signed, CA=false certificates: OpenSSL accepts a peer only if its certificate
is one of those anchors (and the peer holds its key). Here the context is built by us, not
from Dask's config, so no dask.config value (a ca-file, a cipher list, a TLS version) can
widen it: TLS 1.3 only, no session tickets, the bundle and nothing else (no system CAs).

Python's ssl can load a key only from a file: it is written to a private temporary folder
and removed at once (Dask does the same for in-memory keys). Inside the TEE that folder is
the enclave's own (Gramine tmpfs / the confidential VM's memory).
"""

from __future__ import annotations

import os
import ssl
import tempfile
from typing import Any

from distributed import Security

from teeflow.executor.pool.admission import Roster
from teeflow.executor.pool.identity import MemberIdentity


def pinned_context(identity: MemberIdentity, trust_bundle: str,
                   purpose: ssl.Purpose) -> ssl.SSLContext:
    """An SSLContext presenting `identity` and accepting only the bundle's certificates."""
    if "-----BEGIN CERTIFICATE-----" not in trust_bundle:
        raise ValueError("a pinned link needs at least one trusted certificate")
    server = purpose == ssl.Purpose.CLIENT_AUTH
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    # Peers are pinned by certificate; their IP addresses say nothing.
    ctx.check_hostname = False
    ctx.options |= ssl.OP_NO_TICKET
    ctx.load_verify_locations(cadata=trust_bundle)
    with tempfile.TemporaryDirectory(prefix="teeflow-pool-") as folder:
        os.chmod(folder, 0o700)
        cert_path, key_path = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
        with open(os.open(cert_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            f.write(identity.cert_pem)
        with open(os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            f.write(identity.key_pem)
        ctx.load_cert_chain(cert_path, key_path)
    return ctx


class PinnedSecurity(Security):
    """Dask Security whose every listener and connector uses the pinned contexts, with
    encryption required (a tcp:// address is refused before any byte is sent)."""

    __slots__ = ("_identity", "_bundle")

    def __init__(self, identity: MemberIdentity, trust_bundle: str) -> None:
        super().__init__(require_encryption=True)
        self._identity = identity
        self._bundle = trust_bundle
        # fail now, not at the first connection
        pinned_context(identity, trust_bundle, ssl.Purpose.SERVER_AUTH)

    @classmethod
    def for_roster(cls, identity: MemberIdentity, roster: Roster) -> PinnedSecurity:
        if identity.cert_pem not in [m.cert_pem for m in roster.members]:
            raise ValueError("this member is not on its own roster")
        return cls(identity, roster.trust_bundle())

    def get_connection_args(self, role: str) -> dict[str, Any]:
        return {"ssl_context": pinned_context(self._identity, self._bundle,
                                              ssl.Purpose.SERVER_AUTH),
                "require_encryption": True, "extra_conn_args": {}}

    def get_listen_args(self, role: str) -> dict[str, Any]:
        return {"ssl_context": pinned_context(self._identity, self._bundle,
                                              ssl.Purpose.CLIENT_AUTH),
                "require_encryption": True}

    def __repr__(self) -> str:
        return f"PinnedSecurity({len(self._bundle.split('-----BEGIN CERTIFICATE-----')) - 1} "\
               "pinned certificates)"
