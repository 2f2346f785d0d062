"""The quorum core against the paper's sentences and against brute force.

Aurora's storage promises, as this module states them:

* a record is durable once four of six segments hold it (during a membership change: four of
  each quorum set);
* any three segments include one that holds every durable record, so a read of three sees it;
* the writer acknowledges a write once VDL reaches it; VDL lands only on the last record of a
  batch, never goes back, and never passes a record that is not durable;
* the writer never runs more than LAL LSNs ahead of VDL.

Each clever function is checked against the slowest possible reading of its definition
(subsets enumerated, levels tried one by one), and the writer's ledger is driven by a hypothesis
state machine against a model of which records each segment physically holds.
"""

from __future__ import annotations

import random
from itertools import combinations

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from engine.core.constants import (
    AZS,
    NODES_PER_AZ,
    READ_QUORUM,
    REPLICAS,
    WRITE_QUORUM,
)
from engine.core.placement import azs_of
from engine.core.quorum import (
    VolumeDurability,
    has_read_quorum,
    has_write_quorum,
    merge_read,
    merge_scan,
    pgcl_of,
    quorum_point,
)
from engine.core.types import Membership, ReadReply, VersionEntry, default_nodes
from engine.errors import ResourceExhausted

SIX = tuple(n.id for n in default_nodes())  # n1..n6, two per AZ
SEVENTH = "n7"  # the node a membership change brings in (Aurora's ABCDEF -> ABCDEG)
SEVEN = SIX + (SEVENTH,)
PLAIN = Membership(0, SIX)


def transition(replaced: str) -> Membership:
    """The membership halfway through replacing `replaced` by the seventh node."""
    return Membership(1, SIX, tuple(SEVENTH if n == replaced else n for n in SIX))


ALL_MEMBERSHIPS = (PLAIN,) + tuple(transition(n) for n in SIX)


def subsets(nodes):
    for size in range(len(nodes) + 1):
        yield from combinations(nodes, size)


@st.composite
def memberships(draw) -> Membership:
    """A membership over some 6 of 7 node ids; half the time halfway through a change."""
    order = draw(st.permutations(SEVEN))
    members = tuple(order[:REPLICAS])
    if not draw(st.booleans()):
        return Membership(0, members)
    out = draw(st.integers(0, REPLICAS - 1))
    return Membership(1, members, members[:out] + (order[REPLICAS],) + members[out + 1 :])


scl_maps = st.dictionaries(st.sampled_from(SEVEN), st.integers(0, 12))


# --- brute-force oracles ---------------------------------------------------------------------
def brute_quorum_point(scls, members, quorum) -> int:
    """The highest L such that at least `quorum` members hold their chain up to L, trying every L."""
    top = max([0, *scls.values()]) + 1
    return max(level for level in range(top + 1) if sum(scls.get(m, 0) >= level for m in members) >= quorum)


def brute_pgcl(scls, membership) -> int:
    """The highest L held up to by a write quorum of *every* quorum set, trying every L."""
    top = max([0, *scls.values()]) + 1
    return max(
        level
        for level in range(top + 1)
        if all(sum(scls.get(m, 0) >= level for m in qs) >= WRITE_QUORUM for qs in membership.quorum_sets)
    )


def brute_write_quorum(nodes, membership) -> bool:
    """`nodes` contain some WRITE_QUORUM members of every quorum set (subsets enumerated)."""
    have = set(nodes)
    return all(any(set(c) <= have for c in combinations(qs, WRITE_QUORUM)) for qs in membership.quorum_sets)


def brute_read_quorum(nodes, membership) -> bool:
    """`nodes` contain some READ_QUORUM members of every quorum set (subsets enumerated): during a
    change the new node may not hold what was acknowledged before it, so three of one set are not
    enough (see tests/test_joint_quorum.py)."""
    have = set(nodes)
    return all(any(set(c) <= have for c in combinations(qs, READ_QUORUM)) for qs in membership.quorum_sets)


# --- 1. quorum arithmetic --------------------------------------------------------------------
@settings(deadline=None, max_examples=300)
@given(scls=scl_maps, members=st.permutations(SEVEN).map(lambda p: p[:REPLICAS]), quorum=st.integers(1, REPLICAS))
def test_quorum_point_is_the_highest_lsn_held_by_a_quorum(scls, members, quorum):
    assert quorum_point(scls, members, quorum) == brute_quorum_point(scls, members, quorum)


