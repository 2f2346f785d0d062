"""Watches: the committed changes after a position, from the writer's memory or the nodes' logs.

Theory of operation
-------------------
A `WatchCursor` is one watch on one writer. It hands out, batch by batch, the changes (CPL, plain
key, value or None for a delete) of the units committed after its position, in commit order,
whole units only, and moves its position to the last CPL it gave.

* **From memory** while it can: the writer keeps the changes of its recent units
  (`Writer.changes_after`, bounded by `WriterOptions.changes_max` / `changes_bytes_max`). That
  is the common case (a watch that keeps up) and costs no I/O.
* **From the nodes' logs** when the position is older than that memory reaches (a watch that
  fell behind, one that resumes from an old position, one that follows a failover to a writer
  that knows only the units after its own open). Per protection group, one segment known
  complete at the current read point (`ReadPath.candidates`, same AZ first; the other members
  after those, whose broken chain says only that they are behind) is asked for its
  records above the position up to the read point (the storage `Fetch` gossip uses, bounded in
  bytes); each segment's answer must be its PG's whole chain (`engine.core.changes.chain_break`:
  backlinks, and the read tail when the fetch was not cut short), else the next segment is
  asked; the PGs' records are merged by LSN
  into whole units up to the point where every PG's are in hand (`merge_units`), the writer's
  request records left out, values decrypted with the writer's cipher on an encrypted volume.
  Once the position reaches the memory's floor, the next batch comes from memory: both give
  exactly the units with CPL above the position, so the hand-over has no gap and no repeat.
* **Holding collection back**: nodes remove only versions superseded at or below the collection
  point the writer sends (`engine.node.collection`), so every record above a registered read
  point stays. The cursor registers its position with `Writer.read_points` (leased for
  WATCH_LEASE_S, moved to its new position with each batch, released by `close`), so nothing it
  still has to read is collected. A position below a collection point already sent is refused
  at once with `Compacted` (`.oldest`: the oldest position still kept).
* **The bound**: a watch holds collection back at most `WriterOptions.watch_hold_lsns` LSNs
  behind the VDL (WATCH_HOLD_LSNS_DEFAULT says why). A watch further behind gives up its
  registration and raises `Compacted`, never a silent gap.

A segment that no longer holds a record the watch needs (collected under a registration that
lapsed, or quarantined as corrupt) shows as a broken chain: another segment is asked, and when
none holds the chain the watch raises `Compacted`.

An encrypted volume's delete record carries only the key's index (a keyed hash): its plain key
is the one the cursor last saw put under that index, or else the one sealed in the key's newest
earlier version on the segment (a read below the delete). A delete of a key that has no earlier
version left (it never had a value) names no key and is not given: it changes nothing a reader
of the changes could see.
"""

from __future__ import annotations

import time
from collections import OrderedDict

from engine import codec
from engine.core.changes import chain_break, merge_units
from engine.core.constants import EXPIRES_BYTES, FLAG_DELETE, FLAG_EXPIRES, FLAG_PUT, NAMESPACE_KEYS
from engine.errors import Compacted, InvalidArgument, SixfoldError, SnapshotTooOld, Unavailable

#: How far behind the VDL a watch may hold version collection back, in LSNs (so at most that many
#: superseded records stay on each node because of it). Four million is about eight times what
#: the writer's memory of changes spans (262,144 changes, at most two LSNs each with their
#: request records): a watch that far behind has been reading the logs for a long while without
#: catching up, and at small values (~100 bytes a record) it keeps a few hundred MB per node
#: from being collected; rescanning the keys is then cheaper than letting it go on.
WATCH_HOLD_LSNS_DEFAULT = 4_000_000
#: The lease of a watch's registration: renewed with every batch it reads (a consumer that asks
#: for nothing for this long loses its hold, and gets Compacted if collection passed it since).
WATCH_LEASE_S = 30.0
#: What one fetch from a segment returns (a PG is fetched again where it was cut short): about
#: LOG_RECORD_BYTES per change a batch asks for, within these bounds. Each PG is fetched up to the
#: read point, so a fetch that ends names the PG's last record, which must be its read tail.
LOG_RECORD_BYTES = 128
LOG_FETCH_BYTES_MIN = 64 << 10
LOG_FETCH_BYTES_MAX = 4 << 20
#: On an encrypted volume, the plain keys the cursor remembers by index key (for deletes).
PLAIN_KEYS_MAX = 65_536
#: ... and the earlier versions it reads at most to name a deleted key it does not remember.
DELETE_KEY_READS_MAX = 16


class _PgRead:
    """The records of one PG above the position, from one segment: complete up to `covered`."""

    __slots__ = ("pg", "node", "tail", "records", "covered", "more", "known")

    def __init__(self, pg: int, node: str, tail: int, known: bool) -> None:
        self.pg, self.node, self.tail = pg, node, tail
        #: the writer knew the segment complete (`ReadPath.candidates_split`): a break in its chain
        #: means records are gone; in another member's, that it is behind
        self.known = known
        self.records: list = []
        self.covered = 0
        self.more = False


