"""Reading a local file with a size cap checked before the bytes are read."""

from __future__ import annotations

from pathlib import Path

from teeflow.core.errors import ConfigError, TeeflowError


def read_capped(path: Path, cap: int, what: str,
                error: type[TeeflowError] = ConfigError) -> bytes:
    """At most `cap` bytes of `path`, or `error` naming the file and what was wrong."""
    try:
        with open(path, "rb") as f:
            data = f.read(cap + 1)
    except OSError as exc:
        raise error(f"{what} {path}: {exc.strerror}") from exc
    if len(data) > cap:
        raise error(f"{what} {path}: larger than {cap} bytes")
    return data
