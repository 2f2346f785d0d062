"""The embedded engine end to end, on real LMDB files: the guarantees a user relies on.

No assertion here measures elapsed time, and no test sleeps for a while before it looks: waits
are on conditions (`tests/waiting.py`), and a node that must be slow is held until released
rather than delayed by a fixed time. The write timeout is generous wherever writes must succeed
(on a loaded machine an fsync alone can take a second); a test of refusals sets a short one, and
its writes that must succeed go through `put_durably` (one that times out must still commit).
"""

from __future__ import annotations

import json
import threading
import time

import pytest
from waiting import DEADLINE_S, eventually, until_done

import engine
from engine.cluster.testing import put_durably
from engine.core.constants import KEY_BYTES_MAX, VALUE_BYTES_MAX

#: the write timeout of tests whose writes must all succeed
WRITE_TIMEOUT_S = 10.0


def open_db(path, **kw):
    kw.setdefault("write_timeout_s", WRITE_TIMEOUT_S)
    kw.setdefault("gossip_interval_s", 0.05)
    return engine.open(path, **kw)


class Held:
    """A `sleep` for `NetworkFaults` that holds a slow link's calls until `release()` (bounded by
    the generous deadline): "answers late" without a guess of how late is late enough."""

    def __init__(self) -> None:
        self.released = threading.Event()
        self.calls = 0

    def __call__(self, _seconds: float) -> None:
        self.calls += 1
        self.released.wait(DEADLINE_S)

    def release(self) -> None:
        self.released.set()


@pytest.fixture
def db(tmp_path):
    d = open_db(tmp_path / "data")
    yield d
    d.close()


def test_put_get_delete_scan(db):
    db.put(b"user:1", b"alice")
    db.put(b"user:2", b"bob")
    db.put(b"user:3", b"carol")
    assert db.get(b"user:1") == b"alice"
    assert db.get(b"user:1", quorum=True) == b"alice"
    assert db.get(b"nope") is None
    db.delete(b"user:2")
    assert db.get(b"user:2") is None and db.get(b"user:2", quorum=True) is None
    assert list(db.scan(b"user:", b"user;")) == [(b"user:1", b"alice"), (b"user:3", b"carol")]
    assert list(db.scan(b"user:", b"user;", quorum=True)) == [(b"user:1", b"alice"), (b"user:3", b"carol")]
    assert list(db.scan(b"user:2", b"user:3")) == []


def test_scan_merges_protection_groups_in_key_order(db):
    keys = [b"k%03d" % i for i in range(300)]
    with db.batch() as b:
        for k in reversed(keys):
            b.put(k, k[::-1])
    assert [k for k, _ in db.scan()] == keys  # scan pages through segments in chunks
    assert [k for k, _ in db.scan(b"k100", b"k200", quorum=True)] == keys[100:200]


def test_data_survives_close_and_reopen(tmp_path):
    with open_db(tmp_path / "d") as db:
        for i in range(50):
            db.put(b"k%d" % i, b"v%d" % i)
        db.delete(b"k7")
    with open_db(tmp_path / "d") as db:
        assert db.get(b"k0") == b"v0" and db.get(b"k49") == b"v49" and db.get(b"k7") is None
        assert len(list(db.scan())) == 49
        db.put(b"after", b"reopen")
        vdl = db.status()["vdl"]
    with open_db(tmp_path / "d") as db:
        assert db.get(b"after") == b"reopen"
        assert db.status()["vdl"] >= vdl


def test_az_outage_keeps_writes_going_and_loses_nothing(db):
    acked = {}
    for i in range(20):
        db.put(b"a%d" % i, b"x%d" % i)
        acked[b"a%d" % i] = b"x%d" % i
    db.cluster.stop_az("b")
    for i in range(20):
        db.put(b"b%d" % i, b"y%d" % i)
        acked[b"b%d" % i] = b"y%d" % i
    for k, v in acked.items():
        assert db.get(k) == v
        assert db.get(k, quorum=True) == v
    db.cluster.start_az("b")
    eventually(lambda: all(n["up"] for n in db.status()["nodes"]), "every node up after AZ b returned")


