"""Watch (issue 14, item 3): `db.watch(prefix, start=position)` yields committed changes in commit
order, resumable from a position, embedded and over gRPC (`sixfold watch`); a watcher behind what
the nodes still hold gets Compacted with the oldest position kept, never a silent gap (watches
from the nodes' logs: tests/test_watch_log.py)."""

from __future__ import annotations

import itertools
import threading

import pytest
from waiting import eventually

import engine
from engine.cluster import Cluster
from engine.cluster.testing import free_base_port
from engine.errors import Compacted, InvalidArgument


def take(it, n):
    out = list(itertools.islice(it, n))
    it.close()
    return out


def test_changes_come_in_commit_order_with_deletes_and_batches_sharing_a_position(db):
    start = db.read_point()
    p1 = db.put(b"a:1", b"x")
    db.put(b"b:1", b"other prefix")
    with db.batch() as b:
        b.put(b"a:2", b"y").delete(b"a:1")
    p3 = db.delete(b"a:2")
    got = take(db.watch(b"a:", start=start), 4)
    assert got == [engine.Change(b"a:1", b"x", p1), engine.Change(b"a:2", b"y", b.lsn), engine.Change(b"a:1", None, b.lsn),
                   engine.Change(b"a:2", None, p3)]
    assert [c.key for c in take(db.watch(start=start), 2)] == [b"a:1", b"b:1"], "an empty prefix watches every key"


def test_a_watch_resumes_after_the_last_position_it_gave_and_sees_new_commits_live(db):
    start = db.read_point()
    for i in range(5):
        db.put(b"k%d" % i, b"%d" % i)
    first = take(db.watch(b"k", start=start), 3)
    rest = db.watch(b"k", start=first[-1].position)
    assert [c.key for c in itertools.islice(rest, 2)] == [b"k3", b"k4"]
    threading.Timer(0.2, lambda: db.put(b"k9", b"late")).start()
    change = next(rest)
    assert (change.key, change.value) == (b"k9", b"late") and change.position > first[-1].position
    rest.close()
    assert db.get(b"k9") == b"late"


def test_a_watch_from_now_sees_only_later_commits(db):
    db.put(b"old", b"1")
    w = db.watch()
    threading.Timer(0.2, lambda: db.put(b"new", b"2")).start()
    assert next(w).key == b"new"
    w.close()


def test_after_a_writer_crash_a_watch_goes_on_or_says_compacted(db):
    start = db.read_point()
    db.put(b"a", b"1")
    w = db.watch(start=start)
    assert next(w).key == b"a"
    db.cluster.crash_writer()
    db.put(b"b", b"2")
    assert next(w).key == b"b", "caught up when the writer crashed: it goes on with the new writer, no gap"
    w.close()
    # The new writer collected past `start` (an embedded volume has no resume grace by default,
    # and nothing held it): an older position is Compacted (tests/test_watch_log.py: with a
    # grace, or while a watch holds it, it goes on from the nodes' logs).
    with pytest.raises(Compacted) as e:
        next(db.watch(start=start))
    assert e.value.oldest > start


def test_bad_watch_arguments(db):
    with pytest.raises(InvalidArgument):
        db.watch("a")
    for start in (-1, True, "0", 1 << 63, (1 << 64) - 1, 1 << 64):
        with pytest.raises(InvalidArgument, match=r"^start= is a commit position"):
            db.watch(b"", start=start)
    # A position beyond the log was never given by this volume: refused, not waited for.
    position = db.put(b"k", b"v")
    with pytest.raises(InvalidArgument, match="beyond this volume's log"):
        next(db.watch(b"", start=position + 1000))
    assert next(db.watch(b"", start=position - 1)).key == b"k"


def _watch_over_grpc_and_the_cli(tmp_path, capsys, then=None):
    from engine.cli import main

    c = Cluster(tmp_path / "c")
    try:
        c.up(base_port=free_base_port(), protection_groups=2, timeout_s=60)
        with engine.connect(c.folder) as db:
            start = db.read_point()
            p1 = db.put(b"w:1", b"one")
            db.put(b"x:1", b"not watched")
            p2 = db.delete(b"w:1")
            w = db.watch(b"w:", start=start)
            assert [next(w), next(w)] == [engine.Change(b"w:1", b"one", p1), engine.Change(b"w:1", None, p2)]
            threading.Timer(0.3, lambda: db.put(b"w:2", b"live")).start()
            assert next(w).key == b"w:2"
            w.close()
            assert main(["watch", "w:", "--cluster", c.folder, "--from", str(start), "--count", "3"]) == 0
            out = capsys.readouterr().out.splitlines()
            assert out[0] == f"{p1}\tw:1\tone" and out[1] == f"{p2}\tw:1\t<deleted>" and out[2].endswith("\tw:2\tlive")
            if then is not None:
                then(c, db, start)
    finally:
        c.down(timeout_s=10)


@pytest.mark.cluster
def test_watch_over_grpc_and_the_cli(tmp_path, capsys):
    _watch_over_grpc_and_the_cli(tmp_path, capsys)


@pytest.mark.cluster
@pytest.mark.soak
def test_over_grpc_a_watch_that_ended_lets_collection_pass_its_start_and_then_the_start_is_compacted(tmp_path, capsys):
    """About 30 s (the endpoint holds an ended stream's position for WATCH_LINGER_S), so in the soak."""
    def collected_past(c, db, start):
        def collected_past_start():
            return all(n.get("horizon_lsn", 0) > start for n in db.status()["nodes"])

        db.put(b"tick", b"")
        eventually(collected_past_start, "every node collected past the start (no watch holds it any more)")
        c.crash_writer()
        with pytest.raises(Compacted) as e:
            next(db.watch(start=start))
        assert e.value.oldest > start

    _watch_over_grpc_and_the_cli(tmp_path, capsys, collected_past)
