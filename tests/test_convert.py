"""The protobuf adapter: every core value survives the wire, and every error comes back as itself.

Each `*_to_pb` / `*_from_pb` pair is checked through the serialized bytes (what really travels),
with hypothesis drawing the values. Then the error mapping: an error a server aborts with
reaches the client as the same class with the same message; errors that did not come from
Sixfold map to `Unavailable` (or `WriteIndeterminate` for a write that may have been sent).
Last, the server-side checks: fields that parse but mean nothing are refused with typed errors.
"""

from __future__ import annotations

import json

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine import errors
from engine.core.constants import (
    EPOCH_MAX,
    FLAG_CPL,
    FLAG_DELETE,
    FLAG_PUT,
    KEY_BYTES_MAX,
    LSN_VALID_MAX,
    REPLICAS,
    TRUNCATION_LSN_MAX,
    U64_MAX,
)
from engine.core.types import (
    AppendReply,
    Membership,
    NodeState,
    ReadPointUpdate,
    ReadReply,
    RecordHeader,
    SealReply,
    SegmentSummary,
    TruncationRange,
    VersionEntry,
)
from engine.head.writer import ReadView
from engine.proto import common_pb2, kv_pb2, storage_pb2
from engine.transport import convert

U64 = st.integers(0, (1 << 64) - 1)
U32 = st.integers(0, (1 << 32) - 1)
#: what a request may carry (replies carry any u64: they come from a node that checked)
EPOCH = st.integers(0, EPOCH_MAX)
LSN = st.integers(0, LSN_VALID_MAX)
NODE = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=8)
KEY = st.binary(min_size=1, max_size=KEY_BYTES_MAX)
VALUE = st.binary(max_size=256)


def wire(msg):
    """A message as the peer parses it from the bytes on the wire."""
    return type(msg).FromString(msg.SerializeToString())


@st.composite
def truncations(draw):
    first = draw(st.integers(1, (1 << 64) - 2))
    return TruncationRange(draw(U64), first, draw(st.integers(first, (1 << 64) - 1)))


@st.composite
def memberships(draw):
    ids = draw(st.lists(NODE, min_size=2 * REPLICAS, max_size=2 * REPLICAS, unique=True))
    nxt = tuple(ids[REPLICAS:]) if draw(st.booleans()) else None
    return Membership(draw(U64), tuple(ids[:REPLICAS]), nxt)


@st.composite
def read_replies(draw):
    kind = draw(st.sampled_from(["none", "value", "tombstone"]))
    if kind == "none":
        return ReadReply(draw(NODE), 0, None)
    if kind == "tombstone":
        return ReadReply(draw(NODE), draw(U64), None, True)
    return ReadReply(draw(NODE), draw(U64), draw(VALUE))


VERSION = st.builds(VersionEntry, KEY, U64, st.one_of(st.none(), VALUE))
HEADER = st.builds(RecordHeader, U64, U64, st.integers(0, 255))
SUMMARY = st.builds(SegmentSummary, NODE, U32, U64, U64, U64, st.lists(HEADER, max_size=20).map(tuple))
NODE_STATE = st.builds(
    NodeState,
    node=NODE, az=NODE, epoch=U64, scls=st.lists(U64, max_size=16).map(tuple), hint_lsn=U64, records=U64, bytes=U64,
    corrupt_found=U64, repaired=U64, truncations=st.lists(truncations(), max_size=4).map(tuple),
    membership=st.one_of(st.none(), memberships()), conflicts_refused=U64, used_bytes=U64, capacity_bytes=U64,
    space_low=st.booleans(), room_bytes=U64,
    extra=st.dictionaries(st.text(max_size=8), st.one_of(st.integers(-(1 << 50), 1 << 50), st.booleans(), st.text(max_size=8)), max_size=4),
)
OPS = st.lists(
    st.one_of(st.tuples(st.just(FLAG_PUT), KEY, VALUE), st.tuples(st.just(FLAG_DELETE), KEY, st.just(b""))),
    min_size=1, max_size=8,
).map(tuple)


# --- round trips ------------------------------------------------------------------------------
@given(st.builds(AppendReply, NODE, st.lists(U64, max_size=64).map(tuple), st.booleans(), U64))
def test_append_reply_round_trips(r):
    assert convert.append_reply_from_pb(wire(convert.append_reply_to_pb(r))) == r


