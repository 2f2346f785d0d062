"""The client's failures are honest (finding 8 of issue 8).

A write batch that failed for an unexpected reason used to raise `Unavailable` ("nothing was
logged") for every unit, although the endpoint had logged it; a KeyboardInterrupt or SystemExit
during a write was swallowed the same way. Now an unexpected failure of a write RPC that may have
been sent raises `WriteIndeterminate` for each unit of the car, a Sixfold error keeps its
meaning, and KeyboardInterrupt / SystemExit propagate in the thread they reach while every other
caller still wakes.

The endpoint here is real: six `StorageNode`s (real LMDB) behind a real `WriterEndpoint` (its own
`Writer`, recovery, senders), served by a real gRPC server on loopback. A test that needs a
failure the real servicer never produces subclasses it and breaks its answer *after* the real
`Write` logged the batch, as a buggy or newer endpoint might.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import grpc
import pytest

import engine
from engine import errors
from engine.client import Boxcar, FollowingBackend, write_failure
from engine.database import Database
from engine.core.constants import FLAG_PUT
from engine.core.types import Geometry, default_nodes
from engine.head.endpoint import EndpointConfig, KVServicer, WriterEndpoint
from engine.node.service import StorageNode
from engine.proto import kv_pb2_grpc
from engine.transport import convert
from engine.transport.grpc_server import make_server
from engine.transport.inprocess import InProcessTransport, Registry

DEADLINE_S = 60.0  # generous: a loaded 2-core machine
VOLUME_ID = "00000000-0000-4000-8000-00000000c11e"


class LocalEndpoint:
    """Six nodes and a writer endpoint in this process, served over gRPC by `servicer_cls`."""

    def __init__(self, path, servicer_cls=KVServicer, config: dict | None = None, **servicer_kwargs) -> None:
        geometry = Geometry(2)
        infos = tuple(default_nodes())
        self.registry = Registry()
        self.nodes = []
        for info in infos:
            node = StorageNode(os.path.join(str(path), info.id), info, geometry, VOLUME_ID, durable=False)
            node.attach(InProcessTransport(self.registry, info.id), lambda: [i.id for i in infos])
            self.registry.set(info.id, node)
            self.nodes.append(node)
        self.endpoint = WriterEndpoint(
            EndpointConfig(volume_id=VOLUME_ID, protection_groups=2, nodes=infos, durable=False, write_timeout_s=10.0,
                           **(config or {})),
            transport=InProcessTransport(self.registry, "writer"),
        )
        self.endpoint.open()
        self.server, port = make_server("127.0.0.1:0", 16)
        self.servicer = servicer_cls(self.endpoint, **servicer_kwargs)
        kv_pb2_grpc.add_KVServicer_to_server(self.servicer, self.server)
        self.server.start()
        self.address = f"127.0.0.1:{port}"

    def logged(self, key: bytes) -> bytes | None:
        """What the volume holds for `key`, asked of the writer directly (not over the client)."""
        return self.endpoint.get(key, True, None)

    def close(self) -> None:
        self.server.stop(0).wait(10)
        self.endpoint.close()
        for node in self.nodes:
            node.close()


@pytest.fixture
def make_endpoint(tmp_path):
    made = []

    def make(servicer_cls=KVServicer, config: dict | None = None, **kw):
        ep = LocalEndpoint(tmp_path / f"ep{len(made)}", servicer_cls, config, **kw)
        made.append(ep)
        return ep

    yield make
    for ep in made:
        ep.close()


class OneResultShort(KVServicer):
    """Logs every unit (the real Write), then answers one result short: a reply the client
    cannot match to its units. The batch *was* logged."""

    def _write(self, request):  # what Write and WriteStream both answer
        reply = super()._write(request)
        del reply.results[-1]
        return reply


class RefusesWrites(KVServicer):
    """Refuses every Write with a Sixfold error before logging anything."""

    def _write(self, request):
        raise errors.Unavailable("only 3 segments reachable; need 4")


class HoldsWrites(KVServicer):
    """Holds every Write until `release` is set (bounded), then logs it with the real Write."""

    def __init__(self, endpoint) -> None:
        super().__init__(endpoint)
        self.entered = threading.Event()
        self.release = threading.Event()

    def _write(self, request):
        self.entered.set()
        self.release.wait(DEADLINE_S)
        return super()._write(request)


def run_threads(n, fn):
    out = [None] * n

    def body(i):
        try:
            out[i] = ("ok", fn(i))
        except BaseException as e:  # noqa: BLE001 - recorded for the assertions
            out[i] = ("error", e)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE_S)
        assert not t.is_alive(), "a caller never woke up"
    return out


def wait_for(predicate, what: str):
    deadline = time.monotonic() + DEADLINE_S
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.fixture
def sigint_raises():
    """SIGINT raises KeyboardInterrupt in the main thread, as in a plain Python program."""
    assert threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield lambda: signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, previous)


# --- unexpected failures --------------------------------------------------------------------
@pytest.mark.parametrize("boxcar", [True, False], ids=["boxcar", "direct"])
def test_an_unexpected_failure_after_the_batch_was_logged_is_indeterminate(make_endpoint, boxcar):
    ep = make_endpoint(OneResultShort)
    with engine.connect(ep.address, boxcar=boxcar) as db:
        out = run_threads(16, lambda i: db.put(f"k{i:02d}".encode(), f"v{i}".encode()))
        for i, (kind, e) in enumerate(out):
            assert kind == "error" and type(e) is errors.WriteIndeterminate, (i, kind, e)
            assert "may or may not have been logged" in str(e)
        assert len({id(e) for _kind, e in out}) == len(out), "each caller raises its own exception object"
        # The promise "nothing was logged" would have been false: the endpoint holds every write.
        for i in range(16):
            assert ep.logged(f"k{i:02d}".encode()) == f"v{i}".encode()
        assert db.get(b"k00") == b"v0", "reads are unaffected"


def test_a_sixfold_error_keeps_its_meaning(make_endpoint):
    ep = make_endpoint(RefusesWrites)
    with engine.connect(ep.address) as db:
        out = run_threads(8, lambda i: db.put(f"r{i}".encode(), b"v"))
        for kind, e in out:
            assert kind == "error" and type(e) is errors.Unavailable and "only 3 segments reachable" in str(e)
        assert all(ep.logged(f"r{i}".encode()) is None for i in range(8)), "Unavailable: nothing was logged"


# --- interrupts -----------------------------------------------------------------------------
class RealSend:
    """A boxcar `send` that makes the client's real Write RPC to the endpoint."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.stub = kv_pb2_grpc.KVStub(self.channel)

    def __call__(self, units):
        try:
            reply = self.stub.Write(convert.write_request_to_pb(units), timeout=DEADLINE_S)
        except grpc.RpcError as e:
            raise convert.error_from_rpc(e, where="test endpoint", write=True) from None
        return convert.write_results_from_pb(reply)

    def close(self) -> None:
        self.channel.close()


