"""Durations people type ('90s', '30m', '12h', '7d') and the short spans shown back ('2m').
Pure."""

from __future__ import annotations

import math

from teeflow.core.errors import InputError

UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_DURATION = 10 * 365 * 86400.0  # ten years: anything longer is a typo


def parse_duration(text: str, option: str = "--result-ttl") -> float:
    """Seconds from '3600', '90s', '30m', '12h', '7d'; InputError naming `option`."""
    clean = text.strip().lower()
    number = clean.rstrip("smhd")
    unit = clean[len(number):]
    try:
        value = float(number) * UNITS[unit]
    except (ValueError, KeyError):
        raise InputError(f"{option} {text!r} is not a duration like 90s, 30m, 12h or "
                         "7d") from None
    if not math.isfinite(value) or not value > 0:
        raise InputError(f"{option} must be a positive, finite duration (not {text!r})")
    if value > MAX_DURATION:
        raise InputError(f"{option} {text!r} is longer than ten years")
    return value


def format_span(seconds: float) -> str:
    """'5s', '2m', '1h 5m', '3d 4h': the two largest units, rounded down."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        h, m = divmod(s // 60, 60)
        return f"{h}h {m}m" if m else f"{h}h"
    d, h = divmod(s // 3600, 24)
    return f"{d}d {h}h" if h else f"{d}d"
