"""`engine.connect`: the key-value API of a running cluster, over gRPC to its writer endpoint.

Theory of operation
-------------------
`connect(target)` returns the same `Database` as `engine.open`, over a `RemoteBackend` instead
of an embedded volume: same methods, same inputs checked before anything is sent, same error
classes (the endpoint sends each error's class name; `engine.transport.convert` raises it again).

A Python gRPC server answers a few thousand small calls a second, far below what the writer's
group commit can absorb, so the backend never sends one call per operation under load. It uses
a *boxcar* (`Boxcar`): concurrent `write`s from many threads are coalesced into shared `Write`
RPCs, concurrent `get`s into shared `GetMany` RPCs. At most `cars_in_flight` RPCs of each kind
are in flight at a time; whoever arrives while they are busy waits for the next car, which leaves
as soon as a car returns, carrying everyone who queued meanwhile (up to `car_items_max` items and
`car_bytes_max` bytes). So a lone caller pays one RPC, and 64 concurrent callers pay a couple of
RPCs per round trip instead of 64. Every item carries its own status: one bad unit never fails
its neighbours, and each caller gets its own result or its own exception object.

Security: a cluster folder of a secure cluster (`"tls": true` in cluster.json) is reached over
mutual TLS as the folder's operator identity (`tls/admin.pem`); `connect("host:port",
tls=TlsConfig(...))` names another identity, and a plain "host:port" is plaintext.

Authentication: every RPC carries the caller's token in its metadata (`authorization: Bearer
<token>`, `engine.security.users.bearer`). `connect(target, token=...)` takes it; without one it
uses `$SIXFOLD_TOKEN`, else, for a cluster folder, the local operator's `DIR/operator.token`
(`default_token`), else none. A missing, wrong or removed token raises `Unauthenticated`, a role
that does not allow the call `PermissionDenied`; either way the endpoint did nothing.

The reader endpoint: `connect(folder, role="reader")` reaches the cluster's reader instances
(`engine.head.replica`) instead of its writer: one channel to every reader the manifest lists
(`ipv4:h:p1,h:p2,...`) with gRPC's own `round_robin` load-balancing policy, so reads spread over
the readers and gRPC itself drops a reader whose connection fails and reconnects it later. A
read that fails because a reader died under it (no Sixfold answer: the connection broke) is sent
again, for up to `READ_RETRY_S`: reads change nothing, so a retry is always safe, and the next
pick is another reader. Writes through it are refused `ReadOnly`.

Snapshots hold their read point against version collection (`engine.head.readpoints`): a
snapshot registers its view with the writer (`HoldReadPoint`) for a lease, and one renewer thread
per backend (`Renewer`) renews every open snapshot's lease a third of it before it runs out; closing
the snapshot releases it. A snapshot whose renewal is refused (the writer changed) is dropped from
the renewer and logged; its reads then meet SnapshotTooOld once the nodes collect past it.

Failures are reported no better than they are known:

* A write whose fate is unknown raises `WriteIndeterminate`: the connection broke or the deadline
  passed after the request may have reached the endpoint, or the RPC failed for an unexpected
  (non-Sixfold) reason once it may have been sent: a bug, a reply this client cannot read. Every
  unit of a car that may have been sent gets it. A write refused before it was sent (the endpoint
  cannot be reached at all, or the request could not even be built) raises `Unavailable`, which
  promises that nothing was logged; a Sixfold error the endpoint answered keeps its meaning.
* `KeyboardInterrupt` and `SystemExit` are never swallowed: they propagate in the thread they
  reach. The boxcar still wakes every other caller: those whose writes were in the interrupted car
  get `WriteIndeterminate`, those queued for a later car are still sent, and a caller interrupted
  while it waits in the queue is taken out of it (its write is not sent later behind its back).
"""

from __future__ import annotations

import _thread
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence

import grpc

from engine.cache import CachedBackend, cache_options
from engine.database import Database
from engine.errors import (
    Closed, InvalidArgument, ReplicaBehind, SixfoldError, SnapshotTooOld, StaleEpoch, Unavailable, WriteIndeterminate,
)
from engine.core.constants import LSN_VALID_MAX
from engine.core.types import ReadView, RequestStatus, Unit
from engine.proto import kv_pb2, kv_pb2_grpc
from engine.transport import convert
from engine.transport.grpc_client import CHANNEL_OPTIONS
from engine.transport.streams import Stream

log = logging.getLogger("sixfold.client")

#: Defaults of `connect(**options)`.
CONNECT_TIMEOUT_S = 5.0
#: RPC deadline of writes and reads; above the endpoint's write timeout (5 s by default), so an
#: undecided write comes back as the endpoint's own WriteIndeterminate rather than a deadline.
TIMEOUT_S = 30.0
SCAN_TIMEOUT_S = 600.0
#: how long one Watch stream lives before the client opens the next from where it was
WATCH_TIMEOUT_S = 3600.0
CARS_IN_FLIGHT = 1
#: A car waits at most this long for the callers of the previous car to come back (see Boxcar).
CAR_LINGER_S = 0.002
CAR_ITEMS_MAX = 2048
#: Idle streams kept open per kind (writes, gets); each holds a thread of the endpoint. More are
#: open only while that many calls are (without the boxcar, every concurrent caller has one).
IDLE_STREAMS_MAX = 2
CAR_BYTES_MAX = 16 << 20
OP_OVERHEAD_BYTES = 16  # what an op costs in a message besides its key and value
#: How long a read through the reader endpoint is retried when a reader fails under it.
READ_RETRY_S = 2.0
READ_RETRY_PAUSE_S = 0.05
ROLES = ("writer", "reader")


def _primed(changes: Iterator) -> Iterator:
    """Run a watch generator up to its first `yield None` (the stream is open and the endpoint
    holds its position: a write made after `watch` returns is never collected away under it),
    and return it. A generator that is never started would not hold anything, nor release it."""
    next(changes)
    return changes

class _Slot:
    """One caller's place in a boxcar: its item, and the lock it sleeps on."""

    __slots__ = ("item", "size", "result", "lock", "drive")

    def __init__(self, item, size: int) -> None:
        self.item = item
        self.size = size
        self.result = None
        self.drive = False  # this caller sends cars (it holds an in-flight permit)
        self.lock = _thread.allocate_lock()
        self.lock.acquire()


