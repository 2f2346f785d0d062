"""Recovery arithmetic: from the sealed segments' summaries, what is durable and what to cut.

Theory of operation
-------------------
A new writer first raises the volume epoch on a write quorum of every PG's segments; each node
answers with a summary of its segments taken atomically with the raise (`SealReply`). After the
raise, a fenced writer can no longer make anything durable, so the summaries are a stable picture.

LSNs are allocated consecutively across the volume, so a hole in the LSN sequence is visible
without knowing which PG it belongs to. Every record the old writer could have acknowledged lies
at or below its VCL, and every record at or below VCL is on a write quorum, hence on at least one
segment of any read quorum. So, over the union of the summaries:

1. `base` = the highest VDL any node was told (`hint_lsn`): everything at or below it was durable.
2. VCL = the end of the run of consecutive LSNs above `base` present in the union (LSNs inside a
   known truncation range count as present: they hold no records by definition).
3. VDL = the highest CPL in (base, VCL], else `base`.
4. Records in (base, VDL] may be on fewer than a write quorum: the driver re-replicates them.
5. Everything above VDL is cut: the range (VDL, max(VCL, highest LSN seen) + LAL] becomes a
   truncation range of the new epoch (the old writer never allocated past its VDL + LAL, and its VDL
   is at most our VCL), and the new writer allocates above it. When every segment answered the
   seal, nothing unseen can exist, so the range ends at the highest LSN seen (often: no range).

Pure: values in, values out; no I/O, threads, clocks or randomness.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from engine.core.constants import FLAG_CPL, LAL_DEFAULT, READ_QUORUM
from engine.core.quorum import has_read_quorum
from engine.core.types import Membership, SealReply, TruncationRange
from engine.errors import Unavailable


@dataclass(frozen=True)
class RecoveryPlan:
    """What a new writer at `epoch` does before it serves."""

    epoch: int
    base: int
    vcl: int
    vdl: int
    #: per PG, the last record at or below VDL (backlink of the PG's next record)
    tails: tuple[int, ...]
    #: (pg, lsn) of records in (base, VDL] to make durable again, with nodes that hold them
    replicate: tuple[tuple[int, int, tuple[str, ...]], ...]
    #: the range cut by this recovery, or None when nothing can lie above VDL
    truncation: TruncationRange | None
    #: every truncation range known, oldest first (this one included)
    truncations: tuple[TruncationRange, ...]
    next_lsn: int


def _covered(lsn: int, ranges: Sequence[TruncationRange]) -> bool:
    return any(r.covers(lsn) for r in ranges)


def plan_recovery(
    epoch: int,
    protection_groups: int,
    replies: Sequence[SealReply],
    *,
    lal: int = LAL_DEFAULT,
    read_quorum: int = READ_QUORUM,
    all_sealed: bool = False,
    membership: Membership | None = None,
) -> RecoveryPlan:
    """Compute the recovery plan from the seal replies (one per node that answered).

    `all_sealed` says every segment of every PG answered: then no record of the old writer can
    exist beyond what the replies show (later arrivals are refused by the epoch), so the cut ends
    at the highest LSN seen instead of LAL beyond it, and a clean volume keeps its LSNs dense.

    With `membership`, every PG's summaries must come from a read quorum of it
    (`has_read_quorum`: three of each quorum set during a change); without it, from
    `read_quorum` segments. Raises Unavailable when some PG has fewer."""
    assert epoch >= 1 and protection_groups >= 1
    per_pg: list[list] = [[] for _ in range(protection_groups)]
    for reply in replies:
        for seg in reply.segments:
            assert 0 <= seg.pg < protection_groups, seg.pg
            per_pg[seg.pg].append(seg)
    if membership is None:
        short = [pg for pg, segs in enumerate(per_pg) if len(segs) < read_quorum]
    else:
        short = [pg for pg, segs in enumerate(per_pg) if not has_read_quorum((s.node for s in segs), membership)]
    if short:
        raise Unavailable(
            f"recovery needs a read quorum ({read_quorum} segments of each quorum set) of every protection group; "
            f"PGs {short[:8]} have fewer ({[sorted(s.node for s in per_pg[pg]) for pg in short[:8]]})"
        )

    known = sorted({r for reply in replies for r in reply.truncations}, key=lambda r: (r.first, r.epoch))
    base = max((seg.hint_lsn for segs in per_pg for seg in segs), default=0)

    # The union of record headers above base, per LSN; LSNs inside a truncation range are void.
    holders: dict[int, tuple[int, int, set[str]]] = {}  # lsn -> (pg, flags, nodes)
    highest_seen = base
    for pg, segs in enumerate(per_pg):
        for seg in segs:
            for h in seg.records:
                highest_seen = max(highest_seen, h.lsn)
                if h.lsn <= base or _covered(h.lsn, known):
                    continue
                entry = holders.setdefault(h.lsn, (pg, h.flags, set()))
                assert entry[0] == pg, f"lsn {h.lsn} claimed by PGs {entry[0]} and {pg}"
                entry[2].add(seg.node)
    # A copy lost to corruption still proves its record exists. Within the failure budget a good
    # copy is in some other summary (which also gives its flags); if none is, re-replication finds
    # no holder and recovery stops with Unavailable rather than cut a record that may be acknowledged.
    for pg, segs in enumerate(per_pg):
        for seg in segs:
            for lsn in seg.damaged:
                if lsn > base and not _covered(lsn, known) and lsn not in holders:
                    holders[lsn] = (pg, 0, set())

    vcl = base
    while True:
        nxt = vcl + 1
        covering = next((r for r in known if r.covers(nxt)), None)
        if covering is not None:
            vcl = covering.last
        elif nxt in holders:
            vcl = nxt
        else:
            break
    vdl = max((lsn for lsn, (_pg, flags, _n) in holders.items() if lsn <= vcl and flags & FLAG_CPL), default=base)

    tails = []
    for pg, segs in enumerate(per_pg):
        candidates = [seg.last_lsn_at_hint for seg in segs if not _covered(seg.last_lsn_at_hint, known)]
        candidates += [h.lsn for seg in segs for h in seg.records if h.lsn <= vdl and not _covered(h.lsn, known)]
        tails.append(max((c for c in candidates if c <= vdl), default=0))

    replicate = tuple(
        (pg, lsn, tuple(sorted(nodes))) for lsn, (pg, _flags, nodes) in sorted(holders.items()) if lsn <= vdl
    )
    cut_end = max(vcl, highest_seen, vdl) + (0 if all_sealed else lal)
    truncation = TruncationRange(epoch, vdl + 1, cut_end) if cut_end > vdl else None
    return RecoveryPlan(
        epoch=epoch,
        base=base,
        vcl=vcl,
        vdl=vdl,
        tails=tuple(tails),
        replicate=replicate,
        truncation=truncation,
        truncations=tuple(known) + ((truncation,) if truncation else ()),
        next_lsn=cut_end + 1,
    )
