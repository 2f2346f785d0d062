"""Version collection on a storage node (engine.node.collection), one rule at a time, on real
LMDB: what is removed (every version older than the key's newest at or below the point), what is
never removed (anything above the segment's SCL or above the VDL it knows; anything before the
node adopted the issuing epoch's truncations), tombstones (only once every member swept past
them), request records (only below the request point), the persisted horizon (SnapshotTooOld
below it, whatever writer asks, across restarts), and repair across collected records (a
lagging peer completes its chain, a wiped node rebuilds)."""

from __future__ import annotations

import os
import shutil

import hypothesis
import hypothesis.strategies as st
import lmdb
import pytest
from waiting import eventually

import engine
from engine import codec
from engine.core.constants import FLAG_CPL, FLAG_DELETE, FLAG_PUT, FLAG_REQUEST, LSN_VALID_MAX, NAMESPACE_REQUESTS, U64_MAX
from engine.core.recovery import plan_recovery
from engine.core.types import Geometry, Membership, NodeInfo, TruncationRange
from engine.errors import EpochBehind, InvalidArgument, SegmentIncomplete, SnapshotTooOld
from engine.node.service import StorageNode
from engine.node.store import NODE_FORMAT, SegmentStore
from engine.proto import storage_pb2
from engine.transport import convert
from engine.transport.inprocess import InProcessTransport, Registry

P = 2
PUT = FLAG_PUT | FLAG_CPL
DEL = FLAG_DELETE | FLAG_CPL
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def rec(lsn, prev, key, value=b"v", flags=PUT, pg=0):
    return codec.encode_record(lsn, prev, pg, flags, key, value if flags & FLAG_PUT else b"")


def chain(*entries, pg=0, first_prev=0):
    """Records of one PG, each backlinked to the one before: entries are (lsn, key, value[, flags])."""
    out, prev = [], first_prev
    for e in entries:
        lsn, key, value = e[:3]
        out.append(rec(lsn, prev, key, value, e[3] if len(e) > 3 else PUT, pg))
        prev = lsn
    return codec.encode_frame(out)


def open_store(path):
    return SegmentStore(str(path), "n1", "a", Geometry(P), "vol-1", durable=False)


@pytest.fixture
def store(tmp_path):
    s = open_store(tmp_path / "n1")
    s.sync_epoch(1, ())  # as a writer's SyncEpoch: the epoch's truncations adopted
    yield s
    s.close()


def versions(s, key, pg=0) -> list[int]:
    """The LSNs of `key`'s versions the segment still holds."""
    with s.env.begin() as txn:
        cur = txn.cursor(db=s._versions)
        if not cur.set_key(pg.to_bytes(4, "big") + key):
            return []
        return [int.from_bytes(v, "big") for v in cur.iternext_dup()]


def collect(s, point, requests=0, hint=None, tombstones=None, epoch=None):
    """A heartbeat carrying the points, then collection steps until there is nothing left to do."""
    s.append(s.epoch if epoch is None else epoch, codec.encode_frame([]), hint if hint is not None else s.hint_lsn,
             collect=(point, requests))
    while s.collect_step(1000, tombstones):
        pass


# --- what is removed ------------------------------------------------------------------------
def test_every_version_older_than_the_newest_at_or_below_the_point_is_removed(store):
    store.append(1, chain((1, b"k", b"v1"), (2, b"k", b"v2"), (3, b"k", b"v3"), (4, b"j", b"j4"), (5, b"k", b"v5")), 5)
    collect(store, 4)
    assert versions(store, b"k") == [3, 5] and versions(store, b"j") == [4]
    st = store.state()
    assert (st.records, st.collected_records, st.horizons[0], st.swept[0]) == (3, 2, 4, 4)
    # Reads at or above the point answer as before; below it they are refused, typed.
    assert store.read(0, b"k", 4, 4, 1).value == b"v3"
    assert store.read(0, b"k", 5, 5, 1).value == b"v5"
    for read_point in (1, 2, 3):
        with pytest.raises(SnapshotTooOld):
            store.read(0, b"k", read_point, 0, 1)
    with pytest.raises(SnapshotTooOld):
        store.scan(0, b"", None, 3, 0, 10, 1)
    assert isinstance(SnapshotTooOld("x"), SegmentIncomplete)  # a release before it reads "cannot answer here"


def test_the_horizon_is_persisted_and_holds_for_any_later_writer(tmp_path):
    s = open_store(tmp_path / "n1")
    s.sync_epoch(1, ())
    s.append(1, chain((1, b"k", b"v1"), (2, b"k", b"v2"), (3, b"k", b"v3")), 3)
    collect(s, 3)
    s.close()
    s = open_store(tmp_path / "n1")  # a restart forgets nothing of what was collected
    try:
        assert s.state().horizons[0] == 3 and versions(s, b"k") == [3]
        s.seal(2)  # a new writer, which knows no snapshot of the old one
        s.sync_epoch(2, ())
        with pytest.raises(SnapshotTooOld):
            s.read(0, b"k", 2, 0, 2)
        assert s.read(0, b"k", 3, 3, 2).value == b"v3"
    finally:
        s.close()


