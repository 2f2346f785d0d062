"""Membership change as pure steps, and when a replacement has caught up. Pure: values in, values out.

Theory of operation
-------------------
Aurora replaces a segment without consensus, in two epoch steps (SIGMOD 2018, section 4):

    ABCDEF  --begin-->  ABCDEF + ABCDEG  --finish-->  ABCDEG
                                          --revert-->  ABCDEF

While both quorum sets stand, a write is durable only on a write quorum of *each*, and a read
needs a read quorum of each too (`engine.core.quorum`). Each step is a function from the
current `Membership` to the next one; a step that does not apply to the current membership is
refused with `InvalidArgument` and changes nothing. The epoch of the result is the caller's to set
(the writer moves the volume to a new epoch for every step).

The new node may finish the change once it can stand in for the old one in every read: its
segment of every PG is complete up to the PG's read tail (the PG's last record at or below VDL),
the same test a read uses to let a segment answer alone. `catch_up_progress` measures how far it
is, as a fraction of the LSNs it must cover and the number still missing.

Rules of this module: no I/O, threads, clocks or randomness (a test checks).
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.core.types import Membership
from engine.errors import InvalidArgument


def begin_replace(m: Membership, old: str, new: str) -> Membership:
    """Step 1: `new` joins as a member of a second quorum set in which it takes `old`'s place."""
    if m.next_members is not None:
        raise InvalidArgument(f"a membership change is already under way ({', '.join(m.members)} -> {', '.join(m.next_members)})")
    if old not in m.members:
        raise InvalidArgument(f"{old} is not a member ({', '.join(m.members)})")
    if new in m.members:
        raise InvalidArgument(f"{new} is already a member")
    return Membership(m.epoch, m.members, tuple(new if n == old else n for n in m.members))


def finish_replace(m: Membership) -> Membership:
    """Step 2: commit the change; the second quorum set alone is the membership."""
    if m.next_members is None:
        raise InvalidArgument("no membership change is under way")
    return Membership(m.epoch, m.next_members)


def revert_replace(m: Membership) -> Membership:
    """Undo step 1 (the old node came back before the change completed)."""
    if m.next_members is None:
        raise InvalidArgument("no membership change is under way")
    return Membership(m.epoch, m.members)


def replacing(m: Membership) -> tuple[str, str] | None:
    """(old, new) of the change under way, or None."""
    if m.next_members is None:
        return None
    old = next(n for n in m.members if n not in m.next_members)
    new = next(n for n in m.next_members if n not in m.members)
    return old, new


def replacement_caught_up(scls: Sequence[int | None], read_tails: Sequence[int]) -> bool:
    """True when a node whose segments have SCLs `scls` (index = PG; None: the node has not
    reported that PG yet) holds every PG's chain up to its read tail, so it can serve any read
    the node it replaces could. A node not heard from has not caught up, even where a PG is empty."""
    assert len(scls) == len(read_tails)
    return all(s is not None and s >= t for s, t in zip(scls, read_tails))


def catch_up_progress(scls: Sequence[int | None], read_tails: Sequence[int]) -> tuple[float, int]:
    """(fraction, lag) of a catching-up node: the share of the read tails' LSNs its SCLs cover,
    and how many LSNs are still missing, summed over PGs (None counts as 0). Once
    `replacement_caught_up` holds, this is (1.0, 0); lag is never negative and fraction is in [0, 1]."""
    assert len(scls) == len(read_tails)
    want = sum(read_tails)
    have = sum(min(s or 0, t) for s, t in zip(scls, read_tails))
    return (1.0 if want == 0 else have / want), want - have


__all__ = [
    "begin_replace",
    "catch_up_progress",
    "finish_replace",
    "replacement_caught_up",
    "replacing",
    "revert_replace",
]
