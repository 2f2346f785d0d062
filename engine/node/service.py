"""A storage node: its segment store plus the background work that keeps segments whole.

Theory of operation
-------------------
`StorageNode` is what a transport calls (in-process directly; over gRPC through a thin servicer).
Its request methods delegate to the `SegmentStore`. Two background duties run as *steps* that a
thread (real deployments) or a simulator (deterministic runs) drives:

* `gossip_once()`: ask each peer of the membership for its state; adopt a newer epoch with its
  truncation ranges; for every PG where a peer's SCL is above ours, fetch the records in between
  (a bounded frame at a time) and append them in repair mode. A wiped node rebuilds this way.
  Repair never copies a corrupt record: the sender's fetch checks every CRC and the receiver's
  decode checks them again.
* `scrub_step()`: re-verify a bounded number of stored records against their CRC; a corrupt one
  is quarantined (dropped, SCL pulled back) and gossip refetches it from a healthy peer.
* `collect_once()`: remove, in one bounded step, versions no read point can see any more
  (`engine.node.collection`), towards the point the writer sent with its appends; tombstones
  only below what every other member reported swept in its state (gossip learns it).

Failure policy of the background threads (`start_background`): a thread ends only when the node
closes. An expected error (a `SixfoldError`, or an LMDB/OS error typed by `storage_error`) is
counted (per peer for gossip: `gossip_peer_errors`; per thread: `background_expected_errors`)
and logged once per change of cause, not once per round. An unexpected exception is a bug somewhere: it is logged with its traceback,
counted per thread (`background_errors`, with `background_last_error`), and the thread carries
on after a back-off that doubles per consecutive failure up to BACKOFF_S_MAX. All of it shows in
the node's state (`NodeState.extra`).

Metrics (`engine.metrics` reads them at scrape time, from `state()` and `counters()`): besides
what the store counts (corrupt copies found, records repaired and collected), the node counts in
memory its gossip rounds, the frame bytes gossip fetched, served to Fetch and appended in repair
mode, and every request `handle` answered with an error, by class. Plain integers under one lock,
touched once per frame or per error, never per record.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence

import lmdb

from engine import codec
from engine.core.types import Geometry, Membership, NodeInfo, NodeState, TruncationRange
from engine.errors import Closed, CorruptRecord, InvalidArgument, PermissionDenied, SixfoldError, StorageError, StorageFull
from engine.node.collection import COLLECT_RECORDS_PER_STEP
from engine.node.store import FETCH_BYTES_MAX, SegmentStore

log = logging.getLogger("sixfold.node")

GOSSIP_INTERVAL_S = 0.2
SCRUB_INTERVAL_S = 1.0
SCRUB_RECORDS_PER_STEP = 1000
GOSSIP_FRAMES_PER_STEP = 64  # bound on the repair work of one gossip step per peer
#: Version collection: a step every COLLECT_INTERVAL_S, again after COLLECT_BUSY_S while a step
#: used its whole budget (more is waiting); each step is one bounded write transaction
#: (engine.node.collection). A step that caught up waits the interval: a steady stream of puts is
#: collected in one step per interval, not one step (a write transaction) per append. A step that
#: removes anything commits (an fsync, and the node's write lock), whatever it removed: at 0.02 s
#: that fixed cost was 50 commits a second on every node, about 160 us of a node's CPU per put
#: from one client (bench/embedded.py, 1 thread: 641 puts/s at 0.02 s, 747 at 0.1 s). Old
#: versions and request records now wait up to 0.1 s longer before they go.
COLLECT_INTERVAL_S = 0.1
COLLECT_BUSY_S = 0.002
#: Longest pause of a background thread after consecutive unexpected failures.
BACKOFF_S_MAX = 5.0


class StorageNode:
    """One storage node: a segment of every protection group."""

    def __init__(
        self,
        path: str,
        info: NodeInfo,
        geometry: Geometry,
        volume_id: str,
        *,
        durable: bool = True,
        max_storage_bytes: int | None = None,
        reserve_bytes: int | None = None,
        seed: int = 0,
        map_bytes: int | None = None,
    ) -> None:
        # `map_bytes` is the older name of the maximum (the map was fixed at it; now it grows to it).
        if map_bytes is not None and max_storage_bytes is not None and map_bytes != max_storage_bytes:
            raise InvalidArgument(f"map_bytes {map_bytes} and max_storage_bytes {max_storage_bytes} disagree; "
                                  "map_bytes is the older name of max_storage_bytes: give one")
        self.info = info
        self.store = SegmentStore(path, info.id, info.az, geometry, volume_id, durable=durable,
                                  max_bytes=max_storage_bytes if max_storage_bytes is not None else map_bytes,
                                  reserve_bytes=reserve_bytes)
        self.transport = None  # set by attach(); used by gossip
        self._peers: Callable[[], Sequence[str]] = lambda: ()
        self._rng = random.Random(seed)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._scrub_cursor = (0, 0)  # (pg, lsn) where the next scrub step resumes
        self.gossip_fetched_records = 0
        self._settled_hint: dict[str, int] = {}
        self._behind_any = False
        self._fetcher: concurrent.futures.ThreadPoolExecutor | None = None  # set by start_background  # per peer: the VDL hint seen in the previous round
        #: repair by gossip: whether the last round found this node behind a peer, and how many
        #: records it has fetched since it started (a wiped node's rebuild shows up here)
        self.rebuild = {"active": False, "fetched_records": 0}
        #: when the writer of the node's epoch last renewed its lease (an append or its seal), by
        #: this node's monotonic clock. A node just (re)started assumes the lease was renewed now:
        #: it cannot see a lease it lost with its memory, so it counts a full period from here.
        self._lease_at = time.monotonic()
        #: in a secure cluster, the check of writer-signed epoch states (engine.security.proofs
        #: EpochVerifier, set by the node process); None: adopt peers' truncations as told
        self.verifier = None
        #: peers' truncations or memberships refused for want of a valid writer signature
        self.unsigned_gossip_refused = 0
        self._full_cause: str | None = None  # why the node was last full (logged once per cause)
        #: unexpected exceptions per background thread, and the last one as "thread: Class: message"
        self.background_errors = {"gossip": 0, "scrub": 0, "collect": 0}
        self.background_last_error = ""
        #: expected errors (SixfoldError, typed storage errors) that ended a background step
        self.background_expected_errors = {"gossip": 0, "scrub": 0, "collect": 0}
        #: expected errors of gossip, per peer; the cause last logged per peer (or thread)
        self.gossip_peer_errors: dict[str, int] = {}
        self._causes: dict[str, str] = {}
        #: each peer's swept LSN per PG, as its state last said (gossip): a tombstone is dropped
        #: only below what every member swept (engine.node.collection)
        self.peer_swept: dict[str, tuple[int, ...]] = {}
        #: traffic and refusals since this process started, for metrics (`counters()`): gossip
        #: rounds, frame bytes gossip fetched, frame bytes served to Fetch, frame bytes appended in
        #: repair mode (gossip's, and a recovering writer's RepairAppend), and requests answered
        #: with an error, by class. Incremented from many threads, hence the lock.
        self._counts_lock = threading.Lock()
        self._counts = {"gossip_rounds": 0, "gossip_fetched_bytes": 0, "fetch_served_bytes": 0, "repair_bytes": 0}
        self._request_errors: dict[str, int] = {}

    @property
    def id(self) -> str:
        return self.info.id

    # --- requests (called through a transport) ----------------------------------------------
    REQUESTS = frozenset({"append", "repair_append", "read", "scan", "seal", "sync_epoch", "fetch", "state", "corrupt", "scrub"})

    def handle(self, method: str, *args):
        """Run request `method`; what every transport calls (in-process directly, the gRPC
        servicer for every RPC), so storage errors are typed the same on every path: a request
        racing the node's shutdown gets Closed (the caller sees an unreachable node), no room
        gets StorageFull, any other LMDB or OS error StorageError. Never a raw LMDB error."""
        if method not in self.REQUESTS:
            raise InvalidArgument(f"unknown request {method!r}")
        try:
            result = getattr(self, method)(*args)
        except SixfoldError as e:
            self._count_error(e)
            raise
        except (lmdb.Error, OSError) as e:
            typed = self.storage_error(method, e)
            self._count_error(typed)
            raise typed from e
        if self._full_cause is not None and method in ("append", "repair_append"):
            log.info("node %s: has room again (it was full: %s)", self.id, self._full_cause)
            self._full_cause = None
        return result

    def _count(self, name: str, n: int) -> None:
        with self._counts_lock:
            self._counts[name] += n

    def _count_error(self, e: SixfoldError) -> None:
        kind = type(e).__name__
        with self._counts_lock:
            self._request_errors[kind] = self._request_errors.get(kind, 0) + 1

    def counters(self) -> dict:
        """What this node counted since it started (for `engine.metrics`): gossip rounds, frame
        bytes gossip fetched from peers, frame bytes it served to Fetch calls, frame bytes it
        appended in repair mode, and `request_errors`: requests answered with an error, by class."""
        with self._counts_lock:
            return dict(self._counts, request_errors=dict(self._request_errors))

    def storage_error(self, what: str, exc: BaseException) -> SixfoldError:
        """The typed error for an LMDB or OS error met during `what` (logged once per cause)."""
        if self.store.closed:
            return Closed(f"node {self.id} stopped during {what}")
        cause = self.store.storage_full_cause(exc)
        if cause is not None:
            if cause != self._full_cause:
                log.warning("node %s is full: %s (during %s; it keeps serving reads)", self.id, cause, what)
                self._full_cause = cause
            return StorageFull(
                f"node {self.id} is full: {cause}. It refused this {what} and changed nothing; reads still work, "
                "and deletes fit in its reserve while writers hold new puts back"
            )
        log.error("node %s: storage error during %s: %s: %s", self.id, what, type(exc).__name__, exc)
        return StorageError(f"node {self.id}: storage error during {what}: {type(exc).__name__}: {exc}")

    def append(self, epoch: int, frame: bytes, hint_lsn: int, collect_lsn: int = 0, collect_requests_lsn: int = 0,
               items=None):
        """`items`: the frame already indexed (`codec.index_frame`), from a caller in this process
        that sends one frame to every member (the bulk path); a request from the wire never has it."""
        reply = self.store.append(epoch, frame, hint_lsn, collect=(collect_lsn, collect_requests_lsn), items=items)
        # Taken at this epoch: the writer's lease is renewed (its heartbeats are empty appends).
        self._lease_at = time.monotonic()
        return reply

    def repair_append(self, frame: bytes):
        reply = self.store.append(0, frame, 0, repair=True)
        self._count("repair_bytes", len(frame))
        return reply

    def read(self, pg, key, read_point, required_lsn, epoch, namespace=0):
        return self.store.read(pg, key, read_point, required_lsn, epoch, namespace)

    def scan(self, pg, start, end, read_point, required_lsn, limit, epoch):
        return self.store.scan(pg, start, end, read_point, required_lsn, limit, epoch)

    def seal(self, epoch: int):
        reply = self.store.seal(epoch)
        self._lease_at = time.monotonic()  # a new writer took over: its lease starts now
        return reply

    def sync_epoch(self, epoch: int, truncations: Sequence[TruncationRange], membership: Membership | None,
                   proof: bytes = b"", proof_epoch: int = -1):
        return self.store.sync_epoch(epoch, truncations, membership, proof, proof_epoch)

    def fetch(self, pg: int, after_lsn: int, max_bytes: int, upto_lsn: int | None):
        reply = self.store.fetch(pg, after_lsn, max_bytes, upto_lsn)
        self._count("fetch_served_bytes", len(reply.frame))
        return reply

    def state(self) -> NodeState:
        st = dataclasses.replace(self.store.state(), lease_age_ms=int((time.monotonic() - self._lease_at) * 1000))
        st.extra.update(
            rebuild=dict(self.rebuild), gossip_fetched_records=self.gossip_fetched_records,
            background_errors=dict(self.background_errors), background_last_error=self.background_last_error,
            background_expected_errors=dict(self.background_expected_errors),
            gossip_peer_errors=dict(self.gossip_peer_errors),
            refused_truncations=self.store.refused_truncations,
            unsigned_gossip_refused=self.unsigned_gossip_refused,
            max_storage_bytes=self.store.max_bytes, map_bytes=self.store.map_bytes,
        )
        return st

    def corrupt(self, pg: int, lsn: int | None, bit: int):
        return self.store.corrupt(pg, lsn, bit)

    def scrub(self, records_max: int) -> int:
        """Admin: scrub now; `records_max` 0 means one full pass over every PG."""
        if records_max:
            return self.scrub_step(records_max)
        # A full pass: the first step may start mid-PG where the background scrub was.
        return self.scrub_step(1 << 62) + self.scrub_step(1 << 62)

    # --- background duties ------------------------------------------------------------------
    def attach(self, transport, peers: Callable[[], Sequence[str]]) -> None:
        """Give the node a transport (source = this node) and a view of its peers for gossip."""
        self.transport = transport
        self._peers = peers

    def gossip_once(self) -> int:
        """One round of gossip with every peer; returns the number of records fetched."""
        if self.transport is None:
            return 0
        fetched = 0
        self._behind_any = False
        peers = [p for p in self._peers() if p != self.id]
        self._rng.shuffle(peers)
        for peer in peers:
            if self._stop.is_set():
                break
            try:
                fetched += self._gossip_with(peer)
            except SixfoldError as e:  # unreachable or busy peer: try the next; gossip is best effort
                if self._stop.is_set():
                    break  # this node is stopping (and so, likely, its peers): not a fault
                self.gossip_peer_errors[peer] = self.gossip_peer_errors.get(peer, 0) + 1
                self._note_cause(f"gossip with {peer}", e)
            except (lmdb.Error, OSError) as e:  # our own store failed while repairing from this peer
                self.gossip_peer_errors[peer] = self.gossip_peer_errors.get(peer, 0) + 1
                self._note_cause(f"gossip with {peer}", self.storage_error(f"gossip with {peer}", e))
            else:
                self._note_cause(f"gossip with {peer}", None)
        self.gossip_fetched_records += fetched
        self.rebuild["active"] = self._behind_any
        self._count("gossip_rounds", 1)
        return fetched

    def _adopt_signed(self, peer: str, st: NodeState) -> None:
        """A secure node adopts a peer's truncations and membership only as a writer signed them
        (engine.security.proofs): exactly the proof's statement, never the unsigned fields."""
        try:
            stmt = self.verifier.verify(st.epoch_proof)
        except PermissionDenied as e:
            self.unsigned_gossip_refused += 1
            self._note_cause(f"epoch state from {peer}", e)
            return
        self._note_cause(f"epoch state from {peer}", None)
        truncations = tuple(TruncationRange(*t) for t in stmt.truncations)
        membership = None if stmt.membership is None else Membership(*stmt.membership)
        self.store.sync_epoch(self.store.epoch, truncations, membership, st.epoch_proof, stmt.epoch, writer=False)

    def _gossip_with(self, peer: str) -> int:
        st = self.transport.state(peer)
        store = self.store
        if len(st.swept) == len(store.scls):
            self.peer_swept[peer] = st.swept
        # Learn the peer's truncation ranges and membership, but not its epoch: only a writer
        # moves a segment to a new epoch (sealing it), so a writer's seal is never pre-empted.
        if any(t not in store.truncations for t in st.truncations) or (
            st.membership is not None and (store.membership is None or st.membership.epoch > store.membership.epoch)
        ):
            if self.verifier is None:
                store.sync_epoch(store.epoch, st.truncations, st.membership, writer=False)
            else:
                self._adopt_signed(peer, st)
        # Only records at or below a VDL the writer told us a round ago are surely missing:
        # anything newer may still be on its way from the writer, and fetching it would race the
        # writer's own sends (doubling the writes of every slow node).
        hint = self._settled_hint.get(peer, 0)
        self._settled_hint[peer] = max(store.hint_lsn, st.hint_lsn)
        behind = [
            (pg, min(st.scls[pg], hint))
            for pg in range(len(store.scls))
            if store.scls[pg] < min(st.scls[pg], hint)
        ]
        if not behind:
            return 0
        self._behind_any = True
        fetched = 0
        frames = 0
        for pg, peer_scl in behind:
            # Pipelined: while one frame is appended here, the next is already being fetched from
            # the peer (its start is the last LSN of the frame in hand).
            after = store.scls[pg]
            pending = (after, self._prefetch(peer, pg, after, peer_scl))
            while pending is not None and frames < GOSSIP_FRAMES_PER_STEP and not self._stop.is_set():
                start, reply = pending[0], pending[1].result()
                pending = None
                frames += 1
                self._count("gossip_fetched_bytes", len(reply.frame))
                try:
                    items = codec.index_frame(reply.frame)
                except CorruptRecord:
                    break
                if reply.more and items and items[-1].lsn < peer_scl:
                    pending = (items[-1].lsn, self._prefetch(peer, pg, items[-1].lsn, peer_scl))
                # The peer may have collected records of the range: what it says of them lets the
                # chain count as complete across them (engine.node.collection).
                claim = (pg, start, min(reply.complete_lsn, peer_scl), reply.horizon_lsn) if reply.complete_lsn else None
                if not items and claim is None:
                    break
                before = store.scls[pg]
                store.append(0, reply.frame, 0, repair=True, items=items, collected=claim)
                self._count("repair_bytes", len(reply.frame))
                fetched += len(items)
                self.rebuild["fetched_records"] += len(items)
                if store.scls[pg] == before or not items:
                    break  # the peer's records do not extend our chain (a hole remains): stop
            if pending is not None:
                try:
                    pending[1].result()
                except SixfoldError:
                    pass
        store.count_repaired(fetched)
        return fetched

    def _prefetch(self, peer: str, pg: int, after: int, upto: int):
        """Start fetching the records of `pg` above `after` from `peer` (a Future); synchronous
        (an already-done Future) when the node runs without background threads (simulation)."""
        if self._fetcher is None:
            f = concurrent.futures.Future()
            try:
                f.set_result(self.transport.fetch(peer, pg, after, FETCH_BYTES_MAX, upto))
            except SixfoldError as e:
                f.set_exception(e)
            return f
        return self._fetcher.submit(self.transport.fetch, peer, pg, after, FETCH_BYTES_MAX, upto)

    def collect_once(self, records_max: int = COLLECT_RECORDS_PER_STEP) -> int:
        """One bounded step of version collection; returns the log records it visited (0: none
        to do). Tombstones are dropped only below every other member's swept LSN of the PG."""
        store = self.store
        m = store.membership
        others = [n for n in (m.all_nodes if m is not None else ()) if n != self.id]
        tombstones = None
        if m is not None and others:
            P = store.geometry.protection_groups
            tombstones = [min(self.peer_swept.get(n, (0,) * P)[pg] for n in others) for pg in range(P)]
        return store.collect_step(records_max, tombstones)

    def _collect_in_background(self) -> bool:
        """The collection thread's step: True (step again soon) only when it used its whole
        budget, so more is waiting; a step that caught up is not a reason to step again at once."""
        return self.collect_once() >= self.store.collect_budget(COLLECT_RECORDS_PER_STEP)

    def scrub_step(self, records_max: int = SCRUB_RECORDS_PER_STEP) -> int:
        """Verify up to `records_max` stored records; quarantine corrupt ones. Returns how many
        corrupt records it found."""
        store = self.store
        P = store.geometry.protection_groups
        pg, after = self._scrub_cursor
        seen = bad = 0
        for _ in range(P):
            for lsn, rec in store.iter_log(pg, after):
                seen += 1
                try:
                    codec.decode_record(rec)
                except CorruptRecord:
                    store.quarantine(pg, lsn)
                    bad += 1
                after = lsn
                if seen >= records_max:
                    self._scrub_cursor = (pg, after)
                    return bad
            pg, after = (pg + 1) % P, 0
        self._scrub_cursor = (pg, 0)
        return bad

    def _note_cause(self, what: str, error: BaseException | None) -> None:
        """Log an expected fault of `what` once per change of cause (its class); None: it works."""
        cause = None if error is None else type(error).__name__
        last = self._causes.get(what)
        if cause == last:
            return
        if cause is None:
            self._causes.pop(what, None)
            log.info("node %s: %s works again (it failed with %s)", self.id, what, last)
        else:
            self._causes[what] = cause
            log.warning("node %s: %s failed: %s: %s (counted; logged again only if the cause changes)", self.id, what, cause, error)

    def _background(self, name: str, step: Callable[[], object], interval_s: float, busy_s: float | None = None) -> None:
        """The body of a background thread: run `step` every `interval_s` (every `busy_s` while it
        returns something true, when given) until the node closes, under the failure policy of
        the module docstring."""
        failures = 0
        delay = interval_s
        while not self._stop.wait(delay):
            try:
                busy = step()
            except Exception as e:  # noqa: BLE001 - sorted below; BaseException (exit) still ends the thread
                if self._stop.is_set() or self.store.closed:
                    return  # the node closed under the step: the thread ends with it
                if isinstance(e, (SixfoldError, lmdb.Error, OSError)):
                    failures, delay = 0, interval_s
                    self.background_expected_errors[name] += 1
                    self._note_cause(name, e if isinstance(e, SixfoldError) else self.storage_error(name, e))
                    continue
                failures += 1
                self.background_errors[name] += 1
                self.background_last_error = f"{name}: {type(e).__name__}: {e}"
                delay = min(BACKOFF_S_MAX, max(interval_s, 0.05) * (1 << min(failures, 16)))
                log.exception(
                    "node %s: %s step failed unexpectedly (%d so far); it carries on in %.2f s", self.id, name,
                    self.background_errors[name], delay,
                )
            else:
                failures, delay = 0, (busy_s if busy and busy_s is not None else interval_s)
                if name in self._causes:
                    self._note_cause(name, None)

    def start_background(self, gossip_interval_s: float = GOSSIP_INTERVAL_S, scrub_interval_s: float = SCRUB_INTERVAL_S) -> None:
        """Run gossip and scrub in daemon threads until close()."""
        self._fetcher = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{self.id}-fetch")
        for name, step, interval, busy in (
            ("gossip", self.gossip_once, gossip_interval_s, None), ("scrub", self.scrub_step, scrub_interval_s, None),
            ("collect", self._collect_in_background, COLLECT_INTERVAL_S, COLLECT_BUSY_S),
        ):
            t = threading.Thread(target=self._background, args=(name, step, interval, busy), name=f"{self.id}-{name}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop_background(self) -> None:
        """Tell the background threads (gossip, scrub, collection) to stop after their step,
        without waiting; `close` waits for them. A process closing several nodes tells them all
        first, so none reports its peers as down while they close."""
        self._stop.set()

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=5)
        if self._fetcher is not None:
            self._fetcher.shutdown(wait=True, cancel_futures=True)
        self.store.close()


def wait_until(predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.01) -> bool:
    """Poll `predicate` until it holds or `timeout_s` passes (for tests and tools)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()
