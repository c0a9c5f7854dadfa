"""Where a pool member's Dask links listen, which is also where the other members reach
them (executor/pool/cluster.py binds them). Kept apart from cluster.py so an executor reads
its options without importing Dask."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from teeflow.core.errors import ConfigError

MAX_PORTS = 4096  # ports in one --pool-ports range


@dataclass(frozen=True)
class Links:
    """Where this member's Dask links listen, which is also where the others reach them:
    an IP address of this machine, and the ports to try in order (0: any free port)."""

    host: str = "127.0.0.1"
    ports: Sequence[int] = (0,)


def parse_links(host: str | None, ports: str | None) -> Links:
    """`--pool-host` and `--pool-ports`, checked: an error names the option."""
    links = Links()
    if host is not None:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise ConfigError("--pool-host: an IP address of this machine that the other "
                              "members reach") from None
        if ip.is_unspecified or ip.is_multicast:
            raise ConfigError("--pool-host: a concrete address the other members reach, "
                              "not a wildcard or multicast one")
        if ip.version != 4:  # Dask's server options do not parse IPv6 addresses
            raise ConfigError("--pool-host: an IPv4 address (pool links take no IPv6 yet)")
        links = Links(host=str(ip))
    if ports is not None:
        lo, sep, hi = ports.partition("-")
        try:
            first, last = int(lo), int(hi if sep else lo)
        except ValueError:
            raise ConfigError("--pool-ports: LO-HI, two port numbers") from None
        if not 1 <= first <= last <= 65535 or last - first >= MAX_PORTS:
            raise ConfigError(f"--pool-ports: LO-HI with 1 <= LO <= HI <= 65535, at most "
                              f"{MAX_PORTS} ports")
        links = Links(host=links.host, ports=range(first, last + 1))
    return links
