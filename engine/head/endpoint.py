"""The writer endpoint: the volume's single `Writer` served over gRPC as the `KV` service.

Theory of operation
-------------------
The endpoint process builds a `Writer` over a `GrpcTransport` to the six node processes, runs
its recovery (`open()`), then serves the key-value API. Until recovery succeeds (it needs a write
quorum of nodes) the endpoint keeps retrying, reports NOT_SERVING on the health service and
answers every KV call `Unavailable`, so a launcher or a client can wait for it.

Batching is the point of this module. A Python gRPC server handles a few thousand small calls a
second, so clients coalesce concurrent operations into one call (`engine.client`'s boxcar) and
this side keeps them together:

* `Write` carries many atomic units. Every unit is `submit`ted to the writer first (each takes
  its LSNs and joins the shared tail), and only then are they waited for: the whole RPC rides one
  group commit. Each unit gets its own result: a bad unit is refused alone (`InvalidArgument`,
  nothing logged) and a unit that timed out is `WriteIndeterminate` alone.
* `GetMany` goes through the writer's read path (`engine.head.reads.ReadPath.get_many`, the one
  the embedded engine uses): one read point for all its gets, one `ReadMany` per node, nodes in
  parallel on this endpoint's pool, a quorum read for what no complete segment answers.

Reader instances (`engine.head.replica`) follow `WatchReadPoint`: a stream of the writer's read
point (`WriterEndpoint.read_points`: an update when the VDL moves, coalesced, and a heartbeat),
and `Get`/`GetMany`/`Scan` take `after`, a commit position the read must cover (here at once:
the VDL covers every acknowledged write). The same `KVServicer` serves a reader instance's
`ReaderEndpoint`.

Membership change (`ReplaceNode`, `MembershipStatus`, admin RPCs): the RPC validates the request
and runs the one change driver (`engine.head.membership.MembershipChange`) with this endpoint as
its host: the new node's address is learned (pushed by the caller, which started the node), epoch
step 1 runs before the RPC answers, so a refusal comes back as the RPC's error; a background
thread then polls the driver to step 2 (or the revert). Callers poll `MembershipStatus` for
progress. The change lives in the writer's membership (on the nodes), not in this process: an
endpoint restarted mid-change recovers the two quorum sets, and asking again for the same change
resumes it.

The servicer (`KVServicer`) is thin: convert, call `WriterEndpoint`, convert back. Before
that, in one place (`KVServicer._admit`, called by `_serve` and `Scan`), it checks the caller
when the endpoint has a users file (`EndpointConfig.users_file`): the bearer token of the call's
metadata must name a user whose role allows the RPC (`engine.security.users.Authenticator`: a
stat of the file, a SHA-256 and a dict lookup, a few microseconds; `Unauthenticated` or
`PermissionDenied` otherwise, before anything is done). Refusals go to the audit log
(`EndpointConfig.audit_log`, summarised when they flood) and are counted. Without a users file
(an endpoint built in-process by a test or a benchmark) every call is admitted.

Metrics (`engine.metrics`): the servicer observes put latency per unit of a `Write` (the RPC's
time: its units share one group commit) and get latency per get, and counts every error it
returns by class; the `Writer` observes each frame it sends (given the endpoint's `metrics`);
the writer's status is exported at scrape time (`run_writer_process` registers it). The caller
serves the process's `Metrics` over HTTP.

Encryption at rest (`engine.envelope`): an encrypted cluster's manifest holds the volume's data
key wrapped by the master key (`EndpointConfig.encryption`). `run_writer_process` reads the
master key from the key file it is given (`writer serve --key-file F`), unwraps the data key and
puts the `VolumeCipher` in the config before anything is served; the `Writer` seals values and
hashes keys with it, so the nodes only ever see ciphertext. No key file, an unreadable one or a
wrong key is an `EncryptionError` logged on one line, and the process exits (code 3) at once, so
the launcher reports it instead of waiting for a writer that never serves. The data key then
lives only in this process's memory: re-wrapping it under a new master key (`sixfold cluster
rekey`) needs no restart.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent import futures
from dataclasses import asdict, dataclass, field, replace

import grpc

from engine import codec
from engine.core.types import Geometry, NodeInfo, ReadPointUpdate, RequestStatus, Unit
from engine.errors import EncryptionError, InvalidArgument, ReplicaBehind, SixfoldError, Unavailable
from engine.head.failover import LEASE_S_DEFAULT, Candidate
from engine.head.membership import ACTIVE_PHASES, MembershipChange
from engine.head.readpoints import VdlHistory
from engine.head.reads import checked_gets
from engine.head.watch import WatchCursor
from engine.head.writer import ReadView, Writer, WriterOptions, node_status
from engine.metrics import Metrics
from engine.proto import common_pb2, kv_pb2, kv_pb2_grpc
from engine.security.audit import AuditLog
from engine.security.users import Authenticator
from engine.transport import convert
from engine.transport.grpc_client import GrpcTransport
from engine.transport.grpc_server import SHUTDOWN_GRACE_S, add_health, make_server, set_health
from engine.transport.streams import StreamRegistry

log = logging.getLogger("sixfold.writer")

ENDPOINT_WORKERS = 128
#: Client streams (WriteStream, GetManyStream) served at once, by default: each holds one of the
#: server's threads, so a server takes at most three quarters of its workers' worth
#: (`streams_limit`); beyond it a client's requests go as unary calls
KV_STREAMS_MAX = 96


def streams_limit(workers: int) -> int:
    """How many client streams a KV server of `workers` threads serves at once."""
    return max(1, workers * 3 // 4)


#: changes per Watch batch (whole units), and the most time between batches of a live watch
WATCH_BATCH_MAX = 1_000
#: How long a new writer endpoint holds collection at the point the nodes had (EndpointConfig.
#: resume_grace_s): a client following a failover finds the new writer within about a second of
#: its open (it asks the nodes and readers for it), and its watches and remote snapshots then
#: register again; ten seconds cover that on a loaded machine, and keep at most ten seconds more
#: of superseded versions on the nodes.
RESUME_GRACE_S = 10.0
#: A Watch stream holds version collection at the position it sent this long ago (its client
#: may not have taken in the last batches when the stream breaks, and resumes from the last it
#: did), and for WATCH_LINGER_S after the stream ends (a client resumes on a new stream, to this
#: writer or, within RESUME_GRACE_S of its open, to the next); the reader streams' READER_HOLD_S
#: and READER_LEASE_S, for the same reasons.
WATCH_HOLD_BACK_S = 10.0
WATCH_LINGER_S = 30.0
WATCH_HEARTBEAT_S = 1.0
SERVICE_NAME = "sixfold.v1.KV"
#: Pairs and bytes per streamed scan message.
SCAN_CHUNK_PAIRS = 256
SCAN_CHUNK_BYTES = 1 << 20
OPEN_RETRY_S = 0.5
#: A membership change whose new node has not caught up after this long is reported failed
#: (it stays open; asking again resumes the wait).
REPLACE_TIMEOUT_S_DEFAULT = 120.0
#: A WatchReadPoint stream holds its reader's read points this far back against version
#: collection, for this long after it ends (engine.head.readpoints).
READER_HOLD_S = 10.0
READER_LEASE_S = 30.0


@dataclass(frozen=True)
class EndpointConfig:
    """What the writer endpoint needs to know of its volume (from the cluster manifest)."""

    volume_id: str
    protection_groups: int
    nodes: tuple[NodeInfo, ...]
    addresses: Mapping[str, str] = field(default_factory=dict)
    durable: bool = True
    write_timeout_s: float = 5.0
    local_az: str = "a"
    #: The users file whose tokens and roles every KV call must satisfy; None: no check.
    users_file: str | None = None
    #: Where refused calls are recorded (JSON lines, `engine.security.audit`); None: not recorded.
    audit_log: str | None = None
    #: an encrypted volume's descriptor (the manifest's "encryption": the wrapped data key)
    encryption: Mapping | None = None
    #: its cipher (`engine.envelope.VolumeCipher`), built from the key file by run_writer_process
    cipher: object | None = field(default=None, repr=False, compare=False)
    #: the writer lease (engine.head.failover); None: none (reads are not lease-fenced)
    lease_s: float | None = LEASE_S_DEFAULT
    #: back the volume up continuously into this folder (engine.backup.archiver; the manifest's
    #: "backup"); every writer endpoint of the volume, a promoted reader's too, continues it
    backup: str | None = None
    backup_retention_days: float | None = None
    #: who this process says it knows (`KV.Directory`, `convert.Directory`): a process started
    #: from a cluster manifest or spec gets every process the file names
    #: (engine.cluster.addresses.ManifestDirectory); None: the nodes above
    directory: Callable[[], object] | None = field(default=None, repr=False, compare=False)
    #: for this long after it opens, the writer collects nothing above what the nodes had
    #: collected already: watches and remote snapshots that follow a failover register again
    #: in that time (WriterOptions.resume_grace_s, RESUME_GRACE_S says why)
    resume_grace_s: float = RESUME_GRACE_S


class WriterEndpoint:
    """The writer plus the batched operations the KV servicer calls. Thread-safe."""

    def __init__(self, config: EndpointConfig, transport=None, *, metrics: Metrics | None = None) -> None:
        self.config = config
        #: this process's metrics (engine.metrics): every writer it opens observes its flushes there
        self.metrics = metrics
        self.geometry = Geometry(config.protection_groups)
        self.P = config.protection_groups
        self.transport = transport or GrpcTransport(config.addresses, source="writer", volume_id=config.volume_id)
        self._writer: Writer | None = None
        self._pool = futures.ThreadPoolExecutor(max_workers=len(config.nodes) + 1, thread_name_prefix="endpoint")
        self.last_open_error = ""
        self.opened_at: float | None = None
        #: the nodes this endpoint knows: the configured ones, plus a node added by ReplaceNode,
        #: minus the node a completed change removed
        self.nodes: list[NodeInfo] = list(config.nodes)
        self._change: MembershipChange | None = None
        self._change_lock = threading.Lock()
        self._stopping = threading.Event()
        #: the archiver (engine.backup.archiver) when the volume is backed up
        self.archiver = None

    # --- lifecycle --------------------------------------------------------------------------
    def open(self) -> None:
        """Recover the volume once (raises if no write quorum answers)."""
        w = Writer(
            self.transport,
            self.nodes,
            self.geometry,
            WriterOptions(write_timeout_s=self.config.write_timeout_s, local_az=self.config.local_az,
                          lease_s=self.config.lease_s, resume_grace_s=self.config.resume_grace_s),
            cipher=self.config.cipher,
            metrics=self.metrics,
        )
        # The archiver's hold on version collection, before the writer's first heartbeat (engine.backup.archiver)
        hold = w.read_points.register("backup archiver", 0) if self.config.backup is not None else None
        w.open()
        try:
            self._attach_archiver(w, hold)  # before any write: commit times continue the archive's
        except BaseException:
            w.abandon()
            raise
        self._writer = w
        self.opened_at = time.time()

    def _attach_archiver(self, w: Writer, hold: int | None = None) -> None:
        """Continue the volume's archive with this writer (a BackupError is logged and the
        writer serves without backups: refusing writes would not bring the archive back)."""
        if self.config.backup is None:
            return
        from engine.backup.archiver import Archiver, BackupOptions

        if self.archiver is None:
            self.archiver = Archiver(self.config.backup, volume_id=self.config.volume_id, protection_groups=self.P,
                                     encryption=dict(self.config.encryption) if self.config.encryption else None,
                                     options=BackupOptions(retention_days=self.config.backup_retention_days))
        try:
            self.archiver.attach(w, hold)
        except SixfoldError as e:
            log.error("backup to %s cannot continue: %s: %s", self.config.backup, type(e).__name__, e)
            self.archiver.record_error(e)  # status shows it (state "idle", last_error)
            return
        self.archiver.start()

    def open_with_retry(self, stop: threading.Event, timeout_s: float | None = None) -> bool:
        """Retry recovery until it succeeds, `stop` is set or `timeout_s` passes."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        attempt = 0
        while not stop.is_set():
            attempt += 1
            try:
                self.open()
                return True
            except SixfoldError as e:
                self.last_open_error = f"{type(e).__name__}: {e}"
                if attempt == 1:
                    log.info("waiting for a write quorum of nodes (%s)", self.last_open_error)
                elif attempt % 20 == 0:
                    log.warning("recovery attempt %d failed (%s); retrying", attempt, self.last_open_error)
            if deadline is not None and time.monotonic() >= deadline:
                return False
            stop.wait(OPEN_RETRY_S)
        return False

    @property
    def writer(self) -> Writer:
        w = self._writer
        if w is None:
            detail = f" (last attempt: {self.last_open_error})" if self.last_open_error else ""
            raise Unavailable(f"the writer endpoint is still recovering the volume{detail}; retry shortly")
        return w

    @property
    def serving(self) -> bool:
        w = self._writer
        return w is not None and w.serving

    def close(self) -> None:
        self._stopping.set()
        w, self._writer = self._writer, None
        if self.archiver is not None:
            self.archiver.close(flush=w is not None and w.serving)
        if w is not None:
            w.close()
        self._pool.shutdown(wait=False)
        self.transport.close()

    # --- writes -----------------------------------------------------------------------------
    def write_units(self, units: Sequence[Unit | tuple | SixfoldError]) -> list[int | SixfoldError]:
        """Log every unit (already validated ops, or the error that refused it): submit all, then
        wait for all, so they share group commits. A result per unit: its CPL LSN or its error."""
        w = self.writer
        timeout_s = w.options.write_timeout_s
        results: list[int | SixfoldError | None] = [None] * len(units)
        pending = []
        refused: SixfoldError | None = None  # once the writer refuses for lack of quorum/room, the rest are refused too
        for i, unit in enumerate(units):
            if isinstance(unit, SixfoldError):
                results[i] = unit
                continue
            if refused is not None:
                results[i] = convert.fresh(refused)
                continue
            try:
                if isinstance(unit, Unit):
                    lsn, waiter = w.submit(unit.ops, request_id=unit.request_id, resend=unit.resend, conditions=unit.conditions)
                else:
                    lsn, waiter = w.submit(unit)
                pending.append((i, lsn, waiter, time.monotonic() + timeout_s))
            except SixfoldError as e:
                results[i] = e
                if not isinstance(e, InvalidArgument):  # a bad unit is refused alone
                    refused = e
        # Each unit gets the full write timeout from its own submit, as a lone write would.
        for i, lsn, waiter, deadline in pending:
            try:
                w.wait(lsn, waiter, timeout_s=max(0.0, deadline - time.monotonic()))
                results[i] = waiter.lsn  # the ticket knows its CPL LSN once sequenced
            except SixfoldError as e:
                results[i] = e
        return results  # type: ignore[return-value]

    # --- reads ------------------------------------------------------------------------------
    def check_view(self, view: ReadView | None) -> ReadView | None:
        """A client's snapshot view must not read above what is durable now."""
        if view is not None and view.read_point > self.writer.ledger.vdl:
            raise InvalidArgument(
                f"read view at LSN {view.read_point} is above the volume's VDL {self.writer.ledger.vdl}: "
                "it was not taken from this volume"
            )
        return view

    def get(self, key: bytes, quorum: bool, view: ReadView | None, after: int = 0) -> bytes | None:
        self.wait_after(after)
        return self.writer.get(key, quorum=quorum, view=self.check_view(view))

    def wait_after(self, after: int) -> None:
        """Read-your-writes on the writer: its VDL already covers every commit it acknowledged,
        so this returns at once unless `after` is ahead of it (a position of another volume, or
        one still becoming durable): then it waits, bounded by the write timeout, and raises
        ReplicaBehind if the VDL does not reach it."""
        if after <= 0:
            return
        w = self.writer
        if w.ledger.vdl >= after:
            return
        vdl = w.wait_vdl(after - 1, self.config.write_timeout_s)
        if vdl < after:
            raise ReplicaBehind(f"the writer's VDL {vdl} did not reach LSN {after} within {self.config.write_timeout_s:g} s "
                                "(was that position given by this volume?)")

    def watch(self, prefix: bytes, start: int | None, active) -> Iterator[tuple[list, int]]:
        """Batches of (changes under `prefix`, position) while `active()`: a batch when there
        are changes, and at least every WATCH_HEARTBEAT_S one that only moves the position.
        From the writer's memory, or from the nodes' logs when `start` is older than that
        (`engine.head.watch`); the watch holds version collection back until it ends."""
        w = self.writer
        position = w.view().read_point if start is None else start
        cursor = WatchCursor(w, position, hold_back=VdlHistory(WATCH_HOLD_BACK_S))
        try:
            last_sent = time.monotonic()
            yield [], position
            while active():
                changes, nxt = cursor.next(WATCH_BATCH_MAX)
                mine = [c for c in changes if c[1].startswith(prefix)]
                if mine or (nxt != position and time.monotonic() - last_sent >= WATCH_HEARTBEAT_S):
                    yield mine, nxt
                    last_sent = time.monotonic()
                if nxt == position:
                    w.wait_vdl(position, WATCH_HEARTBEAT_S)
                position = nxt
        finally:
            cursor.close(linger_s=WATCH_LINGER_S)

    def version(self, key: bytes) -> tuple[int, bytes | None, int, int]:
        """(lsn, value, deadline, clock) of the key's newest live version (lsn 0: none)."""
        w = self.writer
        lsn, value, deadline = w.reads.version(key)
        if value is None or (deadline and deadline <= w.log_time_us()):
            return 0, None, 0, w.clock_us()
        return lsn, value, deadline, w.clock_us()

    def request_status(self, request_id: bytes) -> RequestStatus:
        return self.writer.request_status(request_id)

    def read_points(self, min_interval_s: float, heartbeat_s: float, active) -> Iterator[ReadPointUpdate]:
        """The writer's read point as it advances (the WatchReadPoint stream): an update as soon
        as the VDL moves, at most one per `min_interval_s` (what moved meanwhile rides the next
        one), and one every `heartbeat_s` when nothing moves. Ends when `active()` turns false
        or the endpoint stops; raises what a read would (Unavailable, StaleEpoch) if the writer
        stops serving."""
        last_vdl = -1
        last_sent = float("-inf")
        # The reader serves at the read points it was sent: the stream holds them against version
        # collection, READER_HOLD_S back (a reader's scan may read that far behind), and the
        # registration lapses READER_LEASE_S after the stream ends (the reader keeps serving at
        # its last point while it reconnects).
        held, reg, behind = None, 0, VdlHistory(READER_HOLD_S)
        while active() and not self._stopping.is_set():
            w = self.writer
            left = heartbeat_s - (time.monotonic() - last_sent)
            if left > 0:
                w.wait_vdl(last_vdl, left)
            u = w.read_point(time.time())
            hold = behind.at(time.monotonic(), u.vdl)
            if held is not w:
                held, reg = w, w.read_points.register("reader stream", max(hold, w.read_points.issued), READER_LEASE_S)
            else:
                w.read_points.renew(reg, lsn=max(hold, w.read_points.issued))
            if last_vdl >= 0 and u.vdl > last_vdl:
                u = replace(u, committed_at=w.durable_since(last_vdl))
            last_vdl, last_sent = u.vdl, time.monotonic()
            yield u
            self._stopping.wait(min_interval_s)

    def stop_streams(self) -> None:
        """End every WatchReadPoint stream (before a shutdown, so none holds the server's grace)."""
        self._stopping.set()

    def get_many(self, gets: Sequence[tuple[bytes, bool, ReadView | None] | SixfoldError]) -> list[bytes | None | SixfoldError]:
        """Many gets, one result each: the writer's read path (`ReadPath.get_many`), nodes asked
        in parallel. A snapshot view the volume did not give is refused for that get alone."""
        return self.writer.reads.get_many(checked_gets(gets, self.check_view), pool=self._pool)

    def scan(self, start: bytes, end: bytes | None, quorum: bool, view: ReadView | None,
             after: int = 0) -> Iterator[tuple[bytes, bytes]]:
        self.wait_after(after)
        return self.writer.scan(start, end, quorum=quorum, view=self.check_view(view))

    def view(self) -> ReadView:
        return self.writer.view()

    def hold_read_point(self, registration: int, lease_s: float, release: bool) -> tuple[ReadView | None, int, float]:
        """A remote snapshot's hold on its read point (engine.head.readpoints): a new one at the
        current view (registration 0), a renewal, or a release."""
        points = self.writer.read_points
        if release:
            points.release(registration)
            return None, registration, 0.0
        if registration:
            points.renew(registration, lease_s)
            return None, registration, lease_s
        view, reg = self.writer.open_snapshot("remote snapshot", lease_s)
        return view, reg, lease_s

    # --- membership change ------------------------------------------------------------------
    def replace_node(self, old: str, new: str, new_address: str, new_az: str, timeout_s: float = 0.0) -> convert.MembershipChange:
        """Begin replacing `old` by `new` (the one driver, `engine.head.membership`); returns the
        change's state once epoch step 1 is done. The rest runs in a background thread."""
        timeout_s = timeout_s or REPLACE_TIMEOUT_S_DEFAULT
        with self._change_lock:
            c = self._change
            if c is not None and c.phase in ACTIVE_PHASES:
                if (c.old, c.new) != (old, new):
                    raise InvalidArgument(f"a membership change is under way ({c.old} -> {c.new}); wait for it to end")
                return self._change_state(c)
            c = MembershipChange(self, old, new, new_az, new_address, timeout_s=timeout_s).begin()
            self._change = c
            if c.phase in ACTIVE_PHASES:
                threading.Thread(target=c.run, args=(self._stopping,), name="membership-change", daemon=True).start()
            return self._change_state(c)

    def membership_status(self) -> convert.MembershipChange:
        with self._change_lock:
            c = self._change
        return self._change_state(c)

    # The ChangeHost of engine.head.membership:
    def current_writer(self) -> Writer | None:
        return self._writer

    def add_node(self, info: NodeInfo, address: str | None) -> bool:
        """From now on reach `info` at `address` (the transport and the writer's node list)."""
        addresses = getattr(self.transport, "addresses", None)
        if isinstance(addresses, dict) and address:
            addresses[info.id] = address
        added = all(n.id != info.id for n in self.nodes)
        if added:
            self.nodes.append(info)
        if self._writer is not None:
            self._writer.nodes = tuple(self.nodes)
        return added

    def retire_node(self, node_id: str) -> None:
        """`node_id` left (the launcher stops its process and marks it retired)."""
        self.nodes = [n for n in self.nodes if n.id != node_id]
        if self._writer is not None:
            self._writer.nodes = tuple(self.nodes)

    def _change_state(self, c: MembershipChange | None) -> convert.MembershipChange:
        w = self.writer
        m = w.membership()
        epoch = w.epoch
        common = dict(epoch=epoch, members=tuple(m.members), next_members=tuple(m.next_members or ()))
        if c is None:
            return convert.MembershipChange(**common)
        fetched = 0
        if c.phase in ACTIVE_PHASES:
            try:
                fetched = int(self.transport.state(c.new).extra.get("rebuild", {}).get("fetched_records", 0))
            except SixfoldError:
                pass
        # "committing" (step 2 taken, not yet known to a write quorum) is still under way for the
        # wire's phases: the caller keeps polling
        phase = "rebuilding" if c.phase == "committing" else c.phase
        return convert.MembershipChange(
            phase=phase, old=c.old, new=c.new, fraction=min(1.0, max(0.0, c.fraction)), fetched_records=fetched,
            lag=c.lag, seconds=c.seconds, error=c.error, **common,
        )

    # --- status -----------------------------------------------------------------------------
    def status(self) -> dict:
        w = self.writer
        ws = w.status()

        def node_entry(info: NodeInfo) -> dict:
            addresses = getattr(self.transport, "addresses", None) or self.config.addresses
            entry = {"id": info.id, "az": info.az, "address": addresses.get(info.id), "up": False}
            try:
                st = self.transport.state(info.id)
            except SixfoldError as e:
                entry["error"] = str(e)
                return entry
            entry.update(up=True, **node_status(st, ws["pgcl"]))
            return entry

        nodes = list(self._pool.map(node_entry, list(self.nodes)))
        with self._change_lock:
            change = self._change
        return {
            "volume_id": self.config.volume_id,
            "protection_groups": self.P,
            "codec": codec.IMPLEMENTATION,
            "durable": self.config.durable,
            "encrypted": self.config.cipher is not None,
            "vdl": ws["vdl"],
            "epoch": ws["epoch"],
            "nodes": nodes,
            "writer": ws,
            "endpoint": {"pid": os.getpid(), "opened_at": self.opened_at},
            "membership_change": asdict(self._change_state(change)),
            **({"backup": self.archiver.status()} if self.archiver is not None else {}),
        }