def put_unit(key: bytes) -> tuple:
    return ((FLAG_PUT, key, b"v"),)


def test_keyboard_interrupt_during_a_write_rpc_propagates_and_nobody_is_stranded(make_endpoint, sigint_raises):
    ep = make_endpoint(HoldsWrites)
    with engine.connect(ep.address) as db:
        others_out: list = [None] * 3

        def put_other(i):
            try:
                db.put(f"other{i}".encode(), b"v")
                others_out[i] = "ok"
            except BaseException as e:  # noqa: BLE001 - recorded for the assertions
                others_out[i] = e

        others = [threading.Thread(target=put_other, args=(i,)) for i in range(3)]

        def interrupt_when_sent():
            ep.servicer.entered.wait(DEADLINE_S)
            for t in others:  # callers arriving now queue behind the main thread's car
                t.start()
            sigint_raises()

        helper = threading.Thread(target=interrupt_when_sent)
        helper.start()
        try:
            with pytest.raises(KeyboardInterrupt):
                db.put(b"interrupted", b"v")  # the main thread drives this car, blocked in the RPC
        finally:
            helper.join(DEADLINE_S)
            ep.servicer.release.set()
        for t in others:
            t.join(DEADLINE_S)
            assert not t.is_alive(), "a caller queued behind the interrupted car never woke up"
        assert others_out == ["ok", "ok", "ok"], others_out
        assert all(ep.logged(f"other{i}".encode()) == b"v" for i in range(3))
        # The interrupted write had been sent: the endpoint logs it (so the caller, who saw only
        # the interrupt, must treat it as indeterminate).
        wait_for(lambda: ep.logged(b"interrupted") == b"v", "the interrupted write to be logged")
        db.put(b"after", b"v")  # the boxcar still works for the interrupted thread
        assert db.get(b"after") == b"v"