def test_az_plus_one_refuses_writes_keeps_reads_and_recovers(tmp_path):
    # Each refusal waits out the write timeout (for a quorum that may return), so it is short;
    # the writes that must succeed are checked to commit should it pass first (a loaded machine).
    db = open_db(tmp_path / "d", write_timeout_s=0.5)
    try:
        for i in range(10):
            put_durably(db, b"k%d" % i, b"v%d" % i)
        db.cluster.stop_az("b")
        put_durably(db, b"during-az", b"ok")
        db.cluster.stop_node("n1")
        # The writer notices the third loss at its next append (or heartbeat); every write from
        # then on is refused with the typed error, nothing logged (a write racing the loss may be
        # indeterminate instead).
        refused = 0
        for i in range(3):
            next_lsn = db.status()["writer"]["next_lsn"]
            with pytest.raises(engine.Unavailable) as info:
                db.put(b"refused%d" % i, b"no")
            assert "segments" in str(info.value) or "durable" in str(info.value)
            if not isinstance(info.value, engine.WriteIndeterminate):
                refused += 1
                assert "Nothing was logged" in str(info.value)
                assert db.status()["writer"]["next_lsn"] == next_lsn, "a refused write logged something"
        assert refused >= 2, "after the first write at the latest, the writer knows n1 is gone"
        # reads still work: three segments are a read quorum
        for i in range(10):
            assert db.get(b"k%d" % i) == b"v%d" % i
            assert db.get(b"k%d" % i, quorum=True) == b"v%d" % i
        assert db.get(b"during-az") == b"ok"
        assert dict(db.scan(b"k", b"l")) == {b"k%d" % i: b"v%d" % i for i in range(10)}
        db.cluster.start_node("n1")
        db.cluster.start_az("b")
        until_done(lambda: db.put(b"after", b"recovery"), "writes to resume after the nodes returned",
                   retry_on=(engine.Unavailable,))
        assert db.get(b"after") == b"recovery"
        for i in range(10):
            assert db.get(b"k%d" % i) == b"v%d" % i
    finally:
        db.close()


def test_batch_is_atomic_for_readers(db):
    """Two keys in different PGs are always written together; a reader must never see them differ."""
    a, b = b"pair:a", b"pair:b"
    assert engine_pg(db, a) != engine_pg(db, b)
    with db.batch() as bt:
        bt.put(a, b"0").put(b, b"0")
    stop = threading.Event()
    torn = []

    def reader():
        while not stop.is_set():
            seen = dict(db.scan(b"pair:", b"pair;"))
            if seen[a] != seen[b]:
                torn.append(seen)
            snap = db.snapshot()
            if snap.get(a) != snap.get(b):
                torn.append(("snapshot", snap.read_point))

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(1, 150):
            with db.batch() as bt:
                bt.put(a, b"%d" % i).put(b, b"%d" % i)
    finally:
        stop.set()
        t.join()
    assert torn == []
    assert db.get(a) == db.get(b) == b"149"


def engine_pg(db, key):
    from engine.core.placement import protection_group_of

    return protection_group_of(key, db.status()["protection_groups"])


def test_batch_discarded_on_exception(db):
    with pytest.raises(RuntimeError):
        with db.batch() as b:
            b.put(b"x", b"1")
            raise RuntimeError("abort")
    assert db.get(b"x") is None


def test_snapshot_reads_are_repeatable(db):
    db.put(b"s", b"old")
    snap = db.snapshot()
    db.put(b"s", b"new")
    db.put(b"t", b"later")
    assert snap.get(b"s") == b"old" and snap.get(b"s", quorum=True) == b"old"
    assert snap.get(b"t") is None
    assert dict(snap.scan()) == {b"s": b"old"}
    assert db.get(b"s") == b"new"


@pytest.mark.parametrize(
    "call",
    [
        lambda db: db.put("str-key", b"v"),
        lambda db: db.put(b"k", "str-value"),
        lambda db: db.put(b"", b"v"),
        lambda db: db.put(b"x" * (KEY_BYTES_MAX + 1), b"v"),
        lambda db: db.put(b"k", b"x" * (VALUE_BYTES_MAX + 1)),
        lambda db: db.get(123),
        lambda db: db.delete(b""),
        lambda db: db.batch().put(b"", b"v"),
        lambda db: list(db.scan("a", "b")),
    ],
    ids=["str-key", "str-value", "empty-key", "long-key", "big-value", "int-get", "empty-delete", "batch-empty-key", "str-scan"],
)
def test_bad_input_raises_invalid_argument_and_changes_nothing(db, call):
    db.put(b"k", b"before")
    vdl = db.status()["vdl"]
    with pytest.raises(engine.InvalidArgument) as info:
        call(db)
    assert str(info.value)  # a message a person can read
    assert db.status()["vdl"] == vdl
    assert db.get(b"k") == b"before"


