"""The segment store on real LMDB: append, SCL along backlinks, fencing, reads at a read point,
truncation, corruption, and state that survives closing and reopening."""

from __future__ import annotations

import pytest

from engine import codec
from engine.core.constants import FLAG_CPL, FLAG_DELETE, FLAG_PUT
from engine.core.types import Geometry, TruncationRange
from engine.errors import CorruptRecord, EpochBehind, GeometryMismatch, SegmentIncomplete, StaleEpoch, UnknownProtectionGroup
from engine.node.store import SegmentStore

P = 4


def rec(lsn, prev, pg, key, value=b"v", flags=FLAG_PUT | FLAG_CPL):
    return codec.encode_record(lsn, prev, pg, flags, key, value)


def open_store(path, **kw):
    return SegmentStore(str(path), "n1", "a", Geometry(P), "vol-1", durable=False, **kw)


@pytest.fixture
def store(tmp_path):
    s = open_store(tmp_path / "n1")
    s.sync_epoch(1, ())
    yield s
    s.close()


def test_scl_follows_backlinks_and_waits_at_a_hole(store):
    # PG 0 chain: 1 -> 3 -> 5; PG 1: 2 -> 4
    store.append(1, codec.encode_frame([rec(1, 0, 0, b"a"), rec(2, 0, 1, b"b")]), 0)
    assert store.scls[0] == 1 and store.scls[1] == 2
    # 5 arrives before 3: kept, but SCL waits at the hole
    store.append(1, codec.encode_frame([rec(5, 3, 0, b"a", b"v5")]), 0)
    assert store.scls[0] == 1
    assert store.max_lsn[0] == 5
    # the hole is filled: SCL walks through 3 and on to 5
    store.append(1, codec.encode_frame([rec(3, 1, 0, b"c")]), 0)
    assert store.scls[0] == 5


def test_read_refused_above_scl_and_versions_at_read_point(store):
    store.append(1, codec.encode_frame([rec(1, 0, 0, b"k", b"one"), rec(2, 1, 0, b"k", b"two")]), 0)
    assert store.read(0, b"k", 1, 1, store.epoch).value == b"one"
    assert store.read(0, b"k", 2, 2, store.epoch).value == b"two"
    assert store.read(0, b"k", 99, 2, store.epoch).value == b"two"
    assert store.read(0, b"missing", 2, 2, store.epoch).lsn == 0
    with pytest.raises(SegmentIncomplete):
        store.read(0, b"k", 3, 3, store.epoch)  # needs the chain to LSN 3; the segment has 2


def test_delete_is_a_tombstone_version(store):
    store.append(1, codec.encode_frame([rec(1, 0, 0, b"k", b"x"), rec(2, 1, 0, b"k", b"", FLAG_DELETE | FLAG_CPL)]), 0)
    r = store.read(0, b"k", 2, 2, store.epoch)
    assert r.deleted and r.value is None and r.lsn == 2
    assert store.read(0, b"k", 1, 1, store.epoch).value == b"x"


def test_epoch_fencing(store):
    frame = codec.encode_frame([rec(1, 0, 0, b"a")])
    with pytest.raises(EpochBehind):
        store.append(2, frame, 0)
    store.seal(3)
    with pytest.raises(StaleEpoch):
        store.append(1, frame, 0)
    with pytest.raises(StaleEpoch):
        store.seal(3)
    assert store.scls[0] == 0  # nothing was written by the refused appends


def test_corrupt_frame_is_rejected_whole(store):
    good = rec(1, 0, 0, b"a")
    frame = bytearray(codec.encode_frame([good, rec(2, 0, 1, b"b")]))
    frame[-1] ^= 0x01
    with pytest.raises(CorruptRecord):
        store.append(1, bytes(frame), 0)
    assert store.scls == [0, 0, 0, 0]
    assert store.state().records == 0


