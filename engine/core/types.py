"""Core values: small frozen dataclasses that cross every boundary (transport, API, CLI).

Rules: plain data only. No I/O, no clocks, no protobuf here; conversion to and from protobuf lives
in `engine.transport.convert`, with a round-trip test.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from engine.core.constants import AZS, NODES_PER_AZ, PROTECTION_GROUPS_DEFAULT, PROTECTION_GROUPS_MAX, REPLICAS
from engine.errors import InvalidArgument


@dataclass(frozen=True)
class NodeInfo:
    """A storage node: its id and the availability zone it lives in."""

    id: str
    az: str


def default_nodes() -> tuple[NodeInfo, ...]:
    """n1..n6, two per AZ: n1,n2 in a; n3,n4 in b; n5,n6 in c."""
    return tuple(NodeInfo(f"n{i * NODES_PER_AZ + j + 1}", az) for i, az in enumerate(AZS) for j in range(NODES_PER_AZ))


@dataclass(frozen=True)
class Geometry:
    """What a volume is made of; fixed when it is created."""

    protection_groups: int = PROTECTION_GROUPS_DEFAULT

    def __post_init__(self) -> None:
        if not isinstance(self.protection_groups, int) or not 1 <= self.protection_groups <= PROTECTION_GROUPS_MAX:
            raise InvalidArgument(f"protection_groups must be an int in 1..{PROTECTION_GROUPS_MAX}, got {self.protection_groups!r}")


@dataclass(frozen=True)
class Membership:
    """Which nodes hold the segments of every PG, at an epoch.

    During a membership change (Aurora's ABCDEF -> ABCDEG) `next_members` holds the new set and a
    write is durable only when it has a write quorum in *both* sets, and a read needs a read quorum
    of both too (see `engine.core.quorum.has_read_quorum`). Every step of a change is a new epoch."""

    epoch: int
    members: tuple[str, ...]
    next_members: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        assert len(self.members) == REPLICAS and len(set(self.members)) == REPLICAS, self.members
        if self.next_members is not None:
            assert len(self.next_members) == REPLICAS and len(set(self.next_members)) == REPLICAS, self.next_members

    @property
    def quorum_sets(self) -> tuple[tuple[str, ...], ...]:
        return (self.members,) if self.next_members is None else (self.members, self.next_members)

    @property
    def all_nodes(self) -> tuple[str, ...]:
        """Every node that holds a segment now: members, then the new ones of a change."""
        extra = tuple(n for n in (self.next_members or ()) if n not in self.members)
        return self.members + extra


@dataclass(frozen=True)
class TruncationRange:
    """LSNs `first..last` (inclusive) are void for ever: a recovery at `epoch` cut them off."""

    epoch: int
    first: int
    last: int

    def __post_init__(self) -> None:
        assert 1 <= self.first <= self.last, (self.first, self.last)

    def covers(self, lsn: int) -> bool:
        return self.first <= lsn <= self.last


@dataclass(frozen=True)
class RecordHeader:
    """What recovery needs to know of a record without its key or value."""

    lsn: int
    prev_lsn: int
    flags: int


@dataclass(frozen=True)
class SegmentSummary:
    """A segment's state as its node reports it when sealed at a new epoch.

    `records` lists the headers of every record the segment holds above `hint_lsn` (the highest
    VDL a writer told this node); `last_lsn_at_hint` is the segment's highest record LSN at or below
    `hint_lsn` (0 if none)."""

    node: str
    pg: int
    scl: int
    hint_lsn: int
    last_lsn_at_hint: int
    records: tuple[RecordHeader, ...] = ()
    #: LSNs whose copy on this segment was lost to corruption (they exist; a good copy is elsewhere)
    damaged: tuple[int, ...] = ()


@dataclass(frozen=True)
class SealReply:
    """A node's answer to Seal: its segments' summaries taken atomically with the epoch raise."""

    node: str
    epoch: int
    segments: tuple[SegmentSummary, ...]
    truncations: tuple[TruncationRange, ...] = ()


@dataclass(frozen=True)
class AppendReply:
    """SCL of every PG of the node after an append (index = pg)."""

    node: str
    scls: tuple[int, ...]
    #: the node is within its space reserve (see `engine.node.store`): no room for new puts
    space_low: bool = False
    #: bytes the node can still take above its reserve (0 when space_low)
    room_bytes: int = 0
    #: the largest record it can surely store in one piece (None: not known, an older node)
    extent_bytes: int | None = None


class FetchReply(NamedTuple):
    """A segment's answer to a fetch: a frame of its records above `after_lsn` (at most about
    `max_bytes`), whether more remain, and what the sender knows of the LSNs it does not send:
    every record of the PG at or below `complete_lsn` that is not in the frame was collected
    (`engine.node.collection`), so a receiver complete to `after_lsn` is complete to
    `complete_lsn` once it holds the frame, and then adopts `horizon_lsn` (it lacks what the
    sender collected, so it must refuse reads below the sender's horizon too). 0, 0 from a
    sender that collects nothing (or a release before collection)."""

    frame: bytes
    more: bool
    complete_lsn: int = 0
    horizon_lsn: int = 0


@dataclass(frozen=True)
class ReadReply:
    """A segment's answer for one key at a read point: the newest version at or below it.

    `lsn` is 0 when the segment holds no version; `deleted` marks a tombstone."""

    node: str
    lsn: int
    value: bytes | None
    deleted: bool = False
    #: an expiring version's deadline (microseconds on the log's clock); 0: none
    deadline_us: int = 0


@dataclass(frozen=True)
class VersionEntry:
    """One key's newest version at a read point, as a scan returns it (tombstones included)."""

    key: bytes
    lsn: int
    value: bytes | None  # None: deleted
    deadline_us: int = 0  # an expiring version's deadline; 0: none


@dataclass(frozen=True)
class NodeState:
    """A node's public state, for status and for the writer's bookkeeping."""

    node: str
    az: str
    epoch: int
    scls: tuple[int, ...]
    hint_lsn: int
    records: int = 0
    bytes: int = 0
    corrupt_found: int = 0
    repaired: int = 0
    truncations: tuple[TruncationRange, ...] = ()
    membership: Membership | None = None
    extra: dict = field(default_factory=dict, compare=False)
    #: frames refused because they carried another record at an LSN the segment holds
    conflicts_refused: int = 0
    #: space (see `engine.node.store`): LMDB's high-water mark, what the data file can hold (map,
    #: file size limit, disk), and whether the node is within its reserve (no room for new puts)
    used_bytes: int = 0
    capacity_bytes: int = 0
    space_low: bool = False
    #: bytes left above the reserve (0 when space_low)
    room_bytes: int = 0
    #: as AppendReply.extent_bytes
    extent_bytes: int | None = None
    #: milliseconds since the writer of the node's epoch last renewed its lease (engine.head.failover)
    lease_age_ms: int = 0
    #: the writer's signed statement of the newest epoch state adopted (engine.security.proofs)
    epoch_proof: bytes = field(default=b"", compare=False, repr=False)
    #: version collection (engine.node.collection), per PG: the horizon (reads below it are
    #: SnapshotTooOld) and the swept LSN (every version shadowed by a newer one at or below it is
    #: gone here); records removed so far; LMDB pages in use (of every table) and their size
    horizons: tuple[int, ...] = ()
    swept: tuple[int, ...] = ()
    collected_records: int = 0
    pages_used: int = 0
    page_bytes: int = 0


@dataclass(frozen=True)
class ReadView:
    """A read point and, per PG, the LSN a segment must be complete to for answering alone (the
    PG's last record at or below the read point). Snapshots keep one; clients may send one back."""

    read_point: int
    tails: tuple[int, ...]


@dataclass(frozen=True)
class Unit:
    """One atomic unit of writes as it travels to the writer: its ops (flags, key, value), and the
    request id the client chose for it (1..64 bytes; None: no id). `resend` marks a unit that may
    have been sent before under the same id (the writer then looks the id up in the log), and
    `conditions` the preconditions the unit is logged under (all hold, or nothing is logged)."""

    ops: tuple
    request_id: bytes | None = None
    resend: bool = False
    #: preconditions (`engine.core.conditions.Condition`), checked by the writer as it orders the unit
    conditions: tuple = ()


@dataclass(frozen=True)
class RequestStatus:
    """What the writer knows of a request id.

    `state` is "committed" (durable at CPL LSN `lsn`), "pending" (logged by this writer at `lsn`,
    not yet durable: it may still commit, or be truncated if this writer dies first) or
    "not_committed" (no record of it at or below the durable point: it was never logged, or a
    recovery cut it). A re-send under the same id is applied at most once, whatever the state."""

    request_id: bytes
    state: str
    lsn: int = 0


@dataclass(frozen=True)
class ReadPointUpdate:
    """The writer's read view at one moment, as it replicates to reader instances
    (`engine.head.replica`): the epoch, the VDL (the read point: durable, so no recovery cuts a
    record at or below it), each PG's read tail, the membership, and per member its SCLs (None
    for a PG the writer has no reply for yet) and whether the writer reaches it. `sent_at`: the
    writer's wall clock when it sent the update (seconds since the Unix epoch); `committed_at`
    the writer's wall clock when the oldest commit the update newly covers became durable."""

    epoch: int
    vdl: int
    tails: tuple[int, ...]
    membership: Membership
    #: (node id, SCL per PG, up) for every member of the membership
    members: tuple[tuple[str, tuple[int | None, ...], bool], ...]
    sent_at: float = 0.0
    #: The writer's wall clock when the VDL first moved past the previous update of the same
    #: stream (when the oldest commit this update newly covers became durable); 0 if none or unknown.
    committed_at: float = 0.0
    #: The log's time at the writer (`Writer.log_time_us`): a reader hides versions whose
    #: deadline is at or before it (engine.head.expiry); 0: unknown (a writer before expiry)
    log_time_us: int = 0

    @property
    def view(self) -> ReadView:
        return ReadView(self.vdl, self.tails)
