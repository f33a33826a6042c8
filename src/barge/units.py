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


#: A bare number given for a VM's disk is GB (10^9 bytes) and for its memory MiB: the units of
#: Tart's and Vetu's ``set --disk-size``/``--memory`` (and of what Orchard sends them).
DISK_BARE_UNIT = 1000**3
MEMORY_BARE_UNIT = 1 << 20
MIN_DISK = 1 << 20
MIN_MEMORY = 64 << 20


def _vm_size(text: str, what: str, bare_unit: int) -> int:
    if re.fullmatch(r"\s*\d+\s*", text or ""):
        value = int(text) * bare_unit
        if value <= 0:
            raise UsageError(f"invalid {what} {text!r}: must be greater than zero")
        if value > 1 << 60:
            raise UsageError(f"invalid {what} {text!r}: too large")
        return value
    return parse_size(text, what=what)


def parse_disk_size(text: str, *, what: str = "--disk-size") -> int:
    """A VM disk size: ``20`` is 20 GB (10^9 bytes, as Tart and Vetu take it), ``20G`` 20 GiB,
    ``512M`` 512 MiB. Under 1 MiB is refused: no VM boots from that."""
    value = _vm_size(text, what, DISK_BARE_UNIT)
    if value < MIN_DISK:
        raise UsageError(
            f"invalid {what} {text!r}: {value} bytes is no disk for a VM (at least 1 MiB)",
            hint="a bare number is GB (--disk-size 20 is 20 GB); give a unit for others: 512M, 20G",
        )
    return value


def parse_memory(text: str, *, what: str = "--memory") -> int:
    """A VM's memory: ``4096`` is 4096 MiB (as Tart and Vetu take it), ``4G`` 4 GiB. Under
    64 MiB is refused: no Linux guest boots in that."""
    value = _vm_size(text, what, MEMORY_BARE_UNIT)
    if value < MIN_MEMORY:
        raise UsageError(
            f"invalid {what} {text!r}: {format_size(value)} is too little memory for a VM "
            "(at least 64 MiB)",
            hint="a bare number is MiB (--memory 4096 is 4 GiB); give a unit for others: 512M, 4G",
        )
    return value


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
