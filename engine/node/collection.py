"""Version collection on a storage node: removing what no read point can see any more.

Theory of operation
-------------------
The writer sends, with every append and heartbeat, the *collection point* (`collect_lsn`): the
lowest read point any registered reader still uses, never above its VDL (Aurora's PGMRPL;
`engine.head.readpoints`), and the *request point* (`collect_requests_lsn`, at most the
collection point), below which request-id records are past their retention window. A node keeps
the newest pair it was told (`collect_target`) and works towards it in bounded steps
(`collect_step`, a background thread, or the simulator), one write transaction each.

Per protection group the node keeps four LSNs (meta `gc/<pg>`, persisted in the transaction that
removes anything, so a restart never forgets what was collected):

* `horizon`: reads below it are refused with `SnapshotTooOld`, whatever writer asks (a new writer
  does not know the old one's snapshots). It is at least `swept`, and rises when the segment
  adopts a peer's horizon during repair (below).
* `swept`: for every record at or below it, every older version of the same key is gone. A pass
  walks the log in LSN order from `swept` to the PG's *target*, the least of the collection
  point, the segment's own SCL and the VDL hint (so nothing above the durable point, nor in a
  part of the chain the segment does not hold, is ever touched); at each record it deletes the
  versions of that key below it. A version is removed only once a newer one at or below the
  target exists: every read at or above `swept` gets the very answer it got before.
* `tombstones`: tombstones at or below it that were the oldest version of their key are gone too
  (a tombstone answers like no version at all). Only once *every* member of the membership has
  swept past the tombstone, as gossip last reported (`NodeState.swept`): then no segment holds
  an older version of the key that the tombstone hides, and none can get one (repair copies
  from segments that hold none). Before that, a lagging segment holding an old value could
  outvote a segment that had dropped the tombstone in a quorum read.
* `requests`: request-id records at or below the request point (and `swept`) are gone; a re-send
  older than the writer's retention window is then applied as new.

A node collects only for a point issued at an epoch whose truncations it adopted from a writer
(`synced_epoch`, persisted, set by a writer's SyncEpoch, which carries every truncation range):
a sealed node that missed the recovery's truncations may still hold records of a dead epoch,
and one of those would look like the newest version of its key and get older, live versions
removed.

Repair across collected records: a segment that collected misses LSNs, so a peer rebuilding or
catching up from it would find holes in the backlink chain. A fetch reply therefore says up to
where its sender's chain is complete (`FetchReply.complete_lsn`: its SCL, bounded by the frame)
and its horizon. A receiver complete to the fetch's start is then complete to `complete_lsn`
(`adopt_collected`, inside the repair append's transaction): its SCL jumps there, and it adopts
the sender's horizon, since it now lacks the versions the sender collected. After such a jump
the SCL need not be a record's LSN, so the chain walk accepts as the next record one whose
backlink lies at or below an SCL that names no held record (`SegmentStore._walk_scl`).

Compaction: LMDB frees a page only when it empties or falls below a quarter full, so removing
scattered versions leaves the log and the version index a third full or less (an overwrite-heavy
volume holds several times its live data in pages). Once a PG has had COMPACT_CHURN times its
share of the log removed (COMPACT_IDLE_CHURN once collection caught up with everything the PG
holds), collection rewrites its entries of both tables in key order, a bounded chunk per step
(each chunk deleted and put again in one transaction: same keys, same bytes), which packs them
into pages about two thirds full and frees the rest for reuse (the file does not shrink). A
table that is small (COMPACT_REBUILD_ENTRIES_MAX entries; the log also COMPACT_REBUILD_BYTES_MAX)
is rebuilt whole instead, for every PG at once: emptied and put back in key order, every page
full. The version index is judged by its entries alone: LMDB does not take a freed
sub-database's pages off a dupsort table's page counts, so after a key's many versions are
collected the counts overstate it (by about a page per such key) until a rebuild resets them;
`usage()` and `pages_used` read those counts.

This is a mixin of `SegmentStore` (same package, same lock: every method here that changes
anything runs under `_write_lock`).
"""

