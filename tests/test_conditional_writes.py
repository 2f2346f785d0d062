"""Conditional writes (issue 14, item 1): a unit carries preconditions on keys; the writer checks
them as it orders the unit, under its lock, against its memory of recent writes (and, for keys it
does not remember, a read of the stored state made before the lock); a failed precondition logs
nothing and says which failed; over gRPC as in the embedded engine."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

import engine
from engine.cluster import Cluster
from engine.cluster.testing import free_base_port
from engine.core import conditions as cond
from engine.core.constants import FLAG_PUT
from engine.errors import InvalidArgument, PreconditionFailed
from engine.head import writer as writer_module
from engine.proto import kv_pb2
from engine.transport import convert


def test_absent_lets_the_first_put_in_and_refuses_the_second_saying_which_failed(db):
    lsn = db.put(b"k", b"first", expect=engine.absent(b"k"))
    with pytest.raises(PreconditionFailed, match=r"#0 b'k' absent: found a value of 5 bytes") as e:
        db.put(b"k", b"second", expect=engine.absent(b"k"))
    assert e.value.failed == (0,)
    assert db.get(b"k") == b"first"
    assert db.last_commit == lsn, "a refused write returned a commit position"


def test_a_failed_batch_logs_nothing_of_its_ops(db):
    db.put(b"a", b"1")
    vdl = db.status()["vdl"]
    with pytest.raises(PreconditionFailed) as e:
        with db.batch(expect=[engine.exists(b"a"), engine.equals(b"a", b"2"), engine.exists(b"nope")]) as b:
            b.put(b"a", b"3").put(b"b", b"3").delete(b"c")
    assert e.value.failed == (1, 2)
    assert (db.get(b"a"), db.get(b"b")) == (b"1", None)
    assert db.status()["vdl"] == vdl, "a refused unit took LSNs"


def test_equals_exists_and_unchanged_since_a_position(db):
    p1 = db.put(b"x", b"v1")
    with db.batch() as b:
        b.expect(engine.equals(b"x", b"v1"), engine.unchanged(b"x", p1)).put(b"x", b"v2")
    with pytest.raises(PreconditionFailed, match="unchanged since position"):
        db.put(b"x", b"v3", expect=engine.unchanged(b"x", p1))
    db.delete(b"x")
    with pytest.raises(PreconditionFailed, match="deleted"):
        db.put(b"x", b"v4", expect=engine.exists(b"x"))
    db.put(b"x", b"v4", expect=[engine.absent(b"x")])
    db.delete(b"x", expect=engine.equals(b"x", b"v4"))
    assert db.get(b"x") is None
    assert db.put(b"never", b"1", expect=engine.unchanged(b"never", 0)) > 0


def test_bad_conditions_are_refused_before_anything_is_logged(db):
    for bad in (b"k", "k", 3, [cond.Condition(b"", cond.EXISTS)], [cond.Condition(b"k", 9)],
                [cond.Condition(b"k", cond.EXISTS, b"v")], [cond.Condition(b"k", cond.UNCHANGED, lsn=-1)],
                [cond.Condition(b"k", cond.UNCHANGED, lsn=True)], [cond.Condition(b"k", cond.ABSENT, lsn=3)]):
        with pytest.raises(InvalidArgument):
            db.put(b"k", b"v", expect=bad)
    with pytest.raises(InvalidArgument, match="at most 1000"):
        db.batch(expect=[engine.exists(b"k")] * (cond.CONDITIONS_MAX + 1))
    assert db.get(b"k") is None


def test_a_condition_on_a_write_not_yet_durable_is_checked_from_memory_without_a_read(db):
    """Two units in flight at once: the second depends on the first, which is not durable when
    the second is ordered. The writer remembers the first; no read of a segment is made."""
    w = db._backend.writer
    w.put(b"seed", b"0")  # every key below is then written by this writer
    reads = []
    real = w.reads.version
    w.reads.version = lambda *a, **k: reads.append(a) or real(*a, **k)
    try:
        for i in range(50):
            key = b"chain"
            _l1, t1 = w.submit(((FLAG_PUT, key, b"%d" % i),))
            _l2, t2 = w.submit(((FLAG_PUT, b"follower", b"%d" % i),), conditions=(engine.equals(key, b"%d" % i),))
            w.wait(None, t1)
            w.wait(None, t2)
    finally:
        w.reads.version = real
    assert db.get(b"follower") == b"49"
    assert len(reads) == 1, "only the first unit, whose key the writer had not written, reads the stored state"


def test_keys_written_before_the_writer_opened_are_read_once_then_remembered(db):
    db.put(b"old", b"v")
    db.cluster.crash_writer()  # the new writer's memory is empty: the key is below its floor
    w = db._backend.writer
    calls = []
    real = w.reads.version
    w.reads.version = lambda *a, **k: calls.append(a) or real(*a, **k)
    try:
        db.put(b"old", b"w", expect=engine.equals(b"old", b"v"))
        db.put(b"old", b"x", expect=engine.equals(b"old", b"w"))
    finally:
        w.reads.version = real
    assert len(calls) == 1 and db.get(b"old") == b"x"


def test_a_read_older_than_the_memory_reaches_is_made_again(db, monkeypatch):
    """The read for a condition was made at read point R; before the unit is ordered, many other
    writes push the writer's memory of recent writes past R. The check must not trust R (a write
    to the key between R and the floor could be forgotten): nothing is logged, the unit is read
    and sent again."""
    monkeypatch.setattr(writer_module, "RECENT_WRITES_MAX", 8)
    w = db._backend.writer
    db.put(b"cas", b"0")
    for i in range(20):  # "cas" is now forgotten: below the floor
        db.put(b"filler%d" % i, b"x")
    real = w.reads.version
    state = {"first": True}

    def version(key, *, view=None):
        got = real(key, view=view)
        if state["first"]:
            state["first"] = False
            db.put(b"cas", b"1")  # a write after the read ...
            for i in range(20):  # ... then enough writes for the memory to forget it again
                db.put(b"more%d" % i, b"x")
        return got

    w.reads.version = version
    try:
        with pytest.raises(PreconditionFailed):
            db.put(b"cas", b"2", expect=engine.equals(b"cas", b"0"))
    finally:
        w.reads.version = real
    assert w.stats["condition_rereads"] == 1
    assert db.get(b"cas") == b"1", "a compare-and-set used a read that missed a newer write"


def test_compare_and_set_counters_lose_no_increment_under_contention(db):
    """Threads increment one counter by read + put(expect=equals(old)); every success is one
    increment: the final value is the number of successes."""
    db.put(b"n", b"0")
    ok = [0] * 4

    def incr(t: int) -> None:
        for _ in range(30):
            old = db.get(b"n")
            try:
                db.put(b"n", b"%d" % (int(old) + 1), expect=engine.equals(b"n", old))
            except PreconditionFailed:
                continue
            ok[t] += 1

    threads = [threading.Thread(target=incr, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert int(db.get(b"n")) == sum(ok) > 0


def test_conditions_on_an_encrypted_volume(tmp_path):
    with engine.open(tmp_path / "e", durable=False, protection_groups=2, encryption_key=bytes(range(32))) as db:
        db.put(b"k", b"secret")
        db.cluster.crash_writer()  # the condition's key must be read (and opened) from a segment
        db.put(b"k", b"next", expect=engine.equals(b"k", b"secret"))
        with pytest.raises(PreconditionFailed):
            db.put(b"k", b"again", expect=engine.equals(b"k", b"secret"))
        assert db.get(b"k") == b"next"


# --- the pure decision ----------------------------------------------------------------------
versions = st.tuples(st.integers(0, 50), st.one_of(st.none(), st.binary(max_size=3)), st.integers(0, 20))


@given(versions, st.integers(0, 20), st.binary(max_size=3), st.integers(0, 50))
def test_holds_matches_its_definition(version, now, value, since):
    lsn, v, deadline = version
    if lsn == 0:
        v = None
    alive = v is not None and (deadline == 0 or deadline > now)
    assert cond.holds(cond.exists(b"k"), lsn, v, deadline, now) == alive
    assert cond.holds(cond.absent(b"k"), lsn, v, deadline, now) == (not alive)
    assert cond.holds(cond.equals(b"k", value), lsn, v, deadline, now) == (alive and v == value)
    assert cond.holds(cond.unchanged(b"k", since), lsn, v, deadline, now) == (lsn <= since)


def test_conditions_and_their_failure_round_trip_through_protobuf():
    unit = engine.core.types.Unit(((FLAG_PUT, b"k", b"v"),), b"rid", False,
                                  (engine.exists(b"a"), engine.equals(b"b", b"x"), engine.unchanged(b"c", 7), engine.absent(b"d")))
    m = convert.write_request_to_pb([unit])
    assert convert.unit_from_pb(m.units[0]) == unit
    assert convert.unit_from_pb(kv_pb2.Unit.FromString(convert.unit_to_pb(unit).SerializeToString())) == unit
    err = convert.error_from_pb(convert.error_to_pb(PreconditionFailed("two failed", (1, 3))))
    assert isinstance(err, PreconditionFailed) and err.failed == (1, 3) and str(err) == "two failed"
    bad = kv_pb2.Unit(ops=[kv_pb2.Op(flags=1, key=b"k")], conditions=[kv_pb2.Condition(key=b"k", kind=7)])
    with pytest.raises(InvalidArgument, match="condition kind"):
        convert.unit_from_pb(bad)


@pytest.mark.cluster
def test_conditional_writes_over_grpc(tmp_path):
    c = Cluster(tmp_path / "c")
    try:
        c.up(base_port=free_base_port(), protection_groups=2, timeout_s=60)
        with engine.connect(c.folder) as db:
            p = db.put(b"k", b"1", expect=engine.absent(b"k"))
            with pytest.raises(PreconditionFailed, match="absent") as e:
                db.put(b"k", b"2", expect=[engine.exists(b"k"), engine.absent(b"k")])
            assert e.value.failed == (1,)
            with db.batch(expect=[engine.unchanged(b"k", p), engine.equals(b"k", b"1")]) as b:
                b.put(b"k", b"3").put(b"j", b"3")
            assert (db.get(b"k"), db.get(b"j")) == (b"3", b"3")
    finally:
        c.down(timeout_s=10)


def test_a_refusal_is_told_only_once_the_write_it_saw_is_durable(db):
    """A refused condition is a read of the log: if it rests on a write not yet durable, it is
    answered only when that write is, so a read after the refusal sees what the refusal saw
    (found by the chaos cas workload: a get after a refused `absent` returned nothing)."""
    w = db._backend.writer
    for i in range(30):
        key = b"r%d" % i
        _l1, t1 = w.submit(((FLAG_PUT, key, b"v"),))
        _l2, t2 = w.submit(((FLAG_PUT, b"other", b"x"),), conditions=(engine.absent(key),))
        with pytest.raises(PreconditionFailed):
            w.wait(None, t2)
        assert w.ledger.vdl >= t1.lsn, "the refusal was told before the write it rests on was durable"
        assert db.get(key) == b"v"
        w.wait(None, t1)
