"""Long-lived bidirectional gRPC streams on the hot paths: one request at a time, its reply next.

Theory of operation
-------------------
A Python gRPC unary call costs the server about three times what a message on an open stream
costs (measured on this project's machines: ~400 us against ~140 us of server CPU, and a
little less on the client), because every call is a new HTTP/2 stream, a new handler dispatch
to the server's thread pool, and metadata both ways. The writer's appends to each node
(`Storage.AppendStream`) and a client's writes and gets to the writer endpoint
(`KV.WriteStream`, `KV.GetManyStream`) therefore travel on streams that stay open. Each stream
carries one request at a time and answers it with exactly one reply, in order, which holds
either the unary call's reply or the error the unary call would have ended with: an error does
not end the stream. The unary RPCs stay, for everything that is not hot, for peers of an
earlier release (a server that answers UNIMPLEMENTED gets unary calls from then on) and as the
fallback when a server has no room for another stream.

Client side (`Stream`): `exchange(request, timeout)` puts the request on the call's request
iterator and waits for the next reply. Deadlines: the call itself has none (it lives for as
long as its owner); one watchdog thread per process looks every `WATCH_S` for an exchange past
its deadline and cancels that call, which ends the waiting `next()` with CANCELLED; the owner
then gives the stream up (`broken`) and the next request opens a new one. A stream is only
ever used by one thread at a time: its owner checks it out of an idle pool and back in.

Server side (`StreamRegistry`): serves a stream's requests one by one with the handler the
unary RPC uses (`serve`), counts streams and requests, refuses a new stream beyond `limit`
(RESOURCE_EXHAUSTED with `sixfold-streams: full` in the trailing metadata: the client then
sends that request as a unary call; every open stream holds one server thread, so an unbounded
number of them would starve the unary calls), and at shutdown ends every stream that is not in
the middle of a request (`close`): an idle stream never ends by itself, and the server's stop
would otherwise wait out its whole grace period.
"""

from __future__ import annotations

import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterator

import grpc

#: How often the watchdog looks for an exchange past its deadline.
WATCH_S = 0.05
#: Trailing metadata of a stream refused for lack of room (the client falls back to a unary call).
STREAMS_FULL_KEY = "sixfold-streams"
_END = object()  # ends a stream's request iterator


class Stream:
    """One long-lived bidirectional call (see the module docstring)."""

    def __init__(self, open_call: Callable, metadata, *, tag=None) -> None:
        #: what the owner opened it on (a channel): the owner retires a stream whose tag changed
        self.tag = tag
        self.deadline = 0.0  # monotonic deadline of the exchange in flight; 0: none
        self.timed_out = False
        self.broken = False
        self.used = 0  # exchanges so far
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._replies = open_call(iter(self._requests.get, _END), metadata=metadata)
        _watchdog.add(self)

    def exchange(self, request, timeout: float):
        """Send `request` and return its reply; grpc.RpcError or StopIteration when the call
        ended (the watchdog cancels it when `timeout` passes first: `timed_out`). An exchange
        that does not end with its reply (any exception, KeyboardInterrupt included) gives the
        stream up: a reply still on its way must never be taken for the next request's."""
        self.deadline = time.monotonic() + timeout
        self.used += 1
        done = False
        try:
            self._requests.put(request)
            reply = next(self._replies)
            done = True
            return reply
        finally:
            self.deadline = 0.0
            if not done:
                self.cancel()

    def usable(self) -> bool:
        """Not given up, and the call has not ended (a server that ended it leaves it done)."""
        return not self.broken and self._replies.is_active()

    def cancel(self) -> None:
        self.broken = True
        self._requests.put(_END)
        self._replies.cancel()

    @staticmethod
    def refused_for_room(e: grpc.RpcError) -> bool:
        """True when the server had no room for another stream (nothing was processed)."""
        return any(k == STREAMS_FULL_KEY for k, _v in (e.trailing_metadata() or ()))

    @staticmethod
    def unimplemented(e: grpc.RpcError, error_key: str) -> bool:
        """True when the server serves no such stream (a release before it): UNIMPLEMENTED
        without a Sixfold error class."""
        return e.code() == grpc.StatusCode.UNIMPLEMENTED and not any(
            k == error_key for k, _v in (e.trailing_metadata() or ()))


class _Watchdog:
    """One thread per process: cancels every stream exchange past its deadline."""

    def __init__(self) -> None:
        self._streams: weakref.WeakSet[Stream] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def add(self, stream: Stream) -> None:
        with self._lock:
            self._streams.add(stream)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="stream-watchdog", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(WATCH_S)
            with self._lock:
                streams = [s for s in self._streams if not s.broken]
                if not streams and not len(self._streams):
                    self._thread = None
                    return
            now = time.monotonic()
            for s in streams:
                deadline = s.deadline
                if deadline and now > deadline and not s.broken:
                    s.timed_out = True
                    s.cancel()


_watchdog = _Watchdog()


class StreamRegistry:
    """A server's open streams of one kind (see the module docstring)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: set = set()
        self._busy: set = set()
        self._lock = threading.Lock()
        self.closing = False
        self.opened = 0
        self.requests = 0
        self.refused = 0  # streams refused for lack of room

    def counters(self) -> dict:
        with self._lock:
            return {"open": len(self._open), "opened": self.opened, "requests": self.requests, "refused": self.refused}

    def serve(self, request_iterator: Iterator, context, one: Callable, refuse_closing: Callable):
        """The stream's replies: `one(request)` for each request, in order. A stream that opens
        while the server shuts down is ended by `refuse_closing(context)` (which aborts it)."""
        with self._lock:
            closing = self.closing
        if closing:
            refuse_closing(context)
        with self._lock:
            if len(self._open) >= self.limit:
                self.refused += 1
                context.set_trailing_metadata(((STREAMS_FULL_KEY, "full"),))
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"no room for another stream ({self.limit} open): send this request as a unary call")
            self._open.add(context)
            self.opened += 1
        try:
            for request in request_iterator:
                with self._lock:
                    self._busy.add(context)
                    self.requests += 1
                try:
                    reply = one(request)
                finally:
                    with self._lock:
                        self._busy.discard(context)
                yield reply
                if self.closing:
                    return
        finally:
            with self._lock:
                self._open.discard(context)

    def close(self) -> None:
        """Shutting down: end every open stream not in the middle of a request (one that is
        ends after its reply); refuse new ones."""
        with self._lock:
            self.closing = True
            idle = [c for c in self._open if c not in self._busy]
        for context in idle:
            context.cancel()