class KVServicer(kv_pb2_grpc.KVServicer):
    """Thin adapter from the `KV` service to a `WriterEndpoint`; with an `auth`, every call must
    first be admitted by it (see the module docstring)."""

    def __init__(self, endpoint: WriterEndpoint, auth: Authenticator | None = None, metrics: Metrics | None = None) -> None:
        self.ep = endpoint
        self.P = endpoint.P
        self.auth = auth
        #: put and get latency, errors returned by class (engine.metrics); the process's, which
        #: outlives a reader's promotion (the endpoint behind `ep` changes, the servicer stays)
        self.metrics = metrics if metrics is not None else Metrics()
        #: the clients' WriteStreams and GetManyStreams (each holds one server thread)
        self.streams = StreamRegistry(KV_STREAMS_MAX)
        #: set by `begin_stop`: every request from then on is refused, undone, with Unavailable
        self.stopping = False

    def begin_stop(self) -> None:
        """The first step of a shutdown, before the gRPC server's stop: refuse every request
        from now on with Unavailable ("nothing was done"), then end the idle streams.

        In this order, a client whose idle stream is ended under a request it had just sent
        (which then comes back as a broken call, its fate unknown) finds this process no longer
        answering even a view, so `engine.connect(folder)` follows the writer and re-sends the
        write there under its request id, instead of taking a live writer's refusal for an
        answer (a planned failover lost its in-flight writes to WriteIndeterminate that way)."""
        self.stopping = True
        self.streams.close()

    def _admit(self, context, rpc: str) -> None:
        """Unavailable once the server stops (`begin_stop`); Unauthenticated / PermissionDenied
        unless the caller's token and role allow `rpc`."""
        if self.stopping:
            raise Unavailable(f"{rpc}: this endpoint is shutting down; nothing was done")
        if self.auth is not None:
            self.auth.admit(context.peer(), context.invocation_metadata(), rpc)

    def _serve(self, context, rpc: str, work):
        try:
            self._admit(context, rpc)
            return work()
        except SixfoldError as e:
            err = e
        except Exception as e:  # a bug: log it, answer INTERNAL, keep serving
            log.exception("%s failed unexpectedly", rpc)
            self.metrics.count_error(e)
            context.abort(grpc.StatusCode.INTERNAL, f"{rpc}: internal error {type(e).__name__}: {e}")
        self.metrics.count_error(err)
        convert.abort(context, err)

    def _write(self, request) -> kv_pb2.WriteReply:
        convert.check_count(len(request.units), "units")
        units = []
        for u in request.units:
            try:
                units.append(convert.unit_from_pb(u))
            except SixfoldError as e:
                units.append(e)
        t0 = time.perf_counter()
        results = self.ep.write_units(units)
        # The request's units share one group commit, and its time.
        self.metrics.observe_each(self.metrics.observe_put, results, time.perf_counter() - t0)
        return convert.write_results_to_pb(results)

    def Write(self, request, context):
        return self._serve(context, "Write", lambda: self._write(request))

    def WriteStream(self, request_iterator, context):
        yield from self._stream(request_iterator, context, "Write", self._write, kv_pb2.WriteStreamReply)

    def GetManyStream(self, request_iterator, context):
        yield from self._stream(request_iterator, context, "GetMany", self._get_many, kv_pb2.GetManyStreamReply)

    def _stream(self, request_iterator, context, rpc: str, work, reply_type):
        """`rpc` as a long-lived stream (kv.proto, engine.transport.streams): admitted as `rpc`
        when it opens and again for every request (a removed token counts from the next one);
        each request's reply or error is a message, and the stream stays open."""
        try:
            self._admit(context, rpc)
        except SixfoldError as e:
            self.metrics.count_error(e)
            convert.abort(context, e)

        def one(request):
            try:
                self._admit(context, rpc)
                return reply_type(reply=work(request))
            except SixfoldError as e:
                self.metrics.count_error(e)
                return reply_type(error=convert.error_to_pb(e))
            except Exception as e:  # a bug: log it, answer INTERNAL, keep serving
                log.exception("%s (stream) failed unexpectedly", rpc)
                self.metrics.count_error(e)
                return reply_type(error=common_pb2.ErrorStatus(
                    code="INTERNAL", message=f"{rpc}: internal error {type(e).__name__}: {e}"))

        yield from self.streams.serve(request_iterator, context, one,
                                      lambda ctx: convert.abort(ctx, Unavailable("the endpoint is shutting down; nothing was done")))

    def Directory(self, request, context):
        def work():
            config = self.ep.config
            if config.directory is not None:
                return convert.directory_to_pb(config.directory())
            nodes = tuple(convert.KnownProcess(n.id, "node", n.az, config.addresses[n.id])
                          for n in config.nodes if config.addresses.get(n.id))
            return convert.directory_to_pb(convert.Directory(config.volume_id, "", nodes))

        return self._serve(context, "Directory", work)

    def StatusOf(self, request, context):
        return self._serve(
            context, "StatusOf",
            lambda: convert.request_status_to_pb(self.ep.request_status(convert.status_of_args_from_pb(request))),
        )

    def _read_point(self) -> int:
        """The read point of this call's read on a reader instance (0 on the writer endpoint)."""
        last = getattr(self.ep, "last_read_point", None)
        return last() if last is not None else 0

    def Get(self, request, context):
        def work():
            t0 = time.perf_counter()
            value = self.ep.get(*convert.get_args_from_pb(request, self.P), after=convert.after_from_pb(request))
            self.metrics.observe_get(time.perf_counter() - t0)
            reply = convert.get_reply_to_pb(value)
            reply.read_point = self._read_point()
            return reply

        return self._serve(context, "Get", work)

    def Version(self, request, context):
        def work():
            return convert.version_reply_to_pb(*self.ep.version(convert.version_key_from_pb(request)))

        return self._serve(context, "Version", work)

    def _get_many(self, request) -> kv_pb2.GetManyReply:
        convert.check_count(len(request.gets), "gets")
        t0 = time.perf_counter()
        self.ep.wait_after(max((convert.after_from_pb(g) for g in request.gets), default=0))
        gets = []
        for g in request.gets:
            try:
                gets.append(convert.get_args_from_pb(g, self.P))
            except SixfoldError as e:
                gets.append(e)
        results = self.ep.get_many(gets)
        self.metrics.observe_each(self.metrics.observe_get, results, time.perf_counter() - t0)
        reply = convert.get_results_to_pb(results)
        reply.read_point = self._read_point()
        return reply

    def GetMany(self, request, context):
        return self._serve(context, "GetMany", lambda: self._get_many(request))

    def _serve_stream(self, context, rpc: str, produce):
        """A server-streaming RPC: `_serve` for generators (admit first; a Sixfold error ends
        the stream with its status, anything else is a bug answered INTERNAL)."""
        try:
            self._admit(context, rpc)
            yield from produce()
            return
        except SixfoldError as e:
            err = e
        except Exception as e:
            log.exception("%s failed unexpectedly", rpc)
            self.metrics.count_error(e)
            context.abort(grpc.StatusCode.INTERNAL, f"{rpc}: internal error {type(e).__name__}: {e}")
        self.metrics.count_error(err)
        convert.abort(context, err)

    def Scan(self, request, context):
        def chunks():
            pairs = self.ep.scan(*convert.kv_scan_args_from_pb(request, self.P), after=convert.after_from_pb(request))
            point = self._read_point()
            chunk: list[tuple[bytes, bytes]] = []
            size = 0
            for k, v in pairs:
                chunk.append((k, v))
                size += len(k) + len(v)
                if len(chunk) >= SCAN_CHUNK_PAIRS or size >= SCAN_CHUNK_BYTES:
                    m = convert.scan_chunk_to_pb(chunk)
                    m.read_point = point
                    yield m
                    chunk, size = [], 0
            m = convert.scan_chunk_to_pb(chunk)
            m.read_point = point
            if chunk or point:
                yield m  # on a reader, the point arrives even for an empty scan

        yield from self._serve_stream(context, "Scan", chunks)

    def View(self, request, context):
        return self._serve(context, "View", lambda: convert.read_view_to_pb(self.ep.view()))

    def HoldReadPoint(self, request, context):
        return self._serve(
            context, "HoldReadPoint", lambda: convert.hold_reply_to_pb(*self.ep.hold_read_point(*convert.hold_args_from_pb(request)))
        )

    def Status(self, request, context):
        def work():
            st = self.ep.status()
            if self.auth is not None:
                st["endpoint"]["auth"] = self.auth.counters()
            return convert.status_to_pb(st)

        return self._serve(context, "Status", work)

    def ReplaceNode(self, request, context):
        return self._serve(
            context, "ReplaceNode",
            lambda: convert.membership_change_to_pb(self.ep.replace_node(*convert.replace_node_args_from_pb(request))),
        )

    def MembershipStatus(self, request, context):
        return self._serve(context, "MembershipStatus", lambda: convert.membership_change_to_pb(self.ep.membership_status()))

    def Watch(self, request, context):
        def batches():
            prefix, start = convert.watch_args_of_pb(request)
            for changes, position in self.ep.watch(prefix, start, context.is_active):
                yield convert.watch_batch_to_pb(changes, position)

        yield from self._serve_stream(context, "Watch", batches)

    def WatchReadPoint(self, request, context):
        def updates():
            min_interval_s, heartbeat_s = convert.watch_args_from_pb(request)
            for u in self.ep.read_points(min_interval_s, heartbeat_s, context.is_active):
                yield convert.read_point_update_to_pb(u)

        yield from self._serve_stream(context, "WatchReadPoint", updates)