def test_collection_persists_an_scl_the_next_open_can_walk_from(tmp_path):
    s = open_store(tmp_path / "n1")
    s.sync_epoch(1, ())
    s.append(1, chain((1, b"k", b"v1"), (2, b"k", b"v2")), 2)  # SCL 2 persisted (the first commit)
    s.append(1, codec.encode_frame([rec(3, 2, b"k", b"v3"), rec(4, 3, b"k", b"v4"), rec(5, 4, b"k", b"v5")]), 5)
    collect(s, 5)  # removes 1..4: the SCL stored lazily (2) would name a removed record
    assert versions(s, b"k") == [5]
    s.close()
    s = open_store(tmp_path / "n1")
    try:
        assert s.scls[0] == 5
    finally:
        s.close()


def _collect_with_the_hint_unpersisted(path):
    """A node that collected past the hint it stored: the appends that raised the hint did not
    persist it (hints are stored lazily), and the heartbeat carrying the points brings no new one."""
    s = open_store(path)
    s.sync_epoch(1, ())
    s.append(1, chain((1, b"k", b"v1"), (2, b"k", b"v2")), 2)  # the first commit stores hint 2
    s._persisted_at = float("inf")  # no lazy persisting from here on, however slow the machine
    s.append(1, codec.encode_frame([rec(3, 2, b"k", b"v3"), rec(4, 3, b"k", b"v4"), rec(5, 4, b"k", b"v5")]), 5)
    collect(s, 5)  # removes 1..4
    assert versions(s, b"k") == [5] and s.hint_lsn == 5
    return s


def _recover_alone(s, epoch):
    """What a recovery would plan from this segment's seal summary (as if every member said the same)."""
    summary = s.seal(epoch)
    return plan_recovery(epoch, P, [summary], read_quorum=1, all_sealed=True)


def test_collection_persists_the_hint_so_a_recovery_keeps_every_record_above_what_it_removed(tmp_path):
    """A seal summarises the records above the node's hint and recovery walks LSN by LSN up from
    it: a stored hint below a collected record ended that walk at the hole, so a reopened volume
    truncated acknowledged records (found by test_storage_full_e2e, one run in five)."""
    s = _collect_with_the_hint_unpersisted(tmp_path / "n1")
    s.close()
    s = open_store(tmp_path / "n1")
    try:
        assert s.hint_lsn == 5 and s.scls[0] == 5
        plan = _recover_alone(s, 2)
        assert (plan.vcl, plan.vdl, plan.truncation) == (5, 5, None), plan
    finally:
        s.close()


def test_a_folder_that_stored_its_hint_below_what_it_collected_opens_with_the_hint_raised(tmp_path):
    """The upgrade path for folders written before the fix: the hint is at least every horizon
    (collection never removes above the hint it knew), so opening raises a lagging stored one."""
    s = _collect_with_the_hint_unpersisted(tmp_path / "n1")
    with s.env.begin(write=True) as txn:  # as the release before the fix left it
        txn.put(b"hint", (2).to_bytes(8, "big"), db=s._meta)
    s.close()
    s = open_store(tmp_path / "n1")
    try:
        assert (s.hint_lsn, s.state().horizons[0]) == (5, 5)
        plan = _recover_alone(s, 2)
        assert (plan.vcl, plan.vdl, plan.truncation) == (5, 5, None), plan
        assert s.read(0, b"k", 5, 5, 2).value == b"v5"
    finally:
        s.close()


# --- what is never removed ------------------------------------------------------------------
def test_collection_stays_below_the_segments_own_scl(store):
    # A hole at 3: SCL stops at 2, so only what lies at or below 2 is collected.
    store.append(1, codec.encode_frame([rec(1, 0, b"k", b"v1"), rec(2, 1, b"k", b"v2"), rec(4, 3, b"k", b"v4")]), 4)
    assert store.scls[0] == 2
    collect(store, 4)
    assert versions(store, b"k") == [2, 4] and store.state().horizons[0] == 2
    store.append(1, codec.encode_frame([rec(3, 2, b"j", b"j3")]), 4)  # the hole is filled
    assert store.scls[0] == 4
    collect(store, 4)
    assert versions(store, b"k") == [4]