@settings(deadline=None, max_examples=300)
@given(scls=scl_maps, membership=memberships())
def test_pgcl_is_durable_on_four_segments_of_every_quorum_set(scls, membership):
    assert pgcl_of(scls, membership) == brute_pgcl(scls, membership)


def test_a_record_is_durable_once_four_of_six_segments_hold_it():
    three = {"n1": 7, "n3": 7, "n5": 7}
    assert pgcl_of(three, PLAIN) == 0
    assert pgcl_of({**three, "n6": 7}, PLAIN) == 7
    # a segment outside the membership does not count
    assert pgcl_of({**three, SEVENTH: 7}, PLAIN) == 0


def test_during_a_membership_change_a_record_needs_four_of_both_sets():
    change = transition("n6")  # ABCDEF -> ABCDE + n7
    assert pgcl_of({"n1": 9, "n2": 9, "n3": 9, "n6": 9}, change) == 0  # 4 old, 3 new
    assert pgcl_of({"n1": 9, "n2": 9, "n3": 9, SEVENTH: 9}, change) == 0  # 3 old, 4 new
    assert pgcl_of({"n1": 9, "n2": 9, "n3": 9, "n4": 9}, change) == 9  # 4 of each


@pytest.mark.parametrize("membership", ALL_MEMBERSHIPS, ids=lambda m: "plain" if m.next_members is None else "change")
def test_quorum_predicates_match_brute_force_over_every_subset_of_the_seven_nodes(membership):
    for nodes in subsets(SEVEN):
        assert has_write_quorum(nodes, membership) == brute_write_quorum(nodes, membership), nodes
        assert has_read_quorum(nodes, membership) == brute_read_quorum(nodes, membership), nodes


@settings(deadline=None, max_examples=200)
@given(nodes=st.lists(st.sampled_from(SEVEN + ("stranger",)), max_size=12), membership=memberships())
def test_quorum_predicates_ignore_repeats_and_strangers(nodes, membership):
    assert has_write_quorum(iter(nodes), membership) == brute_write_quorum(nodes, membership)
    assert has_read_quorum(iter(nodes), membership) == brute_read_quorum(nodes, membership)


def test_any_write_quorum_and_any_read_quorum_of_six_share_a_segment():
    for w in combinations(SIX, WRITE_QUORUM):
        for r in combinations(SIX, READ_QUORUM):
            assert set(w) & set(r), (w, r)


def test_any_two_write_quorums_of_six_share_a_segment():
    for w1 in combinations(SIX, WRITE_QUORUM):
        for w2 in combinations(SIX, WRITE_QUORUM):
            assert set(w1) & set(w2), (w1, w2)


def test_the_quorum_sizes_are_tight():
    # One segment fewer in a read would miss a write quorum; three segments are not a write quorum,
    # since two sets of three can be disjoint.
    smaller = READ_QUORUM - 1
    assert any(not set(w) & set(r) for w in combinations(SIX, WRITE_QUORUM) for r in combinations(SIX, smaller))
    assert any(not set(a) & set(b) for a in combinations(SIX, READ_QUORUM) for b in combinations(SIX, READ_QUORUM))


@pytest.mark.parametrize("membership", ALL_MEMBERSHIPS, ids=lambda m: "plain" if m.next_members is None else "change")
def test_quorums_intersect_during_a_membership_change_too(membership):
    all_subsets = [frozenset(s) for s in subsets(SEVEN)]
    writes = [s for s in all_subsets if has_write_quorum(s, membership)]
    reads = [s for s in all_subsets if has_read_quorum(s, membership)]
    assert writes and reads
    for w in writes:
        assert all(w & r for r in reads), w
        assert all(w & w2 for w2 in writes), w


def test_losing_an_az_keeps_writes_and_an_az_plus_one_keeps_reads():
    by_az = azs_of(default_nodes())
    assert sorted(by_az) == list(AZS) and all(len(v) == NODES_PER_AZ for v in by_az.values())
    for az, lost in by_az.items():
        left = [n for n in SIX if n not in lost]
        assert has_write_quorum(left, PLAIN), az
        for one_more in left:
            rest = [n for n in left if n != one_more]
            assert not has_write_quorum(rest, PLAIN), (az, one_more)
            assert has_read_quorum(rest, PLAIN), (az, one_more)


