"""A storage node's segments on LMDB: the log, the key versions, SCL, epoch and truncations.

Theory of operation
-------------------
One LMDB environment per node holds one segment of every protection group:

* `log`       `pg (u32 BE) | lsn (u64 BE)` -> the record's bytes exactly as the head encoded them
              (CRC included), so every read, scrub and repair re-checks the head's CRC.
* `versions`  `pg (u32 BE) | key` -> duplicates `lsn (u64 BE)` (LMDB dupsort keeps them in LSN order):
              the key's versions, materialised as records arrive, even above SCL. A read at read
              point R takes the highest duplicate <= R and fetches the record from `log`.
* `meta`      volume identity (volume id, node, protection groups, and the folder's `format`:
              NODE_FORMAT), epoch, writer's VDL hint, SCL per PG, truncation ranges, membership,
              and version collection's state (`gc/<pg>`: engine.node.collection).

Version collection (`engine.node.collection`, a mixin of this class) removes versions no read
point can see, below the point the writer sends with its appends; reads below a PG's collection
horizon get SnapshotTooOld.

An append is one write transaction (one fsync when durable) for a whole frame: records are kept
whether or not they extend the chain; SCL advances along backlinks (`prev_lsn == SCL`) and stops at
a hole, which gossip fills later. Records inside a truncation range are refused for ever: that is
how records of a dead epoch stay dead, whoever sends them.

One LSN names one record for ever. A record at an LSN the segment already holds must be the same
bytes (a duplicate or re-send, which is normal and harmless); a different record refuses the whole
frame with ConflictingRecord inside the write transaction, so nothing of it is written or indexed
(`conflicts_refused` counts them). A held copy that fails its CRC is not a record any more: the
sender's good copy replaces it.

A record whose CRC fails when read (read, scan, fetch, scrub) is quarantined: removed from the log
and the version index, counted, and SCL pulled back below it, so the segment stops claiming it and
gossip refetches a good copy. It is never returned to a reader nor sent to a peer.

One owner: the store holds an OS lock on its folder (`engine.ownership`, the file `LOCK`) from
before LMDB is opened until it is closed, so a second open, from this process or another, raises
FolderInUse naming the holder and changes nothing.

Concurrency: one writer at a time (`_write_lock`, which also guards the in-memory mirror of meta);
readers use LMDB read transactions and never block the writer. Every read transaction passes the
map gate (`_read_txn`), which a resize of the map closes for a moment (engine.node.growth).

Space: the LMDB map grows with the data up to the node's maximum (`max_bytes`; engine.node.growth
says how). The node reports its *used* bytes as the pages its tables hold (LMDB reuses the pages
of deleted records, so room freed inside the file counts as room), at most the file's high-water
mark, which is what it reports as `bytes`.
"""

from __future__ import annotations

import bisect
import errno
import json
import logging
import os
import resource
import struct
import threading
import time
from collections.abc import Iterable, Sequence

import lmdb

from engine import codec, ownership, sizes
from engine.core.constants import (
    EPOCH_MAX,
    EPOCH_STEP_MAX,
    EXPIRES_BYTES,
    FLAG_DELETE,
    FLAG_EXPIRES,
    FLAG_REQUEST,
    FRAME_BYTES_MAX,
    RECORD_HEADER_BYTES,
    REQUEST_DIGEST_BYTES,
    REQUEST_TIME_BYTES,
    LSN_VALID_MAX,
    NAMESPACE_KEYS,
    NAMESPACE_REQUESTS,
    TRUNCATION_LSN_MAX,
)
from engine.core.types import (
    AppendReply,
    FetchReply,
    Geometry,
    Membership,
    NodeState,
    ReadReply,
    RecordHeader,
    SealReply,
    SegmentSummary,
    TruncationRange,
    VersionEntry,
)
from engine.errors import (
    Closed,
    ConflictingRecord,
    CorruptRecord,
    EpochBehind,
    GeometryMismatch,
    InvalidArgument,
    SegmentIncomplete,
    StaleEpoch,
    StorageFull,
    UnknownProtectionGroup,
    WrongFolder,
)
from engine.node import growth
from engine.node.growth import retry_when_full

from engine.node.collection import HORIZON, VersionCollector

log = logging.getLogger("sixfold.store")

_U64BE = struct.Struct(">Q")
_U64LE = struct.Struct("<Q")
_U32BE = struct.Struct(">I")
_PREV_AT = struct.Struct("<Q")  # prev_lsn lives at byte 16 of a record
_HDR = struct.Struct("<IIQQIB")  # crc, total_len, lsn, prev_lsn, pg, flags

#: The maximum of a node's data when none is given (its map grows up to it; engine.node.growth).
MAX_BYTES_DEFAULT = 32 << 30
#: The default space reserve is at least capacity / RESERVE_FRACTION (see reserve_bytes).
RESERVE_FRACTION = 16
#: The floor an append never reaches into is at least capacity / FLOOR_FRACTION (see floor_bytes).
FLOOR_FRACTION = 64
#: ... and at least this (but never more than half the reserve).
FLOOR_BYTES_MIN = 256 << 10
#: What any append may take beyond its frame's bytes, for the floor check (branch pages, meta).
FLOOR_SLACK_BYTES = 32 << 10
#: How often the node re-measures its capacity (the disk's free bytes change under it).
SPACE_REFRESH_S = 1.0
#: How long an append's reply may go on a measurement of the tables' pages (`usage`, LMDB's stats
#: of every table: it took most of an append's Python time) charged with a bound of what was
#: appended since; and the room below which every reply measures exactly. Charged, used and held
#: only grow, so the room a reply states is never more than the node has.
USAGE_REFRESH_S = 0.25
USAGE_EXACT_ROOM_BYTES = 64 << 20
#: A bound of the pages one appended frame may take: each record's cost
#: (engine.core.admission.record_cost_bytes) is at most four times its encoded bytes plus this,
#: and the commit copies each changed page's path to its table's root and the free list's, which
#: can move the file's end: USAGE_CHARGE_PER_COMMIT_PAGES per commit (measured: at most 11 pages
#: beyond four times the frame, for frames of 1 to 64 records of 100 bytes).
USAGE_CHARGE_PER_RECORD_BYTES = 2 * 32 + 256
USAGE_CHARGE_PER_COMMIT_PAGES = 32
#: A filesystem with less free room than this is full for the purpose of classifying a short write.
FREE_BYTES_FLOOR = 1 << 20
#: errno values that mean "no room" (disk full, file size limit, quota).
FULL_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
SCAN_ENTRIES_MAX = 10_000
FETCH_BYTES_MAX = 8 << 20
SCL_PERSIST_S = 0.25
#: At least this many records of a frame whose keys ascend past a table's last key are put with
#: MDB_APPEND (`_put_ascending`); fewer are not worth the check.
APPEND_RECORDS_MIN = 64
#: Version of the node folder's layout (tables, keys, meta entries, record bytes), recorded in the
#: folder's identity (`meta/volume`, key "format"). Each change of layout raises it and comes with
#: an upgrade path in `_check_identity`. History: 0 = the first release, which wrote no "format"
#: key; 1 = the same layout, with the key (the upgrade only writes it); 2 = the `requests` table
#: (request-id records, flag REQUEST, indexed apart from user keys). 0 or 1 -> 2 creates the empty
#: table: no folder of those formats can hold a request record, since no writer of that release
#: logged one. 3 = version collection (meta `gc/<pg>`: horizon and swept LSNs):
#: a release before it would answer reads below a horizon from a segment that lacks the versions
#: they need, so it must refuse the folder. 0..2 -> 3 writes no key: absent means nothing collected.
#: 4 = expiring puts (flag EXPIRES: a put's value begins with its deadline): a release before it
#: refuses such records as corrupt, so it must refuse the folder. 0..3 -> 4 writes no key: older
#: folders hold no such record.
NODE_FORMAT = 4


def _scl_key(pg: int) -> bytes:
    return b"scl/" + _U32BE.pack(pg)


def _bounded(value, bound: int, what: str) -> int:
    """`value` if it is an int in 0..bound, else InvalidArgument (nothing is changed).

    The gRPC adapter checks the same bounds; this check is for in-process callers, and it is
    what makes `epoch + 1`, `hint + 1` and `after_lsn + 1` safe below (engine.core.constants)."""
    if not isinstance(value, int) or not 0 <= value <= bound:
        raise InvalidArgument(f"{what} {value!r} is out of range 0..{bound}")
    return value