def test_unknown_pg_is_refused(store):
    with pytest.raises(UnknownProtectionGroup):
        store.append(1, codec.encode_frame([rec(1, 0, P, b"a")]), 0)
    with pytest.raises(UnknownProtectionGroup):
        store.read(P, b"a", 1, 0, store.epoch)


def test_state_survives_close_and_reopen(tmp_path):
    s = open_store(tmp_path / "n1")
    s.sync_epoch(1, ())
    s.append(1, codec.encode_frame([rec(1, 0, 0, b"a", b"A"), rec(2, 0, 1, b"b", b"B")]), 2)
    s.close()
    s = open_store(tmp_path / "n1")
    try:
        assert s.epoch == 1 and s.scls[:2] == [1, 2] and s.hint_lsn == 2
        assert s.read(1, b"b", 2, 2, s.epoch).value == b"B"
    finally:
        s.close()


def test_reopen_with_other_geometry_is_refused(tmp_path):
    open_store(tmp_path / "n1").close()
    with pytest.raises(GeometryMismatch):
        SegmentStore(str(tmp_path / "n1"), "n1", "a", Geometry(P + 1), "vol-1", durable=False)


def test_truncation_cuts_records_and_refuses_late_arrivals(store):
    store.append(1, codec.encode_frame([rec(1, 0, 0, b"a"), rec(2, 1, 0, b"a", b"dead")]), 0)
    assert store.scls[0] == 2
    store.sync_epoch(2, (TruncationRange(2, 2, 100),))
    assert store.scls[0] == 1
    assert store.read(0, b"a", 200, 1, store.epoch).value == b"v"
    # a late copy of the dead record (say from gossip) is ignored for ever
    store.append(0, codec.encode_frame([rec(2, 1, 0, b"a", b"dead")]), 0, repair=True)
    assert store.state().records == 1
    # the new writer continues the chain above the range
    store.append(2, codec.encode_frame([rec(101, 1, 0, b"a", b"new")]), 0)
    assert store.scls[0] == 101 and store.read(0, b"a", 101, 101, store.epoch).value == b"new"


def test_flipped_bit_at_rest_is_never_served(store):
    store.append(1, codec.encode_frame([rec(1, 0, 0, b"k", b"good")]), 0)
    assert store.corrupt(0, 1, bit=300) == 1
    with pytest.raises(SegmentIncomplete):
        store.read(0, b"k", 1, 1, store.epoch)
    # quarantined: gone from the log, SCL pulled back, counted
    assert store.scls[0] == 0 and store.state().corrupt_found == 1
    frame = store.fetch(0, 0).frame
    assert codec.verify_frame(frame) == 0


def test_fetch_skips_corrupt_records(store):
    store.append(1, codec.encode_frame([rec(1, 0, 0, b"a"), rec(2, 1, 0, b"b"), rec(3, 2, 0, b"c")]), 0)
    store.corrupt(0, 2, bit=999)
    frame = store.fetch(0, 0).frame
    assert [r.lsn for r in codec.decode_frame(frame)] == [1, 3]


def test_scan_returns_newest_versions_in_key_order_with_tombstones(store):
    records = [
        rec(1, 0, 0, b"b", b"b1"),
        rec(2, 1, 0, b"a", b"a1"),
        rec(3, 2, 0, b"b", b"b2"),
        rec(4, 3, 0, b"c", b"", FLAG_DELETE | FLAG_CPL),
    ]
    store.append(1, codec.encode_frame(records), 0)
    entries, resume = store.scan(0, b"", None, 4, 4, 100, store.epoch)
    assert resume is None
    assert [(e.key, e.value) for e in entries] == [(b"a", b"a1"), (b"b", b"b2"), (b"c", None)]
    entries, _ = store.scan(0, b"", None, 2, 2, 100, store.epoch)
    assert [(e.key, e.value) for e in entries] == [(b"a", b"a1"), (b"b", b"b1")]
    entries, resume = store.scan(0, b"a", b"c", 4, 4, 1, store.epoch)
    assert [e.key for e in entries] == [b"a"] and resume == b"b"


