"""Reader instances and the reader endpoint, over real processes: a cluster with two readers
(AZs b and c) reads the storage nodes at the read point the writer streams; reads through
`engine.connect(folder, role="reader")` return acknowledged values, `after=` gives
read-your-writes, writes are refused ReadOnly, lag is reported, a dead reader is skipped, and
with the writer SIGKILLed the readers still serve the last acknowledged values (that test is
last: it restarts the writer and checks the readers follow it again)."""

from __future__ import annotations

import json

import pytest

import engine
from engine.cli import main
from engine.cluster import Cluster
from engine.cluster.testing import free_base_port

from waiting import eventually

pytestmark = pytest.mark.cluster

WRITE_TIMEOUT_S = 3.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("readers") / "c")
    try:
        # Readers that never take over: these tests are about serving reads (tests/test_failover.py
        # has the promotions), including while no writer exists.
        c.up(base_port=free_base_port(count=12), protection_groups=4, timeout_s=120, readers=2,
             write_timeout_s=WRITE_TIMEOUT_S, promote_readers=False)
        yield c
    finally:
        c.down(timeout_s=10)


@pytest.fixture(scope="module")
def db(cluster):
    d = engine.connect(cluster.folder)
    yield d
    d.close()


@pytest.fixture(scope="module")
def ro(cluster):
    d = engine.connect(cluster.folder, role="reader")
    yield d
    d.close()


def test_readers_are_placed_in_the_azs_other_than_the_writers(cluster):
    readers = cluster.manifest["readers"]
    assert [(r["id"], r["az"]) for r in readers] == [("r1", "b"), ("r2", "c")]
    ports = {int(r["address"].rpartition(":")[2]) for r in readers}
    assert len(ports) == 2 and not ports & {int(n["address"].rpartition(":")[2]) for n in cluster.manifest["nodes"]}
    assert cluster.reader_ids == ["r1", "r2"]
    assert cluster.manifest["tls"] is True, "the module runs a secure cluster: readers speak mTLS as role reader"


def test_writes_return_their_commit_position(db):
    lsns = [db.put(b"pos:%d" % i, b"v") for i in range(5)]
    assert all(type(lsn) is int for lsn in lsns) and lsns == sorted(set(lsns)), lsns
    assert db.last_commit == lsns[-1]
    d = db.delete(b"pos:0")
    assert d > lsns[-1] and db.last_commit == d
    with db.batch() as b:
        b.put(b"pos:b1", b"1").put(b"pos:b2", b"2")
    assert b.lsn > d and db.last_commit == b.lsn


def test_reads_through_the_reader_endpoint_return_acknowledged_values(db, ro):
    for i in range(60):
        db.put(b"ro:%02d" % i, b"v%d" % i)
    last = db.last_commit
    assert ro.get(b"ro:59", after=last) == b"v59"
    keys = [b"ro:%02d" % i for i in range(60)]
    assert ro.get_many(keys + [b"ro:missing"], after=last) == [b"v%d" % i for i in range(60)] + [None]
    assert list(ro.scan(b"ro:", b"ro;", after=last)) == [(b"ro:%02d" % i, b"v%d" % i) for i in range(60)]
    assert ro.get(b"ro:07", quorum=True) == b"v7"
    # Without after= a replica read may lag a moment, never forever:
    db.put(b"ro:eventual", b"x")
    eventually(lambda: ro.get(b"ro:eventual") == b"x", "the readers to show a write without after=")


def test_reads_are_spread_over_both_readers(ro):
    seen = eventually(lambda: {ro.status()["reader"]["id"] for _ in range(8)} == {"r1", "r2"} or None,
                      "round_robin to reach both readers")
    assert seen
    st = ro.status()
    assert "writer" not in st and st["reader"]["id"] in ("r1", "r2") and st["vdl"] == st["reader"]["read_point"]


