"""Byte sizes as people write them in configs and tasks (``512Mi``, ``1g``, ``1073741824``)."""

from __future__ import annotations

import re
from fractions import Fraction

_UNITS = {
    "": 1,
    "k": 1024,
    "m": 1024**2,
    "g": 1024**3,
    "t": 1024**4,
}
_SIZE = re.compile(r"[ \t]*(\d+(?:\.\d+)?)[ \t]*([kmgtKMGT]?)(i?)[bB]?[ \t]*")
# Past this no engine, kernel or file system means anything (it is also the int64 the
# engines' APIs take): a larger size is a mistake or an attack, never a request.
MAX_BYTES = 2**63 - 1


def parse_bytes(value: int | str) -> int:
    """Return ``value`` in bytes.

    Suffixes are binary whether or not the ``i`` is written (``1g`` = ``1Gi`` = 1 GiB):
    DESIGN.md §3 says so, and it is what ``docker run --memory 1g`` means too.  The
    arithmetic is exact (no float to overflow or round), and sizes over :data:`MAX_BYTES`
    are refused.

    :raises ValueError: for anything else, ``bool`` included.
    """
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"negative size: {value}")
        return _bounded(value, value)
    if not isinstance(value, str):
        raise ValueError(f"not a size: {value!r}")
    match = _SIZE.fullmatch(value)
    if not match:
        raise ValueError(f"not a size: {value!r} (use bytes or a suffix like 512Mi, 2Gi)")
    number, unit, _ = match.groups()
    return _bounded(int(Fraction(number) * _UNITS[unit.lower()]), value)


def _bounded(n: int, value: int | str) -> int:
    if n > MAX_BYTES:
        shown = value if len(str(value)) <= 40 else f"{str(value)[:40]}..."
        raise ValueError(f"size {shown!r} is over {MAX_BYTES} bytes")
    return n


def format_bytes(n: float) -> str:
    """``n`` bytes for people (``1.5 GiB``), in the binary units :func:`parse_bytes` reads."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")  # pragma: no cover
