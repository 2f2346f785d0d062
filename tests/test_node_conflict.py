"""One LSN names one record for ever: a frame carrying a different record at an LSN the segment
already holds is refused whole with ConflictingRecord, nothing of it written or indexed, counted
and logged; identical re-sends (duplicates, gossip, a writer's resend) stay harmless.

Before this rule the log kept its old copy while the version index gained the new record's key,
and every later scan crossing that key failed its CRC check on every replica, for ever.
"""

from __future__ import annotations

import logging

import grpc
import pytest

from engine import codec
from engine.cluster.testing import free_base_port, spawn_node, storage_channel
from engine.core.constants import FLAG_CPL, FLAG_PUT, LSN_VALID_MAX
from engine.core.types import Geometry, NodeInfo
from engine.errors import ConflictingRecord
from engine.node.service import StorageNode
from engine.proto import storage_pb2, storage_pb2_grpc
from engine.transport import convert

P = 2
SOURCE = (("sixfold-source", "cli"),)


def rec(lsn, prev, pg, key, value):
    return codec.encode_record(lsn, prev, pg, FLAG_PUT | FLAG_CPL, key, value)


#: acknowledged: PG 0 holds a@1, c@5; PG 1 holds b@2 (LSNs 3 and 4 are free on this node)
ACKED = [rec(1, 0, 0, b"a", b"A1"), rec(2, 0, 1, b"b", b"B2"), rec(5, 1, 0, b"c", b"C5")]


def conflicting_frames():
    return [
        ("other key", codec.encode_frame([rec(5, 1, 0, b"x", b"X5")])),
        ("same key, other value", codec.encode_frame([rec(5, 1, 0, b"c", b"evil")])),
        ("other prev_lsn", codec.encode_frame([rec(5, 0, 0, b"c", b"C5")])),
        ("with a new record before it", codec.encode_frame([rec(3, 1, 0, b"n", b"new"), rec(5, 1, 0, b"x", b"X5")])),
        ("with a new record after it", codec.encode_frame([rec(5, 1, 0, b"x", b"X5"), rec(6, 5, 0, b"d", b"D6")])),
    ]


def view(node: StorageNode):
    """What readers see: every key of every PG at the highest read point, and the counters."""
    st = node.handle("state")
    scans = [node.handle("scan", pg, b"", None, LSN_VALID_MAX, 0, 1000, st.epoch)[0] for pg in range(P)]
    return st.scls, st.records, [[(e.key, e.lsn, e.value) for e in entries] for entries in scans]


@pytest.fixture
def node(tmp_path):
    n = StorageNode(str(tmp_path / "n1"), NodeInfo("n1", "a"), Geometry(P), "vol", durable=False)
    n.handle("sync_epoch", 1, (), None)
    n.handle("append", 1, codec.encode_frame(ACKED), 5)
    yield n
    n.close()


def test_a_conflicting_frame_is_refused_whole_and_every_scan_is_unharmed(node, caplog):
    before = view(node)
    assert before[2] == [[(b"a", 1, b"A1"), (b"c", 5, b"C5")], [(b"b", 2, b"B2")]]
    refused = 0
    for what, frame in conflicting_frames():
        for method, args in (("append", (1, frame, 5)), ("repair_append", (frame,))):
            with caplog.at_level(logging.WARNING, logger="sixfold.store"):
                caplog.clear()
                with pytest.raises(ConflictingRecord, match="LSN 5"):
                    node.handle(method, *args)
            refused += 1
            assert view(node) == before, f"{method} of a frame {what} changed the segment"
            assert node.handle("read", 0, b"c", 5, 5, 1).value == b"C5"
            for key in (b"x", b"d", b"n"):
                assert node.handle("read", 0, key, LSN_VALID_MAX, 0, 1).lsn == 0, f"{key} of a refused frame was indexed"
            assert node.handle("state").conflicts_refused == refused
            lines = [r.getMessage() for r in caplog.records if r.name == "sixfold.store"]
            assert len(lines) == 1 and "n1" in lines[0] and "LSN 5" in lines[0], lines
            assert ("epoch 1" in lines[0]) if method == "append" else ("repair" in lines[0]), lines[0]


