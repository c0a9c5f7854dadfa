"""Breaking one client's TCP connection from inside the executor.

pyarrow's Flight server cannot cancel a stream it is reading (apache/arrow#43819): a thread
blocked reading a stalled upload waits for as long as its sender keeps the connection open.
Shutting that connection down is the one way to make the read return, so a cut upload frees
its thread. Linux only: the socket is found through /proc; elsewhere nothing is done (and
the upload's task is failed and wiped all the same).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from pathlib import Path
from urllib.parse import unquote

log = logging.getLogger("teeflow.executor")


def parse_peer(peer: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int] | None:
    """(address, port) of a gRPC peer such as 'ipv4:127.0.0.1:5000' or 'ipv6:[::1]:5000'."""
    kind, _, rest = unquote(peer).partition(":")
    host, _, port = rest.rpartition(":")
    if kind not in ("ipv4", "ipv6") or not port.isdigit():
        return None
    try:
        return ipaddress.ip_address(host.strip("[]")), int(port)
    except ValueError:
        return None


def _proc_address(text: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """An address of /proc/net/tcp{,6}: hex words in host byte order, then a hex port."""
    host, port = text.split(":")
    raw = bytes.fromhex(host)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    address = ipaddress.ip_address(words)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address, int(port, 16)


def _inodes(peer: tuple[object, int], local_port: int) -> set[str]:
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10:
                continue
            local, remote = _proc_address(fields[1]), _proc_address(fields[2])
            if remote == peer and local[1] == local_port:
                found.add(f"socket:[{fields[9]}]")
    return found


def hang_up(peer: str, local_port: int) -> int:
    """Shut down this process's connections from `peer` to `local_port`; how many."""
    parsed = parse_peer(peer)
    if parsed is None:
        return 0
    wanted = _inodes(parsed, local_port)
    done = 0
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return 0
    for fd in fds:
        try:
            if os.readlink(f"/proc/self/fd/{fd}") not in wanted:
                continue
            dup = socket.socket(fileno=os.dup(int(fd)))
        except OSError:
            continue
        try:
            dup.shutdown(socket.SHUT_RDWR)
            done += 1
        except OSError:
            pass
        finally:
            dup.close()  # the duplicate only; gRPC closes its own
    if done:
        log.info("hung up on a stalled sender (%d connection(s))", done)
    return done
