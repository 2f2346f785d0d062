"""gRPC server side of a storage node: the `Storage` servicer, its fault gate and the node process.

Theory of operation
-------------------
`StorageServicer` is a thin adapter (grpc route_guide style): each RPC converts and validates
the request (`engine.transport.convert`), calls the `StorageNode` through `StorageNode.handle`
(the one error path every transport shares, which types LMDB and disk errors as StorageFull or
StorageError), converts the reply. A `SixfoldError` ends the RPC with its class's status code
and name (`convert.abort`); any other exception is a bug, logged with its traceback and answered
INTERNAL. Either way the node keeps serving: garbage in one request never takes the process down.
`AppendStream` is Append as a long-lived stream (`engine.transport.streams.StreamRegistry`): each
request gets the reply or the error status Append would have given, as a message, and the stream
stays open; the volume is checked at its open, the caller's role (so a revocation) and the fault
gate for every request (`ReadManyStream` likewise for ReadMany). At most `APPEND_STREAMS_MAX`
(`READ_STREAMS_MAX`) are open at once; stopping ends idle ones
first, so a writer's open stream never holds a node's shutdown for its grace period.

`FaultGate` applies the transport fault rules set by the admin RPC `SetFaults` to the data RPCs
this node receives (the receiving end of every link): partitions and blocked sources refuse a
request UNAVAILABLE (a caller is named by its name and by `pid:<n>`, the process id its
transport states in `sixfold-process`: a label that can only get a request refused, so it is
read with TLS too; it cuts off one process where a certificate is shared, as the writer's is by
every reader that may take over; in a partition, a caller named in some group is refused
unless one of its names is in this node's group), `drop_probability` refuses at random, `delay_ms` (+ jitter) sleeps first,
`duplicate_probability` applies an append twice. Admin callers and admin RPCs are never faulted,
so a partition can always be healed. With no rules set the gate costs one attribute read per
request. Fault injection (`Corrupt`, `SetFaults`) exists only on a node started with
`allow_fault_injection` (`sixfold cluster up --allow-fault-injection`, for chaos runs and fault
tests); elsewhere both answer UNIMPLEMENTED, as if the RPCs did not exist.

Security: with a `TlsConfig` (a secure cluster) the server speaks mutual TLS only and a
`roles.Guard` interceptor authorises every call by the role in the caller's certificate
(`roles.STORAGE_POLICY`: Append, Seal and SyncEpoch from the writer only, gossip from nodes,
reads from the writer and readers, scrub and fault injection from the admin). The caller's
name for fault rules is then its certificate's id and "admin" means the admin role: the
`sixfold-source` metadata is not read. Without TLS (`--insecure`) the metadata source is trusted,
`ADMIN_SOURCES` bypass the fault rules, and nothing is protected. Either way every port binds
where it is told, and a non-loopback address without TLS is refused (`InsecureListen`).

`run_node_process` is the `sixfold node serve` process: bind the port first (a busy port is a
clear error before any data is touched), open the node's LMDB folder, serve `Storage` and the
standard gRPC health service (SERVING once ready), run gossip and scrub over a `GrpcTransport`
to the peers, and on SIGTERM/SIGINT stop accepting, let in-flight calls finish (bounded), then
close LMDB cleanly.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Mapping
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from engine.core.types import Geometry, NodeInfo
from engine.errors import Closed, PermissionDenied, SixfoldError, Unavailable, WrongVolume
from engine.security.roles import ADMIN, STORAGE_POLICY, Guard, RevocationList
from engine.security.tls import TlsConfig
from engine.node.service import GOSSIP_INTERVAL_S, SCRUB_INTERVAL_S, StorageNode
from engine.proto import common_pb2, storage_pb2, storage_pb2_grpc
from engine.transport import convert
from engine.transport.convert import FaultRules
from engine.transport.streams import StreamRegistry

log = logging.getLogger("sixfold.node")

#: Options of every Sixfold gRPC server. `so_reuseport` off: a second server on a busy port
#: must fail to bind, not silently share the port.
SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.so_reuseport", 0),
    ("grpc.max_send_message_length", convert.MESSAGE_BYTES_MAX),
    ("grpc.max_receive_message_length", convert.MESSAGE_BYTES_MAX),
)
NODE_WORKERS = 64
#: Streams a node serves at once, each holding one of its NODE_WORKERS threads (the rest serve
#: unary calls: gossip, state, recovery): AppendStreams (a writer holds one, a writer taking over
#: briefly a second) and ReadManyStreams (the writer and each reader up to
#: grpc_client.IDLE_STREAMS_MAX, more while more reads run at once)
APPEND_STREAMS_MAX = 8
READ_STREAMS_MAX = 24
SHUTDOWN_GRACE_S = 5.0
#: Sources never subject to fault rules on an insecure node (a secure node trusts only the
#: admin role of a certificate): operators and tools must always get through.
ADMIN_SOURCES = frozenset({"cli", "chaos", "launcher", "admin"})
SERVICE_NAME = "sixfold.v1.Storage"


class AddressInUse(SixfoldError):
    """The listen address is taken by another process (never raised across gRPC)."""

    GRPC_STATUS = "UNAVAILABLE"


class InsecureListen(SixfoldError):
    """A server was asked to listen on a non-loopback address without TLS (never raised across
    gRPC): plaintext Sixfold traffic never leaves the host."""

    GRPC_STATUS = "FAILED_PRECONDITION"


def is_loopback(listen: str) -> bool:
    """True when the host part of "host:port" is a loopback address (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    host = listen.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_server(listen: str, workers: int, *, tls: TlsConfig | None = None,
                interceptors: tuple = ()) -> tuple[grpc.Server, int]:
    """A gRPC server bound to `listen` (not started): mutual TLS with `tls`, plaintext without,
    which only a loopback address may use (InsecureListen otherwise). AddressInUse if the port
    is busy."""
    if tls is None and not is_loopback(listen):
        raise InsecureListen(
            f"refusing to listen on {listen} without TLS: plaintext is for loopback only. Use a secure cluster "
            "(the default; not --insecure), or listen on 127.0.0.1"
        )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"), options=SERVER_OPTIONS,
        interceptors=tuple(interceptors),
    )
    try:
        port = server.add_secure_port(listen, tls.server_credentials()) if tls is not None else server.add_insecure_port(listen)
    except RuntimeError as e:
        raise AddressInUse(f"cannot listen on {listen}: the address is in use or invalid ({e})") from None
    if port == 0:
        raise AddressInUse(f"cannot listen on {listen}: the address is in use or invalid")
    return server, port


