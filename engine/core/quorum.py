"""Quorum arithmetic and the writer's durability bookkeeping. Pure: no I/O, threads or clocks.

Theory of operation
-------------------
The writer assigns every record an LSN, consecutive across the volume with no gaps (gaps appear
only as truncation ranges cut by a recovery). A segment acknowledges by reporting its SCL: the
highest LSN up to which it holds its PG's chain without holes (backlinks make holes visible).
So acks need no per-record bookkeeping:

* PGCL of a PG is the WRITE_QUORUM-th highest SCL among its segments (during a membership change,
  the lower of that figure over both quorum sets). Every record of the PG at or below PGCL is on
  a write quorum. PGCL never goes backwards (a wiped segment does not undo durability).
* A read quorum is READ_QUORUM segments of *every* quorum set (`has_read_quorum`): it meets every
  write quorum of the membership, and every write quorum of the membership before the change
  (whose records the new node may not hold yet). Callers ask this predicate; they never count.
* VCL is the highest LSN such that every record at or below it, in every PG, is durable: one
  below the lowest allocated LSN that is above its PG's PGCL.
* VDL is the highest CPL at or below VCL. A write is acknowledged once VDL reaches it; since VDL
  only lands on CPLs, an atomic batch (consecutive LSNs, last one CPL) is seen whole or not at all.
* LAL bounds allocation: the writer may not allocate past `floor + LAL`, where floor is VDL (or the
  end of the last truncation range, which holds no records).

Rules of this module: values in, values out. It may not import grpc, lmdb, threading, time or
random (a test checks). The writer serialises calls with its own lock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping, Sequence

from engine.core.constants import LAL_DEFAULT, READ_QUORUM, WRITE_QUORUM
from engine.core.types import Membership, ReadReply, VersionEntry
from engine.errors import ResourceExhausted


def quorum_point(scls: Mapping[str, int], members: Sequence[str], quorum: int = WRITE_QUORUM) -> int:
    """The `quorum`-th highest SCL among `members` (a member not in `scls` counts as 0).

    Every LSN at or below the result is held completely by at least `quorum` members."""
    ordered = sorted((scls.get(m, 0) for m in members), reverse=True)
    return ordered[quorum - 1]


def pgcl_of(scls: Mapping[str, int], membership: Membership, quorum: int = WRITE_QUORUM) -> int:
    """PG complete LSN: durable on a write quorum of every quorum set of the membership."""
    return min(quorum_point(scls, members, quorum) for members in membership.quorum_sets)


def has_write_quorum(nodes: Iterable[str], membership: Membership, quorum: int = WRITE_QUORUM) -> bool:
    """True if `nodes` include a write quorum of every quorum set."""
    s = set(nodes)
    return all(len(s.intersection(members)) >= quorum for members in membership.quorum_sets)


def has_read_quorum(nodes: Iterable[str], membership: Membership) -> bool:
    """True if `nodes` include a read quorum of every quorum set.

    During a change, three of the *new* set are not enough: a record acknowledged before the
    change is on a write quorum of the old set only, and the new node holds nothing until it has
    caught up, so {new node} plus two old nodes can miss all four copies. Three of the old set
    would do; three of each is what this asks, which needs no memory of which set came first and
    costs at most one more answer."""
    s = set(nodes)
    if len(s) < READ_QUORUM:  # the common early answer of a read in progress, without the sets
        return False
    for members in membership.quorum_sets:
        if len(s.intersection(members)) < READ_QUORUM:
            return False
    return True


def merge_read(replies: Sequence[ReadReply]) -> ReadReply | None:
    """Merge a quorum read: the newest version any segment holds at the read point wins.

    Sound when the replies come from a read quorum (`has_read_quorum`): every record at or
    below the read point is durable, hence on at least one of them. Returns None when no
    segment holds a version."""
    best = max(replies, key=lambda r: r.lsn, default=None)
    return best if best is not None and best.lsn > 0 else None


def merge_scan(replies: Sequence[Sequence[VersionEntry]]) -> list[VersionEntry]:
    """Merge quorum scans of one PG: per key the newest version; tombstones kept (caller drops)."""
    newest: dict[bytes, VersionEntry] = {}
    for entries in replies:
        for e in entries:
            cur = newest.get(e.key)
            if cur is None or e.lsn > cur.lsn:
                newest[e.key] = e
    return [newest[k] for k in sorted(newest)]


class VolumeDurability:
    """The writer's ledger: LSN allocation, per-segment SCLs, PGCL, VCL, VDL, read tails, LAL.

    Start it from what recovery established: `vdl` (and `next_lsn` above any truncation range),
    and per PG the LSN of its last record at or below VDL (`tails`), which is also the backlink
    of the PG's next record."""

    def __init__(
        self,
        protection_groups: int,
        membership: Membership,
        *,
        vdl: int = 0,
        next_lsn: int = 1,
        tails: Sequence[int] | None = None,
        lal: int = LAL_DEFAULT,
        write_quorum: int = WRITE_QUORUM,
    ) -> None:
        assert protection_groups >= 1 and lal >= 1 and next_lsn > vdl >= 0
        assert 1 <= write_quorum <= len(membership.members)
        #: WRITE_QUORUM, except in test-only weakened configurations that chaos must catch
        self.write_quorum = write_quorum
        self.protection_groups = protection_groups
        self.membership = membership
        self.lal = lal
        self.next_lsn = next_lsn
        self.vdl = vdl
        self.vcl = next_lsn - 1  # nothing is in flight yet
        self.floor = next_lsn - 1  # LAL counts from here or VDL, whichever is higher
        tails = list(tails) if tails is not None else [0] * protection_groups
        assert len(tails) == protection_groups and all(0 <= t <= vdl for t in tails)
        #: backlink for the PG's next record: its last allocated LSN
        self.last_lsn = list(tails)
        #: per PG, its last record at or below VDL: a segment can serve read point VDL alone
        #: once its SCL reaches this
        self.read_tails = list(tails)
        self.pgcl = list(tails)
        #: per PG, allocated LSNs not yet at or below PGCL (increasing)
        self._undurable: list[deque[int]] = [deque() for _ in range(protection_groups)]
        #: per PG, allocated LSNs not yet at or below VDL (increasing)
        self._unexposed: list[deque[int]] = [deque() for _ in range(protection_groups)]
        self._cpls: deque[int] = deque()
        #: scls[pg][node]
        self.scls: list[dict[str, int]] = [dict() for _ in range(protection_groups)]

    # --- allocation -------------------------------------------------------------------------
    def in_flight(self) -> int:
        """LSNs allocated above max(VDL, floor)."""
        return self.next_lsn - 1 - max(self.vdl, self.floor)

    def can_allocate(self, count: int) -> bool:
        return self.in_flight() + count <= self.lal

    def allocate(self, pgs: Sequence[int]) -> list[tuple[int, int]]:
        """Allocate consecutive LSNs for records of the given PGs; the last one is a CPL.

        Returns (lsn, prev_lsn) per record. Raises ResourceExhausted past LAL (the writer waits
        for VDL before calling, so this is a contract check, not flow control)."""
        assert len(pgs) >= 1
        if not self.can_allocate(len(pgs)):
            raise ResourceExhausted(f"LSN allocation limit: {self.in_flight()} LSNs in flight, LAL is {self.lal}")
        out = []
        for pg in pgs:
            assert 0 <= pg < self.protection_groups, pg
            lsn = self.next_lsn
            self.next_lsn += 1
            out.append((lsn, self.last_lsn[pg]))
            self.last_lsn[pg] = lsn
            self._undurable[pg].append(lsn)
            self._unexposed[pg].append(lsn)
        self._cpls.append(out[-1][0])
        return out

    # --- acknowledgements -------------------------------------------------------------------
    def record_scl(self, node: str, pg: int, scl: int) -> bool:
        """A segment reported its SCL. Returns True when VDL advanced."""
        assert 0 <= pg < self.protection_groups and scl >= 0
        seen = self.scls[pg]
        if scl <= seen.get(node, -1):
            return False
        seen[node] = scl
        pgcl = pgcl_of(seen, self.membership, self.write_quorum)
        if pgcl <= self.pgcl[pg]:
            return False
        self.pgcl[pg] = pgcl
        undurable = self._undurable[pg]
        if not undurable or undurable[0] > pgcl:
            return False
        while undurable and undurable[0] <= pgcl:
            undurable.popleft()
        return self._advance()

    def record_scls(self, node: str, scls: Sequence[int]) -> bool:
        """Record every PG's SCL from one append reply. Returns True when VDL advanced."""
        advanced = False
        for pg, scl in enumerate(scls[: self.protection_groups]):
            advanced |= self.record_scl(node, pg, scl)
        return advanced

    def _advance(self) -> bool:
        lowest = min((d[0] for d in self._undurable if d), default=self.next_lsn)
        self.vcl = lowest - 1
        new_vdl = self.vdl
        while self._cpls and self._cpls[0] <= self.vcl:
            new_vdl = self._cpls.popleft()
        if new_vdl == self.vdl:
            return False
        assert new_vdl > self.vdl, (new_vdl, self.vdl)
        self.vdl = new_vdl
        for pg, unexposed in enumerate(self._unexposed):
            while unexposed and unexposed[0] <= new_vdl:
                self.read_tails[pg] = unexposed.popleft()
        return True

    def set_membership(self, membership: Membership) -> None:
        """Adopt a new membership (each step of a change). PGCL stays monotonic."""
        self.membership = membership

    # --- reads ------------------------------------------------------------------------------
    def complete_segments(self, pg: int) -> list[str]:
        """Nodes whose segment of `pg` can serve read point VDL alone (SCL >= the PG's read tail)."""
        tail = self.read_tails[pg]
        return [n for n in self.membership.all_nodes if self.scls[pg].get(n, -1) >= tail]

    def undurable_count(self) -> int:
        return sum(len(d) for d in self._undurable)


__all__ = [
    "READ_QUORUM",
    "WRITE_QUORUM",
    "VolumeDurability",
    "has_read_quorum",
    "has_write_quorum",
    "merge_read",
    "merge_scan",
    "pgcl_of",
    "quorum_point",
]
