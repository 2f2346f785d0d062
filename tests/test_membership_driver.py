"""One membership-change driver (`engine.head.membership.MembershipChange`) for the embedded engine
and the writer endpoint, one read path (`engine.head.reads.ReadPath`) for both, and the unsafe
protocol switches kept out of `engine.open`."""

from __future__ import annotations

import json
import os

import pytest
from waiting import DEADLINE_S

import engine
from engine.errors import InvalidArgument
from engine.head.membership import MembershipChange
from engine.head.reads import ReadPath


def open_db(path, **kw):
    kw.setdefault("write_timeout_s", 10.0)
    kw.setdefault("gossip_interval_s", 0.02)
    kw.setdefault("scrub_interval_s", 0.05)
    return engine.open(path, **kw)


def volume_node_ids(path) -> list[str]:
    with open(os.path.join(path, "volume.json")) as f:
        return [n["id"] for n in json.load(f)["nodes"]]


def test_a_refused_change_leaves_no_new_node_behind(tmp_path):
    """The drift the issue names: the embedded engine started the new node, then had its change
    refused and left the node running (and listed in volume.json); the launcher retired it. With
    one driver the request is checked first, and a refused step 1 retires what it added."""
    path = tmp_path / "d"
    with open_db(path) as db:
        db.put(b"k", b"v")
        vol = db.cluster._v
        under_way = vol.begin_replace("n3", "n7")  # step 1 only: the change stays open
        assert isinstance(under_way, MembershipChange) and under_way.phase == "rebuilding"
        with pytest.raises(InvalidArgument, match="under way"):
            db.cluster.replace_node("n4", "n8")
        assert "n8" not in [n["id"] for n in db.cluster.nodes]
        assert "n8" not in volume_node_ids(path)
        assert not os.path.exists(path / "az-b" / "n8") and not os.path.exists(path / "az-c" / "n8")
        assert vol.nodes.get("n8") is None
        # the change under way is untouched and completes
        assert under_way.run() == "replaced"
        assert db.status()["writer"]["membership"]["members"] == ["n1", "n2", "n7", "n4", "n5", "n6"]
        assert db.get(b"k") == b"v"


def test_asking_again_for_the_change_under_way_resumes_it(tmp_path):
    with open_db(tmp_path / "d") as db:
        vol = db.cluster._v
        vol.begin_replace("n3", "n7")
        again = vol.begin_replace("n3", "n7")  # e.g. after the caller was interrupted
        assert again.phase == "rebuilding"
        assert again.run() == "replaced"
        done = vol.begin_replace("n3", "n7")
        assert done.phase == "replaced"  # done already: nothing steps twice
        assert db.status()["writer"]["epoch"] == vol.writer.epoch


def test_old_node_retired_only_once_a_write_quorum_knows_step_2(tmp_path):
    """Until a write quorum of the new membership knows step 2, a writer opened after a crash
    could find the change under way with the old node a member: the old node stays. With too
    few nodes up, step 2 is not even taken (its epoch needs strict seals on a write quorum)."""
    with open_db(tmp_path / "d") as db:
        vol = db.cluster._v
        c = vol.begin_replace("n3", "n7")
        while c.phase == "rebuilding":
            c.poll(finish=False)
            if vol.writer.steps.replacement_caught_up("n7"):
                break
        for n in ("n1", "n2", "n4"):  # too few nodes are up to learn step 2 as a write quorum
            db.cluster.stop_node(n)
        with pytest.raises(engine.Unavailable, match="did not reach a write quorum"):
            c.poll()  # step 2 cannot own its epoch on a write quorum: not taken, nothing changed
        assert c.phase == "rebuilding"
        assert vol.writer.membership().next_members is not None  # still the joint membership
        assert "n3" in [n["id"] for n in db.cluster.nodes]  # not retired
        for n in ("n1", "n2", "n4"):
            db.cluster.start_node(n)
        assert c.run() == "replaced"
        assert "n3" not in [n["id"] for n in db.cluster.nodes]


def test_get_many_is_the_read_path_of_both_engines(tmp_path):
    with open_db(tmp_path / "d") as db:
        for i in range(50):
            db.put(b"k%d" % i, b"v%d" % i)
        keys = [b"k%d" % i for i in range(50)] + [b"missing"]
        assert db.get_many(keys) == [b"v%d" % i for i in range(50)] + [None]
        db.cluster.stop_az("a")  # the same answers from the other AZs
        assert db.get_many(keys, quorum=True) == [b"v%d" % i for i in range(50)] + [None]
        assert db.get_many(keys) == [b"v%d" % i for i in range(50)] + [None]
        with pytest.raises(InvalidArgument):
            db.get_many([b"k1", b""])
        assert isinstance(db.cluster._v.writer.reads, ReadPath)


@pytest.mark.parametrize("switch", [{"unsafe_read_any": True}, {"unsafe_write_quorum": 2}, {"weakening": None}])
def test_engine_open_has_no_unsafe_protocol_switches(tmp_path, switch):
    with pytest.raises(InvalidArgument, match="unknown option"):
        engine.open(tmp_path / "d", **switch)
    assert not os.path.exists(tmp_path / "d" / "volume.json")


def test_weakening_is_reached_only_through_the_test_entry(tmp_path):
    from engine.embedded import EmbeddedOptions, EmbeddedVolume
    from engine.head.weakening import NAMED, SAFE

    vol = EmbeddedVolume(str(tmp_path / "d"), EmbeddedOptions(write_timeout_s=DEADLINE_S), weakening=NAMED["read-any"])
    try:
        assert vol.writer.weakening.read_any
    finally:
        vol.close()
    with open_db(tmp_path / "e") as db:
        assert db.cluster._v.writer.weakening is SAFE


def test_a_membership_step_never_shares_an_epoch_with_a_candidate_that_sealed_it(tmp_path):
    """A candidate (a reader promoting itself) sealed epoch E+1 on every node while the old
    writer, at E, began a membership change. The step used to tell the nodes E+1 with the
    lenient `sync_epoch` (equal epochs accepted), so the old writer went on writing at E+1 next to
    the new writer: two writers at one epoch. Now the step seals strictly first: refused, it is
    not taken, and the old writer is fenced at its next write."""
    with open_db(tmp_path / "d") as db:
        vol = db.cluster._v
        w = vol.writer
        db.put(b"k", b"before")
        e = w.epoch
        for n in ("n1", "n2", "n3", "n4", "n5", "n6"):  # the candidate's recovery, first phase
            w.transport.seal(n, e + 1)
        with pytest.raises(engine.Unavailable, match="refused by"):
            w.steps.begin_replace("n3", "n7")
        assert w.epoch == e, "the step must not adopt an epoch another writer sealed"
        assert w.membership().next_members is None
        with pytest.raises((engine.StaleEpoch, engine.WriteIndeterminate)):
            db.put(b"k", b"from the fenced writer")
        assert w.fenced is not None