class Boxcar:
    """Coalesce concurrent calls into shared RPCs (see the module docstring).

    `send(items) -> results` makes one RPC for a car and returns one result per item, in order:
    a value, or a SixfoldError for that item. If `send` raises a SixfoldError, every item of the
    car gets (a fresh copy of) it. If it raises anything else, every item of the car gets its own
    `failure(exc)`: `Unavailable` by default (right for reads, which change nothing); a boxcar of
    writes passes `write_failure`, since a car that may have been sent may have been logged. A
    `KeyboardInterrupt` or `SystemExit` then propagates in the thread that drove the car. The
    thread that holds an in-flight permit sends cars until its own item is answered, then hands
    the permit to the oldest waiter, if any.
    """

    def __init__(
        self,
        send: Callable[[list], Sequence],
        *,
        cars_in_flight: int = CARS_IN_FLIGHT,
        items_max: int = CAR_ITEMS_MAX,
        bytes_max: int = CAR_BYTES_MAX,
        linger_s: float = CAR_LINGER_S,
        failure: Callable[[BaseException], SixfoldError] | None = None,
    ) -> None:
        assert cars_in_flight >= 1 and items_max >= 1 and bytes_max >= 1 and linger_s >= 0
        self._send = send
        self._failure = failure or read_failure
        self._cars_max = cars_in_flight
        self._items_max = items_max
        self._bytes_max = bytes_max
        self._linger_s = linger_s
        self._last_car = 0  # items in the last car sent
        self._lingering = 0
        self._mu = threading.Lock()
        self._arrived = threading.Condition(self._mu)
        self._queue: deque[_Slot] = deque()
        self._in_flight = 0
        self._closed = False
        self.cars = 0  # RPCs sent (for tests and benchmarks)
        self.items = 0

    def call(self, item, size: int = 0):
        """Send `item` in the next car; return its result or raise its error."""
        slot = _Slot(item, size)
        with self._mu:
            if self._closed:
                raise Closed("the connection is closed")
            self._queue.append(slot)
            if self._in_flight < self._cars_max:
                self._in_flight += 1
                slot.drive = True
            elif self._lingering:
                self._arrived.notify()
        if not slot.drive:
            try:
                slot.lock.acquire()  # woken with a result, or with the permit to drive
            except BaseException:  # an interrupt while waiting: leave the queue, pass the permit on
                self._leave(slot)
                raise
        if slot.drive:
            self._drive(slot)
        result = slot.result
        if isinstance(result, BaseException):
            raise result
        return result

    def waiting(self) -> int:
        """How many callers are queued for a car (for tests and status)."""
        with self._mu:
            return len(self._queue)

    def _leave(self, slot: _Slot) -> None:
        """Take an interrupted caller out: if it is still queued its item is never sent; if it was
        just handed the in-flight permit, the permit goes to the next waiter (or back), so the
        callers behind it are not stranded. An item already in a car stays there (it may be sent;
        its caller sees the interrupt, not the result)."""
        with self._mu:
            try:
                self._queue.remove(slot)
            except ValueError:
                pass
            nxt = self._pass_permit_locked() if slot.drive else None
        if nxt is not None:
            nxt.lock.release()

    def _pass_permit_locked(self) -> _Slot | None:
        """Give the permit of a driver that stops to the oldest waiter (returned: the caller
        wakes it once `_mu` is released), or return it to the pool."""
        nxt = next((s for s in self._queue if not s.drive), None)
        if nxt is not None:
            nxt.drive = True
        else:
            self._in_flight -= 1
        return nxt

    def _take(self, me: _Slot) -> list[_Slot]:
        """The next car: queued slots in order, skipping other drivers' own slots."""
        car: list[_Slot] = []
        size = 0
        with self._mu:
            # The callers of the previous car were just woken and are coming back with their
            # next call: a car that leaves before they queue travels half full, and the next
            # one carries the rest. Waiting a moment (bounded) keeps cars full.
            if self._linger_s and len(self._queue) < self._last_car:
                deadline = time.monotonic() + self._linger_s
                self._lingering += 1
                try:
                    while len(self._queue) < self._last_car:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        self._arrived.wait(left)
                finally:
                    self._lingering -= 1
            keep: list[_Slot] = []
            while self._queue and len(car) < self._items_max:
                s = self._queue.popleft()
                if s.drive and s is not me:
                    keep.append(s)
                    continue
                if car and size + s.size > self._bytes_max:
                    self._queue.appendleft(s)
                    break
                car.append(s)
                size += s.size
            self._queue.extendleft(reversed(keep))
        return car

    def _drive(self, me: _Slot) -> None:
        try:
            while True:
                car = self._take(me)
                if not car:  # cannot happen (our slot is queued until taken); never spin
                    break
                self._ship(car, me)
                if any(s is me for s in car):
                    break
        except BaseException:
            # An interrupt (or a bug) in this thread: if our own item is still queued, it is not
            # sent later on behalf of a caller that is gone.
            with self._mu:
                try:
                    self._queue.remove(me)
                except ValueError:
                    pass
            raise
        finally:
            with self._mu:
                nxt = self._pass_permit_locked()  # nxt, if any, sends the next car
            if nxt is not None:
                nxt.lock.release()

    def _ship(self, car: list[_Slot], me: _Slot) -> None:
        items = [s.item for s in car]
        interrupt: BaseException | None = None
        shared = True  # the results came from `send`: one error object may stand for many items
        try:
            results = list(self._send(items))
            if len(results) != len(items):
                raise AssertionError(f"the reply has {len(results)} results for {len(items)} items")
        except SixfoldError as e:
            results = [e] * len(items)
        except Exception as e:  # a bug or a reply we cannot read: say so, never "nothing happened"
            log.exception("a car of %d items failed unexpectedly", len(items))
            results, shared = [self._failure(e) for _ in items], False
        except BaseException as e:  # KeyboardInterrupt, SystemExit: wake everyone, then re-raise
            results, shared = [self._failure(e) for _ in items], False
            interrupt = e
        self.cars += 1
        self.items += len(items)
        self._last_car = len(items)
        for s, r in zip(car, results):
            s.result = convert.fresh(r) if shared and isinstance(r, SixfoldError) and len(items) > 1 else r
            if s is not me:
                s.lock.release()
        if interrupt is not None:
            raise interrupt

    def close(self) -> None:
        with self._mu:
            self._closed = True


