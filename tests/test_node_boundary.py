"""Every integer field of every Storage RPC, at its boundaries, sent to one live node process.

A u64 on the wire can hold values the engine's arithmetic cannot take (`epoch + 1`, `hint + 1`,
`after_lsn + 1`): each field has a bound (`engine.core.constants`), and a request with a field
outside it is refused with `InvalidArgument` and changes nothing. Inside the bounds the node
answers OK or with a typed Sixfold error (class name in the trailing metadata `sixfold-error`),
never INTERNAL or UNKNOWN, and whatever it refuses leaves the volume as it was: epoch, SCLs,
record count, hint, truncations, membership, and what reads and scans of the written keys see.

Hypothesis draws each field from its edges (0, 1, bound - 1, bound, bound + 1, 2^32 - 1, 2^63,
2^64 - 1), from values near the node's current epoch, and at random.
"""

from __future__ import annotations

import grpc
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from engine import codec
from engine.cluster.testing import free_base_port, spawn_node, storage_channel
from engine.core.constants import (
    EPOCH_MAX,
    FLAG_CPL,
    FLAG_PUT,
    LSN_VALID_MAX,
    TRUNCATION_LSN_MAX,
    U32_MAX,
    U64_MAX,
)
from engine.proto import storage_pb2, storage_pb2_grpc
from engine.transport import convert

pytestmark = pytest.mark.cluster

P = 4
SOURCE = (("sixfold-source", "cli"),)
EXAMPLES = settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow], deadline=None)
#: the acknowledged records every example must leave intact: LSN 100.. in every PG
WRITTEN = [(100 + i, i % P, f"k{i:02d}".encode(), f"value-{i}".encode()) for i in range(12)]
WRITTEN_LSNS = range(100, 100 + len(WRITTEN))

EDGES = sorted({
    0, 1, 2, 99, 100, 111, 112, U32_MAX, 1 << 32, LSN_VALID_MAX - 1, LSN_VALID_MAX, LSN_VALID_MAX + 1,
    TRUNCATION_LSN_MAX, TRUNCATION_LSN_MAX + 1, EPOCH_MAX - 1, EPOCH_MAX, EPOCH_MAX + 1, (1 << 63) - 1, 1 << 63,
    U64_MAX - 1, U64_MAX,
})
U64 = st.one_of(st.sampled_from(EDGES), st.integers(0, U64_MAX))
U32 = st.one_of(st.sampled_from([0, 1, P - 1, P, 10_000, 10_001, U32_MAX]), st.integers(0, U32_MAX))
#: an epoch: an edge, a random u64, or relative to the node's current epoch (resolved per call)
EPOCH = st.one_of(U64, st.integers(-1, 2).map(lambda d: ("current", d)))


