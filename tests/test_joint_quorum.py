"""Reads during a membership change ask the core, not a count (finding 2 of issue 8).

Halfway through replacing n1 by n7 the membership has two quorum sets, {n1..n6} and
{n7, n2..n6}. A write is durable on four of *each*. Three replies from any nodes are not enough:
n1, n2 and n7 (the writer's own AZ, so the first asked) are not three of either set, and
{n3, n4, n5, n6} is a write quorum of both that shares no node with them. Three of the new set are
not enough either while n7 is still empty: a record acknowledged before the change is on four of
the old set only. So a read quorum is three of *each* set (`has_read_quorum`).

The second half checks the pure core's protocol decisions against brute force, over every 6-node
membership of seven node ids and every joint membership that replaces one of six by the seventh:
quorum predicates and their intersections (also across the steps of a change), PGCL, the
membership steps and their refusals, catch-up, tail trimming, the fencing decision and write
admission (with the room a put needs on a write quorum, `quorum_limit`).
"""

from __future__ import annotations

from itertools import combinations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.core import membership as steps
from engine.core.admission import Admission, admits, quorum_limit, record_cost_bytes, unit_cost_bytes, write_admission
from engine.core.constants import FLAG_PUT, READ_QUORUM, REPLICAS, WRITE_QUORUM
from engine.core.fencing import FENCE, RESEND, SYNC, on_epoch_refusal
from engine.core.quorum import has_read_quorum, has_write_quorum, pgcl_of
from engine.core.tail import tail_keep_from, tail_trim
from engine.core.types import Membership
from engine.errors import EpochBehind, InvalidArgument, StaleEpoch, Unavailable
from engine.core.placement import protection_group_of
from engine.core.types import Geometry, NodeInfo, default_nodes
from engine.head.writer import Writer, WriterOptions
from engine.node.service import StorageNode
from engine.transport.base import Transport
from engine.transport.faults import FaultyTransport, NetworkFaults
from engine.transport.inprocess import InProcessTransport, Registry

VOLUME_ID = "00000000-0000-4000-8000-000000000008"


class Seven:
    """Six nodes, a seventh (n7, in AZ a) ready to replace n1, and a writer with no background
    threads over the fault transport: the test decides which node is sent what, and when."""

    def __init__(self, path, protection_groups: int = 2) -> None:
        self.geometry = Geometry(protection_groups)
        self.infos = list(default_nodes())
        self.n7 = NodeInfo("n7", "a")
        self.registry = Registry()
        self.nodes = {}
        for info in self.infos + [self.n7]:
            node = StorageNode(str(path / info.id), info, self.geometry, VOLUME_ID, durable=False)
            self.nodes[info.id] = node
            self.registry.set(info.id, node)
        self.faults = NetworkFaults(seed=8)
        self.writer = Writer(
            FaultyTransport(InProcessTransport(self.registry, "writer"), self.faults),
            self.infos + [self.n7], self.geometry, WriterOptions(local_az="a", write_timeout_s=0.5), background=False,
        )
        self.writer.open()

    def send(self, *node_ids: str) -> None:
        for n in node_ids:
            self.writer.send_once(self.writer.links[n])

    def put(self, key: bytes, value: bytes, to: tuple[str, ...]) -> int:
        lsn, _ticket = self.writer.submit(((FLAG_PUT, key, value),))
        self.send(*to)
        return lsn

    def close(self) -> None:
        self.writer.abandon()
        for node in self.nodes.values():
            node.close()


@pytest.fixture
def seven(tmp_path):
    s = Seven(tmp_path)
    yield s
    s.close()


ALL = ("n1", "n2", "n3", "n4", "n5", "n6")


