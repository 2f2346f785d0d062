"""Whether the writer may log a new write now, from what it knows of its nodes. Pure.

Theory of operation
-------------------
A write may be logged only if it can become durable: a write quorum (of every quorum set during
a membership change, `engine.core.quorum.has_write_quorum`) must be able to store it. Three
things can stop a node from storing it:

* it is *unreachable* (its last request failed);
* it is *full*: it refused an append because it physically had no room (`StorageFull`);
* it is *low* on space: it still stores what it is sent, drawing on a reserve it keeps, and says
  so in every append reply (`space_low`).

The reserve exists so that a full volume can be emptied: a unit that puts anything is admitted
only when the nodes that are reachable, not full and not low form a write quorum; a unit that
only deletes is admitted while the reachable nodes that are not full do (low ones take deletes
from their reserve). Refusing before anything is logged keeps the promise of the error: nothing
of a refused write exists anywhere.

Not low is not enough for a put: it must also *fit*. A logged record that no write quorum can
store never becomes durable, and every later record (deletes too) waits behind it, so one big
unit admitted into the last of the room would stop the volume until a recovery cut it off. Each
node says how many bytes it has above its reserve (`room_bytes`); the writer keeps, per node, a
*limit*: the room a node reported plus the cost of everything logged that the node held by then,
in the writer's running total of logged costs. A put unit is admitted only when the running
total plus the unit's cost stays within `quorum_limit` of the nodes that may take puts: so
everything logged, this unit included, fits on a write quorum of them. The cost is a bound of
what a record takes in LMDB (`record_cost_bytes`), so a node's reserve only has to absorb what
the writer does not count: gossip's repairs, copy-on-write pages, metadata, and a bound that
falls short. Deletes are not held to it: they take the reserve, so a full volume can be emptied.

Rules of this module: no I/O, threads, clocks or randomness (a test checks).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence

from engine.core.constants import RECORD_HEADER_BYTES, WRITE_QUORUM
from engine.core.quorum import has_write_quorum
from engine.core.types import Membership


class Admission(enum.IntEnum):
    """What the writer may log now (worst last)."""

    #: puts and deletes
    ALL = 0
    #: deletes only: the nodes with room for puts are not a write quorum
    DELETES_ONLY = 1
    #: nothing, for lack of space: the reachable nodes that are not full are not a write quorum
    FULL = 2
    #: nothing: the reachable nodes are not a write quorum
    UNREACHABLE = 3


def write_admission(
    up: Iterable[str], full: Iterable[str], low: Iterable[str], membership: Membership, quorum: int = WRITE_QUORUM
) -> Admission:
    """What may be logged when `up` are reachable, `full` refused for lack of space and `low` are
    within their reserve (nodes outside the membership do not count)."""
    up = set(up)
    if not has_write_quorum(up, membership, quorum):
        return Admission.UNREACHABLE
    room_for_deletes = up.difference(full)
    if not has_write_quorum(room_for_deletes, membership, quorum):
        return Admission.FULL
    if not has_write_quorum(room_for_deletes.difference(low), membership, quorum):
        return Admission.DELETES_ONLY
    return Admission.ALL


def admits(admission: Admission, puts: bool) -> bool:
    """True when a unit (that puts something, or only deletes) may be logged."""
    return admission is Admission.ALL or (admission is Admission.DELETES_ONLY and not puts)


#: The largest LMDB page there is (LMDB's page is the OS page: 4 KiB on x86-64, up to 64 KiB).
PAGE_BYTES_MAX = 64 << 10
#: What a record costs in LMDB beyond its bytes as counted below (node headers, an overflow
#: record's leaf entry, the version index entry's fixed part, its share of branch pages).
RECORD_COST_OVERHEAD_BYTES = 256
#: The header of an overflow page, and a leaf node's header (both counted twice in a record).
_NODE_HEADER_BYTES = 32


def record_cost_bytes(key_bytes: int, value_bytes: int) -> int:
    """A bound of the bytes one record takes on a node (LMDB): what a put must find room for.

    The log holds the record (r = RECORD_HEADER_BYTES + key + value bytes) under a 12-byte key:
    in a leaf page if it is small, and B-tree splits leave pages about half full, so about 2r;
    else in overflow pages of its own, r rounded up to whole pages: at most r + a page, and at
    most about 2r, since a record goes to overflow pages only above half a page. The version
    index holds the key and 8 bytes in a leaf page: about twice the key. The constant covers the
    headers. It is a bound for appends, not a proof (a split may leave a page less than half
    full): the node's reserve absorbs the difference, and the pages copy-on-write keeps until a
    transaction commits. Measured on LMDB with 4 KiB pages (tests/test_storage_full_e2e.py), a
    record takes from half of it to nearly all of it."""
    record = RECORD_HEADER_BYTES + key_bytes + value_bytes
    return min(2 * (record + _NODE_HEADER_BYTES), record + PAGE_BYTES_MAX) + 2 * key_bytes + RECORD_COST_OVERHEAD_BYTES


def unit_cost_bytes(ops: Sequence[tuple[int, bytes, bytes]]) -> int:
    """The cost (record_cost_bytes) of a unit's records, each op (flags, key, value) one record."""
    if len(ops) == 1:  # most units: no generator
        _flags, key, value = ops[0]
        return record_cost_bytes(len(key), len(value))
    return sum(record_cost_bytes(len(key), len(value)) for _flags, key, value in ops)


def quorum_limit(limits: Mapping[str, int], membership: Membership, quorum: int = WRITE_QUORUM) -> int:
    """The largest L such that the nodes whose limit is at least L form a write quorum of every
    quorum set (`has_write_quorum`); -1 when the nodes in `limits` are no write quorum at all.

    `limits` holds only the nodes that may take puts now (neither full nor low)."""
    best = None
    for members in membership.quorum_sets:
        held = sorted((limits[n] for n in members if n in limits), reverse=True)
        if len(held) < quorum:
            return -1
        best = held[quorum - 1] if best is None else min(best, held[quorum - 1])
    return -1 if best is None else best


__all__ = [
    "PAGE_BYTES_MAX", "RECORD_COST_OVERHEAD_BYTES", "Admission", "admits", "quorum_limit", "record_cost_bytes", "unit_cost_bytes",
    "write_admission",
]
