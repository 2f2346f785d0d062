"""The committed changes of the log, rebuilt from the protection groups' segments (a watch).

Theory of operation
-------------------
The writer gives every unit consecutive LSNs and flags its last record CPL; each record also
names the previous record of its own PG (`prev_lsn`). A watch that is further behind than the
writer's memory of recent units reads the records above its position from one complete segment
per PG (a fetch each, bounded in bytes) and needs them back as the writer ordered them: whole
units, in LSN order, none missing.

Two pure functions do that:

* `chain_break(records, after, tail)`: whether a segment's records of one PG above `after` are
  the PG's whole chain. The first must link to `after` or below, each next one to the one before
  it, and (when the fetch is complete) the last must be the PG's read tail. A record missing
  from a segment (collected, quarantined as corrupt) always breaks the chain, so a watch never
  turns a hole in one segment into a silent gap; it asks another segment, or says Compacted.
* `merge_units(streams, after, frontier, ops_max)`: the records of every PG, each verified up to
  its own end, merged by LSN up to `frontier` (the least end of a PG whose fetch was cut short:
  below it every PG's records are in hand), cut into units at their CPL records. Only units
  whose CPL is at or below the frontier come out (a unit cut by the frontier is read again on
  the next round), the writer's own request records (`FLAG_REQUEST`, a unit's last record when
  it has a request id) are left out, and output stops at the first unit boundary past
  `ops_max` ops.

Nothing here does I/O; `engine.head.watch` fetches, decodes and decrypts around it.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from typing import Protocol

from engine.core.constants import FLAG_CPL, FLAG_REQUEST


class LogRecord(Protocol):
    """What these functions read of a record (a decoded `engine.codec` Record has it)."""

    lsn: int
    prev_lsn: int
    flags: int


def chain_break(records: Sequence[LogRecord], after: int, tail: int | None = None) -> int | None:
    """The index of the first record of one PG's `records` (LSN order, all above `after`) that
    does not link to the one before it (the first to `after` or below), len(records) when `tail`
    is given and the last record is not it (the chain's end is missing), or None: the records are
    the PG's whole chain in (after, last] (in (after, tail] with `tail`)."""
    prev = None
    for i, r in enumerate(records):
        if r.lsn <= after or (prev is None and r.prev_lsn > after) or (prev is not None and r.prev_lsn != prev):
            return i
        prev = r.lsn
    if tail is not None and prev != (tail if tail > after else None):
        return len(records)
    return None


def merge_units(
    streams: Sequence[Sequence[LogRecord]], after: int, upto: int, ops_max: int,
) -> tuple[list[tuple[int, list]], int]:
    """The whole units with CPL in (after, upto] of `streams` (one LSN-ordered list of records
    per PG, each complete up to `upto`), in LSN order: (CPL, [records, request records left
    out]); at least one unit when there is one, then up to the first unit boundary past `ops_max`
    records. Returns them and the position reached: the last CPL given, else `after`."""
    assert ops_max >= 1
    units: list[tuple[int, list]] = []
    unit: list = []
    given = 0
    position = after
    merged = heapq.merge(*streams, key=lambda r: r.lsn)
    for r in merged:
        if r.lsn <= after:
            continue
        if r.lsn > upto:
            break
        if not r.flags & FLAG_REQUEST:
            unit.append(r)
        if r.flags & FLAG_CPL:
            if units and given + len(unit) > ops_max:
                break
            units.append((r.lsn, unit))
            given += len(unit)
            position = r.lsn
            unit = []
            if given >= ops_max:
                break
    return units, position
