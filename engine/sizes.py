"""Byte sizes as people write them (`10GiB`, `500MiB`, `1.5 GB`, plain bytes), and the bounds of
a storage maximum.

A leaf module (standard library and `engine.errors` only), shared by the node store, the embedded
volume, the cluster manifest and the `sixfold` commands, so that every door takes the same sizes
and refuses the same ones in the same words (`InvalidArgument`, never a crash).

Units: B; KiB, MiB, GiB, TiB, PiB (powers of 1024); kB, MB, GB, TB, PB (powers of 1000); case is
ignored. A bare K, M, G, T or P is refused as ambiguous (is G 2^30 or 10^9?): the message says
which to write. A fraction is allowed when the result is a whole number of bytes (`1.5GiB`).
"""

from __future__ import annotations

import os
import re
from fractions import Fraction

from engine.errors import InvalidArgument

_BINARY = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40, "pib": 1 << 50}
_DECIMAL = {"kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "pb": 10**15}
UNITS = {"": 1, "b": 1, **_BINARY, **_DECIMAL}
_SIZE_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*")
#: The longest size text looked at (a size is a few characters; this bounds the arithmetic).
SIZE_TEXT_MAX = 40

#: The least storage maximum of a node: room for a new node's tables and identity, and then some.
STORAGE_BYTES_MIN = 1 << 20
#: The greatest: the u64 bound every other quantity of the engine keeps (engine.core.constants).
STORAGE_BYTES_MAX = 1 << 62
#: Status warns (and a node logs, once per crossing) when a node uses this share of its capacity.
STORAGE_WARNING_PERCENT = 80


def parse_size(text: str, what: str = "size") -> int:
    """The number of bytes `text` says (see the module docstring); InvalidArgument otherwise."""
    if not isinstance(text, str):
        raise InvalidArgument(f"{what} must be text such as 10GiB, got {type(text).__name__}")
    m = _SIZE_RE.fullmatch(text) if len(text) <= SIZE_TEXT_MAX else None
    if m is None:
        raise InvalidArgument(f"{what} {text[:SIZE_TEXT_MAX]!r} is not a size: write a number of bytes, or a number "
                              "and a unit, such as 10GiB, 500MiB or 1.5GB")
    number, unit = m.group(1), m.group(2).lower()
    if unit not in UNITS:
        if unit in ("k", "m", "g", "t", "p"):
            raise InvalidArgument(f"{what} {text!r}: the unit {m.group(2)!r} is ambiguous; write {unit.upper()}iB "
                                  f"(powers of 1024) or {unit.upper()}B (powers of 1000)")
        raise InvalidArgument(f"{what} {text!r}: unknown unit {m.group(2)!r}; units are B, KiB, MiB, GiB, TiB, PiB, "
                              "kB, MB, GB, TB, PB")
    exact = Fraction(number) * UNITS[unit]  # exact: a float (or a 28-digit Decimal) would round
    if exact.denominator != 1:
        raise InvalidArgument(f"{what} {text!r} is not a whole number of bytes ({float(exact)} bytes)")
    return exact.numerator


def format_size(n: int) -> str:
    """`n` bytes in the largest binary unit that keeps it at least 1 (`10 GiB`, `1.5 MiB`, `512 B`)."""
    for unit, factor in (("PiB", 1 << 50), ("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        value = round(n / factor, 1)  # rounded first: 1023.96 TiB is said as 1 PiB, never "1024.0 TiB"
        if abs(value) >= 1 and abs(n) >= 1024:  # under 1 KiB it is said exactly, in bytes
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{n} B"


def check_storage_bytes(value, what: str = "max_storage_bytes") -> int:
    """`value` if it is an int in STORAGE_BYTES_MIN..STORAGE_BYTES_MAX; InvalidArgument otherwise
    (a bool is not a size; 0 and negative sizes are refused, not read as "no maximum")."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{what} must be a whole number of bytes, got {type(value).__name__} {value!r}"[:200])
    if not STORAGE_BYTES_MIN <= value <= STORAGE_BYTES_MAX:
        raise InvalidArgument(f"{what} {value} is out of range: a node's maximum is "
                              f"{format_size(STORAGE_BYTES_MIN)}..{format_size(STORAGE_BYTES_MAX)}")
    return value


def check_fits_filesystem(value: int, path: str, what: str = "max_storage_bytes") -> None:
    """InvalidArgument when `value` bytes are more than the whole filesystem of `path` holds (the
    nearest folder of `path` that exists: a new volume's folder may not exist yet). A maximum
    above the free space is fine: the node's capacity is then the disk's room, and shows so."""
    folder = os.path.abspath(path)
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    try:
        fs = os.statvfs(folder)
    except OSError:
        return  # nothing to compare with; the node's capacity still measures the disk
    total = fs.f_blocks * fs.f_frsize
    if value > total:
        raise InvalidArgument(f"{what} {format_size(value)} ({value} bytes) is more than the whole filesystem of "
                              f"{folder} holds ({format_size(total)}); give at most that")


def used_percent(used_bytes: int, capacity_bytes: int) -> float:
    """The share of its capacity a node uses, in percent (100 when it has no capacity at all)."""
    return 100.0 if capacity_bytes <= 0 else 100.0 * used_bytes / capacity_bytes


def storage_warning(node_id: str, used_bytes: int, capacity_bytes: int, space_low: bool = False) -> str | None:
    """The warning status shows for a node at STORAGE_WARNING_PERCENT or more of its capacity, or
    with no room left above its reserve (`space_low`: a small node's reserve may start below 80%)."""
    percent = used_percent(used_bytes, capacity_bytes)
    if percent < STORAGE_WARNING_PERCENT and not space_low:
        return None
    state = ("it has no room left above its reserve: puts are refused with StorageFull (deletes still work)" if space_low
             else "once it reaches its reserve, puts are refused with StorageFull (deletes still work)")
    return (f"node {node_id} uses {percent:.0f}% of its capacity ({format_size(used_bytes)} of "
            f"{format_size(capacity_bytes)}): {state}; raise the maximum (max_storage_bytes, --max-storage), or "
            "delete data (its room comes back as old versions are collected)")


__all__ = [
    "STORAGE_BYTES_MAX", "STORAGE_BYTES_MIN", "STORAGE_WARNING_PERCENT", "UNITS", "check_fits_filesystem",
    "check_storage_bytes", "format_size", "parse_size", "storage_warning", "used_percent",
]