def test_a_write_acknowledged_on_n3_to_n6_during_replace_n1_is_seen_by_quorum_reads_and_scans(seven):
    w = seven.writer
    seven.put(b"k", b"old", ALL)
    w.steps.begin_replace("n1", "n7")
    assert w.ledger.membership.next_members == ("n7", "n2", "n3", "n4", "n5", "n6")
    # n1, n2 and n7 lag: the writer cannot reach them while the write is sent...
    seven.faults.blocked = {("writer", n) for n in ("n1", "n2", "n7")}
    lsn = seven.put(b"k", b"new", ("n1", "n2", "n7", "n3", "n4", "n5", "n6"))
    assert w.ledger.vdl >= lsn, "four of each quorum set hold it: acknowledged"
    # ...then they answer again (heartbeats), still without the record: no gossip runs here.
    seven.faults.heal()
    seven.send("n1", "n2", "n7")
    assert all(w.links[n].up for n in ("n1", "n2", "n7"))
    pg = protection_group_of(b"k", seven.geometry.protection_groups)
    assert all(seven.nodes[n].read(pg, b"k", w.ledger.vdl, 0, w.epoch).value != b"new" for n in ("n1", "n2", "n7"))

    assert w.get(b"k", quorum=True) == b"new"
    assert dict(w.scan(b"k", b"l", quorum=True)) == {b"k": b"new"}
    assert w.get(b"k") == b"new"


def test_a_quorum_read_that_cannot_reach_a_read_quorum_is_unavailable_and_names_who_answered(seven):
    w = seven.writer
    seven.put(b"k", b"v", ALL)
    w.steps.begin_replace("n1", "n7")
    # Only n1, n2 and n7 answer: three nodes, but not three of either quorum set.
    seven.faults.blocked = {("writer", n) for n in ("n3", "n4", "n5", "n6")}
    with pytest.raises(Exception) as got:
        w.get(b"k", quorum=True)
    assert type(got.value).__name__ == "Unavailable"
    assert "n1, n2, n7" in str(got.value)
    with pytest.raises(Exception) as got:
        list(w.scan(b"a", None, quorum=True))
    assert type(got.value).__name__ == "Unavailable"
    assert "n1, n2, n7" in str(got.value)


def test_a_write_acknowledged_before_the_change_is_seen_while_the_new_node_is_still_empty(seven):
    """Three of the *new* set are not a read quorum while n7 holds nothing: a record acknowledged
    before the change is on four of the old set only, and {n7, n3, n4} can miss all four."""
    w = seven.writer
    seven.put(b"k", b"old", ALL)
    seven.faults.blocked = {("writer", n) for n in ("n3", "n4")}
    lsn = seven.put(b"k", b"new", ALL)  # acknowledged by n1, n2, n5, n6
    assert w.ledger.vdl >= lsn
    seven.faults.heal()
    seven.send("n3", "n4")  # back, without the record (the tail was trimmed; no gossip here)
    w.steps.begin_replace("n1", "n7")
    seven.faults.blocked = {("writer", n) for n in ("n1", "n2")}  # n1 failed for good, n2 is down too
    assert w.get(b"k", quorum=True) == b"new"
    assert dict(w.scan(b"k", b"l", quorum=True)) == {b"k": b"new"}


def test_recovery_re_replication_needs_a_write_quorum_of_both_sets(seven):
    """Finding 3: acks from n1..n4 are four nodes but only three of {n7, n2..n6}."""
    w = seven.writer
    seven.put(b"k", b"v1", ALL)
    w.steps.begin_replace("n1", "n7")
    # Durable once n5 holds it (four of each set); n5 was told the VDL before that, so every
    # node's VDL hint is below it and a new writer must re-replicate it.
    lsn = seven.put(b"k", b"v2", ("n1", "n2", "n3", "n4", "n5"))
    assert w.ledger.vdl >= lsn
    w.abandon()

    class RefuseAppends(Transport):
        # Seal and epoch sync reach everybody; only recovery's appends to n5, n6, n7 are lost.
        source = "writer2"

        def _call(self, node, method, *args):
            if method == "append" and node in ("n5", "n6", "n7"):
                raise Unavailable(f"append to {node} lost")
            return inner._call(node, method, *args)

    inner = InProcessTransport(seven.registry, "writer2")
    second = Writer(RefuseAppends(), seven.infos + [seven.n7], seven.geometry, WriterOptions(local_az="a"), background=False)
    with pytest.raises(Unavailable, match="re-replicate"):
        second.open()
    # With the appends back, the same recovery succeeds and the acknowledged value is there.
    third = Writer(inner, seven.infos + [seven.n7], seven.geometry, WriterOptions(local_az="a"), background=False)
    third.open()
    assert third.recovery["replicated_records"] >= 1
    assert third.get(b"k", quorum=True) == b"v2"
    third.abandon()