def test_nothing_above_the_vdl_the_node_knows_is_removed(store):
    store.append(1, chain((1, b"k", b"v1"), (2, b"k", b"v2"), (3, b"k", b"v3"), (4, b"k", b"v4")), 2)
    collect(store, LSN_VALID_MAX, LSN_VALID_MAX)  # the highest point the bounds allow: the hint (2) bounds it
    assert versions(store, b"k") == [2, 3, 4] and store.state().horizons[0] == 2
    assert store.read(0, b"k", 2, 2, 1).value == b"v2"


def test_a_hostile_point_is_refused_at_the_boundary():
    for field in ("collect_lsn", "collect_requests_lsn"):
        for bad in (LSN_VALID_MAX + 1, U64_MAX):
            with pytest.raises(InvalidArgument, match=field):
                convert.append_args_from_pb(storage_pb2.AppendRequest(epoch=1, **{field: bad}))
    assert convert.append_args_from_pb(storage_pb2.AppendRequest(epoch=1, hint_lsn=3, collect_lsn=LSN_VALID_MAX))[3:] == (
        LSN_VALID_MAX, 0)
    for bad in (LSN_VALID_MAX + 1, U64_MAX):
        with pytest.raises(InvalidArgument):
            convert.fetch_reply_from_pb(storage_pb2.FetchReply(complete_lsn=bad))
        with pytest.raises(InvalidArgument):
            convert.fetch_reply_from_pb(storage_pb2.FetchReply(horizon_lsn=bad))


def test_a_peers_hostile_collection_state_is_refused_at_the_boundary():
    for field in ("horizons", "swept"):
        with pytest.raises(InvalidArgument, match=field):
            convert.node_state_from_pb(storage_pb2.NodeState(**{field: [1, U64_MAX]}))
    st = convert.node_state_from_pb(storage_pb2.NodeState(horizons=[3, 4], swept=[3, 4], collected_records=9))
    assert (st.horizons, st.swept, st.collected_records) == ((3, 4), (3, 4), 9)


def test_an_in_process_hostile_point_changes_nothing(store):
    store.append(1, chain((1, b"k", b"v1"), (2, b"k", b"v2")), 2)
    for bad in (U64_MAX, -1, LSN_VALID_MAX + 1):
        with pytest.raises(InvalidArgument):
            store.append(1, codec.encode_frame([]), 2, collect=(bad, 0))
    assert store.collect_target == (0, 0, 0) and store.collect_step() == 0 and versions(store, b"k") == [1, 2]


def test_no_collection_before_the_issuing_epochs_truncations_are_adopted(tmp_path):
    # Epoch 1 left k@1 and j@2 durable (VDL 2), and a dead k@3 the recovery at epoch 2 cuts.
    s = open_store(tmp_path / "n1")
    s.sync_epoch(1, ())
    s.append(1, chain((1, b"k", b"live"), (2, b"j", b"j2"), (3, b"k", b"dead")), 2)
    s.seal(2)  # sealed by the new writer, not yet synced: it still holds the dead record
    with pytest.raises(EpochBehind):  # so it takes no append (and no point) at epoch 2 yet
        s.append(2, codec.encode_frame([]), 3, collect=(3, 0))
    s.set_collect_target(2, 3, 0)  # and were a point of epoch 2 (with its hint) to reach it, it would not collect for it
    s.hint_lsn = 3
    assert s.synced_epoch == 1 and s.collect_step() == 0
    assert versions(s, b"k") == [1, 3], "the dead record must not be taken as the key's newest version"
    # The danger the rule keeps out: without it, k@1 (live, durable) goes, and once the dead k@3
    # is cut the key has no version at all.
    s.synced_epoch = 2
    s.collect_step()
    assert versions(s, b"k") == [3]
    s.close()

    s2 = open_store(tmp_path / "n2")
    s2.sync_epoch(1, ())
    s2.append(1, chain((1, b"k", b"live"), (2, b"j", b"j2"), (3, b"k", b"dead")), 2)
    s2.seal(2)
    s2.sync_epoch(2, (TruncationRange(2, 3, 10),))  # the writer's sync: the dead record is cut
    s2.append(2, codec.encode_frame([rec(11, 2, b"k", b"new")]), 11, collect=(11, 0))
    while s2.collect_step():
        pass
    assert versions(s2, b"k") == [11] and s2.read(0, b"k", 11, 11, 2).value == b"new"
    s2.close()


def test_gossip_adopting_truncations_does_not_count_as_the_writers_sync(store):
    store.seal(2)
    store.sync_epoch(2, (TruncationRange(2, 5, 9),), writer=False)  # as gossip calls it, with no membership
    assert store.synced_epoch == 1
    store.set_collect_target(2, 4, 0)
    assert store.collect_step() == 0


