"""Hosts in network namespaces and real network faults (engine.cluster.netns, netfaults).

"A netns cluster takes writes from the machine's namespace; cutting AZ b with nft under load
keeps writes going with nothing lost; cutting AZ b plus one node refuses writes with the typed
error and keeps reads; healing the cut lets gossip catch up" (issue 15). Every process here is a
real process in a namespace of its own, and a cut is nft drop rules on real packets.

These tests need Linux and root; elsewhere they skip, saying why. Each cluster's namespaces,
veths and bridge carry a random tag and addresses from a free slot of 198.18.0.0/15, so parallel
runs never collide, and the fixture removes everything the cluster recorded even when the test
fails (and checks that nothing is left)."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
from waiting import eventually, until_done

import engine
from engine.cluster import Cluster
from engine.cluster import netns
from engine.cluster.netfaults import Cut, NetFaults, OneWay, blocked_pairs
from engine.cluster.testing import Load, check_all_readable, check_indeterminate_committed, engine_env

REASON = netns.unavailable_reason()
if REASON is None and shutil.which("nft") is None:
    REASON = "the nft command (nftables) is not installed: real network faults need it"
needs_netns = pytest.mark.skipif(REASON is not None, reason=f"network namespaces unavailable here: {REASON}")
WRITE_TIMEOUT_S = 2.0


def _cleanup(folder: str) -> None:
    """Whatever the folder's record names goes, then nothing of it may be left."""
    plan = netns.load_record(folder)
    netns.teardown(folder)
    if plan is not None:
        assert netns.leftovers(plan) == [], f"left behind: {netns.leftovers(plan)}"


@pytest.fixture
def netns_cluster(tmp_path):
    folder = str(tmp_path / "c")
    c = Cluster(folder)
    try:
        c.up(netns=True, durable=False, protection_groups=2, write_timeout_s=WRITE_TIMEOUT_S, no_metrics=True)
        yield c
    finally:
        plan = netns.load_record(folder)
        try:
            c.down(timeout_s=10)
        finally:
            _cleanup(folder)
        if plan is not None:
            assert netns.leftovers(plan) == [], "cluster down left namespaces or links"


# --- pure: what a fault blocks ----------------------------------------------------------------
def test_a_cut_blocks_both_ways_between_groups_and_a_one_way_drop_one_way():
    names = ["n1", "n2", "n3", "writer"]
    pairs = blocked_pairs([Cut.of({"n1", "writer"}, {"n2", "n3"})], names)
    assert ("n1", "n2") in pairs and ("n2", "n1") in pairs and ("n1", "writer") not in pairs
    assert ("n2", "n3") not in pairs
    isolated = blocked_pairs([Cut.of({"n1", "n2", "writer"})], names)  # n3 in no group: cut from all
    assert {p for p in isolated if "n3" in p} == {(n, "n3") for n in names if n != "n3"} | {("n3", n) for n in names if n != "n3"}
    assert blocked_pairs([OneWay("writer", "n3")], names) == {("writer", "n3")}
    with pytest.raises(engine.InvalidArgument):
        blocked_pairs([OneWay("writer", "n9")], names)


def test_addresses_come_from_the_benchmarking_range_one_subnet_per_az():
    plan = netns.plan_for([("n1", "a"), ("n3", "b"), ("n5", "c"), ("writer", "a")], slot=3, tag="abcdef")
    assert plan.address("n1") == "198.18.13.10" and plan.address("writer") == "198.18.13.11"
    assert plan.address("n3") == "198.18.14.10" and plan.address("n5") == "198.18.15.10"
    assert all(len(v[1]) <= 15 for v in plan.processes.values()) and len(plan.bridge) <= 15
    assert netns.slot_of("198.18.14.10") == 3
    assert str(netns.slot_network(netns.SLOTS - 1)).startswith("198.19.")


# --- real namespaces --------------------------------------------------------------------------
@pytest.mark.cluster
@needs_netns
def test_a_netns_cluster_takes_writes_from_the_machines_namespace(netns_cluster):
    c = netns_cluster
    plan = netns.load_record(c.folder)
    ours = os.readlink("/proc/self/ns/net")
    seen = set()
    for name in c.node_ids + ["writer"]:
        pid = c.pid(name)
        ns = os.readlink(f"/proc/{pid}/ns/net")
        assert ns != ours and ns not in seen, f"{name} shares a network namespace"
        seen.add(ns)
        host = c.address(name).rpartition(":")[0]
        assert host == plan.address(name) and netns.RANGE.overlaps(netns.slot_network(netns.slot_of(host)))
    with c.connect() as db:
        for i in range(30):
            db.put(f"k{i}".encode(), f"v{i}".encode())
        assert [v for _k, v in db.scan(b"k", b"l")] == sorted(f"v{i}".encode() for i in range(30))