def test_limits_are_inclusive(db):
    db.put(b"x" * KEY_BYTES_MAX, b"y" * 1000)
    assert db.get(b"x" * KEY_BYTES_MAX) == b"y" * 1000
    db.put(b"big", b"z" * VALUE_BYTES_MAX)
    assert db.get(b"big") == b"z" * VALUE_BYTES_MAX


def test_reopen_with_other_geometry_is_a_clear_error(tmp_path):
    open_db(tmp_path / "d", protection_groups=4).close()
    with pytest.raises(engine.GeometryMismatch, match="4 protection groups"):
        open_db(tmp_path / "d", protection_groups=8)
    with open_db(tmp_path / "d") as db:  # no geometry given: the stored one is used
        assert db.status()["protection_groups"] == 4


def test_unknown_option_is_invalid_argument(tmp_path):
    with pytest.raises(engine.InvalidArgument, match="unknown option"):
        engine.open(tmp_path / "d", protection_group=3)


def test_status_is_json_ready(db):
    db.put(b"k", b"v")
    st = json.loads(json.dumps(db.status()))
    assert st["vdl"] >= 1
    assert [n["id"] for n in st["nodes"]] == ["n1", "n2", "n3", "n4", "n5", "n6"]
    assert [n["az"] for n in st["nodes"]] == ["a", "a", "b", "b", "c", "c"]
    assert all(n["up"] for n in st["nodes"])
    assert all(len(n["scl"]) == st["protection_groups"] for n in st["nodes"])


def test_closed_database_raises_closed(tmp_path):
    db = open_db(tmp_path / "d")
    db.close()
    with pytest.raises(engine.Closed):
        db.put(b"k", b"v")


def test_many_threads_share_group_commits(db):
    errors = []

    def worker(t):
        try:
            for i in range(40):
                db.put(b"t%d-%d" % (t, i), b"v")
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(list(db.scan(b"t", b"u"))) == 16 * 40
    stats = db.status()["writer"]["stats"]
    assert stats["flushes"] < stats["records_sent"]  # frames carried several records


def test_stopped_node_catches_up_by_gossip(db):
    db.cluster.stop_node("n3")
    for i in range(30):
        db.put(b"g%d" % i, b"v")
    db.cluster.start_node("n3")

    def caught_up():
        st = db.status()
        n1 = next(n for n in st["nodes"] if n["id"] == "n1")
        n3 = next(n for n in st["nodes"] if n["id"] == "n3")
        return n3.get("scl") == n1.get("scl")

    db.put(b"poke", b"v")  # carries the newest VDL hint to n3
    eventually(caught_up, "n3 at the SCLs of n1 after its restart")


def test_writer_crash_loses_no_acknowledged_write(tmp_path):
    db = open_db(tmp_path / "d")
    try:
        for i in range(30):
            db.put(b"c%d" % i, b"v%d" % i)
        epoch = db.status()["epoch"]
        db.cluster.crash_writer()
        assert db.status()["epoch"] == epoch + 1
        for i in range(30):
            assert db.get(b"c%d" % i) == b"v%d" % i
        db.put(b"after-crash", b"ok")
        assert db.get(b"after-crash") == b"ok"
    finally:
        db.close()


def test_lal_bounds_what_is_in_flight(tmp_path):
    """LAL = 4: while three nodes do not acknowledge (held until released, so their links stay
    "up"), at most 4 LSNs are logged beyond VDL; later writes wait for room and are refused with
    nothing logged."""
    from engine.embedded import EmbeddedOptions, EmbeddedVolume
    from engine.transport.faults import FaultyTransport, NetworkFaults

    held = Held()
    faults = NetworkFaults(seed=1, sleep=held)
    # Every write after the first is refused or indeterminate, each after the write timeout, so
    # it is short; the first write is checked to commit should it pass first (a loaded machine).
    vol = EmbeddedVolume(
        str(tmp_path / "d"), EmbeddedOptions(write_timeout_s=0.5, lal=4, gossip_interval_s=0.05),
        transport_wrapper=lambda t: FaultyTransport(t, faults),
    )
    db = engine.Database(vol)
    try:
        put_durably(db, b"base", b"1")
        vdl = db.status()["vdl"]
        for n in ("n3", "n4", "n5"):
            faults.slow_ms[n] = 1.0  # any delay: `held` holds the call until released
        outcomes = []
        for i in range(7):
            try:
                db.put(b"k%d" % i, b"v")
                outcomes.append("ok")
            except engine.WriteIndeterminate:
                outcomes.append("indeterminate")
            except engine.Unavailable as e:
                assert "nothing was logged" in str(e).lower()
                outcomes.append("refused")
        assert vol.writer.ledger.next_lsn - 1 - vdl <= 4
        # The first ones fill the LAL (a put is two LSNs: its record and its request record);
        # from then on every one is refused, unlogged.
        logged = outcomes.count("indeterminate")
        assert logged >= 1 and outcomes == ["indeterminate"] * logged + ["refused"] * (7 - logged), outcomes
        assert held.calls > 0, "the three nodes were never held"
        faults.slow_ms.clear()
        held.release()
        until_done(lambda: db.put(b"after", b"ok"), "writes to resume once the held nodes answered",
                   retry_on=(engine.Unavailable,))
        assert db.get(b"after") == b"ok"
        assert [db.get(b"k%d" % i) for i in range(7)] == [b"v"] * logged + [None] * (7 - logged), "the logged land, the refused never"
    finally:
        held.release()
        db.close()


