"""Self-healing and recovery in the embedded deployment, on real LMDB: gossip gap fill, rebuild of
a wiped node, scrub of corrupt records, writer recovery with epochs and fencing, membership change.

Waits are on conditions with the generous deadline of `tests/waiting.py`; a scenario step that
must come "a little later" is driven by an event of the engine (a progress callback), not a timer.
The write timeout is generous where writes must succeed; a test of refusals sets a short one, and
its writes that must succeed go through `put_durably` (one that times out must still commit).
"""

from __future__ import annotations

import threading

import pytest
from waiting import DEADLINE_S, eventually

import engine
from engine.cluster.testing import put_durably
from engine.core.placement import protection_group_of
from engine.embedded import EmbeddedOptions, EmbeddedVolume
from engine.head.writer import Writer, WriterOptions
from engine.transport.inprocess import InProcessTransport

#: the write timeout of tests whose writes must all succeed
WRITE_TIMEOUT_S = 10.0


def open_db(path, **kw):
    kw.setdefault("write_timeout_s", WRITE_TIMEOUT_S)
    kw.setdefault("gossip_interval_s", 0.02)
    kw.setdefault("scrub_interval_s", 0.05)
    return engine.open(path, **kw)


def node(st, node_id):
    return next(n for n in st["nodes"] if n["id"] == node_id)


def all_equal_scl(db):
    st = db.status()
    scls = [str(n.get("scl")) for n in st["nodes"] if n["up"]]
    return len(set(scls)) == 1 and len(scls) == len(st["nodes"])


def test_wiped_node_rebuilds_from_peers_and_serves_only_when_complete(tmp_path):
    with open_db(tmp_path / "d") as db:
        for i in range(300):
            db.put(b"w%03d" % i, b"v%d" % i)
        db.cluster.wipe_node("n2")
        db.put(b"poke", b"1")  # tells n2 the current VDL, which bounds what it fetches
        eventually(lambda: all_equal_scl(db), "n2 rebuilt: every node at the same SCLs")
        # A gossip step counts what it repaired once it ends, after its last frame moved the SCL.
        eventually(lambda: node(db.status(), "n2")["repaired"] >= 300, "n2 to count the records it repaired")
        st = db.status()
        assert node(st, "n2")["records"] == node(st, "n1")["records"]
        assert node(st, "n2")["repaired"] >= 300
        # with n2 rebuilt, lose AZ b and n1: n2 must hold everything
        db.cluster.stop_az("b")
        db.cluster.stop_node("n1")
        for i in range(300):
            assert db.get(b"w%03d" % i) == b"v%d" % i


def test_corrupt_record_is_never_served_and_is_refetched(tmp_path):
    with open_db(tmp_path / "d") as db:
        with db.batch() as b:
            b.put(b"victim", b"precious")
        # The victim's own record: the unit's last LSN (its CPL) is its request record, which may
        # sit in another PG or, as the newest record, in this one ("the newest of the PG" would
        # then hit it instead of the victim).
        lsn = b.lsn - 1
        pg = protection_group_of(b"victim", db.status()["protection_groups"])
        eventually(lambda: all(node(db.status(), n)["scl"][pg] >= lsn for n in ("n1", "n2", "n3")),
                   f"n1, n2, n3 to hold the victim (LSN {lsn})")
        hit = {n: db.cluster.corrupt(n, pg, lsn, bit=8 * 40 + 3) for n in ("n1", "n2", "n3")}
        assert hit == {"n1": lsn, "n2": lsn, "n3": lsn}, hit
        # every read path avoids the corrupt copies: single-segment (a snapshot's get: a get of
        # now is answered from the writer's memory of its writes), quorum, scan
        for _ in range(20):
            assert db.get(b"victim") == b"precious"
            with db.snapshot() as snap:
                assert snap.get(b"victim") == b"precious"
            assert db.get(b"victim", quorum=True) == b"precious"
            assert dict(db.scan(b"victim", b"victin")) == {b"victim": b"precious"}
        # scrub (or a read) finds them, counts them, and gossip refetches good copies
        eventually(lambda: sum(node(db.status(), n)["corrupt_found"] for n in hit) >= 3, "the three corrupt copies found")
        db.put(b"poke", b"1")
        eventually(lambda: all_equal_scl(db), "the corrupt copies refetched: every node at the same SCLs")
        # now only the refetched copies remain on n1..n3: lose the other three, read from them
        for n in ("n4", "n5", "n6"):
            db.cluster.stop_node(n)
        assert db.get(b"victim", quorum=True) == b"precious"


def test_opening_a_writer_needs_a_write_quorum(tmp_path):
    with open_db(tmp_path / "d") as db:
        db.put(b"k", b"v")
        db.cluster.stop_az("c")
        db.cluster.stop_node("n4")
        with pytest.raises(engine.Unavailable, match="cannot open the volume"):
            db.cluster.crash_writer()