# --- 2. the writer's ledger ------------------------------------------------------------------
def a_ledger(**kw) -> VolumeDurability:
    kw.setdefault("lal", 100)
    return VolumeDurability(kw.pop("protection_groups", 2), kw.pop("membership", PLAIN), **kw)


def test_the_writer_acknowledges_a_write_once_four_segments_hold_it():
    ledger = a_ledger(protection_groups=1)
    [(lsn, prev)] = ledger.allocate([0])
    assert (lsn, prev) == (1, 0)
    for node in ("n1", "n2", "n3"):
        assert ledger.record_scl(node, 0, 1) is False
    assert ledger.vdl == 0
    assert ledger.record_scl("n4", 0, 1) is True
    assert (ledger.vcl, ledger.vdl, ledger.read_tails) == (1, 1, [1])
    # the fifth and sixth segments are not waited for, and change nothing
    assert ledger.record_scl("n5", 0, 1) is False and ledger.vdl == 1


def test_an_atomic_batch_is_visible_whole_or_not_at_all():
    ledger = a_ledger(protection_groups=2)
    assert ledger.allocate([0, 1, 0]) == [(1, 0), (2, 0), (3, 1)]
    for node in SIX[:4]:
        ledger.record_scl(node, 0, 3)  # PG 0 has the whole batch's records on four segments
    assert (ledger.vcl, ledger.vdl) == (1, 0)  # LSN 2 of PG 1 is missing: nothing is exposed
    for node in SIX[2:]:
        ledger.record_scl(node, 1, 2)
    assert (ledger.vcl, ledger.vdl, ledger.read_tails) == (3, 3, [3, 2])


def test_a_wiped_segment_does_not_make_vdl_go_back():
    ledger = a_ledger(protection_groups=1)
    ledger.allocate([0])
    for node in SIX[:4]:
        ledger.record_scl(node, 0, 1)
    assert ledger.vdl == 1
    assert ledger.record_scl("n1", 0, 0) is False  # n1 lost its disk and reports an empty chain
    assert (ledger.vdl, ledger.pgcl) == (1, [1])


def test_lal_bounds_how_far_the_writer_runs_ahead_of_vdl():
    ledger = a_ledger(protection_groups=1, lal=3, vdl=10, next_lsn=15, tails=[9])
    assert ledger.in_flight() == 0 and ledger.can_allocate(3) and not ledger.can_allocate(4)
    with pytest.raises(ResourceExhausted):
        ledger.allocate([0, 0, 0, 0])
    assert ledger.next_lsn == 15
    assert ledger.allocate([0, 0]) == [(15, 9), (16, 15)]
    assert not ledger.can_allocate(2)
    for node in SIX[:4]:
        ledger.record_scl(node, 0, 16)
    assert (ledger.vdl, ledger.in_flight()) == (16, 0) and ledger.can_allocate(3)


