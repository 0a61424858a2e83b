"""Sizes in bytes, parsed from and formatted for people."""

from __future__ import annotations

import re

from tide.errors import InputError

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int, *, field: str = "size") -> int:
    """Parse a size such as '24GiB', '24GB', '1.5GiB' or a plain byte count into bytes."""
    if isinstance(text, int):
        if text < 0:
            raise InputError("a size must not be negative", field=field, value=text)
        return text
    match = _SIZE_RE.match(str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise InputError(
            "invalid size",
            field=field,
            value=text,
            accepted="a byte count or a number with a unit: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB",
        )
    return int(round(float(match.group(1)) * _UNITS[unit]))


def format_bytes(num_bytes: float) -> str:
    """Format a byte count with a binary unit, e.g. '1.50 GiB'."""
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