@pytest.mark.cluster
@needs_netns
def test_cutting_az_b_under_load_keeps_writes_going_and_healing_lets_gossip_catch_up(netns_cluster):
    c = netns_cluster
    faults = NetFaults(c.folder)
    with c.connect() as db:
        with Load(db, threads=3) as load:
            eventually(lambda: load.count() >= 60, "60 writes acknowledged before the cut")
            pairs = faults.cut_az("b")
            assert ("writer", "n3") in pairs and ("n4", "n1") in pairs and ("n3", "n4") not in pairs
            assert "drop" in faults.table("n3")
            at_cut = load.count()
            eventually(lambda: load.count() >= at_cut + 100, "100 more writes acknowledged with AZ b cut off")
        check_indeterminate_committed(db, load)
        check_all_readable(db, load)
        # n3 and n4 heard nothing during the cut: behind the writer's PGCLs.
        st = c.status()
        behind = {n["id"]: n.get("lag") for n in st["nodes"] if n["id"] in ("n3", "n4")}
        assert all(lag is None or lag > 0 for lag in behind.values()), behind
        faults.heal()
        assert faults.table("n3") == ""
        eventually(lambda: all(n.get("lag") == 0 for n in c.status()["nodes"]), "gossip and the writer to catch n3, n4 up")
        check_all_readable(db, load, quorum=True)


@pytest.mark.cluster
@needs_netns
def test_cutting_az_b_plus_one_node_refuses_writes_with_the_typed_error_and_keeps_reads(netns_cluster):
    c = netns_cluster
    faults = NetFaults(c.folder)
    with c.connect() as db:
        for i in range(20):
            db.put(f"before:{i}".encode(), b"x")
        faults.cut_az("b", also=["n1"])  # the writer reaches n2, n5, n6: three of six
        with pytest.raises(engine.Unavailable):
            for i in range(50):  # refused once the writer notices (its next append at the latest)
                db.put(f"during:{i}".encode(), b"y")
        refused = None
        try:
            db.put(b"during:again", b"y")
        except engine.Unavailable as e:
            refused = e
        assert refused is not None, "a write with three of six nodes reachable was acknowledged"
        # Reads need three of six: they still work, and nothing acknowledged is gone.
        assert all(db.get(f"before:{i}".encode()) == b"x" for i in range(20))
        faults.heal()
        until_done(lambda: db.put(b"after-heal", b"z"), "writes to resume after the heal", retry_on=(engine.Unavailable,))
        assert db.get(b"after-heal") == b"z"
        # A one-way drop shows in the status view as in force, in its direction, until healed.
        faults.apply([OneWay("writer", "n3"), OneWay("n5", "writer")])
        rows = {r["id"]: r for r in c.status()["processes"]}
        assert rows["writer"]["faults"] == ["cannot reach n3", "cannot hear n5"], rows["writer"]
        assert rows["n3"]["faults"] == ["cannot hear writer"] and rows["n5"]["faults"] == ["cannot reach writer"]
        assert rows["n1"]["faults"] == []
        faults.heal()
        assert all(r["faults"] == [] for r in c.status()["processes"])