# --- brute force over every membership of seven node ids ----------------------------------------
NODES = tuple(f"n{i}" for i in range(1, 8))
SIX_SETS = tuple(tuple(n for n in NODES if n != out) for out in NODES)
PLAIN = tuple(Membership(0, six) for six in SIX_SETS)
JOINT = tuple(
    Membership(1, six, tuple(new if n == old else n for n in six))
    for six in SIX_SETS
    for new in NODES
    if new not in six
    for old in six
)
EVERY = PLAIN + JOINT
SUBSETS = tuple(frozenset(c) for size in range(len(NODES) + 1) for c in combinations(NODES, size))


def test_there_are_seven_plain_and_forty_two_joint_memberships():
    assert len(PLAIN) == 7 and len(JOINT) == 7 * 6 and len(set(JOINT)) == len(JOINT) and len(SUBSETS) == 128


def brute_write(nodes, m) -> bool:
    return all(any(set(c) <= nodes for c in combinations(qs, WRITE_QUORUM)) for qs in m.quorum_sets)


def brute_read(nodes, m) -> bool:
    return all(any(set(c) <= nodes for c in combinations(qs, READ_QUORUM)) for qs in m.quorum_sets)


def name(m: Membership) -> str:
    return "/".join(m.members) + ("" if m.next_members is None else "+" + "/".join(m.next_members))


@pytest.mark.parametrize("m", EVERY, ids=name)
def test_quorum_predicates_agree_with_brute_force_over_every_subset(m):
    for nodes in SUBSETS:
        assert has_write_quorum(nodes, m) == brute_write(nodes, m), sorted(nodes)
        assert has_read_quorum(nodes, m) == brute_read(nodes, m), sorted(nodes)


@pytest.mark.parametrize("m", EVERY, ids=name)
def test_every_write_quorum_meets_every_read_quorum_and_every_write_quorum(m):
    writes = [s for s in SUBSETS if has_write_quorum(s, m)]
    reads = [s for s in SUBSETS if has_read_quorum(s, m)]
    assert writes and reads
    for w in writes:
        assert all(w & r for r in reads), sorted(w)
        assert all(w & w2 for w2 in writes), sorted(w)


@pytest.mark.parametrize("m", PLAIN, ids=name)
def test_a_change_loses_no_acknowledged_write_at_any_step(m):
    """What was acknowledged at one step is seen by a read quorum of the next: begin (the new node
    holds nothing yet), finish (only once the new node caught up, so it holds it too), revert."""
    for old in m.members:
        for new in (n for n in NODES if n not in m.members):
            joint = steps.begin_replace(m, old, new)
            done, back = steps.finish_replace(joint), steps.revert_replace(joint)
            for w in (s for s in SUBSETS if has_write_quorum(s, m)):
                held = w - {new}  # acknowledged before the change: the new node has none of it
                assert all(held & r for r in SUBSETS if has_read_quorum(r, joint)), (old, new, sorted(w))
                assert all((held | {new}) & r for r in SUBSETS if has_read_quorum(r, done)), (old, new, sorted(w))
                assert all(held & r for r in SUBSETS if has_read_quorum(r, back)), (old, new, sorted(w))
            for w in (s for s in SUBSETS if has_write_quorum(s, joint)):
                assert all(w & r for r in SUBSETS if has_read_quorum(r, done)), (old, new, sorted(w))
                assert all(w & r for r in SUBSETS if has_read_quorum(r, back)), (old, new, sorted(w))