class WriterLedger(RuleBasedStateMachine):
    """`VolumeDurability` against a model of which records each segment physically holds.

    Records are allocated in batches of random PGs, delivered one by one or a batch at a time to
    random segments (so segments have holes and receive records out of order), and segments report
    SCLs computed from what they hold, sometimes late (an older SCL again), sometimes after losing
    their disk. After every step the ledger's figures are checked against brute force."""

    @initialize(data=st.data())
    def start(self, data):
        draw = data.draw
        self.protection_groups = draw(st.integers(1, 3), label="protection_groups")
        self.membership = draw(memberships(), label="membership")
        self.nodes = self.membership.all_nodes
        self.lal = draw(st.integers(1, 8), label="lal")
        # Start where a recovery left off: VDL, the first LSN above any truncation, per-PG tails.
        self.vdl0 = draw(st.integers(0, 6), label="vdl")
        self.next0 = self.vdl0 + 1 + draw(st.integers(0, 4), label="truncated")
        picked = draw(st.lists(st.integers(0, self.vdl0), min_size=self.protection_groups, max_size=self.protection_groups))
        self.tails0 = [t if t == 0 or picked.index(t) == pg else 0 for pg, t in enumerate(picked)]
        self.ledger = VolumeDurability(
            self.protection_groups, self.membership, vdl=self.vdl0, next_lsn=self.next0, tails=self.tails0, lal=self.lal
        )
        self.pg_of: dict[int, int] = {}
        self.lsns_of = [[] for _ in range(self.protection_groups)]
        self.batches: list[tuple[int, int]] = []
        self.cpls: set[int] = set()
        segments = [(n, pg) for n in self.nodes for pg in range(self.protection_groups)]
        self.held = {s: set() for s in segments}
        self.has_prefix = {s: True for s in segments}  # holds the chain up to the PG's start tail
        self.ever_held: dict[int, set[str]] = {}
        self.reported: dict[tuple[str, int], int] = {}  # the highest SCL each segment reported
        self.history: dict[tuple[str, int], list[int]] = {}  # every SCL a segment reported
        self.wiped: set[tuple[str, int]] = set()
        self.disks_lost = 0
        self.vdls_seen = [self.vdl0]

    # --- the model ------------------------------------------------------------------------
    def chain(self, node: str, pg: int) -> int:
        """The segment's SCL: the highest LSN up to which it holds its PG's chain, no holes."""
        if not self.has_prefix[(node, pg)]:
            return 0
        scl = self.tails0[pg]
        for lsn in self.lsns_of[pg]:
            if lsn not in self.held[(node, pg)]:
                break
            scl = lsn
        return scl

    def deliver(self, node: str, lsn: int) -> None:
        self.held[(node, self.pg_of[lsn])].add(lsn)
        self.ever_held[lsn].add(node)

    def report(self, node: str, pg: int, scl: int) -> None:
        before = self.ledger.vdl
        advanced = self.ledger.record_scl(node, pg, scl)
        assert advanced == (self.ledger.vdl > before)
        if advanced:
            event("VDL advanced")
        self.note(node, pg, scl)

    def note(self, node, pg, scl):
        self.reported[(node, pg)] = max(scl, self.reported.get((node, pg), -1))
        self.history.setdefault((node, pg), []).append(scl)

    # --- rules ----------------------------------------------------------------------------
    @rule(data=st.data())
    def allocate(self, data):
        count = data.draw(st.integers(1, self.lal + 2), label="count")
        pgs = data.draw(st.lists(st.integers(0, self.protection_groups - 1), min_size=count, max_size=count), label="pgs")
        next_lsn = self.ledger.next_lsn
        in_flight = next_lsn - 1 - max(self.ledger.vdl, self.next0 - 1)
        fits = in_flight + count <= self.lal
        assert self.ledger.can_allocate(count) == fits
        if not fits:
            with pytest.raises(ResourceExhausted):
                self.ledger.allocate(pgs)
            event("LAL refused an allocation")
            assert self.ledger.next_lsn == next_lsn and self.ledger.in_flight() == in_flight
            return
        out = self.ledger.allocate(pgs)
        expected = []
        for i, pg in enumerate(pgs):
            lsn = next_lsn + i
            prev = self.lsns_of[pg][-1] if self.lsns_of[pg] else self.tails0[pg]
            expected.append((lsn, prev))
            self.pg_of[lsn] = pg
            self.lsns_of[pg].append(lsn)
            self.ever_held[lsn] = set()
        assert out == expected  # consecutive LSNs, each with its PG's backlink
        self.batches.append((next_lsn, next_lsn + count - 1))
        self.cpls.add(next_lsn + count - 1)

    @precondition(lambda self: self.pg_of)
    @rule(data=st.data())
    def deliver_one(self, data):
        lsn = data.draw(st.sampled_from(sorted(self.pg_of)), label="lsn")
        node = data.draw(st.sampled_from(self.nodes), label="node")
        self.deliver(node, lsn)

    @precondition(lambda self: self.batches)
    @rule(data=st.data())
    def deliver_batch(self, data):
        first, last = data.draw(st.sampled_from(self.batches), label="batch")
        nodes = data.draw(st.sets(st.sampled_from(self.nodes)), label="to")
        for node in sorted(nodes):
            for lsn in range(first, last + 1):
                self.deliver(node, lsn)

    @precondition(lambda self: self.pg_of)
    @rule(data=st.data())
    def flush(self, data):
        """The writer's common case: some nodes get every record up to an LSN and answer."""
        upto = data.draw(st.sampled_from(sorted(self.pg_of)), label="up to")
        count = data.draw(st.integers(0, len(self.nodes)) | st.integers(WRITE_QUORUM + 1, len(self.nodes)), label="how many nodes")
        nodes = data.draw(st.permutations(self.nodes), label="nodes")[:count]
        for node in nodes:
            for lsn in range(self.next0, upto + 1):
                self.deliver(node, lsn)
            for pg in range(self.protection_groups):
                self.report(node, pg, self.chain(node, pg))

    @rule(data=st.data())
    def segment_reports(self, data):
        node = data.draw(st.sampled_from(self.nodes), label="node")
        pg = data.draw(st.integers(0, self.protection_groups - 1), label="pg")
        self.report(node, pg, self.chain(node, pg))

    @rule(data=st.data())
    def node_reports_every_pg(self, data):
        node = data.draw(st.sampled_from(self.nodes), label="node")
        scls = [self.chain(node, pg) for pg in range(self.protection_groups)]
        before = self.ledger.vdl
        # an append reply carries one SCL per PG; entries past the volume's PGs are ignored
        advanced = self.ledger.record_scls(node, scls + [10**9])
        assert advanced == (self.ledger.vdl > before)
        for pg, scl in enumerate(scls):
            self.note(node, pg, scl)

    @precondition(lambda self: self.history)
    @rule(data=st.data())
    def a_late_reply_arrives(self, data):
        node, pg = data.draw(st.sampled_from(sorted(self.history)), label="segment")
        scl = data.draw(st.sampled_from(self.history[(node, pg)]), label="old scl")
        self.report(node, pg, scl)

    @precondition(lambda self: self.disks_lost < 2)  # more would stop progress, not test more
    @rule(data=st.data())
    def node_loses_its_disk(self, data):
        node = data.draw(st.sampled_from(self.nodes), label="node")
        self.disks_lost += 1
        event("a node lost its disk")
        for pg in range(self.protection_groups):
            self.held[(node, pg)] = set()
            self.has_prefix[(node, pg)] = self.tails0[pg] == 0
            self.wiped.add((node, pg))
            self.report(node, pg, self.chain(node, pg))

    @rule(data=st.data())
    def gossip_fills_a_segment(self, data):
        node = data.draw(st.sampled_from(self.nodes), label="node")
        pg = data.draw(st.integers(0, self.protection_groups - 1), label="pg")
        for peer in self.nodes:
            if peer != node:
                for lsn in self.held[(peer, pg)]:
                    self.deliver(node, lsn)
        self.has_prefix[(node, pg)] = True

    # --- oracles --------------------------------------------------------------------------
    def brute_vcl(self) -> int:
        pgcl = [
            brute_pgcl({n: self.reported.get((n, pg), 0) for n in self.nodes}, self.membership)
            for pg in range(self.protection_groups)
        ]
        vcl = self.next0 - 1
        for lsn in range(self.next0, self.ledger.next_lsn):
            if lsn > pgcl[self.pg_of[lsn]]:
                break
            vcl = lsn
        self._pgcl = pgcl
        return vcl

    @invariant()
    def figures_match_brute_force(self):
        ledger = self.ledger
        vdl = ledger.vdl
        # VDL never goes back, lands on a CPL (or where recovery left it) and never inside a batch
        assert vdl >= self.vdls_seen[-1]
        self.vdls_seen.append(vdl)
        assert vdl == self.vdl0 or vdl in self.cpls
        assert not any(first <= vdl < last for first, last in self.batches)
        # durability: every record at or below VDL was on a write quorum of every quorum set,
        # both physically and by what the segments told the writer
        for lsn in range(self.next0, vdl + 1):
            pg = self.pg_of[lsn]
            for qs in self.membership.quorum_sets:
                assert len(self.ever_held[lsn] & set(qs)) >= WRITE_QUORUM, (lsn, qs)
                assert sum(self.reported.get((n, pg), 0) >= lsn for n in qs) >= WRITE_QUORUM, (lsn, qs)
        # VCL and VDL are exactly what brute force says: nothing durable is held back
        vcl = self.brute_vcl()
        assert ledger.vcl == vcl
        assert vdl == max([self.vdl0] + [c for c in self.cpls if c <= vcl])
        assert ledger.undurable_count() == sum(lsn > self._pgcl[pg] for lsn, pg in self.pg_of.items())
        # read tails and the segments that can serve read point VDL alone
        for pg in range(self.protection_groups):
            tail = max([self.tails0[pg]] + [lsn for lsn in self.lsns_of[pg] if lsn <= vdl])
            assert ledger.read_tails[pg] == tail
            complete = ledger.complete_segments(pg)
            assert sorted(complete) == sorted(n for n in self.nodes if self.reported.get((n, pg), -1) >= tail)
            for n in complete:
                if (n, pg) not in self.wiped:
                    assert self.chain(n, pg) >= tail, (n, pg)
        # LAL
        in_flight = ledger.next_lsn - 1 - max(vdl, self.next0 - 1)
        assert ledger.in_flight() == in_flight and 0 <= in_flight <= self.lal


