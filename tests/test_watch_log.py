"""Watches from the nodes' logs (engine.head.watch): a watch from a position older than the
writer's memory of changes reads the segments' logs, gives every change once in commit order and
hands over to the memory without a gap; it holds version collection back while it reads, up to a
bound, past which it gets Compacted with the oldest position still kept."""

from __future__ import annotations

import itertools
import random
import threading

import pytest
import test_client_failures
from waiting import eventually

import engine
from engine.errors import Compacted

MEMORY = 40  # the writer's memory of changes in these tests (watch_memory_changes)
make_endpoint = test_client_failures.make_endpoint  # a fixture: six nodes and a writer endpoint in this process


def open_db(path, **kw):
    kw.setdefault("durable", False)
    kw.setdefault("protection_groups", 4)
    kw.setdefault("watch_memory_changes", MEMORY)
    return engine.open(path, **kw)


def workload(db, n, seed):
    """Puts, overwrites, deletes and batches over a few keys; returns the changes as written."""
    rng = random.Random(seed)
    written = []
    for _ in range(n):
        k = b"k%02d" % rng.randrange(12)
        r = rng.random()
        if r < 0.6:
            v = b"v%d" % rng.randrange(10**6)
            written.append(engine.Change(k, v, db.put(k, v)))
        elif r < 0.8:
            written.append(engine.Change(k, None, db.delete(k)))
        else:
            ops = [(b"k%02d" % k, b"b%d" % i) for i, k in enumerate(rng.sample(range(12), rng.randrange(1, 5)))]
            with db.batch() as b:
                for key, value in ops:
                    b.put(key, value)
            written += [engine.Change(key, value, b.lsn) for key, value in ops]
    return written


def named(written):
    """What a watch of an encrypted volume gives of `written`: a delete of a key that never had a
    value names no key in the log (it carries only the key's index) and is left out."""
    seen, out = set(), []
    for c in written:
        if c.value is not None:
            seen.add(c.key)
        if c.value is not None or c.key in seen:
            out.append(c)
    return out


