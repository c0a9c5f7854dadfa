"""Run submitted Python code in a child process of the executor: Arrow tables in, one table or
bytes out, and nothing else: no network, no files written, bounded CPU time and memory.

The parent (``run_code``) first requires complete isolation (``jail.require``: every piece of
``jail.PIECES``, found once by a real probe child, else ComputeError naming what is missing,
before any process starts), then starts ``python -I -B -c <boot> <src> <limits>`` under
bubblewrap (``jail.command``): its own pid, network, ipc, uts and mount namespaces (only
read-only binds of the interpreter, its libraries and teeflow; ``/proc`` of its own pid
namespace, a minimal ``/dev``), ``--clearenv``, ``--die-with-parent``, ``--new-session``, no
capabilities but CAP_SETUID/CAP_SETGID, and a seccomp filter compiled by libseccomp (no ptrace,
process_vm_*, sockets, namespaces, mounts, fork). It writes the code and the tables to the
child's stdin (Arrow IPC streams, framed), and reads the result from its stdout, capped in size
and time. The child applies, in this order, before it reads a byte of input:

1. user: it drops to ``nobody`` (no groups; bwrap set ``no_new_privs``), and checks that its
   network namespace is empty (loopback only), else it refuses;
2. a second seccomp filter, refusing execve, loaded once bwrap's exec is done;
3. limits (``setrlimit``): CPU seconds (``SIGXCPU`` at the limit, ``SIGKILL`` a second
   later), ``RLIMIT_DATA`` at the memory budget (heap and private mappings; the address space
   gets the budget plus room for shared libraries), no core files, file size 0 (a write to a
   file fails), few open files, a process count cap;
4. a guard: a PEP 578 audit hook refusing sockets, subprocesses, ``fork``/``exec``, files
   opened for writing, file-system changes, ``ctypes`` symbol lookups and ``mmap``: a second
   layer only, behind 1-3 and bwrap.

The executor itself is non-dumpable (``executor/hardening.py``) and its TLS key lives only in
its memory: the child inherits no fd but its pipes and the seccomp program's pipe (read and
closed by bwrap), and cannot see the executor's ``/proc`` entry at all.

Where the result says which isolation applied: ``Outcome.isolation`` is
``{"network": "netns", "user": "nobody", "guard": "audit-hook"}``, reported by the child before
the user code runs; the executor's ``info`` and its catalog entry for user_code carry the
probe's full report (``jail.Isolation.report``).

What runs where in a TEE:

- Gramine (SGX): a child process is a separate enclave, started from the same manifest's
  measurement with its own memory, so the executor's memory is out of its reach by hardware;
  but bwrap does not run inside SGX (no namespaces, no seccomp in a library OS), so the probe
  finds the pieces missing and user_code is refused there. Running user code under Gramine
  needs a child enclave with its own manifest (no network, no files allowed) - not built.
- TDX / SEV-SNP: the whole VM is the TEE; the executor runs on a normal Linux kernel inside it,
  and bwrap, seccomp and the namespaces work as on any Linux host (the executor runs as root).

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