class EndpointServer:
    """A `WriterEndpoint` served over gRPC with the health service."""

    def __init__(self, endpoint: WriterEndpoint, listen: str, workers: int = ENDPOINT_WORKERS, *, tls=None,
                 metrics: Metrics | None = None) -> None:
        self.endpoint = endpoint
        # With TLS (engine.security.tls.TlsConfig): mutual TLS only, calls authorised by the role
        # of the client certificate (engine.security.roles.KV_POLICY); with a users file, by the
        # role of the caller's token too (engine.security.users).
        self.guard = kv_guard(tls) if tls is not None else None
        self.server, self.port = make_server(listen, workers, tls=tls, interceptors=(self.guard,) if self.guard else ())
        config = endpoint.config
        self.audit = AuditLog(config.audit_log) if config.audit_log else None
        self.auth = Authenticator(config.users_file, audit=self.audit) if config.users_file else None
        self.servicer = KVServicer(endpoint, self.auth, metrics if metrics is not None else endpoint.metrics)
        self.servicer.streams.limit = streams_limit(workers)
        kv_pb2_grpc.add_KVServicer_to_server(self.servicer, self.server)
        self.health = add_health(self.server, (SERVICE_NAME,))
        self._stop = threading.Event()
        self._watch: threading.Thread | None = None
        #: set when the writer, once serving, was fenced or stopped: the process steps down
        self.stepped_down = threading.Event()
        #: a standby (engine.head.failover.Candidate): opens only once the writer's lease lapsed
        self.candidate = None
        #: called once this endpoint serves as the writer (a standby that took over records it)
        self.on_serving = None

    def start(self, *, recover: bool = True, timeout_s: float | None = None) -> None:
        """Start serving; recover the volume (in the background unless `timeout_s` is given,
        which waits for recovery and raises Unavailable if it does not succeed in time)."""
        self.server.start()
        if self.audit is not None:
            self.audit.start_flusher()
        if not recover:
            return
        if timeout_s is not None:
            if not self.endpoint.open_with_retry(self._stop, timeout_s):
                raise Unavailable(f"writer endpoint could not recover the volume: {self.endpoint.last_open_error}")
            self._on_open()
            return
        self._watch = threading.Thread(target=self._recover, name="endpoint-recovery", daemon=True)
        self._watch.start()

    def _recover(self) -> None:
        opened = self._take_over() if self.candidate is not None else self.endpoint.open_with_retry(self._stop)
        if opened:
            self._on_open()
            while not self._stop.wait(0.2):  # a fenced writer steps down
                if not self.endpoint.serving:
                    set_health(self.health, (SERVICE_NAME,), False)
                    w = self.endpoint.current_writer()
                    log.error("stepping down: the writer was fenced or stopped: %s", w and w.fenced)
                    self.stepped_down.set()
                    return

    def _take_over(self) -> bool:
        """A standby: wait for the writer's lease to lapse, then open at a new epoch (which fences
        the old writer). If another candidate won the race (StaleEpoch) or the open failed, watch
        again: never open while a writer holds the lease."""
        while not self._stop.is_set():
            if not self.candidate.wait_for_lapse(self._stop):
                return False
            try:
                self.endpoint.open()
                log.warning("took over as the writer at epoch %d", self.endpoint.writer.epoch)
                return True
            except SixfoldError as e:
                self.endpoint.last_open_error = f"{type(e).__name__}: {e}"
                log.info("did not take over (%s); watching the lease again", self.endpoint.last_open_error)
                self._stop.wait(0.2)
        return False

    def _on_open(self) -> None:
        w = self.endpoint.writer
        log.info("volume %s recovered: %s", self.endpoint.config.volume_id, w.recovery)
        if self.on_serving is not None:
            try:
                self.on_serving(w.epoch)
            except Exception:  # recording who is writer must not stop the writer serving
                log.exception("could not record this endpoint as the writer")
        set_health(self.health, (SERVICE_NAME,), True)

    def stop(self, grace_s: float = SHUTDOWN_GRACE_S) -> None:
        self._stop.set()
        self.endpoint.stop_streams()
        self.servicer.begin_stop()
        set_health(self.health, (SERVICE_NAME,), False)
        self.server.stop(grace_s).wait(grace_s + 1)
        self.endpoint.close()
        if self.audit is not None:
            self.audit.close()


