"""A client's writes and gets travel on long-lived streams to the writer endpoint (kv.proto
`WriteStream`, `GetManyStream`; engine.transport.streams).

The streams must keep the unary calls' promises: each caller's own result or error class, an
error leaving the stream open, `WriteIndeterminate` for a write whose reply did not come in time,
unary calls to an endpoint of an earlier release or one with no room for another stream, and a
server that stops without waiting out its grace period on a client's idle stream. The endpoint is
real (six LMDB nodes, a writer, a gRPC server: `test_client_failures.LocalEndpoint`); what went on
a stream is read from the servicer's own counters.
"""

from __future__ import annotations

import threading

import pytest
from waiting import eventually
from test_client_failures import DEADLINE_S, HoldsWrites, make_endpoint, run_threads, sigint_raises  # noqa: F401 (fixtures)

import engine
from engine import errors
from engine.head.endpoint import KVServicer
from engine.proto import kv_pb2_grpc


def test_a_clients_writes_and_gets_travel_on_one_stream_each(make_endpoint):
    ep = make_endpoint()
    with engine.connect(ep.address) as db:
        for i in range(30):
            db.put(b"k%02d" % i, b"v%d" % i)
        assert [db.get(b"k%02d" % i) for i in range(30)] == [b"v%d" % i for i in range(30)]
        assert db.get(b"absent") is None
        counters = ep.servicer.streams.counters()
        assert counters["opened"] == 2 and counters["open"] == 2, counters
        assert counters["requests"] == 61, counters
        # Many threads: the boxcar still coalesces them, on the same two streams.
        out = run_threads(16, lambda i: db.put(b"t%02d" % i, b"x"))
        assert all(kind == "ok" for kind, _ in out), out
        assert ep.servicer.streams.counters()["opened"] == 2
    assert ep.logged(b"t15") == b"x"


class FailsOnce(KVServicer):
    """The first write is refused with a Sixfold error (as a reply on the stream); the rest pass."""

    def __init__(self, endpoint) -> None:
        super().__init__(endpoint)
        self.failed = False

    def _write(self, request):
        if not self.failed:
            self.failed = True
            raise errors.StorageFull("test: no room on a write quorum")
        return super()._write(request)


def test_an_error_keeps_its_class_and_the_stream_stays_open(make_endpoint):
    ep = make_endpoint(FailsOnce)
    with engine.connect(ep.address) as db:
        with pytest.raises(errors.StorageFull, match="no room"):
            db.put(b"a", b"1")
        db.put(b"b", b"2")
        assert db.get(b"b") == b"2" and db.get(b"a") is None
        assert ep.servicer.streams.counters()["opened"] == 2  # one write stream, one get stream
    assert ep.logged(b"a") is None


class EarlierRelease(KVServicer):
    """An endpoint of a release before the streams: the generated servicer's UNIMPLEMENTED."""

    WriteStream = kv_pb2_grpc.KVServicer.WriteStream
    GetManyStream = kv_pb2_grpc.KVServicer.GetManyStream


def test_an_endpoint_of_an_earlier_release_gets_unary_calls(make_endpoint):
    ep = make_endpoint(EarlierRelease)
    with engine.connect(ep.address) as db:
        for i in range(5):
            db.put(b"k%d" % i, b"v%d" % i)
        assert [db.get(b"k%d" % i) for i in range(5)] == [b"v%d" % i for i in range(5)]
    assert ep.servicer.streams.counters()["opened"] == 0


def test_an_endpoint_with_no_room_for_a_stream_gets_unary_calls(make_endpoint):
    ep = make_endpoint()
    ep.servicer.streams.limit = 0
    with engine.connect(ep.address) as db:
        for i in range(5):
            db.put(b"k%d" % i, b"v%d" % i)
            assert db.get(b"k%d" % i) == b"v%d" % i
    counters = ep.servicer.streams.counters()
    assert counters["opened"] == 0 and counters["refused"] == 10, counters
    assert ep.logged(b"k4") == b"v4"