from __future__ import annotations

import bisect
import json
import logging
import struct
from collections.abc import Sequence

import lmdb

from engine import codec
from engine.core.constants import FLAG_DELETE, FLAG_REQUEST, LSN_VALID_MAX, RECORD_HEADER_BYTES
from engine.errors import CorruptRecord, SnapshotTooOld, StorageError
from engine.node.growth import retry_when_full

log = logging.getLogger("sixfold.store")

_U64BE = struct.Struct(">Q")
_U32BE = struct.Struct(">I")
_GC = struct.Struct(">QQQQ")  # horizon, swept, tombstones, requests

#: Log records one collection step visits (over its three passes), in one write transaction; at
#: most COLLECT_RECORDS_AT_FLOOR on a node at its floor (the pages a step copies before it frees
#: any must fit in what the floor keeps for the transactions that give room back).
COLLECT_RECORDS_PER_STEP = 2000
COLLECT_RECORDS_AT_FLOOR = 64
#: A key that had at least this many versions when collected down to one is written again:
#: LMDB keeps a key's many duplicates in a sub-database of their own (a page or more), and does
#: not fold it back into the key's node when they shrink; deleting and re-putting the last one does.
REWRITE_DUPS_MIN = 16
#: Compaction (see the module docstring): a PG is compacted once collection removed this many
#: times its share of the log's records (at least COMPACT_ENTRIES_MIN) since the last time,
#: COMPACT_CHUNK entries per chunk (a chunk that small still packs pages to about 80%).
COMPACT_CHURN = 1
COMPACT_ENTRIES_MIN = 64
COMPACT_CHUNK = 256
#: ... or once a PG that collection has caught up with (its target is its SCL: no record the
#: point does not cover) had this share of its log removed: a volume that stopped writing ends
#: packed, rather than as sparse as the last sweeps left it.
COMPACT_IDLE_CHURN = 0.25
#: A compaction that finds the log and version tables this small (entries, and bytes of pages)
#: rebuilds both whole in the step's transaction: each emptied, then put again in key order from
#: its start (MDB_APPEND for the log), which packs every page full. Rewriting chunks in place
#: packs them to about two thirds: a run of keys put between two held ones splits its pages in
#: half as it grows (LMDB fills a page before splitting only at the end of a table).
COMPACT_REBUILD_ENTRIES_MAX = 8192
COMPACT_REBUILD_BYTES_MAX = 4 << 20
#: The tombstones the "versions" pass remembers per PG for the tombstones pass (which trails it
#: by what gossip last said of the other members' sweeps); beyond it, that pass walks the log.
TOMBSTONES_SEEN_MAX = 20_000
HORIZON, SWEPT, TOMBSTONES, REQUESTS = range(4)


#: A record's flags, reserved byte and key_len, at offset 28 of its header (the layout is
#: `engine.codec._python`'s; tests/test_collection.py checks `_peek` against the decoder).
_PEEK = struct.Struct("<BxH")
_PEEK_AT = 28


def _peek(rec: bytes) -> tuple[int, bytes]:
    """A stored record's flags and key as its header says, unchecked (no CRC): only to decide
    whether a collection pass needs to decode it. A record too short to have a header says
    "every flag", so that it is decoded, and refused there."""
    if len(rec) < RECORD_HEADER_BYTES:
        return 0xFF, b""
    flags, key_len = _PEEK.unpack_from(rec, _PEEK_AT)
    return flags, rec[RECORD_HEADER_BYTES:RECORD_HEADER_BYTES + key_len]


def gc_key(pg: int) -> bytes:
    return b"gc/" + _U32BE.pack(pg)


