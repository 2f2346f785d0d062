"""The writer head: admission, LSN allocation, group commit to six segments, VDL, fencing.

Theory of operation
-------------------
Callers never talk to nodes. A write validates its input, is admitted (bounded wait for a
reachable write quorum; refused at once when the nodes with room are not one, see
`engine.core.admission`), then goes into a lock-free inbox; whichever sender takes the writer lock
next gives the whole inbox consecutive LSNs from the `VolumeDurability` ledger (refusing, unlogged,
a put that does not fit in the room a write quorum of nodes has left), encodes the records (CRC
and all) once into the shared in-memory *tail*, and the callers park on private locks.

One sender per node (a coroutine of the sender loop over gRPC, `engine.head.senders`; a thread
over any other transport) ships the tail to its node: whenever it is idle it takes every record
it has not yet sent (up to a frame's bounds), so a busy volume gets large frames (group commit)
and a slow node gets larger frames instead of holding anybody up. The node answers with its SCLs;
the ledger turns them into PGCL/VCL/VDL; when VDL passes a caller's CPL, the sender releases that
caller's lock. Four answers suffice: the fifth and sixth node are never waited for. Records stay in
the tail until durable and sent to every live node (`engine.core.tail`); a node that missed trimmed
records fills the hole by gossip.

Waking a caller costs one `lock.release()` (no Condition, no Event per batch): the hand-off
between Python threads, not the disk, is what limits a group commit here.

Every protocol decision is the pure core's: quorums (`engine.core.quorum`), membership steps and
catch-up (`engine.core.membership`), tail trimming (`engine.core.tail`), what an epoch refusal
means (`engine.core.fencing`) and write admission (`engine.core.admission`). This module does the
I/O, the threads and the waiting around them.

Failure policy: an expected error on a link (`SixfoldError`) marks the node unreachable, is logged
once per change of cause (logger "sixfold.writer") and retried with a bounded back-off; a full node
(`StorageFull`) stays reachable (it still serves reads) and its records are retried until they land.
An unexpected exception in a sender is logged once per cause with its traceback, counted on the
link (`status()["links"][n]["errors"]`), and the sender carries on after a back-off; if it struck
while the ledger or tail was being changed, the writer cannot trust its own bookkeeping and fences
itself with that reason (recovery on the next open rebuilds the truth from the nodes).

The writer's other concepts live in modules of their own, each the only implementation of it:
recovery on open (`engine.head.recovery`), the read path (`engine.head.reads`, `Writer.reads`;
`get`/`scan` here are its shorthands), and membership change (`engine.head.membership`: the epoch
steps, `Writer.steps`, and the one driver of a replacement). This module keeps sequencing and the
senders, and the few hooks those modules call under its lock (`view`, `read_sources`,
`next_membership`, `adopt_membership`, `catch_up_inputs`, and `read_point` / `wait_vdl` for the read point stream
to reader instances, `engine.head.replica`).

Version collection: every append and heartbeat carries the collection point and the request
point (`engine.head.readpoints`: the least read point registered with `Writer.read_points`, and
the VDL as it was a moment ago); `open_snapshot` takes a read view and registers it in one hold
of the lock, and a scan without a view holds its own until it is consumed or dropped.

Metrics (`engine.metrics`): a sender observes each frame a node took (records, bytes) on the
`metrics` it was given, outside the lock; everything else (VDL, epoch, per-node lag behind the
PGCLs: `scl_lags()`) is read from `status()` when a scrape asks, at no cost to writes.
"""

from __future__ import annotations

import _thread
import bisect
import hashlib
import heapq
import threading
import logging  # after threading, which logging imports: tests/test_purity.py's guard names this module
import struct
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from engine import codec, sizes
from engine.core import conditions as cond
from engine.core.admission import Admission, admits, quorum_limit, record_cost_bytes, unit_cost_bytes, write_admission
from engine.core.constants import (
    BATCH_OPS_MAX,
    DEADLINE_US_MAX,
    EXPIRES_BYTES,
    FLAG_CPL,
    FLAG_DELETE,
    FLAG_EXPIRES,
    FLAG_PUT,
    OP_TTL,
    FLAG_REQUEST,
    FRAME_BYTES_MAX,
    LAL_DEFAULT,
    NAMESPACE_REQUESTS,
    READ_QUORUM,
    REQUEST_DIGEST_BYTES,
    REQUEST_ID_BYTES_MAX,
    REQUEST_TIME_BYTES,
    VALUE_BYTES_MAX,
    WRITE_QUORUM,
)
from engine.core.fencing import (
    FENCE,
    STEP_UP,
    SYNC,
    decide_epoch_refusal,
    refusal_needs_probe,
    step_up_holds,
    trace_epoch,
)
from engine.core.placement import protection_group_of
from engine.core.quorum import VolumeDurability, has_write_quorum
from engine.core.tail import TAIL_RECORDS_MAX, tail_trim
from engine.core.types import Geometry, Membership, NodeInfo, ReadPointUpdate, ReadView, RequestStatus
from engine.envelope import SEAL_OVERHEAD_BYTES, VolumeCipher
from engine.head.expiry import ExpiryStep
from engine.head.failover import lease_margin
from engine.head.membership import MembershipSteps
from engine.head.readpoints import ReadPointRegistry, VdlHistory
from engine.head.senders import SenderLoop
from engine.head.watch import WATCH_HOLD_LSNS_DEFAULT
from engine.head.reads import ReadPath, check_key
from engine.head.recovery import recover
from engine.head.weakening import SAFE, Weakening
from engine.errors import (
    EpochBehind,
    InvalidArgument,
    PreconditionFailed,
    SixfoldError,
    StaleEpoch,
    StorageFull,
    Unavailable,
    WriteIndeterminate,
)

log = logging.getLogger("sixfold.writer")

# Module constants: an Enum member looked up on its class costs ~10x a global on the submit path.
ADMIT_ALL = Admission.ALL
ADMIT_DELETES_ONLY = Admission.DELETES_ONLY
ADMIT_FULL = Admission.FULL
ADMIT_UNREACHABLE = Admission.UNREACHABLE

FRAME_RECORDS_MAX_SEND = 8192
HEARTBEAT_S = 0.1
#: A put record larger than this (LMDB's overflow: a value over about half a page) must fit in
#: one piece on a write quorum (`_extent_fits_locked`); the margin covers the record's header
#: and an encrypted value's seal.
EXTENT_CHECK_BYTES = 2048
EXTENT_MARGIN_BYTES = 4096
#: VDL advances whose times the writer keeps for the read-point stream (a few seconds' worth)
VDL_TIMES_MAX = 16_384
#: how long a linearizable read waits for the heartbeats to renew a lapsed lease
LEASE_RENEW_WAIT_S = 0.5
BACKOFF_S_MIN = 0.02
BACKOFF_S_MAX = 0.5
#: a link fault of a cause already logged is logged again if the link was healthy this long between
RELOG_S = 10.0
#: request ids this writer remembers in memory (the fast path of at-most-once): the most recent
#: ones it logged. Older ones, and those of earlier writers, are looked up in the log itself.
REQUEST_WINDOW_MAX = 65_536
#: the writer's memory of recent writes, against which it checks conditional writes (`_recent`):
#: at least the writes above VDL, and the newest ones at or below it up to these bounds (the
#: bytes are of the values it keeps references to; the tail holds their records anyway)
RECENT_WRITES_MAX = 65_536
RECENT_BYTES_MAX = 64 << 20
#: how many times `write` sends a conditional unit again whose stored-state read was too old
#: when it was ordered (the memory of recent writes had moved past it: rare, see `_recent`)
CONDITION_REREADS_MAX = 5
#: the changes the writer keeps in memory for watchers (`changes_after`), in entries and in value
#: bytes (WriterOptions.changes_max and changes_bytes_max); a watcher further behind reads the
#: nodes' logs instead (engine.head.watch)
CHANGES_MAX = 262_144
CHANGES_BYTES_MAX = 64 << 20
#: a request record's value is the digest of the unit's ops (a re-send must match it), then its
#: commit time (engine.core.constants; the archive's restore points, engine.backup)
_COMMIT_TIME = struct.Struct("<Q")
assert _COMMIT_TIME.size == REQUEST_TIME_BYTES
#: an expiring put's deadline (or, in an OP_TTL op, its time to live), the value's first bytes
_DEADLINE = struct.Struct("<Q")
assert _DEADLINE.size == EXPIRES_BYTES
#: expiring versions the writer remembers for the expiry step (engine.head.expiry); beyond it the
#: step finds them by a scan
EXPIRING_MAX = 1_000_000


@dataclass(frozen=True)
class WriterOptions:
    write_timeout_s: float = 5.0
    lal: int = LAL_DEFAULT
    local_az: str = "a"
    #: recovery re-replication and epoch sync wait this long for a write quorum
    recovery_timeout_s: float = 10.0
    #: the writer lease (engine.head.failover): linearizable reads are served only while a read
    #: quorum renewed it less than lease_s - LEASE_MARGIN ago (counted from the renewals' send
    #: times); None: no lease (the embedded engine, one process, never fails over)
    lease_s: float | None = None
    #: version collection (engine.head.readpoints): the collection point trails the VDL by this
    #: much (an unregistered linearizable read in flight reads at most that far back), and
    #: request-id records are kept this long for re-sends to be recognised from the log
    collect_delay_s: float = 0.1
    request_retention_s: float = 60.0
    #: the writer's memory of recent changes for watchers (`changes_after`): entries and value
    #: bytes; a watch from further back reads the nodes' logs (engine.head.watch)
    changes_max: int = CHANGES_MAX
    changes_bytes_max: int = CHANGES_BYTES_MAX
    #: how far behind the VDL a watch may hold version collection back, in LSNs (records): a
    #: watch further behind gets Compacted (engine.head.watch, WATCH_HOLD_LSNS_DEFAULT says why)
    watch_hold_lsns: int = WATCH_HOLD_LSNS_DEFAULT
    #: for this long after its open the writer sends no collection point above the one the nodes
    #: already had (its floor): the holders of the old writer's read points (watches and remote
    #: snapshots following a failover) have that long to register again; 0: none
    resume_grace_s: float = 0.0
    #: ship frames from one event loop thread (engine.head.senders) when the transport can
    #: (`append_async`: gRPC); False: one sender thread per node, as every other transport has
    sender_loop: bool = True


def check_request_id(request_id) -> None:
    if not isinstance(request_id, bytes):
        raise InvalidArgument(f"request ids are bytes, got {type(request_id).__name__}")
    if not 1 <= len(request_id) <= REQUEST_ID_BYTES_MAX:
        raise InvalidArgument(f"request id of {len(request_id)} bytes: request ids are 1..{REQUEST_ID_BYTES_MAX} bytes")