class Renewer:
    """Renews held read points (remote snapshots) in one daemon thread: each a third of its
    lease before it runs out. A renewal refused with SnapshotTooOld (the registration lapsed,
    or the writer changed) drops it, logged once; other failures are retried at the next turn."""

    def __init__(self, renew: Callable[[int], None]) -> None:
        self._renew = renew
        self._cond = threading.Condition()
        self._due: dict[int, tuple[float, float]] = {}  # registration -> (lease_s, next renewal)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="sixfold-snapshot-renewer", daemon=True)
        self._thread.start()

    def add(self, reg: int, lease_s: float) -> None:
        with self._cond:
            self._due[reg] = (lease_s, time.monotonic() + lease_s / 3)
            self._cond.notify()

    def discard(self, reg: int) -> None:
        with self._cond:
            self._due.pop(reg, None)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed:
                    now = time.monotonic()
                    due = [(t, reg) for reg, (_l, t) in self._due.items() if t <= now]
                    if due:
                        break
                    nxt = min((t for _l, t in self._due.values()), default=now + 1.0)
                    self._cond.wait(max(0.01, nxt - now))
                if self._closed:
                    return
                for _t, reg in due:
                    lease_s = self._due[reg][0]
                    self._due[reg] = (lease_s, now + lease_s / 3)
            for _t, reg in sorted(due):
                try:
                    self._renew(reg)
                except SnapshotTooOld as e:
                    self.discard(reg)
                    log.warning("a snapshot's hold on its read point ended: %s", e)
                except SixfoldError:
                    pass  # unreachable for now: the next turn tries again, within the lease


def read_failure(exc: BaseException) -> SixfoldError:
    """What a read (or any call that changes nothing) reports when its RPC fails unexpectedly."""
    err = Unavailable(f"the request failed unexpectedly ({type(exc).__name__}: {exc}); nothing was changed")
    err.__cause__ = exc
    return err


def write_failure(exc: BaseException) -> SixfoldError:
    """What a write reports when its RPC fails unexpectedly after it may have been sent: the
    endpoint may have logged it, so it is indeterminate, never "nothing was logged"."""
    err = WriteIndeterminate(
        f"the write request failed unexpectedly after it may have been sent ({type(exc).__name__}: {exc}). "
        "It may or may not have been logged; read the keys to find out."
    )
    err.__cause__ = exc
    return err