def test_seal_summarises_records_above_the_hint(store):
    store.append(1, codec.encode_frame([rec(1, 0, 0, b"a"), rec(2, 1, 0, b"b"), rec(3, 0, 1, b"c")]), 1)
    reply = store.seal(2)
    seg0 = reply.segments[0]
    assert seg0.hint_lsn == 1 and seg0.last_lsn_at_hint == 1
    assert [h.lsn for h in seg0.records] == [2]
    assert [h.lsn for h in reply.segments[1].records] == [3]


def test_a_node_sealed_but_not_synced_at_an_epoch_takes_no_appends_at_it(tmp_path):
    """A seal that its writer did not follow with a sync (an open or a membership step that
    fell short of a write quorum) leaves the node at an epoch another writer may then own. Its
    appends must wait for that writer's sync, which brings the epoch's truncation ranges: taken
    first, they once taught the node a durable hint that then made it refuse the ranges for
    ever (replicas diverged in chaos seed 7). The state survives a restart."""
    s = open_store(tmp_path / "n1")
    s.sync_epoch(1, ())
    s.append(1, codec.encode_frame([rec(1, 0, 0, b"a")]), 1)
    s.seal(2)
    with pytest.raises(EpochBehind, match="not synced"):
        s.append(2, codec.encode_frame([rec(2, 1, 0, b"b")]), 1)
    with pytest.raises(EpochBehind):
        s.append(2, codec.encode_frame([]), 2)  # a heartbeat with a new hint too
    assert s.hint_lsn == 1
    s.close()
    s = open_store(tmp_path / "n1")
    assert (s.epoch, s.synced_epoch) == (2, 1)
    with pytest.raises(EpochBehind):
        s.append(2, codec.encode_frame([rec(2, 1, 0, b"b")]), 1)
    # Gossip's hand-on of a peer's state is no writer's sync (unless it brings that epoch's membership)...
    s.sync_epoch(2, (), None, writer=False)
    assert s.synced_epoch == 1
    s.sync_epoch(2, (TruncationRange(2, 5, 9),))  # ...the writer's sync is
    assert s.synced_epoch == 2
    s.append(2, codec.encode_frame([rec(2, 1, 0, b"b")]), 2)
    assert s.scls[0] == 2
    s.close()


def test_a_folder_from_before_the_synced_epoch_counts_as_synced_at_its_epoch(tmp_path):
    s = open_store(tmp_path / "n1")
    s.sync_epoch(3, ())
    with s.env.begin(write=True) as txn:  # as a release before the key wrote it
        txn.delete(b"synced_epoch", db=s._meta)
    s.close()
    s = open_store(tmp_path / "n1")
    assert (s.epoch, s.synced_epoch) == (3, 3)
    s.append(3, codec.encode_frame([rec(1, 0, 0, b"a")]), 1)
    s.close()


# --- MDB_APPEND where a frame's keys ascend past the table (engine.node.store._put_ascending) ---

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(held=st.sets(st.binary(min_size=1, max_size=3), max_size=80),
       new=st.lists(st.binary(min_size=1, max_size=3), max_size=200),
       sort=st.booleans(), dupsort=st.booleans())