@given(read_replies())
def test_read_reply_round_trips(r):
    assert convert.read_reply_from_pb(wire(convert.read_reply_to_pb(r))) == r


@given(st.lists(st.one_of(read_replies(), st.sampled_from([errors.SegmentIncomplete("behind"), errors.InvalidArgument("bad")]))))
def test_read_many_results_round_trip(results):
    back = convert.read_results_from_pb(wire(convert.read_results_to_pb(results)))
    assert [(type(r), str(r)) if isinstance(r, Exception) else r for r in back] == [
        (type(r), str(r)) if isinstance(r, Exception) else r for r in results
    ]


@given(st.lists(VERSION, max_size=10), st.one_of(st.none(), st.binary(max_size=16)))
def test_scan_reply_round_trips(entries, resume):
    assert convert.scan_reply_from_pb(wire(convert.scan_reply_to_pb(entries, resume))) == (entries, resume)


@given(st.builds(SealReply, NODE, U64, st.lists(SUMMARY, max_size=8).map(tuple), st.lists(truncations(), max_size=4).map(tuple)))
def test_seal_reply_round_trips(r):
    assert convert.seal_reply_from_pb(wire(convert.seal_reply_to_pb(r))) == r


@given(NODE_STATE)
def test_node_state_round_trips(s):
    back = convert.node_state_from_pb(wire(convert.node_state_to_pb(s)))
    assert back == s and back.extra == s.extra


@given(EPOCH, st.lists(truncations(), max_size=4), st.one_of(st.none(), memberships()))
def test_sync_epoch_request_round_trips(epoch, truncs, membership):
    truncs = [TruncationRange(min(t.epoch, epoch), min(t.first, TRUNCATION_LSN_MAX), min(t.last, TRUNCATION_LSN_MAX)) for t in truncs]
    if membership is not None:
        membership = Membership(min(membership.epoch, epoch), membership.members, membership.next_members)
    m = wire(convert.sync_epoch_request_to_pb(epoch, truncs, membership))
    assert convert.sync_epoch_args_from_pb(m) == (epoch, tuple(truncs), membership)


@given(st.integers(1, 64), st.data())
def test_read_request_round_trips(P, data):
    pg = data.draw(st.integers(0, P - 1))
    read_point = data.draw(LSN)
    namespace = data.draw(st.sampled_from([0, 1]))
    key = data.draw(KEY if namespace == 0 else st.binary(min_size=1, max_size=64))
    args = (pg, key, read_point, data.draw(st.integers(0, read_point)), data.draw(EPOCH), namespace)
    assert convert.read_args_from_pb(wire(convert.read_request_to_pb(*args)), P) == args


@given(st.integers(1, 64), st.data())
def test_scan_and_fetch_requests_round_trip(P, data):
    pg = data.draw(st.integers(0, P - 1))
    rp = data.draw(LSN)
    scan = (pg, data.draw(st.binary(max_size=KEY_BYTES_MAX)), data.draw(st.one_of(st.none(), st.binary(max_size=KEY_BYTES_MAX))),
            rp, data.draw(st.integers(0, rp)), data.draw(U32), data.draw(EPOCH))
    assert convert.scan_args_from_pb(wire(convert.scan_request_to_pb(*scan)), P) == scan
    after = data.draw(LSN)
    fetch = (pg, after, data.draw(U64), data.draw(st.one_of(st.none(), st.integers(after, LSN_VALID_MAX))))
    assert convert.fetch_args_from_pb(wire(convert.fetch_request_to_pb(*fetch)), P) == fetch


@given(st.lists(OPS, min_size=1, max_size=5))
def test_write_units_round_trip(units):
    m = wire(convert.write_request_to_pb(units))
    assert [convert.unit_from_pb(u).ops for u in m.units] == list(units)


@given(st.lists(st.one_of(U64, st.sampled_from([errors.WriteIndeterminate("late"), errors.Unavailable("down"), errors.StaleEpoch("fenced")]))))
def test_write_results_round_trip(results):
    back = convert.write_results_from_pb(wire(convert.write_results_to_pb(results)))
    norm = lambda rs: [(type(r), str(r)) if isinstance(r, Exception) else r for r in rs]  # noqa: E731
    assert norm(back) == norm(results)