class RemoteBackend:
    """The `Database` backend protocol over the writer endpoint's `KV` service."""

    def __init__(
        self,
        address: str,
        *,
        timeout_s: float = TIMEOUT_S,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        boxcar: bool = True,
        cars_in_flight: int = CARS_IN_FLIGHT,
        car_items_max: int = CAR_ITEMS_MAX,
        tls=None,
        token: str | None = None,
        channel_options: Sequence[tuple] = (),
        read_retry_s: float = 0.0,
        what: str = "writer endpoint",
        session: bool = False,
        streams: bool = True,
    ) -> None:
        from engine.security.tls import secure_channel
        from engine.security.users import bearer

        self.address = address
        self.timeout_s = timeout_s
        self._read_retry_s = read_retry_s
        self._metadata = bearer(token) if token is not None else None  # checked before any channel opens
        self._channel = secure_channel(address, tls, CHANNEL_OPTIONS + tuple(channel_options))
        try:
            grpc.channel_ready_future(self._channel).result(timeout=connect_timeout_s)
        except grpc.FutureTimeoutError:
            self._channel.close()
            raise Unavailable(
                f"cannot reach the {what} at {address} within {connect_timeout_s:g} s; "
                "is the cluster up (`sixfold cluster status`)?"
                + ("" if tls is not None else " A secure cluster refuses plaintext: connect with its folder, or pass tls=.")
            ) from None
        self._stub = kv_pb2_grpc.KVStub(self._channel)
        self._where = f"{what} {address}"
        self._boxcar = boxcar
        #: `session` (the reader endpoint): the highest read point a reply carried; an answer
        #: from below it (a reader a few ms behind the one that answered before) is asked again,
        #: so this connection's reads never go back in time whichever reader answers
        self._session = session
        self._point = 0
        self._point_lock = threading.Lock()
        self._writes = Boxcar(self._send_writes, cars_in_flight=cars_in_flight, items_max=car_items_max, failure=write_failure)
        self._gets = Boxcar(self._send_gets, cars_in_flight=cars_in_flight, items_max=car_items_max)
        self._closed = False
        self._renewer: Renewer | None = None
        self._renewer_lock = threading.Lock()
        #: cars travel on long-lived streams (module docstring), not through the reader
        #: endpoint, whose balancer picks a reader per call; kind -> idle streams
        self._use_streams = streams and not session and read_retry_s == 0
        self._idle: dict[str, list[Stream]] = {"write": [], "get": []}
        self._unary_kinds: set[str] = set()
        self._streams_lock = threading.Lock()

    # --- the backend protocol ---------------------------------------------------------------
    def write(self, ops, *, request_id: bytes | None = None, resend: bool = False, conditions=()) -> int:
        ops = tuple(ops)
        unit = Unit(ops, request_id, resend, tuple(conditions)) if request_id is not None or conditions else ops
        if not self._boxcar:
            try:
                results = self._send_writes([unit])
                if len(results) != 1:
                    raise AssertionError(f"the reply has {len(results)} results for 1 unit")
            except SixfoldError:
                raise
            except Exception as e:  # as the boxcar does: a write that may have been sent is indeterminate
                log.exception("a write failed unexpectedly")
                raise write_failure(e) from e
            return self._result(results[0])
        size = sum(len(k) + len(v) + OP_OVERHEAD_BYTES for _f, k, v in ops) + (len(request_id) if request_id else 0) \
            + sum(len(c.key) + len(c.value) + OP_OVERHEAD_BYTES for c in conditions)
        return self._writes.call(unit, size)

    def version(self, key: bytes) -> tuple[int, bytes | None, int, int]:
        return convert.version_reply_from_pb(self._rpc(self._stub.Version, kv_pb2.VersionRequest(key=key)))

    def watch_batches(self, prefix: bytes, start: int | None) -> Iterator[tuple[list, int]]:
        """The Watch stream's batches (changes, position); ends only by an error or `close`."""
        position = start
        while True:
            request = kv_pb2.WatchRequest(prefix=prefix)
            if position is not None:
                request.start = position
            call = self._rpc(self._stub.Watch, request, timeout_s=WATCH_TIMEOUT_S)
            try:
                for m in call:
                    changes, position = convert.watch_batch_from_pb(m)
                    yield changes, position
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED and position is not None and not self._closed:
                    continue  # a stream lives WATCH_TIMEOUT_S: go on with a new one from where it was
                raise convert.error_from_rpc(e, where=self._where) from None
            finally:
                call.cancel()
            raise Unavailable(f"{self._where}: the watch stream ended")

    def watch(self, prefix: bytes, start: int | None) -> Iterator:
        """The changes; the stream is open, and the endpoint holds the position, on return."""
        return _primed(self._watch(prefix, start))

    def _watch(self, prefix: bytes, start: int | None) -> Iterator:
        from engine.database import Change

        ready = False
        for changes, _position in self.watch_batches(prefix, start):
            if not ready:
                ready = True
                yield None  # the first batch came: the endpoint holds the position (see _primed)
            for cpl, key, value in changes:
                yield Change(key, value, cpl)

    def request_status(self, request_id: bytes) -> RequestStatus:
        reply = self._rpc(self._stub.StatusOf, kv_pb2.StatusOfRequest(request_id=request_id))
        return convert.request_status_from_pb(reply)

    def _saw(self, point: int) -> None:
        # A read point above any valid LSN is no read point (a hostile or broken reader): kept,
        # it would make every later read of the session wait for it.
        if self._session and self._point < point <= LSN_VALID_MAX:
            with self._point_lock:
                self._point = max(self._point, point)

    @property
    def session_point(self) -> int:
        """The highest read point this reader-endpoint connection saw (0 on the writer's)."""
        return self._point

    def _session_read(self, send):
        """`send()` until its reply's read point is at or above the session's (`_session`):
        round_robin takes the next reader each time; ReplicaBehind if none catches up. A reply
        without a read point (0: a reader of an earlier release) is taken as it is."""
        reply = send()
        if not self._session:
            return reply
        for i in range(SESSION_RETRIES):
            if self._point <= reply.read_point <= LSN_VALID_MAX or reply.read_point == 0:
                self._saw(reply.read_point)
                return reply
            time.sleep(min(SESSION_RETRY_S_MAX, 0.002 * (i + 1)))
            reply = send()
        if reply.read_point >= self._point:
            self._saw(reply.read_point)
            return reply
        raise ReplicaBehind(
            f"the readers answered at read point {reply.read_point}, below {self._point}, which this connection "
            "already read at (the reader that was ahead is gone and the writer is not moving the others on); "
            "a new connection starts a new session")

    def get(self, key: bytes, *, quorum: bool = False, view: ReadView | None = None, after: int = 0) -> bytes | None:
        if view is not None or not self._boxcar or after:
            request = convert.get_request_to_pb(key, quorum, view, after)
            reply = self._session_read(lambda: self._rpc(self._stub.Get, request))
            return convert.get_reply_from_pb(reply)
        return self._gets.call((key, quorum), len(key) + OP_OVERHEAD_BYTES)

    def get_many(self, gets, *, after: int = 0) -> list:
        """`(key, quorum, view)` gets in GetMany calls of at most CAR_ITEMS_MAX gets and about
        CAR_BYTES_MAX key bytes each (the endpoint's read path batches them per node). `after`:
        the first call waits for that commit position (the later ones then need no wait)."""
        if after:
            first, gets = gets[:1], gets[1:]
            out = [self.get(key, quorum=quorum, view=view, after=after) for key, quorum, view in first]
            return out + self.get_many(gets)
        out: list = []
        chunk: list = []
        size = 0
        for key, quorum, view in gets:
            if view is not None:  # a snapshot get goes alone (GetMany shares one read point)
                out.extend(self._flush_gets(chunk))
                chunk, size = [], 0
                out.append(self.get(key, quorum=quorum, view=view))
                continue
            chunk.append((key, quorum))
            size += len(key) + OP_OVERHEAD_BYTES
            if len(chunk) >= CAR_ITEMS_MAX or size >= CAR_BYTES_MAX:
                out.extend(self._flush_gets(chunk))
                chunk, size = [], 0
        out.extend(self._flush_gets(chunk))
        return out

    def _flush_gets(self, chunk: list) -> list:
        return self._send_gets(chunk) if chunk else []

    def scan(self, start: bytes, end: bytes | None, *, quorum: bool = False, view: ReadView | None = None,
             after: int = 0) -> Iterator[tuple[bytes, bytes]]:
        if not isinstance(start, bytes) or (end is not None and not isinstance(end, bytes)):
            raise InvalidArgument("scan bounds are bytes (end may be None)")
        request = convert.kv_scan_request_to_pb(start, end, quorum, view, after)
        if not self._session:
            return self._stream(self._rpc(self._stub.Scan, request, timeout_s=SCAN_TIMEOUT_S))
        state = {}

        def send():  # a reader's scan always sends a first chunk, which carries its read point
            call = self._rpc(self._stub.Scan, request, timeout_s=SCAN_TIMEOUT_S)
            try:
                first = next(call)
            except StopIteration:
                first = kv_pb2.ScanChunk()
            except grpc.RpcError as e:
                raise convert.error_from_rpc(e, where=self._where) from None
            if first.read_point < self._point:
                call.cancel()
            state["call"] = call
            return first

        first = self._session_read(send)
        return self._stream(state["call"], first)

    def _stream(self, call, first=None) -> Iterator[tuple[bytes, bytes]]:
        try:
            if first is not None:
                yield from convert.scan_chunk_from_pb(first)
            for chunk in call:
                yield from convert.scan_chunk_from_pb(chunk)
        except grpc.RpcError as e:
            raise convert.error_from_rpc(e, where=self._where) from None
        finally:
            call.cancel()

    def view(self) -> ReadView:
        return convert.read_view_from_pb(self._rpc(self._stub.View, kv_pb2.ViewRequest()))

    def open_snapshot(self) -> tuple[ReadView, Callable[[], None]]:
        """A view held by the writer until the returned function releases it (renewed by this
        backend's `Renewer` meanwhile). An endpoint of a release before version collection holds
        nothing: the view alone, as `view()`."""
        try:
            view, reg, lease_s = convert.hold_reply_from_pb(self._rpc(self._stub.HoldReadPoint, convert.hold_request_to_pb()))
        except Unavailable:
            return self.view(), lambda: None  # (also UNIMPLEMENTED: an endpoint that collects nothing)
        if not reg:
            return view, lambda: None
        with self._renewer_lock:
            if self._renewer is None:
                self._renewer = Renewer(self._renew_one)
        self._renewer.add(reg, lease_s)
        return view, lambda: self._release_hold(reg)

    def _renew_one(self, reg: int, release: bool = False) -> None:
        self._rpc(self._stub.HoldReadPoint, convert.hold_request_to_pb(reg, release=release))

    def _release_hold(self, reg: int) -> None:
        renewer = self._renewer
        if renewer is not None:
            renewer.discard(reg)
        if self._closed:
            return
        try:
            self._renew_one(reg, release=True)
        except SixfoldError:
            pass  # the lease runs out on its own

    def status(self) -> dict:
        status = convert.status_from_pb(self._rpc(self._stub.Status, kv_pb2.StatusRequest()))
        status["client"] = {"address": self.address, "write_rpcs": self._writes.cars, "writes": self._writes.items,
                            "get_rpcs": self._gets.cars, "gets": self._gets.items}
        return status

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._renewer is not None:
                self._renewer.close()
            self._writes.close()
            self._gets.close()
            with self._streams_lock:
                idle = [st for kind in self._idle.values() for st in kind]
                self._idle = {"write": [], "get": []}
            for st in idle:
                st.cancel()
            self._channel.close()

    # --- calls ------------------------------------------------------------------------------
    def _rpc(self, method, request, *, write: bool = False, timeout_s: float | None = None):
        """One call, with its errors turned into Sixfold's."""
        if self._closed:
            raise Closed("the connection is closed")
        deadline = time.monotonic() + (0.0 if write else self._read_retry_s)
        while True:
            try:
                return method(request, timeout=self.timeout_s if timeout_s is None else timeout_s, metadata=self._metadata)
            except grpc.RpcError as e:
                # Through the reader endpoint a read that got no Sixfold answer (its reader died
                # under it) goes again: the balancer picks another reader (module docstring).
                if not write and convert.unreachable(e) and time.monotonic() < deadline and not self._closed:
                    time.sleep(READ_RETRY_PAUSE_S)
                    continue
                raise convert.error_from_rpc(e, where=self._where, write=write) from None
            except ValueError as e:  # the channel was closed under us
                raise Closed(f"the connection is closed ({e})") from None

    @staticmethod
    def _result(r):
        if isinstance(r, BaseException):
            raise r
        return r

    def _send_writes(self, units: list) -> list:
        try:
            request = convert.write_request_to_pb(units)
        except SixfoldError:
            raise
        except Exception as e:  # nothing was sent: that much is known
            log.exception("a write request could not be built")
            raise Unavailable(f"the write request could not be built ({type(e).__name__}: {e}); nothing was sent") from e
        return convert.write_results_from_pb(
            self._exchange("write", self._stub.WriteStream, request, lambda: self._rpc(self._stub.Write, request, write=True)))

    def _send_gets(self, gets: list) -> list:
        request = kv_pb2.GetManyRequest()
        add = request.gets.add
        for key, quorum in gets:
            add(key=key, quorum=quorum)
        return convert.get_results_from_pb(self._session_read(
            lambda: self._exchange("get", self._stub.GetManyStream, request, lambda: self._rpc(self._stub.GetMany, request))))

    def _exchange(self, kind: str, open_call, request, unary):
        """A car on a stream of its kind (an idle one, else a new one): the reply, or the error
        the unary call would have raised. `unary()` is the call for a server of an earlier
        release (UNIMPLEMENTED; from then on) or one with no room for another stream."""
        if not self._use_streams or kind in self._unary_kinds:
            return unary()
        if self._closed:
            raise Closed("the connection is closed")
        write = kind == "write"
        with self._streams_lock:
            idle = self._idle[kind]
            stream = idle.pop() if idle else None
        while stream is not None and not stream.usable():  # the endpoint ended it meanwhile
            stream.cancel()
            with self._streams_lock:
                stream = idle.pop() if idle else None
        try:
            if stream is None:
                stream = Stream(open_call, self._metadata)
            reply = stream.exchange(request, self.timeout_s)
        except grpc.RpcError as e:  # the stream is given up (Stream.exchange)
            if Stream.unimplemented(e, convert.ERROR_METADATA_KEY):
                log.info("the %s serves no %s stream (an earlier release): unary calls from now on", self._where, kind)
                self._unary_kinds.add(kind)
                return unary()
            if Stream.refused_for_room(e):
                return unary()
            if stream is not None and stream.timed_out:
                what = WriteIndeterminate if write else Unavailable
                raise what(f"{self._where}: no reply within {self.timeout_s:g} s"
                           + (". The write may or may not have been logged; read the key to find out." if write else "")
                           ) from None
            raise convert.error_from_rpc(e, where=self._where, write=write) from None
        except StopIteration:
            # The endpoint ended the stream (shutting down): its handler returns only right after
            # a reply (StreamRegistry.serve), so it never read this request: nothing was done.
            raise Unavailable(f"{self._where} ended the stream (shutting down) before reading this request; "
                              "nothing was done") from None
        except ValueError as e:  # the channel was closed under us
            raise Closed(f"the connection is closed ({e})") from None
        with self._streams_lock:
            if not self._closed and len(self._idle[kind]) < IDLE_STREAMS_MAX:
                self._idle[kind].append(stream)
                stream = None
        if stream is not None:
            stream.cancel()
        if reply.HasField("error"):
            raise convert.error_from_pb(reply.error)
        return reply.reply