class Node:
    """The live node, a cached picture of its volume, and the LSNs that hold a record."""

    def __init__(self, stub):
        self.stub = stub
        self.picture = None
        self.held = set(WRITTEN_LSNS)

    def call(self, rpc: str, request):
        """(reply, None) or (None, error class name); asserts the error is a typed one."""
        try:
            return getattr(self.stub, rpc)(request, timeout=30, metadata=SOURCE), None
        except grpc.RpcError as e:
            name = dict(e.trailing_metadata() or ()).get(convert.ERROR_METADATA_KEY)
            assert e.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (rpc, request, e.code(), e.details())
            assert name in convert.ERRORS_BY_NAME, (rpc, request, e.code(), e.details())
            assert e.code() == getattr(grpc.StatusCode, convert.ERRORS_BY_NAME[name].GRPC_STATUS)
            return None, name

    def epoch(self) -> int:
        return self.stub.State(storage_pb2.StateRequest(), timeout=30, metadata=SOURCE).epoch

    def resolve(self, value) -> int:
        if isinstance(value, tuple):
            return max(0, self.epoch() + value[1])
        return value

    def look(self):
        """What the volume holds, as a comparable value."""
        st = self.stub.State(storage_pb2.StateRequest(), timeout=30, metadata=SOURCE)
        reads = self.stub.ReadMany(storage_pb2.ReadManyRequest(reads=[
            storage_pb2.ReadRequest(pg=pg, key=key, read_point=LSN_VALID_MAX, epoch=st.epoch) for _lsn, pg, key, _v in WRITTEN
        ]), timeout=30, metadata=SOURCE)
        scans = []
        for pg in range(P):
            r = self.stub.Scan(storage_pb2.SegmentScanRequest(pg=pg, read_point=LSN_VALID_MAX, limit=10_000, epoch=st.epoch),
                               timeout=30, metadata=SOURCE)
            scans.append(tuple((e.key, e.lsn, e.deleted, e.value) for e in r.entries))
        for (lsn, _pg, _key, value), item in zip(WRITTEN, reads.results):
            assert not item.HasField("error"), item.error
            assert (item.reply.lsn, item.reply.value) == (lsn, value), "an acknowledged record was lost"
        return (
            st.epoch, tuple(st.scls), st.records, st.hint_lsn,
            tuple((t.epoch, t.first, t.last) for t in st.truncations),
            (st.membership.epoch, tuple(st.membership.members), tuple(st.membership.next_members)) if st.HasField("membership") else None,
            tuple(scans),
        )

    def send(self, rpc: str, request, *, out_of_bounds: bool, mutates: bool, refusals=("InvalidArgument",)):
        """Send one request; check the reply against the bounds and the volume against the picture."""
        if self.picture is None:
            self.picture = self.look()
        reply, error = self.call(rpc, request)
        if out_of_bounds:
            assert error in refusals, f"{rpc} with a field out of bounds was answered {error or 'OK'}: {request}"
        if error is not None or not mutates:
            assert self.look() == self.picture, f"refused {rpc} ({error}) changed the volume: {request}"
        else:
            self.picture = None  # accepted: the volume may have changed as asked
        return reply, error


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    folder = tmp_path_factory.mktemp("boundary")
    port = free_base_port(1)
    proc = spawn_node(str(folder / "n1"), port, protection_groups=P)
    channel = storage_channel(f"127.0.0.1:{port}")
    stub = storage_pb2_grpc.StorageStub(channel)
    stub.SyncEpoch(storage_pb2.SyncEpochRequest(epoch=2), timeout=30, metadata=SOURCE)
    prev = [0] * P
    records = []
    for lsn, pg, key, value in WRITTEN:
        records.append(codec.encode_record(lsn, prev[pg], pg, FLAG_PUT | FLAG_CPL, key, value))
        prev[pg] = lsn
    reply = stub.Append(storage_pb2.AppendRequest(epoch=2, frame=codec.encode_frame(records), hint_lsn=WRITTEN[-1][0]),
                        timeout=30, metadata=SOURCE)
    assert list(reply.scls) == [WRITTEN[-P + pg][0] for pg in range(P)]
    try:
        yield Node(stub)
    finally:
        channel.close()
        alive = proc.poll() is None
        proc.kill()
        proc.wait(10)
        assert alive, "the node process died"


def probe_frame(lsn: int, prev_lsn: int, pg: int) -> bytes:
    """A frame of one record (or none: LSN 0 names no record and cannot be encoded)."""
    if lsn == 0:
        return codec.encode_frame([])
    return codec.encode_frame([codec.encode_record(lsn, min(prev_lsn, lsn - 1), pg % P, FLAG_PUT | FLAG_CPL, b"probe", b"p")])


@EXAMPLES
@given(epoch=EPOCH, hint=U64, lsn=U64, prev=st.sampled_from(["zero", "below"]), pg=st.integers(0, P - 1))
def test_append(node, epoch, hint, lsn, prev, pg):
    epoch = node.resolve(epoch)
    frame = probe_frame(lsn, 0 if prev == "zero" else max(0, lsn - 1), pg)
    oob = epoch > EPOCH_MAX or hint > LSN_VALID_MAX or lsn > LSN_VALID_MAX
    _reply, error = node.send("Append", storage_pb2.AppendRequest(epoch=epoch, frame=frame, hint_lsn=hint), out_of_bounds=oob,
                              mutates=True)
    if error is None and lsn:
        node.held.add(lsn)


@EXAMPLES
@given(lsn=U64, prev=st.sampled_from(["zero", "below"]), pg=st.integers(0, P - 1))
def test_repair_append(node, lsn, prev, pg):
    frame = probe_frame(lsn, 0 if prev == "zero" else max(0, lsn - 1), pg)
    _reply, error = node.send("RepairAppend", storage_pb2.RepairAppendRequest(frame=frame), out_of_bounds=lsn > LSN_VALID_MAX,
                              mutates=True)
    if error is None and lsn:
        node.held.add(lsn)


def _read_request(node, pg, read_point, required_lsn, epoch):
    req = storage_pb2.ReadRequest(pg=pg, key=b"k00", read_point=read_point, required_lsn=required_lsn, epoch=node.resolve(epoch))
    oob = read_point > LSN_VALID_MAX or required_lsn > LSN_VALID_MAX or req.epoch > EPOCH_MAX
    return req, oob