def test_a_write_with_no_reply_in_time_is_indeterminate_and_the_next_opens_a_new_stream(make_endpoint):
    ep = make_endpoint(HoldsWrites)
    with engine.connect(ep.address, timeout_s=0.5) as db:
        with pytest.raises(errors.WriteIndeterminate, match="no reply within"):
            db.put(b"held", b"1")
        ep.servicer.release.set()
        db.put(b"after", b"2")
        assert db.get(b"after") == b"2"
    # The held write goes on once released: "indeterminate" was the honest answer.
    eventually(lambda: ep.logged(b"held") == b"1", "the held write to be logged")
    assert ep.servicer.streams.counters()["opened"] == 3  # the given-up write stream, a new one, gets


def test_stopping_the_server_does_not_wait_for_a_clients_idle_streams(make_endpoint):
    """Without ending idle streams first, the server's stop would wait its whole grace period
    (an hour here) for the client's two streams, which never end by themselves."""
    ep = make_endpoint()
    db = engine.connect(ep.address, timeout_s=5)
    try:
        db.put(b"k", b"v")
        assert db.get(b"k") == b"v"
        ep.servicer.begin_stop()
        assert ep.server.stop(3600.0).wait(DEADLINE_S), "the server's stop waited for the idle streams"
        # A cancelled stream's handler leaves the registry in its own thread, which may still be
        # on its way out when the stop's event is set.
        eventually(lambda: ep.servicer.streams.counters()["open"] == 0, "the cancelled streams to leave the registry")
        with pytest.raises((errors.Unavailable, errors.WriteIndeterminate)):
            db.put(b"k2", b"v")
    finally:
        db.close()


def test_a_stopping_endpoint_refuses_as_not_done_and_answers_no_view(make_endpoint):
    """Between ending its streams and the gRPC server's stop, an endpoint still answers unary
    calls. It must refuse them (Unavailable: nothing was done), a view included: a client whose
    idle stream broke under a write then finds no live writer there and follows the failover,
    re-sending under its request id, rather than taking the broken call for a live writer's
    answer. (Before: the write came back WriteIndeterminate and the view was answered, which
    cost a planned failover two in-flight writes in CI.)"""
    ep = make_endpoint()
    db = engine.connect(ep.address, timeout_s=5)
    try:
        db.put(b"k", b"v")  # the write stream is open and idle now
        ep.servicer.begin_stop()
        # The idle stream is ended: a write sent on it just then has, to the client, an unknown
        # fate (WriteIndeterminate); one the client sends once it saw the stream end opens a
        # new stream, which is refused (Unavailable, nothing done). Either is the honest answer.
        with pytest.raises(errors.Unavailable):
            db.put(b"k2", b"v")
        # What it asks next is refused, and says nothing was done: no view, no write.
        with pytest.raises(errors.Unavailable, match="shutting down"):
            db._backend.view()
        with pytest.raises(errors.Unavailable, match="shutting down") as raised:
            db.put(b"k3", b"v")
        assert not isinstance(raised.value, errors.WriteIndeterminate), raised.value
        assert [ep.logged(k) for k in (b"k", b"k2", b"k3")] == [b"v", None, None]
    finally:
        db.close()


def test_an_interrupted_exchange_never_hands_its_reply_to_the_next_request(make_endpoint, sigint_raises):
    """A caller interrupted (KeyboardInterrupt) while its write is on a stream gives that
    stream up: the reply still on its way must never become the answer to the next request."""
    ep = make_endpoint(HoldsWrites)
    db = engine.connect(ep.address, boxcar=False, timeout_s=30)
    try:
        threading.Thread(target=lambda: (ep.servicer.entered.wait(DEADLINE_S), sigint_raises()), daemon=True).start()
        with pytest.raises(KeyboardInterrupt):
            db.put(b"first", b"1")
        ep.servicer.release.set()
        db.put(b"second", b"2")
        db.put(b"third", b"3")
        opened = ep.servicer.streams.counters()["opened"]
        assert opened == 2, "the interrupted write's stream was used again"
        assert [ep.logged(k) for k in (b"first", b"second", b"third")] == [b"1", b"2", b"3"]
    finally:
        db.close()