# --- tombstones and request records -----------------------------------------------------------
def test_a_tombstone_goes_only_once_every_member_swept_past_it(store):
    store.append(1, chain((1, b"k", b"v1"), (2, b"k", b"", DEL), (3, b"j", b"j3")), 3)
    collect(store, 3)  # no word from the other members yet
    assert versions(store, b"k") == [2]
    assert store.read(0, b"k", 3, 3, 1).deleted
    collect(store, 3, tombstones=[1, 3])  # one member swept only to 1 (it may still hold k@1 without k@2)
    assert versions(store, b"k") == [2]
    collect(store, 3, tombstones=[3, 3])
    assert versions(store, b"k") == [] and versions(store, b"j") == [3]
    r = store.read(0, b"k", 3, 3, 1)
    assert r.lsn == 0 and r.value is None  # answers as the tombstone did: no value


def test_request_records_go_only_below_the_request_point(store):
    frame = codec.encode_frame([
        rec(1, 0, b"k", b"v1"), rec(2, 1, b"rid-1", b"digest", FLAG_PUT | FLAG_REQUEST | FLAG_CPL),
        rec(3, 2, b"k", b"v3"), rec(4, 3, b"rid-2", b"digest", FLAG_PUT | FLAG_REQUEST | FLAG_CPL),
    ])
    store.append(1, frame, 4)
    collect(store, 4, requests=0)
    assert store.read(0, b"rid-1", 4, 4, 1, NAMESPACE_REQUESTS).lsn == 2
    collect(store, 4, requests=2)
    assert store.read(0, b"rid-1", 4, 4, 1, NAMESPACE_REQUESTS).lsn == 0
    assert store.read(0, b"rid-2", 4, 4, 1, NAMESPACE_REQUESTS).lsn == 4
    assert store.state().records == 2  # k@3 and rid-2


# --- pages ---------------------------------------------------------------------------------
@pytest.mark.parametrize("compacting", ["rebuild", "chunks", "off"])
def test_collection_packs_what_it_leaves_into_few_pages(tmp_path, monkeypatch, compacting):
    """10,000 overwrites of 50 keys collected down to 50 records: compaction packs them, whole
    tables rebuilt when small (every page full), in chunks otherwise; without it LMDB leaves
    the sparse pages (and a key's emptied sub-database) as they are."""
    import random

    from engine.node import collection

    if compacting == "off":  # what LMDB leaves alone: sparse pages, a key's emptied sub-database
        monkeypatch.setattr(collection, "COMPACT_CHURN", 10**9)
        monkeypatch.setattr(collection, "COMPACT_IDLE_CHURN", 10**9)
        monkeypatch.setattr(collection, "REWRITE_DUPS_MIN", 10**9)
    if compacting == "chunks":
        monkeypatch.setattr(collection, "COMPACT_REBUILD_ENTRIES_MAX", 0)
    s = open_store(tmp_path / "n1")
    s.sync_epoch(1, ())
    rng, lsn = random.Random(1), 0
    values = {}
    for _ in range(20):  # 10,000 overwrites of 50 keys, 40-byte values
        recs = []
        for _ in range(500):
            lsn += 1
            key = b"key:%04d" % rng.randrange(50)
            values[key] = b"%040d" % lsn
            recs.append(rec(lsn, lsn - 1, key, values[key]))
        s.append(1, codec.encode_frame(recs), lsn)
    before = s.state().pages_used
    collect(s, lsn)
    st = s.state()
    assert st.records == 50 and before > 300
    assert {k: s.read(0, k, lsn, lsn, 1).value for k in values} == values  # same bytes, wherever they sit
    with s.env.begin() as txn:
        log_pages = txn.stat(s._log)["leaf_pages"]
    if compacting == "rebuild":
        assert log_pages <= 2 and st.pages_used <= 9 and s.compactions > 0, (log_pages, st.pages_used)
    elif compacting == "chunks":
        assert st.pages_used <= 12 and s.compactions > 0, (st.pages_used, s.compactions)
    else:
        assert st.pages_used > 30, st.pages_used  # the case compaction exists for
    s.close()


def test_a_volume_that_stopped_writing_ends_compacted(tmp_path, monkeypatch):
    """Removals below COMPACT_CHURN times a PG's share compact nothing while writes go on past
    the point; once collection caught up with all the PG holds, COMPACT_IDLE_CHURN of it does."""
    from engine.node import collection

    s = open_store(tmp_path / "n1")
    s.sync_epoch(1, ())
    lsn = 0
    recs = []
    for i in range(400):  # 400 keys, then 200 of them overwritten once: half the log goes
        lsn += 1
        recs.append(rec(lsn, lsn - 1, b"key:%04d" % i, b"a" * 100))
    for i in range(0, 400, 2):
        lsn += 1
        recs.append(rec(lsn, lsn - 1, b"key:%04d" % i, b"b" * 100))
    s.append(1, codec.encode_frame(recs), lsn)
    more = [rec(lsn + 1, lsn, b"later", b"c")]
    s.append(1, codec.encode_frame(more), lsn + 1)  # held, and above the point: not idle
    monkeypatch.setattr(collection, "COMPACT_CHURN", 2)  # 200 removed of a 601-entry share: not due
    collect(s, lsn)
    assert s.state().records == 401 and s.compactions == 0
    collect(s, lsn + 1)  # the point covers everything held now
    assert s.compactions == 2  # both tables, each rebuilt whole (they are small)
    s.close()


