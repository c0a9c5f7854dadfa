"""How teeflow errors cross a Flight call: a tagged, sanitized message."""

from __future__ import annotations

import re

import pyarrow.flight as fl

from teeflow.core.errors import PeerError, TeeflowError, Unreachable, from_code

_TAG = re.compile(r"\[teeflow:(\w+)\] (.*?) \[/teeflow\]", re.S)


def to_flight(exc: TeeflowError) -> fl.FlightError:
    text = f"[teeflow:{exc.code}] {exc} [/teeflow]"
    if exc.code in ("auth",):
        return fl.FlightUnauthorizedError(text)
    return fl.FlightServerError(text)


def from_flight(exc: Exception, peer: str) -> TeeflowError:
    """Rebuild the teeflow error a peer sent, or name the transport failure."""
    match = _TAG.search(str(exc))
    if match:
        return from_code(match.group(1), match.group(2))
    if isinstance(exc, (fl.FlightUnavailableError, fl.FlightTimedOutError)):
        return Unreachable(f"executor {peer} unreachable: {str(exc).splitlines()[0][:200]}")
    return PeerError(f"executor {peer}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
