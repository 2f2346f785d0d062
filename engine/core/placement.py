"""Placement: which protection group a key lives in, and which AZ each node is in.

Pure. The key space is striped by a stable hash (CRC32C, not Python's salted `hash`), so every
process of a cluster and every run agree on it. It calls google_crc32c directly rather than the
codec, whose Cython twin locates a shared library at import: placement stays pure.
"""

from __future__ import annotations

from collections.abc import Sequence

import google_crc32c

from engine.core.types import NodeInfo


def protection_group_of(key: bytes, protection_groups: int) -> int:
    """The PG that holds `key`."""
    return google_crc32c.value(key) % protection_groups


def azs_of(nodes: Sequence[NodeInfo]) -> dict[str, list[str]]:
    """AZ -> node ids, in node order."""
    out: dict[str, list[str]] = {}
    for n in nodes:
        out.setdefault(n.az, []).append(n.id)
    return out


def read_order(candidates: Sequence[str], nodes: Sequence[NodeInfo], local_az: str) -> list[str]:
    """Candidates ordered for a read: same AZ first, then the others, each in node order."""
    az = {n.id: n.az for n in nodes}
    return sorted(candidates, key=lambda c: (az.get(c) != local_az, c))
