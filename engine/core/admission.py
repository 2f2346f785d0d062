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

Rules of this module: no I/O, threads, clocks or randomness (a test checks).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

from engine.core.constants import WRITE_QUORUM
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


__all__ = ["Admission", "admits", "write_admission"]
