"""Reader instances: read replicas that read the volume's storage nodes at a read point the writer gives.

Theory of operation
-------------------
A replica needs no copy of the data: the six segments *are* the volume, and any process that
knows a read point and which segments are complete at it can read them as the writer does. A
reader instance (`ReaderProcess`, `sixfold reader serve`) is such a process. It learns the read
point from the writer endpoint's `WatchReadPoint` stream (`ReadPointFollower`): each message is a
`ReadPointUpdate`, the writer's read view (epoch, VDL, per-PG read tails) with the membership and
every member's SCLs, sent as soon as the VDL moves (coalesced: at most one per 5 ms) and at least
every 100 ms as a heartbeat, stamped with the writer's wall-clock send time.

`ReplicaSource` holds the newest update and is the *source* of the one read path
(`engine.head.reads.ReadPath`): `view()` is the update's (VDL, tails), `read_sources(pg, tail)`
picks the members whose SCL (as the writer last heard it) reaches the tail, same AZ first. The
read code is not copied: gets, batched gets and scans, quorum fallback, encrypted volumes, all
go through `ReadPath` exactly as on the writer. Reads are snapshot-consistent at the read point:
every get of a GetMany and every chunk of a scan use one view, and the node answers the newest
version at or below it. The read point is a VDL, so it never exposes a record a recovery could
truncate (recovery keeps everything at or below the durable point); a node whose SCL is below
the tail after all refuses `SegmentIncomplete` and the read moves on (`required_lsn`).

Updates are adopted only forwards: `(epoch, VDL)` never goes back, so a session that reads from
one reader never sees time run backwards, whatever the stream does (a reconnection, a newer
writer). With the writer down the stream breaks and the follower retries (re-reading the
writer's address each time: `writer start` on the same port, or a new writer after a
failover); meanwhile the reader keeps serving at its last read point, which stays durable.
A reader that has never heard from a writer has no read point: NOT_SERVING, reads Unavailable.

Lag (`ReaderEndpoint.status()["reader"]`): `lag_lsns` is the newest writer VDL seen minus the
read point served (0 in steady state: updates are adopted on arrival). `lag_ms` is replica lag
as Aurora counts it, the time from a commit becoming durable on the writer to it becoming
readable here: each update carries `committed_at`, the writer's wall-clock time of the first VDL
advance past the previous update of the stream (the writer keeps the times of its recent VDL
advances), so arrival minus `committed_at` is how long the oldest commit of the update waited
(the coalescing wait included). `lag_ms` is that of the newest update that brought commits, and
`lag_ms_p99` the 99th percentile over the last 2,048 such updates. While the stream is down,
`lag_ms` is at least the time since the writer was last heard: reads grow stale. Wall clocks are
compared: exact on one machine, off by the clock offset across machines (`heard_ms`, on the
reader's own monotonic clock, is not).

Read-your-writes: a write returns its commit position (CPL LSN); a read with `after=LSN` waits,
bounded by the volume's write timeout, until the read point covers it, then reads
(`ReplicaBehind` if it does not in time). Writes and admin calls are refused `ReadOnly`.

Metrics (`engine.metrics`, with `metrics=`): the shared `KVServicer` observes get latency and
counts errors (a refused write: `ReadOnly`); the reader's read point and lag are exported at
scrape time, and once promoted the writer's status instead, on the same registry and port.

Promotion hook: `ReaderProcess.become_writer()` is where a later change makes a reader promote
itself. Everything a writer needs is already here (the node addresses, this identity's TLS, the
cipher); promotion is: stop the follower, build a `WriterEndpoint` over the same config and
`open()` it (recovery at a new epoch, which fences the old writer by the epoch rule), then swap
it in as the KV servicer's endpoint (`KVServicer.ep`), so the same port answers writes. Until
then it raises ReadOnly.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import asdict, dataclass, replace

import grpc

from engine import codec
from engine.core.types import Membership, NodeInfo, ReadPointUpdate, ReadView, RequestStatus
from engine.core.constants import NAMESPACE_REQUESTS
from engine.errors import InvalidArgument, ReadOnly, ReplicaBehind, SixfoldError, Unavailable
from engine.head.endpoint import EXIT_ENCRYPTION, EndpointConfig, KVServicer, prepare_process, streams_limit
from engine.head.reads import ReadPath, checked_gets
from engine.head.weakening import SAFE
from engine.head.writer import check_request_id
from engine.proto import kv_pb2, kv_pb2_grpc
from engine.security.audit import AuditLog
from engine.security.users import Authenticator, bearer
from engine.transport import convert
from engine.transport.grpc_client import CHANNEL_OPTIONS, GrpcTransport
from engine.transport.grpc_server import SHUTDOWN_GRACE_S, add_health, make_server, set_health

log = logging.getLogger("sixfold.reader")

SERVICE_NAME = "sixfold.v1.KV"
READER_WORKERS = 64
#: The most reader instances a cluster runs (Aurora: up to 15 replicas).
READERS_MAX = 15
#: What the follower asks of the writer's stream.
WATCH_MIN_INTERVAL_MS = 5
WATCH_HEARTBEAT_MS = 100
#: Back-off between reconnections to the writer.
RECONNECT_S_MIN = 0.1
RECONNECT_S_MAX = 1.0
#: How many recent updates the lag percentiles of the status cover.
LAG_WINDOW = 2048


@dataclass(frozen=True)
class ReaderOptions:
    """The bits of `WriterOptions` the read path asks of its source."""

    local_az: str = "b"
    write_timeout_s: float = 5.0


class ReplicaSource:
    """The read path's source on a reader instance (see the module docstring): the newest
    `ReadPointUpdate` adopted, and what the read path asks of it. Thread-safe."""

    def __init__(self, transport, nodes: Sequence[NodeInfo], protection_groups: int, options: ReaderOptions,
                 cipher=None) -> None:
        self.transport = transport
        self.nodes = tuple(nodes)
        self.P = protection_groups
        self.options = options
        self.cipher = cipher
        self.weakening = SAFE
        self.reads = ReadPath(self)
        self._lock = threading.Lock()
        self._advanced = threading.Condition(self._lock)
        self._update: ReadPointUpdate | None = None
        self._up: dict[str, bool] = {}
        self._scls: dict[str, tuple[int | None, ...]] = {}
        self.writer_vdl = 0  # the newest VDL any update carried
        self.heard_at: float | None = None  # monotonic time of the last update
        self.updates = 0
        self.refused_updates = 0
        #: replica lag of each recent update that brought new commits (ms): arrival here minus
        #: when the writer's VDL first moved past the previous read point (its `committed_at`)
        self.lags_ms: deque[float] = deque(maxlen=LAG_WINDOW)

    # --- adopting the writer's read point -----------------------------------------------------
    def adopt(self, u: ReadPointUpdate) -> bool:
        """Take `u` as the read point unless it would go back (an older epoch, or a lower VDL);
        True when adopted."""
        with self._lock:
            self.heard_at = time.monotonic()
            self.updates += 1
            self.writer_vdl = max(self.writer_vdl, u.vdl)
            cur = self._update
            if cur is not None and (u.epoch < cur.epoch or u.vdl < cur.vdl):
                self.refused_updates += 1
                if self.refused_updates == 1 or self.refused_updates % 1000 == 0:
                    log.warning("refused a read point that goes back: epoch %d VDL %d after epoch %d VDL %d",
                                u.epoch, u.vdl, cur.epoch, cur.vdl)
                return False
            if cur is not None and u.vdl > cur.vdl and u.epoch == cur.epoch:
                since = u.committed_at or u.sent_at
                if since > 0:
                    self.lags_ms.append(max(0.0, time.time() - since) * 1000.0)
            self._update = u
            self._up = {n: up for n, _s, up in u.members}
            self._scls = {n: s for n, s, _up in u.members}
            if cur is None or u.vdl > cur.vdl:
                self._advanced.notify_all()
            return True

    @property
    def update(self) -> ReadPointUpdate | None:
        return self._update

    def wait_read_point(self, lsn: int, timeout_s: float) -> bool:
        """Wait until the read point reaches `lsn` (at most `timeout_s`); True if it does."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self._update is None or self._update.vdl < lsn:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._advanced.wait(left)
            return True

    # --- the read path's source -----------------------------------------------------------------
    @property
    def epoch(self) -> int:
        u = self._update
        return 0 if u is None else u.epoch

    def view(self) -> ReadView:
        u = self._update
        if u is None:
            raise Unavailable("this reader has not yet learned a read point from the writer endpoint; retry shortly")
        return u.view

    def log_time_us(self) -> int:
        """The log's time the writer sent with the read point (engine.head.expiry)."""
        u = self._update
        return 0 if u is None else u.log_time_us

    def membership(self) -> Membership:
        u = self._update
        if u is None:
            raise Unavailable("this reader has not yet learned the membership from the writer endpoint")
        return u.membership

    def read_sources(self, pg: int, tail: int | None) -> tuple[Membership, list[str], list[str]]:
        """As `Writer.read_sources`: the membership, the members the writer reached, and those of
        them whose SCL reaches `tail` (the node checks again: `required_lsn`)."""
        with self._lock:
            u = self._update
            if u is None:
                raise Unavailable("this reader has not yet learned a read point from the writer endpoint")
            membership = u.membership
            up = [n for n in membership.all_nodes if self._up.get(n, False)]
            if tail is None:
                return membership, up, []
            complete = []
            for n in up:
                scl = self._scls.get(n, ())
                if pg < len(scl) and scl[pg] is not None and scl[pg] >= tail:
                    complete.append(n)
            return membership, up, complete