def test_three_of_the_new_set_would_miss_a_write_acknowledged_before_the_change():
    before = PLAIN[6]  # n1..n6
    joint = steps.begin_replace(before, "n1", "n7")
    acknowledged = {"n1", "n2", "n5", "n6"}
    assert has_write_quorum(acknowledged, before)
    three_of_new = {"n7", "n3", "n4"}
    assert not three_of_new & acknowledged
    assert not has_read_quorum(three_of_new, joint)
    assert not has_read_quorum({"n1", "n2", "n7"}, joint)
    assert has_read_quorum({"n2", "n3", "n4"}, joint)


def brute_pgcl(scls, m) -> int:
    top = max([0, *scls.values()])
    return max(
        level for level in range(top + 1)
        if all(sum(scls.get(n, 0) >= level for n in qs) >= WRITE_QUORUM for qs in m.quorum_sets)
    )


@settings(deadline=None, max_examples=400)
@given(m=st.sampled_from(EVERY), scls=st.dictionaries(st.sampled_from(NODES), st.integers(0, 12)))
def test_pgcl_agrees_with_brute_force_over_scl_assignments(m, scls):
    assert pgcl_of(scls, m) == brute_pgcl(scls, m)


# --- membership steps ---------------------------------------------------------------------------
WIDER = NODES + ("n8",)


@pytest.mark.parametrize("m", PLAIN, ids=name)
def test_membership_steps_and_their_refusals(m):
    for old in WIDER:
        for new in WIDER:
            if old in m.members and new not in m.members:
                joint = steps.begin_replace(m, old, new)
                assert joint.members == m.members and joint.epoch == m.epoch
                assert joint.next_members == tuple(new if n == old else n for n in m.members)
                assert steps.replacing(joint) == (old, new)
                assert steps.finish_replace(joint) == Membership(m.epoch, joint.next_members)
                assert steps.revert_replace(joint) == m
                with pytest.raises(InvalidArgument, match="already under way"):
                    steps.begin_replace(joint, old, new)
            else:
                with pytest.raises(InvalidArgument):
                    steps.begin_replace(m, old, new)
    assert steps.replacing(m) is None
    for step in (steps.finish_replace, steps.revert_replace):
        with pytest.raises(InvalidArgument, match="no membership change"):
            step(m)


# --- catch-up -----------------------------------------------------------------------------------
@settings(deadline=None, max_examples=400)
@given(data=st.data(), pgs=st.integers(1, 6))
def test_catch_up_agrees_with_brute_force(data, pgs):
    tails = data.draw(st.lists(st.integers(0, 20), min_size=pgs, max_size=pgs))
    scls = data.draw(st.lists(st.none() | st.integers(0, 25), min_size=pgs, max_size=pgs))
    caught = steps.replacement_caught_up(scls, tails)
    assert caught == all(s is not None and s >= t for s, t in zip(scls, tails))
    fraction, lag = steps.catch_up_progress(scls, tails)
    missing = sum(1 for s, t in zip(scls, tails) for lsn in range(1, t + 1) if (s or 0) < lsn)
    assert lag == missing and 0.0 <= fraction <= 1.0
    assert fraction == (1.0 if sum(tails) == 0 else (sum(tails) - missing) / sum(tails))
    if caught:
        assert (fraction, lag) == (1.0, 0)