@given(st.lists(st.one_of(st.none(), VALUE, st.just(errors.InvalidArgument("key too long")))))
def test_get_results_round_trip(results):
    back = convert.get_results_from_pb(wire(convert.get_results_to_pb(results)))
    norm = lambda rs: [(type(r), str(r)) if isinstance(r, Exception) else r for r in rs]  # noqa: E731
    assert norm(back) == norm(results)


@given(st.integers(1, 32), st.data())
def test_read_view_round_trips(P, data):
    rp = data.draw(U64)
    view = ReadView(rp, tuple(data.draw(st.lists(st.integers(0, rp), min_size=P, max_size=P))))
    assert convert.read_view_from_pb(wire(convert.read_view_to_pb(view)), P) == view
    key, quorum = data.draw(KEY), data.draw(st.booleans())
    assert convert.get_args_from_pb(wire(convert.get_request_to_pb(key, quorum, view)), P) == (key, quorum, view)
    assert convert.get_args_from_pb(wire(convert.get_request_to_pb(key, quorum, None)), P) == (key, quorum, None)
    start, end = data.draw(st.binary(max_size=8)), data.draw(st.one_of(st.none(), st.binary(max_size=8)))
    assert convert.kv_scan_args_from_pb(wire(convert.kv_scan_request_to_pb(start, end, quorum, view)), P) == (start, end, quorum, view)