class ReaderEndpoint:
    """The KV operations of a reader instance (what `KVServicer` calls), over a `ReplicaSource`.
    Reads at the replica's read point; writes and admin calls refused ReadOnly."""

    def __init__(self, config: EndpointConfig, source: ReplicaSource, reader_id: str, az: str) -> None:
        self.config = config
        self.P = config.protection_groups
        self.source = source
        self.reads = source.reads
        self.reader_id = reader_id
        self.az = az
        self.follower: ReadPointFollower | None = None
        self.opened_at = time.time()
        self._pool = futures.ThreadPoolExecutor(max_workers=len(config.nodes) + 1, thread_name_prefix="reader")
        self._calls = threading.local()  # per gRPC call: the read point it read at
        self._lock = threading.Lock()
        self.stats = {"after_waits": 0, "after_timeouts": 0, "refused_writes": 0}

    def _count(self, name: str) -> None:
        with self._lock:
            self.stats[name] += 1

    def _read_only(self, what: str) -> ReadOnly:
        self._count("refused_writes")
        return ReadOnly(f"reader {self.reader_id} is a read replica: {what} goes to the writer endpoint "
                        "(engine.connect(folder), not role=\"reader\")")

    # --- refused ----------------------------------------------------------------------------
    def write_units(self, units) -> list:
        raise self._read_only("a write")

    def replace_node(self, *args, **kwargs):
        raise self._read_only("a membership change")

    def membership_status(self):
        raise self._read_only("the membership change status")

    def read_points(self, *args, **kwargs) -> Iterator[ReadPointUpdate]:
        raise self._read_only("following the read point")

    def stop_streams(self) -> None:
        pass

    # --- reads ------------------------------------------------------------------------------
    def wait_after(self, after: int) -> None:
        """Read-your-writes: wait until the read point covers commit position `after`."""
        if after <= 0:
            return
        u = self.source.update
        if u is not None and u.vdl >= after:
            return
        self._count("after_waits")
        timeout_s = self.config.write_timeout_s
        if not self.source.wait_read_point(after, timeout_s):
            self._count("after_timeouts")
            u = self.source.update
            raise ReplicaBehind(
                f"reader {self.reader_id}'s read point {u.vdl if u else 'none'} did not reach LSN {after} within "
                f"{timeout_s:g} s (the writer endpoint is down or far ahead); retry, or read from the writer")

    def check_view(self, view: ReadView | None) -> ReadView | None:
        if view is not None and view.read_point > self.source.view().read_point:
            raise InvalidArgument(
                f"read view at LSN {view.read_point} is above this reader's read point {self.source.view().read_point}: "
                "take snapshots from the same endpoint you read them from")
        return view

    def _view_for(self, view: ReadView | None) -> ReadView:
        """The view a read uses (the caller's snapshot, else the read point now), noted for the
        reply (`last_read_point`): the client's session sends it back as `after`."""
        v = self.check_view(view) or self.source.view()
        self._calls.point = v.read_point
        return v

    def last_read_point(self) -> int:
        """The read point of this thread's last read (one gRPC call runs on one thread)."""
        return getattr(self._calls, "point", 0)

    def get(self, key: bytes, quorum: bool, view: ReadView | None, after: int = 0) -> bytes | None:
        self.wait_after(after)
        return self.reads.get(key, quorum=quorum, view=self._view_for(view))

    def get_many(self, gets) -> list:
        at = self._view_for(None)
        return self.reads.get_many(checked_gets(gets, self.check_view), pool=self._pool, at=at)

    def scan(self, start: bytes, end: bytes | None, quorum: bool, view: ReadView | None, after: int = 0):
        self.wait_after(after)
        return self.reads.scan(start, end, quorum=quorum, view=self._view_for(view))

    def view(self) -> ReadView:
        return self.source.view()

    def version(self, key: bytes) -> tuple[int, bytes | None, int, int]:
        """As the writer endpoint's, at this reader's read point, judged at the log's time the
        writer sent with it (the clock: that time, or the wall clock if later)."""
        lsn, value, deadline = self.reads.version(key, view=self._view_for(None))
        now = self.source.log_time_us()
        clock = max(now, time.time_ns() // 1000)
        if value is None or (deadline and deadline <= now):
            return 0, None, 0, clock
        return lsn, value, deadline, clock

    def watch(self, prefix: bytes, start: int | None, active):
        raise ReadOnly("a watch is served by the writer endpoint (engine.connect(folder)), not by a reader")

    def hold_read_point(self, registration: int, lease_s: float, release: bool) -> tuple[ReadView | None, int, float]:
        """A snapshot on a reader: its view, held by the writer's stream READER_HOLD_S back only
        (engine.head.endpoint): registration 0, nothing to renew."""
        return (None if registration or release else self.source.view()), 0, 0.0

    def request_status(self, request_id: bytes) -> RequestStatus:
        """Whether the write under `request_id` committed at or below this reader's read point
        ("not_committed" may still commit later: ask the writer for "pending")."""
        check_request_id(request_id)
        key = request_id if self.source.cipher is None else self.source.cipher.index_key(request_id)
        r = self.reads.lookup(key, namespace=NAMESPACE_REQUESTS, what="a request-id lookup")
        if r is None or r.lsn == 0:
            return RequestStatus(request_id, "not_committed")
        return RequestStatus(request_id, "committed", r.lsn)

    # --- status -----------------------------------------------------------------------------
    def reader_status(self) -> dict:
        src = self.source
        u = src.update
        f = self.follower
        read_point = u.vdl if u else 0
        with self._lock:
            stats = dict(self.stats)
        return {
            "id": self.reader_id, "az": self.az,
            "writer_address": f.address if f else "", "connected": bool(f and f.connected),
            "read_point": read_point, "epoch": u.epoch if u else 0, "writer_vdl": src.writer_vdl,
            "lag_lsns": max(0, src.writer_vdl - read_point),
            "lag_ms": round(self._lag_ms(), 3),
            "lag_ms_p99": round(self._lag_p99_ms(), 3),
            "heard_ms": round((time.monotonic() - src.heard_at) * 1000.0, 3) if src.heard_at is not None else 0.0,
            "updates": src.updates, "reconnects": f.reconnects if f else 0,
            "after_waits": stats["after_waits"], "after_timeouts": stats["after_timeouts"],
            "refused_writes": stats["refused_writes"], "last_error": f.last_error if f else "",
        }

    def _lag_ms(self) -> float:
        """The lag of the newest commits read here (see `ReplicaSource.lags_ms`); while the
        stream is down, at least the time since the writer was last heard (reads grow stale)."""
        src = self.source
        lags = src.lags_ms
        lag = lags[-1] if lags else 0.0
        f = self.follower
        if src.heard_at is not None and not (f and f.connected):
            lag = max(lag, (time.monotonic() - src.heard_at) * 1000.0)
        return lag

    def _lag_p99_ms(self) -> float:
        lags = sorted(self.source.lags_ms)
        return lags[min(len(lags) - 1, int(0.99 * len(lags)))] if lags else 0.0

    def status(self) -> dict:
        u = self.source.update
        membership = u.membership if u else None
        addresses = getattr(self.source.transport, "addresses", None) or self.config.addresses
        ups = {n: up for n, _s, up in u.members} if u else {}
        return {
            "volume_id": self.config.volume_id,
            "protection_groups": self.P,
            "codec": codec.IMPLEMENTATION,
            "durable": self.config.durable,
            "encrypted": self.config.cipher is not None,
            "vdl": u.vdl if u else 0,
            "epoch": u.epoch if u else 0,
            "nodes": [{"id": n.id, "az": n.az, "address": addresses.get(n.id), "up": ups.get(n.id, False)}
                      for n in self.source.nodes],
            "reader": self.reader_status(),
            "endpoint": {"pid": os.getpid(), "opened_at": self.opened_at},
            "membership_change": asdict(convert.MembershipChange(
                epoch=u.epoch if u else 0, members=tuple(membership.members) if membership else (),
                next_members=tuple(membership.next_members or ()) if membership else ())),
        }

    def close(self) -> None:
        self._pool.shutdown(wait=False)


class ReadPointFollower:
    """Follows the writer endpoint's WatchReadPoint stream into a `ReplicaSource` (a thread;
    see the module docstring). `writer_address()` is asked before every (re)connection."""

    def __init__(self, source: ReplicaSource, writer_address: Callable[[], str], *, tls=None, token: str | None = None,
                 on_first: Callable[[], None] | None = None) -> None:
        self.source = source
        self._writer_address = writer_address
        self._tls = tls
        self._metadata = bearer(token) if token else None
        self._on_first = on_first
        self._stop = threading.Event()
        self._call = None
        self._thread: threading.Thread | None = None
        self.address = ""
        self.connected = False
        self.reconnects = 0
        self.last_error = ""
        self._logged = ""

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="read-point-follower", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        call = self._call
        if call is not None:
            call.cancel()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        from engine.security.tls import secure_channel

        backoff = RECONNECT_S_MIN
        first = True
        while not self._stop.is_set():
            try:
                self.address = self._writer_address()
            except SixfoldError as e:
                self._fault(f"cannot find the writer endpoint: {e}")
                self._stop.wait(RECONNECT_S_MAX)
                continue
            channel = secure_channel(self.address, self._tls, CHANNEL_OPTIONS)
            try:
                call = kv_pb2_grpc.KVStub(channel).WatchReadPoint(
                    kv_pb2.WatchReadPointRequest(min_interval_ms=WATCH_MIN_INTERVAL_MS, heartbeat_ms=WATCH_HEARTBEAT_MS),
                    metadata=self._metadata)
                self._call = call
                if self._stop.is_set():
                    call.cancel()
                for m in call:
                    u = convert.read_point_update_from_pb(m, self.source.P)
                    self.source.adopt(u)
                    if not self.connected:
                        self.connected = True
                        backoff = RECONNECT_S_MIN
                        if self._logged:
                            log.info("following the writer endpoint at %s again (epoch %d, VDL %d)", self.address, u.epoch, u.vdl)
                            self._logged = ""
                    if first:
                        first = False
                        if self._on_first is not None:
                            self._on_first()
            except grpc.RpcError as e:
                if not self._stop.is_set():
                    self._fault(str(convert.error_from_rpc(e, where=f"writer endpoint {self.address}")))
            except SixfoldError as e:  # an update that fails its checks: a bug or a foreign peer
                self._fault(f"{type(e).__name__}: {e}")
            finally:
                self.connected = False
                self._call = None
                channel.close()
            if not self._stop.is_set():
                self.reconnects += 1
            self._stop.wait(backoff)
            backoff = min(RECONNECT_S_MAX, backoff * 2)

    def _fault(self, text: str) -> None:
        self.last_error = text
        cause = text.split(":", 1)[0]
        if cause != self._logged:
            self._logged = cause
            u = self.source.update
            log.warning("lost the writer's read point stream (%s); serving at read point %s until it is back",
                        text, u.vdl if u else "none")


class ReaderProcess:
    """A reader instance: a `ReplicaSource` fed by a `ReadPointFollower`, served as the KV
    service by the same thin `KVServicer` as the writer's (see the module docstring)."""

    def __init__(self, config: EndpointConfig, reader_id: str, az: str, listen: str, writer_address: Callable[[], str], *,
                 tls=None, token: str | None = None, workers: int = READER_WORKERS, transport=None,
                 writer_tls=None, promote: bool = False, writer_az: Callable[[], str] = lambda: "",
                 on_promoted: Callable[[int], None] | None = None, preferred: Callable[[], str | None] = lambda: None,
                 rank: Callable[[], int] | None = None, refresh: Callable[[], EndpointConfig] | None = None,
                 metrics=None) -> None:
        self.config = config
        #: this process's metrics (engine.metrics.Metrics; None: not exported): get latency and
        #: errors from the KV servicer, the reader's lag, and once promoted the writer's
        self.metrics = metrics
        self.reader_id = reader_id
        self.az = az
        #: promotion (engine.head.failover): take over as the writer once its lease lapsed, with
        #: the writer identity `writer_tls` (only a writer certificate may seal); then record it
        self.promote = promote
        self.writer_tls = writer_tls
        self.writer_az = writer_az
        self.on_promoted = on_promoted
        self.preferred = preferred
        #: the volume's nodes and addresses as they are now (the manifest's): a reader started
        #: before a membership change promotes itself with the members of today, not of its start
        self.refresh = refresh
        #: the first candidate waits 0, the next half a lease more...: one promotion per failure
        #: (engine.head.failover). `rank()`: this reader's place among the cluster's live readers
        #: now (the manifest's); without it, the number in its id (r1 first)
        lease = config.lease_s or 1.0
        if rank is None:
            digits = "".join(ch for ch in reader_id if ch.isdigit())
            fixed = (int(digits) - 1 if digits else 0) % 8
            rank = lambda: fixed  # noqa: E731
        self.rank_delay_s = lambda: 0.5 * lease * min(7, max(0, rank()))
        self.writer_endpoint = None
        self.stepped_down = threading.Event()
        self._stop = threading.Event()
        self.transport = transport or GrpcTransport(config.addresses, source=reader_id, tls=tls, volume_id=config.volume_id)
        self.source = ReplicaSource(self.transport, config.nodes, config.protection_groups,
                                    ReaderOptions(local_az=az, write_timeout_s=config.write_timeout_s), cipher=config.cipher)
        self.endpoint = ReaderEndpoint(config, self.source, reader_id, az)
        self.guard = None
        if tls is not None:
            from engine.head.endpoint import kv_guard

            self.guard = kv_guard(tls)
        self.server, self.port = make_server(listen, workers, tls=tls, interceptors=(self.guard,) if self.guard else ())
        self.audit = AuditLog(config.audit_log) if config.audit_log else None
        self.auth = Authenticator(config.users_file, audit=self.audit) if config.users_file else None
        self.servicer = KVServicer(self.endpoint, self.auth, metrics)
        self.servicer.streams.limit = streams_limit(workers)
        if metrics is not None:
            metrics.watch_reader(lambda: None if self.writer_endpoint is not None else self.endpoint.reader_status())
            metrics.watch_writer(lambda: None if self.writer_endpoint is None else self.writer_endpoint.current_writer())
        kv_pb2_grpc.add_KVServicer_to_server(self.servicer, self.server)
        self.health = add_health(self.server, (SERVICE_NAME,))
        self.follower = ReadPointFollower(self.source, writer_address, tls=tls, token=token, on_first=self._serving)
        self.endpoint.follower = self.follower

    def _serving(self) -> None:
        u = self.source.update
        log.info("reader %s: first read point from the writer endpoint: epoch %d, VDL %d; SERVING",
                 self.reader_id, u.epoch, u.vdl)
        set_health(self.health, (SERVICE_NAME,), True)

    def start(self) -> None:
        self.server.start()
        if self.audit is not None:
            self.audit.start_flusher()
        self.follower.start()
        if self.promote:
            threading.Thread(target=self._watch_lease, name="promotion", daemon=True).start()

    def _watch_lease(self) -> None:
        """Wait for the writer's lease to lapse on a write quorum (another AZ than the writer's
        goes first), then take over; a lost race (StaleEpoch) or a failed open: watch again.
        Once the writer, step down if fenced in turn."""
        from engine.head.failover import LEASE_S_DEFAULT, Candidate

        candidate = Candidate(self.transport, self.config.nodes, lease_s=self.config.lease_s or LEASE_S_DEFAULT,
                              az=self.az, writer_az=self.writer_az, me=self.reader_id, preferred=self.preferred,
                              rank_delay_s=self.rank_delay_s)
        while not self._stop.is_set():
            if not candidate.wait_for_lapse(self._stop):
                return
            try:
                self.become_writer()
                break
            except SixfoldError as e:
                log.info("reader %s did not take over (%s: %s); watching the lease again", self.reader_id, type(e).__name__, e)
                self._stop.wait(0.2)
        while not self._stop.wait(0.2):
            ep = self.writer_endpoint
            if ep is not None and not ep.serving:
                log.error("stepping down: the promoted writer was fenced or stopped: %s",
                          ep.current_writer() and ep.current_writer().fenced)
                set_health(self.health, (SERVICE_NAME,), False)
                self.stepped_down.set()
                return

    def become_writer(self):
        """Promotion: open a `WriterEndpoint` over this config at a new epoch (which fences the
        old writer by the epoch rule), swap it in under the same KV servicer (this port answers
        writes from now on), stop following, record this process as the writer."""
        from engine.head.endpoint import WriterEndpoint

        signer = None
        if self.writer_tls is not None:
            from engine.security.proofs import EpochSigner

            signer = EpochSigner.from_tls(self.writer_tls)
        config = self.config
        if self.refresh is not None:
            try:
                fresh = self.refresh()
                config = replace(config, nodes=fresh.nodes, addresses=fresh.addresses)
            except Exception as e:  # noqa: BLE001 - the nodes of its start still make a writer
                log.warning("reader %s: could not re-read the volume's nodes before taking over (%s); using those "
                            "of its start", self.reader_id, e)
        transport = GrpcTransport(config.addresses, source="writer", tls=self.writer_tls,
                                  volume_id=config.volume_id, signer=signer)
        ep = WriterEndpoint(config, transport, metrics=self.metrics)
        try:
            ep.open()
        except BaseException:
            ep.close()
            raise
        self.follower.close()
        self.writer_endpoint = ep
        self.servicer.ep = ep
        log.warning("reader %s (AZ %s) took over as the writer at epoch %d", self.reader_id, self.az, ep.writer.epoch)
        set_health(self.health, (SERVICE_NAME,), True)
        if self.on_promoted is not None:
            try:
                self.on_promoted(ep.writer.epoch)
            except Exception:  # recording who is writer must not stop the writer serving
                log.exception("could not record reader %s as the writer", self.reader_id)

    def stop(self, grace_s: float = SHUTDOWN_GRACE_S) -> None:
        self._stop.set()
        set_health(self.health, (SERVICE_NAME,), False)
        self.follower.close()
        self.servicer.begin_stop()
        self.server.stop(grace_s).wait(grace_s + 1)
        if self.writer_endpoint is not None:
            self.writer_endpoint.close()
        self.endpoint.close()
        self.transport.close()
        if self.audit is not None:
            self.audit.close()


def run_reader_process(config: EndpointConfig, reader_id: str, az: str, listen: str, writer_address: Callable[[], str], *,
                       tls=None, token: str | None = None, key_file: str | None = None, promotion: dict | None = None,
                       metrics=None) -> int:
    """The body of `sixfold reader serve`: serve until SIGTERM/SIGINT; returns an exit code. An
    encrypted volume needs its master key file, as the writer does (`with_cipher`); without it
    the process logs the EncryptionError and returns EXIT_ENCRYPTION. `metrics`: the process's
    (engine.metrics, served by the caller)."""
    config, stop = prepare_process(config, key_file, log)
    if config is None:
        return EXIT_ENCRYPTION
    proc = ReaderProcess(config, reader_id, az, listen, writer_address, tls=tls, token=token, metrics=metrics,
                         **(promotion or {}))
    log.info("reader %s (AZ %s) of volume %s on %s, pid %d%s: following the writer endpoint; %s",
             reader_id, az, config.volume_id, listen, os.getpid(), " (encrypted at rest)" if config.cipher is not None else "",
             f"every call needs a token of {config.users_file}" if config.users_file else "no client authentication")
    proc.start()
    while not stop.wait(0.2):
        if proc.stepped_down.is_set():
            log.warning("reader %s: the writer it became was fenced; exiting", reader_id)
            proc.stop(grace_s=1.0)
            return 0
    log.info("reader %s: stopping", reader_id)
    proc.stop()
    return 0


__all__ = ["READERS_MAX", "ReadPointFollower", "ReaderEndpoint", "ReaderOptions", "ReaderProcess", "ReplicaSource",
           "run_reader_process"]