def test_identical_resends_are_harmless(node):
    before = view(node)
    for _ in range(2):
        node.handle("append", 1, codec.encode_frame(ACKED), 5)
        node.handle("repair_append", codec.encode_frame(ACKED[1:]))
    assert view(node) == before and node.handle("state").conflicts_refused == 0
    # A resend that also carries a new record lands the new one.
    node.handle("append", 1, codec.encode_frame([ACKED[2], rec(6, 5, 0, b"d", b"D6")]), 6)
    assert node.handle("read", 0, b"d", 6, 6, 1).value == b"D6" and node.handle("state").scls[0] == 6


def test_a_corrupt_copy_is_replaced_by_a_good_one_not_counted_as_a_conflict(node):
    assert node.handle("corrupt", 0, 5, 77) == 5  # bit rot at rest, not yet found by a read or scrub
    node.handle("repair_append", codec.encode_frame([ACKED[2]]))
    assert node.handle("read", 0, b"c", 5, 5, 1).value == b"C5"
    st = node.handle("state")
    assert st.conflicts_refused == 0 and st.corrupt_found == 0 and st.records == 3


def test_the_refusal_count_survives_a_restart(tmp_path):
    path = str(tmp_path / "n1")
    n = StorageNode(path, NodeInfo("n1", "a"), Geometry(P), "vol", durable=False)
    n.handle("sync_epoch", 1, (), None)
    n.handle("append", 1, codec.encode_frame(ACKED), 5)
    with pytest.raises(ConflictingRecord):
        n.handle("append", 1, conflicting_frames()[0][1], 3)
    n.close()
    n = StorageNode(path, NodeInfo("n1", "a"), Geometry(P), "vol", durable=False)
    try:
        assert n.handle("state").conflicts_refused == 1
    finally:
        n.close()


@pytest.mark.cluster
def test_over_grpc_a_conflict_is_already_exists_and_counted(tmp_path):
    port = free_base_port(1)
    proc = spawn_node(str(tmp_path / "n1"), port, protection_groups=P)
    try:
        with storage_channel(f"127.0.0.1:{port}") as channel:
            stub = storage_pb2_grpc.StorageStub(channel)
            stub.SyncEpoch(storage_pb2.SyncEpochRequest(epoch=1), timeout=30, metadata=SOURCE)
            stub.Append(storage_pb2.AppendRequest(epoch=1, frame=codec.encode_frame(ACKED), hint_lsn=5), timeout=30, metadata=SOURCE)
            for call, request in (
                (stub.Append, storage_pb2.AppendRequest(epoch=1, frame=conflicting_frames()[4][1], hint_lsn=5)),
                (stub.RepairAppend, storage_pb2.RepairAppendRequest(frame=conflicting_frames()[3][1])),
            ):
                with pytest.raises(grpc.RpcError) as e:
                    call(request, timeout=30, metadata=SOURCE)
                assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
                assert dict(e.value.trailing_metadata())[convert.ERROR_METADATA_KEY] == "ConflictingRecord"
            st = stub.State(storage_pb2.StateRequest(), timeout=30, metadata=SOURCE)
            assert st.conflicts_refused == 2 and st.records == 3 and list(st.scls) == [5, 2]
            scan = stub.Scan(storage_pb2.SegmentScanRequest(pg=0, read_point=LSN_VALID_MAX, limit=100, epoch=1), timeout=30,
                             metadata=SOURCE)
            assert [(x.key, x.lsn, x.value) for x in scan.entries] == [(b"a", 1, b"A1"), (b"c", 5, b"C5")]
    finally:
        alive = proc.poll() is None
        proc.kill()
        proc.wait(10)
        assert alive, "the node process died"
