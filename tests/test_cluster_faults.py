"""A real six-node cluster survives what the paper promises, process by process.

"Losing one AZ (2 nodes) leaves 4: writes go on. Losing an AZ and one more node leaves 3: writes
stop, reads and recovery still work, nothing is lost, and repair brings the write quorum back."
Here the nodes are real processes killed with SIGKILL and frozen with SIGSTOP, under a small
concurrent write load; every acknowledged write is read back at the end.

Each test starts its own cluster in a temporary folder on free ports and always tears it down.
Writes use a short write timeout (2 s) so that refusals are quick; a write that must succeed and
meets it first (a loaded machine) is checked to commit instead. Every wait is on a condition
("until 100 more writes were acknowledged") with the generous deadline of `tests/waiting.py`, so
a loaded machine makes a test slower, not red; no assertion measures elapsed time except the one
promise that is a bound (a refusal comes within the write timeout, not never), and that one is
bounded generously.
"""

from __future__ import annotations

import time

import pytest
from waiting import DEADLINE_S, eventually, until_done

import engine
from engine.cluster import Cluster
from engine.cluster.testing import Load, check_all_readable, check_indeterminate_committed, free_base_port, put_durably

pytestmark = pytest.mark.cluster

WRITE_TIMEOUT_S = 2.0
LOAD_THREADS = 4


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path / "c")
    try:
        c.up(base_port=free_base_port(), protection_groups=4, write_timeout_s=WRITE_TIMEOUT_S)
        yield c
    finally:
        c.down(timeout_s=10)


def put_eventually(db, key: bytes, value: bytes, what: str) -> None:
    """Retry a refused write until one is acknowledged (writes resume once a quorum is back)."""
    until_done(lambda: db.put(key, value), what, retry_on=(engine.Unavailable,))


def test_losing_an_az_keeps_writes_going_and_az_plus_one_stops_them_without_loss(cluster):
    db = cluster.connect()
    try:
        with Load(db, threads=LOAD_THREADS) as load:
            eventually(lambda: load.count() >= 50, "the load to have 50 writes acknowledged")
            # An AZ goes down under load: both of its nodes, at once.
            cluster.kill("n1")
            cluster.kill("n2")
            at_kill = load.count()
            eventually(lambda: load.count() >= at_kill + 100, "100 more writes acknowledged after losing one AZ")
        check_all_readable(db, load)

        # AZ + 1: three of six left. Writes fail with the typed error ...
        cluster.kill("n3")
        with pytest.raises(engine.Unavailable):
            for i in range(100):  # the writer notices n3 at its next append or heartbeat at the latest
                db.put(f"after-az+1:{i}".encode(), b"x")
        # ... and keep failing: refused before anything is logged, once the writer knows. The
        # promise is a bound, the write timeout (not a hang); the allowance on top of it is for
        # the machine, so only a refusal that hangs far beyond the timeout fails here.
        t0 = time.monotonic()
        with pytest.raises(engine.Unavailable) as refused:
            db.put(b"after-az+1:again", b"x")
        seconds = time.monotonic() - t0
        assert not isinstance(refused.value, engine.WriteIndeterminate), refused.value
        assert "Nothing was logged" in str(refused.value), refused.value
        assert seconds < WRITE_TIMEOUT_S + DEADLINE_S, f"a refusal took {seconds:.1f} s; the write timeout is {WRITE_TIMEOUT_S:g} s"
        assert db.status_of(refused.value.request_id).state == "not_committed"
        # ... while reads still work and nothing acknowledged is lost.
        check_all_readable(db, load)

        # Repair: the three come back; writes resume and all acknowledged data is there.
        for n in ("n1", "n2", "n3"):
            cluster.start(n, wait=False)
        cluster._wait_serving(["n1", "n2", "n3"], DEADLINE_S)
        put_eventually(db, b"after-restart", b"ok", "writes to resume after the nodes came back")
        assert db.get(b"after-restart") == b"ok"
        check_all_readable(db, load)
        eventually(lambda: all(n["up"] for n in db.status()["nodes"]), "every node up in the status",
                   ignoring=(engine.Unavailable,))
    finally:
        db.close()


def test_a_node_that_missed_recovery_joins_the_write_quorum(cluster):
    """A node down while the writer recovered is brought to the new epoch when it returns and
    counts for the write quorum: losing an AZ afterwards still leaves four."""
    cluster.kill("writer")
    cluster.kill("n5")
    cluster.start("writer")
    cluster.start("n5")
    db = cluster.connect()
    try:
        put_eventually(db, b"first", b"1", "the first write after the writer's recovery")
        cluster.kill("n1")
        cluster.kill("n2")
        # Only n3, n4, n5, n6 are left: a write is acknowledged only once n5 counts.
        put_eventually(db, b"after-az-loss", b"2", "n5 to join the write quorum")
        assert (db.get(b"first"), db.get(b"after-az-loss")) == (b"1", b"2")
    finally:
        db.close()


def test_a_paused_node_does_not_stop_writes(cluster):
    db = cluster.connect()
    try:
        put_durably(db, b"before", b"1")
        cluster.stop("n4")  # SIGSTOP: its socket stays open, nobody answers
        try:
            with Load(db, threads=3) as load:
                eventually(lambda: load.count() >= 150, "150 writes acknowledged with n4 paused")
            # None refused; one that met the write timeout first (a slow machine) still commits:
            # five nodes answer, so nothing waits on the paused one.
            assert load.failed == 0 and not load.errors, (load.failed, load.errors)
            check_indeterminate_committed(db, load)
            check_all_readable(db, load)
            assert db.get(b"before") == b"1"
        finally:
            cluster.cont("n4")
        put_durably(db, b"after", b"2")
        assert db.get(b"after") == b"2"
    finally:
        db.close()


def test_a_crashed_writer_endpoint_recovers_every_acknowledged_write(cluster):
    # It waits 2 s, not 15, for a new writer: the writes that meet the dead one, and the get
    # while it is down, each wait that long for a writer that is not restarted yet.
    db = cluster.connect(timeout_s=10, follow_timeout_s=2)
    try:
        with Load(db, threads=3) as load:
            eventually(lambda: load.count() >= 100, "the load to have 100 writes acknowledged")
            cluster.kill("writer")
            # Some writes meet the crash (refused, or in flight when it came) before the load stops.
            eventually(lambda: load.not_acknowledged() >= 3, "three writes to meet the killed writer")
        # While the endpoint is down, calls fail with the typed error, not a hang.
        with pytest.raises(engine.Unavailable):
            db.get(b"anything")
        cluster.start("writer")
        eventually(lambda: _readable(db), "the restarted writer endpoint to serve reads")
        check_all_readable(db, load)
        put_eventually(db, b"after-writer-crash", b"ok", "writes to resume on the new writer")
        assert db.status()["epoch"] >= 2, "a new writer recovers at a new epoch"
    finally:
        db.close()


def _readable(db) -> bool:
    try:
        db.get(b"probe")
        return True
    except engine.Unavailable:
        return False