# --- tail trimming ------------------------------------------------------------------------------
def brute_trim(base, length, vcl, live, records_max, batch_min) -> int:
    """LSN by LSN: a record may go once durable and sent to every live node, or, when the slowest
    live node lags more than records_max behind the tail's end, once durable and more than half
    the bound below VCL; then the batching rule."""
    end = base + length
    needed_from = min(vcl, min(live, default=vcl)) + 1  # the first record not durable or not sent to all
    overflow = end - needed_from > records_max

    def may_drop(lsn):
        return lsn <= vcl and (lsn < needed_from or (overflow and lsn < vcl + 1 - records_max // 2))

    keep = base
    while keep < end and may_drop(keep):
        keep += 1
    drop = keep - base
    return drop if drop > batch_min or (drop > 0 and drop == length) else 0


def test_tail_trimming_agrees_with_brute_force_and_never_drops_what_is_not_durable():
    checked = 0
    for base in (1, 2, 5):
        for length in range(0, 11):
            for vcl in range(base - 1, base + length):
                for live in [()] + [(a,) for a in range(0, base + length + 1)] + [
                    (a, b) for a in (0, base, vcl, base + length - 1) for b in range(base - 1, base + length)
                ]:
                    for records_max in (2, 4, 8):
                        for batch_min in (1, 3):
                            drop = tail_trim(base, length, vcl, live, records_max, batch_min)
                            assert drop == brute_trim(base, length, vcl, live, records_max, batch_min), (
                                base, length, vcl, live, records_max, batch_min)
                            assert 0 <= drop <= length
                            assert base + drop - 1 <= vcl  # nothing above VCL is ever dropped
                            if base + length - min(vcl, min(live, default=vcl)) - 1 <= records_max:
                                assert all(base + drop - 1 <= s for s in live) or drop == 0
                            checked += 1
    assert checked > 10_000


def test_a_slow_live_node_keeps_the_tail_until_the_bound():
    # Nodes sent up to 100 and 40; VCL 100: the records above 40 stay for the slow one...
    assert tail_keep_from(100, [100, 40], 101, records_max=200) == 41
    # ...until it lags more than the bound behind: then only half the bound below VCL stays.
    assert tail_keep_from(1000, [1000, 40], 1001, records_max=200) == 901
    # A down node is not in live_sent: the tail goes at VCL.
    assert tail_keep_from(100, [100], 101, records_max=200) == 101


# --- fencing ------------------------------------------------------------------------------------
def test_the_fencing_decision_for_every_epoch_pair():
    for current in range(1, 6):
        for sent in range(1, current + 1):
            assert on_epoch_refusal(StaleEpoch("x"), sent, current) == (FENCE if sent == current else RESEND)
            assert on_epoch_refusal(EpochBehind("x"), sent, current) == SYNC
    with pytest.raises(AssertionError):
        on_epoch_refusal(Unavailable("x"), 1, 1)


# --- write admission ----------------------------------------------------------------------------
node_sets = st.frozensets(st.sampled_from(NODES))


@settings(deadline=None, max_examples=600)
@given(m=st.sampled_from(EVERY), up=node_sets, full=node_sets, low=node_sets, puts=st.booleans())
def test_write_admission_agrees_with_its_definition(m, up, full, low, puts):
    adm = write_admission(up, full, low, m)
    if not brute_write(up, m):
        assert adm is Admission.UNREACHABLE
    elif not brute_write(up - full, m):
        assert adm is Admission.FULL
    elif not brute_write(up - full - low, m):
        assert adm is Admission.DELETES_ONLY
    else:
        assert adm is Admission.ALL
    # A unit is admitted only where a write quorum can store it: puts need room, deletes a reserve.
    if admits(adm, puts):
        assert brute_write((up - full - low) if puts else (up - full), m)
    assert len(m.members) == REPLICAS


@settings(deadline=None, max_examples=600)
@given(m=st.sampled_from(EVERY), limits=st.dictionaries(st.sampled_from(NODES), st.integers(0, 6)))
def test_quorum_limit_is_the_most_a_write_quorum_of_nodes_can_hold(m, limits):
    """The largest L whose nodes with a limit of at least L are a write quorum (-1: none is)."""
    fits = [v for v in set(limits.values()) if brute_write({n for n, x in limits.items() if x >= v}, m)]
    assert quorum_limit(limits, m) == (max(fits) if fits else -1)


@settings(deadline=None, max_examples=200)
@given(ops=st.lists(st.tuples(st.sampled_from([FLAG_PUT, 2]), st.binary(min_size=1, max_size=40), st.binary(max_size=300)),
                    min_size=1, max_size=5))
def test_a_units_cost_is_the_sum_of_its_records_costs(ops):
    assert unit_cost_bytes(ops) == sum(record_cost_bytes(len(k), len(v)) for _f, k, v in ops)
    assert all(record_cost_bytes(len(k), len(v)) >= 2 * len(k) + len(v) for _f, k, v in ops)
