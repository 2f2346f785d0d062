"""Read points in use hold version collection back (engine.head.readpoints): the registry's
rules with an injected clock, then end to end in the embedded engine: overwrites of one key stay
bounded on every node, a snapshot opened before them reads its value until it is closed, a scan
holds its own read point, a lapsed registration stops holding, and a new writer does not know the
old one's snapshots."""

from __future__ import annotations

import pytest
from waiting import eventually

import engine
from engine.errors import InvalidArgument, ResourceExhausted, SnapshotTooOld
from engine.head.readpoints import LEASE_S_MAX, ReadPointRegistry, VdlHistory


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


# --- the registry ---------------------------------------------------------------------------
def test_the_point_is_the_least_registered_read_point_and_never_above_the_ceiling():
    r = ReadPointRegistry(Clock())
    assert r.point(50) == 50
    a = r.register("snapshot", 60)
    b = r.register("archiver", 70, lease_s=5)
    assert r.point(100) == 60
    r.release(a)
    assert r.point(100) == 70
    assert r.point(65) == 65  # never above the VDL it may collect at
    r.release(b)
    assert r.point(100) == 100
    assert r.release(b) is False


def test_a_registration_below_a_point_already_sent_is_refused():
    r = ReadPointRegistry(Clock())
    assert r.point(80) == 80
    with pytest.raises(SnapshotTooOld):
        r.register("late snapshot", 79)
    r.register("fresh", 80)
    r.raise_floor(90)  # a new writer learns the nodes' horizons
    with pytest.raises(SnapshotTooOld):
        r.register("below the nodes' horizon", 85)


def test_a_registration_that_is_not_renewed_lapses():
    clock = Clock()
    r = ReadPointRegistry(clock)
    reg = r.register("reader", 10, lease_s=2.0)
    clock.t += 1.5
    r.renew(reg)  # renewed: good for 2 s from now
    clock.t += 1.9
    assert r.point(100) == 10
    clock.t += 0.2
    assert r.point(100) == 100 and r.lapsed == 1
    with pytest.raises(SnapshotTooOld):
        r.renew(reg)
    held = r.register("until released", 100)
    clock.t += LEASE_S_MAX * 2
    assert r.point(200) == 100 and r.release(held)


def test_an_archiver_moves_its_position_forward():
    r = ReadPointRegistry(Clock())
    reg = r.register("backup archiver", 10, lease_s=30)
    assert r.point(100) == 10
    assert r.renew(reg, lsn=40).lsn == 40
    assert r.point(100) == 40
    with pytest.raises(SnapshotTooOld):
        r.renew(reg, lsn=39)  # below a point already sent: the nodes may have collected it


def test_registrations_are_bounded():
    r = ReadPointRegistry(Clock(), registrations_max=3)
    for i in range(3):
        r.register(f"s{i}", 1)
    with pytest.raises(ResourceExhausted):
        r.register("one too many", 1)
    for bad in (-1, 1 << 63, True, 1.5, None):
        with pytest.raises(InvalidArgument):
            r.register("bad lsn", bad)
    for bad in (0, -1, LEASE_S_MAX * 2, float("nan"), "1"):
        with pytest.raises(InvalidArgument):
            ReadPointRegistry(Clock()).register("bad lease", 1, lease_s=bad)
    for bad in ("", "x" * 129, 7):
        with pytest.raises(InvalidArgument):
            ReadPointRegistry(Clock()).register(bad, 1)


def test_the_vdl_history_trails_by_its_span():
    h = VdlHistory(1.0)
    assert h.at(0.0, 10) == 10  # a young writer: the VDL it started at
    assert h.at(0.5, 20) == 10
    assert h.at(1.2, 30) == 20 or h.at(1.2, 30) == 10
    assert h.at(5.0, 40) == 30
    retention = VdlHistory(60.0, young=0)
    assert retention.at(0.0, 10) == 0 and retention.at(59.0, 50) == 0  # the old writer's may be younger
    assert retention.at(61.0, 60) == 10
    assert VdlHistory(0.0).at(3.0, 77) == 77


# --- end to end -------------------------------------------------------------------------------
def open_db(path, **kw):
    kw.setdefault("durable", False)
    kw.setdefault("collect_delay_s", 0.0)
    kw.setdefault("request_retention_s", 0.0)
    return engine.open(path, **kw)


def records(db) -> list[int]:
    return [n["records"] for n in db.status()["nodes"]]


OVERWRITES = 100_000
BATCH = 1000