_OPTIONS = ("timeout_s", "connect_timeout_s", "boxcar", "cars_in_flight", "car_items_max", "tls", "token", "role",
            "follow_timeout_s", "streams", "cache")

#: How long a client of a cluster folder follows the writer through a failover before it gives
#: up and raises the error it met (engine.head.failover: a takeover takes about a lease period).
FOLLOW_TIMEOUT_S = 15.0
#: A reader-endpoint read answered below the session's read point is asked again (the next
#: reader) up to this many times, with a short growing pause.
SESSION_RETRIES = 40
SESSION_RETRY_S_MAX = 0.05
FOLLOW_POLL_S = 0.1
FOLLOW_CONNECT_TIMEOUT_S = 1.0


class FollowingBackend:
    """The backend of `engine.connect(cluster_folder)`: a RemoteBackend to whichever process the
    manifest names the writer, following it through a failover.

    On `Unavailable` or `StaleEpoch` (the endpoint is gone, stepped down or cannot confirm its
    lease) the manifest is read again until a writer answers (bounded by `follow_timeout_s`), and
    the call is made there:
    * reads simply again;
    * a write that was not sent (`Unavailable`) again under its request id, marked a re-send;
    * a write whose fate is unknown (`WriteIndeterminate`, `StaleEpoch`) again under its request
      id only at a *new* writer (another address, or a higher epoch): the new writer finds in the
      log whether it committed (a write an old writer logged is either at or below the VDL its
      recovery found, or cut for ever), so it is applied at most once; with no new writer the
      error is raised unchanged.
    Once one attempt's fate is unknown, so is the write's: whatever a later attempt raises (an
    `Unavailable` that promises only that *it* was not sent, a refusal), the call raises that
    first unknown error, never a promise that nothing was logged."""

    def __init__(self, folder: str, options: dict, *, locate: Callable[[], tuple] | None = None,
                 first: tuple | None = None) -> None:
        """`locate()`: who is the writer now, as its identity tuple whose first item is the
        address to dial (SixfoldError: nobody is known to be); by default the one the manifest
        of `folder` names, (address, pid). A deployment spec's is `spec_locate`: the writer
        candidates asked (engine.cluster.locate), (address, pid, opened_at). `first`: the
        identity to start with when `locate()` cannot answer yet (a cluster starting); an
        identity whose pid is None is never taken for another process at the same address."""
        self.folder = folder
        self._options = dict(options)
        self.follow_timeout_s = self._options.pop("follow_timeout_s", FOLLOW_TIMEOUT_S)
        self._lock = threading.Lock()
        self._locate = locate or self._manifest_writer
        try:
            who = self._writer_identity()
        except SixfoldError:
            if first is None:
                raise
            who = first
        self._backend = RemoteBackend(who[0], **self._options)
        self._backend.writer_identity = who
        self._closed = False

    def _manifest_writer(self) -> tuple[str, object]:
        """(address, pid) of the writer the manifest names: a new pair is a new writer process."""
        from engine.cluster.manifest import WRITER, load_manifest

        w = load_manifest(self.folder)[WRITER]
        return w["address"], w.get("pid")

    def _writer_identity(self) -> tuple:
        """Who is the writer now (see `__init__`): its identity, whose first item is its address."""
        return self._locate()

    @staticmethod
    def another_writer(before: tuple | None, after: tuple | None) -> bool:
        """True when identity `after` is certainly another writer process than `before`: a write
        of unknown fate at `before` may then be re-sent there (its recovery decided the fate).
        Not when either is unknown, nor for the same address with a pid not known."""
        if before is None or after is None or before == after:
            return False
        if before[0] == after[0] and (before[1] is None or after[1] is None):
            return False
        return True

    @property
    def address(self) -> str:
        return self._backend.address

    @property
    def remote(self) -> RemoteBackend:
        """The RemoteBackend to the writer followed now."""
        return self._backend

    def __getattr__(self, name: str):
        # Everything else of the RemoteBackend (tools and tests reach for its boxcar and RPCs).
        if name.startswith("__") or name in ("_backend", "_options", "_lock", "folder"):
            raise AttributeError(name)
        return getattr(self._backend, name)

    def _reconnect(self, failed: RemoteBackend, deadline: float) -> RemoteBackend | None:
        """A backend to the writer the manifest names now (another process, or the same address
        come back), or None once the deadline passed."""
        while time.monotonic() < deadline and not self._closed:
            with self._lock:
                if self._backend is not failed:  # another caller reconnected already
                    return self._backend
            try:
                who = self._writer_identity()
            except SixfoldError:
                time.sleep(FOLLOW_POLL_S)
                continue
            if who == getattr(failed, "writer_identity", None):
                # The manifest still names the writer that failed: ask it again (it may confirm its
                # lease again, or have been restarted in place), never wait on a dead address.
                try:
                    failed.view()
                    return failed
                except SixfoldError:
                    time.sleep(FOLLOW_POLL_S)
                    continue
            try:
                options = dict(self._options, connect_timeout_s=min(FOLLOW_CONNECT_TIMEOUT_S, self._options.get(
                    "connect_timeout_s", CONNECT_TIMEOUT_S)))
                fresh = RemoteBackend(who[0], **options)
                fresh.writer_identity = who
                try:
                    fresh.view()  # it serves (not a standby, not a stepped-down writer)
                except SixfoldError:
                    fresh.close()
                    raise
            except SixfoldError:
                time.sleep(FOLLOW_POLL_S)
                continue
            with self._lock:
                current = self._backend
                if current is not failed:
                    # Another caller followed the writer meanwhile: use its backend and drop
                    # this one. (Swapping ours in would close the backend it had just made, and
                    # the calls already re-sent on it would come back CANCELLED: indeterminate.)
                    fresh.close()
                    return current
                old, self._backend = current, fresh
            log.info("following the writer: %s -> %s", failed.address, fresh.address)
            try:
                old.close()
            except Exception:  # closing a dead connection must not fail the call
                pass
            return fresh
        return None

    def _call(self, what, *, write_unknown_ok: bool = False):
        """Run `what(backend)`, following the writer (see the class docstring)."""
        backend = self._backend
        deadline = time.monotonic() + self.follow_timeout_s
        first_error: SixfoldError | None = None
        # The first attempt whose fate is unknown (it may have been logged): once there is one,
        # the write's fate is unknown whatever a later attempt says, so that is what is raised;
        # a later "Unavailable" (not sent *this* time) must not turn it into "nothing logged".
        first_unknown: SixfoldError | None = None
        while True:
            try:
                return what(backend)
            except Closed:
                with self._lock:
                    current = self._backend
                if self._closed or current is backend:
                    raise
                backend = current  # another caller moved to the new writer and closed this one
                continue
            except (Unavailable, StaleEpoch) as e:
                unknown = isinstance(e, (WriteIndeterminate, StaleEpoch))
                if first_error is None:
                    first_error = e
                if unknown and first_unknown is None:
                    first_unknown = e
                if unknown and not write_unknown_ok:
                    raise
                if self._still_the_writer(backend):
                    if first_unknown is not None and first_unknown is not e:
                        raise first_unknown from e  # an earlier attempt may have been logged
                    raise  # a live writer refused (no quorum, say): nothing to follow
                fresh = self._reconnect(backend, deadline)
                if fresh is None:
                    raise (first_unknown or first_error) from None
                if unknown and not self.another_writer(getattr(backend, "writer_identity", None), fresh.writer_identity):
                    # The same writer process: the error stands as it was, and it is one whose
                    # fate is unknown (never an earlier "not sent").
                    raise first_unknown from None
                backend = fresh
            except SixfoldError as e:
                if first_unknown is not None:
                    raise first_unknown from e  # another refusal now; an earlier try may have been logged
                raise

    def _still_the_writer(self, backend: RemoteBackend) -> bool:
        """True when the manifest still names `backend`'s writer and it serves a read now: the
        error came from a live writer, not from a failover."""
        try:
            if self._writer_identity() != getattr(backend, "writer_identity", None):
                return False
            backend.view()
            return True
        except SixfoldError:
            return False

    # --- the backend protocol -----------------------------------------------------------------
    def write(self, ops, *, request_id: bytes | None = None, resend: bool = False, conditions=()) -> int:
        state = {"resend": resend}

        def once(b):
            try:
                return b.write(ops, request_id=request_id, resend=state["resend"], conditions=conditions)
            finally:
                state["resend"] = True  # from the second try on, a re-send under the same id

        return self._call(once, write_unknown_ok=request_id is not None)

    def request_status(self, request_id: bytes) -> RequestStatus:
        return self._call(lambda b: b.request_status(request_id))

    def version(self, key: bytes) -> tuple[int, bytes | None, int, int]:
        return self._call(lambda b: b.version(key))

    def watch(self, prefix: bytes, start: int | None) -> Iterator:
        """A watch that follows the writer: after a failover it resumes on the new writer from
        the last position it had, which serves it from the nodes' logs (Compacted only if the
        nodes collected past it). The stream is open, the position held, on return."""
        return _primed(self._watch(prefix, start))

    def _watch(self, prefix: bytes, start: int | None) -> Iterator:
        from engine.database import Change

        position = start
        ready = False
        while True:
            backend = self._backend
            try:
                for changes, pos in backend.watch_batches(prefix, position):
                    if not ready:
                        ready = True
                        yield None  # see _primed
                    for cpl, key, value in changes:
                        yield Change(key, value, cpl)
                    position = pos
            except (Unavailable, StaleEpoch):
                if self._closed:
                    raise
                if self._still_the_writer(backend):
                    raise
                fresh = self._reconnect(backend, time.monotonic() + self.follow_timeout_s)
                if fresh is None:
                    raise

    def get(self, key: bytes, *, quorum: bool = False, view: ReadView | None = None, after: int = 0) -> bytes | None:
        return self._call(lambda b: b.get(key, quorum=quorum, view=view, after=after))

    def get_many(self, gets, *, after: int = 0) -> list:
        return self._call(lambda b: b.get_many(gets, after=after))

    def scan(self, start: bytes, end: bytes | None, *, quorum: bool = False, view: ReadView | None = None,
             after: int = 0):
        return self._call(lambda b: b.scan(start, end, quorum=quorum, view=view, after=after))

    def view(self) -> ReadView:
        return self._call(lambda b: b.view())

    def open_snapshot(self) -> tuple[ReadView, Callable[[], None]]:
        return self._call(lambda b: b.open_snapshot())

    def status(self) -> dict:
        return self._call(lambda b: b.status())

    def close(self) -> None:
        self._closed = True
        self._backend.close()