def ops_digest(ops, key: bytes = b"") -> bytes:
    """A digest of a unit's ops, kept in its request record: a re-send under the same id must
    carry the same ops (else it is another write reusing an id, and is refused). Keyed on an
    encrypted volume (a plain digest of a short value would confirm a guess of it)."""
    h = hashlib.blake2b(digest_size=REQUEST_DIGEST_BYTES, key=key)
    for flags, key, value in ops:
        h.update(b"%d %d %d " % (flags, len(key), len(value)))
        h.update(key)
        h.update(value)
    return h.digest()


def check_value(value) -> None:
    if not isinstance(value, bytes):
        raise InvalidArgument(f"values are bytes, got {type(value).__name__}")
    if len(value) > VALUE_BYTES_MAX:
        raise InvalidArgument(f"value of {len(value)} bytes: values are at most {VALUE_BYTES_MAX} bytes")


def node_status(st, pgcl: Sequence[int]) -> dict:
    """The public status fields of one node, from its NodeState and the writer's PGCLs (with its
    space: used and capacity bytes, the room left above its reserve, and whether none is; its
    maximum when it reports one, and a warning at `sizes.STORAGE_WARNING_PERCENT` or more)."""
    warning = sizes.storage_warning(st.node, st.used_bytes, st.capacity_bytes, st.space_low) if st.capacity_bytes else None
    space = {"max_storage_bytes": st.extra.get("max_storage_bytes"), "storage_warning": warning}
    return dict(
        {k: v for k, v in space.items() if v is not None},
        scl={pg: s for pg, s in enumerate(st.scls)},
        lag={pg: max(0, pgcl[pg] - s) for pg, s in enumerate(st.scls)},
        epoch=st.epoch,
        records=st.records,
        bytes=st.bytes,
        corrupt_found=st.corrupt_found,
        repaired=st.repaired,
        rebuild=st.extra.get("rebuild"),
        used_bytes=st.used_bytes,
        capacity_bytes=st.capacity_bytes,
        space_low=st.space_low,
        room_bytes=st.room_bytes,
        collected_records=st.collected_records,
        pages_used=st.pages_used,
        pages_bytes=st.pages_used * st.page_bytes,
        horizon_lsn=max(st.horizons, default=0),
    )


class _Ticket:
    """One atomic unit on its way: its ops, their PGs, its cost on a node (an upper bound of the
    bytes its records take there, `engine.core.admission`), and the lock its caller parks on."""

    __slots__ = ("ops", "pgs", "cost", "lock", "lsn", "error", "request_id", "digest", "plain_keys", "request_key",
                 "conditions", "seen", "has_puts", "largest_put")

    def __init__(
        self, ops, pgs, request_id: bytes | None = None, digest: bytes = b"", *, plain_keys=None, request_key=None,
    ) -> None:
        self.ops = ops
        #: whether the unit stores anything (a delete-only unit takes no room), and its largest
        #: put record's key and value bytes (one that must fit in one piece, see
        #: `_extent_fits_locked`): worked out here, by the caller, not under the writer's lock
        sizes_of_puts = [len(key) + len(value) for flags, key, value in ops if flags & FLAG_PUT]
        self.has_puts = bool(sizes_of_puts)
        self.largest_put = max(sizes_of_puts, default=0)
        #: preconditions (their keys as the ops carry them: index keys on an encrypted volume),
        #: and what the stored state was for the keys the writer did not remember when they were
        #: submitted: key -> (read point, lsn, value or None, deadline); see Writer._recent
        self.conditions: tuple = ()
        self.seen: dict | None = None
        #: on an encrypted volume the ops carry index keys, and these are the keys they hash
        #: (sealed into each put's value when its LSN is known); None otherwise
        self.plain_keys = plain_keys
        #: the key of the request record: the id, or its index key on an encrypted volume
        self.request_key = request_id if request_key is None else request_key
        #: the PG of every record the unit logs: its ops, then its request record if it has an id
        self.pgs = pgs
        #: what the unit's records take on a node, its request record included
        self.cost = unit_cost_bytes(ops) + (record_cost_bytes(len(self.request_key), len(digest) + REQUEST_TIME_BYTES) if request_id is not None else 0)
        if plain_keys is not None:  # a sealed value carries its key, a nonce and a tag
            self.cost += sum(SEAL_OVERHEAD_BYTES + len(k) for (flags, _ik, _v), k in zip(ops, plain_keys) if flags & FLAG_PUT)
        self.lock = _thread.allocate_lock()
        self.lock.acquire()
        self.lsn: int | None = None
        self.error: SixfoldError | None = None
        self.request_id = request_id
        self.digest = digest

    def puts(self) -> bool:
        return self.has_puts

    def done(self, lsn: int) -> _Ticket:
        """Mark the ticket as answered already (a re-send of a committed request)."""
        self.lsn = lsn
        self.lock.release()
        return self


class _Reread(Unavailable):
    """A conditional unit's read of the stored state was older than the writer's memory of recent
    writes reaches back when the unit was ordered: nothing was logged; `write` sends it again."""


class _InDoubt(Exception):
    """An unexpected error struck while the ledger or the tail was being changed: they may no
    longer agree with each other, so the writer must not go on acknowledging writes."""

    def __init__(self, where: str, cause: BaseException) -> None:
        super().__init__(f"{where}: {type(cause).__name__}: {cause}")
        self.where = where
        self.cause = cause


@dataclass(frozen=True)
class _Send:
    """What a sender sends its node next (`Writer._next_send`): the tail's records from LSN
    `start` (none: a heartbeat) and the frame's other fields."""

    start: int
    records: list
    hint: int
    epoch: int
    collect: int
    requests: int


class _NodeLink:
    """The writer's view of one node: what was sent, whether it answers, its sender thread."""

    def __init__(self, node_id: str) -> None:
        self.id = node_id
        self.sent_lsn = 0  # highest LSN this node acknowledged holding (or skipped past)
        self.up = True
        #: its last append was refused for lack of room (StorageFull); it still serves reads
        self.full = False
        #: its last append reply said it is within its space reserve (room for deletes only)
        self.space_low = False
        #: what this node can hold, in the writer's running total of logged costs: the room it
        #: reported above its reserve plus the cost of what it held by then (engine.core.admission)
        self.room_limit = 0
        #: the largest record it can store in one piece, as the running total allows (like
        #: room_limit: what it reported plus the cost of what it held then); None: not known
        self.extent_limit: int | None = None
        self.backoff_s = BACKOFF_S_MIN
        self.last_send = 0.0
        #: the link's current fault ("" while it is healthy)
        self.error = ""
        #: unexpected exceptions (bugs) its sender met, and the last of them
        self.errors = 0
        self.last_error = ""
        #: the cause last logged, so that each fault is logged once per change of cause
        self.logged = ""
        self.healthy_since = 0.0
        self.last_scls: tuple[int, ...] = ()
        self.thread: threading.Thread | None = None
        #: when the last append this node acknowledged was *sent* (the writer's clock): the node
        #: renewed the writer's lease no earlier than that (engine.head.failover)
        self.renewed_at = float("-inf")