def test_keyboard_interrupt_while_queued_takes_the_caller_out_and_keeps_the_permit(make_endpoint, sigint_raises):
    ep = make_endpoint(HoldsWrites)
    send = RealSend(ep.address)
    box = Boxcar(send, cars_in_flight=1, failure=write_failure)
    first = threading.Thread(target=lambda: box.call(put_unit(b"first")))
    first.start()  # it drives car 1, which the endpoint holds
    ep.servicer.entered.wait(DEADLINE_S)

    def interrupt_when_queued():
        wait_for(lambda: box.waiting() == 1, "the main thread to queue")
        sigint_raises()

    helper = threading.Thread(target=interrupt_when_queued)
    helper.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            box.call(put_unit(b"queued"))
        assert box.waiting() == 0, "the interrupted caller left the queue"
    finally:
        helper.join(DEADLINE_S)
        ep.servicer.release.set()
    first.join(DEADLINE_S)
    assert not first.is_alive()
    # The permit was not handed to the caller that left: the next call is sent and answered.
    done = run_threads(1, lambda i: box.call(put_unit(b"next")))
    assert done[0][0] == "ok" and isinstance(done[0][1], int), done
    assert ep.logged(b"first") == b"v" and ep.logged(b"next") == b"v"
    assert ep.logged(b"queued") is None, "a write whose caller was interrupted in the queue is never sent"
    send.close()


def test_system_exit_in_a_driving_thread_propagates_and_its_car_is_indeterminate(make_endpoint):
    """The car's real Write RPC is made, then SystemExit arrives (as from a signal handler that
    calls sys.exit): the car was logged, its driver sees SystemExit, every other caller of the
    car sees WriteIndeterminate, and the boxcar goes on serving."""
    ep = make_endpoint(HoldsWrites)
    real = RealSend(ep.address)
    cars: list[list] = []

    def send(units):
        cars.append(list(units))
        results = real(units)
        if len(cars) == 2:
            raise SystemExit(3)
        return results

    box = Boxcar(send, cars_in_flight=1, failure=write_failure)
    first = threading.Thread(target=lambda: box.call(put_unit(b"first")))
    try:
        first.start()  # car 1, held by the endpoint while five more callers queue
        ep.servicer.entered.wait(DEADLINE_S)

        def release_when_queued():
            wait_for(lambda: box.waiting() == 5, "five callers to queue")
            ep.servicer.release.set()

        releaser = threading.Thread(target=release_when_queued)
        releaser.start()
        out = run_threads(5, lambda i: box.call(put_unit(f"car2-{i}".encode())))
        releaser.join(DEADLINE_S)
        first.join(DEADLINE_S)
    finally:
        ep.servicer.release.set()
    assert [len(c) for c in cars] == [1, 5]
    kinds = sorted(type(e).__name__ for _kind, e in out)
    assert kinds == ["SystemExit"] + ["WriteIndeterminate"] * 4, out
    for i in range(5):  # all logged: "indeterminate", not "nothing was logged", is the truth
        assert ep.logged(f"car2-{i}".encode()) == b"v"
    done = run_threads(1, lambda i: box.call(put_unit(b"after")))
    assert done[0][0] == "ok" and ep.logged(b"after") == b"v", done
    real.close()


# --- following the writer: a write's fate over several attempts -------------------------------
class LogsThenLosesTheReply(KVServicer):
    """A new writer on which a re-sent write is logged but its answer is lost (a deadline, the
    write timeout of a writer that has just opened: WriteIndeterminate), and whose next View
    fails once (it cannot confirm its lease yet), as a promoted reader's did under chaos."""

    def __init__(self, endpoint) -> None:
        super().__init__(endpoint)
        self.views_to_fail = 0

    def _write(self, request):
        super()._write(request)
        self.views_to_fail = 1
        raise errors.WriteIndeterminate("test: logged, the answer was lost")

    def View(self, request, context):
        if self.views_to_fail:
            self.views_to_fail -= 1
            convert.abort(context, errors.Unavailable("test: cannot confirm the lease yet"))
        return super().View(request, context)