# --- repair across collected records --------------------------------------------------------
def test_a_fetch_says_up_to_where_the_senders_chain_is_complete(store):
    store.append(1, chain(*[(i, b"k", b"v%d" % i) for i in range(1, 11)]), 10)
    collect(store, 8)
    r = store.fetch(0, 2)
    assert [it.lsn for it in codec.index_frame(r.frame)] == [8, 9, 10]
    assert (r.more, r.complete_lsn, r.horizon_lsn) == (False, 10, 8)
    assert store.fetch(0, 2, upto_lsn=9).complete_lsn == 9
    store.corrupt(0, 9, bit=300)
    r = store.fetch(0, 2)
    assert r.complete_lsn == 8, "never past a record skipped as corrupt"


def _pair(tmp_path):
    registry = Registry()
    members = Membership(1, ("a1", "a2", "b1", "b2", "c1", "c2"))
    nodes = {}
    for nid in ("a1", "a2"):
        n = StorageNode(str(tmp_path / nid), NodeInfo(nid, "a"), Geometry(P), "vol-1", durable=False)
        n.attach(InProcessTransport(registry, nid), lambda: ("a1", "a2"))
        registry.set(nid, n)
        n.sync_epoch(1, (), members)
        nodes[nid] = n
    return nodes["a1"], nodes["a2"]


def test_a_lagging_peer_completes_its_chain_across_collected_records(tmp_path):
    a, b = _pair(tmp_path)
    try:
        frame = chain(*[(i, b"k", b"v%d" % i) for i in range(1, 11)], (11, b"j", b"j11"))
        a.append(1, frame, 11, 11)
        while a.collect_once():
            pass
        assert versions(a.store, b"k") == [10]  # 1..9 collected: the chain on a1 has holes
        b.append(1, chain((1, b"k", b"v1"), (2, b"k", b"v2")), 2)  # b2 missed the rest
        b.append(1, codec.encode_frame([]), 11)  # the writer's next heartbeat tells it the VDL
        b.gossip_once()
        b.gossip_once()
        assert b.store.scls[0] == 11, "the records a1 collected count as present"
        assert b.store.state().horizons[0] == a.store.state().horizons[0] == 11, (
            "and b2 adopts a1's horizon: it lacks what a1 collected")
        assert b.store.read(0, b"k", 11, 11, 1).value == b"v10"
        with pytest.raises(SnapshotTooOld):
            b.store.read(0, b"k", 5, 0, 1)  # b2 holds v2, but not v5: it must not answer with v2
        # and the writer's next records extend the chain from an SCL that names no record held
        b.append(1, codec.encode_frame([rec(12, 11, b"k", b"v12")]), 12)
        assert b.store.scls[0] == 12
    finally:
        a.close()
        b.close()


def test_a_claim_above_the_vdl_the_receiver_knows_is_cut_to_it(tmp_path):
    a, b = _pair(tmp_path)
    try:
        a.append(1, chain(*[(i, b"k", b"v%d" % i) for i in range(1, 11)]), 10, 10)
        while a.collect_once():
            pass
        b.append(1, chain((1, b"k", b"v1"), (2, b"k", b"v2")), 2)
        reply = a.fetch(0, 2, 1 << 20, None)
        b.store.append(0, reply.frame, 0, repair=True, collected=(0, 2, reply.complete_lsn, reply.horizon_lsn))
        assert b.store.scls[0] == 2 and b.store.state().horizons[0] == 0, "b2 knows only VDL 2: no jump, no horizon"
    finally:
        a.close()
        b.close()


# --- end to end (embedded) ------------------------------------------------------------------
def open_db(path, **kw):
    kw.setdefault("durable", False)
    kw.setdefault("collect_delay_s", 0.0)
    kw.setdefault("request_retention_s", 0.0)
    kw.setdefault("gossip_interval_s", 0.02)
    return engine.open(path, **kw)


def node_states(db):
    return {n["id"]: n for n in db.status()["nodes"]}


