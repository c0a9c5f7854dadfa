"""Run the scheduler: SQLite file + HTTPS API under uvicorn.

HTTPS only, with the scheduler's own certificate (identity.py, made in its data dir on
first start); nodes pin it, so plain HTTP has nothing to talk to. `members`: the
operator's key list (members.py), admitted without an invitation.
"""

from __future__ import annotations

from pathlib import Path

import uvicorn

from teeflow.net.listen import bind, write_port_file
from teeflow.scheduler.app import create_app
from teeflow.scheduler.identity import load_or_create
from teeflow.scheduler.members import load_members
from teeflow.scheduler.service import TASK_DEADLINE, UNREACHABLE_GRACE, Scheduler
from teeflow.scheduler.store import Store


def serve(db: str, host: str, port: int, port_file: str | None = None,
          data_dir: str | None = None, members: str | None = None,
          task_deadline: float = TASK_DEADLINE,
          executor_grace: float = UNREACHABLE_GRACE) -> None:
    ident = load_or_create(data_dir or Path(db).resolve().parent)
    store = Store(db, log_signer=ident.signer())
    if members is not None:
        store.set_members(load_members(Path(members)))
    sock = bind(host, port)
    sock.listen(128)  # connections queue from now on, before the port is announced
    address = f"{host}:{sock.getsockname()[1]}"
    app = create_app(store, Scheduler(store, task_deadline=task_deadline,
                                         unreachable_grace=executor_grace))
    config = uvicorn.Config(app, log_level="warning", access_log=False,
                            ssl_certfile=str(ident.cert_file), ssl_keyfile=str(ident.key_file))
    server = uvicorn.Server(config)
    write_port_file(port_file, address)
    print(f"teeflow scheduler listening on https://{address}#{ident.fingerprint} (db {db})",
          flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        store.close()