@EXAMPLES
@given(pg=U32, read_point=U64, required_lsn=U64, epoch=EPOCH)
def test_read(node, pg, read_point, required_lsn, epoch):
    req, oob = _read_request(node, pg, read_point, required_lsn, epoch)
    node.send("Read", req, out_of_bounds=oob, mutates=False, refusals=("InvalidArgument", "UnknownProtectionGroup"))


@EXAMPLES
@given(items=st.lists(st.tuples(U32, U64, U64, EPOCH), min_size=1, max_size=3))
def test_read_many(node, items):
    built = [_read_request(node, *item) for item in items]
    reply, error = node.send("ReadMany", storage_pb2.ReadManyRequest(reads=[r for r, _ in built]), out_of_bounds=False,
                             mutates=False)
    assert error is None
    for (_req, oob), result in zip(built, reply.results):
        if oob:
            assert result.HasField("error") and result.error.error in ("InvalidArgument", "UnknownProtectionGroup"), result
        if result.HasField("error"):
            assert result.error.error in convert.ERRORS_BY_NAME, result


@EXAMPLES
@given(pg=U32, read_point=U64, required_lsn=U64, limit=U32, epoch=EPOCH)
def test_scan(node, pg, read_point, required_lsn, limit, epoch):
    req = storage_pb2.SegmentScanRequest(pg=pg, read_point=read_point, required_lsn=required_lsn, limit=limit,
                                         epoch=node.resolve(epoch))
    oob = read_point > LSN_VALID_MAX or required_lsn > LSN_VALID_MAX or req.epoch > EPOCH_MAX
    node.send("Scan", req, out_of_bounds=oob, mutates=False, refusals=("InvalidArgument", "UnknownProtectionGroup"))


@EXAMPLES
@given(epoch=EPOCH)
def test_seal(node, epoch):
    epoch = node.resolve(epoch)
    node.send("Seal", storage_pb2.SealRequest(epoch=epoch), out_of_bounds=epoch > EPOCH_MAX, mutates=True)


TRUNCATION = st.tuples(EPOCH, U64, U64)


@EXAMPLES
@given(epoch=EPOCH, truncations=st.lists(TRUNCATION, max_size=2), membership_epoch=st.one_of(st.none(), EPOCH))
def test_sync_epoch(node, epoch, truncations, membership_epoch):
    epoch = node.resolve(epoch)
    ranges = [(node.resolve(e), first, last) for e, first, last in truncations]
    # A valid range over the acknowledged records would cut them, as asked: not what this test is about.
    assume(not any(1 <= first <= last <= TRUNCATION_LSN_MAX and first <= WRITTEN_LSNS[-1] and last >= WRITTEN_LSNS[0]
                   for _e, first, last in ranges))
    req = storage_pb2.SyncEpochRequest(epoch=epoch, truncations=[storage_pb2.TruncationRange(epoch=e, first=f, last=la)
                                                                 for e, f, la in ranges])
    oob = epoch > EPOCH_MAX or any(e > EPOCH_MAX or f > TRUNCATION_LSN_MAX or la > TRUNCATION_LSN_MAX for e, f, la in ranges)
    if membership_epoch is not None:
        membership_epoch = node.resolve(membership_epoch)
        req.membership.CopyFrom(storage_pb2.Membership(epoch=membership_epoch, members=["n1", "n2", "n3", "n4", "n5", "n6"]))
        oob = oob or membership_epoch > EPOCH_MAX
    node.send("SyncEpoch", req, out_of_bounds=oob, mutates=True)


@EXAMPLES
@given(pg=U32, after_lsn=U64, max_bytes=U64, upto_lsn=st.one_of(st.none(), U64))
def test_fetch(node, pg, after_lsn, max_bytes, upto_lsn):
    req = storage_pb2.FetchRequest(pg=pg, after_lsn=after_lsn, max_bytes=max_bytes)
    if upto_lsn is not None:
        req.upto_lsn = upto_lsn
    oob = after_lsn > LSN_VALID_MAX or (upto_lsn or 0) > LSN_VALID_MAX
    reply, error = node.send("Fetch", req, out_of_bounds=oob, mutates=False,
                             refusals=("InvalidArgument", "UnknownProtectionGroup"))
    if error is None:
        for r in codec.decode_frame(reply.frame):
            assert after_lsn < r.lsn <= (upto_lsn if upto_lsn is not None else LSN_VALID_MAX)