def test_a_session_through_the_reader_endpoint_never_sees_a_key_go_back(db, ro):
    """The reader endpoint balances one connection's reads over every reader, and two readers'
    read points differ by a few ms: a session once saw a key go back to an older value (27 of
    2,054 reads; found by the chaos cluster target). Replies carry their read point and the
    connection asks again when one comes from below what it already read."""
    import threading

    stop = threading.Event()

    def writer():
        for i in range(1, 1501):
            if stop.is_set():
                return
            db.put(b"mono:k", b"%08d" % i)

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    newest, reads = b"", 0
    try:
        for _ in range(1500):  # bounded
            if not t.is_alive():
                break
            for value in (ro.get(b"mono:k"), *ro.get_many([b"mono:k"]),
                          dict(ro.scan(b"mono:", b"mono;")).get(b"mono:k")):
                if value is not None:
                    reads += 1
                    assert value >= newest, f"the session read {value!r} after {newest!r}"
                    newest = value
    finally:
        stop.set()
        t.join(60)
    assert reads > 100 and ro._backend.session_point > 0


def test_read_your_writes_with_after(db, ro):
    for i in range(25):
        lsn = db.put(b"ryw:k", b"v%d" % i)
        assert ro.get(b"ryw:k", after=lsn) == b"v%d" % i, f"read after LSN {lsn} missed write {i}"
    lsn = db.delete(b"ryw:k")
    assert ro.get(b"ryw:k", after=lsn) is None
    with db.batch() as b:
        b.put(b"ryw:a", b"1").put(b"ryw:b", b"2")
    assert ro.get_many([b"ryw:a", b"ryw:b"], after=b.lsn) == [b"1", b"2"]
    assert list(ro.scan(b"ryw:", b"ryw;", after=db.last_commit)) == [(b"ryw:a", b"1"), (b"ryw:b", b"2")]
    assert db.get(b"ryw:a", after=b.lsn) == b"1", "the writer endpoint takes after= too"


def test_a_position_no_write_gave_is_replica_behind(ro, db):
    far = db.last_commit + 10_000_000
    with pytest.raises(engine.ReplicaBehind) as e:
        ro.get(b"ryw:a", after=far)
    assert isinstance(e.value, engine.Unavailable) and str(far) in str(e.value)
    with pytest.raises(engine.InvalidArgument):
        ro.get(b"ryw:a", after=-1)
    with pytest.raises(engine.InvalidArgument):
        ro.get(b"ryw:a", after="12")
    assert ro.get(b"ryw:a") == b"1", "the reader keeps serving after a timed-out wait"


def test_a_write_to_a_reader_is_refused_read_only(ro, db):
    with pytest.raises(engine.ReadOnly):
        ro.put(b"ro-write:k", b"v")
    with pytest.raises(engine.ReadOnly):
        ro.delete(b"ro-write:k")
    with pytest.raises(engine.ReadOnly):
        with ro.batch() as b:
            b.put(b"ro-write:k", b"v")
    assert db.get(b"ro-write:k") is None, "nothing was logged"
    refused = sum(r.get("refused_writes", 0) for r in [ro.status()["reader"], ro.status()["reader"]])
    assert refused >= 1


def test_lag_is_reported_and_small_after_a_quiet_period(cluster, db):
    lsn = db.put(b"lag:k", b"v")

    def caught_up():
        rs = cluster.status()["readers"]
        ok = len(rs) == 2 and all(r["health"] == "SERVING" and r["connected"] and r["read_point"] >= lsn
                                  and r["lag_lsns"] == 0 and 0 <= r["lag_ms"] < 1000 and r["heard_ms"] < 1000 for r in rs)
        return rs if ok else None

    rs = eventually(caught_up, "both readers caught up with a small lag")
    assert {r["id"] for r in rs} == {"r1", "r2"}
    assert all(r["writer_vdl"] >= lsn and r["updates"] > 0 for r in rs)