WriterLedger.TestCase.settings = settings(deadline=None, max_examples=200, stateful_step_count=50)
test_the_writer_ledger_against_a_model_of_segments = WriterLedger.TestCase


# --- 3. merging a quorum read ----------------------------------------------------------------
KEYS = (b"a", b"b", b"c")


@st.composite
def key_histories(draw, keys=KEYS):
    """Versions of some keys at distinct LSNs, each on the segments that hold it, and a read point.

    Versions at or below the read point are durable (on at least four of six segments); a
    segment's reply at the read point is the newest version it holds at or below it."""
    count = draw(st.integers(0, 10))
    lsns = sorted(draw(st.sets(st.integers(1, 60), min_size=count, max_size=count)))
    read_point = draw(st.integers(0, 61))
    versions = []
    for lsn in lsns:
        key = draw(st.sampled_from(keys))
        deleted = draw(st.booleans())
        value = None if deleted else draw(st.binary(max_size=3))
        low = WRITE_QUORUM if lsn <= read_point else 0
        holders = frozenset(draw(st.sets(st.sampled_from(SIX), min_size=low)))
        versions.append((lsn, key, value, holders))
    return versions, read_point


def newest_held(versions, read_point, node, key):
    seen = [v for v in versions if v[1] == key and v[0] <= read_point and node in v[3]]
    return max(seen, default=None)


