"""Parsing and formatting of sizes (binary units: 1G = 1 GiB)."""

from __future__ import annotations

import re

from barge.errors import UsageError

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "m": 1 << 20,
    "g": 1 << 30,
    "t": 1 << 40,
    "p": 1 << 50,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str, *, what: str = "size") -> int:
    """Parse ``20G``, ``512M``, ``1.5T``, ``4GiB``, ``1048576`` into bytes."""
    m = _SIZE_RE.match(text or "")
    if not m:
        raise UsageError(
            f"invalid {what} {text!r}: expected a number with an optional unit, like 20G or 512M"
        )
    number, unit = m.group(1), m.group(2).lower()
    value = float(number) * _UNITS[unit] if "." in number else int(number) * _UNITS[unit]
    result = int(value)
    if result <= 0:
        raise UsageError(f"invalid {what} {text!r}: must be greater than zero")
    if result > 1 << 60:
        raise UsageError(f"invalid {what} {text!r}: too large")
    return result


def format_size(n: int) -> str:
    """A binary size as every message and table shows one: ``10 B``, ``512 MiB``, ``20 GiB``
    (a whole number of the unit), ``1.5 GiB``, ``2.9 KiB`` (else one decimal)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            if unit == "B" or value == int(value):
                return f"{int(value)} {unit}"
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover
