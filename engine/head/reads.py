"""The read path: the one way a get, a batch of gets or a scan reaches the segments.

Theory of operation
-------------------
Both the embedded engine and the writer endpoint read through `ReadPath` (the writer owns one,
`Writer.reads`); nothing else asks a segment for a key on a caller's behalf.

A read takes a `ReadView` (read point = VDL, and each PG's read tail: the LSN of its last record
at or below VDL). A segment whose SCL reaches the PG's read tail is *complete* at the view and can
answer alone; the writer knows each segment's SCL from its append replies, so it picks such a
segment without asking anybody (same AZ first, `engine.core.placement.read_order`). The node
checks again (`required_lsn`) and refuses `SegmentIncomplete` if it is behind after all (it was
wiped, say), and the read moves to the next complete segment. When every segment the writer
knows complete failed, the other members are asked the same way (`candidates`): the writer's
knowledge lags the nodes' (a node that finished rebuilding from its peers is complete before
its next append reply says so), and the node's own check is what makes an answer safe.

When no complete segment answers, or the caller asks for it (`quorum=True`), the read asks
segments until those that answered form a read quorum of the membership (`has_read_quorum`:
three of the six, three of *each* quorum set during a membership change) and the newest version
wins (`merge_read`). Unavailable, naming who answered, when no read quorum can.

`get_many` is the batched form the endpoint's `GetMany` RPC and `Database.get_many` use: gets
without a view share one read point, are grouped by the complete segment that will answer each,
and go out as one `read_many` per node (nodes in parallel when a pool is given). A get a segment
cannot answer moves to the PG's next complete segment; a node that fails is skipped for the rest
of the call; what no complete segment answers, and quorum or snapshot gets, take `get`.

The writer's memory (`Writer.remembered`, the map of its recent writes that conditional writes
are checked against): a get of now (no view, not `quorum`), alone or in a batch, whose key this
writer wrote at or below the read point is answered from it and asks no segment, the way
Aurora's writer serves hot pages from its buffer cache. It is exact, not a cache that can go
stale: only this writer logs at its epoch and every earlier writer's records lie at or below the
VDL it recovered, so the newest write it remembers, when at or below the read point, is the
newest version at that point. A key written above the read point (not durable yet), or not
remembered (written by an earlier writer, or forgotten past the memory's bounds), is read from
the segments as before. Quorum gets and gets at a snapshot's view always ask the segments. Status
counts the answers (`stats.reads_from_memory`).

Version collection (`engine.node.collection`): a segment refuses a read below its collection
horizon with SnapshotTooOld, and that answer is final for the read point, so it is raised at
once rather than asked of the next segment. A read at a read point of its own (a get without a
view, a batch of them) takes a fresh one and tries again, a bounded number of times: its read
point was merely older than the collection point when it arrived, which trails the VDL. A
snapshot's view is the caller's: SnapshotTooOld is its answer.

A scan is a merge of per-PG scans, each fetched in chunks of `SCAN_CHUNK` versions from one
complete segment, or from a read quorum whose answers are merged (each chunk is cut at the
smallest resume key any segment gave, so no segment's unseen keys are skipped).

Expiry (`engine.head.expiry`): a version with a deadline at or before the log's time
(`source.log_time_us()`, the commit time of the newest durable unit) is no value: get, get_many
and scan leave it out as if deleted, whatever the segments still hold, until the expiry step's
delete lands.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator, Sequence

from engine.core.constants import KEY_BYTES_MAX, NAMESPACE_KEYS, READ_QUORUM
from engine.core.placement import protection_group_of, read_order
from engine.core.quorum import has_read_quorum, merge_read, merge_scan
from engine.core.types import ReadReply, ReadView
from engine.errors import CorruptRecord, InvalidArgument, SixfoldError, SnapshotTooOld, Unavailable

#: Versions per scan chunk asked of one segment.
SCAN_CHUNK = 512
#: Read points a get without a view tries when segments say SnapshotTooOld.
FRESH_VIEWS_MAX = 3


def check_key(key) -> None:
    if not isinstance(key, bytes):
        raise InvalidArgument(f"keys are bytes, got {type(key).__name__}")
    if not 1 <= len(key) <= KEY_BYTES_MAX:
        raise InvalidArgument(f"key of {len(key)} bytes: keys must be 1..{KEY_BYTES_MAX} bytes")


def checked_gets(gets: Sequence, check_view: Callable[[ReadView | None], object]) -> list:
    """`gets` with each get whose snapshot view `check_view` refuses replaced by its error (the
    other gets go on): what an endpoint hands `ReadPath.get_many`."""
    out: list = []
    for g in gets:
        if not isinstance(g, SixfoldError):
            try:
                check_view(g[2])
            except SixfoldError as e:
                g = e
        out.append(g)
    return out


class ReadPath:
    """Reads of one writer's volume. `source` is the writer: its view, its knowledge of which
    segments are reachable and complete (`Writer.read_sources`), its transport and epoch."""

    def __init__(self, source) -> None:
        self._w = source

    def _now_us(self) -> int:
        clock = getattr(self._w, "log_time_us", None)
        return clock() if clock is not None else 0

    def _live_value(self, r) -> bytes | None:
        """A reply's (or scan entry's) value, None when it is deleted or expired at the log's time."""
        if r is None or r.value is None:
            return None
        if r.deadline_us and r.deadline_us <= self._now_us():
            return None
        return r.value

    # --- choosing segments --------------------------------------------------------------------
    def candidates(self, pg: int, view: ReadView) -> list[str]:
        """The segments of `pg` to ask, one at a time, for a read at `view` alone: first those
        the source knows reachable and complete there, in read order (same AZ first); then the
        other members, reachable first, whose completeness the source does not know (yet). Each
        is asked with the read tail as `required_lsn`, so a segment that is behind after all
        refuses and the read moves on; the later ones are asked only when every known complete
        segment failed (a node that finished a rebuild from its peers before the source heard
        from it again, then the only one left standing). Under the read-any weakening: every
        reachable member, as the source says."""
        known, others = self.candidates_split(pg, view)
        return known + others

    def candidates_split(self, pg: int, view: ReadView) -> tuple[list[str], list[str]]:
        """`candidates` in its two parts, from one look at the source: (the segments the source
        knows reachable and complete at `view`, the other members). Only the first count as
        evidence that a record is gone (a watch's broken chain); the others may merely be
        behind."""
        w = self._w
        membership, up, complete = w.read_sources(pg, view.tails[pg])
        order = read_order(complete, w.nodes, w.options.local_az)
        if w.weakening.read_any:
            return order, []
        known = set(complete)
        unknown_up = read_order([n for n in up if n not in known], w.nodes, w.options.local_az)
        return order, unknown_up + [n for n in membership.all_nodes if n not in known and n not in up]

    def _required(self, pg: int, view: ReadView) -> int:
        return 0 if self._w.weakening.read_any else view.tails[pg]

    def _read_quorum(self, pg: int, what: str, ask: Callable[[str], object],
                     alone: Sequence[str] | None = None) -> list:
        """Ask the segments of `pg` (reachable first, same AZ first) until those that answered form
        a read quorum of the membership; return their answers. `alone` (a read that tried one
        segment at a time first): why each could not answer alone, named in the error when no
        quorum answers either."""
        w = self._w
        membership, up, _complete = w.read_sources(pg, None)
        order = read_order(up, w.nodes, w.options.local_az) + [n for n in membership.all_nodes if n not in up]
        answers, answered, errors = [], [], []
        for n in order:
            try:
                answers.append(ask(n))
            except SnapshotTooOld:
                raise  # the read point is gone, whoever answers
            except SixfoldError as e:
                errors.append(f"{n}: {e}")
                continue
            answered.append(n)
            if has_read_quorum(answered, membership):
                return answers
        raise Unavailable(
            f"{what} of PG {pg} needs a read quorum ({READ_QUORUM} segments of "
            f"{'each quorum set' if membership.next_members else 'the six'}); answered: {', '.join(answered) or 'none'}"
            + (f" ({'; '.join(errors)})" if errors else "")
            + ("" if alone is None else f"; asked alone first: {'; '.join(alone)}" if alone else "; no segment to ask alone")
        )

    # --- gets -----------------------------------------------------------------------------------
    def _remembered(self, key: bytes, read_point: int) -> tuple[int, bytes | None, int] | None:
        """The source's memory of `key`'s newest version at `read_point` (`Writer.remembered`),
        or None: ask the segments. Never under a weakening (engine.head.weakening: the
        fault-injection runs must see what the weakened protocol stored and reads)."""
        w = self._w
        remembered = getattr(w, "remembered", None)
        weakening = getattr(w, "weakening", None)
        if remembered is None or (weakening is not None and weakening.weakened):
            return None
        return remembered(key, read_point)

    def _remembered_value(self, version: tuple[int, bytes | None, int]) -> bytes | None:
        """What a get answers for a remembered version: None for a delete or a lapsed deadline."""
        _lsn, value, deadline = version
        if value is None or (deadline and deadline <= self._now_us()):
            return None
        return value

    def get(self, key: bytes, *, quorum: bool = False, view: ReadView | None = None) -> bytes | None:
        """`key`'s value at `view` (default: a view of now), None when absent. A get of now that
        this writer's memory answers (`_remembered`) asks no segment; a `quorum` read, or one at a
        given view, always asks the segments (a snapshot's view is checked against what they
        collected)."""
        check_key(key)
        cipher = self._w.cipher
        ik = key if cipher is None else cipher.index_key(key)
        if view is None and not quorum:
            now = self._w.view()
            mem = self._remembered(ik, now.read_point)
            if mem is not None:
                return self._remembered_value(mem)
            try:
                return self._value(key, ik, self.lookup(ik, view=now))
            except SnapshotTooOld:
                pass  # that read point is gone already: fresh views, as any get of now
        return self._value(key, ik, self.lookup(ik, quorum=quorum, view=view))

    def _value(self, key: bytes, ik: bytes, r: ReadReply | None) -> bytes | None:
        """A get's answer from a segment's reply (opened, on an encrypted volume)."""
        if self._w.cipher is None:
            return self._live_value(r)
        return None if self._live_value(r) is None else self._open(key, ik, r)

    def version(self, key: bytes, *, view: ReadView | None = None) -> tuple[int, bytes | None, int]:
        """(lsn, value or None, deadline) of the newest version of `key` at the view: lsn 0 when
        it was never written (or collected away), value None for a delete; the deadline is 0
        (0 for none). What the writer checks a conditional write against, and what
        `Database.version` answers (the deadline is not applied here: the caller judges it)."""
        check_key(key)
        cipher = self._w.cipher
        if cipher is None:
            r = self.lookup(key, view=view)
            return (0, None, 0) if r is None or r.lsn == 0 else (r.lsn, r.value, r.deadline_us)
        ik = cipher.index_key(key)
        r = self.lookup(ik, view=view)
        if r is None or r.lsn == 0:
            return 0, None, 0
        return r.lsn, self._open(key, ik, r), r.deadline_us

    def _open(self, key: bytes, ik: bytes, reply: ReadReply | None) -> bytes | None:
        """The plaintext value of an encrypted volume's read reply (None: no value)."""
        if reply is None or reply.value is None or reply.lsn == 0:
            return None
        pg = protection_group_of(ik, self._w.P)
        stored_key, value = self._w.cipher.open(pg, reply.lsn, ik, reply.value)
        if stored_key != key:
            self._w.cipher.failures += 1
            raise CorruptRecord(f"record at LSN {reply.lsn} of PG {pg} holds another key than its index says")
        return value

    def lookup(
        self, key: bytes, *, namespace: int = NAMESPACE_KEYS, quorum: bool = False, view: ReadView | None = None,
        what: str = "a read",
    ) -> ReadReply | None:
        """The newest version of `key` in `namespace` at the view (a `ReadReply`: value None for
        a delete, lsn 0 for never written), from one complete segment, else a read quorum."""
        if view is not None:
            return self._lookup(key, namespace, quorum, view, what)
        for attempt in range(FRESH_VIEWS_MAX):
            try:
                return self._lookup(key, namespace, quorum, self._w.view(), what)
            except SnapshotTooOld:
                if attempt == FRESH_VIEWS_MAX - 1:
                    raise

    def _lookup(self, key: bytes, namespace: int, quorum: bool, view: ReadView, what: str) -> ReadReply | None:
        w = self._w
        pg = protection_group_of(key, w.P)
        alone: list[str] = []
        if not quorum:
            required = self._required(pg, view)
            for n in self.candidates(pg, view):
                try:
                    return w.transport.read(n, pg, key, view.read_point, required, w.epoch, namespace)
                except SnapshotTooOld:
                    raise
                except SixfoldError as e:
                    alone.append(f"{n}: {e}")
        replies = self._read_quorum(
            pg, what, lambda n: w.transport.read(n, pg, key, view.read_point, 0, w.epoch, namespace), None if quorum else alone
        )
        return merge_read(replies)

    def get_many(
        self, gets: Sequence[tuple[bytes, bool, ReadView | None] | SixfoldError], *, pool=None,
        at: ReadView | None = None,
    ) -> list[bytes | None | SixfoldError]:
        """Many gets `(key, quorum, view)`; those without a view share one read point. A result
        per get: the value, None (no such key) or the error of that get alone. An item that is
        already a SixfoldError (refused while decoding, say) is passed through. `pool`: an
        executor to ask nodes in parallel (default: one after the other). `at`: the read point the
        gets without a view share (default: the source's view now; then, when a segment says it is
        too old, those gets are read again at a fresh one)."""
        results = self._get_many(gets, pool, at)
        for _ in range(FRESH_VIEWS_MAX - 1 if at is None else 0):
            shared = [i for i, g in enumerate(gets) if not isinstance(g, SixfoldError) and g[2] is None]
            if not any(isinstance(results[i], SnapshotTooOld) for i in shared):
                break
            again = self._get_many([gets[i] for i in shared], pool, None)
            for i, r in zip(shared, again):
                results[i] = r
        return results

    def _get_many(self, gets, pool, at: ReadView | None) -> list:
        w = self._w
        cipher = w.cipher
        results: list = [None] * len(gets)
        slow: list[tuple[int, bytes, bool, ReadView | None]] = []
        pending: list[tuple[int, int, bytes]] = []
        plain: dict[int, bytes] = {}  # encrypted volume: the key of each get (pending holds its index key)
        shared: ReadView | None = None
        for i, g in enumerate(gets):
            if isinstance(g, SixfoldError):
                results[i] = g
                continue
            key, quorum, view = g
            try:
                check_key(key)
            except SixfoldError as e:
                results[i] = e
                continue
            if quorum or view is not None:
                slow.append((i, key, quorum, view))
                continue
            if shared is None:
                try:
                    shared = at or w.view()
                except SixfoldError as e:
                    results[i] = e
                    continue
            if cipher is not None:
                plain[i] = key
                key = cipher.index_key(key)
            if at is None:  # a view of now: this writer's memory may answer (see `get`)
                mem = self._remembered(key, shared.read_point)
                if mem is not None:
                    results[i] = self._remembered_value(mem)
                    continue
            pending.append((i, protection_group_of(key, w.P), key))

        by_pg: dict[int, list[str]] = {}  # the complete segments of each PG at the shared view
        dead: set[str] = set()  # nodes that failed during this call
        tried: dict[int, set[str]] = {}  # per get, the segments that could not answer it

        def ask(job):
            node, items = job
            reqs = [(pg, key, shared.read_point, self._required(pg, shared), w.epoch) for _i, pg, key in items]
            try:
                return node, items, w.transport.read_many(node, reqs)
            except SixfoldError:
                return node, items, None

        while pending:
            by_node: dict[str, list[tuple[int, int, bytes]]] = {}
            for item in pending:
                i, pg, key = item
                if pg not in by_pg:
                    by_pg[pg] = self.candidates(pg, shared)
                skip = tried.get(i, ())
                node = next((n for n in by_pg[pg] if n not in dead and n not in skip), None)
                if node is None:
                    slow.append((i, plain.get(i, key), False, shared))
                else:
                    by_node.setdefault(node, []).append(item)
            pending = []
            jobs = list(by_node.items())
            answers = list(map(ask, jobs)) if pool is None or len(jobs) <= 1 else list(pool.map(ask, jobs))
            for node, items, replies in answers:
                if replies is None:
                    dead.add(node)
                    pending.extend(items)
                    continue
                for item, r in zip(items, replies):
                    if isinstance(r, ReadReply):
                        if self._live_value(r) is None:
                            results[item[0]] = None
                        elif cipher is None:
                            results[item[0]] = r.value
                        else:
                            try:
                                results[item[0]] = self._open(plain[item[0]], item[2], r)
                            except SixfoldError as e:
                                results[item[0]] = e
                    elif isinstance(r, SnapshotTooOld):
                        results[item[0]] = r  # the shared read point is gone (get_many reads again)
                    else:  # e.g. SegmentIncomplete: try the PG's next complete segment
                        tried.setdefault(item[0], set()).add(node)
                        pending.append(item)
        for i, key, quorum, view in slow:
            try:
                results[i] = self.get(key, quorum=quorum, view=view)
            except SixfoldError as e:
                results[i] = e
        return results

    # --- scans ----------------------------------------------------------------------------------
    def scan(
        self, start: bytes, end: bytes | None, *, quorum: bool = False, view: ReadView | None = None
    ) -> Iterator[tuple[bytes, bytes]]:
        if not isinstance(start, bytes) or (end is not None and not isinstance(end, bytes)):
            raise InvalidArgument("scan bounds are bytes (end may be None)")
        view = view or self._w.view()
        if self._w.cipher is not None:
            return self._scan_encrypted(start, end, view, quorum)
        return heapq.merge(*(self._scan_pg(pg, start, end, view, quorum) for pg in range(self._w.P)))

    def _scan_pg(self, pg: int, start: bytes, end: bytes | None, view: ReadView, quorum: bool) -> Iterator[tuple[bytes, bytes]]:
        """Live keys of one PG in [start, end) at the view, in key order, fetched in chunks."""
        for e in self._scan_entries(pg, start, end, view, quorum):
            yield e.key, e.value

    def _scan_entries(self, pg: int, start: bytes, end: bytes | None, view: ReadView, quorum: bool) -> Iterator:
        resume = start
        while resume is not None:
            entries, nxt = self._scan_chunk(pg, resume, end, view, quorum)
            now_us = self._now_us()
            for e in entries:
                if e.value is not None and not (e.deadline_us and e.deadline_us <= now_us):
                    yield e
            resume = nxt

    def expiring(self, view: ReadView | None = None) -> Iterator[tuple[bytes, int, int]]:
        """(plain key, LSN, deadline) of every live version with a deadline at the view, expired
        ones included (the expiry step deletes those)."""
        view = view or self._w.view()
        cipher = self._w.cipher
        for pg in range(self._w.P):
            resume = b""
            while resume is not None:
                entries, resume = self._scan_chunk(pg, resume, None, view, False)
                for e in entries:
                    if e.value is None or not e.deadline_us:
                        continue
                    key = e.key if cipher is None else cipher.open(pg, e.lsn, e.key, e.value)[0]
                    yield key, e.lsn, e.deadline_us

    def _scan_encrypted(self, start: bytes, end: bytes | None, view: ReadView, quorum: bool) -> Iterator[tuple[bytes, bytes]]:
        """An encrypted volume's nodes know no key order (they hold keyed hashes): read every live
        version at the view, open it, keep [start, end), sort (engine.envelope)."""
        cipher = self._w.cipher
        found = []
        for pg in range(self._w.P):
            for e in self._scan_entries(pg, b"", None, view, quorum):
                key, value = cipher.open(pg, e.lsn, e.key, e.value)
                if start <= key and (end is None or key < end):
                    found.append((key, value))
        found.sort()
        yield from found

    def _scan_chunk(self, pg, start, end, view, quorum):
        w = self._w
        alone: list[str] = []
        if not quorum:
            required = self._required(pg, view)
            for n in self.candidates(pg, view):
                try:
                    return w.transport.scan(n, pg, start, end, view.read_point, required, SCAN_CHUNK, w.epoch)
                except SnapshotTooOld:
                    raise
                except SixfoldError as e:
                    alone.append(f"{n}: {e}")
        got = self._read_quorum(
            pg, "a scan", lambda n: w.transport.scan(n, pg, start, end, view.read_point, 0, SCAN_CHUNK, w.epoch), None if quorum else alone
        )
        stops = [r for _e, r in got if r is not None]
        limit = min(stops) if stops else None
        merged = merge_scan([[e for e in entries if limit is None or e.key < limit] for entries, _r in got])
        return merged, limit