def _audit(server: EndpointServer, action: str, target: str) -> None:
    if server.audit is not None:
        try:
            server.audit.record(action, identity="process:writer", target=target, auth=server.auth is not None)
        except OSError as e:
            log.warning("could not write the audit log: %s", e)


def kv_guard(tls):
    from engine.security.roles import KV_POLICY, Guard, RevocationList

    return Guard(tls.cluster_id, KV_POLICY, RevocationList(tls.revoked_path), convert.abort, me="writer endpoint")


#: The exit code of a writer endpoint that cannot open its volume's encryption (engine.cli's 3).
EXIT_ENCRYPTION = 3


def with_cipher(config: EndpointConfig, key_file: str | None) -> EndpointConfig:
    """`config` with the cipher of its encrypted volume, from the master key in `key_file`.
    EncryptionError (or InvalidArgument for a file that holds no key) when the key file is
    missing, unreadable or not this volume's key, or is given for a plain volume."""
    from engine.envelope import VolumeCipher, key_file_is_private, read_key_file, unwrap

    if config.encryption is None:
        if key_file is not None:
            raise EncryptionError(f"volume {config.volume_id} is not encrypted (encryption is chosen when a cluster is "
                                  "created); start its writer without --key-file")
        return config
    if key_file is None:
        raise EncryptionError(f"volume {config.volume_id} is encrypted: start its writer with --key-file F "
                              "(the master key file given to `sixfold cluster up --encrypt`)")
    master = read_key_file(key_file)
    if not key_file_is_private(key_file):
        log.warning("the key file %s can be read by other users (chmod 600 it)", key_file)
    cipher = VolumeCipher(unwrap(config.encryption, master, config.volume_id), config.volume_id)
    return replace(config, cipher=cipher)


