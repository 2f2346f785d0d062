"""Self-healing and recovery with real processes: the cluster half of `tests/test_healing.py`.

"A segment that missed writes catches up from its peers; a wiped one rebuilds; a corrupt copy is
never served and is refetched; a crashed writer recovers every acknowledged write at a new epoch;
an old writer is fenced; a node is replaced without stopping writes." Each sentence is a test
here, on six node processes and a writer endpoint, with SIGKILL, SIGSTOP and `rm -rf`.

Most tests share one cluster (starting seven Python processes costs seconds) and leave it whole
again (`healthy`: every node and the writer SERVING, no fault rules). The membership change that
completes gets a cluster of its own, since it changes the nodes for good. Every wait is on a
condition, with the generous deadline of `tests/waiting.py`; no assertion measures elapsed time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from waiting import DEADLINE_S, eventually

import engine
from engine.cluster import WRITER, Cluster, ClusterError
from engine.cluster.testing import (
    Load, check_all_readable, check_indeterminate_committed, engine_env, free_base_port, wait_serving,
)
from engine.core.placement import protection_group_of
from engine.transport.convert import FaultRules

PROTECTION_GROUPS = 4
#: No test here needs a quick refusal, and every write that is not refused must succeed: a
#: generous write timeout, so that a loaded machine does not turn one into WriteIndeterminate.
WRITE_TIMEOUT_S = 10.0
GOSSIP_INTERVAL_S = 0.5  # quicker repair than the default 1 s; fewer rounds than embedded tests


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("healing") / "c")
    try:
        c.up(base_port=free_base_port(), protection_groups=PROTECTION_GROUPS, write_timeout_s=WRITE_TIMEOUT_S,
             gossip_interval_s=GOSSIP_INTERVAL_S, timeout_s=DEADLINE_S, allow_fault_injection=True)
        yield c
    finally:
        c.down(timeout_s=10)


def restore(c: Cluster) -> None:
    """Every active node and the writer endpoint running and SERVING; no fault rules."""
    for n in c.node_ids:
        state = c.state(n)
        if state == "paused":
            c.cont(n)
        elif state == "down":
            c.start(n, wait=False)
    c._wait_serving(c.node_ids, DEADLINE_S)
    for n in c.node_ids:
        c.set_faults(n)
    if c.state(WRITER) == "paused":
        c.cont(WRITER)
    if c.health(WRITER) != "SERVING":  # down, or fenced by a newer writer
        if c.state(WRITER) != "down":
            c.kill(WRITER)
        c.start(WRITER)


@pytest.fixture
def healthy(shared):
    restore(shared)
    try:
        yield shared
    finally:
        restore(shared)


@pytest.fixture
def db(healthy):
    d = healthy.connect(timeout_s=10)
    try:
        yield d
    finally:
        d.close()


def readable(db) -> bool:
    try:
        db.get(b"probe")
        return True
    except engine.Unavailable:
        return False


def node_status(c: Cluster, node_id: str) -> dict:
    """The node's status entry, with its state: a health check or State call that timed out
    on a loaded machine (the entry then has no state) is asked again."""
    entry: dict = {}

    def answered() -> bool:
        nonlocal entry
        entry = next(n for n in c.status()["nodes"] if n["id"] == node_id)
        return "epoch" in entry or entry["health"] in ("DOWN", "PAUSED")

    eventually(answered, f"{node_id}'s status entry to carry its state")
    return entry


def scls_equal(c: Cluster) -> bool:
    st = c.status()
    scls = {tuple(n.get("scls") or ()) for n in st["nodes"]}
    return len(scls) == 1 and all(n["health"] == "SERVING" for n in st["nodes"])


def kill_all_but(c: Cluster, keep: list[str]) -> list[str]:
    killed = [n for n in c.node_ids if n not in keep]
    for n in killed:
        c.kill(n)
    return killed


def read_all(db, expected: dict[bytes, bytes], *, quorum: bool = False) -> None:
    """Read every key: each must have its value (how long that takes measures the machine)."""
    for key, value in expected.items():
        assert db.get(key, quorum=quorum) == value, f"{key!r} lost"


# --- catch-up, rebuild, scrub ---------------------------------------------------------------
@pytest.mark.cluster
def test_a_node_killed_during_writes_catches_up_and_then_serves_every_acknowledged_write_alone(healthy, db):
    c = healthy
    with Load(db, "catchup") as load:
        eventually(lambda: load.count() >= 50, "the load to have 50 writes acknowledged")
        c.kill("n5")  # SIGKILL mid-write
        at_kill = load.count()
        eventually(lambda: load.count() >= at_kill + 100, "100 more writes acknowledged after losing n5")
        c.start("n5")
        restarted = load.count()
        eventually(lambda: load.count() >= restarted + 50, "50 more writes acknowledged after n5 restarted")
    assert load.failed == 0 and not load.errors, (load.failed, load.errors)
    # Five nodes or more answered throughout: a write that met the timeout (a slow machine) commits.
    check_indeterminate_committed(db, load)
    # Gossip (below the writer's VDL hint) and the writer's own sends bring n5 level with its peers.
    eventually(lambda: scls_equal(c), "every node at the same SCLs")
    assert node_status(c, "n5")["lag"] == 0
    # n5 alone now holds every acknowledged write: the others go, the reads come from it. They
    # read a snapshot taken before: with one node left the writer cannot confirm its lease (a new
    # writer could have taken the other five), so it serves no linearizable read; a snapshot is a
    # read of that past point.
    snap = db.snapshot()
    kill_all_but(c, ["n5"])
    read_all(snap, load.acked)
    with pytest.raises(engine.Unavailable):
        db.get(b"catchup:never", quorum=True)  # a quorum read needs three: only n5 answered above


@pytest.mark.cluster
def test_a_wiped_node_rebuilds_from_peers_with_progress_then_serves_reads_alone(healthy, db, capsys):
    from engine.cli import main

    c = healthy
    expected = {}
    for i in range(6):
        with db.batch() as b:
            for j in range(50):
                key, value = b"wipe:%d:%02d" % (i, j), b"v%d.%d" % (i, j)
                b.put(key, value)
                expected[key] = value
    before = node_status(c, "n2")
    # `sixfold node wipe --watch` kills n2, deletes its folder, starts it empty and follows the
    # rebuild until every node is level with the writer; --json ends with the final status.
    capsys.readouterr()
    assert main(["node", "wipe", "--cluster", c.folder, "n2", "--watch", "--interval-s", "0.5", "--timeout-s", "60",
                 "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["complete"] is True
    n2 = next(n for n in st["nodes"] if n["id"] == "n2")
    assert n2["lag"] == 0 and n2["rebuild"]["fraction"] == 1.0 and n2["rebuild"]["complete"]
    assert n2["rebuild"]["fetched_records"] >= len(expected), n2["rebuild"]
    assert n2["repaired"] >= len(expected) and n2["pid"] != before["pid"]
    n1 = next(n for n in st["nodes"] if n["id"] == "n1")
    eventually(lambda: node_status(c, "n2")["records"] == node_status(c, "n1")["records"], "n2 to hold as many records as n1")
    assert main(["node", "rebuild-status", "--cluster", c.folder]) == 0
    assert "n2" in capsys.readouterr().out
    # Rebuilt: n2 alone serves every key (at a snapshot: one node cannot renew the writer's lease).
    snap = db.snapshot()
    kill_all_but(c, ["n2"])
    read_all(snap, expected)


@pytest.mark.cluster
def test_corrupt_copies_are_never_served_are_counted_and_are_refetched(healthy, db):
    c = healthy
    with db.batch() as b:
        b.put(b"victim", b"precious")
    # The victim's own record: the unit's last LSN (its CPL) is its request record, which sits in
    # the PG of the request id (so the victim's PG may never reach it, and when it does, LSN
    # b.lsn is the request record, not the victim).
    lsn = b.lsn - 1
    pg = protection_group_of(b"victim", PROTECTION_GROUPS)
    hit = ("n1", "n2", "n3")
    eventually(lambda: all(node_status(c, n)["scls"][pg] >= lsn for n in hit), f"n1, n2, n3 to hold the victim (LSN {lsn})")
    # With n1..n3 corrupt a quorum read needs n4, n5 and n6: the writer must be reaching all three
    # again (a node an earlier test stopped stays suspect to its transport until a call succeeds).
    eventually(lambda: all(link["up"] for link in db.status()["writer"]["links"].values()),
               "the writer to reach every node again")
    found_before = {n: node_status(c, n)["corrupt_found"] for n in hit}
    for n in hit:
        assert c.corrupt(n, pg, lsn, bit=8 * 40 + 3) == lsn
    # Every read path avoids the corrupt copies: single segment (n1 first: same AZ; a snapshot's
    # get, since a get of now is answered from the writer's memory of its writes), quorum, scan.
    for _ in range(10):
        assert db.get(b"victim") == b"precious"
        with db.snapshot() as snap:
            assert snap.get(b"victim") == b"precious"
        assert db.get(b"victim", quorum=True) == b"precious"
        assert dict(db.scan(b"victim", b"victin")) == {b"victim": b"precious"}
    # Scrub (or the reads above) found them and counted them; gossip refetched good copies.
    for n in hit:
        c.scrub(n)
    assert all(node_status(c, n)["corrupt_found"] >= found_before[n] + 1 for n in hit)
    eventually(lambda: scls_equal(c), "every node at the same SCLs (the corrupt copies refetched)")
    # Only the refetched copies remain on n1..n3: without the other three, a quorum read finds it.
    kill_all_but(c, list(hit))
    assert db.get(b"victim", quorum=True) == b"precious"
    assert db.get(b"victim") == b"precious"


# --- writer recovery and fencing ------------------------------------------------------------
@pytest.mark.cluster
def test_a_sigkilled_writer_endpoint_recovers_every_acknowledged_write_at_a_new_epoch(healthy):
    c = healthy
    # A client that waits 2 s, not 15, for a new writer: the load's writes that meet the dead one,
    # and the get while it is down, each wait that long for a writer that does not come.
    db = c.connect(timeout_s=10, follow_timeout_s=2)
    try:
        _sigkilled_writer_endpoint(c, db)
    finally:
        db.close()


def _sigkilled_writer_endpoint(c, db):
    epoch = db.status()["epoch"]
    with Load(db, "writer-crash") as load:
        eventually(lambda: load.count() >= 100, "the load to have 100 writes acknowledged")
        c.kill(WRITER)
        # Some writes meet the crash (refused, or in flight when it came) before the load stops.
        eventually(lambda: load.not_acknowledged() >= 3, "three writes to meet the killed writer")
    with pytest.raises(engine.Unavailable):
        db.get(b"anything")  # while it is down: the typed error, not a hang
    c.start(WRITER)
    eventually(lambda: readable(db), "the restarted writer endpoint to serve reads")
    check_all_readable(db, load)
    st = db.status()
    assert st["epoch"] > epoch and st["writer"]["recovery"]["epoch"] == st["epoch"], "a recovered writer runs at a new epoch"
    db.put(b"after-writer-crash", b"ok")
    assert db.get(b"after-writer-crash") == b"ok"


@pytest.mark.cluster
def test_a_paused_old_writer_is_fenced_by_a_new_one_and_completes_no_write(healthy, db, tmp_path):
    from engine.security.users import operator_token

    c = healthy
    db.put(b"fence", b"old-writer")
    old_epoch = db.status()["epoch"]
    # A client of the old endpoint itself (by address: it does not follow the manifest).
    old = engine.connect(c.address(WRITER), timeout_s=10, tls=c.tls(), token=operator_token(c.folder))
    c.stop(WRITER)  # SIGSTOP: the old endpoint freezes with its sockets open
    port = free_base_port(1)
    address = f"127.0.0.1:{port}"
    log = open(tmp_path / "writer2.log", "ab")
    second = subprocess.Popen(
        [sys.executable, "-m", "engine", "writer", "serve", "--cluster", c.folder, "--listen", address],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=engine_env(), start_new_session=True,
    )
    log.close()
    new = None
    try:
        wait_serving(address, DEADLINE_S, proc=second, tls=c.tls())
        new = engine.connect(address, timeout_s=10, tls=c.tls(), token=operator_token(c.folder))
        assert new.status()["epoch"] > old_epoch, "the second writer recovers at a higher epoch"
        assert new.get(b"fence") == b"old-writer"
        new.put(b"fence", b"new-writer")
        c.cont(WRITER)
        # The old endpoint's clients get an error for every write: StaleEpoch, or the write's
        # fate is unknown / the endpoint is unavailable. None of them may ever take effect.
        for i in range(5):
            with pytest.raises((engine.StaleEpoch, engine.Unavailable, engine.Closed)):
                old.put(b"fence", b"from-the-fenced-writer-%d" % i)
        # It steps down: stops serving and exits (engine.head.failover).
        eventually(lambda: c.health(WRITER) in ("NOT_SERVING", "DOWN"), "the fenced endpoint to stop reporting SERVING")
        eventually(lambda: c.pid(WRITER) is None, "the fenced endpoint to exit")
        # The new one serves, and never sees a value of the fenced one.
        new.put(b"fence:after", b"ok")
        assert new.get(b"fence:after") == b"ok"
        assert new.get(b"fence") == b"new-writer"
        assert new.get(b"fence", quorum=True) == b"new-writer"
    finally:
        old.close()
        if new is not None:
            new.close()
        second.terminate()
        try:
            second.wait(10)
        except subprocess.TimeoutExpired:
            second.kill()
            second.wait(DEADLINE_S)


# --- membership change ----------------------------------------------------------------------
@pytest.mark.cluster
def test_replace_is_reverted_when_the_old_node_answers_first(healthy, db):
    """n3 is down, n7 is held back (its gossip is refused by every peer, so it cannot fetch the
    records the writer trimmed); n3 returns before n7 caught up: step 2 reverts."""
    c = healthy
    # More records than the writer keeps in its tail for slow nodes (it trims past 4096), so
    # n7 cannot get the early ones from the writer either: only gossip, which is refused, has them.
    for b in range(3):
        with db.batch() as batch:
            for i in range(2500):
                batch.put(b"revert:%d:%04d" % (b, i), b"v")
    c.kill("n3")
    for n in ("n1", "n2", "n4", "n5", "n6"):
        c.set_faults(n, FaultRules(blocked_sources=("n7",)))
    fractions: list[float] = []

    def progress(fraction: float) -> None:
        fractions.append(fraction)
        if len(fractions) == 1:
            # The old node comes back while n7 is still behind, and n7 cannot copy it either: n7
            # is paused (SIGSTOP) from before n3 serves until n3 refuses n7's gossip, so however
            # long n3 takes to start on a loaded machine, n7 never gets a window to catch up.
            c.stop("n7")
            c.start("n3")
            c.set_faults("n3", FaultRules(blocked_sources=("n7",)))
            c.cont("n7")

    result = c.replace_node("n3", "n7", timeout_s=60, progress=progress)
    assert result["reverted"] and not result["replaced"], result
    assert fractions and max(fractions) < 1.0
    m = c.manifest
    n7 = next(n for n in m["nodes"] if n["id"] == "n7")
    assert n7["retired"] and "n7" not in c.node_ids and "n3" in c.node_ids
    assert c.state("n7") == "down"
    st = db.status()
    assert st["writer"]["membership"]["members"] == ["n1", "n2", "n3", "n4", "n5", "n6"]
    assert st["writer"]["membership"]["next_members"] is None
    assert st["membership_change"]["phase"] == "reverted"
    db.put(b"after-revert", b"ok")
    assert db.get(b"after-revert") == b"ok"
    with pytest.raises(ClusterError):
        c.start("n7")


@pytest.mark.cluster
def test_replace_a_node_under_write_load_then_n7_is_a_full_member(tmp_path, capsys):
    from engine.cli import main

    c = Cluster(tmp_path / "c")
    c.up(base_port=free_base_port(), protection_groups=PROTECTION_GROUPS, write_timeout_s=WRITE_TIMEOUT_S,
         gossip_interval_s=GOSSIP_INTERVAL_S, timeout_s=DEADLINE_S)
    db = None
    try:
        db = c.connect(timeout_s=10)
        expected = {}
        with db.batch() as b:
            for i in range(200):
                expected[b"before:%03d" % i] = b"v%d" % i
                b.put(b"before:%03d" % i, b"v%d" % i)
        c.kill("n3")  # failed for good
        base = c.manifest["base_port"]
        capsys.readouterr()
        with Load(db, "during", threads=2, pause_s=0.01) as load:
            eventually(lambda: load.count() >= 20, "the load to have 20 writes acknowledged")
            code = main(["node", "replace", "--cluster", c.folder, "n3", "--with", "n7", "--timeout-s", "60", "--json"])
            during = load.count()
            eventually(lambda: load.count() >= during + 20, "20 more writes acknowledged after the change")
        out = capsys.readouterr().out
        assert code == 0, out
        result = json.loads(out)
        assert result["replaced"] and not result["reverted"]
        assert result["members"] == ["n1", "n2", "n7", "n4", "n5", "n6"]
        assert load.failed == 0 and not load.errors, (load.failed, load.errors)
        # Five nodes answered throughout: a write that met the timeout (a slow machine) commits.
        check_indeterminate_committed(db, load)
        # The manifest: n7 in n3's AZ on the next port, n3 retired; down/up use n7.
        m = c.manifest
        n7 = next(n for n in m["nodes"] if n["id"] == "n7")
        assert n7["az"] == "b" and n7["address"].endswith(f":{base + 7}") and os.path.isdir(os.path.join(c.folder, n7["data"]))
        n3 = next(n for n in m["nodes"] if n["id"] == "n3")
        assert n3["retired"] and n3["replaced_by"] == "n7"
        assert c.node_ids == ["n1", "n2", "n4", "n5", "n6", "n7"] and c.azs()["b"] == ["n4", "n7"]
        assert [n["id"] for n in result["status"]["nodes"]] == c.node_ids
        expected.update(load.acked)
        # n7 is a full member. Without n3's AZ-mate n4 and n1, a write needs n7's answer ...
        c.kill("n4")
        c.kill("n1")
        db.put(b"needs-n7", b"yes")
        expected[b"needs-n7"] = b"yes"
        # ... and without n2 as well (AZ a and n4 gone), a quorum read needs n7's answer.
        c.kill("n2")
        read_all(db, expected, quorum=True)
        # `cluster down` and `cluster up` run the new membership.
        c.down(timeout_s=10)
        st = c.up(timeout_s=DEADLINE_S)
        assert [n["id"] for n in st["nodes"]] == ["n1", "n2", "n4", "n5", "n6", "n7"]
        assert all(n["health"] == "SERVING" for n in st["nodes"]) and c.state("n3") == "down"
        db.close()
        db = c.connect(timeout_s=10)
        eventually(lambda: readable(db), "the writer endpoint to serve reads after `cluster up`")
        assert db.status()["writer"]["membership"]["members"] == ["n1", "n2", "n7", "n4", "n5", "n6"]
        read_all(db, expected)
    finally:
        if db is not None:
            db.close()
        c.down(timeout_s=10)


# --- pieces without processes ---------------------------------------------------------------
def test_membership_change_round_trips_through_protobuf():
    from engine.proto import kv_pb2
    from engine.transport import convert

    for change in (
        convert.MembershipChange(),
        convert.MembershipChange("rebuilding", "n3", "n7", 0.25, 40, 120, 5, ("n1", "n2", "n3", "n4", "n5", "n6"),
                                 ("n1", "n2", "n7", "n4", "n5", "n6"), 1.5),
        convert.MembershipChange("failed", "n3", "n7", 0.5, error="Unavailable: n7 did not catch up"),
    ):
        wire = convert.membership_change_to_pb(change).SerializeToString()
        assert convert.membership_change_from_pb(kv_pb2.MembershipChange.FromString(wire)) == change
    args = ("n3", "n7", "127.0.0.1:7407", "b", 30.0)
    wire = convert.replace_node_request_to_pb(*args).SerializeToString()
    assert convert.replace_node_args_from_pb(kv_pb2.ReplaceNodeRequest.FromString(wire)) == args
    for bad in (("n3", "n3", "h:1", "b"), ("n3", "", "h:1", "b"), ("n3", "n 7", "h:1", "b"), ("n3", "n7", "nowhere", "b")):
        with pytest.raises(engine.InvalidArgument):
            convert.replace_node_args_from_pb(convert.replace_node_request_to_pb(*bad))


def test_rebuild_progress_counts_lsns_behind_the_pgcl():
    from engine.cluster.launcher import rebuild_progress

    assert rebuild_progress([0, 0], [0, 0]) == {"lag": 0, "lag_max": 0, "fraction": 1.0}
    assert rebuild_progress([0, 0], [30, 10]) == {"lag": 40, "lag_max": 30, "fraction": 0.0}
    assert rebuild_progress([30, 5], [30, 10]) == {"lag": 5, "lag_max": 5, "fraction": 0.875}
    assert rebuild_progress([40, 10], [30, 10])["lag"] == 0  # ahead of the PGCL is not negative lag


def test_added_nodes_get_the_next_port_and_nodes_learn_their_address_from_the_manifest(tmp_path):
    from engine.cluster.addresses import ManifestTransport
    from engine.cluster.manifest import active_nodes, add_node_entry, new_manifest, node_infos, save_manifest, used_ports

    m = new_manifest(base_port=7400)
    save_manifest(str(tmp_path), m)
    t = ManifestTransport(str(tmp_path), "n1")
    try:
        assert "n7" not in t.addresses
        with pytest.raises(engine.errors.NodeNotFound):
            t.state("n7")  # unknown everywhere: a re-read of the manifest, then NodeNotFound
        add_node_entry(m, "n7", "b", max(used_ports(m)) + 1, replaces="n3")
        next(n for n in m["nodes"] if n["id"] == "n3")["retired"] = True
        save_manifest(str(tmp_path), m)
        assert not t.reload(), "re-reads are rate-limited"
        t._reloaded_at = float("-inf")
        assert t.reload() and t.addresses["n7"] == "127.0.0.1:7407"
    finally:
        t.close()
    assert [n["id"] for n in active_nodes(m)] == ["n1", "n2", "n4", "n5", "n6", "n7"]
    assert [(i.id, i.az) for i in node_infos(m)][-1] == ("n7", "b")
