"""gRPC transport: the `Transport` interface over the `Storage` service of node processes.

Theory of operation
-------------------
`GrpcTransport(addresses, source)` keeps one channel (one HTTP/2 connection) per node, created
on first use and reused by every call, whatever thread makes it. `_call(node, method, *args)`
looks the method up in `_METHODS` (request builder, stub method, reply parser, deadline), sends
the caller's identity in the `sixfold-source` metadata and its pid in `sixfold-process` (fault
rules on the node side use them),
and converts the reply with `engine.transport.convert`.

Appends, the one hot call (every frame and heartbeat of the writer), travel on one long-lived
`AppendStream` per node instead (`engine.transport.streams`): the same request, the same reply or
error class, the same deadline (a watchdog cancels a request that outlives it; the next append
opens a new stream), the same suspect-node bookkeeping. A node that answers UNIMPLEMENTED (an
earlier release) gets unary `Append` calls from then on, as does one request that a node with no
room for another stream refused; `streams=False` turns streams off. `append_async` is the same
append for the writer's sender loop (`engine.head.senders`): grpc.aio channels and streams of
the calling event loop (kept per loop), its deadline an `asyncio.wait_for`, the same replies,
errors, suspect-node bookkeeping and unary fallbacks (those in a worker thread).

Every call has a deadline (`Deadlines`): short for appends and reads so that a paused node
(SIGSTOP: its socket accepts, nobody answers) costs a sender or a reader a bounded wait, longer
for recovery work. Deadlines are health-aware, as a circuit breaker: a node that failed to answer
is *suspect* until a call to it succeeds. While suspect, one call per `probe_interval_s` goes
through as a probe with the short `suspect_deadline_s`; every other call fails at once with
`Unavailable`, so a reader falls over to another segment immediately instead of each of many
reads waiting on the same dead node. Admin calls are never refused. Channels reconnect with a
short, capped backoff so a restarted node is used again within a second.

Security: with a `TlsConfig` (`engine.security.tls`) every channel is mutual TLS with that
identity's certificate, and the node authorises each call by the certificate's role (the
`sixfold-source` metadata then only labels the call). A transport re-checks its TLS files at most
once a second; when a rotation replaced them it builds new channels for the next calls and closes
the old ones after `OLD_CHANNEL_GRACE_S`, so calls in flight finish. Without `tls` channels are
plaintext, as before (in-process tests, `--insecure` clusters).

Errors: a Sixfold error raised on the node arrives as the same class (`convert.error_from_rpc`);
anything that says the node could not be reached or did not answer in time, and a node that is
shutting down (`Closed`), is `Unavailable`, as the interface promises.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import grpc

from engine.core.types import Membership, ReadReply, TruncationRange
from engine.errors import Closed, NodeNotFound, SixfoldError, Unavailable
from engine.proto import storage_pb2, storage_pb2_grpc
from engine.security.tls import TlsConfig, aio_channel, secure_channel
from engine.transport import convert
from engine.transport.base import Transport
from engine.transport.streams import Stream

log = logging.getLogger("sixfold.transport")

#: After a credential reload, old channels are closed this long after the switch (longer than any
#: call's deadline, so nothing in flight is cut off).
OLD_CHANNEL_GRACE_S = 60.0

#: Options of every client channel: big messages (frames), quick reconnects, no hidden retries.
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_send_message_length", convert.MESSAGE_BYTES_MAX),
    ("grpc.max_receive_message_length", convert.MESSAGE_BYTES_MAX),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.enable_retries", 0),
    # Each channel gets its own connection even to the same address (no sharing across
    # transports), so one transport's broken connection is not another's.
    ("grpc.use_local_subchannel_pool", 1),
)


@dataclass(frozen=True)
class Deadlines:
    """Per-call deadlines, in seconds, by kind of call."""

    append_s: float = 2.0
    read_s: float = 2.0
    recovery_s: float = 10.0  # seal, sync_epoch
    fetch_s: float = 10.0
    state_s: float = 2.0
    admin_s: float = 30.0  # corrupt, scrub, set_faults
    #: extra time per MiB of frame carried (a 64 MiB frame on a busy box needs more than 2 s)
    per_mib_s: float = 0.05
    #: after a node failed to answer it is *suspect* until a call succeeds: one call per
    #: `probe_interval_s` goes through, with this short deadline; the others fail at once
    suspect_deadline_s: float = 0.5
    probe_interval_s: float = 0.25


@dataclass(frozen=True)
class _Method:
    rpc: str
    build: object  # (*args) -> request message
    parse: object  # reply message -> value
    kind: str  # which Deadlines field
    frame_arg: int | None = None  # position of a frame argument whose size scales the deadline
    stream: str | None = None  # the hot call's long-lived stream (engine.transport.streams), if any


_METHODS: dict[str, _Method] = {
    "append": _Method("Append", convert.append_request_to_pb, convert.append_reply_from_pb, "append_s", frame_arg=1,
                      stream="AppendStream"),
    "repair_append": _Method(
        "RepairAppend", lambda frame: storage_pb2.RepairAppendRequest(frame=frame), convert.append_reply_from_pb, "append_s", frame_arg=0
    ),
    "read": _Method("Read", convert.read_request_to_pb, convert.read_reply_from_pb, "read_s"),
    "read_many": _Method("ReadMany", lambda items: convert.read_many_request_to_pb(items), convert.read_results_from_pb, "read_s",
                         stream="ReadManyStream"),
    "scan": _Method("Scan", convert.scan_request_to_pb, convert.scan_reply_from_pb, "read_s"),
    "seal": _Method("Seal", lambda epoch: storage_pb2.SealRequest(epoch=epoch), convert.seal_reply_from_pb, "recovery_s"),
    "sync_epoch": _Method("SyncEpoch", convert.sync_epoch_request_to_pb, convert.node_state_from_pb, "recovery_s"),
    "fetch": _Method("Fetch", convert.fetch_request_to_pb, convert.fetch_reply_from_pb, "fetch_s"),
    "state": _Method("State", lambda: storage_pb2.StateRequest(), convert.node_state_from_pb, "state_s"),
    "corrupt": _Method(
        "Corrupt", convert.corrupt_request_to_pb, lambda m: m.lsn if m.hit else None, "admin_s"
    ),
    "scrub": _Method("Scrub", lambda records_max: storage_pb2.ScrubRequest(records_max=records_max), lambda m: m.corrupt_found, "admin_s"),
    "set_faults": _Method("SetFaults", convert.fault_rules_to_pb, convert.fault_rules_from_pb, "admin_s"),
}


@dataclass
class _AioStreams:
    """One event loop's grpc.aio channels and append streams (`GrpcTransport.append_async`):
    grpc.aio objects belong to the loop that made them."""

    channels: dict = field(default_factory=dict)  # node -> (credential generation, grpc.aio.Channel)
    calls: dict = field(default_factory=dict)  # node -> its open AppendStream call


class _StreamEnded(Exception):
    """The node ended an append stream without a reply (and without an error status)."""


#: Idle streams kept per node and kind: an append stream is used by the node's one sender
#: thread; read streams by the reads in flight at once (more are opened, then closed, when more
#: run in parallel)
IDLE_STREAMS_MAX = 4


class GrpcTransport(Transport):
    """Calls to node processes over gRPC on behalf of `source` ("writer", a node id, "cli"...)."""

    def __init__(
        self,
        addresses: Mapping[str, str],
        source: str = "writer",
        *,
        deadlines: Deadlines = Deadlines(),
        channel_options: Sequence[tuple[str, object]] = (),
        tls: TlsConfig | None = None,
        volume_id: str | None = None,
        signer=None,
        streams: bool = True,
    ) -> None:
        self.addresses = dict(addresses)
        #: the volume every request names (storage protocol 2); nodes refuse requests without it
        self.volume_id = volume_id
        #: the writer's EpochSigner (engine.security.proofs) in a secure cluster: every SyncEpoch
        #: carries its signed statement, which nodes require and hand on by gossip
        self.signer = signer
        self.source = source
        self.tls = tls
        self.deadlines = deadlines
        self._options = CHANNEL_OPTIONS + tuple(channel_options)
        self._metadata = ((convert.SOURCE_METADATA_KEY, source), (convert.PROCESS_METADATA_KEY, str(os.getpid()))) + (
            ((convert.VOLUME_METADATA_KEY, volume_id),) if volume_id else ()
        )
        self._lock = threading.Lock()
        self._channels: dict[str, grpc.Channel] = {}
        self._stubs: dict[str, storage_pb2_grpc.StorageStub] = {}
        #: node -> when the last call to it started while it was suspect (absent: healthy)
        self._suspect: dict[str, float] = {}
        self._closed = False
        #: appends travel on one AppendStream per node (`streams=False`: unary Append calls);
        #: a node that answered UNIMPLEMENTED (an earlier release) gets unary calls
        self._use_streams = streams
        #: (node, stream rpc) -> its idle streams; (node, stream rpc) pairs served unary only
        self._idle: dict[tuple[str, str], list[Stream]] = {}
        self._unary_only: set[tuple[str, str]] = set()
        #: event loop -> its aio append streams (append_async); bumped on a credential reload
        self._aio_by_loop: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._generation = 0

    def _reload_credentials(self) -> None:
        """The TLS files changed (a rotation): new channels from now on; the old ones are closed
        once calls in flight on them are done."""
        with self._lock:
            old, self._channels, self._stubs = self._channels, {}, {}
            self._generation += 1  # every loop's aio channels are renewed at their next append
        if old:
            timer = threading.Timer(OLD_CHANNEL_GRACE_S, lambda: [ch.close() for ch in old.values()])
            timer.daemon = True
            timer.start()

    def _stub(self, node: str) -> storage_pb2_grpc.StorageStub:
        if self.tls is not None and self.tls.changed():
            self._reload_credentials()
        stub = self._stubs.get(node)
        if stub is not None:
            return stub
        with self._lock:
            if self._closed:
                raise Closed("this transport is closed")
            if node not in self.addresses:
                raise NodeNotFound(f"no address for node {node!r}; known: {', '.join(sorted(self.addresses))}")
            if node not in self._stubs:
                channel = secure_channel(self.addresses[node], self.tls, self._options)
                self._channels[node] = channel
                self._stubs[node] = storage_pb2_grpc.StorageStub(channel)
            return self._stubs[node]

    def _admit(self, node: str, spec: _Method) -> float | None:
        """The deadline for a call to `node` now, or None to fail it at once (see the module
        docstring: a suspect node gets one short probe per `probe_interval_s`)."""
        d = self.deadlines
        deadline = getattr(d, spec.kind)
        if node in self._suspect and spec.kind != "admin_s":
            with self._lock:
                last_probe = self._suspect.get(node)
                if last_probe is not None:
                    now = time.monotonic()
                    if now - last_probe < d.probe_interval_s:
                        return None
                    self._suspect[node] = now
                    deadline = min(deadline, d.suspect_deadline_s)
        return deadline

    def _call(self, node: str, method: str, *args):
        spec = _METHODS.get(method)
        assert spec is not None, f"unknown transport method {method!r}"
        if spec.stream is not None and self._use_streams and (node, spec.stream) not in self._unary_only:
            return self._streamed(node, spec, args)
        return self._unary(node, spec, args)

    def _unary(self, node: str, spec: _Method, args: tuple):
        stub = self._stub(node)
        timeout = self._admit(node, spec)
        if timeout is None:
            raise Unavailable(f"node {node} ({self.addresses.get(node)}) did not answer lately; not waiting on it again yet")
        if spec.frame_arg is not None:
            timeout += len(args[spec.frame_arg]) / (1 << 20) * self.deadlines.per_mib_s
        request = spec.build(*args)
        try:
            reply = getattr(stub, spec.rpc)(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            err = convert.error_from_rpc(e, where=f"node {node} ({self.addresses.get(node)})")
            with self._lock:
                if isinstance(err, Closed) or convert.unreachable(e):
                    self._suspect.setdefault(node, time.monotonic())
                else:  # the node answered (with an error): it is alive, e.g. EpochBehind asks for a sync
                    self._suspect.pop(node, None)
            if isinstance(err, Closed):
                err = Unavailable(f"node {node} is shutting down ({err})")
            raise err from None
        except ValueError as e:  # "Cannot invoke RPC on closed channel!"
            raise Unavailable(f"node {node}: {e}") from None
        if node in self._suspect:
            with self._lock:
                self._suspect.pop(node, None)
        return spec.parse(reply)

    # --- the hot calls' streams --------------------------------------------------------------
    def _checkout(self, node: str, rpc: str) -> Stream:
        """An idle stream of `rpc` to `node` (usable, on the current channel), else a new one.
        The caller owns it until `_checkin`: a stream carries one request at a time."""
        stub = self._stub(node)
        with self._lock:
            if self._closed:
                raise Closed("this transport is closed")
            channel = self._channels.get(node)
            idle = self._idle.setdefault((node, rpc), [])
            while idle:
                stream = idle.pop()
                if stream.usable() and stream.tag is channel:
                    return stream
                stream.cancel()  # ended, or on a channel a credential reload retired
        return Stream(getattr(stub, rpc), self._metadata, tag=channel)

    def _checkin(self, node: str, rpc: str, stream: Stream) -> None:
        with self._lock:
            idle = self._idle.setdefault((node, rpc), [])
            if not self._closed and len(idle) < IDLE_STREAMS_MAX:
                idle.append(stream)
                return
        stream.cancel()

    def _streamed(self, node: str, spec: _Method, args: tuple):
        """A hot call on a stream: the same results and errors as the unary call, and the same
        suspect-node bookkeeping (`_admit`)."""
        timeout = self._admit(node, spec)
        if timeout is None:
            raise Unavailable(f"node {node} ({self.addresses.get(node)}) did not answer lately; not waiting on it again yet")
        if spec.frame_arg is not None:
            timeout += len(args[spec.frame_arg]) / (1 << 20) * self.deadlines.per_mib_s
        request = spec.build(*args)
        where = f"node {node} ({self.addresses.get(node)})"
        stream = self._checkout(node, spec.stream)
        try:
            reply = stream.exchange(request, timeout)
        except (grpc.RpcError, StopIteration, ValueError) as e:  # the stream is given up (Stream.exchange)
            err = self._stream_failure(node, spec.stream, stream.timed_out, e, where, timeout)
            if err is None:  # an earlier release, or no room for a stream: a unary call
                return self._unary(node, spec, args)
            raise err from None
        self._checkin(node, spec.stream, stream)
        return self._stream_reply(node, spec, reply)

    def _stream_reply(self, node: str, spec: _Method, reply):
        """The value of a stream's reply, or the error it carries (raised)."""
        if reply.HasField("error"):
            err = convert.error_from_pb(reply.error)
            with self._lock:
                if isinstance(err, Closed):
                    self._suspect.setdefault(node, time.monotonic())
                else:  # the node answered: it is alive
                    self._suspect.pop(node, None)
            if isinstance(err, Closed):
                raise Unavailable(f"node {node} is shutting down ({err})")
            raise err
        if node in self._suspect:
            with self._lock:
                self._suspect.pop(node, None)
        return spec.parse(reply.reply)

    def _stream_failure(self, node: str, rpc: str, timed_out: bool, e: BaseException, where: str, timeout: float):
        """The error to raise for a stream that ended under a request (None: send it as a unary
        call: the node serves no such stream, from now on, or had no room for another)."""
        if isinstance(e, grpc.RpcError):
            err = convert.error_from_rpc(e, where=where)
            if Stream.unimplemented(e, convert.ERROR_METADATA_KEY):
                log.info("%s serves no %s (an earlier release): unary calls from now on", where, rpc)
                self._unary_only.add((node, rpc))
                return None
            if Stream.refused_for_room(e):
                return None
            answered = not (timed_out or isinstance(err, Closed) or convert.unreachable(e))
            if timed_out:
                err = Unavailable(f"{where}: no reply within {timeout:.2f} s")
        else:
            err, answered = Unavailable(f"{where}: the append stream ended ({type(e).__name__}: {e})"), False
        with self._lock:
            if answered:
                self._suspect.pop(node, None)
            else:
                self._suspect.setdefault(node, time.monotonic())
        if isinstance(err, Closed):
            err = Unavailable(f"node {node} is shutting down ({err})")
        return err

    # --- appends from an event loop (engine.head.senders) ------------------------------------
    async def append_async(self, node: str, epoch: int, frame: bytes, hint_lsn: int, collect_lsn: int = 0,
                           collect_requests_lsn: int = 0):
        """`append` for a coroutine of the writer's sender loop (`engine.head.senders`): the same
        request on the same AppendStream, the same deadline, reply, errors and suspect-node
        bookkeeping as `_streamed`, but on grpc.aio, so no thread of its own carries it. What
        is not the stream (streams off, a node of an earlier release, one with no room for
        another stream) is the unary call, in a worker thread."""
        spec = _METHODS["append"]
        args = (epoch, frame, hint_lsn, collect_lsn, collect_requests_lsn)
        if not self._use_streams or (node, spec.stream) in self._unary_only:
            return await asyncio.to_thread(self._unary, node, spec, args)
        timeout = self._admit(node, spec)
        if timeout is None:
            raise Unavailable(f"node {node} ({self.addresses.get(node)}) did not answer lately; not waiting on it again yet")
        timeout += len(frame) / (1 << 20) * self.deadlines.per_mib_s
        request = spec.build(*args)
        where = f"node {node} ({self.addresses.get(node)})"
        streams, call = await self._aio_call(node, spec.stream)
        try:
            reply = await asyncio.wait_for(self._aio_exchange(call, request), timeout)
        except asyncio.TimeoutError:
            self._aio_drop(streams, node, call)
            with self._lock:
                self._suspect.setdefault(node, time.monotonic())
            raise Unavailable(f"{where}: no reply within {timeout:.2f} s") from None
        except (grpc.RpcError, grpc.aio.UsageError, grpc.aio.InternalError, ValueError, _StreamEnded) as e:
            self._aio_drop(streams, node, call)
            err = self._stream_failure(node, spec.stream, False, StopIteration(str(e)) if isinstance(e, _StreamEnded) else e,
                                       where, timeout)
            if err is None:  # an earlier release, or no room for a stream: a unary call
                return await asyncio.to_thread(self._unary, node, spec, args)
            raise err from None
        except BaseException:  # cancelled: a reply may still be on its way, never take it for the next one
            self._aio_drop(streams, node, call)
            raise
        return self._stream_reply(node, spec, reply)

    @staticmethod
    async def _aio_exchange(call, request):
        await call.write(request)
        reply = await call.read()  # raises the call's error status, if it ended with one
        if reply is grpc.aio.EOF:
            raise _StreamEnded("the node ended the append stream")
        return reply

    async def _aio_call(self, node: str, rpc: str):
        """This loop's open `rpc` stream to `node` (a new one on a new channel after a
        credential reload, or when the last one ended)."""
        if self.tls is not None and self.tls.changed():
            self._reload_credentials()
        if self._closed:
            raise Closed("this transport is closed")
        if node not in self.addresses:
            raise NodeNotFound(f"no address for node {node!r}; known: {', '.join(sorted(self.addresses))}")
        loop = asyncio.get_running_loop()
        streams = self._aio_by_loop.get(loop)
        if streams is None:
            streams = self._aio_by_loop[loop] = _AioStreams()
        held = streams.channels.get(node)
        if held is not None and held[0] != self._generation:  # retired by a credential reload
            del streams.channels[node]
            old = streams.calls.pop(node, None)
            if old is not None:
                old.cancel()
            await held[1].close()
            held = None
        if held is None:
            held = streams.channels[node] = (self._generation, aio_channel(self.addresses[node], self.tls, self._options))
        call = streams.calls.get(node)
        if call is None or call.done():
            call = streams.calls[node] = getattr(storage_pb2_grpc.StorageStub(held[1]), rpc)(metadata=self._metadata)
        return streams, call

    @staticmethod
    def _aio_drop(streams: _AioStreams, node: str, call) -> None:
        if streams.calls.get(node) is call:
            del streams.calls[node]
        call.cancel()

    async def close_async(self) -> None:
        """Close the calling loop's aio streams and channels (its sender loop ends)."""
        streams = self._aio_by_loop.pop(asyncio.get_running_loop(), None)
        if streams is None:
            return
        for call in streams.calls.values():
            call.cancel()
        for _generation, channel in streams.channels.values():
            await channel.close()

    # --- operations beyond the Transport interface -----------------------------------------
    def read_many(self, node: str, items: Sequence[tuple[int, bytes, int, int, int]]) -> list[ReadReply | SixfoldError]:
        """Many reads (pg, key, read_point, required_lsn, epoch) in one RPC; a result per item."""
        return self._call(node, "read_many", items)

    def scrub(self, node: str, records_max: int = 0) -> int:
        """Admin: scrub now; returns the corrupt records found."""
        return self._call(node, "scrub", records_max)

    def set_faults(self, node: str, rules: convert.FaultRules) -> convert.FaultRules:
        """Admin: replace the node's transport fault rules (FaultRules() clears them)."""
        return self._call(node, "set_faults", rules)

    def sync_epoch(self, node: str, epoch: int, truncations: Sequence[TruncationRange], membership: Membership | None):
        proof = self.signer.proof(epoch, truncations, membership) if self.signer is not None else b""
        return self._call(node, "sync_epoch", epoch, tuple(truncations), membership, proof)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            channels, self._channels, self._stubs = self._channels, {}, {}
            streams, self._idle = [st for idle in self._idle.values() for st in idle], {}
        for stream in streams:
            stream.cancel()
        for ch in channels.values():
            ch.close()


class _ClientCallDetails(grpc.ClientCallDetails):
    def __init__(self, details, metadata):
        self.method = details.method
        self.timeout = details.timeout
        self.metadata = metadata
        self.credentials = details.credentials
        self.wait_for_ready = getattr(details, "wait_for_ready", None)
        self.compression = getattr(details, "compression", None)


class VolumeMetadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds the volume a storage request names (storage protocol 2) to every call on a channel:
    `grpc.intercept_channel(channel, VolumeMetadata(volume_id))`, for tools and tests that use
    the `Storage` stubs directly rather than a GrpcTransport."""

    def __init__(self, volume_id: str) -> None:
        self._pair = (convert.VOLUME_METADATA_KEY, volume_id)

    def _details(self, details):
        return _ClientCallDetails(details, tuple(details.metadata or ()) + (self._pair,))

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)
