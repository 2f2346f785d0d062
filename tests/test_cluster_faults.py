"""A real six-node cluster survives what the paper promises, process by process.

"Losing one AZ (2 nodes) leaves 4: writes go on. Losing an AZ and one more node leaves 3: writes
stop, reads and recovery still work, nothing is lost, and repair brings the write quorum back."
Here the nodes are real processes killed with SIGKILL and frozen with SIGSTOP, under a small
concurrent write load; every acknowledged write is read back at the end.

Each test starts its own cluster in a temporary folder on free ports and always tears it down.
Writes use a short write timeout (2 s) so that failures are quick; every wait is bounded.
"""

from __future__ import annotations

import time

import pytest

import engine
from engine.cluster import Cluster
from engine.cluster.testing import Load, check_all_readable, free_base_port
from engine.node.service import wait_until

pytestmark = pytest.mark.cluster

WRITE_TIMEOUT_S = 2.0
LOAD_THREADS = 4


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path / "c")
    try:
        c.up(base_port=free_base_port(), protection_groups=4, write_timeout_s=WRITE_TIMEOUT_S, timeout_s=60)
        yield c
    finally:
        c.down(timeout_s=10)


def put_eventually(db, key: bytes, value: bytes, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            db.put(key, value)
            return True
        except engine.Unavailable:
            time.sleep(0.2)
    return False


def test_losing_an_az_keeps_writes_going_and_az_plus_one_stops_them_without_loss(cluster):
    db = cluster.connect()
    try:
        with Load(db, threads=LOAD_THREADS) as load:
            assert wait_until(lambda: load.count() >= 50, 20), "the load did not start"
            # An AZ goes down under load: both of its nodes, at once.
            cluster.kill("n1")
            cluster.kill("n2")
            at_kill = load.count()
            assert wait_until(lambda: load.count() >= at_kill + 100, 30), "writes stopped after losing one AZ"
        check_all_readable(db, load)
        assert load.count() > at_kill

        # AZ + 1: three of six left. Writes fail with the typed error within the timeout ...
        cluster.kill("n3")
        t0 = time.monotonic()
        with pytest.raises(engine.Unavailable):
            for i in range(100):
                db.put(f"after-az+1:{i}".encode(), b"x")
        assert time.monotonic() - t0 < 4 * WRITE_TIMEOUT_S + 10
        t0 = time.monotonic()
        with pytest.raises(engine.Unavailable):  # and keep failing, each within the timeout
            db.put(b"after-az+1:again", b"x")
        assert time.monotonic() - t0 < WRITE_TIMEOUT_S + 5
        # ... while reads still work and nothing acknowledged is lost.
        check_all_readable(db, load)

        # Repair: the three come back; writes resume and all acknowledged data is there.
        for n in ("n1", "n2", "n3"):
            cluster.start(n, wait=False)
        cluster._wait_serving(["n1", "n2", "n3"], 60)
        assert put_eventually(db, b"after-restart", b"ok", 30), "writes did not resume after the nodes came back"
        assert db.get(b"after-restart") == b"ok"
        check_all_readable(db, load)
        assert wait_until(lambda: all(n["up"] for n in db.status()["nodes"]), 15), db.status()["nodes"]
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
        assert put_eventually(db, b"first", b"1", 20)
        cluster.kill("n1")
        cluster.kill("n2")
        t0 = time.monotonic()
        assert put_eventually(db, b"after-az-loss", b"2", 30), "n5 never joined the write quorum"
        assert time.monotonic() - t0 < 15
        assert (db.get(b"first"), db.get(b"after-az-loss")) == (b"1", b"2")
    finally:
        db.close()


def test_a_paused_node_does_not_stop_writes(cluster):
    db = cluster.connect()
    try:
        db.put(b"before", b"1")
        cluster.stop("n4")  # SIGSTOP: its socket stays open, nobody answers
        try:
            with Load(db, threads=3) as load:
                assert wait_until(lambda: load.count() >= 150, 30), "writes stalled behind a paused node"
            assert load.failed == 0 and not load.unknown, (load.failed, len(load.unknown))
            check_all_readable(db, load)
            assert db.get(b"before") == b"1"
        finally:
            cluster.cont("n4")
        db.put(b"after", b"2")
        assert db.get(b"after") == b"2"
    finally:
        db.close()


def test_a_crashed_writer_endpoint_recovers_every_acknowledged_write(cluster):
    db = cluster.connect(timeout_s=10)
    try:
        with Load(db, threads=3) as load:
            assert wait_until(lambda: load.count() >= 100, 20)
            cluster.kill("writer")
            time.sleep(0.3)
        # While the endpoint is down, calls fail with the typed error, not a hang.
        with pytest.raises(engine.Unavailable):
            db.get(b"anything")
        cluster.start("writer")
        assert wait_until(lambda: _readable(db), 30)
        check_all_readable(db, load)
        assert put_eventually(db, b"after-writer-crash", b"ok", 20)
        assert db.status()["epoch"] >= 2, "a new writer recovers at a new epoch"
    finally:
        db.close()


def _readable(db) -> bool:
    try:
        db.get(b"probe")
        return True
    except engine.Unavailable:
        return False
