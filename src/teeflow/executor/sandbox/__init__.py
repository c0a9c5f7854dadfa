"""Run submitted Python code in a child process of the executor: Arrow tables in, one table or
bytes out, and nothing else: no network, no files written, bounded CPU time and memory.

The parent (``run_code``) starts ``python -I -B -c <boot> <src> <limits>`` in a fresh empty
working directory with an almost empty environment, writes the code and the tables to its stdin
(Arrow IPC streams, framed), and reads the result from its stdout, capped in size and time.
The child applies, in this order, before it reads a byte of input:

1. network: a new, empty network namespace (``unshare(CLONE_NEWNET)``; without root, inside a
   new user namespace). No interface is up in it, not even loopback. Where namespaces are
   unavailable (no privilege, no user namespaces, or a library OS such as Gramine) the child
   runs with only the audit-hook guard below, unless ``Limits.require_netns`` (by
   default ``parent.REQUIRE_NETNS``) is set, and then it refuses to run;
2. user: when started as root, it drops to ``nobody`` with no supplementary groups and
   ``PR_SET_NO_NEW_PRIVS``, so it cannot re-enter the host's network namespace, signal or
   trace the executor, or read its private files. If the Python installation is not readable
   by others (pyenv under ``/root``, say), a fixed set of modules (``child._PRELOAD``: pyarrow,
   numpy, pandas, common standard modules) is imported first, and the code can import only
   those;
3. limits (``setrlimit``): CPU seconds (``SIGXCPU`` at the limit, ``SIGKILL`` a second
   later), ``RLIMIT_DATA`` at the memory budget (heap and private mappings; the address space
   gets the budget plus room for shared libraries), no core files, file size 0 (a write to a
   file fails), few open files, and when running as ``nobody`` a process count cap;
4. a guard: a PEP 578 audit hook, which Python code cannot remove, refusing sockets,
   subprocesses, ``fork``/``exec``, files opened for writing, file-system changes,
   ``ctypes`` symbol lookups and ``mmap``. An audit hook is not a security boundary by
   itself (native code can get past it); here it is a second layer behind 1-3.

Where the result says which isolation applied: ``Outcome.isolation`` is
``{"network": "netns" | "userns+netns" | "none", "user": "nobody" | "userns" | "unchanged",
"guard": "audit-hook"}``, reported by the child before the user code runs.

Nothing the child says is trusted: its exceptions are reported by built-in type name only (a
message, or a user-defined class name, could quote data), its output is parsed under a cap,
and its exit status is interpreted by the parent.

The package holds three parts: ``frames`` (the messages between parent and child, and their
framing), ``parent`` (``run_code``: start the child, feed it, judge what it returns) and
``child`` (the child's program). The child imports this package too, so this file loads the
parent side only when one of its names is asked for: the child process never imports
``parent``, and it must unshare while still single-threaded, before pyarrow starts threads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from teeflow.executor.sandbox.frames import MAX_CODE_BYTES

if TYPE_CHECKING:
    from teeflow.executor.sandbox.parent import Limits, Outcome, run_code

__all__ = ["MAX_CODE_BYTES", "Limits", "Outcome", "run_code"]

_PARENT = frozenset({"Limits", "Outcome", "run_code"})


def __getattr__(name: str) -> Any:
    """The parent side's names, imported on first use (never in the child). (user_code's
    digest names every module of this package: ``compute/usercode.py`` USES.)"""
    if name in _PARENT:
        from teeflow.executor.sandbox import parent

        return getattr(parent, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