@settings(deadline=None, max_examples=150)
@given(history=key_histories(keys=(b"k",)), seed=st.integers(0, 2**32))
def test_a_read_of_any_three_segments_returns_the_newest_durable_version(history, seed):
    order = random.Random(seed)  # the order replies arrive in
    versions, read_point = history
    visible = [v for v in versions if v[0] <= read_point]
    newest = max(visible, default=None)
    for size in range(READ_QUORUM, REPLICAS + 1):
        for nodes in combinations(SIX, size):
            replies = []
            for node in nodes:
                v = newest_held(versions, read_point, node, b"k")
                replies.append(ReadReply(node, 0, None) if v is None else ReadReply(node, v[0], v[2], v[2] is None))
            order.shuffle(replies)
            merged = merge_read(replies)
            if newest is None:
                assert merged is None, nodes
            else:
                assert merged is not None, nodes
                assert (merged.lsn, merged.value, merged.deleted) == (newest[0], newest[2], newest[2] is None), nodes


def test_a_quorum_read_with_no_version_anywhere_finds_nothing():
    assert merge_read([]) is None
    assert merge_read([ReadReply(n, 0, None) for n in SIX[:3]]) is None


@settings(deadline=None, max_examples=150)
@given(history=key_histories(), seed=st.integers(0, 2**32))
def test_a_scan_of_any_three_segments_returns_each_keys_newest_version(history, seed):
    order = random.Random(seed)  # the order replies and entries arrive in
    versions, read_point = history
    expected = []
    for key in sorted(KEYS):
        visible = [v for v in versions if v[1] == key and v[0] <= read_point]
        if visible:
            lsn, _key, value, _holders = max(visible)
            expected.append(VersionEntry(key, lsn, value))  # tombstones stay: value None
    for size in range(READ_QUORUM, REPLICAS + 1):
        for nodes in combinations(SIX, size):
            replies = []
            for node in nodes:
                entries = []
                for key in order.sample(KEYS, len(KEYS)):
                    v = newest_held(versions, read_point, node, key)
                    if v is not None:
                        entries.append(VersionEntry(key, v[0], v[2]))
                replies.append(sorted(entries, key=lambda e: e.key))
            order.shuffle(replies)
            assert merge_scan(replies) == expected, nodes