def reader_target(folder: str, manifest: dict | None = None) -> tuple[str, str]:
    """(gRPC target of every reader instance of a cluster folder, their host): a list of
    addresses for the `round_robin` policy (`ipv4:h:p1,h:p2`); InvalidArgument if it has none.
    `manifest`: the folder's, when it is a deployment spec of another name."""
    import ipaddress

    from engine.cluster.manifest import active_readers, load_manifest

    readers = active_readers(manifest if manifest is not None else load_manifest(folder))
    if not readers:
        raise InvalidArgument(f"cluster {folder} has no reader instances: add one with `sixfold reader add --cluster {folder}` "
                              "(or `cluster up --readers N`), or connect without role=\"reader\"")
    hosts = {r["address"].rpartition(":")[0] for r in readers}
    host = sorted(hosts)[0]
    try:
        family = {ipaddress.ip_address(h.strip("[]")).version for h in hosts}
    except ValueError:
        family = set()
    if family == {4}:
        return "ipv4:" + ",".join(r["address"] for r in readers), host
    if family == {6}:
        return "ipv6:" + ",".join(r["address"] for r in readers), host
    raise InvalidArgument(f"the readers of {folder} listen on {sorted(hosts)}: the reader endpoint needs IP addresses")


#: How long `reader_statuses` waits for each reader instance's status.
READER_STATUS_TIMEOUT_S = 2.0