class ManifestInMemory(FollowingBackend):
    """A FollowingBackend whose manifest's writer entry (address, pid) is a list cell the test
    sets: the one seam; the backends, RPCs and endpoints are real."""

    def __init__(self, who: list, options: dict) -> None:
        self._who = who
        super().__init__("(in memory)", options)

    def _writer_identity(self):
        return self._who[0]


def test_a_write_not_sent_to_a_dead_writer_then_lost_at_the_new_one_is_indeterminate(make_endpoint):
    """Found by `sixfold chaos --target cluster --faults writer-kill` (seed 1, replica reads
    through the reader endpoint): the first attempt met the killed writer's closed port
    (Unavailable: not sent), the re-send to the reader that took over was logged but its answer
    lost (WriteIndeterminate); the client raised the *first* error, Unavailable, which promises
    that nothing was logged, and a later read found the value."""
    old = make_endpoint()
    new = make_endpoint(LogsThenLosesTheReply)
    who = [(old.address, 1)]
    db = Database(ManifestInMemory(who, {"timeout_s": 10.0}))
    try:
        db.put(b"before", b"1")
        old.server.stop(0).wait(DEADLINE_S)  # the writer dies: its port refuses
        who[0] = (new.address, 2)  # a reader took over and recorded itself
        with pytest.raises(errors.WriteIndeterminate):
            db.put(b"k", b"v")
        assert new.logged(b"k") == b"v", "the re-send was logged: 'Unavailable' would have been a lie"
    finally:
        db.close()


def test_who_is_another_writer_for_a_re_send():
    """A write of unknown fate is re-sent only to another writer process: another address, or
    the same address with another pid or another opening (a spec writer restarted in a container
    is pid 1 again, but opens at another time: engine.cluster.locate). An identity whose pid is
    not known yet is never taken for another process at its own address."""
    another = FollowingBackend.another_writer
    assert another(("h:1", 7), ("h:2", 7)) and another(("h:1", 7), ("h:1", 8))
    assert another(("h:1", 1, 100.0), ("h:1", 1, 200.0)), "pid 1 again, another opening"
    assert not another(("h:1", 7), ("h:1", 7)) and not another(("h:1", 1, 100.0), ("h:1", 1, 100.0))
    assert not another(("h:1", None, None), ("h:1", 5, 100.0)), "the writer we could not name yet may be this one"
    assert not another(("h:1", 5), ("h:1", None)) and not another(None, ("h:1", 5))
    assert another(("h:1", None, None), ("h:2", 5, 100.0))


class Located(FollowingBackend):
    """A FollowingBackend with a pluggable "who is the writer" (`locate`), as `spec_backend`
    builds one: here a list cell the test sets (None: nobody answers as the writer yet)."""

    def __init__(self, who: list, options: dict, first: tuple) -> None:
        def locate():
            if who[0] is None:
                raise errors.Unavailable("test: no candidate serves as the writer")
            return who[0]

        super().__init__("(spec)", options, locate=locate, first=first)


class CountsAndLosesTheReply(LogsThenLosesTheReply):
    def __init__(self, endpoint) -> None:
        super().__init__(endpoint)
        self.writes = 0

    def _write(self, request):
        self.writes += 1
        return super()._write(request)


def test_a_spec_client_that_could_not_name_its_writer_never_re_sends_a_lost_write_to_it(make_endpoint):
    """`engine.connect(spec)` while no candidate answers yet dials the spec's writer with an
    identity of unknown pid. A write logged there whose answer was lost, and then the same
    process named by the candidates: the same writer, so the write is not sent again (it may
    still be in flight there) and its fate stays unknown."""
    ep = make_endpoint(CountsAndLosesTheReply)
    who: list = [None]
    db = Database(Located(who, {"timeout_s": 10.0}, first=(ep.address, None, None)))
    try:
        who[0] = (ep.address, os.getpid(), 1234.5)  # it answers now, as the writer
        with pytest.raises(errors.WriteIndeterminate):
            db.put(b"k", b"v")
        assert ep.logged(b"k") == b"v"
        assert ep.servicer.writes == 1, "sent once: a re-send to the same writer could apply it twice"
    finally:
        db.close()
