"""When the writer may drop records from its in-memory tail. Pure: values in, values out.

Theory of operation
-------------------
The writer keeps every record it logged in a *tail* (consecutive LSNs from `tail_base`) until it
may forget it. A record may be dropped only when

1. it is durable (at or below VCL): until then a sender may still have to ship it, and
2. every live member of the membership has been sent it: trimming at VCL alone leaves a slow but
   live node (the fifth or sixth) with holes that only gossip fills, and when an AZ is then lost
   that node is part of every write quorum and every write waits for gossip. Down nodes never
   hold the tail (gossip fills them when they return).

Rule 2 is bounded: when the tail holds more than `records_max` records, a live node that lags
further than half of that bound behind VCL is left to gossip too, so a slow node cannot make the
writer's memory grow without bound. Rule 1 has no exception.

Dropping is batched (at least `batch_min` records, or the whole tail) so that the list deletion
it costs is paid rarely.

Rules of this module: no I/O, threads, clocks or randomness (a test checks).
"""

from __future__ import annotations

from collections.abc import Iterable

#: records kept in the writer's tail for slow live nodes before they are left to gossip
TAIL_RECORDS_MAX = 200_000
#: the tail is cut in batches of at least this many records (or whole)
TRIM_BATCH_MIN = 4096


def tail_keep_from(vcl: int, live_sent: Iterable[int], tail_end: int, records_max: int = TAIL_RECORDS_MAX) -> int:
    """The lowest LSN the tail must keep.

    `vcl`: the volume complete LSN; `live_sent`: for every live member, the highest LSN it was
    sent (or acknowledged); `tail_end`: one above the highest LSN in the tail."""
    assert records_max >= 2 and vcl >= 0 and tail_end >= vcl + 1
    lagging = min(live_sent, default=vcl)
    keep_from = min(vcl, lagging) + 1
    if tail_end - keep_from > records_max:
        # Too long for the slowest live node: keep half the bound below VCL for it, never more.
        keep_from = min(max(keep_from, vcl + 1 - records_max // 2), vcl + 1)
    return keep_from


def tail_trim(
    tail_base: int,
    tail_len: int,
    vcl: int,
    live_sent: Iterable[int],
    records_max: int = TAIL_RECORDS_MAX,
    batch_min: int = TRIM_BATCH_MIN,
) -> int:
    """How many records to drop from the front of a tail of `tail_len` records starting at LSN
    `tail_base` (0: keep them all for now). Never drops a record above VCL."""
    assert tail_base >= 1 and tail_len >= 0 and batch_min >= 1
    drop = tail_keep_from(vcl, live_sent, tail_base + tail_len, records_max) - tail_base
    if drop > batch_min or (drop > 0 and drop == tail_len):
        return drop
    return 0


__all__ = ["TAIL_RECORDS_MAX", "TRIM_BATCH_MIN", "tail_keep_from", "tail_trim"]