def test_a_wiped_node_rebuilds_from_peers_that_collected(tmp_path):
    with open_db(tmp_path / "v", protection_groups=2) as db:
        for i in range(20):
            with db.batch() as b:
                for j in range(50):
                    b.put(b"key:%d" % j, b"%d.%d" % (i, j))
        eventually(lambda: all(n["records"] <= 60 for n in node_states(db).values()), "every node collected")
        vol = db._backend
        vol.wipe_node("n3")
        w = vol.writer

        def rebuilt():
            st = vol.nodes["n3"].store
            return all(st.scls[pg] >= w.ledger.read_tails[pg] for pg in range(2)) and st.state().records <= 60

        eventually(rebuilt, "n3 rebuilt its chain from peers that collected")
        store, view = vol.nodes["n3"].store, w.view()
        for j in range(50):  # n3 alone answers every key at the current read point
            from engine.core.placement import protection_group_of

            pg = protection_group_of(b"key:%d" % j, 2)
            assert store.read(pg, b"key:%d" % j, view.read_point, view.tails[pg], w.epoch).value == b"19.%d" % j


def test_a_down_member_holds_tombstones_until_it_swept_past_them(tmp_path):
    with open_db(tmp_path / "v", protection_groups=1) as db:
        db.put(b"k", b"v")
        eventually(lambda: all(n["horizon_lsn"] >= db.last_commit for n in node_states(db).values()), "swept past the put")
        db.cluster.stop_node("n6")
        db.delete(b"k")
        db.put(b"j", b"after")  # the collection point passes the delete
        vol = db._backend
        eventually(lambda: all(vol.nodes[n].store.gc[0][1] >= db.last_commit for n in ("n1", "n2", "n3", "n4", "n5")),
                   "the live members swept past the delete")
        assert all(versions(vol.nodes[n].store, b"k") for n in ("n1", "n2")), "n6 might still hold the old value"
        db.cluster.start_node("n6")
        eventually(lambda: not any(versions(vol.nodes[n].store, b"k") for n in vol.nodes), "the tombstone is gone everywhere")
        assert db.get(b"k") is None and db.get(b"k", quorum=True) is None


def test_a_node_folder_of_format_2_opens_upgraded_and_collects(tmp_path):
    d = tmp_path / "v"
    shutil.copytree(os.path.join(FIXTURES, "volume-format-1-node-2"), d)
    with open_db(d) as db:
        assert db.get(b"user:2") == b"bobby"
        db.put(b"user:2", b"robert")
        db.put(b"tick", b"")
        eventually(lambda: all(n["collected_records"] > 0 for n in node_states(db).values()), "collection ran")
        assert db.get(b"user:2") == b"robert" and db.get(b"order:1") == b"pending"
    env = lmdb.open(str(d / "az-a" / "n1"), max_dbs=8, readonly=True, lock=False)
    try:
        with env.begin(db=env.open_db(b"meta", create=False)) as txn:
            import json

            assert json.loads(txn.get(b"volume"))["format"] == NODE_FORMAT == 4
    finally:
        env.close()


def test_a_step_that_removes_nothing_commits_nothing(store):
    """New keys leave collection nothing to remove: its steps advance in memory and write no
    transaction (no fsync beside the appends'); the first removal persists the points with it."""
    from engine.node.collection import SWEPT

    store.append(1, chain(*[(i, b"k%d" % i, b"v") for i in range(1, 11)]), 10)
    txnid = store.env.info()["last_txnid"]
    collect(store, 10)
    assert store.gc[0][SWEPT] == 10 and store.env.info()["last_txnid"] == txnid
    store.append(1, chain((11, b"k1", b"again"), first_prev=10), 11)
    txnid = store.env.info()["last_txnid"]
    collect(store, 11)
    assert versions(store, b"k1") == [11] and store.env.info()["last_txnid"] == txnid + 1
    store.close()
    reopened = open_store(store.path)
    try:
        assert reopened.gc[0][SWEPT] == 11  # persisted with the removal
    finally:
        reopened.close()


def test_the_version_index_is_rebuilt_whole_and_its_page_count_comes_true(store):
    """A key with hundreds of versions keeps them in a sub-database of its own; LMDB does not
    take a freed sub-database's pages off the table's counts, so after collection the version
    index claimed about a page per key (here 1,114 pages for 1,100 entries, more than a rebuild
    may write, so it was compacted in chunks, which left the counts as they were). It is judged
    small by its entries and rebuilt whole, which resets them: `pages_used` says what is used."""
    lsn = 0
    for _round in range(30):  # 1,100 keys, 300 versions each
        recs = []
        for _ in range(10):
            for k in range(1100):
                lsn += 1
                recs.append(rec(lsn, lsn - 1, b"key:%04d" % k, b"v"))
        store.append(1, codec.encode_frame(recs), lsn)
    with store.env.begin() as txn:
        assert txn.stat(store._versions)["leaf_pages"] > 1100  # a sub-database per key
    collect(store, lsn)
    with store.env.begin() as txn:
        st = txn.stat(store._versions)
    assert st["entries"] == 1100 and st["leaf_pages"] <= 12, st
    assert store.state().pages_used <= 48, store.state().pages_used