def reader_statuses(folder: str, timeout_s: float = READER_STATUS_TIMEOUT_S, *,
                    manifest_file: str | None = None) -> list[dict]:
    """What each reader instance of a cluster folder says of itself (its KV Status `reader`
    part: read point, lag in LSNs and ms, connected...), with its id, AZ and address; a reader
    that does not answer in `timeout_s` is listed with `error` instead. Asked in parallel.
    `manifest_file`: a deployment spec of another name than DIR/cluster.json."""
    from concurrent.futures import ThreadPoolExecutor

    from engine.cluster.manifest import active_readers, load_manifest, load_manifest_file, tls_config
    from engine.security.users import default_token

    manifest = load_manifest_file(manifest_file, folder) if manifest_file else load_manifest(folder)
    readers = active_readers(manifest)
    if not readers:
        return []
    tls, token = tls_config(folder, manifest), default_token(folder)

    def one(r: dict) -> dict:
        out = {"id": r["id"], "az": r.get("az", ""), "address": r["address"]}
        backend = None
        try:
            backend = RemoteBackend(r["address"], tls=tls, token=token, timeout_s=timeout_s,
                                    connect_timeout_s=timeout_s, streams=False, what="reader")
            out.update(backend.status().get("reader") or {})
        except SixfoldError as e:
            out["error"] = str(e)
        finally:
            if backend is not None:
                backend.close()
        return out

    with ThreadPoolExecutor(max_workers=len(readers)) as pool:
        return list(pool.map(one, readers))