def test_putting_with_append_where_keys_ascend_stores_what_a_plain_put_stores(tmp_path_factory, held, new, sort, dupsort):
    """Whatever the keys (held or not, ascending or not, repeated or not), the table ends as a
    plain putmulti leaves it and the (consumed, added) counts are the same."""
    import lmdb

    from engine.node.store import APPEND_RECORDS_MIN, _put_ascending

    if sort:
        new = sorted(set(new))
    new = (new * (1 + APPEND_RECORDS_MIN // max(1, len(new))))[: max(len(new), APPEND_RECORDS_MIN + 5)] if new else []
    pairs = [(k, b"v" + k) for k in new]
    if sort:
        pairs = sorted(dict(pairs).items())
    flags = {"dupdata": True} if dupsort else {"overwrite": False}
    results = []
    for use_append in (False, True):
        env = lmdb.open(str(tmp_path_factory.mktemp("t")), max_dbs=2, map_size=1 << 24)
        db = env.open_db(b"t", dupsort=dupsort)
        with env.begin(write=True, db=db) as txn:
            for k in held:
                txn.put(k, b"held")
            cur = txn.cursor()
            counts = _put_ascending(cur, pairs, **flags) if use_append else cur.putmulti(pairs, **flags)
            results.append((counts, list(txn.cursor().iternext())))
        env.close()
    assert results[0] == results[1]


def test_a_frame_whose_keys_ascend_past_the_log_fills_its_pages(tmp_path):
    """1 KB records in key order: three to a 4 KiB page with MDB_APPEND; LMDB's ordinary split
    kept two (it always moves the last record to the new page). Fails without _put_ascending."""
    import lmdb

    s = open_store(tmp_path / "n1")
    try:
        s.sync_epoch(1, ())
        n, lsn = 3000, 0
        for _frame in range(3):  # three frames, each ascending past the one before
            recs = []
            for _ in range(n // 3):
                lsn += 1
                recs.append(rec(lsn, lsn - 1, 0, b"key:%08d" % lsn, b"x" * 1000, FLAG_PUT))
            s.append(1, codec.encode_frame(recs), 0)
        assert s.scls[0] == n
        with s.env.begin() as txn:
            pages = txn.stat(s._log)["leaf_pages"]
            assert txn.stat(s._log)["entries"] == n
        assert pages <= n // 3 + 3, f"{n} records of 1 KB took {pages} leaf pages"
        assert s.read(0, b"key:%08d" % 1234, n, n, 1).value == b"x" * 1000
    finally:
        s.close()


class _Watched:
    """A real LMDB environment whose write transactions report, at commit, whether the staging
    section was held (everything else goes to the real objects)."""

    def __init__(self, env, seen):
        self._env, self._seen = env, seen

    def begin(self, **kw):
        return _WatchedTxn(self._env.begin(**kw), self._seen)

    def __getattr__(self, name):
        return getattr(self._env, name)


class _WatchedTxn:
    def __init__(self, txn, seen):
        self._txn, self._seen = txn, seen

    def commit(self):
        from engine.node.store import STAGING

        self._seen.append(("commit", STAGING.locked()))
        return self._txn.commit()

    def put(self, *a, **kw):
        from engine.node.store import STAGING

        self._seen.append(("put", STAGING.locked()))
        return self._txn.put(*a, **kw)

    def __getattr__(self, name):
        return getattr(self._txn, name)


def test_an_append_fills_its_transaction_inside_the_staging_section_and_commits_outside_it(store):
    """Six segments of an embedded volume overlap their fsyncs, not their Python and LMDB work
    (engine.node.store.STAGING); a failed append leaves the section free and nothing written."""
    from engine.node import store as store_mod

    seen = []
    real = store.env
    store.env = _Watched(real, seen)
    try:
        store._persisted_at = float("-inf")  # this append persists its SCLs: puts inside the body
        store.append(1, codec.encode_frame([rec(1, 0, 0, b"a"), rec(2, 0, 1, b"b")]), 0)
        assert ("put", True) in seen and seen[-1] == ("commit", False), seen
        assert not store_mod.STAGING.locked()
        # A record that conflicts with a held one aborts the frame: the section is left, nothing lands.
        with pytest.raises(Exception):
            store.append(1, codec.encode_frame([rec(1, 0, 0, b"other", b"x"), rec(3, 1, 0, b"c")]), 0)
        assert not store_mod.STAGING.locked()
        assert store.scls[0] == 1 and store.max_lsn[0] == 1
    finally:
        store.env = real
    assert store.read(0, b"a", 10, 1, store.epoch).value == b"v"
