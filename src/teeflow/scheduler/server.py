"""Run the scheduler: SQLite file + HTTP API under uvicorn."""

from __future__ import annotations

import uvicorn

from teeflow.net.listen import bind, write_port_file
from teeflow.scheduler.app import create_app
from teeflow.scheduler.store import Store


def serve(db: str, host: str, port: int, port_file: str | None = None) -> None:
    store = Store(db)
    sock = bind(host, port)
    sock.listen(128)  # connections queue from now on, before the port is announced
    address = f"{host}:{sock.getsockname()[1]}"
    config = uvicorn.Config(create_app(store), log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    write_port_file(port_file, address)
    print(f"teeflow scheduler listening on http://{address} (db {db})", flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        store.close()