def _put_ascending(cur, pairs, **flags) -> tuple[int, int]:
    """`cur.putmulti(pairs, **flags)`, with MDB_APPEND for the part of `pairs` that may take it:
    when the keys strictly ascend (no key given twice), those after the table's last key are
    held nowhere yet and go in with MDB_APPEND, which fills each page before starting the next
    (LMDB's ordinary split leaves a page of large records half full even when keys arrive in
    order: a bulk load, a restore). Returns putmulti's (consumed, added), summed."""
    if len(pairs) >= APPEND_RECORDS_MIN and all(a[0] < b[0] for a, b in zip(pairs, pairs[1:])):
        last = cur.key() if cur.last() else b""
        cut = bisect.bisect_right(pairs, last, key=lambda p: p[0])
        if len(pairs) - cut >= APPEND_RECORDS_MIN:
            c1, a1 = cur.putmulti(pairs[:cut], **flags) if cut else (0, 0)
            c2, a2 = cur.putmulti(pairs[cut:], append=True, **flags)
            return c1 + c2, a1 + a2
    return cur.putmulti(pairs, **flags)


def _check_epoch_step(node: str, current: int, epoch: int) -> None:
    """Refuse a jump of more than EPOCH_STEP_MAX: one request must not use up the epochs."""
    if epoch - current > EPOCH_STEP_MAX:
        raise InvalidArgument(
            f"node {node} is at epoch {current}; epoch {epoch} is more than {EPOCH_STEP_MAX} ahead "
            "(writers step epochs by one)"
        )


class _Quarantine(SegmentIncomplete):
    """A read met a corrupt record: raised inside the read transaction, quarantined after it."""

    def __init__(self, message: str, pg: int, lsn: int) -> None:
        super().__init__(message)
        self.pg, self.lsn = pg, lsn


#: One thread at a time in this process fills a write transaction of an append (`_Staged`); its
#: commit, the fsync, runs outside. Six segments of an embedded volume then overlap their fsyncs
#: while their Python and LMDB work no longer interleaves: interleaved, every LMDB call released the
#: GIL to another sender (a futex and a context switch each), and six appends took turns at every
#: call. Nothing is waited for while it is held (no other lock but logging's, when a refusal is
#: logged; no I/O but LMDB's page reads), so it is always the innermost lock. A node process has one segment: there it never waits.
STAGING = threading.Lock()


class _Staged:
    """`with _Staged(env) as txn:` a write transaction filled inside STAGING and committed after
    it is left (aborted, and STAGING left, if the body raises)."""

    __slots__ = ("env", "txn")

    def __init__(self, env) -> None:
        self.env = env

    def __enter__(self):
        STAGING.acquire()
        try:
            self.txn = self.env.begin(write=True)
        except BaseException:
            STAGING.release()
            raise
        return self.txn

    def __exit__(self, exc_type, exc, tb) -> bool:
        STAGING.release()
        if exc_type is None:
            self.txn.commit()
        else:
            self.txn.abort()
        return False


class _ReadTxn:
    """A read transaction inside the store's map gate (engine.node.growth). A `_Quarantine`
    raised inside is carried out after the transaction and the gate are left (quarantining takes
    the write lock, which a resize waiting at the gate holds), then raised as SegmentIncomplete."""

    __slots__ = ("store", "txn")

    def __init__(self, store: "SegmentStore") -> None:
        self.store = store

    def __enter__(self):
        gate = self.store._gate
        gate.enter()
        try:
            self.txn = self.store.env.begin()
        except BaseException:
            gate.leave()
            raise
        return self.txn

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            self.txn.abort()
        finally:
            self.store._gate.leave()
        if isinstance(exc, _Quarantine):
            self.store.quarantine(exc.pg, exc.lsn)
            raise SegmentIncomplete(str(exc)) from None
        return False