class VersionCollector:
    """Version collection of a `SegmentStore` (see the module docstring)."""

    def _load_collection(self, txn) -> None:
        """The persisted collection state (absent in a folder that never collected: all 0)."""
        P = self.geometry.protection_groups
        self.gc = []
        for pg in range(P):
            raw = txn.get(gc_key(pg), db=self._meta)
            g = [0, 0, 0, 0] if raw is None else (list(_GC.unpack(raw)) if len(raw) == _GC.size else None)
            # What collection stores keeps tombstones, requests <= swept <= horizon <= LSN_VALID_MAX;
            # anything else is a damaged folder. Trusted, it would raise the hint (below) and the
            # horizon past what this node holds: refused with the cause instead.
            if g is None or not (g[TOMBSTONES] <= g[SWEPT] <= g[HORIZON] <= LSN_VALID_MAX and g[REQUESTS] <= g[SWEPT]):
                raise StorageError(
                    f"node {self.node_id}: the collection state of PG {pg} in {self.path} is damaged "
                    f"({bytes(raw).hex() if raw is not None else '?'}: not horizon >= swept >= tombstones, requests "
                    f"within {LSN_VALID_MAX}); the folder cannot be trusted: wipe the node and let it rebuild from its peers"
                )
            self.gc.append(g)
        #: (epoch, collection point, request point) the writer last sent; not persisted: the
        #: next heartbeat brings it again
        self.collect_target = (0, 0, 0)
        self._collect_pg = 0  # where the next step starts (round robin over PGs)
        self.counters.setdefault("collected", 0)
        #: per PG, records removed since its last compaction, and where a compaction under way
        #: resumes ((table index, key), or None); in memory: a restart only delays a compaction
        self._churn = [0] * P
        self._compact_at: list[tuple[int, bytes] | None] = [None] * P
        self._skip_log_chunks = [False] * P  # per PG: the log was rebuilt whole, chunks of the version index only
        #: per PG, the tombstones the "versions" pass walked over and the tombstones pass has not
        #: reached yet: [from, to, [(lsn, log key), ...]] lists every record of the PG in (from, to]
        #: whose header says DELETE, so that pass need not walk the log again (`_drop_tombstones_seen`).
        #: In memory: after a restart the tombstones pass walks the log up to where it is rebuilt.
        self._tomb_seen: list[list] = [[g[SWEPT], g[SWEPT], []] for g in self.gc]
        #: compaction chunks rewritten (status)
        self.compactions = 0
        #: the records a step may visit since one found the map full (None: no such limit); see
        #: collect_step
        self._full_cap: int | None = None
        #: collection steps that found the map full and cut the next ones in size (logged; the
        #: failed step itself is counted where every background error is, the node's
        #: `background_expected_errors["collect"]` in its status)
        self.collect_steps_shrunk = 0

    def set_collect_target(self, epoch: int, point: int, requests: int) -> None:
        """Remember the writer's points (from an append accepted at `epoch`)."""
        if point or requests:
            self.collect_target = (epoch, point, min(requests, point))

    def check_horizon(self, pg: int, read_point: int) -> None:
        """SnapshotTooOld when `read_point` is below `pg`'s collection horizon.

        A read checks it before it opens its read transaction (to refuse early) and again inside
        it; every transaction that removes versions below a new horizon (a collection step, a
        repair frame adopting a peer's collection) publishes that horizon before it commits
        (`publish_horizons`). So a read whose transaction sees the removal also sees the horizon
        and is refused; one whose transaction began before the commit reads the versions it needs.
        Checked only before the transaction, a read that a collection step overtook in between
        answered from what was left (a released snapshot's get answered None)."""
        horizon = self.gc[pg][HORIZON]
        if read_point < horizon:
            raise SnapshotTooOld(
                f"segment {self.node_id}/pg{pg} has collected the versions below LSN {horizon}; a read at LSN "
                f"{read_point} may need them (its snapshot was released, its registration lapsed, or it was "
                "registered with a writer since replaced). Nothing was read: take a new snapshot."
            )

    def publish_horizons(self, gc: Sequence[Sequence[int]]) -> None:
        """Raise the published horizons to those of `gc` (a transaction's copy, before it commits;
        see check_horizon). A horizon only rises, and one raised for a transaction that then
        fails refuses reads that could still have been answered: never a wrong answer. Holds
        _write_lock."""
        if any(g[HORIZON] > old[HORIZON] for g, old in zip(gc, self.gc)):
            self.gc = [[max(g[HORIZON], old[HORIZON]), *old[1:]] for g, old in zip(gc, self.gc)]

    def _target(self, pg: int) -> int:
        epoch, point, _requests = self.collect_target
        if not point or self.synced_epoch < epoch:
            return 0  # no point, or one of an epoch whose truncations this node has not adopted
        return min(point, self.scls[pg], self.hint_lsn)

    def collect_pending(self) -> bool:
        """Whether some PG has versions to sweep towards its target."""
        return any(self._target(pg) > self.gc[pg][SWEPT] for pg in range(self.geometry.protection_groups))

    def _work_due(self, tombstone_points: Sequence[int] | None) -> bool:
        """Whether a step would do anything (checked before a write transaction is begun)."""
        request_point = self.collect_target[2]
        for pg, g in enumerate(self.gc):
            if self._target(pg) > g[SWEPT] or min(g[SWEPT], request_point) > g[REQUESTS]:
                return True
            if tombstone_points is not None and min(g[SWEPT], tombstone_points[pg]) > g[TOMBSTONES]:
                return True
            if self._compact_at[pg] is not None or self._churn[pg] >= COMPACT_ENTRIES_MIN:
                return True
        return False

    def collect_budget(self, records_max: int) -> int:
        """The records a step asked for `records_max` may visit: fewer while appends reach into
        the floor (a step's transaction must fit in it)."""
        records_max = max(1, int(records_max))
        if self._at_floor:
            records_max = min(records_max, COLLECT_RECORDS_AT_FLOOR)
        if self._full_cap is not None:
            records_max = min(records_max, self._full_cap)
        return records_max

    def collect_step(self, records_max: int = COLLECT_RECORDS_PER_STEP, tombstone_points: Sequence[int] | None = None) -> int:
        """Remove versions towards the targets (`_collect_step`); returns the records visited.

        A step's transaction copies every page it changes before it frees any, so at the map's
        maximum a step of many records can find no page left (MDB_MAP_FULL, the map cannot grow)
        while a smaller one fits. Such a failure halves what the following steps may visit, down
        to one record, and the error stands (the caller counts it); each step that then commits
        doubles the limit again until it is gone. The floor's smaller budget does not cover this:
        `_at_floor` is in memory, set only by an append refused at the floor and cleared by a
        later one that fits, or by a restart. Without this, such a full node tried the same
        too-large step for ever: what deletes and overwrites hid was never removed, and the node
        stayed full."""
        budget = self.collect_budget(records_max)
        try:
            visited = self._collect_step(budget, tombstone_points)
        except lmdb.MapFullError:
            cap = max(1, budget // 2)
            if self._full_cap is None or cap < self._full_cap:
                self._full_cap = cap
                self.collect_steps_shrunk += 1
                log.warning("node %s: a collection step of up to %d records found the map full at its maximum; "
                            "the next steps visit at most %d", self.node_id, budget, cap)
            raise
        if self._full_cap is not None and visited:
            self._full_cap = None if self._full_cap * 2 >= COLLECT_RECORDS_PER_STEP else self._full_cap * 2
        return visited

    @retry_when_full
    def _collect_step(self, records_max: int = COLLECT_RECORDS_PER_STEP, tombstone_points: Sequence[int] | None = None) -> int:
        """Remove versions towards the targets, visiting at most about `records_max` log records
        in one write transaction; returns how many it visited (0: nothing to do).
        `tombstone_points[pg]`: the least `swept` of the other members, as gossip last heard
        (None: drop no tombstone)."""
        self._check_open()
        P = self.geometry.protection_groups
        records_max = self.collect_budget(records_max)
        if not self._work_due(tombstone_points):
            return 0
        with self._write_lock:
            self._check_open()
            _epoch, _point, request_point = self.collect_target
            gc = [list(g) for g in self.gc]
            visited = removed = compacted = 0
            touched = []
            with self.env.begin(write=True) as txn:
                for i in range(P):
                    if visited >= records_max:
                        break
                    pg = (self._collect_pg + i) % P
                    g = gc[pg]
                    before = list(g)
                    removed_before = removed
                    target = self._target(pg)
                    if target > g[SWEPT]:
                        # A visit removes every version older than the key's newest at or below
                        # the target, which may lie beyond where the pass stops: the horizon is the
                        # target (reads below the point are no registered reader's).
                        g[HORIZON] = max(g[HORIZON], target)
                        n, r, g[SWEPT] = self._sweep(txn, pg, g[SWEPT], target, records_max - visited, "versions")
                        visited, removed = visited + n, removed + r
                    tomb = min(g[SWEPT], tombstone_points[pg]) if tombstone_points is not None else 0
                    if tomb > g[TOMBSTONES] and visited < records_max:
                        n, r, g[TOMBSTONES] = self._sweep(txn, pg, g[TOMBSTONES], tomb, records_max - visited, "tombstones")
                        visited, removed = visited + n, removed + r
                    req = min(g[SWEPT], request_point)
                    if req > g[REQUESTS] and visited < records_max:
                        n, r, g[REQUESTS] = self._sweep(txn, pg, g[REQUESTS], req, records_max - visited, "requests")
                        visited, removed = visited + n, removed + r
                    self._churn[pg] += removed - removed_before
                    if visited < records_max:
                        n = self._compact(txn, pg, records_max - visited)
                        visited, compacted = visited + n, compacted + n
                    if g != before:
                        txn.put(gc_key(pg), _GC.pack(*g), db=self._meta)
                        # The stored SCL is where opening walks the chain from; it must not name
                        # a record this step may remove (SCLs are otherwise persisted lazily).
                        self._put_scl(txn, pg)
                        touched.append(pg)
                if touched:
                    # So is the hint (also persisted lazily): a seal summarises the records above
                    # it, and a recovery walks LSN by LSN up from the highest hint it is told. A
                    # stored hint below a removed record would end that walk at the hole and cut
                    # every acknowledged record above it. The in-memory hint bounds every target.
                    txn.put(b"hint", _U64BE.pack(self.hint_lsn), db=self._meta)
                self.publish_horizons(gc)  # before the commit (check_horizon)
                counters = dict(self.counters, collected=self.counters["collected"] + removed)
                if removed:
                    txn.put(b"counters", json.dumps(counters).encode(), db=self._meta)
                elif not compacted:
                    # Nothing removed or moved (new keys, say): nothing to make durable, so no
                    # commit and no fsync, and the appends wait for no collection commit. The
                    # points advance in memory only; one not persisted is still true after a
                    # restart (nothing between the stored and the new one was removed), and the
                    # first step that removes anything persists them with what it removes.
                    txn.abort()
            # Published once committed (a failed step changes nothing the node tells anybody).
            self.gc, self.counters = gc, counters
            self._collect_pg = (self._collect_pg + 1) % P
            return visited

    def _sweep(self, txn, pg: int, after: int, upto: int, budget: int, what: str) -> tuple[int, int, int]:
        """One pass over the log records of `pg` in (after, upto], at most `budget` of them:
        "versions" deletes every older version of each record's key, "tombstones" deletes each
        tombstone that is the oldest version of its key, "requests" each request-id record.
        Returns (visited, removed, the LSN the pass reached).

        A record is decoded (CRC and every field checked) only where the pass would act on it;
        what decides whether it might is read from the header alone (`_peek`): its flags, and for
        "versions" whether its key has two versions or more. A record that fails its CRC is left
        alone either way (scrub quarantines it), so the answer is the same as decoding every one;
        most records are new keys (one version) and a pass over them no longer builds a Record."""
        prefix = _U32BE.pack(pg)
        upto_be = _U64BE.pack(upto)
        cur = txn.cursor(db=self._log)
        versions = txn.cursor(db=self._versions)
        probe = txn.cursor(db=self._versions)
        visited = removed = 0
        reached = upto
        doomed: list[bytes] = []  # log keys, deleted after the walk over the log
        wanted = FLAG_REQUEST if what == "requests" else FLAG_DELETE if what == "tombstones" else 0
        tombstones: list[tuple[bytes, bytes]] = []  # "versions": (lsn, log key) of each DELETE walked over
        if what == "tombstones":
            seen = self._tomb_seen[pg]
            if seen[0] <= after and upto <= seen[1]:
                return self._drop_tombstones_seen(txn, pg, seen, after, upto, budget)
            if after < seen[0] < upto:  # walk the log up to where the versions pass last began remembering
                upto = seen[0]
                upto_be = _U64BE.pack(upto)
                reached = upto
        if cur.set_range(prefix + _U64BE.pack(after + 1)):
            for k, rec in cur:
                if k[:4] != prefix:
                    break
                lsn_be = k[4:]
                if lsn_be > upto_be:  # big-endian: bytes order is LSN order
                    break
                if visited >= budget:
                    reached = _U64BE.unpack(lsn_be)[0] - 1
                    break
                visited += 1
                flags, key = _peek(rec)
                if wanted:
                    if not flags & wanted:
                        continue
                elif flags & FLAG_REQUEST:
                    continue
                else:
                    if flags & FLAG_DELETE:
                        tombstones.append((lsn_be, bytes(k)))
                    vkey = prefix + key
                    if not versions.set_key(vkey) or versions.count() < 2:
                        continue
                try:
                    r = codec.decode_record(rec)
                except CorruptRecord:
                    continue  # scrub quarantines it; its key's old versions just stay for now
                if what == "requests":
                    if r.flags & FLAG_REQUEST:
                        txn.delete(prefix + r.key, lsn_be, db=self._requests)
                        doomed.append(bytes(k))
                    continue
                if r.flags & FLAG_REQUEST:
                    continue
                vkey = prefix + r.key
                if not versions.set_key(vkey):
                    continue
                if what == "tombstones":
                    if r.flags & FLAG_DELETE and versions.value() == lsn_be:
                        versions.delete()
                        doomed.append(bytes(k))
                    continue
                dups = versions.count()
                if dups < 2:
                    continue
                # Every version older than the newest at or below the target goes now (the
                # records between are then found without versions to remove when visited).
                newest = self._version_at(probe, vkey, upto_be)
                while versions.key() == vkey and versions.value() < newest:
                    doomed.append(prefix + versions.value())
                    if not versions.delete():
                        break
                if dups >= REWRITE_DUPS_MIN and versions.set_key(vkey) and versions.count() == 1:
                    last = versions.value()
                    versions.delete(dupdata=True)
                    txn.put(vkey, last, dupdata=True, db=self._versions)
        for k in doomed:
            txn.delete(k, db=self._log)
            removed += 1
        if what == "versions":
            seen = self._tomb_seen[pg]
            if seen[1] != after:  # a gap (this pass walks again what a step that did not commit walked)
                seen[:] = [after, after, []]
            if len(seen[2]) + len(tombstones) > TOMBSTONES_SEEN_MAX:
                seen[:] = [reached, reached, []]  # too many: the tombstones pass walks the log up to here
            else:
                seen[1] = reached
                seen[2].extend((_U64BE.unpack(lsn_be)[0], k) for lsn_be, k in tombstones)
        return visited, removed, reached

    def _drop_tombstones_seen(self, txn, pg: int, seen: list, after: int, upto: int, budget: int) -> tuple[int, int, int]:
        """The tombstones pass over (after, upto] from what the "versions" pass saw there (`seen`
        covers the range): each DELETE record is loaded and decoded, and removed when it is the
        oldest version of its key, as the walk would; the other records are not visited again.
        Returns (visited, removed, reached) as `_sweep` does."""
        prefix = _U32BE.pack(pg)
        versions = txn.cursor(db=self._versions)
        entries = seen[2]
        i = bisect.bisect_right(entries, after, key=lambda e: e[0])
        visited = removed = 0
        reached = upto
        while i < len(entries) and entries[i][0] <= upto:
            lsn, k = entries[i]
            if visited >= budget:
                reached = lsn - 1
                break
            visited += 1
            i += 1
            rec = txn.get(k, db=self._log)
            if rec is None:
                continue  # collected (an older version of a newer put) or quarantined since
            try:
                r = codec.decode_record(rec)
            except CorruptRecord:
                continue
            lsn_be = k[4:]
            if r.flags & FLAG_DELETE and not r.flags & FLAG_REQUEST and versions.set_key(prefix + r.key) \
                    and versions.value() == lsn_be:
                versions.delete()
                txn.delete(k, db=self._log)
                removed += 1
        # What the pass has reached is not needed again (a failed step walks it again from the log).
        del entries[:bisect.bisect_right(entries, reached, key=lambda e: e[0])]
        seen[0] = max(seen[0], reached)
        return visited, removed, reached

    def _compact(self, txn, pg: int, budget: int) -> int:
        """Rewrite the next chunk of `pg`'s log and version index entries, if a compaction is due
        or under way (see the module docstring); returns the entries rewritten."""
        at = self._compact_at[pg]
        if at is None:
            log_stat = txn.stat(self._log)
            share = log_stat["entries"] // self.geometry.protection_groups
            due = max(COMPACT_ENTRIES_MIN, share)
            idle = self._target(pg) >= self.scls[pg]
            if self._churn[pg] < (COMPACT_IDLE_CHURN if idle else COMPACT_CHURN) * due:
                return 0
            at = (0, b"")
            done = 0
            if not self._at_floor:  # at its floor: chunks only (their copies must fit in the floor)
                # A small table is rebuilt whole, for every PG at once (COMPACT_REBUILD_*). The
                # version index is judged by its entries: its page counts are not to be trusted
                # (LMDB does not take a freed sub-database's pages off them; a rebuild resets them).
                log_bytes = self._page_bytes * (log_stat["leaf_pages"] + log_stat["branch_pages"] + log_stat["overflow_pages"])
                versions_stat = txn.stat(self._versions)
                versions_bytes = self._page_bytes * (versions_stat["leaf_pages"] + versions_stat["branch_pages"])
                versions_small = (versions_stat["entries"] <= COMPACT_REBUILD_ENTRIES_MAX
                                  and self._room_to_rewrite(versions_bytes))
                log_small = (log_stat["entries"] <= COMPACT_REBUILD_ENTRIES_MAX and log_bytes <= COMPACT_REBUILD_BYTES_MAX
                             and self._room_to_rewrite(log_bytes + (versions_bytes if versions_small else 0)))
                if versions_small:
                    done += self._rebuild_table(txn, self._versions)
                    at = (1, b"")
                if log_small:
                    done += self._rebuild_table(txn, self._log)
                    at = None if versions_small else (0, b"")
                if at is None:  # both whole: every PG's compaction is done
                    P = self.geometry.protection_groups
                    self._churn, self._compact_at, self._skip_log_chunks = [0] * P, [None] * P, [False] * P
                    return done
                self._skip_log_chunks[pg] = log_small
        else:
            done = 0
        self._churn[pg] = 0
        prefix = _U32BE.pack(pg)
        while at is not None and done < budget:
            table, start = at
            db = (self._versions, self._log)[table]
            cur = txn.cursor(db=db)
            limit = min(COMPACT_CHUNK, budget - done)
            pairs, ended = [], True
            if cur.set_range(prefix + start):
                for k, v in cur:
                    if k[:4] != prefix:
                        break
                    if len(pairs) >= limit:
                        ended = False
                        break
                    pairs.append((bytes(k), bytes(v)))
            if pairs:
                for k, v in pairs:
                    if table == 0:
                        txn.delete(k, v, db=db)  # that duplicate only
                    else:
                        txn.delete(k, db=db)
                # In key order: pages fill up before they split.
                txn.cursor(db=db).putmulti(pairs, dupdata=table == 0)
                done += len(pairs)
                self.compactions += 1
            if ended:
                at = (1, b"") if table == 0 and not self._skip_log_chunks[pg] else None
            else:
                # Resume after the last key (duplicates of it past the chunk are left as they are).
                at = (table, pairs[-1][0][4:] + b"\x00")
        self._compact_at[pg] = at
        if at is None:
            self._skip_log_chunks[pg] = False
        return done

    def _room_to_rewrite(self, table_bytes: int) -> bool:
        """Whether the map has room, above the floor, for a rebuild of `table_bytes`: until it
        commits, a transaction holds a new copy of every page it writes beside the old one. A
        node near its maximum compacts in chunks (a rebuild there would fail for want of pages
        and be tried again, and collection would never get past it)."""
        used, _held = self._last_usage or self.usage()
        capacity = self._capacity_bytes
        return capacity - used >= 2 * table_bytes + self.floor_bytes(capacity)

    def _rebuild_table(self, txn, db) -> int:
        """Empty `db` (the log or the version index) and put every entry back in key order (see
        COMPACT_REBUILD_ENTRIES_MAX): same keys, same bytes, full pages, and LMDB's page counts
        of it true again. Returns the entries rewritten."""
        pairs = [(bytes(k), bytes(v)) for k, v in txn.cursor(db=db)]  # key order (and duplicate order)
        txn.drop(db, delete=False)
        # Into an empty table in key order: every put lands at the end of the last page, so pages
        # fill before they split. The version index holds duplicates, which MDB_APPEND does not
        # take as such; the order alone packs it.
        versions = db is self._versions
        _consumed, added = txn.cursor(db=db).putmulti(pairs, dupdata=versions, append=not versions)
        if added != len(pairs):
            raise RuntimeError(f"node {self.node_id}: rebuilding a table put back {added} of {len(pairs)} entries")
        self.compactions += 1
        return len(pairs)

    def adopt_collected(self, txn, pg: int, after: int, complete: int, horizon: int, scls: list[int],
                        gc: list[list[int]]) -> bool:
        """A repair frame came from a peer that says every record of `pg` at or below `complete`
        it did not send was collected: if this segment is complete to `after` (the fetch's
        start), it is complete to `complete` now, and adopts the peer's `horizon` (see the module
        docstring), in `scls` and `gc` (the caller's copies, published once committed). Both are
        bounded by the VDL this node knows: a claim above it is cut to it, and with a horizon
        above it nothing is adopted. True when the SCL moved."""
        complete = min(complete, self.hint_lsn)
        if scls[pg] < after or complete <= scls[pg] or horizon > self.hint_lsn:
            return False
        scls[pg] = complete
        if horizon > gc[pg][HORIZON]:
            gc[pg] = [horizon, *gc[pg][1:]]
            txn.put(gc_key(pg), _GC.pack(*gc[pg]), db=self._meta)
        return True

    def collection_state(self) -> dict:
        """Fields of NodeState: per PG horizons and swept LSNs, records removed, pages in use."""
        with self._read_txn() as txn:
            pages = self._snapshot_pages(txn)  # as `used_bytes` counts them
        return dict(
            horizons=tuple(g[HORIZON] for g in self.gc), swept=tuple(g[SWEPT] for g in self.gc),
            collected_records=self.counters.get("collected", 0), pages_used=pages, page_bytes=self._page_bytes,
        )