def replay(changes):
    model = {}
    for c in changes:
        if c.value is None:
            model.pop(c.key, None)
        else:
            model[c.key] = c.value
    return model


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_a_watch_from_position_0_beyond_the_memory_gives_every_change_once_in_commit_order(tmp_path, encrypted):
    key = {"encryption_key": bytes(range(32))} if encrypted else {}
    # An hour's collect delay: nothing is collected, so position 0 is still kept on the nodes.
    with open_db(tmp_path / "v", collect_delay_s=3600.0, **key) as db:
        written = workload(db, 300, seed=1)
        assert len(written) > 4 * MEMORY, "more changes than the writer keeps in memory"
        if encrypted:
            written = named(written)
        w = db.watch(start=0)
        got = list(itertools.islice(w, len(written)))
        assert got == written, "every change once, in commit order, with its position"
        late = threading.Timer(0.2, lambda: db.put(b"late", b"x"))
        late.start()
        assert next(w) == engine.Change(b"late", b"x", db.read_point()), "handed over to the memory, live"
        w.close()
        assert replay(got) == {k: v for k, v in db.scan() if k != b"late"}, "a replay of the changes is the volume"
        # A watch from a position in the middle of the log, under a prefix, resumes there.
        mid = written[len(written) // 3].position
        assert list(itertools.islice(db.watch(b"k03", start=mid), sum(1 for c in written if c.position > mid and c.key == b"k03"))) \
            == [c for c in written if c.position > mid and c.key == b"k03"]


def node_versions(db, key) -> dict[str, int]:
    """How many versions of `key` each node holds (its segment of the key's PG)."""
    from engine.core.placement import protection_group_of

    vol = db._backend
    pg = protection_group_of(key, vol.geometry.protection_groups)
    out = {}
    for n, node in vol.nodes.items():
        with node.store.env.begin() as txn:
            cur = txn.cursor(db=node.store._versions)
            out[n] = sum(1 for _ in cur.iternext_dup()) if cur.set_key(pg.to_bytes(4, "big") + key) else 0
    return out


def test_collection_keeps_the_versions_a_live_watch_needs_and_removes_them_once_it_ends(tmp_path):
    with open_db(tmp_path / "v", collect_delay_s=0.0, request_retention_s=0.0, protection_groups=1) as db:
        vol, w = db._backend, db._backend.writer
        db.put(b"k", b"v0")
        watch = db.watch(b"k", start=db.read_point())
        db.put(b"k", b"a")
        held = next(watch).position  # the watch holds its position now
        for i in range(MEMORY * 2):
            db.put(b"k", b"v%d" % i)
        db.put(b"tick", b"")
        vdl = db.read_point()
        eventually(lambda: all(n.store.collect_target[1] == held and not n.store.collect_pending()
                               and n.store.scls[0] >= vdl for n in vol.nodes.values()),
                   "every node holds the whole log, got the watch's point and collected what it allows")
        # The version at the watch's position and every one above it (a tick is another key).
        assert set(node_versions(db, b"k").values()) == {MEMORY * 2 + 1}, node_versions(db, b"k")
        assert w.changes_after(held, 10) is None, "the writer's memory no longer reaches back there"
        got = list(itertools.islice(watch, MEMORY * 2))
        assert [c.value for c in got] == [b"v%d" % i for i in range(MEMORY * 2)], "read from the nodes' logs"
        watch.close()
        assert db.status()["writer"]["stats"]["read_points"] == 0, "the watch released its hold"
        db.put(b"tick", b"")
        eventually(lambda: all(v == 1 for v in node_versions(db, b"k").values()), "collected once the watch ended",
                   interval_s=0.05)


def test_a_watch_past_the_bound_gets_compacted_with_the_oldest_position_kept(tmp_path):
    with open_db(tmp_path / "v", collect_delay_s=0.0, watch_hold_lsns=50) as db:
        watch = db.watch(start=db.read_point())
        db.put(b"a", b"1")
        assert next(watch).key == b"a"
        positions = [db.put(b"b%02d" % i, b"x") for i in range(60)]  # 120 LSNs with their request records
        with pytest.raises(Compacted) as e:
            list(itertools.islice(watch, 61))
        oldest = e.value.oldest
        assert db.read_point() - 50 <= oldest <= db.read_point() and f"oldest position kept: {oldest}" in str(e.value)
        assert db.status()["writer"]["stats"]["read_points"] == 0, "its hold was released"
        after = [p for p in positions if p > oldest]
        resumed = db.watch(start=oldest)
        assert [c.position for c in itertools.islice(resumed, len(after))] == after, "it resumes at the oldest kept"
        resumed.close()


def test_a_position_below_the_collection_point_is_compacted_at_once(tmp_path):
    with open_db(tmp_path / "v", collect_delay_s=0.0) as db:
        start = db.read_point()
        for i in range(MEMORY * 2):
            db.put(b"k", b"v%d" % i)
        db.put(b"tick", b"")
        w = db._backend.writer
        eventually(lambda: w.read_points.issued > start, "a collection point past the start was sent")
        assert w.changes_after(start, 10) is None, "the writer's memory does not reach back there either"
        with pytest.raises(Compacted) as e:
            db.watch(start=start)
        assert e.value.oldest > start and f"oldest position kept: {e.value.oldest}" in str(e.value)
        # While the writer's memory reaches back, a position below the collection point is served from it.
        recent = db.read_point()
        db.put(b"k", b"again")
        eventually(lambda: w.read_points.issued > recent, "a collection point past it was sent")
        assert next(db.watch(start=recent)).value == b"again"


def test_after_a_writer_crash_a_watch_that_was_behind_goes_on_from_the_logs(tmp_path):
    with open_db(tmp_path / "v", resume_grace_s=60.0) as db:
        start = db.read_point()
        written = workload(db, 120, seed=2)
        watch = db.watch(start=start)
        first = list(itertools.islice(watch, 10))
        db.cluster.crash_writer()  # the new writer keeps in memory only the changes after its open
        written += workload(db, 20, seed=3)
        rest = list(itertools.islice(watch, len(written) - 10))
        watch.close()
        assert first + rest == written, "no gap and no repeat across the writer crash"


@pytest.mark.cluster
def test_a_position_carried_across_a_writer_failover_goes_on_with_no_gap(tmp_path):
    from engine.cluster import Cluster
    from engine.cluster.testing import free_base_port

    c = Cluster(tmp_path / "c")
    try:
        c.up(base_port=free_base_port(), protection_groups=2, timeout_s=60)
        with engine.connect(c.folder) as db:
            start = db.read_point()
            written = [engine.Change(b"k%d" % (i % 3), b"v%d" % i, db.put(b"k%d" % (i % 3), b"v%d" % i)) for i in range(30)]
            following = db.watch(start=start)  # held by the writer until it dies
            first = list(itertools.islice(following, 5))
            carried = first[-1].position
            c.crash_writer()  # the new writer keeps in memory only the units after its own open
            written += [engine.Change(b"k%d" % (i % 3), b"v%d" % i, db.put(b"k%d" % (i % 3), b"v%d" % i)) for i in range(30, 40)]
            resumed = db.watch(start=carried)  # from the nodes' logs, then live
            assert list(itertools.islice(resumed, 35)) == written[5:], "no gap, no repeat, across the failover"
            resumed.close()
            rest = list(itertools.islice(following, 35))
            following.close()
            assert first + rest == written, "the watch that followed the failover goes on where it was"
    finally:
        c.down(timeout_s=10)


def drop_record(node, pg, lsn):
    """Remove one record from a node's log as collection would (its SCL stays where it was)."""
    s = node.store
    with s._write_lock, s.env.begin(write=True) as txn:
        assert txn.delete(pg.to_bytes(4, "big") + lsn.to_bytes(8, "big"), db=s._log)


def test_a_segment_missing_a_record_is_not_read_as_a_gap(tmp_path):
    with open_db(tmp_path / "v", collect_delay_s=3600.0, protection_groups=1) as db:
        vol = db._backend
        start = db.read_point()
        written = [engine.Change(b"k%03d" % i, b"v", db.put(b"k%03d" % i, b"v")) for i in range(MEMORY * 3)]
        vdl = db.read_point()
        eventually(lambda: all(n.store.scls[0] >= vdl for n in vol.nodes.values()), "every node holds the whole log")
        victim = written[MEMORY].position - 1  # the put record of a unit the memory no longer keeps
        nodes = sorted(vol.nodes)
        local = [n for n in nodes if vol.nodes[n].store.az == vol.options.local_az]
        drop_record(vol.nodes[local[0]], 0, victim)  # the segment a watch asks first
        assert list(itertools.islice(db.watch(start=start), len(written))) == written, "another segment was asked"
        for n in nodes:
            if n != local[0]:
                drop_record(vol.nodes[n], 0, victim)
        with pytest.raises(Compacted):
            list(itertools.islice(db.watch(start=start), len(written)))


def test_a_watch_stream_holds_what_its_client_may_resume_from_also_after_it_ends(make_endpoint):
    """Over gRPC the endpoint cannot know which batches its client took in before a stream broke:
    the stream holds the position it sent a while ago (WATCH_HOLD_BACK_S), and its hold lapses
    WATCH_LINGER_S after the stream ends instead of going at once."""
    from engine.core.placement import protection_group_of

    ep = make_endpoint(config={"resume_grace_s": 0.0})
    w = ep.endpoint.writer
    with engine.connect(ep.address, timeout_s=10) as db:
        db.put(b"first", b"")
        start = db.read_point()  # above 0: a collection point is sent, and held at the start
        watch = db.watch(b"k", start=start)
        p = db.put(b"k", b"0")
        assert next(watch).position == p
        watch.close()
        assert w.read_points.status()["read_points"] == 1, "the ended stream's hold lingers"
        for i in range(20):
            db.put(b"k", b"v%d" % i)
        db.put(b"tick", b"")
        pg = protection_group_of(b"k", 2)
        tail = w.view().tails[pg]  # the PG's last record

        def versions(node) -> int:
            with node.store.env.begin() as txn:
                cur = txn.cursor(db=node.store._versions)
                return sum(1 for _ in cur.iternext_dup()) if cur.set_key(pg.to_bytes(4, "big") + b"k") else 0

        eventually(lambda: all(0 < n.store.collect_target[1] <= p and n.store.scls[pg] >= tail for n in ep.nodes),
                   "every node holds the whole log and has the lingering hold's point")
        for n in ep.nodes:  # these nodes run no background threads: collect here
            while n.store.collect_step():
                pass
        assert {versions(n) for n in ep.nodes} == {21}, "nothing after the position the stream sent was collected"
        resumed = db.watch(b"k", start=p)
        assert [c.value for c in itertools.islice(resumed, 20)] == [b"v%d" % i for i in range(20)]
        resumed.close()