class Writer:
    """The single writer of a volume."""

    def __init__(
        self,
        transport,
        nodes: Sequence[NodeInfo],
        geometry: Geometry,
        options: WriterOptions = WriterOptions(),
        *,
        background: bool = True,
        clock=time.monotonic,
        weakening: Weakening = SAFE,
        cipher: VolumeCipher | None = None,
        wall_clock_us: Callable[[], int] | None = None,
        metrics=None,
    ) -> None:
        self.transport = transport
        #: where each frame sent to a node is observed (`engine.metrics.Metrics.observe_flush`:
        #: records and bytes), once per frame; None: nowhere
        self.metrics = metrics
        #: commit times (stamped into request records): wall-clock microseconds, never going
        #: backwards (the floor: the newest this writer stamped, or one an archive holds)
        self._wall_clock_us = wall_clock_us or (lambda: time.time_ns() // 1000)
        self._commit_time_us = 0
        #: an encrypted volume's cipher (engine.envelope): keys hashed, values sealed; None: plain
        self.cipher = cipher
        self.weakening = weakening
        self.reads = ReadPath(self)
        self.steps = MembershipSteps(self)
        self._clock = clock
        self.nodes = tuple(nodes)
        self.geometry = geometry
        self.options = options
        self.P = geometry.protection_groups
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # senders wait here for records
        self._room = threading.Condition(self._lock)  # writers wait here for LAL / quorum
        self._tail: list[bytes] = []
        self._tail_base = 1  # LSN of _tail[0]
        #: the running total of the cost of every record logged (engine.core.admission), and the
        #: total through each record of the tail (a unit's whole cost on its last record, so that a
        #: node holding part of a unit is not credited with room it has not given)
        self._logged_cost = 0
        self._tail_costs: list[int] = []
        self._trimmed_cost = 0  # the total through the record just below the tail
        #: the most the running total may reach with a put (quorum_limit); None: recompute
        self._put_limit: int | None = None
        self._waiters: deque[tuple[int, object]] = deque()
        #: (VDL, wall-clock time) of each VDL advance, newest last: when a commit became durable,
        #: which the read-point stream stamps on its updates (replica lag); bounded
        self._vdl_times: deque[tuple[int, float]] = deque(maxlen=VDL_TIMES_MAX)
        self._inbox: deque[_Ticket] = deque()  # submitted, not yet given LSNs
        self._senders_waiting = 0
        #: the sender loop (engine.head.senders) when the transport has `append_async`; None:
        #: one sender thread per node. `_loop_waiting`: the nodes whose loop senders may be
        #: waiting for records (named when one finds nothing, before its last look at the
        #: inbox; a wake clears it)
        self._sender_loop = None
        self._loop_waiting: set[str] = set()
        #: (start LSN, records, frame, index or None) of the last frame a sender built
        #: (`_indexed_frame_of`); `_hand_indexed`: the transport takes a frame with its index
        #: (`Transport.append_indexed`: nodes in this process), so it is indexed once, not per node
        self._last_frame: tuple | None = None
        self._hand_indexed = bool(getattr(transport, "hands_indexed_frames", False))
        self._closed = False
        self._fenced: str | None = None
        #: the error new writes get once fenced: StaleEpoch (a newer writer) or Unavailable (self-fenced)
        self._fenced_error: type[SixfoldError] = StaleEpoch
        self._in_doubt = False
        self.epoch = 0
        #: held while the epoch is decided or moved (a refusal's step-up, a membership step), never
        #: while holding _lock: refusals are decided one at a time (engine.core.fencing)
        self.epoch_lock = threading.Lock()
        #: A membership step that could not own its epoch yet (`MembershipSteps.take`), and the
        #: nodes this writer sealed at that epoch itself (epoch -> node ids): they refuse our
        #: appends at the current epoch, but they are ours, not another writer's.
        self.pending_step: Membership | None = None
        self.own_seals: dict[int, set[str]] = {}
        self.ledger: VolumeDurability | None = None
        self.links: dict[str, _NodeLink] = {}
        self.recovery: dict = {}
        self.truncations: tuple = ()
        self._background = background
        self.stats = {"flushes": 0, "records_sent": 0, "requests_deduplicated": 0}
        #: gets answered from `_recent` without asking a segment (`remembered`)
        self.reads_from_memory = 0
        #: request id -> the ticket that logged it, for the last REQUEST_WINDOW_MAX ids this writer
        #: logged (guarded by the lock): a re-send of one of them joins it instead of logging again
        self._requests: OrderedDict[bytes, _Ticket] = OrderedDict()
        #: what may be logged now (engine.core.admission); None: recompute (a link changed state)
        self._admission: Admission | None = None
        #: who reads the past (engine.head.readpoints): snapshots, scans, readers, the archiver
        self.read_points = ReadPointRegistry(clock)
        self._collect_delay = VdlHistory(options.collect_delay_s)
        self._request_retention = VdlHistory(options.request_retention_s, young=0)
        #: Conditional writes (`engine.core.conditions`) are checked against this: key (as the
        #: ops carry it) -> (lsn, value or None for a delete, deadline) of the newest write this
        #: writer ordered, for every write above `_recent_floor`. Kept in order of LSN by
        #: `_recent_order` ((lsn, key, bytes)); entries at or below VDL are dropped oldest first
        #: beyond RECENT_WRITES_MAX / RECENT_BYTES_MAX, raising the floor. A key not in it was last
        #: written at or below the floor: a read of the stored state at any read point at or
        #: above the floor tells its version, and a conditional unit brings one (`submit`).
        self._recent: dict[bytes, tuple[int, bytes | None, int]] = {}
        self._recent_order: deque[tuple[int, bytes, int]] = deque()
        self._recent_bytes = 0
        self._recent_floor = 0
        #: the log's time (engine.head.expiry): (CPL LSN, commit time) of each unit logged with a
        #: stamp (a request record) and not yet durable; the stamp of the newest durable one is
        #: `_durable_time_us`, what reads compare deadlines against
        self._stamps: deque[tuple[int, int]] = deque()
        self._durable_time_us = 0
        #: (deadline, plain key, LSN) of the expiring versions this writer ordered, a heap for the
        #: expiry step; `expiring_overflow` once more than EXPIRING_MAX were left in it
        self.expiring: list[tuple[int, bytes, int]] = []
        self.expiring_overflow = False
        #: Changes for watchers (`changes_after`): (CPL LSN of the unit, plain key, value or None
        #: for a delete) of every op this writer ordered, in log order; every unit whose CPL is
        #: above `_changes_floor` is in it whole. Bounded by options.changes_max and
        #: changes_bytes_max, dropped oldest unit first (which raises the floor); a watch from
        #: below the floor reads the nodes' logs (engine.head.watch).
        self._changes: deque[tuple[int, bytes, bytes | None]] = deque()
        self._changes_max = options.changes_max
        self._changes_bytes_max = options.changes_bytes_max
        #: until when (the writer's clock) the collection point stays at the floor the writer
        #: opened with (options.resume_grace_s; set by open)
        self._grace_until = float("-inf")
        self._changes_bytes = 0
        self._changes_floor = 0
        #: the expiry step (engine.head.expiry), a thread while the writer serves; None without
        #: background threads (a simulator drives `expiry_step()` itself)
        self.expiry: ExpiryStep | None = None
        self.stats["conditions_failed"] = 0
        self.stats["condition_rereads"] = 0

    # --- lifecycle --------------------------------------------------------------------------
    def open(self) -> None:
        """Recover the volume at a new epoch (`engine.head.recovery`), then start the senders."""
        t0 = self._clock()
        r = recover(self.transport, self.nodes, self.P, lal=self.options.lal)
        plan, membership, synced, sealed = r.plan, r.membership, r.synced, r.sealed
        self.epoch = r.epoch
        self.truncations = plan.truncations
        replicated = r.replicated
        self.ledger = VolumeDurability(
            self.P, membership, vdl=plan.vdl, next_lsn=plan.next_lsn, tails=plan.tails, lal=self.options.lal,
            write_quorum=self.weakening.write_quorum or WRITE_QUORUM,
        )
        self._tail_base = plan.next_lsn
        # Every write of an earlier writer that survived recovery is at or below its VDL.
        self._recent_floor = plan.vdl
        self._changes_floor = plan.vdl
        for n in membership.all_nodes:
            self.links[n] = _NodeLink(n)
        for n in synced:
            # The seal renewed the lease on every node that took it (engine.head.failover).
            self.links[n].renewed_at = t0
            try:
                st = self.transport.state(n)
            except SixfoldError:
                continue
            if st.epoch == self.epoch:
                for pg, scl in enumerate(st.scls):
                    self.ledger.scls[pg][n] = scl
            # Known before the first append reply: a put right after an open must not draw on the
            # reserve of nodes that are already low (an application that opens, puts and closes
            # again would otherwise eat, open by open, the room kept for deletes), nor take more
            # room than they have. Nothing is logged yet: the room is the limit.
            self.links[n].space_low = st.space_low
            self.links[n].room_limit = st.room_bytes
            self.links[n].extent_limit = st.extent_bytes
            # The nodes may have collected at an old writer's points: no read point below that.
            # (A horizon is never above a VDL announced, so never above the one recovered.)
            self.read_points.raise_floor(min(max(st.horizons, default=0), plan.vdl))
            # The log's time never goes backwards across writers: every durable stamp is on a
            # write quorum, so on one of the nodes this writer synced (each keeps its newest).
            t = st.extra.get("commit_time_us", 0) if isinstance(st.extra, dict) else 0
            if type(t) is int and 0 < t <= DEADLINE_US_MAX:
                self._commit_time_us = max(self._commit_time_us, t)
                self._durable_time_us = max(self._durable_time_us, t)
        # The old writer's watches and remote snapshots do not know of this one yet: give them
        # a moment to register before anything they still read is collected (resume_grace_s).
        self._grace_until = t0 + self.options.resume_grace_s
        self.recovery = {
            "epoch": self.epoch,
            "vdl": plan.vdl,
            "vcl": plan.vcl,
            "base": plan.base,
            "truncated": [plan.truncation.first, plan.truncation.last] if plan.truncation else None,
            "sealed": sorted(sealed),
            "replicated_records": replicated,
            "seconds": round(self._clock() - t0, 4),
        }
        log.info("opened at epoch %d: VDL %d, %d record(s) re-replicated, sealed %s",
                 self.epoch, plan.vdl, replicated, ", ".join(sorted(sealed)))
        if self._background:
            if self.options.sender_loop and SenderLoop.serves(self.transport):
                self._sender_loop = SenderLoop(self)
                for link in self.links.values():
                    self._sender_loop.add(link)
            else:
                for link in self.links.values():
                    self._start_sender_thread(link)
            self.expiry = ExpiryStep(self)
            self.expiry.start()

    def close(self) -> None:
        """Stop the senders after in-flight records had a chance to become durable."""
        deadline = time.monotonic() + 2.0
        while self._background and self.ledger is not None and time.monotonic() < deadline:
            with self._lock:
                if (not self._waiters and not self._inbox) or self._fenced or self._closed:
                    break
            time.sleep(0.005)
        self.abandon()

    def abandon(self) -> None:
        """Stop at once, as a crash would: in-flight writes become indeterminate."""
        with self._lock:
            self._closed = True
            self._sequence_locked()  # refuses what was never logged
            self._wake_senders_locked(stop=True)
            self._room.notify_all()
            waiters, self._waiters = self._waiters, deque()
        for _lsn, lock in waiters:
            lock.release()
        if self.expiry is not None:
            self.expiry.stop()
        for link in self.links.values():
            if link.thread is not None and link.thread is not threading.current_thread():
                link.thread.join(timeout=5)
        if self._sender_loop is not None:
            self._sender_loop.join(timeout=5)

    # --- what callers may ask ---------------------------------------------------------------
    @property
    def serving(self) -> bool:
        """True while the writer is open: neither closed nor fenced."""
        return self.ledger is not None and not self._closed and not self._fenced

    @property
    def fenced(self) -> str | None:
        """Why the writer was fenced (by a newer writer, or by itself), or None."""
        return self._fenced

    def check_usable(self) -> None:
        """Raise what a new write would get if the writer stopped: Unavailable or StaleEpoch."""
        if self._closed:
            raise Unavailable("the writer stopped (crashed or closed); nothing was logged")
        if self._fenced:
            raise self._fenced_error(self._fenced)

    def membership(self) -> Membership:
        """The membership the writer runs at (both quorum sets during a change)."""
        with self._lock:
            return self.ledger.membership

    # --- writes -----------------------------------------------------------------------------
    def _admission_locked(self) -> Admission:
        # Recomputed only when a link changes state (caller holds the lock).
        adm = self._admission
        if adm is None:
            links = self.links
            adm = self._admission = write_admission(
                (n for n, link in links.items() if link.up),
                (n for n, link in links.items() if link.full),
                (n for n, link in links.items() if link.space_low),
                self.ledger.membership,
                self.ledger.write_quorum,
            )
        return adm

    def _put_limit_locked(self) -> int:
        """The most the running total of logged costs may reach with a put: `quorum_limit` of the
        nodes that take puts (neither full nor low; an unreachable one by the room it last
        reported: whether enough nodes answer is admission's other question, which waits or
        answers Unavailable, never StorageFull). Recomputed only when a link's room or state
        changed (caller holds the lock)."""
        limit = self._put_limit
        if limit is None:
            limit = self._put_limit = quorum_limit(
                {n: link.room_limit for n, link in self.links.items() if not link.full and not link.space_low},
                self.ledger.membership,
                self.ledger.write_quorum,
            )
        return limit

    def _cost_through_locked(self, lsn: int) -> int:
        """The running total of logged costs through record `lsn` (caller holds the lock). Below
        the tail it is the total at the tail's start: a node that missed trimmed records gets them
        from its peers, and its next reply's room counts them."""
        i = lsn - self._tail_base
        if i < 0:
            return self._trimmed_cost
        costs = self._tail_costs
        return costs[i] if i < len(costs) else self._logged_cost

    def _room_of_locked(self, link: _NodeLink) -> int:
        """The room `link`'s node has left above its reserve, as far as the writer knows: what it
        reported, less what was logged since that it did not yet hold."""
        return 0 if link.full or link.space_low else max(0, link.room_limit - self._logged_cost)

    def _room_refusal_locked(self, cost: int) -> StorageFull:
        def room(link: _NodeLink) -> str:
            what = "full" if link.full else "low on space" if link.space_low else f"{self._room_of_locked(link)} bytes"
            return what if link.up else f"{what}, unreachable"

        room = ", ".join(f"{n} {room(self.links[n])}" for n in self.ledger.membership.all_nodes)
        return StorageFull(
            f"write refused: it needs about {cost} bytes on each of a write quorum of nodes, and no write quorum has "
            f"that much room left above its reserve (room: {room}). Nothing was logged; deletes still work, and "
            "smaller puts may still fit."
        )

    def _extent_fits_locked(self, size: int) -> bool:
        ok = [n for n, link in self.links.items() if not link.full and not link.space_low
              and (link.extent_limit is None or link.extent_limit - self._logged_cost >= size)]
        return has_write_quorum(ok, self.ledger.membership)

    def _extent_refusal_locked(self, size: int) -> StorageFull:
        def extent(link: _NodeLink) -> str:
            if link.full or link.space_low:
                return "full" if link.full else "low on space"
            return "?" if link.extent_limit is None else f"{max(0, link.extent_limit - self._logged_cost)} bytes"

        room = ", ".join(f"{n} {extent(self.links[n])}" for n in self.ledger.membership.all_nodes)
        return StorageFull(
            f"write refused: a record of {size} bytes must be stored in one piece, and no write quorum of nodes has "
            f"that much room left beyond its data (largest piece: {room}; room freed by deletes and collection "
            "takes smaller records). Nothing was logged; deletes and smaller puts still work."
        )

    def _space_locked(self) -> str:
        """The members out of space, as a person reads it ("" when none is)."""
        members = self.ledger.membership.all_nodes
        full = [n for n in members if self.links[n].full]
        low = [n for n in members if self.links[n].space_low and not self.links[n].full]
        parts = ([f"full: {', '.join(full)}"] if full else []) + ([f"low on space: {', '.join(low)}"] if low else [])
        return "; ".join(parts)

    def _storage_full_locked(self, admission: Admission, what: str) -> StorageFull:
        members = self.ledger.membership.all_nodes
        links = self.links
        if admission is ADMIT_FULL:
            room = [n for n in members if links[n].up and not links[n].full]
            return StorageFull(
                f"{what}: nodes are out of space ({self._space_locked()}); the reachable nodes with any room "
                f"({', '.join(room) or 'none'}) are not a write quorum, not even for deletes. Nothing was logged."
            )
        room = [n for n in members if links[n].up and not links[n].full and not links[n].space_low]
        return StorageFull(
            f"{what}: nodes are out of space ({self._space_locked()}); the reachable nodes with room for new "
            f"data ({', '.join(room) or 'none'}) are not a write quorum. Nothing was logged; deletes still work."
        )

    def submit(
        self,
        ops: Sequence[tuple[int, bytes, bytes]],
        *,
        block: bool = True,
        request_id: bytes | None = None,
        resend: bool = False,
        conditions: Sequence[cond.Condition] = (),
    ) -> tuple[int | None, _Ticket]:
        """Hand `ops` (flags, key, value) to the writer as one atomic unit; return (lsn, ticket).

        The fast path takes no lock: the ticket goes into the inbox, and whichever sender runs
        next gives the whole inbox its LSNs in one go (so 64 callers cost one lock hand-off per
        flush, not 64). `lsn` is known at once only without background senders (a simulator);
        `wait(ticket)` works either way. With no reachable write quorum, waits up to the write
        timeout (not at all if `block` is false) and raises Unavailable; when the nodes with room
        are not a write quorum, raises StorageFull at once. Either way nothing was logged.

        With a `request_id` the unit also logs a request record (the id and a digest of the ops),
        as its last record, so that whether it committed is in the log (`request_status`), and a
        re-send under the same id is applied at most once: one this writer logged recently joins
        the first (it is in memory); with `resend` an id not in memory is looked up in the log
        first (an earlier writer may have committed it).

        With `conditions` (checked `engine.core.conditions.Condition`s) the unit is logged only if
        every one holds when the writer orders it, under its lock; else its ticket fails with
        PreconditionFailed and nothing is logged. Keys this writer wrote recently are checked
        against its memory of them; the others are read here first, before the lock, at the
        current read point (one read per such key), and that read is trusted under the lock only
        if the memory still reaches back to it (else `_Reread`, nothing logged)."""
        assert 1 <= len(ops) <= BATCH_OPS_MAX
        assert all(not flags & FLAG_REQUEST for flags, _k, _v in ops), "request records are the writer's own"
        cipher = self.cipher
        plain_keys = request_key = None
        digest_key = b""
        if cipher is not None:
            for _f, key, value in ops:
                if len(value) + SEAL_OVERHEAD_BYTES + len(key) > VALUE_BYTES_MAX:
                    raise InvalidArgument(
                        f"value of {len(value)} bytes: on an encrypted volume a value and its key take at most "
                        f"{VALUE_BYTES_MAX - SEAL_OVERHEAD_BYTES} bytes together"
                    )
            plain_keys = [key for _f, key, _v in ops]
            plain_ops = ops
            ops = [(flags, cipher.index_key(key), value) for flags, key, value in ops]
            digest_key = cipher.digest_key()
        else:
            plain_ops = ops
        pgs = [protection_group_of(key, self.P) for _f, key, _v in ops]
        if request_id is None:
            ticket = _Ticket(ops, pgs, plain_keys=plain_keys)
        else:
            check_request_id(request_id)
            if cipher is not None:
                request_key = cipher.index_key(request_id)
            ticket = _Ticket(
                ops, pgs + [protection_group_of(request_key or request_id, self.P)], request_id,
                ops_digest(plain_ops, digest_key), plain_keys=plain_keys, request_key=request_key,
            )
            if resend and request_id not in self._requests:
                logged = self._logged_request(request_id)
                if logged is not None:
                    lsn, digest = logged
                    self._check_digest(ticket, digest, lsn)
                    self.stats["requests_deduplicated"] += 1
                    return lsn, ticket.done(lsn)
        if conditions:
            self._prepare_conditions(ticket, conditions)
        if self._closed or self._fenced or self._admission is not ADMIT_ALL:
            self._admit(ticket, block)
        self._inbox.append(ticket)
        if not self._background:
            try:
                with self._lock:
                    self._sequence_locked()
            except _InDoubt as e:
                self._fence_in_doubt(e)
            if ticket.error is not None:
                raise ticket.error
            return ticket.lsn, ticket
        if self._senders_waiting or self._loop_waiting:
            with self._lock:
                self._wake_senders_locked()
        return None, ticket

    def _admit(self, ticket: _Ticket, block: bool) -> None:
        """The slow path of submit: wait (bounded) for a reachable write quorum, or refuse."""
        deadline = self._clock() + self.options.write_timeout_s
        with self._lock:
            while True:
                self.check_usable()
                adm = self._admission_locked()
                if adm is ADMIT_ALL:
                    return
                if adm is not ADMIT_UNREACHABLE:
                    if admits(adm, ticket.puts()):
                        return
                    raise self._storage_full_locked(adm, "write refused")
                left = deadline - self._clock() if block else 0
                if left <= 0:
                    up = sorted(n for n, link in self.links.items() if link.up)
                    raise Unavailable(
                        f"write refused: only {len(up)} segments reachable ({', '.join(up) or 'none'}); "
                        f"a write needs {WRITE_QUORUM} of each quorum set "
                        f"({' and '.join('/'.join(qs) for qs in self.ledger.membership.quorum_sets)}). Nothing was logged."
                    )
                self._room.wait(min(left, 0.05))

    def _sequence_locked(self) -> None:
        """Give every ticket in the inbox its LSNs (consecutive; the unit's last one a CPL), encode
        its records once into the tail, and park it until VDL covers it. Caller holds the lock.

        An unexpected error here leaves LSNs allocated without records, or records without a
        waiter: it is raised as _InDoubt, and the writer fences itself."""
        try:
            self._sequence_inbox_locked()
        except Exception as e:
            raise _InDoubt("giving writes their LSNs", e) from e

    def _sequence_inbox_locked(self) -> None:
        inbox, ledger, tail, waiters = self._inbox, self.ledger, self._tail, self._waiters
        refuse = self._closed or self._fenced
        # Admitted writes that the space on the nodes no longer admits are refused, unlogged.
        adm = self._admission
        if adm is None and not refuse:
            adm = self._admission_locked()
        space_check = adm is ADMIT_DELETES_ONLY or adm is ADMIT_FULL
        put_limit = -1 if refuse else self._put_limit_locked()  # no link changes in this loop
        recent, recent_order = self._recent, self._recent_order
        if len(recent_order) > RECENT_WRITES_MAX or self._recent_bytes > RECENT_BYTES_MAX:
            self._forget_recent_locked()
        while inbox:
            ticket = inbox[0]
            if refuse:
                inbox.popleft()
                ticket.error = Unavailable(
                    f"this write was not logged: {self._fenced}" if self._fenced
                    else "the writer stopped (crashed or closed) before logging this write"
                )
                ticket.lock.release()
                continue
            if space_check and not admits(adm, ticket.puts()):
                inbox.popleft()
                ticket.error = self._storage_full_locked(adm, "write refused")
                ticket.lock.release()
                continue
            rid = ticket.request_id
            if rid is not None and rid in self._requests:
                inbox.popleft()
                self._join_locked(ticket, self._requests[rid])
                continue
            # A put must fit, with everything logged before it, on a write quorum of the nodes that
            # take puts: logged, a unit that cannot be stored would hold up every later record.
            cost = ticket.cost
            if self._logged_cost + cost > put_limit and ticket.puts():
                inbox.popleft()
                ticket.error = self._room_refusal_locked(cost)
                ticket.lock.release()
                continue
            # A record larger than a page needs consecutive pages, which the room freed inside a
            # node's file (collected versions) may not offer: it must fit beyond the file's end.
            big = ticket.largest_put
            if big > EXTENT_CHECK_BYTES and not self._extent_fits_locked(big + EXTENT_MARGIN_BYTES):
                inbox.popleft()
                ticket.error = self._extent_refusal_locked(big)
                ticket.lock.release()
                continue
            if not ledger.can_allocate(len(ticket.pgs)):
                return  # LAL: the rest waits until VDL moves on
            # The unit's commit time, taken now: after its caller submitted it, before anyone
            # can be told it committed; its conditions and time to live are judged at it.
            self._commit_time_us = stamp = max(self._commit_time_us, self._wall_clock_us())
            if ticket.conditions and not self._conditions_hold_locked(ticket, stamp):
                inbox.popleft()
                self._refuse_conditional_locked(ticket)
                continue
            inbox.popleft()
            allocs = ledger.allocate(ticket.pgs)
            ops = ticket.ops
            last = len(ticket.pgs) - 1
            plain_keys = ticket.plain_keys
            for i, ((lsn, prev), (flags, key, value), pg) in enumerate(zip(allocs, ops, ticket.pgs)):
                if flags & FLAG_EXPIRES:
                    if flags & OP_TTL:  # a time to live becomes a deadline on the log's clock
                        flags &= ~OP_TTL
                        deadline = min(stamp + _DEADLINE.unpack_from(value)[0], DEADLINE_US_MAX)
                        value = _DEADLINE.pack(deadline) + value[EXPIRES_BYTES:]
                    else:
                        deadline = _DEADLINE.unpack_from(value)[0]
                    recent[key] = (lsn, value[EXPIRES_BYTES:], deadline)
                    recent_order.append((lsn, key, len(value)))
                    self._recent_bytes += len(value)
                    if len(self.expiring) < EXPIRING_MAX:
                        heapq.heappush(self.expiring, (deadline, key if plain_keys is None else plain_keys[i], lsn))
                    else:
                        self.expiring_overflow = True
                    if plain_keys is not None:  # the deadline stays outside the seal, for the nodes
                        value = value[:EXPIRES_BYTES] + self.cipher.seal(pg, lsn, key, plain_keys[i], value[EXPIRES_BYTES:])
                elif flags & FLAG_PUT:
                    recent[key] = (lsn, value, 0)
                    recent_order.append((lsn, key, len(value)))
                    self._recent_bytes += len(value)
                    if plain_keys is not None:  # sealed now: its LSN is in the AD
                        value = self.cipher.seal(pg, lsn, key, plain_keys[i], value)
                else:
                    recent[key] = (lsn, None, 0)
                    recent_order.append((lsn, key, 0))
                tail.append(codec.encode_record(lsn, prev, pg, flags | (FLAG_CPL if i == last else 0), key, value))
            if rid is not None:  # the request record closes the unit and carries its CPL and commit time
                lsn, prev = allocs[-1]
                self._stamps.append((lsn, stamp))
                tail.append(codec.encode_record(
                    lsn, prev, ticket.pgs[-1], FLAG_PUT | FLAG_REQUEST | FLAG_CPL, ticket.request_key,
                    ticket.digest + _COMMIT_TIME.pack(stamp),
                ))
                self._requests[rid] = ticket
                if len(self._requests) > REQUEST_WINDOW_MAX:
                    self._requests.popitem(last=False)
            cpl = allocs[-1][0]
            changes = self._changes
            for i, (flags, key, value) in enumerate(ops):
                plain = key if plain_keys is None else plain_keys[i]
                if flags & FLAG_PUT:
                    value = value[EXPIRES_BYTES:] if flags & FLAG_EXPIRES else value
                    changes.append((cpl, plain, value))
                    self._changes_bytes += len(value)
                else:
                    changes.append((cpl, plain, None))
            if len(changes) > self._changes_max or self._changes_bytes > self._changes_bytes_max:
                self._forget_changes_locked()
            if last:
                self._tail_costs.extend([self._logged_cost] * last)
            self._logged_cost += cost
            self._tail_costs.append(self._logged_cost)
            ticket.lsn = allocs[-1][0]
            waiters.append((ticket.lsn, ticket.lock))

    # --- conditional writes -------------------------------------------------------------------
    def _prepare_conditions(self, ticket: _Ticket, conditions: Sequence[cond.Condition]) -> None:
        """Attach the conditions to the ticket (keys as the ops carry them), and read the stored
        version of each key this writer does not remember writing: before the lock, one read
        per key, all at one read point (`_conditions_hold_locked` decides if it is recent enough)."""
        cipher = self.cipher
        plain = tuple(conditions)
        if cipher is not None:
            conditions = tuple(cond.Condition(cipher.index_key(c.key), c.kind, c.value, c.lsn) for c in plain)
        ticket.conditions = tuple(conditions)
        recent = self._recent
        unknown = [(c.key, p.key) for c, p in zip(ticket.conditions, plain) if c.key not in recent]
        if not unknown:
            return
        view = self.view()
        seen = {}
        for key, plain_key in unknown:
            if key not in seen:
                lsn, value, deadline = self.reads.version(plain_key, view=view)
                seen[key] = (view.read_point, lsn, value, deadline)
        ticket.seen = seen

    def _conditions_hold_locked(self, ticket: _Ticket, now_us: int) -> bool:
        """Whether every condition of the ticket holds now (in the order of the log: after every
        unit ordered before it, durable or not). If not, the ticket gets its error (nothing will
        be logged). Caller holds the lock; no I/O."""
        recent, seen, floor = self._recent, ticket.seen or {}, self._recent_floor
        failed, notes = [], []
        newest = 0  # the newest version the check looked at
        for i, c in enumerate(ticket.conditions):
            version = recent.get(c.key)
            if version is None:
                s = seen.get(c.key)
                if s is None or s[0] < floor:
                    self.stats["condition_rereads"] += 1
                    ticket.error = _Reread(
                        "the writer's memory of recent writes moved past the read made for this write's conditions "
                        "before it was ordered; nothing was logged: send it again"
                    )
                    return False
                version = s[1:]
            lsn, value, deadline = version
            newest = max(newest, lsn)
            if not cond.holds(c, lsn, value, deadline, now_us):
                failed.append(i)
                notes.append(f"#{i} {c.describe()}: found {cond.found(lsn, value, deadline, now_us)}")
        if not failed:
            return True
        self.stats["conditions_failed"] += 1
        ticket.lsn = newest
        ticket.error = PreconditionFailed(
            f"{len(failed)} of {len(ticket.conditions)} condition(s) failed, nothing was logged: " + "; ".join(notes),
            tuple(failed),
        )
        return False

    def _refuse_conditional_locked(self, ticket: _Ticket) -> None:
        """Answer a unit whose conditions failed (its error is set). A refusal is a read: it
        may rest on a write not yet durable (`ticket.lsn`, the newest version its check saw), and
        must not be told before that write is, or a read after the refusal could still miss the
        write the refusal saw (and a recovery could cut it). So it waits in the queue of waiters
        like a write at that LSN; `wait` turns it into Unavailable if that LSN never got durable."""
        lsn = ticket.lsn or 0
        if lsn <= self.ledger.vdl:
            ticket.lock.release()
            return
        waiters = self._waiters
        waiters.insert(bisect.bisect_right(waiters, lsn, key=lambda w: w[0]), (lsn, ticket.lock))

    def _forget_changes_locked(self) -> None:
        """Drop the oldest units' changes until the bounds hold again (down to 3/4 of them)."""
        changes = self._changes
        count_max, bytes_max = self._changes_max * 3 // 4, self._changes_bytes_max * 3 // 4
        while changes and (len(changes) > count_max or self._changes_bytes > bytes_max):
            cpl = changes[0][0]
            while changes and changes[0][0] == cpl:
                _c, _k, v = changes.popleft()
                self._changes_bytes -= len(v) if v is not None else 0
            self._changes_floor = cpl

    def changes_after(self, position: int, count_max: int) -> tuple[list[tuple[int, bytes, bytes | None]], int] | None:
        """Committed changes (CPL, key, value or None) of the units after `position`, in log
        order, whole units, at most about `count_max`, from the writer's memory of them; and
        the position the next call goes on from (the last CPL given, or the VDL when none is
        left below it). None when the memory does not reach back to `position` (it keeps the
        units after `changes_floor()`): `engine.head.watch` then reads the nodes' logs."""
        with self._lock:
            self.check_usable()
            vdl = self.ledger.vdl
            if position < self._changes_floor:
                return None
            changes = self._changes
            i = bisect.bisect_right(changes, position, key=lambda c: c[0])
            out = []
            last = position
            while i < len(changes):
                c = changes[i]
                if c[0] > vdl or (len(out) >= count_max and c[0] != last):
                    break
                out.append(c)
                last = c[0]
                i += 1
            return out, (last if out else max(position, vdl))

    def changes_floor(self) -> int:
        """The oldest position the writer's memory of changes serves a watch from."""
        return self._changes_floor

    def _forget_recent_locked(self) -> None:
        """Drop the oldest remembered writes at or below VDL beyond the bounds, raising the floor
        to the newest LSN dropped. Caller holds the lock."""
        order, recent, vdl = self._recent_order, self._recent, self.ledger.vdl
        while order and (len(order) > RECENT_WRITES_MAX // 2 or self._recent_bytes > RECENT_BYTES_MAX // 2):
            lsn, key, size = order[0]
            if lsn > vdl:
                break
            order.popleft()
            self._recent_bytes -= size
            self._recent_floor = max(self._recent_floor, lsn)
            version = recent.get(key)
            if version is not None and version[0] == lsn:
                del recent[key]

    def _join_locked(self, ticket: _Ticket, first: _Ticket) -> None:
        """`ticket` re-sends a request this writer logged as `first`: answer it with first's LSN
        once that is durable, logging nothing. Caller holds the lock."""
        try:
            self._check_digest(ticket, first.digest, first.lsn)
        except InvalidArgument as e:
            ticket.error = e
            ticket.lock.release()
            return
        self.stats["requests_deduplicated"] += 1
        ticket.lsn = first.lsn
        if first.lsn <= self.ledger.vdl:
            ticket.lock.release()
            return
        # Waiters are kept in LSN order; a joiner waits for an LSN already in the queue.
        waiters = self._waiters
        waiters.insert(bisect.bisect_right(waiters, first.lsn, key=lambda w: w[0]), (first.lsn, ticket.lock))

    @staticmethod
    def _check_digest(ticket: _Ticket, digest: bytes, lsn: int) -> None:
        if digest != ticket.digest:
            raise InvalidArgument(
                f"request id {ticket.request_id!r} was already used for another write (logged at LSN {lsn}); "
                "a request id names one write: send a new write with a new id"
            )

    def _logged_request(self, request_id: bytes) -> tuple[int, bytes] | None:
        """(CPL LSN, ops digest) of the request record of `request_id` at or below VDL, from the
        segments (one known complete, else a read quorum), or None when no such record exists:
        then the request never committed (it was not logged, or a recovery cut it)."""
        key = request_id if self.cipher is None else self.cipher.index_key(request_id)
        r = self.reads.lookup(key, namespace=NAMESPACE_REQUESTS, what="a request-id lookup")
        return None if r is None or r.lsn == 0 else (r.lsn, (r.value or b"")[:REQUEST_DIGEST_BYTES])

    def take_due(self, now_us: int, count_max: int) -> list[tuple[int, bytes, int]]:
        """Pop up to `count_max` expiring versions whose deadline is at or before `now_us`:
        (deadline, plain key, LSN), earliest first (the expiry step deletes them)."""
        out = []
        with self._lock:
            heap = self.expiring
            while heap and heap[0][0] <= now_us and len(out) < count_max:
                out.append(heapq.heappop(heap))
        return out

    def note_expiring(self, versions) -> None:
        """Remember expiring versions (plain key, LSN, deadline) found by a scan, or not deleted yet."""
        with self._lock:
            for key, lsn, deadline in versions:
                if len(self.expiring) >= EXPIRING_MAX:
                    self.expiring_overflow = True
                    return
                heapq.heappush(self.expiring, (deadline, key, lsn))

    def clear_expiring_overflow(self) -> None:
        """A scan of the volume starts: what it finds replaces the heap (nothing is lost)."""
        with self._lock:
            self.expiring_overflow = False
            self.expiring = []

    def log_time_us(self) -> int:
        """The log's time: the commit time of the newest durable unit that carries one (or, when
        no unit of this writer is durable yet, the newest any node held at its open). Never goes
        backwards, also across writers; reads hide a version whose deadline is at or before it."""
        return self._durable_time_us

    def clock_us(self) -> int:
        """The writer's clock as a commit would stamp it now (never below the log's time): what
        a time to live is counted down against for display (`Database.ttl`)."""
        return max(self._commit_time_us, self._wall_clock_us())

    def raise_commit_time_floor(self, time_us: int) -> None:
        """Stamp no commit time below `time_us` from now on: a writer after a failover takes the
        newest time its volume's archive holds, so commit times never go backwards across writers."""
        with self._lock:
            self._commit_time_us = max(self._commit_time_us, int(time_us))

    def request_status(self, request_id: bytes) -> RequestStatus:
        """Whether the write sent under `request_id` committed (see RequestStatus)."""
        check_request_id(request_id)
        with self._lock:
            self.check_usable()
            t = self._requests.get(request_id)
            if t is not None:
                state = "committed" if t.lsn <= self.ledger.vdl else "pending"
                return RequestStatus(request_id, state, t.lsn)
        logged = self._logged_request(request_id)
        if logged is None:
            return RequestStatus(request_id, "not_committed")
        return RequestStatus(request_id, "committed", logged[0])

    def wait(self, lsn: int | None, ticket: _Ticket, timeout_s: float | None = None) -> None:
        """Block until VDL covers the ticket's CPL; WriteIndeterminate when it does not in time
        (Unavailable, or StorageFull when nodes are out of space, if it was never logged)."""
        timeout_s = self.options.write_timeout_s if timeout_s is None else timeout_s
        ticket.lock.acquire(timeout=timeout_s)
        lsn = ticket.lsn
        if ticket.error is not None:
            if isinstance(ticket.error, PreconditionFailed) and lsn and self.ledger.vdl < lsn:
                raise Unavailable(
                    f"a condition of this write failed on a write at LSN {lsn} that is not durable (VDL "
                    f"{self.ledger.vdl}): nothing was logged, and whether that write stays is not known yet; retry"
                )
            raise ticket.error
        ledger = self.ledger
        if lsn is not None and ledger.vdl >= lsn:
            return
        if lsn is None:
            # Still in the inbox: take it out if we can, then it was never logged.
            with self._lock:
                if ticket.lsn is None:
                    try:
                        self._inbox.remove(ticket)
                    except ValueError:
                        pass
                    else:
                        space = self._space_locked()
                        if space:
                            raise StorageFull(f"write not logged within {timeout_s:g} s: nodes are out of space ({space}); nothing was logged")
                        raise Unavailable(f"write not logged within {timeout_s:g} s; nothing was logged")
                lsn = ticket.lsn
            if lsn is not None and ledger.vdl >= lsn:
                return
        if self._fenced:
            raise WriteIndeterminate(f"write at LSN {lsn} is indeterminate: {self._fenced}")
        if self._closed:
            raise WriteIndeterminate(f"write at LSN {lsn} is indeterminate: the writer stopped before it was durable")
        with self._lock:
            up = sorted(n for n, link in self.links.items() if link.up)
            space = self._space_locked()
        raise WriteIndeterminate(
            f"write at LSN {lsn} not durable after {timeout_s:g} s (VDL {ledger.vdl}; reachable: {', '.join(up) or 'none'}"
            + (f"; nodes out of space: {space}" if space else "")
            + "). It may still become durable; read the key to find out."
        )

    def write(
        self, ops: Sequence[tuple[int, bytes, bytes]], *, request_id: bytes | None = None, resend: bool = False,
        conditions: Sequence[cond.Condition] = (),
    ) -> int:
        for attempt in range(CONDITION_REREADS_MAX if conditions else 1):
            _lsn, ticket = self.submit(ops, request_id=request_id, resend=resend, conditions=conditions)
            try:
                self.wait(None, ticket)
            except _Reread:
                if attempt == CONDITION_REREADS_MAX - 1:
                    raise
                continue
            return ticket.lsn
        raise AssertionError("unreachable")

    def put(self, key: bytes, value: bytes) -> int:
        check_key(key)
        check_value(value)
        return self.write(((FLAG_PUT, key, value),))

    def delete(self, key: bytes) -> int:
        check_key(key)
        return self.write(((FLAG_DELETE, key, b""),))

    # --- senders ----------------------------------------------------------------------------
    def _start_sender_thread(self, link: _NodeLink) -> None:
        link.thread = threading.Thread(target=self._sender, args=(link,), name=f"writer->{link.id}", daemon=True)
        link.thread.start()

    def _sender(self, link: _NodeLink) -> None:
        while True:
            try:
                if not self.send_once(link, block=True):
                    return
            except Exception as e:  # a bug: log it once per cause, count it, carry on after a back-off
                time.sleep(self._sender_bug(link, e))

    def _sender_bug(self, link: _NodeLink, e: Exception) -> float:
        """An unexpected exception in `link`'s sender: log it once per cause, count it; returns
        the back-off before the sender carries on."""
        with self._lock:
            note = self._fault_locked(link, e, unexpected=True)
            link.backoff_s = min(BACKOFF_S_MAX, link.backoff_s * 2)
            backoff_s = link.backoff_s
        self._log_fault(link, note, e, unexpected=True)
        return backoff_s

    def send_once(self, link: _NodeLink, block: bool = False) -> bool:
        """Ship the node its unsent records (or a heartbeat). Returns False once closed or fenced."""
        return self._guarded(self._send_once, link, block)

    def _guarded(self, step: Callable, *args):
        """`step(*args)` of a sender; an internal error that leaves the ledger in doubt fences
        the writer (`_fence_in_doubt`) and returns False: the sender stops."""
        try:
            return step(*args)
        except _InDoubt as e:
            self._fence_in_doubt(e)
            return False

    def _send_once(self, link: _NodeLink, block: bool) -> bool:
        job = self._next_send(link, "block" if block else "now")
        if job is False:
            return False
        if block and (not link.up or link.full):
            time.sleep(link.backoff_s)
        records, frame, items = self._indexed_frame_of(link, job, self._hand_indexed)
        link.last_send = sent_at = self._clock()
        try:
            if items is not None:
                reply = self.transport.append_indexed(link.id, job.epoch, frame, items, job.hint, job.collect, job.requests)
            else:
                reply = self.transport.append(link.id, job.epoch, frame, job.hint, job.collect, job.requests)
        except Exception as e:
            return self._send_failed(link, e, job.epoch)
        return self._sent(link, job, records, frame, sent_at, reply)

    def _next_send(self, link: _NodeLink, mode: str):
        """What to send `link` next, under the lock: a `_Send`, False once the sender is to stop,
        or (mode "poll" only) the seconds until its heartbeat is due when nothing is to be sent.
        Mode "block" waits on `_work` for records or the heartbeat; "now" sends at once (a
        heartbeat when there is nothing); "poll" is the sender loop's (`engine.head.senders`),
        which waits outside the lock and is woken by `_wake_senders_locked`."""
        with self._lock:
            while True:
                if self._closed or self._fenced or self._in_doubt or link.id not in self.ledger.membership.all_nodes:
                    return False  # closed, fenced (or about to be), or this node was replaced
                if self._inbox:
                    self._sequence_locked()
                end = self._tail_base + len(self._tail)  # one above the highest LSN in the tail
                start = max(link.sent_lsn + 1, self._tail_base)
                idle_for = self._clock() - link.last_send
                heartbeat = idle_for >= HEARTBEAT_S  # also how a dead or returning node is noticed
                if start < end or heartbeat or mode == "now":
                    break
                # Nothing to send: say so, then look at the inbox once more before waiting.
                # `submit` appends to it without the lock and then reads these, so a put that
                # landed after the look above is seen here or wakes this sender.
                if mode == "poll":
                    self._loop_waiting.add(link.id)
                    if self._inbox:
                        self._loop_waiting.discard(link.id)
                        continue
                    return HEARTBEAT_S - idle_for  # the loop waits for a wake, or for the heartbeat
                self._senders_waiting += 1
                try:
                    if not self._inbox:
                        self._work.wait(HEARTBEAT_S)
                finally:
                    self._senders_waiting -= 1
            records = self._tail[start - self._tail_base : start - self._tail_base + FRAME_RECORDS_MAX_SEND]
            hint = self.ledger.vdl
            collect, requests = self._collect_points_locked(hint)
            return _Send(start, records, hint, self.epoch, collect, requests)

    def _wake_senders_locked(self, *, stop: bool = False) -> None:
        """Records (or a new epoch) to send, or (`stop`) closed or fenced: wake the waiting
        senders, threads or the sender loop's. Caller holds the lock."""
        self._work.notify_all()
        if self._sender_loop is not None and (self._loop_waiting or stop):
            self._loop_waiting.clear()
            self._sender_loop.wake()

    def _frame_of(self, link: _NodeLink, job: "_Send") -> tuple[list[bytes], bytes]:
        """The records of `job` that go in one frame (one while the node is full; within half of
        FRAME_BYTES_MAX), and that frame."""
        records, frame, _items = self._indexed_frame_of(link, job, False)
        return records, frame

    def _indexed_frame_of(self, link: _NodeLink, job: "_Send", indexed: bool):
        """`_frame_of`, and (`indexed`) the frame's `codec.index_frame`, else None. The senders
        of one flush mostly send the very same records: the last frame built is kept
        (`_last_frame`) and given to the next sender asking for the same LSNs, so it is encoded,
        and indexed for nodes in this process, once and not six times. One LSN names one record
        of this writer's tail for ever, so equal LSNs and the same record objects at both ends
        are the same frame; two senders building it at once each build their own."""
        records = job.records
        if link.full:
            records = records[:1]  # a full node is probed with one record until it takes it
        size = 0
        for i, r in enumerate(records):
            size += len(r)
            if size > FRAME_BYTES_MAX // 2 and i > 0:
                records = records[:i]
                break
        last = self._last_frame
        if last is not None and last[0] == job.start and len(last[1]) == len(records) and records \
                and last[1][0] is records[0] and last[1][-1] is records[-1] and (last[3] is not None or not indexed):
            return last[1], last[2], last[3]
        frame = codec.encode_frame(records)
        items = codec.index_frame(frame) if indexed and records else None
        if records:
            self._last_frame = (job.start, records, frame, items)
        return records, frame, items

    def _send_failed(self, link: _NodeLink, e: Exception, epoch: int) -> bool:
        """An append sent at `epoch` raised `e`. Returns False once the sender is to stop. May
        block (an epoch refusal probes and syncs nodes): the sender loop runs it in a thread."""
        if self._needs_thread(e):  # an epoch refusal: the one case that may block
            return self._on_epoch_refusal(link, e, epoch)
        if isinstance(e, StorageFull):
            self._link_fault(link, e, full=True)
        elif isinstance(e, SixfoldError):
            self._link_fault(link, e)
        else:  # the transport failed in a way it should not: count it, treat the link as down
            self._link_fault(link, e, unexpected=True)
        return True

    @staticmethod
    def _needs_thread(e: Exception) -> bool:
        """Whether `_send_failed(e)` may block (the sender loop then runs it in a thread)."""
        return isinstance(e, (StaleEpoch, EpochBehind))

    def _sent(self, link: _NodeLink, job: "_Send", records: list[bytes], frame: bytes, sent_at: float, reply) -> bool:
        """The node took the frame of `job` (sent at `sent_at`): book its reply; release the
        writers it made durable. Returns False once the sender is to stop."""
        start = job.start
        if records and self.metrics is not None:
            self.metrics.observe_flush(len(records), len(frame))
        released = None
        healed = ""
        space_changed = False
        with self._lock:
            if self._in_doubt:
                return False
            if not link.up or link.full or reply.space_low != link.space_low:
                space_changed = reply.space_low != link.space_low
                link.up = True
                link.full = False
                link.space_low = reply.space_low
                self._admission = self._put_limit = None
                self._room.notify_all()
            link.backoff_s = BACKOFF_S_MIN
            if sent_at > link.renewed_at:  # this node renewed the lease no earlier than sent_at
                link.renewed_at = sent_at
                self._room.notify_all()  # a read waiting for its lease to be confirmed
            if link.error:
                healed, link.error = link.error, ""
                link.healthy_since = self._clock()
            if records:
                link.sent_lsn = max(link.sent_lsn, start + len(records) - 1)
                self.stats["flushes"] += 1
                self.stats["records_sent"] += len(records)
            # The reply's room counts every record the node holds now: at least those through
            # sent_lsn (engine.core.admission).
            room_limit = reply.room_bytes + self._cost_through_locked(link.sent_lsn)
            link.extent_limit = (None if reply.extent_bytes is None
                                 else reply.extent_bytes + self._cost_through_locked(link.sent_lsn))
            if room_limit != link.room_limit:
                link.room_limit = room_limit
                self._put_limit = None
            if reply.scls != link.last_scls:
                link.last_scls = reply.scls
                try:
                    if self.ledger.record_scls(link.id, reply.scls):
                        released = self._release_locked()
                except Exception as e:
                    raise _InDoubt("recording a node's acknowledgement", e) from e
        if healed:
            log.info("writer -> %s: the link works again (it was: %s)", link.id, healed)
        if space_changed:
            log.warning("writer -> %s: the node %s", link.id,
                        "is low on space (it keeps its reserve for deletes)" if reply.space_low else "has room again")
        if released:
            for lock in released:
                lock.release()
        return True

    def _fault_locked(self, link: _NodeLink, e: BaseException, unexpected: bool) -> bool:
        """Note a link's fault; True when it is to be logged. Caller holds the lock.

        The cause of an expected error is its class (a flapping link alternates between messages
        such as "message lost" and "reply lost", which are one cause); of an unexpected one, its
        class and message. A cause is logged when it differs from the last one logged, or when it
        recurs after the link was healthy for RELOG_S."""
        text = f"{type(e).__name__}: {e}"
        cause = text if unexpected else type(e).__name__
        recurs = not link.error and self._clock() - link.healthy_since >= RELOG_S
        link.error = text
        if unexpected:
            link.errors += 1
            link.last_error = text
        if cause == link.logged and not recurs:
            return False
        link.logged = cause
        return True

    def _log_fault(self, link: _NodeLink, note: bool, e: BaseException, unexpected: bool) -> None:
        if not note:
            return
        if unexpected:
            log.error("writer -> %s: unexpected %s: %s (counted; the sender carries on after a back-off)",
                      link.id, type(e).__name__, e, exc_info=e)
        else:
            log.warning("writer -> %s: %s: %s", link.id, type(e).__name__, e)

    def _link_fault(self, link: _NodeLink, e: BaseException, *, full: bool = False, unexpected: bool = False) -> None:
        """An append failed. A full node stays reachable (it serves reads) and its records are
        retried until they land; any other failure marks the node unreachable until it answers."""
        up = full  # a node that says it is full answered: it is reachable
        with self._lock:
            note = self._fault_locked(link, e, unexpected)
            if (link.up, link.full) != (up, full):
                link.up, link.full = up, full
                self._admission = self._put_limit = None
                self._room.notify_all()
            link.backoff_s = min(BACKOFF_S_MAX, link.backoff_s * 2)
        self._log_fault(link, note, e, unexpected)

    def _release_locked(self) -> list:
        """Pop waiters covered by VDL; trim the tail of durable records. Caller holds the lock."""
        vdl = self.ledger.vdl
        times = self._vdl_times
        if not times or vdl > times[-1][0]:
            times.append((vdl, time.time()))
        out = []
        waiters = self._waiters
        while waiters and waiters[0][0] <= vdl:
            out.append(waiters.popleft()[1])
        stamps = self._stamps
        while stamps and stamps[0][0] <= vdl:
            self._durable_time_us = stamps.popleft()[1]
        self._trim_locked()
        self._room.notify_all()
        return out

    def _trim_locked(self) -> None:
        """Drop the tail records `engine.core.tail` says may go: durable, and sent to every live
        member (up to a bound). Caller holds the lock."""
        links = self.links
        live = [links[n].sent_lsn for n in self.ledger.membership.all_nodes if n in links and links[n].up]
        drop = tail_trim(self._tail_base, len(self._tail), self.ledger.vcl, live, TAIL_RECORDS_MAX)
        if drop:
            self._trimmed_cost = self._tail_costs[drop - 1]
            del self._tail[:drop]
            del self._tail_costs[:drop]
            self._tail_base += drop

    def _on_epoch_refusal(self, link: _NodeLink, e: SixfoldError, epoch: int) -> bool:
        """An append sent at `epoch` was refused on epoch grounds: do what `engine.core.fencing`
        decides. Returns False once fenced."""
        if not refusal_needs_probe(e, epoch, self.epoch):
            if decide_epoch_refusal(e, epoch, self.epoch, None, None).action == SYNC:
                self._sync_node(link)
            return True  # RESEND: it was sent before our own epoch step; the next send is at the new one
        with self.epoch_lock:  # one decision at a time; a refusal decided after a step is a resend
            current = self.epoch
            if self._fenced or self._closed:
                return False
            if not refusal_needs_probe(e, epoch, current):
                return True
            if self.pending_step is not None and link.id in self.own_seals.get(self.pending_step.epoch, ()):
                # Refused by a node this writer sealed for a membership step it could not take:
                # take it now if enough nodes are back (then the next send is at its epoch).
                try:
                    self.steps.take(self.pending_step)
                    return True
                except Unavailable:
                    # Not yet. A node still at the step's epoch refused because of our own seal
                    # (strict: nobody else sealed it there): send again later. A writer that owns
                    # that epoch elsewhere shows on the other nodes, whose refusals fence us.
                    pending = self.pending_step
                    if pending is not None and self._probe_epochs_of((link.id,)).get(link.id) == pending.epoch:
                        return True
                except SixfoldError as step_error:
                    log.warning("the pending membership step to epoch %d failed: %s", self.pending_step.epoch, step_error)
                    self.pending_step = None
            current = self.epoch
            membership = self.ledger.membership
            probes = self._probe_epochs(membership)
            for n in self.own_seals.get(current + 1, ()):  # ours: not another writer's epoch
                if probes.get(n) == current + 1:
                    probes[n] = current
            decision = decide_epoch_refusal(e, epoch, current, probes, membership)
            if decision.action == STEP_UP:
                if self._step_up(current, decision.epoch, membership, link.id, e):
                    return True
                why = (f"this writer was fenced: {e}; its step from epoch {current} to {decision.epoch} "
                       "did not hold on a write quorum (another writer may have opened)")
            elif decision.action == FENCE:
                why = f"this writer was fenced by a newer writer: {e}"
            else:
                return True  # RESEND: nobody answering is above us now
        if self._fence(why):
            log.error("writer -> %s: %s; this one stops", link.id, why)
        return False

    def _probe_epochs(self, membership: Membership) -> dict[str, int]:
        """The epoch every reachable member holds now (read at decision time, a rare path)."""
        return self._probe_epochs_of(membership.all_nodes)

    def _probe_epochs_of(self, nodes) -> dict[str, int]:
        epochs = {}
        for n in nodes:
            try:
                epochs[n] = self.transport.state(n).epoch
            except SixfoldError:
                continue
        return epochs

    def _step_up(self, current: int, target: int, membership: Membership, refused_by: str, e: SixfoldError) -> bool:
        """Move from `current` to `target` over epochs that failed opens left on a minority
        (`engine.core.fencing`): seal every member at `target` (strict, unlike sync_epoch), read
        each sealed node's trace of other writers before telling it anything, and adopt the
        epoch only if `step_up_holds`. Caller holds _epoch_lock. False: fence."""
        traces = {}
        for n in membership.all_nodes:
            try:
                self.transport.seal(n, target)
                st = self.transport.state(n)
            except SixfoldError:
                continue
            traces[n] = trace_epoch(st.membership.epoch if st.membership else None, (t.epoch for t in st.truncations))
        if not step_up_holds(current, traces, membership):
            return False
        new = Membership(target, membership.members, membership.next_members)
        with self._lock:
            if self._fenced or self._closed:
                return False
            self.epoch = target
            self.ledger.set_membership(new)
            self._wake_senders_locked()  # the senders re-send what was refused at the old epoch
        log.warning("writer -> %s: %s; the nodes at epoch %d are a write quorum, so that epoch was left by "
                    "failed opens: stepped up to epoch %d (sealed %s)",
                    refused_by, e, current, target, ", ".join(sorted(traces)))
        for n in new.all_nodes:
            try:
                self.transport.sync_epoch(n, target, self.truncations, new)
            except SixfoldError:
                continue  # a sealed node takes appends at the target already; one behind is synced when it refuses
        return True

    def _sync_node(self, link: _NodeLink) -> None:
        """A node (restarted or wiped) is behind our epoch: give it our truncations and membership."""
        try:
            self.transport.sync_epoch(link.id, self.epoch, self.truncations, self.ledger.membership)
        except SixfoldError as e:
            with self._lock:
                note = self._fault_locked(link, e, unexpected=False)
            self._log_fault(link, note, e, unexpected=False)
            if self._background:
                time.sleep(link.backoff_s)

    def _fence(self, why: str, error: type[SixfoldError] = StaleEpoch) -> bool:
        """Stop for good: fail what was never logged, release every waiter (their writes are
        indeterminate). Returns True for the call that fenced (the first reason is kept)."""
        with self._lock:
            first = self._fenced is None
            if first:
                self._fenced = why
                self._fenced_error = error
            self._sequence_locked()  # refuses what was never logged
            waiters, self._waiters = self._waiters, deque()
            self._room.notify_all()
            self._wake_senders_locked(stop=True)
        for _lsn, lock in waiters:
            lock.release()
        return first

    def _fence_in_doubt(self, e: _InDoubt) -> None:
        """The writer's own bookkeeping may be wrong: stop acknowledging anything. What was not yet
        durable becomes indeterminate; the next open recovers the truth from the nodes."""
        why = (f"the writer fenced itself: an internal error while {e.where} left its ledger in doubt "
               f"({type(e.cause).__name__}: {e.cause}); open the volume again (recovery rebuilds it from the nodes)")
        with self._lock:
            first, self._in_doubt = not self._in_doubt, True  # from now on no sender acknowledges anything
        if first:  # the first one logs, then fences: whoever sees the fence finds its cause logged
            log.critical("%s", why, exc_info=e.cause)
            self._fence(why, Unavailable)

    # --- membership change (the steps: engine.head.membership) ------------------------------
    def next_membership(self, membership_of: Callable[[Membership], Membership]) -> Membership:
        """The membership `membership_of(current)` at the next epoch, changing nothing (raises
        what the core step raises). Call with `epoch_lock` held (`MembershipSteps.step`)."""
        with self._lock:
            self.check_usable()
            new = membership_of(self.ledger.membership)
            return Membership(self.epoch + 1, new.members, new.next_members)

    def adopt_membership(self, new: Membership) -> tuple[int, Membership]:
        """Move to `new` (from `next_membership`, its epoch sealed on a write quorum); links (and
        senders) for new members. Call with `epoch_lock` held. Returns the epoch and membership."""
        with self._lock:
            self.check_usable()
            if new.epoch != self.epoch + 1:
                raise Unavailable(f"the writer's epoch moved to {self.epoch} during a membership step to {new.epoch}")
            self.epoch = new.epoch
            self.ledger.set_membership(new)
            for n in new.all_nodes:
                if n not in self.links:
                    link = self.links[n] = _NodeLink(n)
                    if self._sender_loop is not None:
                        self._sender_loop.add(link)
                    elif self._background:
                        self._start_sender_thread(link)
            self._admission = self._put_limit = None
            return self.epoch, new

    def catch_up_inputs(self, node: str) -> tuple[list[int | None], list[int]]:
        """`node`'s SCL per PG (None: no reply yet) and every PG's read tail, for the catch-up
        rules of `engine.core.membership`."""
        with self._lock:
            ledger = self.ledger
            return [ledger.scls[pg].get(node) for pg in range(self.P)], list(ledger.read_tails)

    # --- reads (the read path: engine.head.reads) --------------------------------------------
    def view(self) -> ReadView:
        """The current read point (VDL) and per-PG tails, for linearizable reads and snapshots.
        With a lease, only while it holds (a writer paused past a failover must not answer from
        the VDL it had): waits a little for the heartbeats to renew it, else Unavailable."""
        with self._lock:
            self.check_usable()
            if self.options.lease_s is not None and self._clock() >= self._lease_expiry_locked():
                deadline = self._clock() + LEASE_RENEW_WAIT_S
                while self._clock() >= self._lease_expiry_locked():
                    left = deadline - self._clock()
                    if left <= 0:
                        raise Unavailable(
                            "this writer cannot confirm its lease with a read quorum of nodes (partitioned, paused, or "
                            "replaced by a newer writer): it serves no linearizable read; retry, or read from the new writer"
                        )
                    self._room.wait(min(left, HEARTBEAT_S))
                    self.check_usable()
            return ReadView(self.ledger.vdl, tuple(self.ledger.read_tails))

    def _lease_expiry_locked(self) -> float:
        """When this writer's lease ends by its own clock: the read-quorum-th newest renewal
        (send time) of each quorum set, the earliest of them, plus lease_s - margin. A read
        quorum that renewed leaves fewer than a write quorum that can report the lease lapsed,
        which a candidate needs before it takes over (engine.head.failover)."""
        expiry = float("inf")
        for qs in self.ledger.membership.quorum_sets:
            times = sorted((self.links[n].renewed_at for n in qs if n in self.links), reverse=True)
            at = times[READ_QUORUM - 1] if len(times) >= READ_QUORUM else float("-inf")
            expiry = min(expiry, at)
        lease_s = self.options.lease_s
        return expiry + lease_s - lease_margin(lease_s)

    def lease_remaining(self) -> float | None:
        """Seconds of lease this writer holds by its own clock (None without a lease)."""
        if self.options.lease_s is None:
            return None
        with self._lock:
            return max(0.0, self._lease_expiry_locked() - self._clock())

    def read_point(self, sent_at: float = 0.0) -> ReadPointUpdate:
        """The read view with what a reader instance needs to read at it alone (engine.head.replica):
        the membership and each member's SCLs and link state, all under one hold of the lock."""
        with self._lock:
            self.check_usable()
            ledger = self.ledger
            members = tuple(
                (n, tuple(ledger.scls[pg].get(n) for pg in range(self.P)), n in self.links and self.links[n].up)
                for n in ledger.membership.all_nodes
            )
            return ReadPointUpdate(self.epoch, ledger.vdl, tuple(ledger.read_tails), ledger.membership, members, sent_at,
                                   log_time_us=self._durable_time_us)

    def durable_since(self, vdl: int) -> float:
        """The wall-clock time the VDL first moved above `vdl` (when the oldest commit above it
        became durable); 0.0 if it has not, or that is older than the record kept."""
        with self._lock:
            times = self._vdl_times
            first = 0.0
            for v, t in reversed(times):
                if v <= vdl:
                    return first
                first = t
            # Every kept advance is above `vdl`: the first is the oldest kept, unless older ones
            # were dropped (the record is full), and then it is not known.
            return first if len(times) < VDL_TIMES_MAX else 0.0

    def wait_vdl(self, above: int, timeout_s: float) -> int:
        """Wait until the VDL is above `above` (at most `timeout_s`, or until the writer stops);
        returns the VDL. Every VDL advance notifies `_room` (`_release_locked`)."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self.ledger.vdl <= above and not self._closed and not self._fenced:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._room.wait(left)
            return self.ledger.vdl

    def read_sources(self, pg: int, tail: int | None) -> tuple[Membership, list[str], list[str]]:
        """For a read of `pg`: the membership, its reachable members, and those reachable whose
        SCL reaches `tail` (complete at a view with that read tail; with the read-any weakening,
        every reachable member)."""
        with self._lock:
            ledger = self.ledger
            membership = ledger.membership
            up = [n for n in membership.all_nodes if self.links[n].up]
            if tail is None:
                return membership, up, []
            if self.weakening.read_any:
                return membership, up, list(up)
            scls = ledger.scls[pg]
            return membership, up, [n for n in up if scls.get(n, -1) >= tail]

    def get(self, key: bytes, *, quorum: bool = False, view: ReadView | None = None) -> bytes | None:
        return self.reads.get(key, quorum=quorum, view=view)

    def remembered(self, key: bytes, read_point: int) -> tuple[int, bytes | None, int] | None:
        """(lsn, value or None for a delete, deadline) of `key`'s newest version at `read_point`
        when this writer's memory of its recent writes (`_recent`) tells it, else None (ask the
        segments). Only this writer logs at its epoch, and every earlier writer's records lie at
        or below the VDL it recovered, so the newest write it remembers, when at or below the
        read point, is the newest version there: no segment can hold a newer one at or below it.
        A write above the read point (not yet durable when the view was taken) says nothing about
        the version below it. Keys are as the ops carry them (index keys on an encrypted volume);
        values are plaintext. Takes no lock: one dict lookup of an immutable tuple."""
        v = self._recent.get(key)
        if v is None or v[0] > read_point:
            return None
        self.reads_from_memory += 1  # a count for status: a lost increment under a race is harmless
        return v

    def scan(
        self, start: bytes, end: bytes | None, *, quorum: bool = False, view: ReadView | None = None
    ) -> Iterator[tuple[bytes, bytes]]:
        """A scan at `view`, or at a read point of its own, held (registered) until the scan is
        consumed or dropped: a long scan is not collected under."""
        if view is not None:
            return self.reads.scan(start, end, quorum=quorum, view=view)
        view, reg = self.open_snapshot("scan")
        try:
            return HeldIterator(self.reads.scan(start, end, quorum=quorum, view=view), self.read_points, reg)
        except BaseException:
            self.read_points.release(reg)
            raise

    # --- version collection (engine.head.readpoints) -----------------------------------------
    def open_snapshot(self, name: str = "snapshot", lease_s: float | None = None) -> tuple[ReadView, int]:
        """A read view (as `view()`) and the id of its registration in `read_points`, taken in
        one hold of the lock, so no collection point sent meanwhile passes it. Release it with
        `read_points.release(id)` (lease None: held until then)."""
        view = self.view()
        with self._lock:  # the collection point is computed under this lock too
            if view.read_point < self.read_points.issued:
                view = ReadView(self.ledger.vdl, tuple(self.ledger.read_tails))
            return view, self.read_points.register(name, view.read_point, lease_s)

    def _collect_points_locked(self, vdl: int) -> tuple[int, int]:
        """(collection point, request point) to send now (caller holds the lock)."""
        now = self._clock()
        ceiling = self._collect_delay.at(now, vdl)
        if now < self._grace_until:
            ceiling = min(ceiling, self.read_points.issued)  # the floor it opened with (resume_grace_s)
        point = self.read_points.point(ceiling)
        return point, min(point, self._request_retention.at(now, vdl))

    # --- status -----------------------------------------------------------------------------
    def scl_lags(self) -> dict[str, int]:
        """Per member of the membership: the LSNs its SCLs are behind the PGCLs, summed over the
        PGs (the `lag` of `sixfold cluster status`; 0: it can serve reads at the VDL alone). A
        member the writer has not heard from yet counts from 0."""
        with self._lock:
            ledger = self.ledger
            if ledger is None:
                return {}
            return {n: sum(max(0, pgcl - ledger.scls[pg].get(n, 0)) for pg, pgcl in enumerate(ledger.pgcl))
                    for n in ledger.membership.all_nodes}

    def status(self) -> dict:
        with self._lock:
            ledger = self.ledger
            return {
                "epoch": self.epoch,
                "vdl": ledger.vdl,
                "vcl": ledger.vcl,
                "next_lsn": ledger.next_lsn,
                "pgcl": list(ledger.pgcl),
                "in_flight": ledger.in_flight(),
                "fenced": self._fenced,
                "admission": self._admission_locked().name.lower().replace("_", "-"),
                #: the largest put unit (its cost, engine.core.admission) that fits now
                "room_bytes": max(0, self._put_limit_locked() - self._logged_cost),
                "membership": {"epoch": ledger.membership.epoch, "members": list(ledger.membership.members),
                               "next_members": list(ledger.membership.next_members) if ledger.membership.next_members else None},
                "links": {
                    n: {"up": l.up, "full": l.full, "space_low": l.space_low, "room_bytes": self._room_of_locked(l),
                        "error": l.error, "errors": l.errors, "last_error": l.last_error, "sent_lsn": l.sent_lsn}
                    for n, l in self.links.items()
                },
                "recovery": dict(self.recovery),
                #: on an encrypted volume, sealed values that failed their tag (counted as corruption);
                #: the read points held and the collection point (engine.head.readpoints)
                "stats": dict(self.stats, reads_from_memory=self.reads_from_memory, **self.read_points.status(),
                              **({} if self.cipher is None else {"tag_failures": self.cipher.failures})),
            }


class HeldIterator:
    """An iterator that holds a read point registration until it is exhausted, closed or
    collected (a scan that is never consumed still releases it)."""

    def __init__(self, it, registry: ReadPointRegistry, reg_id: int) -> None:
        self._it = it
        self._finalizer = weakref.finalize(self, registry.release, reg_id)

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self._it)
        except BaseException:
            self._finalizer()
            raise

    def close(self) -> None:
        self._finalizer()
