"""Go-style durations (``2m``, ``30s``, ``1m30s``, ``500ms``, ``1.5h``) as seconds."""

from __future__ import annotations

import re

from aisetl.model.errors import InvalidSpec

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_WHOLE = re.compile(r"^(?:(?:\d+(?:\.\d*)?|\.\d+)(?:ns|us|µs|ms|s|m|h))+$")


def parse_duration(text: str, field: str = "wait_timeout") -> float:
    """Parse a Go duration into seconds; ``field`` names the input in errors."""
    raw = str(text).strip()
    if raw == "0":
        return 0.0
    if not _WHOLE.match(raw):
        raise InvalidSpec(
            f"{field}: {text!r} is not a duration: use a number with a unit, "
            "such as '30s', '2m' or '1m30s' (units: ms, s, m, h)",
            field=field,
        )
    return sum(float(n) * _UNITS[u] for n, u in _PART.findall(raw))


def format_duration(seconds: float) -> str:
    """Format seconds as a short Go-style duration (``90`` -> ``1m30s``)."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    whole = int(seconds)
    h, rem = divmod(whole, 3600)
    m, s = divmod(rem, 60)
    out = (f"{h}h" if h else "") + (f"{m}m" if m else "") + (f"{s}s" if s else "")
    return out or "0s"