@pytest.mark.parametrize("stored", [
    b"\x00" * 31,                                                     # not 32 bytes
    (LSN_VALID_MAX + 1).to_bytes(8, "big") + b"\x00" * 24,            # a horizon no LSN reaches
    (5).to_bytes(8, "big") + (9).to_bytes(8, "big") + b"\x00" * 16,   # swept above the horizon
])
def test_a_damaged_collection_state_is_refused_at_open_with_its_cause(tmp_path, stored):
    """The node's own folder is checked too: a collection state that no collection writes would
    raise the hint and the horizon past what the node holds; the open is refused, says why, and
    leaves the folder to a second try (and to a wipe)."""
    from engine.errors import StorageError
    from engine.node.collection import gc_key

    s = open_store(tmp_path / "n1")
    s.sync_epoch(1, ())
    s.append(1, chain((1, b"k", b"v")), 1)
    with s.env.begin(write=True) as txn:
        txn.put(gc_key(0), stored, db=s._meta)
    s.close()
    for _ in range(2):  # the refused open released the folder
        with pytest.raises(StorageError, match="collection state of PG 0 .* is damaged"):
            open_store(tmp_path / "n1")


@pytest.mark.parametrize("visited, at_floor, again", [
    (0, False, False), (1, False, False), (1999, False, False), (2000, False, True),
    (63, True, False), (64, True, True),
])
def test_the_collection_thread_steps_again_at_once_only_after_a_step_that_used_its_whole_budget(tmp_path, monkeypatch, visited, at_floor, again):
    """A step that caught up (it visited fewer records than it could) waits COLLECT_INTERVAL_S:
    with a steady stream of appends every step visits a few new records, and stepping again
    after COLLECT_BUSY_S whenever a step visited anything made six write transactions per put
    on an embedded volume."""
    from engine.node import service

    node = StorageNode(str(tmp_path / "n1"), NodeInfo("n1", "a"), Geometry(P), "vol-1", durable=False)
    try:
        node.store._at_floor = at_floor
        asked = []

        def step(records_max, tombstones):
            asked.append(records_max)
            return visited

        monkeypatch.setattr(node.store, "collect_step", step)
        assert node._collect_in_background() is again
        assert asked == [service.COLLECT_RECORDS_PER_STEP]
        assert node.store.collect_budget(service.COLLECT_RECORDS_PER_STEP) == (64 if at_floor else 2000)
    finally:
        node.close()


def test_a_full_node_restarted_with_much_to_collect_shrinks_its_steps_until_they_fit_and_collects_it_all(tmp_path):
    """A step's transaction copies every page it changes before it frees any, so at the map's
    maximum a step of many records can find no page left while a smaller one fits. A node filled
    with overwrites to its floor, then restarted (its "at the floor" flag is in memory: the first
    steps are full-sized), once tried the same too-large step for ever (MDB_MAP_FULL each time), so
    what the overwrites hid was never removed and the node stayed full. Now a full step halves the
    following steps' budget, and committed steps double it back."""
    from engine.node.collection import COLLECT_RECORDS_PER_STEP
    from engine.errors import StorageFull

    def open_full():
        s = SegmentStore(str(tmp_path / "n1"), "n1", "a", Geometry(P), "vol-1", durable=False, max_bytes=4 << 20)
        s.sync_epoch(1, ())
        return s

    s = open_full()
    lsn, value = 0, b"x" * 3000
    with pytest.raises(StorageFull):
        for _ in range(10_000):  # 200 keys, each overwritten until the node refuses appends
            entries = [(lsn + i + 1, b"k%03d" % ((lsn + i + 1) % 200), value) for i in range(10)]
            s.append(1, chain(*entries, first_prev=lsn), lsn + 10)
            lsn += 10
    s.close()
    s = open_full()
    try:
        s.append(1, codec.encode_frame([]), lsn, collect=(lsn, 0))
        full = steps = 0
        while steps < 200:
            steps += 1
            try:
                if not s.collect_step(COLLECT_RECORDS_PER_STEP, None):
                    break
            except lmdb.MapFullError:
                full += 1
        else:
            raise AssertionError(f"collection did not finish in 200 steps ({full} found the map full)")
        assert full >= 1 and s.collect_steps_shrunk >= 1, "the test must reach a step too large for the full map"
        for k in range(200):
            held = versions(s, b"k%03d" % k)
            assert len(held) == 1 and held[0] > lsn - 200, (k, held)  # only each key's newest version is left
    finally:
        s.close()


