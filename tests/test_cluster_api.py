"""`engine.connect` offers the same API as `engine.open`, over real processes: put, get, delete,
scan, batch, snapshot, status, close, and the same typed errors. Concurrent callers share RPCs
(the boxcar) and still each get their own outcome."""

from __future__ import annotations

import threading

import pytest
from waiting import eventually

import engine
from engine.cluster import Cluster
from engine.cluster.testing import free_base_port
from engine.core.constants import FLAG_DELETE, FLAG_PUT, KEY_BYTES_MAX, VALUE_BYTES_MAX
from engine.head.writer import ReadView

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("api") / "c")
    try:
        c.up(base_port=free_base_port(), protection_groups=4, timeout_s=60)
        yield c
    finally:
        c.down(timeout_s=10)


@pytest.fixture
def db(cluster):
    d = engine.connect(cluster.folder)
    try:
        yield d
    finally:
        d.close()


def test_put_get_delete(db):
    assert db.get(b"api:missing") is None
    db.put(b"api:k", b"v1")
    assert db.get(b"api:k") == b"v1"
    assert db.get(b"api:k", quorum=True) == b"v1"
    db.put(b"api:k", b"")
    assert db.get(b"api:k") == b"", "an empty value is a value, not a missing key"
    db.delete(b"api:k")
    assert db.get(b"api:k") is None
    db.delete(b"api:never-written")
    big = bytes(range(256)) * (VALUE_BYTES_MAX // 256)
    db.put(b"api:big", big)
    assert db.get(b"api:big") == big


def test_get_many_is_one_read_point_for_many_keys(db):
    for i in range(40):
        db.put(b"gm%02d" % i, b"v%d" % i)
    keys = [b"gm%02d" % i for i in range(40)] + [b"gm-missing"]
    assert db.get_many(keys) == [b"v%d" % i for i in range(40)] + [None]
    assert db.get_many(keys, quorum=True) == [b"v%d" % i for i in range(40)] + [None]
    with pytest.raises(engine.InvalidArgument):
        db.get_many([b"gm01", b"x" * 10_000])


def test_a_snapshot_holds_its_read_point_against_collection_until_it_is_closed(db):
    db.put(b"hold:k", b"before")
    snap = db.snapshot()
    for i in range(30):
        db.put(b"hold:k", b"v%d" % i)
    stats = db.status()["writer"]["stats"]
    assert stats["read_points"] >= 1 and stats["collect_lsn"] <= snap.read_point
    assert snap.get(b"hold:k") == b"before"
    snap.close()

    def refused() -> bool:
        try:
            assert snap.get(b"hold:k") == b"before"
            return False
        except engine.SnapshotTooOld:
            return True

    eventually(refused, "the nodes collected past the released snapshot, and refuse it (typed, over gRPC)")
    assert db.get(b"hold:k") == b"v29"


def test_scan_streams_in_key_order_at_one_read_point(db):
    with db.batch() as b:
        for i in range(700):
            b.put(f"scan:{i:04d}".encode(), f"v{i}".encode())
    got = list(db.scan(b"scan:", b"scan;"))
    assert got == [(f"scan:{i:04d}".encode(), f"v{i}".encode()) for i in range(700)]
    assert list(db.scan(b"scan:0100", b"scan:0103")) == [(f"scan:{i:04d}".encode(), f"v{i}".encode()) for i in (100, 101, 102)]
    assert list(db.scan(b"scan:0100", b"scan:0103", quorum=True))[0][0] == b"scan:0100"
    it = db.scan(b"scan:")
    assert next(it)[0] == b"scan:0000"
    it.close()  # abandoning a scan cancels its stream


def test_a_batch_is_atomic_and_a_snapshot_repeatable(db):
    db.put(b"snap:a", b"1")
    snap = db.snapshot()
    with db.batch() as b:
        b.put(b"snap:a", b"2").put(b"snap:b", b"2").delete(b"snap:c")
    assert b.lsn is not None and b.lsn > snap.read_point
    assert (db.get(b"snap:a"), db.get(b"snap:b")) == (b"2", b"2")
    assert (snap.get(b"snap:a"), snap.get(b"snap:b")) == (b"1", None)
    assert list(snap.scan(b"snap:", b"snap;")) == [(b"snap:a", b"1")]
    with pytest.raises(RuntimeError):
        with db.batch() as b:
            b.put(b"snap:d", b"x")
            raise RuntimeError("discard the batch")
    assert db.get(b"snap:d") is None


def test_typed_errors_are_the_embedded_ones(db, cluster):
    with pytest.raises(engine.InvalidArgument):
        db.put(b"", b"x")
    with pytest.raises(engine.InvalidArgument):
        db.put(b"k" * (KEY_BYTES_MAX + 1), b"x")
    with pytest.raises(engine.InvalidArgument):
        db.put(b"k", b"x" * (VALUE_BYTES_MAX + 1))
    with pytest.raises(engine.InvalidArgument):
        db.get("text key")
    future = ReadView(db.status()["vdl"] + 1000, (0, 0, 0, 0))
    with pytest.raises(engine.InvalidArgument):
        db._backend.get(b"k", view=future)
    with pytest.raises(engine.InvalidArgument):
        engine.connect(cluster.folder, no_such_option=1)
    with pytest.raises(engine.InvalidArgument):
        engine.connect("not a target")


def test_one_bad_unit_does_not_fail_its_neighbours(db):
    results = db._backend._send_writes([
        ((FLAG_PUT, b"unit:1", b"a"),),
        ((FLAG_PUT, b"", b"empty key"),),
        ((FLAG_DELETE, b"unit:2", b"a delete with a value"),),
        ((FLAG_PUT, b"unit:3", b"c"), (FLAG_PUT, b"unit:4", b"d")),
    ])
    assert isinstance(results[0], int) and isinstance(results[3], int) and results[3] > results[0]
    assert type(results[1]) is engine.InvalidArgument and type(results[2]) is engine.InvalidArgument
    assert (db.get(b"unit:1"), db.get(b"unit:3"), db.get(b"unit:4")) == (b"a", b"c", b"d")


def test_concurrent_callers_share_rpcs(db):
    threads, per = 32, 40
    failures: list[Exception] = []

    def writer(t):
        try:
            for i in range(per):
                db.put(f"conc:{t}:{i}".encode(), f"{t}.{i}".encode())
            for i in range(per):
                assert db.get(f"conc:{t}:{i}".encode()) == f"{t}.{i}".encode()
            assert db.get(f"conc:{t}:missing".encode()) is None
        except Exception as e:  # noqa: BLE001 - reported below
            failures.append(e)

    backend = db._backend
    cars0, gets0 = backend._writes.cars, backend._gets.cars
    ts = [threading.Thread(target=writer, args=(t,)) for t in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
        assert not t.is_alive(), "a caller never returned"
    assert not failures, failures[:3]
    assert backend._writes.cars - cars0 < threads * per / 2, "concurrent writes must share Write RPCs"
    assert backend._gets.cars - gets0 < threads * (per + 1) / 2, "concurrent gets must share GetMany RPCs"


def test_status_and_controls(db, cluster):
    st = db.status()
    assert st["volume_id"] == cluster.manifest["volume_id"] and st["protection_groups"] == 4
    assert [n["id"] for n in st["nodes"]] == ["n1", "n2", "n3", "n4", "n5", "n6"]
    assert all(n["up"] and set(n["scl"]) == {0, 1, 2, 3} for n in st["nodes"])
    assert isinstance(db.cluster, Cluster) and db.cluster.folder == cluster.folder


def test_connect_by_address_and_close(cluster):
    from engine.security.users import operator_token

    with pytest.raises(engine.Unauthenticated):  # an address with a certificate but no token
        with engine.connect(cluster.writer_address, tls=cluster.tls()) as anonymous:
            anonymous.get(b"addr:k")
    db = engine.connect(cluster.writer_address, tls=cluster.tls(), token=operator_token(cluster.folder))
    db.put(b"addr:k", b"v")
    assert db.get(b"addr:k") == b"v"
    assert db.cluster is None
    db.close()
    with pytest.raises(engine.Closed):
        db.get(b"addr:k")


def test_nothing_listening_is_unavailable_quickly():
    with pytest.raises(engine.Unavailable):
        engine.connect(f"127.0.0.1:{free_base_port(1)}", connect_timeout_s=1)