def test_writer_recovery_after_crash_truncates_the_incomplete_tail(tmp_path):
    # The refused write waits out the write timeout, so it is short; the 50 writes that must
    # succeed first are checked to commit should it pass first (a loaded machine).
    with open_db(tmp_path / "d", write_timeout_s=0.3) as db:
        for i in range(50):
            put_durably(db, b"a%d" % i, b"v")
        # AZ+1 down: a write is logged on three segments at most and can never be acknowledged
        db.cluster.stop_az("c")
        db.cluster.stop_node("n4")
        with pytest.raises(engine.Unavailable):
            db.put(b"lost", b"never acked")
        epoch = db.status()["epoch"]
        db.cluster.start_node("n4")  # a new writer needs a write quorum to seal and repair
        db.cluster.crash_writer()  # new writer: seals a new epoch on the four live nodes
        st = db.status()
        assert st["epoch"] == epoch + 1
        rec = st["writer"]["recovery"]
        assert rec["vdl"] >= 50
        for i in range(50):
            assert db.get(b"a%d" % i) == b"v"
        db.cluster.start_az("c")
        put_durably(db, b"after", b"ok")
        assert db.get(b"after") == b"ok"
        # whatever the unacknowledged write's fate, every reader agrees on it, for ever
        v1 = db.get(b"lost")
        assert v1 == db.get(b"lost", quorum=True)
        db.cluster.crash_writer()
        assert db.get(b"lost") == v1 and db.get(b"lost", quorum=True) == v1


def test_a_new_writer_fences_the_old_one(tmp_path):
    # The fenced writer's writes fail at once (the nodes refuse its epoch); the new one's must
    # succeed: a generous write timeout for both.
    vol = EmbeddedVolume(str(tmp_path / "d"), EmbeddedOptions(write_timeout_s=WRITE_TIMEOUT_S, gossip_interval_s=0.05))
    db = engine.Database(vol)
    try:
        db.put(b"k", b"old-writer")
        old = vol.writer
        new = Writer(InProcessTransport(vol.registry, "writer2"), vol.node_infos, vol.geometry,
                     WriterOptions(write_timeout_s=WRITE_TIMEOUT_S))
        new.open()
        assert new.epoch > old.epoch
        with pytest.raises((engine.StaleEpoch, engine.WriteIndeterminate)):
            old.put(b"k", b"from-the-fenced-writer")
        with pytest.raises(engine.StaleEpoch):
            old.put(b"k", b"again")
        assert new.get(b"k") == b"old-writer"
        new.put(b"k", b"new-writer")
        assert new.get(b"k") == b"new-writer"
        new.abandon()
    finally:
        db.close()


def test_replace_node_without_stopping_writes(tmp_path):
    with open_db(tmp_path / "d") as db:
        for i in range(100):
            db.put(b"r%d" % i, b"v%d" % i)
        db.cluster.stop_node("n3")  # failed for good
        stop = threading.Event()
        written, errors = [], []

        def writer():
            i = 0
            while not stop.is_set() and i < 5000:
                try:
                    db.put(b"during%d" % i, b"x")
                    written.append(i)
                except Exception as e:  # pragma: no cover - reported by the assert below
                    errors.append(e)
                i += 1

        t = threading.Thread(target=writer)
        t.start()
        try:
            result = db.cluster.replace_node("n3", "n7")
        finally:
            stop.set()
            t.join()
        assert result["replaced"] and errors == []
        st = db.status()
        assert st["writer"]["membership"]["members"] == ["n1", "n2", "n7", "n4", "n5", "n6"]
        assert [n["id"] for n in st["nodes"]] == ["n1", "n2", "n4", "n5", "n6", "n7"]
        assert node(st, "n7")["az"] == "b"
        # n7 is a full member: lose AZ a and n4, read everything from n5, n6, n7
        db.cluster.stop_az("a")
        db.cluster.stop_node("n4")
        for i in range(100):
            assert db.get(b"r%d" % i) == b"v%d" % i
        for i in written[-20:]:
            assert db.get(b"during%d" % i) == b"x"
    with open_db(tmp_path / "d") as db:  # the new membership survives reopening
        assert db.status()["writer"]["membership"]["members"] == ["n1", "n2", "n7", "n4", "n5", "n6"]


def test_replace_is_reverted_if_the_old_node_returns(tmp_path):
    with open_db(tmp_path / "d") as db:
        for i in range(50):
            db.put(b"r%d" % i, b"v")
        db.cluster.stop_node("n3")
        vol = db.cluster._v
        # hold the new node back (stopped) so the change cannot complete, then bring n3 back
        orig_start = vol._start

        def start_then_stop(info):
            orig_start(info)
            if info.id == "n7":
                vol.stop_node("n7")  # it can never catch up, so the change cannot complete...

        progressed: list[float] = []

        def progress(fraction: float) -> None:
            progressed.append(fraction)
            if len(progressed) == 1:
                vol.start_node("n3")  # ...before n3 is back: the change is under way, n7 behind

        vol._start = start_then_stop
        result = db.cluster.replace_node("n3", "n7", timeout_s=DEADLINE_S, progress=progress)
        vol._start = orig_start
        assert progressed and max(progressed) < 1.0
        assert result["reverted"] and not result["replaced"]
        st = db.status()
        assert st["writer"]["membership"]["members"] == ["n1", "n2", "n3", "n4", "n5", "n6"]
        assert st["writer"]["membership"]["next_members"] is None
        db.put(b"after-revert", b"ok")
        assert db.get(b"after-revert") == b"ok"
