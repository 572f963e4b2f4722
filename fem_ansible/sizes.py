"""Byte sizes as people write them in configs and tasks (``512Mi``, ``1g``, ``1073741824``)."""

from __future__ import annotations

import re

_UNITS = {
    "": 1,
    "k": 1024,
    "m": 1024**2,
    "g": 1024**3,
    "t": 1024**4,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtKMGT]?)(i?)[bB]?\s*$")


def parse_bytes(value: int | str) -> int:
    """Return ``value`` in bytes.

    Suffixes are binary whether or not the ``i`` is written (``1g`` = ``1Gi`` = 1 GiB):
    DESIGN.md §3 says so, and it is what ``docker run --memory 1g`` means too.
    """
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"negative size: {value}")
        return value
    if not isinstance(value, str):
        raise ValueError(f"not a size: {value!r}")
    match = _SIZE.match(value)
    if not match:
        raise ValueError(f"not a size: {value!r} (use bytes or a suffix like 512Mi, 2Gi)")
    number, unit, _ = match.groups()
    return int(float(number) * _UNITS[unit.lower()])


def format_bytes(n: float) -> str:
    """``n`` bytes for people (``1.5 GiB``), in the binary units :func:`parse_bytes` reads."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")  # pragma: no cover