#: The exit code of a writer endpoint that stepped down (fenced by a newer writer, or stopped).
EXIT_STEPPED_DOWN = 0


def prepare_process(config: EndpointConfig, key_file: str | None, logger=None):
    """What a writer or reader process does first: the cipher of an encrypted volume from
    `key_file` (None, logged, when it cannot: the caller exits EXIT_ENCRYPTION) and a stop event
    set by SIGTERM/SIGINT. Returns (config, stop) or (None, None)."""
    try:
        config = with_cipher(config, key_file)
    except (EncryptionError, InvalidArgument) as e:
        (logger or log).error("cannot open the volume's encryption: %s: %s", type(e).__name__, e)
        return None, None
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return config, stop


def run_writer_process(config: EndpointConfig, listen: str, workers: int = ENDPOINT_WORKERS, *, tls=None,
                       key_file: str | None = None, standby: bool = False, writer_az=None, on_serving=None,
                       metrics: Metrics | None = None, open_new: bool = False) -> int:
    """The body of `sixfold writer serve`: serve until SIGTERM/SIGINT; returns an exit code.
    With `tls` the KV server and the transport to the nodes are mutual TLS as the writer. An
    encrypted volume's master key comes from `key_file` (see the module docstring); without it,
    or with a wrong one, the process logs the EncryptionError and returns EXIT_ENCRYPTION.
    `metrics` (engine.metrics, served by the caller): the process's, which the writer and the
    KV servicer fill and which export the writer's status at every scrape. `standby`: open
    only once the writer's lease lapsed (`open_new`: or the volume was never opened; a
    deployment spec's writer, engine.head.failover.Candidate)."""
    config, stop = prepare_process(config, key_file)
    if config is None:
        return EXIT_ENCRYPTION
    transport = None
    if tls is not None:  # mTLS, and every SyncEpoch signed (engine.security.proofs)
        from engine.security.proofs import EpochSigner

        transport = GrpcTransport(config.addresses, source="writer", tls=tls, volume_id=config.volume_id,
                                  signer=EpochSigner.from_tls(tls))
    endpoint = WriterEndpoint(config, transport, metrics=metrics)
    if metrics is not None:
        metrics.watch_writer(endpoint.current_writer)
    server = EndpointServer(endpoint, listen, workers, tls=tls)
    server.on_serving = on_serving
    if standby:  # take over only once the writer's lease lapsed (engine.head.failover)
        server.candidate = Candidate(endpoint.transport, config.nodes, lease_s=config.lease_s or LEASE_S_DEFAULT,
                                     az=config.local_az, writer_az=writer_az or (lambda: ""), open_new=open_new)
    log.info(
        "writer endpoint for volume %s on %s, pid %d%s: recovering over nodes %s; %s",
        config.volume_id, listen, os.getpid(), " (encrypted at rest)" if config.cipher is not None else "",
        ", ".join(f"{n.id}={config.addresses.get(n.id)}" for n in config.nodes),
        f"every call needs a token of {config.users_file}" if config.users_file else "no client authentication",
    )
    server.start()
    _audit(server, "writer start", listen)
    while not stop.wait(0.2):
        if server.stepped_down.is_set():
            log.warning("writer endpoint: stepped down (a newer writer holds the volume); exiting")
            _audit(server, "writer step down", listen)
            server.stop(grace_s=1.0)
            return EXIT_STEPPED_DOWN
    log.info("writer endpoint: stopping (finishing in-flight calls)")
    _audit(server, "writer stop", listen)
    server.stop()
    log.info("writer endpoint: stopped cleanly")
    return 0

