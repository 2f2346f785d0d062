"""A live storage node process answers malformed requests with precise status codes, and keeps
serving.

A well-formed protobuf can carry nonsense, and random bytes often parse as protobuf: every field
is checked for meaning on the server. Each test sends one kind of bad request straight to the
node's gRPC port and checks the status code and the error class named in the trailing metadata
(`sixfold-error`); the fixture checks after every test that the node still answers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import grpc
import pytest
from waiting import DEADLINE_S, eventually

from engine import codec, errors
from engine.cluster.testing import engine_env, free_base_port, spawn_node, storage_channel
from engine.core.constants import FLAG_CPL, FLAG_PUT, KEY_BYTES_MAX, LSN_VALID_MAX
from engine.proto import storage_pb2, storage_pb2_grpc
from engine.transport import convert
from engine.transport.grpc_client import GrpcTransport

pytestmark = pytest.mark.cluster

P = 4
U64_MAX = (1 << 64) - 1
SOURCE = (("sixfold-source", "cli"),)


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    folder = tmp_path_factory.mktemp("node")
    port = free_base_port(1)
    proc = spawn_node(str(folder / "n1"), port, protection_groups=P)
    channel = storage_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", -1)])
    stub = storage_pb2_grpc.StorageStub(channel)
    try:
        yield {"stub": stub, "channel": channel, "port": port, "proc": proc, "log": str(folder / "n1.log")}
    finally:
        channel.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.fixture(autouse=True)
def still_serving(node):
    yield
    assert node["proc"].poll() is None, "the node process died"
    st = node["stub"].State(storage_pb2.StateRequest(), timeout=30, metadata=SOURCE)
    assert st.node == "n1" and len(st.scls) == P


def expect(code, error_class, call, *args):
    with pytest.raises(grpc.RpcError) as info:
        call(*args, timeout=10, metadata=SOURCE)
    e = info.value
    assert e.code() == code, (e.code(), e.details())
    if error_class is not None:
        assert dict(e.trailing_metadata() or ())[convert.ERROR_METADATA_KEY] == error_class.__name__, e.details()
        assert error_class.__name__ in e.details()
    return e


def frame_of(*records) -> bytes:
    return codec.encode_frame(list(records))


def test_garbage_frame_bytes_are_data_loss(node, rng):
    for n in (0, 1, 15, 16, 100, 4096):
        garbage = rng.randbytes(n)
        expect(grpc.StatusCode.DATA_LOSS, errors.CorruptRecord, node["stub"].Append, storage_pb2.AppendRequest(epoch=0, frame=garbage))


def test_a_frame_with_a_bad_crc_is_rejected_whole(node):
    good = codec.encode_record(1, 0, 0, FLAG_PUT | FLAG_CPL, b"k", b"v")
    bad = bytearray(codec.encode_record(2, 1, 0, FLAG_PUT | FLAG_CPL, b"k", b"w"))
    bad[-1] ^= 0x01
    e = expect(grpc.StatusCode.DATA_LOSS, errors.CorruptRecord, node["stub"].Append,
               storage_pb2.AppendRequest(epoch=0, frame=frame_of(good, bytes(bad))))
    assert "CRC" in e.details()
    st = node["stub"].State(storage_pb2.StateRequest(), metadata=SOURCE)
    assert st.records == 0, "nothing of a bad frame may be written"


def test_records_of_an_unknown_protection_group_are_not_found(node):
    rec = codec.encode_record(1, 0, P, FLAG_PUT | FLAG_CPL, b"k", b"v")
    expect(grpc.StatusCode.NOT_FOUND, errors.UnknownProtectionGroup, node["stub"].Append,
           storage_pb2.AppendRequest(epoch=0, frame=frame_of(rec)))


@pytest.mark.parametrize("pg", [P, P + 1, (1 << 32) - 1])
def test_reads_of_an_unknown_protection_group_are_not_found(node, pg):
    s = node["stub"]
    expect(grpc.StatusCode.NOT_FOUND, errors.UnknownProtectionGroup, s.Read, storage_pb2.ReadRequest(pg=pg, key=b"k"))
    expect(grpc.StatusCode.NOT_FOUND, errors.UnknownProtectionGroup, s.Scan, storage_pb2.SegmentScanRequest(pg=pg))
    expect(grpc.StatusCode.NOT_FOUND, errors.UnknownProtectionGroup, s.Fetch, storage_pb2.FetchRequest(pg=pg))
    expect(grpc.StatusCode.NOT_FOUND, errors.UnknownProtectionGroup, s.Corrupt, storage_pb2.CorruptRequest(pg=pg))


def test_keys_and_ranges_out_of_bounds_are_invalid(node):
    s = node["stub"]
    for key in (b"", b"k" * (KEY_BYTES_MAX + 1)):
        expect(grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidArgument, s.Read, storage_pb2.ReadRequest(pg=0, key=key))
    expect(grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidArgument, s.Read,
           storage_pb2.ReadRequest(pg=0, key=b"k", read_point=1, required_lsn=2))
    expect(grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidArgument, s.Scan,
           storage_pb2.SegmentScanRequest(pg=0, start=b"s" * 2000))
    expect(grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidArgument, s.Fetch,
           storage_pb2.FetchRequest(pg=0, after_lsn=10, upto_lsn=5))
    expect(grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidArgument, s.Corrupt, storage_pb2.CorruptRequest(pg=0, lsn=0))
    expect(grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidArgument, s.SetFaults, storage_pb2.FaultSpec(drop_probability=2.0))
    many = storage_pb2.ReadManyRequest(reads=[storage_pb2.ReadRequest(pg=0, key=b"k")] * (convert.BATCH_ITEMS_MAX + 1))
    expect(grpc.StatusCode.RESOURCE_EXHAUSTED, errors.ResourceExhausted, s.ReadMany, many)


def test_bad_truncations_and_memberships_are_invalid(node):
    s = node["stub"]
    for first, last in ((0, 5), (6, 5)):
        req = storage_pb2.SyncEpochRequest(epoch=0, truncations=[storage_pb2.TruncationRange(epoch=0, first=first, last=last)])
        expect(grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidArgument, s.SyncEpoch, req)
    for members in (["n1"] * 6, ["n1", "n2"], ["n1", "n2", "n3", "n4", "n5", ""]):
        req = storage_pb2.SyncEpochRequest(epoch=0, membership=storage_pb2.Membership(epoch=0, members=members))
        expect(grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidArgument, s.SyncEpoch, req)
    req = storage_pb2.SyncEpochRequest(epoch=0, truncations=[storage_pb2.TruncationRange(epoch=9, first=1, last=2)])
    expect(grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidArgument, s.SyncEpoch, req)


def test_epochs_fence_stale_writers_and_flag_newer_ones(node):
    s = node["stub"]
    st = s.State(storage_pb2.StateRequest(), metadata=SOURCE)
    e = st.epoch + 2
    s.Seal(storage_pb2.SealRequest(epoch=e), timeout=10, metadata=SOURCE)
    expect(grpc.StatusCode.FAILED_PRECONDITION, errors.StaleEpoch, s.Seal, storage_pb2.SealRequest(epoch=e))
    expect(grpc.StatusCode.FAILED_PRECONDITION, errors.StaleEpoch, s.Seal, storage_pb2.SealRequest(epoch=0))
    heartbeat = frame_of()
    expect(grpc.StatusCode.FAILED_PRECONDITION, errors.StaleEpoch, s.Append, storage_pb2.AppendRequest(epoch=e - 1, frame=heartbeat))
    expect(grpc.StatusCode.ABORTED, errors.EpochBehind, s.Append, storage_pb2.AppendRequest(epoch=e + 1, frame=heartbeat))
    expect(grpc.StatusCode.ABORTED, errors.EpochBehind, s.Append, storage_pb2.AppendRequest(epoch=e + 1000, frame=heartbeat))
    # Above the epoch bound: refused as an invalid argument (tests/test_node_boundary.py tries every field).
    expect(grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidArgument, s.Append, storage_pb2.AppendRequest(epoch=U64_MAX, frame=heartbeat))
    expect(grpc.StatusCode.FAILED_PRECONDITION, errors.StaleEpoch, s.SyncEpoch, storage_pb2.SyncEpochRequest(epoch=e - 1))
    # A reader at a newer epoch than the node's cannot be served by it.
    expect(grpc.StatusCode.OUT_OF_RANGE, errors.SegmentIncomplete, s.Read,
           storage_pb2.ReadRequest(pg=0, key=b"k", read_point=LSN_VALID_MAX, epoch=e + 1))
    # Sealed at e but not yet synced at it: an append at e waits for the writer's sync (the
    # sync carries that epoch's truncation ranges).
    rec = codec.encode_record(1, 0, 1, FLAG_PUT | FLAG_CPL, b"key", b"value")
    expect(grpc.StatusCode.ABORTED, errors.EpochBehind, s.Append, storage_pb2.AppendRequest(epoch=e, frame=frame_of(rec), hint_lsn=1))
    s.SyncEpoch(storage_pb2.SyncEpochRequest(epoch=e), timeout=10, metadata=SOURCE)
    # The node's own epoch works: a real record is accepted and read back.
    reply = s.Append(storage_pb2.AppendRequest(epoch=e, frame=frame_of(rec), hint_lsn=1), timeout=10, metadata=SOURCE)
    assert list(reply.scls) == [0, 1, 0, 0]
    got = s.Read(storage_pb2.ReadRequest(pg=1, key=b"key", read_point=LSN_VALID_MAX, required_lsn=1, epoch=e), timeout=10, metadata=SOURCE)
    assert got.found and got.value == b"value" and got.lsn == 1
    expect(grpc.StatusCode.OUT_OF_RANGE, errors.SegmentIncomplete, s.Read,
           storage_pb2.ReadRequest(pg=2, key=b"key", read_point=5, required_lsn=5, epoch=e))


def test_an_oversized_message_is_resource_exhausted(node):
    big = b"\0" * (convert.MESSAGE_BYTES_MAX + 1024)
    expect(grpc.StatusCode.RESOURCE_EXHAUSTED, None, node["stub"].Append, storage_pb2.AppendRequest(epoch=0, frame=big))


def test_random_bytes_as_requests(node, rng):
    """Random bytes sent as a request: either they do not parse (INTERNAL from gRPC), or they
    parse into fields whose meaning is checked. Never a crash, never UNKNOWN."""
    allowed = {
        grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DATA_LOSS, grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ABORTED, grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
    for method in ("Append", "Read", "ReadMany", "Scan", "Fetch", "SyncEpoch", "Seal"):
        call = node["channel"].unary_unary(f"/sixfold.v1.Storage/{method}", request_serializer=None, response_deserializer=None)
        for _ in range(20):
            raw = rng.randbytes(rng.randrange(1, 64))
            if method in ("Seal", "SyncEpoch"):
                raw = b"\x08\x00" + raw  # epoch 0 first: random epochs must not seal the test node at 2^64-1
            try:
                call(raw, timeout=10, metadata=SOURCE)
            except grpc.RpcError as e:
                assert e.code() in allowed, (method, raw, e.code(), e.details())


def test_fault_rules_cut_a_source_and_clear(node):
    t = GrpcTransport({"n1": f"127.0.0.1:{node['port']}"}, source="writer", volume_id="test-volume")
    admin = GrpcTransport({"n1": f"127.0.0.1:{node['port']}"}, source="chaos", volume_id="test-volume")
    try:
        admin.set_faults("n1", convert.FaultRules(blocked_sources=("writer",)))
        with pytest.raises(errors.Unavailable):
            t.state("n1")
        assert admin.state("n1").node == "n1", "admin sources are never cut off"
        admin.set_faults("n1", convert.FaultRules(groups=(("writer", "n2"), ("n1",))))
        with pytest.raises(errors.Unavailable):
            t.state("n1")
        admin.set_faults("n1", convert.FaultRules())
        assert t.state("n1").node == "n1"
    finally:
        t.close()
        admin.close()


def test_fault_rules_cut_one_process_by_its_pid(node):
    """`pid:<n>` in blocked_sources refuses every transport of that process, whatever its source
    name (the chaos nemesis cuts off the writer process, not the writer role); a caller that
    states another pid, or none, passes."""
    address = {"n1": f"127.0.0.1:{node['port']}"}
    mine = GrpcTransport(address, source="writer", volume_id="test-volume")
    also_mine = GrpcTransport(address, source="r1", volume_id="test-volume")
    admin = GrpcTransport(address, source="chaos", volume_id="test-volume")
    try:
        admin.set_faults("n1", convert.FaultRules(blocked_sources=(f"pid:{os.getpid()}",)))
        for t in (mine, also_mine):
            with pytest.raises(errors.Unavailable, match=f"pid:{os.getpid()}"):
                t.state("n1")
        other = ((convert.SOURCE_METADATA_KEY, "writer"), (convert.PROCESS_METADATA_KEY, str(os.getpid() + 1)),
                 (convert.VOLUME_METADATA_KEY, "test-volume"))
        assert node["stub"].State(storage_pb2.StateRequest(), timeout=10, metadata=other).node == "n1"
        assert node["stub"].State(storage_pb2.StateRequest(), timeout=10, metadata=other[:1] + other[2:]).node == "n1"
        assert admin.state("n1").node == "n1", "admin sources are never cut off"
        # In a partition the pid names the process too: on the far side, both transports are cut
        # off; on its own side, both pass (whatever their source names).
        me = f"pid:{os.getpid()}"
        admin.set_faults("n1", convert.FaultRules(groups=((me, "n2"), ("n1",))))
        for t in (mine, also_mine):
            with pytest.raises(errors.Unavailable, match="partitioned"):
                t.state("n1")
        assert node["stub"].State(storage_pb2.StateRequest(), timeout=10, metadata=other).node == "n1", "another process"
        admin.set_faults("n1", convert.FaultRules(groups=(("n2",), (me, "n1"))))
        assert mine.state("n1").node == "n1" and also_mine.state("n1").node == "n1"
        admin.set_faults("n1", convert.FaultRules())
        assert mine.state("n1").node == "n1" and also_mine.state("n1").node == "n1"
    finally:
        admin.set_faults("n1", convert.FaultRules())
        for t in (mine, also_mine, admin):
            t.close()


def test_a_stopped_node_is_unavailable_fast_then_answers_again(node):
    t = GrpcTransport({"n1": f"127.0.0.1:{node['port']}"}, source="writer", volume_id="test-volume")
    try:
        os.kill(node["proc"].pid, signal.SIGSTOP)
        try:
            for _ in range(2):
                with pytest.raises(errors.Unavailable):
                    t.state("n1")
        finally:
            os.kill(node["proc"].pid, signal.SIGCONT)
        # The channel reconnects (its backoff is capped at a second; how soon it answers again
        # measures the machine, that it does is the promise).
        eventually(lambda: _answers(t), "the resumed node to answer again")
        # While suspect, calls between probes fail at once; an answer, even an error, clears it.
        os.kill(node["proc"].pid, signal.SIGSTOP)
        try:
            with pytest.raises(errors.Unavailable):
                t.state("n1")
            with pytest.raises(errors.Unavailable, match="did not answer lately"):
                t.state("n1")
        finally:
            os.kill(node["proc"].pid, signal.SIGCONT)
        eventually(lambda: _answers_anything(t), "the resumed node to answer again")
        assert t.state("n1").node == "n1", "a node that answered with an error is not suspect"
    finally:
        t.close()


def _answers_anything(t) -> bool:
    try:
        t.read("n1", P, b"k", 0, 0, 0)  # a PG the node does not have: it answers NOT_FOUND
    except errors.UnknownProtectionGroup:
        return True
    except errors.Unavailable:
        return False
    return True


def _answers(t) -> bool:
    try:
        return t.state("n1").node == "n1"
    except errors.Unavailable:
        return False


def test_sigterm_stops_the_node_cleanly(tmp_path):
    port = free_base_port(1)
    proc = spawn_node(str(tmp_path / "n9"), port, node_id="n9", protection_groups=2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(DEADLINE_S) == 0
    with open(tmp_path / "n9.log") as fh:
        assert "stopped cleanly" in fh.read()
    # The data folder reopens (LMDB closed cleanly) on the same port.
    proc = spawn_node(str(tmp_path / "n9"), port, node_id="n9", protection_groups=2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(DEADLINE_S) == 0


def test_a_busy_port_is_a_clear_error(tmp_path, node):
    out = subprocess.run(
        [sys.executable, "-m", "engine", "node", "serve", "--id", "n8", "--az", "a", "--data", str(tmp_path / "n8"),
         "--listen", f"127.0.0.1:{node['port']}", "--volume-id", "v", "--protection-groups", "2", "--peers", "n8=x:1"],
        capture_output=True, text=True, timeout=60, env=engine_env(),
    )
    assert out.returncode == 2
    assert "in use" in out.stderr
    assert not os.path.exists(tmp_path / "n8"), "a busy port fails before any data is touched"


def test_a_request_for_another_volume_or_none_is_refused_and_changes_nothing(node):
    """Storage protocol 2: every request names its volume; a frame or seal meant for another
    volume (or naming none: an older client) is refused FAILED_PRECONDITION / WrongVolume."""
    address = f"127.0.0.1:{node['port']}"
    frame = codec.encode_frame([codec.encode_record(1, 0, 0, FLAG_PUT | FLAG_CPL, b"k", b"v")])
    before = node["stub"].State(storage_pb2.StateRequest())
    for channel in (storage_channel(address, "another-volume"), grpc.insecure_channel(address)):
        stub = storage_pb2_grpc.StorageStub(channel)
        for call, req in [(stub.Append, storage_pb2.AppendRequest(epoch=before.epoch, frame=frame, hint_lsn=0)),
                          (stub.Seal, storage_pb2.SealRequest(epoch=before.epoch + 1)),
                          (stub.State, storage_pb2.StateRequest())]:
            with pytest.raises(grpc.RpcError) as e:
                call(req, timeout=10)
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert convert.error_from_rpc(e.value, where="n1").__class__.__name__ == "WrongVolume"
        channel.close()
    after = node["stub"].State(storage_pb2.StateRequest())
    assert (after.epoch, list(after.scls)) == (before.epoch, list(before.scls))
    t = GrpcTransport({"n1": address}, source="writer", volume_id="not-this-one")
    try:
        with pytest.raises(errors.WrongVolume):
            t.state("n1")
    finally:
        t.close()


def test_a_node_says_who_it_knows_without_naming_the_volume(node):
    """`Storage.Directory` is how a caller holding only an address learns the volume (`sixfold
    status --via`): it takes no volume metadata, unlike every other Storage call. A node started
    with --peers knows itself and its peers."""
    from engine.proto import common_pb2

    address = f"127.0.0.1:{node['port']}"
    channel = grpc.insecure_channel(address)  # no volume metadata at all
    try:
        reply = storage_pb2_grpc.StorageStub(channel).Directory(common_pb2.DirectoryRequest(), timeout=10)
    finally:
        channel.close()
    d = convert.directory_from_pb(reply)
    assert (d.volume_id, d.me) == ("test-volume", "n1")
    assert d.processes == (convert.KnownProcess("n1", "node", "a", address),)
