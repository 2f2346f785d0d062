"""The writer's appends travel on one long-lived AppendStream per node, and segment reads on
ReadManyStreams (storage.proto, engine.transport.streams).

A stream must keep every promise the unary Append made: the same replies and the same error
classes (an error is a reply; the stream stays open), the same deadlines (a node that does not
answer costs a bounded wait, then the next request opens a new stream), the same volume check,
and a node of an earlier release, which serves no stream, still gets its appends (unary). A node
that stops does not wait out its grace period on a writer's idle stream. Real node processes
and real gRPC servers throughout; what travelled on a stream is read from the node's own
counters (`State`'s `append_streams`).
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from waiting import DEADLINE_S, eventually

from engine import codec, errors
from engine.cluster.testing import free_base_port, spawn_node
from engine.core.constants import FLAG_CPL, FLAG_PUT
from engine.core.types import Geometry, NodeInfo
from engine.node.service import StorageNode
from engine.proto import storage_pb2_grpc
from engine.transport import convert
from engine.transport.grpc_client import Deadlines, GrpcTransport
from engine.transport.grpc_server import NodeServer, StorageServicer, make_server

pytestmark = pytest.mark.cluster

P = 4
VOLUME = "test-volume"


@pytest.fixture
def node(tmp_path):
    port = free_base_port(1)
    proc = spawn_node(str(tmp_path / "n1"), port, protection_groups=P)
    try:
        yield {"address": {"n1": f"127.0.0.1:{port}"}, "proc": proc, "log": str(tmp_path / "n1.log")}
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
            proc.wait(10)


def _ready(t: GrpcTransport, node: str = "n1") -> int:
    """Seal and sync the node at a new epoch; returns it."""
    epoch = t.state(node).epoch + 1
    t.seal(node, epoch)
    t.sync_epoch(node, epoch, (), None)
    return epoch


def _record(lsn: int, prev: int, key: bytes, value: bytes) -> bytes:
    return codec.encode_record(lsn, prev, 0, FLAG_PUT | FLAG_CPL, key, value)


def _streams(t: GrpcTransport, node: str = "n1") -> dict:
    return t.state(node).extra["append_streams"]


class _LoopAppends:
    """`append` as the writer's sender loop makes it (`append_async`, grpc.aio), from a test's
    thread: one event loop thread for every call, as the sender loop has."""

    def __init__(self, t: GrpcTransport) -> None:
        self.t = t
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def __call__(self, *args):
        return asyncio.run_coroutine_threadsafe(self.t.append_async(*args), self.loop).result(DEADLINE_S)

    def close(self) -> None:
        if not self.thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self.t.close_async(), self.loop).result(DEADLINE_S)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(DEADLINE_S)


@pytest.fixture(params=["threads", "loop"])
def appends(request):
    """How a test's appends are made: `append` (a sender thread's call) or `append_async` (the
    sender loop's); both must keep every promise. Yields a factory: transport -> append."""
    made = []

    def make(t: GrpcTransport):
        if request.param == "threads":
            return t.append
        made.append(_LoopAppends(t))
        return made[-1]

    yield make
    for a in made:
        a.close()


def test_appends_travel_on_one_stream_and_an_error_keeps_it_open(node, appends):
    t = GrpcTransport(node["address"], source="writer", volume_id=VOLUME)
    append = appends(t)
    try:
        epoch = _ready(t)
        before = _streams(t)
        for lsn in range(1, 41):
            reply = append("n1", epoch, codec.encode_frame([_record(lsn, lsn - 1, b"k%d" % lsn, b"v")]), lsn - 1)
            assert reply.node == "n1" and reply.scls[0] == lsn
        # Errors arrive as the same classes as on the unary call, and the stream goes on.
        with pytest.raises(errors.StaleEpoch):
            append("n1", epoch - 1, codec.encode_frame([]), 0)
        with pytest.raises(errors.EpochBehind):
            append("n1", epoch + 1, codec.encode_frame([]), 0)
        with pytest.raises(errors.CorruptRecord):
            append("n1", epoch, b"SXF1" + b"\0" * 40, 0)
        with pytest.raises(errors.InvalidArgument):
            append("n1", epoch, codec.encode_frame([]), 1 << 63)
        reply = append("n1", epoch, codec.encode_frame([_record(41, 40, b"k41", b"v")]), 40)
        assert reply.scls[0] == 41
        after = _streams(t)
        assert after["opened"] - before["opened"] == 1, after
        assert after["requests"] - before["requests"] == 45, after
        assert after["open"] == 1
        got = t.read("n1", 0, b"k41", 41, 41, epoch)
        assert got.value == b"v" and got.lsn == 41
    finally:
        if isinstance(append, _LoopAppends):
            append.close()
        t.close()
    eventually(lambda: _open_streams(node) == 0, "the closed transport's stream to end on the node")


def _open_streams(node) -> int:
    t = GrpcTransport(node["address"], source="cli", volume_id=VOLUME)
    try:
        extra = t.state("n1").extra
        return extra["append_streams"]["open"] + extra["read_streams"]["open"]
    finally:
        t.close()


def test_a_stream_naming_another_volume_is_refused(node, appends):
    t = GrpcTransport(node["address"], source="writer", volume_id="another-volume")
    append = appends(t)
    try:
        with pytest.raises(errors.WrongVolume):
            append("n1", 0, codec.encode_frame([]), 0)
    finally:
        if isinstance(append, _LoopAppends):
            append.close()
        t.close()
    assert _open_streams(node) == 0


def test_an_append_past_its_deadline_is_unavailable_and_the_next_opens_a_new_stream(node, appends):
    """A node that does not answer in time (a fault rule delays it) costs one deadline; the
    stream is given up and the next append, once the node answers again, opens a new one."""
    t = GrpcTransport(node["address"], source="writer", volume_id=VOLUME,
                      deadlines=Deadlines(append_s=0.3, suspect_deadline_s=0.3, probe_interval_s=0.05))
    admin = GrpcTransport(node["address"], source="chaos", volume_id=VOLUME)
    append = appends(t)
    try:
        epoch = _ready(t)
        append("n1", epoch, codec.encode_frame([]), 0)
        opened = _streams(admin)["opened"]
        admin.set_faults("n1", convert.FaultRules(delay_ms=3000))
        with pytest.raises(errors.Unavailable, match="no reply within"):
            append("n1", epoch, codec.encode_frame([]), 0)
        admin.set_faults("n1", convert.FaultRules())

        def answers() -> bool:
            try:
                return append("n1", epoch, codec.encode_frame([]), 0).node == "n1"
            except errors.Unavailable:
                return False

        eventually(answers, "the node to take appends again")
        assert _streams(admin)["opened"] >= opened + 1
    finally:
        admin.set_faults("n1", convert.FaultRules())
        t.close()
        admin.close()


def test_a_paused_node_is_unavailable_and_a_resumed_one_takes_appends_again(node, appends):
    t = GrpcTransport(node["address"], source="writer", volume_id=VOLUME,
                      deadlines=Deadlines(append_s=0.5, suspect_deadline_s=0.5, probe_interval_s=0.05))
    append = appends(t)
    try:
        epoch = _ready(t)
        append("n1", epoch, codec.encode_frame([]), 0)
        os.kill(node["proc"].pid, signal.SIGSTOP)
        try:
            with pytest.raises(errors.Unavailable):
                append("n1", epoch, codec.encode_frame([]), 0)
            with pytest.raises(errors.Unavailable, match="did not answer lately"):
                append("n1", epoch, codec.encode_frame([]), 0)
        finally:
            os.kill(node["proc"].pid, signal.SIGCONT)

        def answers() -> bool:
            try:
                return append("n1", epoch, codec.encode_frame([_record(1, 0, b"k", b"after")]), 0).scls[0] == 1
            except errors.Unavailable:
                return False

        eventually(answers, "the resumed node to take appends again")
    finally:
        t.close()


class _EarlierRelease(StorageServicer):
    """A node of a release before AppendStream: the generated servicer's UNIMPLEMENTED."""

    AppendStream = storage_pb2_grpc.StorageServicer.AppendStream


def _in_process_node(tmp_path) -> NodeServer:
    ns = NodeServer.bind(lambda: StorageNode(str(tmp_path / "n1"), NodeInfo("n1", "a"), Geometry(P), VOLUME, durable=False),
                         f"127.0.0.1:{free_base_port(1)}")
    ns.start()
    return ns


def test_a_node_of_an_earlier_release_gets_unary_appends(tmp_path, appends):
    server, port = make_server(f"127.0.0.1:{free_base_port(1)}", 4)
    servicer = _EarlierRelease(StorageNode(str(tmp_path / "n1"), NodeInfo("n1", "a"), Geometry(P), VOLUME, durable=False))
    storage_pb2_grpc.add_StorageServicer_to_server(servicer, server)
    server.start()
    t = GrpcTransport({"n1": f"127.0.0.1:{port}"}, source="writer", volume_id=VOLUME)
    append = appends(t)
    try:
        epoch = _ready(t)
        for lsn in (1, 2, 3):
            assert append("n1", epoch, codec.encode_frame([_record(lsn, lsn - 1, b"k", b"v%d" % lsn)]), 0).scls[0] == lsn
        assert ("n1", "AppendStream") in t._unary_only
        assert t.state("n1").extra["append_streams"]["requests"] == 0
        assert t.read("n1", 0, b"k", 3, 3, epoch).value == b"v3"
    finally:
        t.close()
        server.stop(None)
        servicer.node.close()


def test_stopping_a_node_does_not_wait_out_a_writers_idle_stream(tmp_path):
    """Without ending idle streams first, stop() would wait its whole grace period (an hour
    here) for the writer's stream, which never ends by itself: the stop must end well inside
    the suite's deadline (a condition, not a timing)."""
    ns = _in_process_node(tmp_path)
    t = GrpcTransport({"n1": f"127.0.0.1:{ns.port}"}, source="writer", volume_id=VOLUME)
    try:
        epoch = _ready(t)
        t.append("n1", epoch, codec.encode_frame([]), 0)
        assert ns.servicer.append_streams.requests == 1
        stopping = threading.Thread(target=ns.stop, kwargs={"grace_s": 3600.0}, daemon=True)
        stopping.start()
        stopping.join(DEADLINE_S)
        assert not stopping.is_alive(), "stop() waited for the idle stream"
        # The cancelled stream's handler leaves the registry in its own thread (see test_kv_streams).
        eventually(lambda: ns.servicer.append_streams.counters()["open"] == 0, "the cancelled stream to leave the registry")
        with pytest.raises(errors.Unavailable):
            t.append("n1", epoch, codec.encode_frame([]), 0)
    finally:
        t.close()


def test_sigterm_with_a_writer_stream_open_stops_the_node_cleanly(node):
    t = GrpcTransport(node["address"], source="writer", volume_id=VOLUME)
    try:
        epoch = _ready(t)
        t.append("n1", epoch, codec.encode_frame([]), 0)
        node["proc"].send_signal(signal.SIGTERM)
        assert node["proc"].wait(DEADLINE_S) == 0
    finally:
        t.close()
    with open(node["log"]) as fh:
        assert "stopped cleanly" in fh.read()


def test_reads_travel_on_read_streams_a_few_kept_idle_per_node(node):
    """`read_many` (the writer's and readers' segment reads) on ReadManyStreams: one stream
    for sequential reads; parallel reads open more, and at most IDLE_STREAMS_MAX stay open."""
    from engine.transport.grpc_client import IDLE_STREAMS_MAX

    t = GrpcTransport(node["address"], source="writer", volume_id=VOLUME)
    try:
        epoch = _ready(t)
        t.append("n1", epoch, codec.encode_frame([_record(1, 0, b"k", b"v")]), 1)
        before = t.state("n1").extra["read_streams"]
        for _ in range(20):
            got = t.read_many("n1", [(0, b"k", 1, 1, epoch), (P - 1, b"k", 1, 0, epoch)])
            assert got[0].value == b"v" and got[0].lsn == 1 and got[1].lsn == 0
        # A bad item is that item's error; a bad request is the request's, and the stream goes on.
        with pytest.raises(errors.SixfoldError):
            t.read_many("n1", [(0, b"k", 1, 1, epoch)] * (convert.BATCH_ITEMS_MAX + 1))
        assert t.read_many("n1", [(0, b"k", 1, 1, epoch)])[0].value == b"v"
        after = t.state("n1").extra["read_streams"]
        assert after["opened"] - before["opened"] == 1 and after["requests"] - before["requests"] == 22, after
        barrier = threading.Barrier(8)

        def read(_i):
            barrier.wait(DEADLINE_S)
            return [t.read_many("n1", [(0, b"k", 1, 1, epoch)])[0].value for _ in range(10)]

        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(read, range(8))) == [[b"v"] * 10] * 8
        eventually(lambda: t.state("n1").extra["read_streams"]["open"] <= IDLE_STREAMS_MAX,
                   "the node to end the streams the transport did not keep")
    finally:
        t.close()
    eventually(lambda: _open_streams(node) == 0, "the closed transport's streams to end on the node")