def test_slow_nodes_never_hold_a_write_that_has_four_acks(tmp_path):
    """Two nodes do not answer until released; every put must still succeed, because the four
    other segments make it durable. Had a put waited for n5 or n6 it would have waited out the
    write timeout and raised WriteIndeterminate."""
    from engine.embedded import EmbeddedOptions, EmbeddedVolume
    from engine.transport.faults import FaultyTransport, NetworkFaults

    held = Held()
    faults = NetworkFaults(seed=2, sleep=held)
    vol = EmbeddedVolume(
        str(tmp_path / "d"), EmbeddedOptions(write_timeout_s=WRITE_TIMEOUT_S, gossip_interval_s=0.05),
        transport_wrapper=lambda t: FaultyTransport(t, faults),
    )
    db = engine.Database(vol)
    try:
        db.put(b"warm", b"up")
        faults.slow_ms["n5"] = faults.slow_ms["n6"] = 1.0  # any delay: `held` holds the call until released
        for i in range(20):
            db.put(b"s%d" % i, b"v%d" % i)
        assert held.calls > 0, "n5 and n6 were never held"
        assert all(db.get(b"s%d" % i) == b"v%d" % i for i in range(20))
        assert db.status()["writer"]["links"]["n5"]["sent_lsn"] < db.status()["vdl"], "n5 acknowledged while held"
        faults.slow_ms.clear()
    finally:
        held.release()
        db.close()


def test_closing_a_volume_logs_no_node_as_down(tmp_path, caplog):
    """Closing tells every node to stop its background work before any closes: gossip running
    at that moment must not report its peers as down (it did, at every close: a warning per
    node and peer on the terminal of every program that closes a volume)."""
    import logging

    from engine.embedded import EmbeddedOptions, EmbeddedVolume

    caplog.set_level(logging.INFO)
    for i in range(5):
        v = EmbeddedVolume(str(tmp_path / f"v{i}"), EmbeddedOptions(gossip_interval_s=0.001))
        try:
            v.writer.put(b"k", b"v")
            time.sleep(0.05)  # gossip rounds under way
        finally:
            v.close()
    down = [r.getMessage() for r in caplog.records if "is down" in r.getMessage() or "stopped" in r.getMessage()]
    assert down == [], down[:3]


@pytest.mark.parametrize("option", [
    {"watch_memory_changes": "x"}, {"watch_memory_changes": 0}, {"watch_hold_lsns": -1}, {"watch_hold_lsns": 1 << 64},
    {"lal": 0}, {"lal": True}, {"seed": 1 << 64}, {"write_timeout_s": 0}, {"write_timeout_s": float("inf")},
    {"resume_grace_s": -5}, {"resume_grace_s": float("nan")}, {"collect_delay_s": "0.1"}, {"gossip_interval_s": 1e12},
    {"backup_retention_days": 0},
])
def test_a_bad_number_among_the_options_is_refused_before_anything_is_written(tmp_path, option):
    """Before, watch_memory_changes="x" opened the volume and its first write fenced the writer
    (a TypeError while giving LSNs); every numeric option is now checked at the open."""
    (name,) = option
    with pytest.raises(engine.InvalidArgument, match=rf"^{name}= is "):
        engine.open(tmp_path / "v", **option)
    assert not (tmp_path / "v").exists()