@given(st.builds(
    convert.FaultRules,
    groups=st.lists(NODE, max_size=6, unique=True).map(lambda ids: (tuple(ids[: len(ids) // 2]), tuple(ids[len(ids) // 2:]))),
    blocked_sources=st.lists(NODE, max_size=3).map(tuple),
    drop_probability=st.floats(0, 1), duplicate_probability=st.floats(0, 1),
    delay_ms=st.integers(0, convert.DELAY_MS_MAX), delay_jitter_ms=st.integers(0, convert.DELAY_MS_MAX), seed=U64,
))
def test_fault_rules_round_trip(rules):
    assert convert.fault_rules_from_pb(wire(convert.fault_rules_to_pb(rules))) == rules


@given(st.lists(st.tuples(st.binary(max_size=8), st.binary(max_size=8)), max_size=10))
def test_scan_chunk_round_trips(pairs):
    assert convert.scan_chunk_from_pb(wire(convert.scan_chunk_to_pb(pairs))) == pairs


# --- the volume status (KV Status: typed, a dict on both sides) ---------------------------------
TEXT = st.text(max_size=12)
SECONDS = st.floats(0, 1e9, allow_nan=False)


@st.composite
def node_statuses(draw, P: int):
    """A node's entry of `WriterEndpoint.status`: one that answered (node_status's keys) or not."""
    n = {"id": draw(NODE), "az": draw(NODE), "address": draw(st.one_of(st.none(), TEXT)), "up": draw(st.booleans())}
    if draw(st.booleans()):
        n["error"] = draw(TEXT)
        return n
    n.update(
        scl={pg: draw(U64) for pg in range(P)}, lag={pg: draw(U64) for pg in range(P)}, epoch=draw(U64),
        records=draw(U64), bytes=draw(U64), corrupt_found=draw(U64), repaired=draw(U64),
        rebuild=draw(st.one_of(st.none(), st.fixed_dictionaries({"active": st.booleans(), "fetched_records": U64}))),
    )
    for name in ("used_bytes", "capacity_bytes", "room_bytes"):
        if draw(st.booleans()):
            n[name] = draw(U64)
    if draw(st.booleans()):
        n["space_low"] = draw(st.booleans())
    return n


LINK = st.fixed_dictionaries({"up": st.booleans(), "full": st.booleans(), "space_low": st.booleans(), "room_bytes": U64, "error": TEXT,
                              "errors": U64, "last_error": TEXT, "sent_lsn": U64})
RECOVERY = st.one_of(st.just({}), st.fixed_dictionaries({
    "epoch": U64, "vdl": U64, "vcl": U64, "base": U64, "truncated": st.one_of(st.none(), st.lists(U64, min_size=2, max_size=2)),
    "sealed": st.lists(NODE, max_size=7), "replicated_records": U64, "seconds": SECONDS,
}))
CHANGE = st.fixed_dictionaries({
    "phase": st.sampled_from(convert.MEMBERSHIP_PHASES), "old": TEXT, "new": TEXT, "fraction": st.floats(0, 1),
    "fetched_records": U64, "lag": U64, "epoch": U64, "members": st.lists(NODE, max_size=6),
    "next_members": st.lists(NODE, max_size=6), "seconds": SECONDS,
    "error": st.one_of(st.just(""), st.builds(lambda cls, m: f"{cls.__name__}: {m}", st.sampled_from(errors.ALL_ERRORS), TEXT)),
})


@st.composite
def statuses(draw):
    """A status dict of the shape `WriterEndpoint.status` builds (lists where it has tuples:
    what the client's dict has, and what JSON made of it before the reply was typed)."""
    P = draw(st.integers(1, 8))
    return {
        "volume_id": draw(TEXT), "protection_groups": P, "codec": draw(st.sampled_from(["python", "cython"])),
        "durable": draw(st.booleans()), "encrypted": draw(st.booleans()), "vdl": draw(U64), "epoch": draw(U64),
        "nodes": draw(st.lists(node_statuses(P), max_size=7)),
        "writer": {
            "epoch": draw(U64), "vdl": draw(U64), "vcl": draw(U64), "next_lsn": draw(U64),
            "pgcl": draw(st.lists(U64, min_size=P, max_size=P)), "in_flight": draw(st.integers(-(1 << 63), (1 << 63) - 1)),
            "fenced": draw(st.one_of(st.none(), TEXT)),
            "admission": draw(st.sampled_from(["all", "deletes-only", "full", "unreachable"])),
            "membership": {"epoch": draw(U64), "members": draw(st.lists(NODE, min_size=1, max_size=6)),
                           "next_members": draw(st.one_of(st.none(), st.lists(NODE, min_size=1, max_size=6)))},
            "links": draw(st.dictionaries(NODE, LINK, max_size=7)),
            "recovery": draw(RECOVERY),
            "stats": draw(st.dictionaries(st.text(min_size=1, max_size=12), U64, max_size=5)),
            "room_bytes": draw(U64),
        },
        "endpoint": {"pid": draw(st.integers(1, 1 << 22)), "opened_at": draw(st.one_of(st.none(), SECONDS))},
        "membership_change": draw(CHANGE),
    }


@given(statuses())
def test_status_round_trips(status):
    """dict -> pb -> wire bytes -> pb -> dict gives the dict back, per-PG maps with integer keys."""
    assert convert.status_from_pb(wire(convert.status_to_pb(status))) == status


def json_status(status: dict) -> dict:
    """What `db.status()` returned when the reply was JSON in a string (the release before)."""
    out = json.loads(json.dumps(status, sort_keys=True, default=str))
    for node in out.get("nodes", ()):
        for name in ("scl", "lag"):
            if isinstance(node.get(name), dict):
                node[name] = {int(k): v for k, v in node[name].items()}
    return out


def test_a_real_endpoints_status_keeps_the_dict_it_had_as_json(tmp_path):
    """The status of a real endpoint (six LMDB nodes, a writer that recovered and logged, one
    node down) comes back as the same dict `db.status()` gave when it travelled as JSON."""
    from engine.core.types import Geometry, default_nodes
    from engine.head.endpoint import EndpointConfig, WriterEndpoint
    from engine.node.service import StorageNode
    from engine.transport.inprocess import InProcessTransport, Registry

    infos = tuple(default_nodes())
    registry = Registry()
    nodes = []
    for info in infos:
        node = StorageNode(str(tmp_path / info.id), info, Geometry(2), "vol", durable=False)
        node.attach(InProcessTransport(registry, info.id), lambda: [i.id for i in infos])
        registry.set(info.id, node)
        nodes.append(node)
    ep = WriterEndpoint(EndpointConfig(volume_id="vol", protection_groups=2, nodes=infos, durable=False, write_timeout_s=30.0),
                        transport=InProcessTransport(registry, "writer"))
    try:
        ep.open()
        for i in range(20):
            ep.writer.write([(FLAG_PUT, b"k%d" % i, b"v" * i)])
        registry.set("n6", None)  # a node that does not answer: an entry with an error
        status = ep.status()
        assert [n["up"] for n in status["nodes"]] == [True] * 5 + [False], status["nodes"]
        assert status["writer"]["recovery"] and status["writer"]["stats"]["records_sent"] > 0, status["writer"]
        reply = wire(convert.status_to_pb(status))
        assert convert.status_from_pb(reply) == json_status(status)
        # Typed on the wire, field by field (not JSON in a string).
        assert list(reply.nodes[0].report.scl) == [status["nodes"][0]["scl"][pg] for pg in range(2)]
        assert reply.nodes[5].error == status["nodes"][5]["error"] and not reply.nodes[5].HasField("report")
        assert reply.writer.links["n1"].sent_lsn == status["writer"]["links"]["n1"]["sent_lsn"] > 0
        assert reply.writer.recovery.sealed == sorted(i.id for i in infos)
    finally:
        ep.close()
        for node in nodes:
            node.close()


def test_a_status_key_the_reply_does_not_carry_is_refused_by_name():
    status = {"volume_id": "v", "protection_groups": 1, "codec": "python", "durable": True, "encrypted": False, "vdl": 0, "epoch": 1,
              "nodes": [], "writer": {}, "endpoint": {"pid": 1, "opened_at": None},
              "membership_change": {"phase": "idle"}, "surprise": 1}
    with pytest.raises(AssertionError, match="surprise"):
        convert.status_to_pb(status)


# --- errors -----------------------------------------------------------------------------------
class FakeRpcError(grpc.RpcError):
    """What a stub raises: a status code, details and trailing metadata."""

    def __init__(self, code, details="", trailing=()):
        self._code, self._details, self._trailing = code, details, trailing

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._trailing


class FakeContext:
    """The part of grpc.ServicerContext that convert.abort uses."""

    class Aborted(Exception):
        pass

    def set_trailing_metadata(self, md):
        self.trailing = md

    def abort(self, code, details):
        self.code, self.details = code, details
        raise FakeContext.Aborted()


@pytest.mark.parametrize("cls", errors.ALL_ERRORS)
def test_every_error_travels_as_its_status_and_comes_back_as_itself(cls):
    ctx = FakeContext()
    with pytest.raises(FakeContext.Aborted):
        convert.abort(ctx, cls("what happened, and what to do"))
    assert ctx.code == getattr(grpc.StatusCode, cls.GRPC_STATUS)
    back = convert.error_from_rpc(FakeRpcError(ctx.code, ctx.details, ctx.trailing), where="node n1")
    assert type(back) is cls and str(back) == "what happened, and what to do"
    status = convert.error_to_pb(cls("per item"))
    assert type(convert.error_from_pb(wire(status))) is cls


def test_a_subclass_travels_as_its_nearest_known_class():
    class Special(errors.StaleEpoch):
        pass

    ctx = FakeContext()
    with pytest.raises(FakeContext.Aborted):
        convert.abort(ctx, Special("fenced"))
    assert dict(ctx.trailing)[convert.ERROR_METADATA_KEY] == "StaleEpoch"


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
                                  grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNIMPLEMENTED])
def test_unreachable_is_unavailable_for_node_calls(code):
    err = convert.error_from_rpc(FakeRpcError(code, "Socket closed"), where="node n3")
    assert type(err) is errors.Unavailable and "node n3" in str(err)


def test_a_write_whose_fate_is_unknown_is_indeterminate_unless_it_was_never_sent():
    broken = FakeRpcError(grpc.StatusCode.UNAVAILABLE, "Socket closed")
    assert type(convert.error_from_rpc(broken, where="w", write=True)) is errors.WriteIndeterminate
    late = FakeRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
    assert type(convert.error_from_rpc(late, where="w", write=True)) is errors.WriteIndeterminate
    refused = FakeRpcError(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses; last error: Connection refused")
    assert type(convert.error_from_rpc(refused, where="w", write=True)) is errors.Unavailable


def test_an_unknown_class_name_falls_back_on_the_status_code():
    err = convert.error_from_rpc(
        FakeRpcError(grpc.StatusCode.DATA_LOSS, "x", ((convert.ERROR_METADATA_KEY, "NoSuchError"),)), where="n1"
    )
    assert type(err) is errors.CorruptRecord
    assert type(convert.error_from_pb(common_pb2.ErrorStatus(code="OUT_OF_RANGE", error="Nope"))) is errors.SegmentIncomplete


# --- server-side meaning checks ---------------------------------------------------------------
def test_fields_that_parse_but_mean_nothing_are_refused():
    P = 8
    with pytest.raises(errors.UnknownProtectionGroup):
        convert.read_args_from_pb(storage_pb2.ReadRequest(pg=8, key=b"k"), P)
    with pytest.raises(errors.InvalidArgument):
        convert.read_args_from_pb(storage_pb2.ReadRequest(pg=0, key=b""), P)
    with pytest.raises(errors.InvalidArgument):
        convert.read_args_from_pb(storage_pb2.ReadRequest(pg=0, key=b"k" * (KEY_BYTES_MAX + 1)), P)
    with pytest.raises(errors.InvalidArgument):
        convert.read_args_from_pb(storage_pb2.ReadRequest(pg=0, key=b"k", read_point=1, required_lsn=2), P)
    with pytest.raises(errors.InvalidArgument):
        convert.fetch_args_from_pb(storage_pb2.FetchRequest(pg=0, after_lsn=5, upto_lsn=4), P)
    with pytest.raises(errors.InvalidArgument):
        convert.sync_epoch_args_from_pb(storage_pb2.SyncEpochRequest(epoch=3, truncations=[storage_pb2.TruncationRange(epoch=1, first=5, last=4)]))
    with pytest.raises(errors.InvalidArgument):
        convert.sync_epoch_args_from_pb(storage_pb2.SyncEpochRequest(epoch=3, truncations=[storage_pb2.TruncationRange(epoch=1, first=0, last=4)]))
    with pytest.raises(errors.InvalidArgument):
        convert.sync_epoch_args_from_pb(storage_pb2.SyncEpochRequest(epoch=3, membership=storage_pb2.Membership(epoch=1, members=["a"] * 6)))
    with pytest.raises(errors.InvalidArgument):
        convert.read_view_from_pb(common_pb2.ReadView(read_point=1, tails=[0, 2]), 2)
    with pytest.raises(errors.InvalidArgument):
        convert.read_view_from_pb(common_pb2.ReadView(read_point=1, tails=[0]), 2)
    with pytest.raises(errors.InvalidArgument):
        convert.fault_rules_from_pb(storage_pb2.FaultSpec(drop_probability=float("nan")))
    with pytest.raises(errors.InvalidArgument):
        convert.unit_from_pb(kv_pb2.Unit(ops=[kv_pb2.Op(flags=FLAG_PUT | FLAG_CPL, key=b"k")]))
    with pytest.raises(errors.InvalidArgument):
        convert.unit_from_pb(kv_pb2.Unit(ops=[kv_pb2.Op(flags=FLAG_DELETE, key=b"k", value=b"v")]))
    with pytest.raises(errors.InvalidArgument):
        convert.unit_from_pb(kv_pb2.Unit())


@pytest.mark.parametrize("value", [EPOCH_MAX + 1, 1 << 63, U64_MAX])
def test_epochs_above_the_bound_are_refused(value):
    membership = storage_pb2.Membership(epoch=value, members=[f"n{i}" for i in range(1, 7)])
    for call in (
        lambda: convert.append_args_from_pb(storage_pb2.AppendRequest(epoch=value)),
        lambda: convert.seal_args_from_pb(storage_pb2.SealRequest(epoch=value)),
        lambda: convert.sync_epoch_args_from_pb(storage_pb2.SyncEpochRequest(epoch=value)),
        lambda: convert.sync_epoch_args_from_pb(storage_pb2.SyncEpochRequest(epoch=1, membership=membership)),
        lambda: convert.read_args_from_pb(storage_pb2.ReadRequest(pg=0, key=b"k", epoch=value), 1),
        lambda: convert.scan_args_from_pb(storage_pb2.SegmentScanRequest(pg=0, epoch=value), 1),
    ):
        with pytest.raises(errors.InvalidArgument, match="out of range"):
            call()


@pytest.mark.parametrize("value", [LSN_VALID_MAX + 1, 1 << 63, U64_MAX])
def test_lsns_above_the_bound_are_refused(value):
    for call in (
        lambda: convert.append_args_from_pb(storage_pb2.AppendRequest(hint_lsn=value)),
        lambda: convert.read_args_from_pb(storage_pb2.ReadRequest(pg=0, key=b"k", read_point=value), 1),
        lambda: convert.scan_args_from_pb(storage_pb2.SegmentScanRequest(pg=0, read_point=value, required_lsn=value), 1),
        lambda: convert.fetch_args_from_pb(storage_pb2.FetchRequest(pg=0, after_lsn=value), 1),
        lambda: convert.fetch_args_from_pb(storage_pb2.FetchRequest(pg=0, upto_lsn=value), 1),
        lambda: convert.corrupt_args_from_pb(storage_pb2.CorruptRequest(pg=0, lsn=value), 1),
    ):
        with pytest.raises(errors.InvalidArgument, match="out of range"):
            call()
    bad = storage_pb2.TruncationRange(epoch=1, first=1, last=TRUNCATION_LSN_MAX + 1)
    with pytest.raises(errors.InvalidArgument, match="out of range"):
        convert.sync_epoch_args_from_pb(storage_pb2.SyncEpochRequest(epoch=1, truncations=[bad]))


# --- the read point replicated to reader instances ------------------------------------------
@st.composite
def read_point_updates(draw):
    P = draw(st.integers(1, 8))
    vdl = draw(LSN)
    tails = tuple(draw(st.lists(st.integers(0, vdl), min_size=P, max_size=P)))
    m = draw(memberships())
    m = Membership(draw(st.integers(0, EPOCH_MAX)), m.members, m.next_members)
    members = tuple((n, tuple(draw(st.lists(st.one_of(st.none(), LSN), min_size=P, max_size=P))), draw(st.booleans()))
                    for n in m.all_nodes)
    return P, ReadPointUpdate(draw(st.integers(0, EPOCH_MAX)), vdl, tails, m, members, draw(SECONDS))


@given(read_point_updates())
def test_read_point_update_round_trips(pu):
    P, u = pu
    assert convert.read_point_update_from_pb(wire(convert.read_point_update_to_pb(u)), P) == u


def test_a_read_point_update_that_means_nothing_is_refused():
    m = Membership(3, tuple(f"n{i}" for i in range(1, 7)))
    good = ReadPointUpdate(3, 10, (10, 4), m, tuple((n, (10, 4), True) for n in m.members), 1.0)
    convert.read_point_update_from_pb(convert.read_point_update_to_pb(good), 2)
    bad = [
        (convert.read_point_update_to_pb(good), 3),  # one tail per PG
        (convert.read_point_update_to_pb(ReadPointUpdate(3, 9, (10, 4), m, good.members, 1.0)), 2),  # tail above VDL
        (convert.read_point_update_to_pb(ReadPointUpdate(3, 10, (10, 4), m, (("n9", (1, 1), True),), 1.0)), 2),
        (convert.read_point_update_to_pb(ReadPointUpdate(3, 10, (10, 4), m, (("n1", (1,), True),), 1.0)), 2),
        (convert.read_point_update_to_pb(ReadPointUpdate(EPOCH_MAX + 1, 10, (10, 4), m, (), 1.0)), 2),
    ]
    for msg, P in bad:
        with pytest.raises(errors.InvalidArgument):
            convert.read_point_update_from_pb(msg, P)


def test_a_reader_status_round_trips_in_place_of_the_writers():
    reader = {name: (f"x-{name}" if f.type == f.TYPE_STRING else True if f.type == f.TYPE_BOOL
                     else 1.5 if f.type == f.TYPE_DOUBLE else 7)
              for name, f in kv_pb2.ReaderStatus.DESCRIPTOR.fields_by_name.items()}
    status = {"volume_id": "v", "protection_groups": 2, "codec": "python", "durable": True, "encrypted": False,
              "vdl": 7, "epoch": 2, "nodes": [{"id": "n1", "az": "a", "address": None, "up": True}],
              "reader": reader, "endpoint": {"pid": 5, "opened_at": 1.0},
              "membership_change": {"phase": "idle", "old": "", "new": "", "fraction": 0.0, "fetched_records": 0, "lag": 0,
                                    "epoch": 2, "members": [], "next_members": [], "seconds": 0.0, "error": ""}}
    back = convert.status_from_pb(wire(convert.status_to_pb(status)))
    assert back == status and "writer" not in back


def test_watch_arguments_take_defaults_and_are_clamped():
    assert convert.watch_args_from_pb(kv_pb2.WatchReadPointRequest()) == (0.005, 0.1)
    assert convert.watch_args_from_pb(kv_pb2.WatchReadPointRequest(min_interval_ms=10**9, heartbeat_ms=1)) == (1.0, 0.01)
