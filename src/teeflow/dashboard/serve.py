"""Run the dashboard under uvicorn on a loopback socket (port 0 allowed)."""

from __future__ import annotations

import ipaddress

import uvicorn

from teeflow.core.errors import InputError
from teeflow.dashboard.app import create_app
from teeflow.net.listen import bind, write_port_file
from teeflow.sdk import Client


def check_loopback(host: str) -> None:
    """The dashboard acts with the user's key over plain HTTP: loopback only."""
    try:
        ok = ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise InputError(f"--listen {host}: the dashboard listens on a loopback address "
                         "only (such as 127.0.0.1)")


def serve(client: Client, host: str, port: int, port_file: str | None = None) -> None:
    check_loopback(host)
    sock = bind(host, port)
    sock.listen(64)
    bound = sock.getsockname()[1]
    address = f"[{host}]:{bound}" if ":" in host else f"{host}:{bound}"
    app = create_app(client, address)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    write_port_file(port_file, address)
    print(f"teeflow dashboard: open http://{address}/?token={app.state.token}", flush=True)
    server.run(sockets=[sock])