@EXAMPLES
@given(pg=U32, lsn=U64, bit=U64)
def test_corrupt(node, pg, lsn, bit):
    oob = lsn > LSN_VALID_MAX
    # A request in bounds that names a stored record would damage it, as asked: skip those.
    assume(oob or pg >= P or lsn not in node.held)
    node.send("Corrupt", storage_pb2.CorruptRequest(pg=pg, lsn=lsn, bit=bit), out_of_bounds=oob, mutates=False,
              refusals=("InvalidArgument", "UnknownProtectionGroup"))


@EXAMPLES
@given(records_max=U64)
def test_scrub(node, records_max):
    reply, _error = node.send("Scrub", storage_pb2.ScrubRequest(records_max=records_max), out_of_bounds=False, mutates=False)
    assert reply is not None and reply.corrupt_found == 0


@EXAMPLES
@given(seed=U64, delay_ms=U32, jitter_ms=U32)
def test_set_faults(node, seed, delay_ms, jitter_ms):
    try:
        node.send("SetFaults", storage_pb2.FaultSpec(seed=seed, delay_ms=delay_ms, delay_jitter_ms=jitter_ms),
                  out_of_bounds=max(delay_ms, jitter_ms) > convert.DELAY_MS_MAX, mutates=False)
    finally:
        node.call("SetFaults", storage_pb2.FaultSpec())


def test_the_node_still_serves_the_written_records(node):
    node.picture = None
    node.look()  # asserts every acknowledged record reads back
    assert node.call("State", storage_pb2.StateRequest())[1] is None


# --- the same bounds for in-process callers (an embedded volume calls StorageNode.handle) ----
def test_in_process_requests_out_of_bounds_are_refused_and_change_nothing(tmp_path):
    from engine.core.types import Geometry, Membership, NodeInfo, TruncationRange
    from engine.errors import InvalidArgument
    from engine.node.service import StorageNode

    node = StorageNode(str(tmp_path / "n1"), NodeInfo("n1", "a"), Geometry(P), "vol", durable=False)
    try:
        node.handle("sync_epoch", 2, (), None)
        good = codec.encode_frame([codec.encode_record(1, 0, 0, FLAG_PUT | FLAG_CPL, b"k", b"v")])
        node.handle("append", 2, good, 1)
        before = node.handle("state")
        members = ("n1", "n2", "n3", "n4", "n5", "n6")
        refused = [
            ("seal", U64_MAX), ("seal", EPOCH_MAX + 1),
            ("seal", EPOCH_MAX),  # in bounds, but a jump of more than EPOCH_STEP_MAX: it would use up the epochs
            ("append", 2, codec.encode_frame([]), U64_MAX), ("append", U64_MAX, codec.encode_frame([]), 0),
            ("append", 2, codec.encode_frame([codec.encode_record(2, 1, 0, FLAG_PUT | FLAG_CPL, b"k", b"w"),
                                             codec.encode_record(U64_MAX, 2, 1, FLAG_PUT | FLAG_CPL, b"j", b"w")]), 2),
            ("repair_append", codec.encode_frame([codec.encode_record(LSN_VALID_MAX + 1, 0, 0, FLAG_PUT | FLAG_CPL, b"x", b"")])),
            ("sync_epoch", U64_MAX, (), None),
            ("sync_epoch", 2, (TruncationRange(2, 5, U64_MAX),), None),
            ("sync_epoch", 2, (), Membership(U64_MAX, members)),
            ("fetch", 0, U64_MAX, 1 << 20, None), ("fetch", 0, 0, 1 << 20, U64_MAX),
            ("read", 0, b"k", U64_MAX, 0, 2), ("read", 0, b"k", 1, 0, U64_MAX),
            ("scan", 0, b"", None, 1, U64_MAX, 10, 2),
            ("corrupt", 0, U64_MAX, 0),
        ]
        for method, *args in refused:
            with pytest.raises(InvalidArgument):
                node.handle(method, *args)
            after = node.handle("state")
            assert (after.epoch, after.scls, after.records, after.hint_lsn, after.truncations, after.membership) == (
                before.epoch, before.scls, before.records, before.hint_lsn, before.truncations, before.membership), method
        assert node.handle("read", 0, b"k", 1, 1, 2).value == b"v"
        # The highest valid epoch and LSN still work, and seal's `hint + 1` cannot overflow.
        node.handle("append", 2, codec.encode_frame([]), LSN_VALID_MAX)
        assert node.handle("seal", 3).segments[0].hint_lsn == LSN_VALID_MAX
    finally:
        node.close()