def test_cluster_status_lists_the_readers_with_their_lag(cluster, capsys):
    assert main(["cluster", "status", "--cluster", cluster.folder, "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert [r["id"] for r in st["readers"]] == ["r1", "r2"]
    assert all({"lag_lsns", "lag_ms", "read_point", "health"} <= set(r) for r in st["readers"])
    assert main(["cluster", "status", "--cluster", cluster.folder]) == 0
    text = capsys.readouterr().out
    assert "lag(ms)" in text and "r1" in text and "r2" in text


def test_cli_reads_with_role_reader_and_after(cluster, capsys):
    assert main(["put", "--cluster", cluster.folder, "cli:k", "hello", "--json"]) == 0
    commit = json.loads(capsys.readouterr().out)["commit"]
    assert isinstance(commit, int) and commit > 0
    assert main(["get", "--cluster", cluster.folder, "--role", "reader", "--after", str(commit), "cli:k"]) == 0
    assert capsys.readouterr().out == "hello\n"
    assert main(["scan", "--cluster", cluster.folder, "--role", "reader", "--after", str(commit), "cli:", "cli;"]) == 0
    assert capsys.readouterr().out == "cli:k\thello\n"
    with pytest.raises(SystemExit) as e:  # put has no --role: writes go to the writer
        main(["put", "--cluster", cluster.folder, "--role", "reader", "cli:k", "x"])
    assert e.value.code == 2


def test_a_dead_reader_is_skipped(cluster, db, ro):
    lsn = db.put(b"dead:k", b"v")
    assert ro.get(b"dead:k", after=lsn) == b"v"
    cluster.kill("r1")
    try:
        for i in range(40):
            assert ro.get(b"dead:k") == b"v", f"read {i} after r1 died"
        ids = {ro.status()["reader"]["id"] for _ in range(4)}
        assert ids == {"r2"}, ids
    finally:
        cluster.start("r1")
    eventually(lambda: {ro.status()["reader"]["id"] for _ in range(8)} == {"r1", "r2"} or None,
               "the balancer to use r1 again once it is back")


def test_reader_add_and_remove(cluster, db):
    rid = cluster.add_reader()
    try:
        entry = next(r for r in cluster.manifest["readers"] if r["id"] == rid)
        assert rid == "r3" and entry["az"] == "b"
        lsn = db.put(b"r3:k", b"v")
        with engine.connect(cluster.folder, role="reader") as ro3:
            assert ro3.get_many([b"r3:k"] * 6, after=lsn) == [b"v"] * 6
    finally:
        cluster.remove_reader(rid)
    assert cluster.reader_ids == ["r1", "r2"]
    assert next(r for r in cluster.manifest["readers"] if r["id"] == rid)["retired"] is True
    assert cluster.state(rid) == "down"


def test_with_the_writer_killed_readers_serve_the_last_acknowledged_values(cluster, db, ro):
    values = {b"last:%02d" % i: b"v%d" % i for i in range(30)}
    for k, v in values.items():
        db.put(k, v)
    db.delete(b"last:00")
    values[b"last:00"] = None
    last = db.last_commit
    assert ro.get_many(list(values), after=last) == list(values.values())
    for _ in range(4):  # both readers have it
        assert ro.get(b"last:29", after=last) == b"v29"
    cluster.kill("writer")
    with pytest.raises(engine.Unavailable):
        db.put(b"last:new", b"x")
    for _ in range(10):
        assert ro.get_many(list(values)) == list(values.values())
        assert dict(ro.scan(b"last:", b"last;")) == {k: v for k, v in values.items() if v is not None}
    eventually(lambda: all(not r["connected"] and r["read_point"] >= last for r in cluster.status()["readers"]) or None,
               "the readers to notice the writer is gone")
    with pytest.raises(engine.ReadOnly):
        ro.put(b"last:new", b"x")
    # A new writer: the readers follow it again (at its new epoch) without a restart.
    cluster.start("writer")
    lsn = db.put(b"last:after", b"y")
    assert ro.get(b"last:after", after=lsn) == b"y"
    assert ro.get(b"last:29") == b"v29"
    eventually(lambda: all(r["connected"] and r["epoch"] > 1 for r in cluster.status()["readers"]) or None,
               "both readers on the restarted writer's epoch")


def test_the_embedded_database_takes_after_too(tmp_path):
    with engine.open(tmp_path / "v", durable=False, write_timeout_s=1.0) as d:
        lsn = d.put(b"k", b"v")
        assert isinstance(lsn, int) and d.last_commit == lsn
        assert d.get(b"k", after=lsn) == b"v"
        assert list(d.scan(after=lsn)) == [(b"k", b"v")]
        with pytest.raises(engine.ReplicaBehind):
            d.get(b"k", after=lsn + 1_000_000)
