"""The executor process's own hardening, applied once at start: it makes itself non-dumpable
(``PR_SET_DUMPABLE=0``), so no process of another uid, and no process without
CAP_SYS_PTRACE over it, can read ``/proc/<executor>/mem``, ``environ`` or ``fd``, attach with
ptrace, or get a core file of it; and it reports what the user-code sandbox can give
(``sandbox.jail.probe``), for ``info`` and the catalog.

The TLS private key lives only in this process's memory: never in a file a child could open,
never in an fd a child inherits (the sandbox starts children with ``close_fds``).
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any

log = logging.getLogger(__name__)

_PR_SET_DUMPABLE = 4
_PR_GET_DUMPABLE = 3


def _prctl(option: int, value: int = 0) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    return int(libc.prctl(option, value, 0, 0, 0))


def harden() -> bool:
    """Make this process non-dumpable; whether it now is."""
    try:
        _prctl(_PR_SET_DUMPABLE, 0)
    except (OSError, AttributeError):  # not Linux: nothing to set
        log.warning("could not make the executor non-dumpable")
    return not dumpable()


def dumpable() -> bool:
    try:
        return _prctl(_PR_GET_DUMPABLE) != 0
    except (OSError, AttributeError):
        return True


def isolation() -> dict[str, Any]:
    """The user-code isolation this executor gives (probed once, with a real child), and
    whether the executor itself is non-dumpable."""
    from teeflow.executor.sandbox import jail

    report = jail.probe().report()
    report["executor_dumpable"] = dumpable()
    return report