class WatchCursor:
    """One watch on one writer (see the module docstring). Not thread-safe: one consumer."""

    def __init__(self, writer, position: int, name: str = "watch", hold_back=None) -> None:
        # Every position a watch or a write gave is at or below VDL, and a new writer's VDL is
        # never below an old one's: one beyond it was never given by this volume (another
        # volume's, or made up), and waiting for the log to reach it would hide the mistake.
        vdl = writer.ledger.vdl
        if position > vdl:
            raise InvalidArgument(f"watch start position {position} is beyond this volume's log (its VDL is {vdl}): "
                                  "not a commit position it gave")
        self._w = writer
        self.name = name
        self.position = position
        #: where the position was a while ago (a `VdlHistory`), held instead of the position
        #: itself: a remote consumer may not have taken in the batches last sent when its stream
        #: breaks, and resumes from the last it did (None: hold the position)
        self._hold_back = hold_back
        if hold_back is not None:
            hold_back.at(time.monotonic(), position)  # its first sample: the start is held for a while
        #: the read point the registration holds
        self.held = position
        self._reg: int | None = None
        self._plain: OrderedDict[bytes, bytes] = OrderedDict()
        self._hold(position)

    # --- the registration -----------------------------------------------------------------------
    def _compacted(self, why: str, oldest: int | None = None) -> Compacted:
        self.close()
        oldest = self._w.read_points.issued if oldest is None else oldest
        return Compacted(
            f"the changes after position {self.position} can no longer all be given ({why}); scan the keys afresh, "
            f"then watch from {oldest} or later. oldest position kept: {oldest}", oldest,
        )

    def _hold_lsn(self, position: int) -> int:
        """What to hold for a watch at `position`: the position; or, below a collection point
        already sent, that point when the writer's memory still serves everything after the
        position (nothing below the point is read from the nodes then); else Compacted."""
        rp = self._w.read_points
        issued = rp.issued
        if position >= issued:
            return position
        if self._w.changes_floor() <= position:
            return issued
        raise self._compacted(
            f"the nodes may have collected versions after it: the collection point {issued} was already sent"
        )

    def _hold(self, position: int) -> None:
        rp = self._w.read_points
        while True:
            lsn = self._hold_lsn(position)
            try:
                self._reg = rp.register(self.name, lsn, WATCH_LEASE_S)
                self.held = lsn
                return
            except SnapshotTooOld:
                continue  # a collection point was sent meanwhile: judge again

    def _move(self, position: int) -> None:
        """Hold `position` from now on (renewing the lease); a lapsed hold is taken again."""
        rp = self._w.read_points
        if self._reg is not None:
            lsn = self._hold_lsn(position)
            try:
                rp.renew(self._reg, lsn=lsn)
                self.held = lsn
                return
            except SnapshotTooOld:
                # Lapsed (nothing asked for WATCH_LEASE_S), or a point was sent meanwhile.
                rp.release(self._reg)
                self._reg = None
        self._hold(position)

    def close(self, linger_s: float | None = None) -> None:
        """Release the hold on version collection (idempotent); with `linger_s`, let it lapse
        that long from now instead (a stream that ended may be resumed by its client)."""
        reg, self._reg = self._reg, None
        if reg is None:
            return
        if linger_s is None:
            self._w.read_points.release(reg)
            return
        try:
            self._w.read_points.renew(reg, lease_s=linger_s)
        except SnapshotTooOld:
            pass  # lapsed already

    # --- batches --------------------------------------------------------------------------------
    def next(self, count_max: int) -> tuple[list[tuple[int, bytes, bytes | None]], int]:
        """The changes of the units after the position (about `count_max` at most, whole units)
        and the position after them (the last CPL given, or the VDL when none is left)."""
        w = self._w
        w.check_usable()
        hold = w.options.watch_hold_lsns
        vdl = w.ledger.vdl
        if vdl - self.held > hold:
            raise self._compacted(
                f"it holds version collection {vdl - self.held} LSNs behind the VDL {vdl}; a watch holds it back at "
                f"most {hold} LSNs", max(w.read_points.issued, vdl - hold),
            )
        got = w.changes_after(self.position, count_max)
        if got is None:
            got = self._from_log(count_max)
        changes, position = got
        held = position if self._hold_back is None else self._hold_back.at(time.monotonic(), position)
        self._move(held)  # also renews the lease: an idle watch asks every second or so
        self.position = position
        return changes, position

    def _from_log(self, count_max: int) -> tuple[list[tuple[int, bytes, bytes | None]], int]:
        w = self._w
        after = self.position
        view = w.view()
        read_point = view.read_point
        if read_point <= after:
            return [], after
        # Each PG up to the read point, cut short by bytes (about LOG_RECORD_BYTES per change
        # asked for): a PG whose fetch ended is known to its read tail, one cut short to its
        # last record, and below the least of those every PG's records are in hand.
        fetch_bytes = min(LOG_FETCH_BYTES_MAX, max(LOG_FETCH_BYTES_MIN, count_max * LOG_RECORD_BYTES))
        reads = [self._first_read(pg, after, read_point, view, fetch_bytes)
                 for pg in range(w.P) if view.tails[pg] > after]
        while True:
            end = min([read_point] + [r.covered for r in reads])
            units, position = merge_units([r.records for r in reads], after, end, count_max)
            if units or end >= read_point:
                break
            # No whole unit below `end` yet (a large one): read on where the least is in hand.
            self._read_more(min(reads, key=lambda r: r.covered), read_point, fetch_bytes)
        if not units:
            if any(after < rec.lsn <= read_point for r in reads for rec in r.records):
                raise Unavailable(f"the records after position {after} hold no whole unit up to the VDL {read_point}; retry")
            return [], read_point
        nodes = {r.pg: r.node for r in reads}
        out = []
        for cpl, records in units:
            for rec in records:
                change = self._change(rec, nodes[rec.pg])
                if change is not None:
                    out.append((cpl, *change))
        return out, position

    def _fetch(self, node: str, pg: int, after: int, read_point: int, fetch_bytes: int) -> tuple[list, bool]:
        reply = self._w.transport.fetch(node, pg, after, fetch_bytes, read_point)
        records = codec.decode_frame(reply.frame)
        return records, reply.more and bool(records)

    def _covered(self, r: _PgRead, read_point: int) -> bool:
        """Set what `r` is complete to; False when its records are not its PG's whole chain
        (to its read tail, when the fetch was not cut short)."""
        r.covered = r.records[-1].lsn if r.more else read_point
        return chain_break(r.records, self.position, None if r.more else r.tail) is None

    def _first_read(self, pg: int, after: int, read_point: int, view, fetch_bytes: int) -> _PgRead:
        w = self._w
        tail = view.tails[pg]
        broken, errors = [], []
        known, others = w.reads.candidates_split(pg, view)
        for node in known + others:
            r = _PgRead(pg, node, tail, node in known)
            try:
                r.records, r.more = self._fetch(node, pg, after, read_point, fetch_bytes)
            except SixfoldError as e:
                errors.append(f"{node}: {e}")
                continue
            if self._covered(r, read_point):
                return r
            if r.known:
                broken.append(node)
            else:
                errors.append(f"{node}: its records of PG {pg} after position {after} are not the whole chain (behind)")
        if broken:
            raise self._compacted(f"no segment of PG {pg} holds every record after it any more ({', '.join(broken)} "
                                  "miss some: collected or quarantined)")
        raise Unavailable(f"a watch reading PG {pg} after position {after} found no segment complete to LSN {tail}"
                          + (f" that answered ({'; '.join(errors)})" if errors else "") + "; retry")

    def _read_more(self, r: _PgRead, read_point: int, fetch_bytes: int) -> None:
        """Fetch `r`'s PG on from its last record, from the same segment (a large unit)."""
        records, more = self._fetch(r.node, r.pg, r.covered, read_point, fetch_bytes)
        r.records.extend(records)
        r.more = more
        if not self._covered(r, read_point):
            if not r.known:
                raise Unavailable(f"segment {r.node} of PG {r.pg}, not known complete, is behind after position {r.covered}; retry")
            raise self._compacted(f"segment {r.node} of PG {r.pg} no longer holds every record after it")

    # --- records to changes ---------------------------------------------------------------------
    def _change(self, r, node: str) -> tuple[bytes, bytes | None] | None:
        cipher = self._w.cipher
        if not r.flags & FLAG_PUT or r.flags & FLAG_DELETE:
            if cipher is None:
                return r.key, None
            key = self._deleted_key(r, node)
            return None if key is None else (key, None)
        value = r.value[EXPIRES_BYTES:] if r.flags & FLAG_EXPIRES else r.value
        if cipher is None:
            return r.key, value
        key, value = cipher.open(r.pg, r.lsn, r.key, value)
        self._remember(r.key, key)
        return key, value

    def _remember(self, index_key: bytes, key: bytes) -> None:
        plain = self._plain
        plain[index_key] = key
        plain.move_to_end(index_key)
        if len(plain) > PLAIN_KEYS_MAX:
            plain.popitem(last=False)

    def _deleted_key(self, r, node: str) -> bytes | None:
        """The plain key of an encrypted volume's delete record (see the module docstring)."""
        key = self._plain.get(r.key)
        if key is not None:
            return key
        w = self._w
        read_point = r.lsn - 1
        for _ in range(DELETE_KEY_READS_MAX):
            if read_point <= 0:
                return None
            try:
                reply = w.transport.read(node, r.pg, r.key, read_point, 0, w.epoch, NAMESPACE_KEYS)
            except SixfoldError:
                return None  # collected, or the segment went away: no earlier version to name it by
            if reply.lsn == 0:
                return None
            if reply.value is not None and not reply.deleted:
                key, _value = w.cipher.open(r.pg, reply.lsn, r.key, reply.value)
                self._remember(r.key, key)
                return key
            read_point = reply.lsn - 1
        return None