class SegmentStore(VersionCollector):
    """The LMDB side of one storage node. Thread-safe."""

    def __init__(
        self,
        path: str,
        node_id: str,
        az: str,
        geometry: Geometry,
        volume_id: str,
        *,
        durable: bool = True,
        max_bytes: int | None = None,
        reserve_bytes: int | None = None,
    ) -> None:
        if reserve_bytes is not None and (not isinstance(reserve_bytes, int) or reserve_bytes < 0):
            raise InvalidArgument(f"reserve_bytes {reserve_bytes!r} must be a non-negative integer")
        #: the most this node's data may take (its LMDB map grows up to it; engine.node.growth)
        self.max_bytes = MAX_BYTES_DEFAULT if max_bytes is None else sizes.check_storage_bytes(max_bytes)
        os.makedirs(path, exist_ok=True)
        self.path = path
        self.node_id = node_id
        self.volume_id = volume_id
        #: truncation ranges refused for starting at or below the VDL hint (sync_epoch)
        self.refused_truncations = 0
        self.az = az
        self.geometry = geometry
        self.durable = durable
        self.env = None
        # One owner per node folder (engine.ownership): LMDB lets a second process (or a second
        # open in this one) use the same files, and nothing in the protocol could fence two nodes
        # writing one segment. Taken before LMDB is touched, so a refused open changes nothing.
        self._owner = ownership.hold(path, "node folder")
        try:
            self._open(volume_id, reserve_bytes)
        except BaseException:
            if self.env is not None:
                self.env.close()
            self._owner.release()
            raise

    def _open(self, volume_id: str, reserve_bytes: int | None) -> None:
        """Open LMDB, check (or write) the folder's identity, load the meta mirror."""
        path, node_id, geometry, durable = self.path, self.node_id, self.geometry, self.durable
        try:
            file_bytes = os.path.getsize(self._data_file())
        except OSError:
            file_bytes = 0
        self.env = lmdb.open(
            path,
            map_size=growth.initial_map_bytes(file_bytes, self.max_bytes),
            max_dbs=8,
            sync=durable,
            metasync=durable,
            max_readers=1024,
            readahead=False,
        )
        self._page_bytes = self.env.stat()["psize"]
        #: the map now, and the most it may grow to (the maximum, in whole pages)
        self.map_bytes = self.env.info()["map_size"]
        self._map_max = max(self.map_bytes, self.max_bytes - self.max_bytes % self._page_bytes)
        self._check_maximum()  # before any table is opened: a refused maximum changes nothing
        self._log = self.env.open_db(b"log")
        self._versions = self.env.open_db(b"versions", dupsort=True, dupfixed=True)
        self._meta = self.env.open_db(b"meta")
        #: request id -> LSN of its record, shaped like `versions` (`pg | request id` -> dup LSNs)
        self._requests = self.env.open_db(b"requests", dupsort=True, dupfixed=True)
        self._write_lock = threading.Lock()
        self._closed = False
        self._gate = growth.MapGate()
        self._storage_high = False  # at STORAGE_WARNING_PERCENT or more (logged once per crossing)
        self.held_bytes = 0  # the data file's high-water mark, as `space` last measured it
        self._at_floor = False  # appends refused for reaching into the floor (logged once per episode)
        self._last_usage: tuple[int, int] | None = None  # usage() as `space` last measured it
        self._usage_at = 0.0  # when (monotonic), and what was appended since (a bound, bytes)
        self._usage_charged = 0
        self._usage_txnid = -1  # LMDB's last transaction id then, plus the appends charged since
        self._pages_at: tuple[int, int] | None = None  # (txn id, table pages) of the last read measured
        P = geometry.protection_groups
        with self.env.begin(write=True) as txn:
            upgraded_from = self._check_identity(txn, volume_id)
            self.epoch = self._get_u64(txn, b"epoch")
            # The epoch a writer last synced this node at (`_check_synced`). A folder written
            # before the key existed counts as synced at its epoch, as that release behaved.
            raw = txn.get(b"synced_epoch", db=self._meta)
            self.synced_epoch = _U64BE.unpack(raw)[0] if raw else self.epoch
            self.hint_lsn = self._get_u64(txn, b"hint")
            #: the newest commit time of a request record this segment holds (meta key
            #: `commit_time`; absent: none yet), which a new writer takes as its floor of log time
            self.commit_time_us = self._get_u64(txn, b"commit_time")
            self.scls = [self._get_u64(txn, _scl_key(pg)) for pg in range(P)]
            raw = txn.get(b"truncations", db=self._meta)
            self.truncations: list[TruncationRange] = [TruncationRange(*t) for t in json.loads(raw)] if raw else []
            raw = txn.get(b"membership", db=self._meta)
            self.membership: Membership | None = None
            if raw:
                m = json.loads(raw)
                self.membership = Membership(m["epoch"], tuple(m["members"]), tuple(m["next"]) if m["next"] else None)
            #: the writer's signed statement of the newest epoch state adopted, and its epoch
            #: (engine.security.proofs; empty in an insecure cluster). Absent in a folder written
            #: before proofs existed, which reads as "none yet": the writer's next sync brings one.
            raw = txn.get(b"epoch_proof", db=self._meta)
            self.epoch_proof, self.epoch_proof_epoch = (b"", -1) if not raw else (bytes(raw[8:]), _U64BE.unpack(raw[:8])[0])
            raw = txn.get(b"counters", db=self._meta)
            self.counters = {"corrupt_found": 0, "repaired": 0, "conflicts_refused": 0}
            self.counters.update(json.loads(raw) if raw else {})
            raw = txn.get(b"damaged", db=self._meta)
            #: per PG, LSNs whose copy here was lost to corruption and not yet refetched. While a PG
            #: has any, this segment does not answer quorum reads for it: a lost copy breaks the
            #: "every durable record is on one of any three segments" argument, as a down node would.
            self.damaged: list[set[int]] = [set() for _ in range(P)]
            for pg, lsns in (json.loads(raw) if raw else {}).items():
                self.damaged[int(pg)] = set(lsns)
            self._load_collection(txn)
            # Collection removes records only at or below the hint it knew, and adopting a peer's
            # horizon requires it below the hint: the hint is at least every horizon. A folder
            # written before collection persisted its hint with it may store one below.
            self.hint_lsn = max([self.hint_lsn] + [g[HORIZON] for g in self.gc])
        if upgraded_from is not None:
            log.info("node %s: upgraded node folder %s from format %d to format %d", self.node_id, self.path, upgraded_from, NODE_FORMAT)
        self._truncated_max = max((t.last for t in self.truncations), default=0)
        # Appends persist SCLs lazily (see append), so the stored ones may lag: walk forward.
        with self.env.begin() as txn:
            #: per PG, the highest LSN held (to know when SCL needs a walk after a hole is filled)
            self.max_lsn = [self._highest_in_txn(txn, pg) for pg in range(P)]
            for pg in range(P):
                self._walk_scl(txn, pg)
        self._persisted_at = 0.0
        self._reserve_bytes_option = reserve_bytes
        self._capacity_bytes, self._capacity_at = self._capacity_now(), time.monotonic()

    def _check_identity(self, txn, volume_id: str) -> int | None:
        """Write a new folder's identity, or check an existing one: its format (upgrading an older
        one in place), its volume and geometry. Raises inside the open's write transaction, so a
        refused folder is left exactly as it was. Returns the format upgraded from, if any."""
        P = self.geometry.protection_groups
        identity = {"volume_id": volume_id, "node": self.node_id, "protection_groups": P, "format": NODE_FORMAT}
        raw = txn.get(b"volume", db=self._meta)
        if raw is None:
            txn.put(b"volume", json.dumps(identity, sort_keys=True).encode(), db=self._meta)
            return None
        try:
            stored = json.loads(raw)
        except ValueError:
            stored = None
        if not isinstance(stored, dict):
            raise WrongFolder(f"folder {self.path} holds LMDB data but no node identity Sixfold can read: {bytes(raw)[:80]!r}")
        fmt = stored.get("format", 0)  # format 0: the first release wrote no "format" key
        if type(fmt) is not int or fmt < 0:
            raise WrongFolder(f"node folder {self.path} records format {fmt!r}, which is not a format version")
        if fmt > NODE_FORMAT:
            from engine.version import __version__

            raise WrongFolder(
                f"node folder {self.path} has node format {fmt}, written by a newer Sixfold release; this release "
                f"({__version__}) reads node formats up to {NODE_FORMAT}. Serve it with the release that wrote it "
                "(or a newer one); nothing was changed."
            )
        if stored.get("protection_groups") != P or stored.get("volume_id") != volume_id:
            raise GeometryMismatch(
                f"node folder {self.path} holds volume {stored.get('volume_id')} with "
                f"{stored.get('protection_groups')} protection groups; asked for volume {volume_id} with {P}"
            )
        if fmt < NODE_FORMAT:
            # Format 0 -> 1 changed no table, key or record: only the version is recorded. 1 -> 2
            # adds the `requests` table, which open_db created empty above: folders of older
            # formats hold no request records. 2 -> 3 (version collection) adds meta keys that
            # are absent until the node first collects. 3 -> 4 (expiring puts) changes nothing
            # stored: older folders hold no EXPIRES record. A later format adds its conversion here,
            # inside this same transaction (all or nothing).
            txn.put(b"volume", json.dumps(dict(stored, format=NODE_FORMAT), sort_keys=True).encode(), db=self._meta)
            return fmt
        return None

    # --- space --------------------------------------------------------------------------------
    def _data_file(self) -> str:
        return os.path.join(self.path, "data.mdb")

    def _capacity_now(self) -> int:
        """The most this node's data file can hold: the smallest of its maximum (what its map may
        grow to), the process's file size limit, and what its filesystem has room for (the file
        as it is plus the free bytes an unprivileged writer may still use)."""
        limits = [self._map_max]
        soft, _hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        if soft != resource.RLIM_INFINITY:
            limits.append(soft)
        try:
            fs = os.statvfs(self.path)
            limits.append(os.path.getsize(self._data_file()) + fs.f_bavail * fs.f_frsize)
        except OSError:
            pass  # the map and the limit still bound it
        return min(limits)

    def reserve_bytes(self, capacity_bytes: int) -> int:
        """Room kept for what must still land when the node reports `space_low`.

        Default: max(capacity / 16, min(2 frames, capacity / 4)). A writer admits a put only where
        it fits in the room above the reserve (`room_bytes`, by its own bound of what records
        cost, engine.core.admission), but records it already logged must still land here
        (refusing part of its log would stall it) when the bound falls short, gossip's repairs
        come on top, and LMDB's copy-on-write needs the pages a transaction touches twice until
        it commits. Deletes are records too (small ones) and must keep working, so a full volume
        can be emptied: a sixteenth of a large node is kept for them."""
        if self._reserve_bytes_option is not None:
            return self._reserve_bytes_option
        return max(capacity_bytes // RESERVE_FRACTION, min(2 * FRAME_BYTES_MAX, capacity_bytes // 4))

    def floor_bytes(self, capacity_bytes: int) -> int:
        """Room no append may take: kept for the transactions that give room back or must run
        whatever happens (truncation cuts, quarantines, version collection, seals, meta), since
        in a full LMDB file even a delete needs fresh pages (copy-on-write) before it frees any.
        max(FLOOR_BYTES_MIN, capacity / FLOOR_FRACTION), at most half the reserve (a node told to
        keep no reserve keeps no floor either). The writer keeps puts out of the whole reserve; the
        floor is what holds even when deletes, repairs or a miscount have used the rest. An
        append near it measures, inside its transaction before the commit, what the tables would
        hold with it, and is refused (aborted: nothing written) if that reaches into the floor;
        records a node holds already cost nothing, so recovery's re-sends to full nodes land."""
        return min(self.reserve_bytes(capacity_bytes) // 2, max(FLOOR_BYTES_MIN, capacity_bytes // FLOOR_FRACTION))

    def space(self, exact: bool = True) -> tuple[int, int, bool, int]:
        """(used_bytes, capacity_bytes, space_low, room_bytes). Used is what `usage` says: the
        pages the tables hold, so that pages freed inside the file (LMDB reuses them) count as
        room again. Room is what is left above the reserve; the node is low on space exactly
        when none is (room 0), so a writer that admits a put only where it fits
        (`engine.core.admission`) and one that admits none on low nodes agree. The capacity is
        re-measured at most every SPACE_REFRESH_S (a statvfs and a getrlimit). With `exact` false
        (an append's reply) the tables may go unmeasured, see USAGE_REFRESH_S: used and held
        are then bounds from above, so the room is one from below."""
        now = time.monotonic()
        if now - self._capacity_at >= SPACE_REFRESH_S:
            self._capacity_bytes, self._capacity_at = self._capacity_now(), now
        capacity = self._capacity_bytes
        reserve = self.reserve_bytes(capacity)
        last = self._last_usage
        charged = self._usage_charged
        txnid = self.env.info()["last_txnid"]
        # Exact unless the last measurement is recent, the room ample, and every transaction
        # committed since was an append that charged it (a collection step may grow the file).
        if (exact or last is None or now - self._usage_at >= USAGE_REFRESH_S or txnid != self._usage_txnid
                or capacity - last[0] - charged - reserve < USAGE_EXACT_ROOM_BYTES):
            last = self._last_usage = self.usage()
            self._usage_at, self._usage_charged, charged, self._usage_txnid = now, 0, 0, txnid
        used, self.held_bytes = last[0] + charged, last[1] + charged
        room = max(0, capacity - used - reserve)
        return used, capacity, room == 0, room

    def _charge_usage(self, frame_bytes: int, records: int) -> None:
        """Count an appended frame (its transaction just committed) against the last measurement
        of `usage` (see USAGE_REFRESH_S)."""
        self._usage_charged += (4 * frame_bytes + records * USAGE_CHARGE_PER_RECORD_BYTES
                                + USAGE_CHARGE_PER_COMMIT_PAGES * self._page_bytes)
        self._usage_txnid += 1

    def usage(self) -> tuple[int, int]:
        """(used bytes, held bytes). Held: the data file's high-water mark (last page + 1, times
        the page size), which the map must hold and which LMDB never lowers. Used: the pages of
        every table (LMDB's stats, which count a dupsort table's sub-database pages too, and
        overstate them once sub-databases were freed: engine.node.collection rebuilds a small
        version index to reset them) and the meta pages; at most held. Pages on LMDB's free list are the difference:
        LMDB reuses them, so they are room. Some of them cannot be reused yet (those freed by the
        last commits, kept for readers and for the previous meta page): the reserve covers them."""
        with self._read_txn() as txn:
            held = self.env.info()["last_pgno"] + 1
            pages = self._snapshot_pages(txn)
        return min(pages, held) * self._page_bytes, held * self._page_bytes

    def _snapshot_pages(self, txn) -> int:
        """`_table_pages` of a read transaction, measured once per committed transaction (an
        append's reply, a gossip's state and status all ask; nothing changed in between)."""
        txnid = txn.id()
        cached = self._pages_at
        if cached is not None and cached[0] == txnid:
            return cached[1]
        pages = self._table_pages(txn)
        self._pages_at = (txnid, pages)
        return pages

    def _table_pages(self, txn) -> int:
        """The pages the tables hold as `txn` sees them (see `usage`; the main table's, which
        holds only the tables' names, as last committed)."""
        main = self.env.stat()
        pages = 2 + main["branch_pages"] + main["leaf_pages"] + main["overflow_pages"]
        for db in (self._log, self._versions, self._meta, self._requests):
            st = txn.stat(db)
            pages += st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]
        return pages

    def _append_reply(self) -> AppendReply:
        used, capacity, low, room = self.space(exact=False)
        self._note_storage_level(used, capacity)
        return AppendReply(self.node_id, tuple(self.scls), low, room, self.extent_room(capacity))

    def extent_room(self, capacity: int) -> int:
        """The largest record this node can surely store in one piece (AppendReply.extent_bytes):
        room above the reserve beyond the data file's high-water mark (`held_bytes`, as the last
        `space()` measured it). A value larger than a page takes consecutive pages, which the
        pages freed inside the file (room for small records) may not offer."""
        return max(0, capacity - self.held_bytes - self.reserve_bytes(capacity))

    def _note_storage_level(self, used: int, capacity: int) -> None:
        """Log once per crossing of STORAGE_WARNING_PERCENT of the capacity (under _write_lock)."""
        high = sizes.used_percent(used, capacity) >= sizes.STORAGE_WARNING_PERCENT
        if high != self._storage_high:
            self._storage_high = high
            if high:
                log.warning("%s", sizes.storage_warning(self.node_id, used, capacity))
            else:
                log.info("node %s is below %d%% of its capacity again (%s of %s)", self.node_id,
                         sizes.STORAGE_WARNING_PERCENT, sizes.format_size(used), sizes.format_size(capacity))

    # --- map growth (engine.node.growth) -------------------------------------------------------
    def _read_txn(self) -> "_ReadTxn":
        """A read transaction inside the map gate (every read of this store takes one)."""
        return _ReadTxn(self)

    def _check_maximum(self) -> None:
        """Refuse a maximum below the data the folder holds (at open, before anything is written)."""
        held = (self.env.info()["last_pgno"] + 1) * self._page_bytes
        if held > self.max_bytes:
            raise InvalidArgument(
                f"node {self.node_id} holds {sizes.format_size(held)} ({held} bytes) in {self.path} (LMDB never shrinks "
                f"its file); a maximum of {sizes.format_size(self.max_bytes)} ({self.max_bytes} bytes) is below it. "
                f"Give at least {held} bytes; nothing was changed."
            )

    def _grow_locked(self, need_bytes: int, why: str) -> bool:
        """Grow the map to hold `need_bytes` with room to spare, at most to the maximum; False if
        it cannot (at its maximum, asked from inside a read, readers that do not leave, or the OS
        refusing the address space: then writes meet the full map, StorageFull). Holds _write_lock."""
        if self.map_bytes >= self._map_max or self._gate.inside() or self._closed:
            return False
        new = growth.next_map_bytes(self.map_bytes, need_bytes, self._map_max)
        try:
            self._gate.alone(lambda: self.env.set_mapsize(new))
        except (lmdb.Error, OSError, growth.GateTimeout) as e:
            log.warning("node %s: could not grow its LMDB map from %d to %d bytes (%s): %s: %s", self.node_id,
                        self.map_bytes, new, why, type(e).__name__, e)
            return False
        old, self.map_bytes = self.map_bytes, new
        log.info("node %s: grew its LMDB map from %s to %s (%s; maximum %s)", self.node_id, sizes.format_size(old),
                 sizes.format_size(new), why, sizes.format_size(self.max_bytes))
        return True

    def _make_room(self, frame_bytes: int) -> bool:
        """Before an append (holding _write_lock, so no write transaction is open): grow the map
        ahead of it when it could take the file past GROW_AT_FRACTION of the map, and say whether
        it comes near the floor (`floor_bytes`): then its transaction measures what it holds
        before it commits (`_check_floor`). Records a node holds already cost nothing (recovery
        re-sends them to full nodes), so only the transaction itself can tell. This takes the last
        measurement (`space`, which every append's reply makes): what other writes added since is
        a few pages (seals, meta), within FLOOR_SLACK_BYTES and growth.SLACK_BYTES."""
        used, held = self._last_usage or self.usage()
        capacity = self._capacity_bytes
        floor = self.floor_bytes(capacity)
        near = bool(floor) and used + frame_bytes + FLOOR_SLACK_BYTES > capacity - floor
        if not near and self._at_floor:
            self._at_floor = False
            log.info("node %s takes appends again (%s used of %s)", self.node_id, sizes.format_size(used),
                     sizes.format_size(capacity))
        need = held + growth.WRITE_COST_FACTOR * frame_bytes + growth.SLACK_BYTES
        if need > self.map_bytes * growth.GROW_AT_FRACTION:
            self._grow_locked(need, "ahead of a write")
        return near

    def _check_floor(self, txn) -> None:
        """Inside an append's transaction, before its commit: StorageFull (which aborts it: nothing
        written) when what the tables hold with it reaches into the floor."""
        capacity = self._capacity_bytes
        floor = self.floor_bytes(capacity)
        used = self._table_pages(txn) * self._page_bytes
        if used + FLOOR_SLACK_BYTES <= capacity - floor:
            return
        if not self._at_floor:
            self._at_floor = True
            log.warning("node %s is full: it uses %s of its %s and keeps the last %s for deletes and collection; "
                        "appends are refused until room comes back", self.node_id, sizes.format_size(used),
                        sizes.format_size(capacity), sizes.format_size(floor))
        raise StorageFull(
            f"node {self.node_id} is full: with this append it would use {used} of its {capacity} bytes, and it keeps "
            f"the last {floor} for truncations, quarantines and version collection (the transactions that give room "
            "back), so it refused the append and changed nothing; reads still work"
        )

    def grow_after_full(self, seen_map_bytes: int) -> bool:
        """A write found the map full (of `seen_map_bytes`) and was aborted: grow it, or say it
        has grown since; False when it cannot grow (the error then stands)."""
        with self._write_lock:
            if self.map_bytes > seen_map_bytes:
                return True
            return self._grow_locked(self.map_bytes + growth.SLACK_BYTES, "a write found it full")

    def storage_full_cause(self, exc: BaseException) -> str | None:
        """Why `exc`, an LMDB or OS error of a write, means "no room here"; None if it does not.

        py-lmdb raises MapFullError for a full map, and a plain lmdb.Error carrying the errno's
        text otherwise. LMDB reports a *short* write (the data file reached RLIMIT_FSIZE, or the
        disk filled in the middle of a write) as EIO, so an EIO counts as full when the file is
        at its size limit or the filesystem is out of free bytes."""
        if isinstance(exc, lmdb.MapFullError):
            if self.map_bytes >= self._map_max:
                return f"it holds its maximum of {sizes.format_size(self.max_bytes)} ({self.max_bytes} bytes)"
            return f"its LMDB map of {self.map_bytes} bytes is full and could not grow (see its log)"
        if isinstance(exc, OSError) and exc.errno in FULL_ERRNOS:
            return os.strerror(exc.errno)
        if not isinstance(exc, lmdb.Error):
            return None
        text = str(exc)
        for code in FULL_ERRNOS:
            if os.strerror(code) in text:
                return os.strerror(code)
        if isinstance(exc, lmdb.DiskError):
            return os.strerror(errno.ENOSPC)
        if os.strerror(errno.EIO) not in text:
            return None
        soft, _hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        try:
            size = os.path.getsize(self._data_file())
            fs = os.statvfs(self.path)
        except OSError:
            return None
        if soft != resource.RLIM_INFINITY and size + self._page_bytes > soft:
            return f"its data file reached the file size limit of {soft} bytes (RLIMIT_FSIZE)"
        if fs.f_bavail * fs.f_frsize < FREE_BYTES_FLOOR:
            return f"its filesystem has {fs.f_bavail * fs.f_frsize} bytes free"
        return None

    # --- helpers ----------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        """True once close() ran (requests then raise Closed)."""
        return self._closed

    def _put_scl(self, txn, pg: int) -> None:
        txn.put(_scl_key(pg), _U64BE.pack(self.scls[pg]), db=self._meta)

    def _get_u64(self, txn, key: bytes) -> int:
        raw = txn.get(key, db=self._meta)
        return _U64BE.unpack(raw)[0] if raw else 0

    def _check_open(self) -> None:
        if self._closed:
            raise Closed(f"node {self.node_id} is stopped")

    def _check_pg(self, pg: int) -> None:
        if not isinstance(pg, int) or not 0 <= pg < self.geometry.protection_groups:
            raise UnknownProtectionGroup(
                f"protection group {pg!r} does not exist (this volume has {self.geometry.protection_groups})"
            )

    def _is_truncated(self, lsn: int) -> bool:
        return lsn <= self._truncated_max and any(t.covers(lsn) for t in self.truncations)

    def _walk_scl(self, txn, pg: int, scls: list[int] | None = None, max_lsn: list[int] | None = None) -> None:
        """Advance SCL of `pg` (in `scls`, default the live list) along backlinks through records
        already in the log, as this transaction sees it (`max_lsn`: the highest LSNs it holds)."""
        scls = self.scls if scls is None else scls
        max_lsn = self.max_lsn if max_lsn is None else max_lsn
        scl = scls[pg]
        if max_lsn[pg] <= scl:
            return
        prefix = _U32BE.pack(pg)
        cur = txn.cursor(db=self._log)
        if not cur.set_range(prefix + _U64BE.pack(scl + 1)):
            return
        first = True
        for k, rec in cur:
            if k[:4] != prefix:
                break
            prev = _PREV_AT.unpack_from(rec, 16)[0]
            # After a repair across collected records the SCL may name no record held here
            # (engine.node.collection): then the next record extends the chain if its backlink
            # lies at or below it. Otherwise the backlink must be the SCL itself.
            if prev != scl and not (first and prev < scl and txn.get(prefix + _U64BE.pack(scl), db=self._log) is None):
                break
            first = False
            scl = _U64BE.unpack(k[4:])[0]
        scls[pg] = scl

    def _fence(self, epoch: int) -> None:
        if epoch < self.epoch:
            raise StaleEpoch(f"node {self.node_id} is at epoch {self.epoch}; request carried epoch {epoch}: that writer was fenced")
        if epoch > self.epoch:
            raise EpochBehind(f"node {self.node_id} is at epoch {self.epoch}, request at {epoch}: sync the epoch first")

    def _check_synced(self, epoch: int) -> None:
        """An append at `epoch` needs this node synced at it (a writer's `sync_epoch`, which
        carries that epoch's truncation ranges), not only sealed at it. A seal that a
        writer did not follow up (an open or a membership step short of a write quorum) leaves a
        node at an epoch another writer may then own; taking that writer's appends before its
        truncations once let the node learn a durable hint first and then refuse the ranges
        for ever, and keep records they cut. EpochBehind: the writer syncs, then sends again."""
        if self.synced_epoch != epoch:
            raise EpochBehind(
                f"node {self.node_id} was sealed at epoch {epoch} but not synced at it (last synced at "
                f"{self.synced_epoch}): sync the epoch first"
            )

    # --- writes -----------------------------------------------------------------------------
    @retry_when_full
    def append(self, epoch: int, frame: bytes, hint_lsn: int = 0, *, repair: bool = False, items=None,
               collect: tuple[int, int] = (0, 0), collected: tuple[int, int, int, int] | None = None) -> AppendReply:
        """Persist a frame in one transaction; return every PG's SCL afterwards.

        `repair=True` (gossip, rebuild) skips the epoch fence: the records were already accepted
        at some epoch, and truncation ranges still keep dead ones out. `items` are the frame's
        records as `codec.index_frame` returned them, when the caller already indexed (and so
        verified) the frame. `collect`: the writer's collection and request points
        (engine.node.collection). `collected` (repair only): (pg, after, complete, horizon) of the
        fetch the frame came from (`FetchReply`), for `adopt_collected`."""
        self._check_open()
        _bounded(epoch, EPOCH_MAX, "epoch")
        _bounded(hint_lsn, LSN_VALID_MAX, "hint_lsn")
        _bounded(collect[0], LSN_VALID_MAX, "collect_lsn")
        _bounded(collect[1], LSN_VALID_MAX, "collect_requests_lsn")
        if collected is not None:
            self._check_pg(collected[0])
            for v, what in zip(collected[1:], ("fetch start", "complete_lsn", "horizon_lsn")):
                _bounded(v, LSN_VALID_MAX, what)
        if items is None:
            items = codec.index_frame(frame)  # CorruptRecord: rejected whole, nothing written
        # A frame's LSNs strictly increase (the decoder checks it) and prev_lsn < lsn, so the
        # last record bounds them all.
        if items and items[-1].lsn > LSN_VALID_MAX:
            raise InvalidArgument(
                f"record lsn {items[-1].lsn} is above the highest valid LSN {LSN_VALID_MAX}; the frame is refused whole"
            )
        P = self.geometry.protection_groups
        for it in items:
            if it.pg >= P:
                raise UnknownProtectionGroup(f"record lsn {it.lsn} names protection group {it.pg}; this volume has {P}")
        if not repair:
            self._fence(epoch)
        with self._write_lock:
            self._check_open()
            if not repair:
                self._fence(epoch)
                self._check_synced(epoch)
                self.set_collect_target(epoch, *collect)
            if not items and hint_lsn <= self.hint_lsn and collected is None:  # a heartbeat: nothing to persist
                return self._append_reply()
            near_floor = self._make_room(len(frame))
            if items and items[0].lsn <= self._truncated_max:
                items = [it for it in items if not self._is_truncated(it.lsn)]
            # Everything is computed on copies and published only after the commit, so nobody is
            # ever told a segment holds what it has not durably written, and a refused or failed
            # transaction leaves the in-memory mirror as it was.
            scls, max_lsn = list(self.scls), list(self.max_lsn)
            gc = self.gc
            healed: list[tuple[int, int]] = []
            try:
                with _Staged(self.env) as txn:
                    if items:
                        # One C loop per table. The log keeps the copy it has (overwrite=False);
                        # `added` says whether every record was new, so the common case costs
                        # nothing more. A dupsort table stores an identical pair once.
                        cur = txn.cursor(db=self._log)
                        _consumed, added = _put_ascending(cur, [(it.log_key, it.record) for it in items], overwrite=False)
                        if added < len(items):
                            self._check_held_copies(txn, items)  # ConflictingRecord aborts the transaction
                        self._index(txn, items)
                        if near_floor:
                            self._check_floor(txn)  # StorageFull aborts the transaction
                    if any(self.damaged):
                        healed = [(it.pg, it.lsn) for it in items if it.lsn in self.damaged[it.pg]]
                        if healed:
                            self._put_damaged(txn, without=healed)
                    touched = set()
                    for it in items:
                        pg = it.pg
                        if it.prev_lsn == scls[pg] and it.lsn > scls[pg]:
                            scls[pg] = it.lsn  # the common case: the frame extends the chain
                        if it.lsn > max_lsn[pg]:
                            max_lsn[pg] = it.lsn
                        touched.add(pg)
                    for pg in sorted(touched):
                        self._walk_scl(txn, pg, scls, max_lsn)
                    jumped = False
                    if collected is not None:
                        gc = [list(g) for g in self.gc]
                        pg = collected[0]
                        jumped = self.adopt_collected(txn, pg, *collected[1:], scls, gc)
                        self.publish_horizons(gc)  # before the commit (check_horizon)
                        if jumped:
                            self._walk_scl(txn, pg, scls, max_lsn)
                            # A lost copy the peer collected will never come back; it need not.
                            gone = [(pg, lsn) for lsn in self.damaged[pg] if lsn <= scls[pg]]
                            if gone:
                                healed += gone
                                self._put_damaged(txn, without=healed)
                    # SCLs and the hint are persisted at most every SCL_PERSIST_S: a stored SCL is
                    # only a lower bound that opening walks forward from, and the hint only bounds
                    # how much a seal summarises. Skipping the meta table keeps most commits to two
                    # tables.
                    now = time.monotonic()
                    # A jump across collected records is persisted at once: opening could not walk
                    # across them again.
                    persist = now - self._persisted_at >= SCL_PERSIST_S or not items or jumped
                    if persist:
                        for pg, scl in enumerate(scls):
                            txn.put(_scl_key(pg), _U64BE.pack(scl), db=self._meta)
                        txn.put(b"hint", _U64BE.pack(max(hint_lsn, self.hint_lsn)), db=self._meta)
            except ConflictingRecord as e:
                self._count_conflict(e, "repair (gossip or re-replication)" if repair else f"a writer at epoch {epoch}")
                raise
            if persist:
                self._persisted_at = now
            for pg, lsn in healed:
                self.damaged[pg].discard(lsn)
            self.scls, self.max_lsn, self.gc = scls, max_lsn, gc
            if hint_lsn > self.hint_lsn:
                self.hint_lsn = hint_lsn
            if items:
                self._charge_usage(len(frame), len(items))
            return self._append_reply()

    def _index(self, txn, items) -> None:
        """Index a frame's records: user keys in `versions`, request ids in `requests`."""
        requests = [it for it in items if it.flags & FLAG_REQUEST]
        if requests:
            items = [it for it in items if not it.flags & FLAG_REQUEST]
            txn.cursor(db=self._requests).putmulti([(it.version_key, it.log_key[4:]) for it in requests], dupdata=True)
            # A request record's value is its digest then (since commit times) its commit time,
            # the record's last bytes (engine.backup.format.commit_time_of).
            newest = max((_U64LE.unpack_from(it.record, len(it.record) - REQUEST_TIME_BYTES)[0] for it in requests
                          if len(it.record) - RECORD_HEADER_BYTES - (len(it.version_key) - 4) == REQUEST_DIGEST_BYTES + REQUEST_TIME_BYTES),
                         default=0)
            if newest > self.commit_time_us:
                txn.put(b"commit_time", _U64BE.pack(newest), db=self._meta)
                self.commit_time_us = newest  # an aborted frame leaves it high: a floor may only be too high
        if items:
            _put_ascending(txn.cursor(db=self._versions), [(it.version_key, it.log_key[4:]) for it in items], dupdata=True)

    def _check_held_copies(self, txn, items) -> None:
        """Some records of the frame were already held: each must be the very same bytes (a
        re-send). A different record at a held LSN raises ConflictingRecord, which aborts the
        transaction: nothing of the frame is written or indexed. A held copy that fails its CRC
        is not a record any more: the sender's good copy replaces it, as gossip would refill it
        after a quarantine."""
        for it in items:
            held = txn.get(it.log_key, db=self._log)
            if held == it.record:
                continue  # new (just put) or an identical re-send
            try:
                old = codec.decode_record(held)
            except CorruptRecord:
                self._remove(txn, it.log_key, held)
                txn.put(it.log_key, it.record, db=self._log)
                continue
            raise ConflictingRecord(
                f"node {self.node_id}: pg {it.pg} already holds a different record at LSN {it.lsn} "
                f"(key {old.key[:32]!r}, prev_lsn {old.prev_lsn}; the frame's has key {it.version_key[4:][:32]!r}, "
                f"prev_lsn {it.prev_lsn}); one LSN names one record for ever, so the frame is refused whole"
            )

    def _count_conflict(self, e: ConflictingRecord, sender: str) -> None:
        """Count a refused frame in the persisted counters and log it once (under _write_lock)."""
        self.counters["conflicts_refused"] = self.counters.get("conflicts_refused", 0) + 1
        log.warning("node %s: refused a frame from %s: %s", self.node_id, sender, e)
        try:
            with self.env.begin(write=True) as txn:
                txn.put(b"counters", json.dumps(self.counters).encode(), db=self._meta)
        except lmdb.Error as err:  # the refusal stands; only its count may be lost at a restart
            log.warning("node %s: could not persist the conflict count: %s", self.node_id, err)

    @retry_when_full
    def seal(self, epoch: int) -> SealReply:
        """Raise the epoch and summarise every segment, atomically (one write transaction)."""
        self._check_open()
        _bounded(epoch, EPOCH_MAX, "epoch")
        with self._write_lock:
            self._check_open()
            if epoch <= self.epoch:
                raise StaleEpoch(f"node {self.node_id} is already at epoch {self.epoch}; cannot seal at {epoch}")
            _check_epoch_step(self.node_id, self.epoch, epoch)
            with self.env.begin(write=True) as txn:
                txn.put(b"epoch", _U64BE.pack(epoch), db=self._meta)
                segments = tuple(self._summary(txn, pg) for pg in range(self.geometry.protection_groups))
            # Published only once committed: a seal that failed to persist fences nobody.
            self.epoch = epoch
            return SealReply(self.node_id, epoch, segments, tuple(self.truncations))

    def _summary(self, txn, pg: int) -> SegmentSummary:
        prefix = _U32BE.pack(pg)
        cur = txn.cursor(db=self._log)
        last_at_hint = 0
        headers = []
        if cur.set_range(prefix + _U64BE.pack(self.hint_lsn + 1)):
            for k, rec in cur:
                if k[:4] != prefix:
                    break
                try:
                    r = codec.decode_record(rec)
                except CorruptRecord:
                    continue  # a corrupt copy counts as missing
                headers.append(RecordHeader(r.lsn, r.prev_lsn, r.flags))
            found = cur.set_range(prefix + _U64BE.pack(self.hint_lsn + 1))
            moved = cur.prev() if found else cur.last()
        else:
            moved = cur.last()
        if moved and cur.key()[:4] == prefix:
            last_at_hint = _U64BE.unpack(cur.key()[4:])[0]
        return SegmentSummary(
            self.node_id, pg, self.scls[pg], self.hint_lsn, last_at_hint, tuple(headers), tuple(sorted(self.damaged[pg]))
        )

    @retry_when_full
    def sync_epoch(self, epoch: int, truncations: Sequence[TruncationRange], membership: Membership | None = None,
                   proof: bytes = b"", proof_epoch: int = -1, *, writer: bool = True) -> NodeState:
        """Adopt `epoch` (>= ours), its truncation ranges and membership; cut truncated records.
        `proof`: the writer's signed statement of that state (of epoch `proof_epoch`), kept when
        it is the newest this node holds, to hand on by gossip (checked by the caller). `writer`:
        the sync comes from the writer of `epoch` (so the node is synced at it: `_check_synced`);
        gossip passes False, and counts as a sync only when it brings that epoch's membership."""
        self._check_open()
        _bounded(epoch, EPOCH_MAX, "epoch")
        for t in truncations:
            _bounded(t.epoch, EPOCH_MAX, "truncation range epoch")
            _bounded(t.last, TRUNCATION_LSN_MAX, "truncation range last LSN")
        if membership is not None:
            _bounded(membership.epoch, EPOCH_MAX, "membership epoch")
        with self._write_lock:
            self._check_open()
            if epoch < self.epoch:
                raise StaleEpoch(f"node {self.node_id} is at epoch {self.epoch}; cannot go back to {epoch}")
            _check_epoch_step(self.node_id, self.epoch, epoch)
            new = [t for t in truncations if t not in self.truncations]
            # A recovery's range starts above its VDL, which is at least every VDL any writer ever
            # announced, so above every node's hint: a range at or below our hint would cut records
            # we were told are durable. Refused whole, whoever sends it (a writer or gossip).
            cutting = [t for t in new if t.first <= self.hint_lsn]
            if cutting:
                self.refused_truncations += 1
                t = cutting[0]
                raise InvalidArgument(
                    f"node {self.node_id} refuses truncation range {t.first}..{t.last} (epoch {t.epoch}): it starts at "
                    f"or below LSN {self.hint_lsn}, which a writer announced durable; a recovery's range always starts "
                    "above every announced VDL. Nothing changed."
                )
            adopt = membership is not None and (self.membership is None or membership.epoch >= self.membership.epoch)
            # Computed on copies, published once committed: a failed transaction changes nothing.
            all_truncations = sorted(set(self.truncations) | set(new), key=lambda t: (t.first, t.epoch)) if new else self.truncations
            scls, max_lsn = list(self.scls), list(self.max_lsn)
            keep_proof = bool(proof) and proof_epoch > self.epoch_proof_epoch
            now = max(self.epoch, epoch)
            synced = (writer or (membership is not None and membership.epoch == now)) and self.synced_epoch != now
            with self.env.begin(write=True) as txn:
                if synced:
                    txn.put(b"synced_epoch", _U64BE.pack(now), db=self._meta)
                if keep_proof:
                    txn.put(b"epoch_proof", _U64BE.pack(proof_epoch) + proof, db=self._meta)
                if epoch > self.epoch:
                    txn.put(b"epoch", _U64BE.pack(epoch), db=self._meta)
                if new:
                    txn.put(b"truncations", json.dumps([[t.epoch, t.first, t.last] for t in all_truncations]).encode(), db=self._meta)
                    for pg in range(self.geometry.protection_groups):
                        self._cut(txn, pg, new, scls, max_lsn)
                if adopt:
                    txn.put(
                        b"membership",
                        json.dumps({"epoch": membership.epoch, "members": membership.members, "next": membership.next_members}).encode(),
                        db=self._meta,
                    )
            self.epoch = now
            if synced:
                self.synced_epoch = now
            if new:
                self.truncations = all_truncations
                self._truncated_max = max(t.last for t in all_truncations)
                self.scls, self.max_lsn = scls, max_lsn
            if adopt:
                self.membership = membership
            if keep_proof:
                self.epoch_proof, self.epoch_proof_epoch = proof, proof_epoch
        return self.state()

    def _cut(self, txn, pg: int, ranges: Iterable[TruncationRange], scls: list[int], max_lsn: list[int]) -> None:
        """Remove the records of `pg` inside `ranges`; pull SCL below the first cut, then re-walk
        (in `scls` and `max_lsn`, the caller's copies)."""
        prefix = _U32BE.pack(pg)
        lowest_cut = None
        for r in ranges:
            cur = txn.cursor(db=self._log)
            doomed = []
            if cur.set_range(prefix + _U64BE.pack(r.first)):
                for k, rec in cur:
                    lsn = _U64BE.unpack(k[4:])[0] if k[:4] == prefix else None
                    if lsn is None or lsn > r.last:
                        break
                    doomed.append((k, rec))
            for k, rec in doomed:
                self._remove(txn, k, rec)
            if doomed:
                lsn0 = _U64BE.unpack(doomed[0][0][4:])[0]
                lowest_cut = lsn0 if lowest_cut is None else min(lowest_cut, lsn0)
        if lowest_cut is not None and scls[pg] >= lowest_cut:
            self._pull_scl_below(txn, pg, lowest_cut, scls)
        max_lsn[pg] = self._highest_in_txn(txn, pg)
        self._walk_scl(txn, pg, scls, max_lsn)
        txn.put(_scl_key(pg), _U64BE.pack(scls[pg]), db=self._meta)

    def _remove(self, txn, log_k: bytes, rec: bytes) -> None:
        """Delete one record and its version entry. The key comes from the record itself; if the
        record is corrupt we find the version entry by scanning the PG's index for the LSN."""
        txn.delete(log_k, db=self._log)
        lsn_be = log_k[4:]
        try:
            r = codec.decode_record(rec)
            txn.delete(log_k[:4] + r.key, lsn_be, db=self._requests if r.flags & FLAG_REQUEST else self._versions)
            return
        except CorruptRecord:
            pass
        prefix = log_k[:4]
        for db in (self._versions, self._requests):
            cur = txn.cursor(db=db)
            if cur.set_range(prefix):
                for k, v in cur:
                    if k[:4] != prefix:
                        break
                    if v == lsn_be:
                        cur.delete()
                        return

    def _pull_scl_below(self, txn, pg: int, lsn: int, scls: list[int]) -> None:
        """SCL of `pg` in `scls` becomes the highest LSN held below `lsn` (those were all on the chain)."""
        prefix = _U32BE.pack(pg)
        cur = txn.cursor(db=self._log)
        scl = 0
        if cur.set_range(prefix + _U64BE.pack(lsn)):
            if cur.prev() and cur.key()[:4] == prefix:
                scl = _U64BE.unpack(cur.key()[4:])[0]
        elif cur.last() and cur.key()[:4] == prefix:
            scl = min(_U64BE.unpack(cur.key()[4:])[0], lsn - 1)
        scls[pg] = min(scls[pg], scl)

    def _highest_in_txn(self, txn, pg: int) -> int:
        cur = txn.cursor(db=self._log)
        if cur.set_range(_U32BE.pack(pg + 1)):
            moved = cur.prev()
        else:
            moved = cur.last()
        if moved and cur.key()[:4] == _U32BE.pack(pg):
            return _U64BE.unpack(cur.key()[4:])[0]
        return 0

    @retry_when_full
    def quarantine(self, pg: int, lsn: int) -> None:
        """Drop a record whose CRC failed, count it, and pull SCL below it for gossip to refill."""
        with self._write_lock:
            if self._closed:
                return
            with self.env.begin(write=True) as txn:
                k = codec.log_key(pg, lsn)
                rec = txn.get(k, db=self._log)
                if rec is None:
                    return
                try:
                    codec.decode_record(rec)
                    return  # it is fine now (refetched meanwhile)
                except CorruptRecord:
                    pass
                self._remove(txn, k, rec)
                scls, max_lsn = list(self.scls), list(self.max_lsn)
                if scls[pg] >= lsn:
                    self._pull_scl_below(txn, pg, lsn, scls)
                    txn.put(_scl_key(pg), _U64BE.pack(scls[pg]), db=self._meta)
                max_lsn[pg] = self._highest_in_txn(txn, pg)
                damaged = [set(d) for d in self.damaged]
                damaged[pg].add(lsn)
                txn.put(b"damaged", json.dumps({p: sorted(d) for p, d in enumerate(damaged) if d}).encode(), db=self._meta)
                counters = dict(self.counters, corrupt_found=self.counters["corrupt_found"] + 1)
                txn.put(b"counters", json.dumps(counters).encode(), db=self._meta)
            # Published once committed (a failed quarantine leaves the copy for the next reader).
            self.scls, self.max_lsn, self.damaged, self.counters = scls, max_lsn, damaged, counters
            log.warning("node %s: record %d of pg %d failed its CRC; quarantined for gossip to refetch", self.node_id, lsn, pg)

    def _put_damaged(self, txn, without: Sequence[tuple[int, int]] = ()) -> None:
        """Persist the damaged LSNs, less `without` ((pg, lsn) pairs healed by this transaction)."""
        gone = set(without)
        damaged = {pg: sorted(lsn for lsn in d if (pg, lsn) not in gone) for pg, d in enumerate(self.damaged)}
        txn.put(b"damaged", json.dumps({pg: d for pg, d in damaged.items() if d}).encode(), db=self._meta)

    # --- reads ------------------------------------------------------------------------------
    def _check_read(self, pg: int, read_point: int, required_lsn: int, epoch: int) -> None:
        self._check_open()
        self._check_pg(pg)
        _bounded(read_point, LSN_VALID_MAX, "read_point")
        _bounded(required_lsn, LSN_VALID_MAX, "required_lsn")
        _bounded(epoch, EPOCH_MAX, "epoch")
        if required_lsn == 0 and self.damaged[pg]:
            raise SegmentIncomplete(
                f"segment {self.node_id}/pg{pg} lost {len(self.damaged[pg])} record(s) to corruption and awaits repair"
            )
        if epoch > self.epoch:
            raise SegmentIncomplete(f"node {self.node_id} is at epoch {self.epoch}, behind the reader's {epoch}")
        if epoch < self.epoch:
            # Reads are fenced like writes: a writer (or reader) of an older epoch may hold a read
            # point a newer writer has moved past or cut; it must learn the new epoch first.
            raise StaleEpoch(f"node {self.node_id} is at epoch {self.epoch}; a read at epoch {epoch} is from a fenced "
                             "writer or a reader that has not learned the new one")
        self.check_horizon(pg, read_point)
        if self.scls[pg] < required_lsn:
            raise SegmentIncomplete(
                f"segment {self.node_id}/pg{pg} is complete to LSN {self.scls[pg]}, read needs {required_lsn}"
            )

    def _version_at(self, cur, vkey: bytes, rp_be: bytes) -> bytes | None:
        """LSN (big-endian bytes) of the newest version of `vkey` at or below the read point."""
        if cur.set_range_dup(vkey, rp_be):
            if cur.value() == rp_be:
                return rp_be
            return cur.value() if cur.prev_dup() else None
        if cur.set_key(vkey) and cur.last_dup():
            return cur.value()
        return None

    def _load(self, txn, pg: int, lsn_be: bytes, key: bytes):
        rec = txn.get(_U32BE.pack(pg) + lsn_be, db=self._log)
        if rec is None:
            raise SegmentIncomplete(f"segment {self.node_id}/pg{pg} lost record {_U64BE.unpack(lsn_be)[0]}")
        try:
            r = codec.decode_record(rec)
            if r.key != key or r.pg != pg or r.lsn != _U64BE.unpack(lsn_be)[0]:
                raise CorruptRecord(f"version index of {self.node_id}/pg{pg} points at a record of another key")
            return r
        except CorruptRecord:
            lsn = _U64BE.unpack(lsn_be)[0]  # quarantined once the read transaction ends (_ReadTxn)
            raise _Quarantine(f"segment {self.node_id}/pg{pg}: record {lsn} failed its CRC; quarantined for repair",
                              pg, lsn) from None

    def read(
        self, pg: int, key: bytes, read_point: int, required_lsn: int, epoch: int = 0, namespace: int = NAMESPACE_KEYS
    ) -> ReadReply:
        """The newest version of `key` at or below `read_point`, if this segment is complete
        enough (SCL >= required_lsn); else SegmentIncomplete. In NAMESPACE_REQUESTS `key` is a
        request id and the reply's `lsn` that of its record (0: this segment holds none)."""
        self._check_read(pg, read_point, required_lsn, epoch)
        if namespace not in (NAMESPACE_KEYS, NAMESPACE_REQUESTS):
            raise InvalidArgument(f"read namespace {namespace!r}: 0 (keys) or 1 (request ids)")
        index = self._requests if namespace == NAMESPACE_REQUESTS else self._versions
        with self._read_txn() as txn:
            self.check_horizon(pg, read_point)  # again, inside the transaction (check_horizon)
            lsn_be = self._version_at(txn.cursor(db=index), _U32BE.pack(pg) + key, _U64BE.pack(read_point))
            if lsn_be is None:
                return ReadReply(self.node_id, 0, None)
            r = self._load(txn, pg, lsn_be, key)
        if r.flags & FLAG_DELETE:
            return ReadReply(self.node_id, r.lsn, None, True)
        if r.flags & FLAG_EXPIRES:  # the deadline travels apart from the value (node format 4)
            return ReadReply(self.node_id, r.lsn, r.value[EXPIRES_BYTES:], False, _U64LE.unpack_from(r.value)[0])
        return ReadReply(self.node_id, r.lsn, r.value)

    def scan(
        self, pg: int, start: bytes, end: bytes | None, read_point: int, required_lsn: int, limit: int, epoch: int = 0
    ) -> tuple[list[VersionEntry], bytes | None]:
        """Newest versions at the read point of keys in [start, end), tombstones included, at most
        `limit` keys. Returns (entries, resume_key) where resume_key is None at the end."""
        self._check_read(pg, read_point, required_lsn, epoch)
        if not isinstance(limit, int):
            raise InvalidArgument(f"scan limit {limit!r} is not an integer")
        limit = max(1, min(limit, SCAN_ENTRIES_MAX))
        prefix = _U32BE.pack(pg)
        rp_be = _U64BE.pack(read_point)
        out: list[VersionEntry] = []
        with self._read_txn() as txn:
            self.check_horizon(pg, read_point)  # again, inside the transaction (check_horizon)
            keys = txn.cursor(db=self._versions)
            probe = txn.cursor(db=self._versions)
            if not keys.set_range(prefix + start):
                return out, None
            while True:
                k = keys.key()
                if k[:4] != prefix or (end is not None and k[4:] >= end):
                    return out, None
                if len(out) == limit:
                    return out, k[4:]
                lsn_be = self._version_at(probe, k, rp_be)
                if lsn_be is not None:
                    r = self._load(txn, pg, lsn_be, k[4:])
                    if r.flags & FLAG_EXPIRES:
                        out.append(VersionEntry(r.key, r.lsn, r.value[EXPIRES_BYTES:], _U64LE.unpack_from(r.value)[0]))
                    else:
                        out.append(VersionEntry(r.key, r.lsn, None if r.flags & FLAG_DELETE else r.value))
                if not keys.next_nodup():
                    return out, None

    def fetch(self, pg: int, after_lsn: int, max_bytes: int = FETCH_BYTES_MAX, upto_lsn: int | None = None) -> FetchReply:
        """A frame of this segment's records of `pg` above `after_lsn` (CRC-checked; corrupt ones
        are quarantined and skipped), at most about `max_bytes`, with what it knows of records it
        collected (see FetchReply)."""
        self._check_open()
        self._check_pg(pg)
        _bounded(after_lsn, LSN_VALID_MAX, "after_lsn")
        if upto_lsn is not None:
            _bounded(upto_lsn, LSN_VALID_MAX, "upto_lsn")
        if not isinstance(max_bytes, int):
            raise InvalidArgument(f"fetch max_bytes {max_bytes!r} is not an integer")
        max_bytes = max(1, min(max_bytes, FETCH_BYTES_MAX))
        prefix = _U32BE.pack(pg)
        records, size, more, bad = [], 0, False, []
        with self._read_txn() as txn:
            cur = txn.cursor(db=self._log)
            if cur.set_range(prefix + _U64BE.pack(after_lsn + 1)):
                for k, rec in cur:
                    if k[:4] != prefix:
                        break
                    lsn = _U64BE.unpack(k[4:])[0]
                    if upto_lsn is not None and lsn > upto_lsn:
                        break
                    if records and size + len(rec) > max_bytes:
                        more = True
                        break
                    try:
                        codec.decode_record(rec)
                    except CorruptRecord:
                        bad.append(lsn)
                        continue
                    records.append(bytes(rec))
                    size += len(rec)
            # Up to where the frame, with what was collected here, is the whole chain: the SCL,
            # the frame's end, and below any record skipped as corrupt.
            covered = lsn - 1 if more else (LSN_VALID_MAX if upto_lsn is None else upto_lsn)
            complete = min([covered, self.scls[pg]] + [b - 1 for b in bad[:1]])
            horizon = self.gc[pg][0]
        for lsn in bad:
            self.quarantine(pg, lsn)
        return FetchReply(codec.encode_frame(records), more, complete if complete > after_lsn else 0, horizon)

    def state(self) -> NodeState:
        self._check_open()
        used, capacity, low, room = self.space()
        with self._read_txn() as txn:
            records = txn.stat(self._log)["entries"]
        return NodeState(
            node=self.node_id,
            az=self.az,
            epoch=self.epoch,
            scls=tuple(self.scls),
            hint_lsn=self.hint_lsn,
            records=records,
            bytes=self.held_bytes,
            corrupt_found=self.counters["corrupt_found"],
            repaired=self.counters["repaired"],
            truncations=tuple(self.truncations),
            membership=self.membership,
            epoch_proof=self.epoch_proof,
            conflicts_refused=self.counters["conflicts_refused"],
            used_bytes=used,
            capacity_bytes=capacity,
            space_low=low,
            room_bytes=room,
            extent_bytes=self.extent_room(capacity),
            extra={"commit_time_us": self.commit_time_us},
            **self.collection_state(),
        )

    @retry_when_full
    def count_repaired(self, n: int) -> None:
        if n <= 0:
            return
        with self._write_lock:
            counters = dict(self.counters, repaired=self.counters["repaired"] + n)
            with self.env.begin(write=True) as txn:
                txn.put(b"counters", json.dumps(counters).encode(), db=self._meta)
            self.counters = counters  # published once committed (retry_when_full may run it again)

    def iter_log(self, pg: int, after_lsn: int = 0, batch: int = 1024):
        """Yield (lsn, record bytes) of a PG, in LSN order, in short read transactions (scrub)."""
        prefix = _U32BE.pack(pg)
        nxt = after_lsn + 1
        while not self._closed:
            chunk = []
            with self._read_txn() as txn:
                cur = txn.cursor(db=self._log)
                if cur.set_range(prefix + _U64BE.pack(nxt)):
                    for k, rec in cur:
                        if k[:4] != prefix or len(chunk) == batch:
                            break
                        chunk.append((_U64BE.unpack(k[4:])[0], bytes(rec)))
            if not chunk:
                return
            yield from chunk
            nxt = chunk[-1][0] + 1

    def corrupt(self, pg: int, lsn: int | None = None, bit: int = 0) -> int | None:
        """Fault injection: flip one bit of a stored record (the newest of `pg` if `lsn` is None)
        directly in LMDB, as a disk would. Returns the LSN hit, or None if the PG is empty."""
        self._check_open()
        self._check_pg(pg)
        if lsn is not None:
            _bounded(lsn, LSN_VALID_MAX, "lsn")
        _bounded(bit, (1 << 64) - 1, "bit")
        with self._write_lock, self.env.begin(write=True) as txn:
            if lsn is None:
                lsn = self._highest_in_txn(txn, pg)
                if lsn == 0:
                    return None
            k = codec.log_key(pg, lsn)
            rec = txn.get(k, db=self._log)
            if rec is None:
                return None
            buf = bytearray(rec)
            i = 4 + (bit // 8) % (len(buf) - 4)  # never the CRC field itself: the payload rots
            buf[i] ^= 1 << (bit % 8)
            txn.put(k, bytes(buf), db=self._log)
            return lsn

    def close(self) -> None:
        with self._write_lock:
            if self._closed:
                return
            self._closed = True
            self.env.close()
            self._owner.release()