def resolve_manifest(target: str | os.PathLike) -> tuple[str, str | None, str | None]:
    """(writer endpoint address, cluster folder, manifest file) of a cluster folder, a manifest
    or deployment spec file (of any name: its folder is the file's), or host:port (folder and
    file None)."""
    from engine.cluster.manifest import MANIFEST_FILE, load_manifest_file, manifest_path

    if isinstance(target, (str, os.PathLike)) and os.path.isdir(os.fspath(target)):
        folder = os.fspath(target)
        path = manifest_path(folder)
        return load_manifest_file(path, folder)["writer"]["address"], folder, path
    if isinstance(target, (str, os.PathLike)) and os.path.isfile(os.fspath(target)):
        path = os.path.abspath(os.fspath(target))
        folder = os.path.dirname(path)
        m = load_manifest_file(path, folder if os.path.basename(path) == MANIFEST_FILE else None)
        return m["writer"]["address"], folder, path
    if isinstance(target, str) and ":" in target and os.path.sep not in target:
        host, _, port = target.rpartition(":")
        if host and port.isdigit():
            return target, None, None
    raise InvalidArgument(
        f"connect target {target!r} is neither a cluster folder (with cluster.json), a deployment spec file nor host:port"
    )


def resolve_target(target: str | os.PathLike) -> tuple[str, str | None]:
    """(writer endpoint address, cluster folder or None) of a cluster folder, a spec file or host:port."""
    address, folder, _path = resolve_manifest(target)
    return address, folder


def spec_backend(manifest_file: str, folder: str, options: dict) -> FollowingBackend:
    """The backend of `engine.connect(spec)`: a FollowingBackend whose writer is the candidate
    serving as the writer at the highest epoch (`engine.cluster.locate`), not the file's
    writer entry, which a spec process never rewrites. Until one answers (a cluster starting)
    it dials the file's writer, an identity of unknown pid (see `FollowingBackend`)."""
    from engine.cluster.locate import WriterLocator
    from engine.cluster.manifest import WRITER

    locator = WriterLocator(manifest_file, folder, tls=options.get("tls"), token=options.get("token"))
    first = (locator.manifest()[WRITER]["address"], None, None)
    backend = FollowingBackend(folder, options, locate=lambda: locator.locate().identity, first=first)
    backend.locator = locator
    return backend


def connect(target: str | os.PathLike, **options) -> Database:
    """Connect to a cluster's writer endpoint: a cluster folder (with cluster.json), a deployment
    spec file (`engine.cluster.spec`: the writer is found by asking the spec's writer candidates,
    and followed through a failover) or host:port.

    Options: timeout_s (RPC deadline, default 30), connect_timeout_s (default 5), boxcar
    (default True: coalesce concurrent calls), cars_in_flight (default 1), car_items_max, role
    ("writer", the default, or "reader": the reader endpoint, a cluster folder only), tls (an
    `engine.security.tls.TlsConfig`; default: the operator's of a secure cluster folder, else none),
    token (default: $SIXFOLD_TOKEN, else the folder's operator token; see the module docstring), streams
    (default True: writes and gets to the writer endpoint travel on long-lived streams; False: unary calls),
    cache (a client read cache kept fresh by the watch stream: True, a byte bound, or a dict /
    `engine.cache.CacheOptions` of bytes_max and ttl_s; see `engine.cache`).
    `engine.connect` (the public face) adds `db.cluster` for a cluster folder: this module sits
    below the launcher (whose `Cluster.connect` uses it) and never imports it."""
    unknown = set(options) - set(_OPTIONS)
    if unknown:
        raise InvalidArgument(f"unknown option(s) {sorted(unknown)}; known: {sorted(_OPTIONS)}")
    role = options.pop("role", "writer")
    cache = cache_options(options.pop("cache", None))
    if cache is not None:
        db = connect(target, role=role, **options)
        db._backend = CachedBackend(db._backend, cache)
        db._finalizer.detach()
        db._finalizer = weakref.finalize(db, db._backend.close)
        return db
    if role not in ROLES:
        raise InvalidArgument(f"role {role!r}: \"writer\" (the writer endpoint) or \"reader\" (the reader endpoint)")
    address, folder, manifest_file = resolve_manifest(target)
    manifest = None
    if folder is not None:
        from engine.cluster.manifest import load_manifest_file, tls_config

        manifest = load_manifest_file(manifest_file, folder)
        if "tls" not in options:
            options["tls"] = tls_config(folder, manifest)
    if options.get("token") is None:
        from engine.security.users import default_token

        options["token"] = default_token(folder)
    if role == "reader":
        if folder is None:
            raise InvalidArgument("role=\"reader\" needs a cluster folder (its manifest lists the readers)")
        address, host = reader_target(folder, manifest)
        # One channel over every reader, balanced by gRPC; their certificates name the host.
        lb: tuple = (("grpc.lb_policy_name", "round_robin"),)
        if options.get("tls") is not None:
            lb += (("grpc.ssl_target_name_override", host.strip("[]")),)
        options.update(channel_options=lb, read_retry_s=READ_RETRY_S, what="reader endpoint", session=True)
        options.pop("follow_timeout_s", None)
    elif folder is not None:
        from engine.cluster.spec import is_spec

        if is_spec(manifest):  # nothing records the writer into a spec: ask its candidates
            return Database(spec_backend(manifest_file, folder, options))
        return Database(FollowingBackend(folder, options))
    else:
        options.pop("follow_timeout_s", None)
    return Database(RemoteBackend(address, **options))


__all__ = ["Boxcar", "FollowingBackend", "RemoteBackend", "connect", "read_failure", "reader_statuses", "resolve_manifest",
           "resolve_target", "spec_backend", "write_failure"]