def add_health(server: grpc.Server, services: tuple[str, ...]) -> health.HealthServicer:
    """Register the standard health service; every name starts NOT_SERVING."""
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    for name in ("", *services):
        servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    return servicer


def set_health(servicer: health.HealthServicer, services: tuple[str, ...], serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", *services):
        servicer.set(name, status)


class FaultGate:
    """The node-side transport fault rules (see the module docstring)."""

    def __init__(self, me: str) -> None:
        self.me = me
        self.rules = FaultRules()
        self.active = False
        self._rng = random.Random(0)
        self._lock = threading.Lock()

    def set(self, rules: FaultRules) -> FaultRules:
        with self._lock:
            self.rules = rules
            self._rng = random.Random(rules.seed)
            self.active = rules.active
        log.warning("fault rules now %s", rules if rules.active else "cleared")
        return rules

    def admit(self, context: grpc.ServicerContext, duplicable: bool, guard: Guard | None = None) -> int:
        """How many times to apply the request (1, or 2 for a duplicate); raises Unavailable
        when the request is cut off or dropped. With a `guard` (TLS) the source is the caller's
        certificate id and only the admin role passes unfaulted; without, the metadata source."""
        rules = self.rules
        labelled, pid = "", ""
        for key, value in context.invocation_metadata():
            if key == convert.SOURCE_METADATA_KEY:
                labelled = value
            elif key == convert.PROCESS_METADATA_KEY:
                pid = value
        if guard is not None:
            who = guard.identity(context)
            source, privileged = who.id, who.role == ADMIN
        else:
            source = labelled
            privileged = source in ADMIN_SOURCES
        if privileged:
            return 1
        names = (source, convert.PROCESS_SOURCE_PREFIX + pid) if pid else (source,)
        blocked = next((n for n in names if n in rules.blocked_sources), None)
        if blocked is not None:
            raise Unavailable(f"node {self.me}: requests from {blocked!r} are blocked by a fault rule")
        if rules.groups:
            mine = next((g for g in rules.groups if self.me in g), ())
            named = [n for n in names if any(n in g for g in rules.groups)]
            if named and not any(n in mine for n in named):
                raise Unavailable(f"node {self.me}: partitioned from {named[0]!r} by a fault rule")
        with self._lock:
            drop = rules.drop_probability and self._rng.random() < rules.drop_probability
            dup = duplicable and rules.duplicate_probability and self._rng.random() < rules.duplicate_probability
            delay_ms = rules.delay_ms + (self._rng.uniform(0, rules.delay_jitter_ms) if rules.delay_jitter_ms else 0)
        if delay_ms:
            time.sleep(delay_ms / 1000)
        if drop:
            raise Unavailable(f"node {self.me}: request from {source!r} dropped by a fault rule")
        return 2 if dup else 1


class StorageServicer(storage_pb2_grpc.StorageServicer):
    """Thin adapter from the `Storage` service to a `StorageNode`."""

    def __init__(self, node: StorageNode, gate: FaultGate | None = None, *, guard: Guard | None = None,
                 allow_fault_injection: bool = False) -> None:
        self.node = node
        self.P = node.store.geometry.protection_groups
        self.gate = gate or FaultGate(node.id)
        self.guard = guard
        self.allow_fault_injection = allow_fault_injection
        #: who this node knows (`Directory`): set by the process that serves it (a cluster node:
        #: the manifest's processes, engine.cluster.addresses); None: itself and its peers
        self.directory: Callable[[], convert.Directory] | None = None
        self.volume_id = node.store.volume_id
        self.wrong_volume = 0  # requests refused for naming another volume, or none
        #: the writers' AppendStreams (a writer holds one per node; a few writers at a time) and
        #: the writer's and readers' ReadManyStreams (a few each)
        self.append_streams = StreamRegistry(APPEND_STREAMS_MAX)
        self.read_streams = StreamRegistry(READ_STREAMS_MAX)

    def _fault_injection(self, context, rpc: str) -> None:
        if not self.allow_fault_injection:
            context.abort(grpc.StatusCode.UNIMPLEMENTED,
                          f"{rpc} does not exist on node {self.node.id}: it was started without --allow-fault-injection")

    def _check_volume(self, context, rpc: str) -> None:
        """Storage protocol 2: the request must name this node's volume (metadata)."""
        named = None
        for key, value in context.invocation_metadata():
            if key == convert.VOLUME_METADATA_KEY:
                named = value
                break
        if named != self.volume_id:
            self.wrong_volume += 1
            if named is None:
                raise WrongVolume(f"{rpc} to node {self.node.id} names no volume: this node serves volume "
                                  f"{self.volume_id} and requires the {convert.VOLUME_METADATA_KEY!r} metadata "
                                  "(storage protocol 2; a client of an older release?)")
            raise WrongVolume(f"{rpc} for volume {named[:64]!r} refused by node {self.node.id}, which serves volume {self.volume_id}")

    def _serve(self, context, rpc: str, work: Callable[[], object], *, gated: bool = True, duplicable: bool = False):
        try:
            self._check_volume(context, rpc)
            times = self.gate.admit(context, duplicable, self.guard) if gated and self.gate.active else 1
            result = work()
            if times == 2:
                work()
            return result
        except SixfoldError as e:
            err = e
        except Exception as e:  # a bug: say so loudly, answer INTERNAL, keep serving
            log.exception("%s failed unexpectedly", rpc)
            context.abort(grpc.StatusCode.INTERNAL, f"{rpc}: internal error {type(e).__name__}: {e}")
        convert.abort(context, err)

    # --- data RPCs --------------------------------------------------------------------------
    def AppendStream(self, request_iterator, context):
        """Append as one long-lived stream (storage.proto, engine.transport.streams): a reply
        per request, in order; an error is a reply, the stream stays open."""
        yield from self._stream(request_iterator, context, "AppendStream", self.append_streams, self._append,
                                storage_pb2.AppendStreamReply, duplicable=True)

    def _append(self, request, times: int = 1) -> storage_pb2.AppendReply:
        args = convert.append_args_from_pb(request)
        reply = convert.append_reply_to_pb(self.node.handle("append", *args))
        if times == 2:
            self.node.handle("append", *args)
        return reply

    def _stream(self, request_iterator, context, rpc: str, registry: StreamRegistry, work, reply_type, *, duplicable: bool):
        """`rpc`'s requests, each answered by `work(request)` or its error as a `reply_type`
        message. The volume is checked at the open; the caller's role (so a revocation counts
        from the next request) and the fault gate for every request."""
        try:
            self._check_volume(context, rpc)
        except SixfoldError as e:
            convert.abort(context, e)
        method = f"/{SERVICE_NAME}/{rpc}"

        def one(request):
            if self.guard is not None:
                try:
                    self.guard.check(context, method)
                except SixfoldError as e:
                    self.guard._refuse(context, method, e)  # ends the stream
            try:
                if registry.closing:
                    raise Closed(f"node {self.node.id} is shutting down")
                times = self.gate.admit(context, duplicable, self.guard) if self.gate.active else 1
                return reply_type(reply=work(request, times) if duplicable else work(request))
            except SixfoldError as e:
                return reply_type(error=convert.error_to_pb(e))
            except Exception as e:  # a bug: say so loudly, answer INTERNAL, keep serving
                log.exception("%s failed unexpectedly", rpc)
                return reply_type(error=common_pb2.ErrorStatus(code="INTERNAL", message=f"{rpc}: internal error {type(e).__name__}: {e}"))

        yield from registry.serve(request_iterator, context, one,
                                  lambda ctx: convert.abort(ctx, Closed(f"node {self.node.id} is shutting down")))

    def Append(self, request, context):
        def work():
            return convert.append_reply_to_pb(self.node.handle("append", *convert.append_args_from_pb(request)))

        return self._serve(context, "Append", work, duplicable=True)

    def RepairAppend(self, request, context):
        def work():
            frame = convert.repair_append_args_from_pb(request)
            return convert.append_reply_to_pb(self.node.handle("repair_append", frame))

        return self._serve(context, "RepairAppend", work, duplicable=True)

    def Read(self, request, context):
        return self._serve(
            context, "Read", lambda: convert.read_reply_to_pb(self.node.handle("read", *convert.read_args_from_pb(request, self.P)))
        )

    def _read_many(self, request) -> storage_pb2.ReadManyReply:
        convert.check_count(len(request.reads), "reads")
        results = []
        for item in request.reads:
            try:
                results.append(self.node.handle("read", *convert.read_args_from_pb(item, self.P)))
            except SixfoldError as e:
                results.append(e)
        return convert.read_results_to_pb(results)

    def ReadMany(self, request, context):
        return self._serve(context, "ReadMany", lambda: self._read_many(request))

    def ReadManyStream(self, request_iterator, context):
        """ReadMany as a long-lived stream (as AppendStream)."""
        yield from self._stream(request_iterator, context, "ReadManyStream", self.read_streams, self._read_many,
                                storage_pb2.ReadManyStreamReply, duplicable=False)

    def Scan(self, request, context):
        def work():
            entries, resume = self.node.handle("scan", *convert.scan_args_from_pb(request, self.P))
            return convert.scan_reply_to_pb(entries, resume)

        return self._serve(context, "Scan", work)

    def Seal(self, request, context):
        return self._serve(
            context, "Seal", lambda: convert.seal_reply_to_pb(self.node.handle("seal", convert.seal_args_from_pb(request)))
        )

    def SyncEpoch(self, request, context):
        def work():
            epoch, truncations, membership = convert.sync_epoch_args_from_pb(request)
            proof, proof_epoch = b"", -1
            verifier = self.node.verifier
            if verifier is not None:  # a secure node: only what a writer signed (engine.security.proofs)
                stmt = verifier.verify(request.epoch_proof)
                said = (epoch, tuple(sorted((t.epoch, t.first, t.last) for t in truncations)),
                        None if membership is None else (membership.epoch, tuple(membership.members), membership.next_members))
                if (stmt.epoch, tuple(sorted(stmt.truncations)), stmt.membership) != said:
                    raise PermissionDenied("SyncEpoch: its epoch proof states another epoch, truncations or membership "
                                           "than the request carries")
                proof, proof_epoch = request.epoch_proof, stmt.epoch
            return convert.node_state_to_pb(self.node.handle("sync_epoch", epoch, truncations, membership, proof, proof_epoch))

        return self._serve(context, "SyncEpoch", work)

    def Fetch(self, request, context):
        def work():
            return convert.fetch_reply_to_pb(self.node.handle("fetch", *convert.fetch_args_from_pb(request, self.P)))

        return self._serve(context, "Fetch", work)

    def State(self, request, context):
        def work():
            st = self.node.handle("state")
            st.extra["security"] = self.guard.counters() if self.guard is not None else {"tls": False}
            st.extra["append_streams"] = self.append_streams.counters()
            st.extra["read_streams"] = self.read_streams.counters()
            return convert.node_state_to_pb(st)

        return self._serve(context, "State", work)

    def Directory(self, request, context):
        """Who this node knows. No volume check: the caller learns the volume here (an identity
        of the cluster still, the guard checks the certificate), and no fault gate: it is the
        operator's view, as the admin calls below."""
        try:
            if self.directory is not None:
                return convert.directory_to_pb(self.directory())
            peers = getattr(self.node.transport, "addresses", None) or {}
            me = convert.KnownProcess(self.node.id, "node", self.node.info.az, peers.get(self.node.id, ""))
            others = tuple(convert.KnownProcess(n, "node", "", a) for n, a in sorted(peers.items()) if n != self.node.id)
            return convert.directory_to_pb(convert.Directory(self.volume_id, self.node.id, (me,) + others))
        except SixfoldError as e:
            convert.abort(context, e)

    # --- admin RPCs (never faulted) ----------------------------------------------------------
    def Corrupt(self, request, context):
        self._fault_injection(context, "Corrupt")

        def work():
            lsn = self.node.handle("corrupt", *convert.corrupt_args_from_pb(request, self.P))
            return storage_pb2.CorruptReply(hit=lsn is not None, lsn=lsn or 0)

        return self._serve(context, "Corrupt", work, gated=False)

    def Scrub(self, request, context):
        def work():
            return storage_pb2.ScrubReply(corrupt_found=self.node.handle("scrub", convert.scrub_args_from_pb(request)))

        return self._serve(context, "Scrub", work, gated=False)

    def SetFaults(self, request, context):
        self._fault_injection(context, "SetFaults")
        return self._serve(
            context, "SetFaults", lambda: convert.fault_rules_to_pb(self.gate.set(convert.fault_rules_from_pb(request))), gated=False
        )


class NodeServer:
    """A `StorageNode` served over gRPC with the health service. `start()`, then `stop()`."""

    def __init__(self, node: StorageNode, server: grpc.Server, port: int, *, guard: Guard | None = None,
                 allow_fault_injection: bool = False) -> None:
        self.node = node
        self.server = server
        self.port = port
        self.guard = guard
        self.servicer = StorageServicer(node, guard=guard, allow_fault_injection=allow_fault_injection)
        storage_pb2_grpc.add_StorageServicer_to_server(self.servicer, server)
        self.health = add_health(server, (SERVICE_NAME,))

    @classmethod
    def bind(cls, node_factory: Callable[[], StorageNode], listen: str, workers: int = NODE_WORKERS, *,
             tls: TlsConfig | None = None, allow_fault_injection: bool = False, me: str = "") -> NodeServer:
        """Bind first (AddressInUse before any data is opened), then build the node. With `tls`
        the server speaks mutual TLS only and authorises calls by role (`roles.STORAGE_POLICY`)."""
        guard = None
        if tls is not None:
            guard = Guard(tls.cluster_id, STORAGE_POLICY, RevocationList(tls.revoked_path), convert.abort,
                          me=f"node {me}" if me else "")
        server, port = make_server(listen, workers, tls=tls, interceptors=(guard,) if guard else ())
        try:
            node = node_factory()
        except BaseException:
            server.stop(None)
            raise
        return cls(node, server, port, guard=guard, allow_fault_injection=allow_fault_injection)

    def start(self) -> None:
        self.server.start()
        set_health(self.health, (SERVICE_NAME,), True)

    def stop(self, grace_s: float = SHUTDOWN_GRACE_S) -> None:
        """Stop accepting calls, let in-flight ones finish (up to `grace_s`), close the node."""
        set_health(self.health, (SERVICE_NAME,), False)
        self.servicer.append_streams.close()
        self.servicer.read_streams.close()
        self.server.stop(grace_s).wait(grace_s + 1)
        self.node.close()


def peers_of(node: StorageNode, addresses: Mapping[str, str]) -> Callable[[], tuple[str, ...]]:
    """Gossip peers: the membership the node knows, else every node with an address."""

    def peers() -> tuple[str, ...]:
        m = node.store.membership
        return tuple(m.all_nodes) if m is not None else tuple(addresses)

    return peers


def run_node_process(
    *,
    node_id: str,
    az: str,
    data: str,
    listen: str,
    volume_id: str,
    protection_groups: int,
    peers: Mapping[str, str],
    durable: bool = True,
    max_storage_bytes: int | None = None,
    reserve_bytes: int | None = None,
    gossip_interval_s: float = GOSSIP_INTERVAL_S,
    scrub_interval_s: float = SCRUB_INTERVAL_S,
    workers: int = NODE_WORKERS,
    transport_factory=None,
    banner: str = "",
    tls: TlsConfig | None = None,
    allow_fault_injection: bool = False,
    metrics=None,
    directory: Callable[[], convert.Directory] | None = None,
) -> int:
    """The body of `sixfold node serve`: serve until SIGTERM/SIGINT; returns an exit code.

    `transport_factory(addresses)` makes the node's gossip transport (default: a GrpcTransport
    over the fixed `peers`, over mTLS with `tls`; a cluster node passes one that re-reads the
    manifest). `metrics` (an `engine.metrics.Metrics`, served by the caller, which binds its
    port before this opens any data): the node is exported there from the moment it opened.
    `directory`: who the node says it knows (`Storage.Directory`; default its peers)."""
    from engine.transport.grpc_client import GrpcTransport

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    # A file size limit (RLIMIT_FSIZE) must make a write fail with EFBIG, which the node answers
    # as StorageFull, not kill the process (SIGXFSZ's default action). Python ignores SIGXFSZ at
    # start-up already; this says so, and holds if an embedding program changed it.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    info = NodeInfo(node_id, az)
    geometry = Geometry(protection_groups)
    t0 = time.monotonic()
    ns = NodeServer.bind(
        lambda: StorageNode(data, info, geometry, volume_id, durable=durable, max_storage_bytes=max_storage_bytes,
                            reserve_bytes=reserve_bytes),
        listen, workers, tls=tls, allow_fault_injection=allow_fault_injection, me=node_id,
    )
    if metrics is not None:
        metrics.watch_nodes(lambda: [(node_id, ns.node)])
    addresses = {k: v for k, v in peers.items() if k != node_id}
    addresses[node_id] = listen
    transport = (transport_factory or (lambda a: GrpcTransport(a, source=node_id, tls=tls, volume_id=volume_id)))(addresses)
    ns.node.attach(transport, peers_of(ns.node, addresses))
    ns.servicer.directory = directory
    if tls is not None:  # truncations and memberships only as a writer signed them
        from engine.security.proofs import EpochVerifier

        ns.node.verifier = EpochVerifier.from_tls(tls)
    ns.start()
    if gossip_interval_s > 0:
        ns.node.start_background(gossip_interval_s, scrub_interval_s)
    st = ns.node.state()
    log.info(
        "node %s (az %s)%s serving on %s, pid %d, volume %s, %d PGs, epoch %d, %d records, %d of %d bytes used "
        "(maximum %d)%s, "
        "durable=%s, %s%s, ready in %.2f s",
        node_id, az, banner, listen, os.getpid(), volume_id, protection_groups, st.epoch, st.records, st.used_bytes,
        st.capacity_bytes, ns.node.store.max_bytes, " (low on space)" if st.space_low else "", durable,
        f"mTLS as {tls.identity}" if tls is not None else "INSECURE (plaintext, no authorisation)",
        ", fault injection allowed" if allow_fault_injection else "", time.monotonic() - t0,
    )
    while not stop.wait(1.0):
        pass
    log.info("node %s: stopping (finishing in-flight calls)", node_id)
    ns.stop()
    transport.close()
    log.info("node %s: stopped cleanly", node_id)
    return 0