def overwrite(db, key: bytes, n: int, tag: bytes) -> None:
    for i in range(n // BATCH):
        with db.batch() as b:
            for j in range(BATCH):
                b.put(key, tag + b"%d" % (i * BATCH + j))


def test_overwrites_of_one_key_stay_bounded_and_a_snapshot_reads_its_value_until_closed(tmp_path):
    with open_db(tmp_path / "v", protection_groups=2) as db:
        db.put(b"k", b"before")
        snap = db.snapshot()
        overwrite(db, b"k", OVERWRITES, b"a")
        assert snap.get(b"k") == b"before" and db.get(b"k") == b"a%d" % (OVERWRITES - 1)
        assert db.status()["writer"]["stats"]["read_points"] == 1
        # The snapshot holds the point at its read point: nothing above it was collected.
        assert max(records(db)) > OVERWRITES
        assert all(n["collected_records"] <= 1 for n in db.status()["nodes"]), "at most the request record at the snapshot"
        assert snap.get(b"k") == b"before"
        snap.close()
        eventually(lambda: max(records(db)) <= 10, "the versions the snapshot held were collected", interval_s=0.1)
        with pytest.raises(SnapshotTooOld):
            snap.get(b"k")
        # With no snapshot open, the records per node stay bounded while the key is overwritten.
        peak = 0
        for i in range(OVERWRITES // BATCH):
            with db.batch() as b:
                for j in range(BATCH):
                    b.put(b"k", b"b%d" % (i * BATCH + j))
            if i % 10 == 9:
                peak = max(peak, *records(db))
        eventually(lambda: max(records(db)) <= 10, "collected down to the live key", interval_s=0.1)
        assert peak < OVERWRITES // 2, f"records per node peaked at {peak} during {OVERWRITES} overwrites"
        assert db.get(b"k") == b"b%d" % (OVERWRITES - 1)
        st = db.status()
        assert all(n["collected_records"] >= 2 * OVERWRITES - 10 for n in st["nodes"]), [n["collected_records"] for n in st["nodes"]]


def test_a_scan_holds_its_read_point_until_it_is_consumed(tmp_path):
    with open_db(tmp_path / "v", protection_groups=2) as db:
        with db.batch() as b:
            for i in range(600):  # more than a chunk per PG: the scan goes back to the nodes
                b.put(b"key:%04d" % i, b"old")
        it = db.scan()
        first = next(it)
        assert db.status()["writer"]["stats"]["read_points"] == 1
        for _ in range(3):
            with db.batch() as b:
                for i in range(600):
                    b.put(b"key:%04d" % i, b"new")
        db.put(b"tick", b"")
        rest = list(it)
        assert [first] + rest == [(b"key:%04d" % i, b"old") for i in range(600)]
        assert db.status()["writer"]["stats"]["read_points"] == 0
        dropped = db.scan()  # never consumed: released when collected
        del dropped
        assert db.status()["writer"]["stats"]["read_points"] == 0


def test_a_lapsed_registration_stops_holding_the_point(tmp_path):
    with open_db(tmp_path / "v", protection_groups=1) as db:
        db.put(b"k", b"held")
        w, vol = db._backend.writer, db._backend
        held = w.view().read_point
        reg = w.read_points.register("backup archiver", held, lease_s=3600)
        for i in range(5):
            db.put(b"k", b"v%d" % i)
        eventually(lambda: all(n.store.collect_target[1] == held and not n.store.collect_pending() for n in vol.nodes.values()),
                   "every node got the held point and collected what it allows")
        assert min(records(db)) >= 6, "the registration holds the versions above its read point"
        w.read_points.renew(reg, lease_s=0.001)  # the archiver stops renewing
        eventually(lambda: max(records(db)) <= 2, "the registration lapsed and collection went on", interval_s=0.05)
        assert w.read_points.lapsed == 1
        with pytest.raises(SnapshotTooOld):
            w.read_points.renew(reg)


def test_a_new_writer_does_not_know_the_old_ones_snapshots(tmp_path):
    with open_db(tmp_path / "v", protection_groups=1) as db:
        db.put(b"k", b"old")
        snap = db.snapshot()
        db.put(b"k", b"new")
        db.cluster.crash_writer()  # the new writer's registry is empty
        db.put(b"tick", b"")

        def refused() -> bool:
            try:
                assert snap.get(b"k") == b"old"
                return False
            except SnapshotTooOld:
                return True

        eventually(refused, "the nodes collected past the old writer's snapshot, and refuse it")
        w = db._backend.writer
        assert w.read_points.issued > snap.read_point
        with pytest.raises(SnapshotTooOld):
            w.read_points.register("the old snapshot again", snap.read_point)
        with db.snapshot() as fresh:
            assert fresh.get(b"k") == b"new"


def test_a_remote_snapshots_renewer_renews_each_lease_and_drops_a_refused_one():
    from engine.client import Renewer

    calls: list[int] = []

    def renew(reg: int) -> None:
        calls.append(reg)
        if reg == 2:
            raise SnapshotTooOld("the writer changed")

    r = Renewer(renew)
    try:
        r.add(1, 0.03)
        r.add(2, 0.03)
        eventually(lambda: calls.count(1) >= 3, "registration 1 renewed again and again")
        assert calls.count(2) == 1, "a refused renewal is not tried again"
        r.discard(1)
        n = calls.count(1)
        eventually(lambda: len(calls) >= 0 and calls.count(1) <= n + 1, "discarded: at most one renewal was under way")
    finally:
        r.close()


def test_a_read_at_a_read_point_of_its_own_takes_a_fresh_one_when_it_was_collected_under(tmp_path):
    with open_db(tmp_path / "v", protection_groups=1) as db:
        db.put(b"k", b"old")
        w = db._backend.writer
        stale = w.view()
        db.put(b"k", b"new")
        db.put(b"j", b"x")
        vol = db._backend
        eventually(lambda: all(n.store.gc[0][0] > stale.read_point for n in vol.nodes.values()), "collected past it")
        real_view, handed = w.view, []

        def view_once_stale():
            if not handed:
                handed.append(stale)
                return stale  # as a get whose read point was taken just before the collection point passed it
            return real_view()

        w.view = view_once_stale
        try:
            assert db.get(b"k") == b"new" and len(handed) == 1
            handed.clear()
            assert db.get_many([b"k", b"j", b"nope"]) == [b"new", b"x", None] and len(handed) == 1
        finally:
            w.view = real_view
        with pytest.raises(SnapshotTooOld):  # a snapshot's view is the caller's: no fresh one, typed
            w.get(b"k", view=stale)
        with pytest.raises(SnapshotTooOld):
            w.get(b"k", view=stale, quorum=True)
        with pytest.raises(SnapshotTooOld):
            list(w.scan(b"", None, view=stale))


def test_the_wire_bounds_a_hold_and_carries_snapshot_too_old_as_its_class():
    from engine.core.constants import LSN_VALID_MAX, U64_MAX
    from engine.errors import SegmentIncomplete
    from engine.proto import kv_pb2
    from engine.transport import convert

    assert convert.hold_args_from_pb(kv_pb2.HoldReadPointRequest()) == (0, 30.0, False)
    assert convert.hold_args_from_pb(kv_pb2.HoldReadPointRequest(registration=7, lease_ms=1500)) == (7, 1.5, False)
    for bad in (dict(lease_ms=convert.HOLD_LEASE_MS_MAX + 1), dict(lease_ms=U64_MAX), dict(registration=LSN_VALID_MAX + 1),
                dict(registration=U64_MAX), dict(release=True)):
        with pytest.raises(InvalidArgument):
            convert.hold_args_from_pb(kv_pb2.HoldReadPointRequest(**bad))
    err = convert.error_from_pb(convert.error_to_pb(SnapshotTooOld("gone")))
    assert type(err) is SnapshotTooOld and str(err) == "gone"
    assert convert.error_to_pb(SnapshotTooOld("gone")).code == "OUT_OF_RANGE"
    # a release that knows no SnapshotTooOld reads the code as "this segment cannot answer here"
    old = convert.error_to_pb(SnapshotTooOld("gone"))
    old.error = "SomeFutureError"
    assert type(convert.error_from_pb(old)) is SegmentIncomplete


def test_the_backup_archivers_position_holds_the_collection_point(tmp_path):
    from engine.backup.archiver import BackupOptions

    # A slow archiver: it cuts a segment only every hour, so its position stays where it starts.
    slow = BackupOptions(segment_s=3600, segment_bytes=1 << 28, round_s=0.01, idle_publish_s=3600, request_poll_s=3600)
    with open_db(tmp_path / "v", protection_groups=1, backup=str(tmp_path / "bk"), backup_options=slow) as db:
        vol = db._backend
        eventually(lambda: db.status()["backup"]["bases"] >= 1, "the first base")
        held = vol.archiver.hold_lsn()
        for i in range(20):
            db.put(b"k", b"v%d" % i)
        w = vol.writer
        eventually(lambda: all(n.store.collect_target[1] == held for n in vol.nodes.values()), "the nodes got the held point")
        assert w.read_points.status()["read_point_min"] == held
        assert all(n.store.state().horizons[0] <= held for n in vol.nodes.values())
        assert min(records(db)) >= 20, "what the archive still needs stays on the nodes"
        vol.archiver.step(force_segment=True)  # a segment written: the position and the hold move on
        assert vol.archiver.hold_lsn() > held
        eventually(lambda: max(records(db)) <= 3, "collection went on behind the archive")


@pytest.mark.soak
def test_a_million_overwrites_of_a_thousand_keys_stay_near_the_live_data(tmp_path):
    """The lifecycle target (bench/lifecycle.py measures it): the records per node stay bounded
    while 1,000 keys are overwritten a million times, and once collection caught up the pages
    in use stay within a small multiple of the live data (LMDB files never shrink)."""
    import random

    rng = random.Random(7)
    value = b"v" * 100
    with open_db(tmp_path / "v", protection_groups=8) as db:
        peak = 0
        for i in range(10_000):
            with db.batch() as b:
                for _ in range(100):
                    b.put(b"key:%08d" % rng.randrange(1000), value)
            if i % 100 == 99:
                peak = max(peak, *records(db))
        assert peak < 100_000, peak
        eventually(lambda: max(records(db)) <= 1002, "collected down to the live keys", interval_s=0.1)
        live = 1000 * (36 + 12 + 100)
        eventually(lambda: max(n["pages_bytes"] for n in db.status()["nodes"]) < 6 * live,
                   "pages in use within six times the live data", interval_s=0.1)