@pytest.mark.parametrize("how", ["read", "scan"])
def test_a_read_that_collection_overtakes_after_its_checks_is_refused_not_answered_wrongly(store, how):
    """A read checks the horizon, then opens its read transaction. A collection step that
    commits in between (removing the versions the read point needs) must not leave the read
    answering from what is left: it is refused, SnapshotTooOld. (Seen on a clean clone: a
    released snapshot's get over gRPC answered None instead of its value or the refusal.) The
    interleaving is forced by running the step as the read opens its transaction."""
    store.append(1, chain((1, b"k", b"v1"), (2, b"k", b"v2"), (3, b"k", b"v3")), 3)
    assert store.read(0, b"k", 1, 1, 1).value == b"v1"
    store.append(1, codec.encode_frame([]), 3, collect=(3, 0))  # the writer's point moves to 3
    opened = store._read_txn

    def collect_then_open():
        while store.collect_step(1000, None):
            pass
        assert versions(store, b"k") == [3]
        return opened()

    store._read_txn = collect_then_open
    with pytest.raises(SnapshotTooOld):
        if how == "read":
            store.read(0, b"k", 1, 1, 1)
        else:
            store.scan(0, b"", None, 1, 1, 10, 1)
    store._read_txn = opened
    assert store.read(0, b"k", 3, 3, 1).value == b"v3"


# --- the passes' shortcuts give what walking and decoding every record gives -----------------
@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(st.integers(1, 8), st.integers(0, 3), st.binary(min_size=1, max_size=40),
                  st.binary(max_size=60), st.sampled_from([PUT, DEL, PUT | FLAG_REQUEST]))
def test_peek_reads_the_flags_and_key_the_decoder_reads(lsn, pg, key, value, flags):
    from engine.node.collection import _peek
    r = rec(lsn, lsn - 1, key, value, flags, pg)
    d = codec.decode_record(r)
    assert _peek(r) == (d.flags, d.key)
    assert _peek(r[:20]) == (0xFF, b"")  # no header: "every flag", so the pass decodes it and refuses it


def _store_tables(s) -> tuple[list, list]:
    with s.env.begin() as txn:
        return list(txn.cursor(db=s._log)), list(txn.cursor(db=s._versions))


@hypothesis.settings(max_examples=40, deadline=None, suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])
@hypothesis.given(st.lists(st.tuples(st.integers(0, 5), st.booleans(), st.integers(0, 1)), min_size=1, max_size=60),
                  st.lists(st.tuples(st.integers(0, 70), st.integers(0, 70), st.integers(1, 7)), min_size=1, max_size=8),
                  st.booleans())
# A step that removed nothing persists no points: a restart forgets them (found on a clean clone).
@hypothesis.example(ops=[(0, False, 0)], steps=[(1, 0, 1), (0, 0, 1)], reopen=True)
def test_the_tombstones_pass_from_what_the_versions_pass_saw_removes_what_a_walk_removes(tmp_path, monkeypatch, ops, steps, reopen):
    """Puts and deletes over a few keys, then collection steps at varying points, tombstone
    points and budgets, on two stores fed the same: one whose tombstones pass uses what the
    versions pass remembered, one that walks the log for it every time (nothing remembered).
    Both end with the very same log and version index, step by step (and after a restart of
    both, after which nothing is remembered)."""
    import uuid

    from engine.node import collection
    root = tmp_path / uuid.uuid4().hex
    fast, walk = open_store(root / "fast"), open_store(root / "walk")
    try:
        frames, prev, lsn = [], [0] * P, 0
        for key, delete, pg in ops:
            lsn += 1
            frames.append(rec(lsn, prev[pg], b"k%d" % key, b"v%d" % lsn, DEL if delete else PUT, pg))
            prev[pg] = lsn
        for s in (fast, walk):
            s.sync_epoch(1, ())
            s.append(1, codec.encode_frame(frames), lsn)
        for i, (point, tomb, budget) in enumerate(steps):
            if reopen and i == len(steps) // 2:
                # Both restart (a step that removed nothing persists no points: both forget
                # them alike); the first forgets what it remembered too, and walks again.
                fast.close()
                walk.close()
                fast, walk = open_store(root / "fast"), open_store(root / "walk")
            for s, remembered in ((fast, collection.TOMBSTONES_SEEN_MAX), (walk, 0)):
                monkeypatch.setattr(collection, "TOMBSTONES_SEEN_MAX", remembered)
                s.append(1, codec.encode_frame([]), lsn, collect=(min(point, lsn), 0))
                for _ in range(200):
                    if not s.collect_step(budget, [min(tomb, lsn)] * P):
                        break
            assert _store_tables(fast) == _store_tables(walk)
            assert fast.gc == walk.gc
    finally:
        fast.close()
        walk.close()