@pytest.mark.cluster
@needs_netns
def test_cluster_down_removes_everything_even_after_the_launcher_was_killed(tmp_path):
    """The launcher is SIGKILLed while it makes the namespaces and starts the processes; the
    record it wrote first lets `cluster down` remove every namespace, link and process."""
    folder = str(tmp_path / "c")
    launcher = subprocess.Popen([sys.executable, "-m", "engine", "cluster", "up", "--cluster", folder, "--netns",
                                 "--no-durable", "--no-metrics"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=engine_env(), start_new_session=True)
    plan = None
    try:
        plan = eventually(lambda: netns.load_record(folder) if os.path.exists(netns.record_path(folder)) else None,
                          "the launcher to record its namespaces", ignoring=(netns.NetnsError,))
        eventually(lambda: any(ns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
                               for ns, *_ in plan.processes.values()), "a namespace to exist")
        launcher.send_signal(signal.SIGKILL)
        launcher.wait(timeout=30)
        down = subprocess.run([sys.executable, "-m", "engine", "cluster", "down", "--cluster", folder],
                              capture_output=True, text=True, env=engine_env(), timeout=120)
        assert down.returncode == 0, down.stderr
        assert netns.leftovers(plan) == []
        assert not os.path.exists(netns.record_path(folder))
        # Nothing of ours runs on in a namespace that is gone.
        out = subprocess.run(["pgrep", "-f", "--", f"--cluster {folder}"], capture_output=True, text=True).stdout.split()
        assert [p for p in out if int(p) != launcher.pid] == [], f"processes left: {out}"
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        if plan is not None and os.path.exists(netns.record_path(folder)):
            Cluster(folder).down(timeout_s=5)
        _cleanup(folder)


@needs_netns
def test_a_record_of_another_shape_is_refused_naming_the_file(tmp_path):
    (tmp_path / netns.RECORD_FILE).write_text(json.dumps({"format": 1, "tag": "x"}))
    with pytest.raises(netns.NetnsError, match="not a namespace record"):
        netns.load_record(str(tmp_path))


@pytest.mark.cluster
@needs_netns
def test_a_short_chaos_run_with_real_network_partitions_is_valid(tmp_path):
    """`sixfold chaos --target cluster --network real`: the plan's partitions and one-way drops
    are nft rules between the namespaces; the same checks as the gate's run say valid, and
    nothing is left. Seed 1's plan (pure, so known here) drops one way in both directions, cuts
    an AZ off and one node, and leaves the writer with a minority; no writer crash, so the run
    stays short for `make test`."""
    from engine.chaos.plan import FaultPlan, network_shape
    from engine.chaos.runner import RunConfig, run

    config = RunConfig(target="cluster", network="real", seed=1, duration_s=3.0, clients=4,
                       faults=("partition", "one-way"), base_port=7600)
    result = run(config, str(tmp_path / "run"))
    assert result.overall == "valid", result.report()
    assert result.stats["network"] == "real" and result.stats["nft_cuts"] >= 5, result.stats
    assert "one_way_in_gate" not in result.stats, "real drops, not the gate's stand-in"
    plan = FaultPlan.from_json((tmp_path / "run" / "plan.json").read_text())
    shapes = {network_shape(e, dict(plan.nodes)) for e in plan.events} - {None}
    assert shapes >= {"az", "node", "writer-minority", "one-way"}, shapes
    drops = {tuple(pair) for e in plan.events if e.kind == "one_way" for pair in e.param("drops")}
    assert {a for a, _b in drops} >= {"writer"} and {b for _a, b in drops} >= {"writer"}, "both directions"
    assert not os.path.exists(netns.record_path(str(tmp_path / "run" / "cluster"))), "cluster down left its record"


def test_real_network_faults_are_for_the_cluster_target_only():
    from engine.chaos.runner import RunConfig

    with pytest.raises(engine.InvalidArgument, match="--target cluster only"):
        RunConfig(target="embedded", network="real").check_target()


@pytest.mark.cluster
@needs_netns
def test_a_reader_and_a_replacement_node_added_later_get_namespaces_of_their_own(netns_cluster):
    c = netns_cluster
    rid = c.add_reader()
    plan = netns.load_record(c.folder)
    host = c.address(rid).rpartition(":")[0]
    assert plan.namespace_at(host) == f"sfx-{plan.tag}-{rid}" and netns.slot_of(host) == plan.slot
    assert os.readlink(f"/proc/{c.pid(rid)}/ns/net") != os.readlink(f"/proc/{c.pid('writer')}/ns/net")
    with c.connect() as db:
        db.put(b"before-replace", b"1")
        c.replace_node("n6", "n7")
        host = c.address("n7").rpartition(":")[0]
        assert ipaddress.ip_address(host) in netns.az_subnet(plan.slot, "c"), "the new node lives in its AZ's subnet"
        db.put(b"after-replace", b"2")
        assert db.get(b"before-replace") == b"1" and db.get(b"after-replace") == b"2"
    # A real cut reaches the processes added later too.
    faults = NetFaults(c.folder)
    assert ("writer", "n7") in faults.cut_az("c")
    faults.heal()
