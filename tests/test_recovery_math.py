"""Recovery arithmetic against a model of whole volumes, epoch after epoch.

The guarantees, as the paper states them and `engine.core.recovery` promises:

* no acknowledged write is lost: the recovered VDL is at or above the old writer's VDL, as long as
  a read quorum (three segments) of every PG answers the seal;
* the recovered VDL is a consistency point (or the base every node already agreed on), so an
  atomic batch survives whole or not at all;
* every record between the base and the new VDL is in some answer, so it can be re-replicated;
* everything above the new VDL is cut: as far as the old writer could have allocated (VDL + LAL)
  when some segment did not answer, exactly as far as anything is held when all of them did;
  the new writer allocates above the cut;
* a range cut by an earlier recovery stays void: nothing inside it comes back.

The model keeps, for every LSN ever allocated, its record and the set of nodes holding it, each
node's VDL hint and the truncation ranges it knows. A writer epoch allocates batches obeying LAL,
puts acknowledged records on at least four segments and the rest anywhere (or nowhere), then
crashes; a recovery seals whichever nodes answer and is checked against the model; the plan is
then applied (truncate, re-replicate) and the next writer runs on top of it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from engine.core.constants import FLAG_CPL, FLAG_DELETE, FLAG_PUT, READ_QUORUM, REPLICAS, WRITE_QUORUM
from engine.core.recovery import plan_recovery
from engine.core.types import Membership, RecordHeader, SealReply, SegmentSummary, TruncationRange, default_nodes
from engine.errors import Unavailable

NODES = tuple(n.id for n in default_nodes())


def covered(lsn: int, ranges) -> bool:
    return any(r.covers(lsn) for r in ranges)


@dataclass(frozen=True)
class Record:
    lsn: int
    pg: int
    prev_lsn: int
    flags: int


class Volume:
    """Every record ever allocated, who holds it, and what each node was told."""

    def __init__(self, protection_groups: int, lal: int) -> None:
        self.protection_groups = protection_groups
        self.lal = lal
        self.records: dict[int, Record] = {}
        self.holders: dict[int, set[str]] = {}
        self.hints = {n: 0 for n in NODES}
        self.known: dict[str, frozenset[TruncationRange]] = {n: frozenset() for n in NODES}
        self.ranges: list[TruncationRange] = []  # every range cut so far, oldest first
        self.batches: list[tuple[int, int]] = []
        self.epoch = 0
        # where the current writer started: what the last recovery established
        self.vdl = 0
        self.next_lsn = 1
        self.tails = [0] * protection_groups
        self.synced = set(NODES)  # nodes at the current writer's epoch
        # what the current writer did before it crashed
        self.writer_vdl = 0
        self.allocated_max = 0

    # --- a writer epoch -------------------------------------------------------------------
    def place(self, rnd: random.Random, lsn: int, acknowledged: bool) -> None:
        if acknowledged:
            count = rnd.randint(WRITE_QUORUM, REPLICAS)
        else:
            count = rnd.choice((0, 0, 1, 2, 3, 3, 4, 5, 6))
        self.holders[lsn] = set(rnd.sample(NODES, count))

    def write(self, rnd: random.Random, batches_acknowledged: int, batches_in_flight: int) -> None:
        """Run a writer from where recovery left off: some batches become durable and are
        acknowledged (VDL reaches their CPL), more are in flight when it crashes. It never
        allocates past max(VDL, floor) + LAL, floor being the end of the last cut."""
        floor = self.next_lsn - 1
        lsn = self.next_lsn
        last = list(self.tails)
        vdl_timeline = [self.vdl]

        def batch(size: int, acknowledged: bool) -> None:
            nonlocal lsn
            first = lsn
            for i in range(size):
                pg = rnd.randrange(self.protection_groups)
                flags = rnd.choice((FLAG_PUT, FLAG_DELETE)) | (FLAG_CPL if i == size - 1 else 0)
                self.records[lsn] = Record(lsn, pg, last[pg], flags)
                last[pg] = lsn
                self.place(rnd, lsn, acknowledged)
                self.allocated_max = max(self.allocated_max, lsn)
                lsn += 1
            self.batches.append((first, lsn - 1))

        for _ in range(batches_acknowledged):
            batch(rnd.randint(1, min(self.lal, 4)), acknowledged=True)
            vdl_timeline.append(lsn - 1)
        self.writer_vdl = vdl_timeline[-1]
        limit = max(self.writer_vdl, floor) + self.lal
        for _ in range(batches_in_flight):
            if lsn > limit:
                break
            batch(rnd.randint(1, min(4, limit - lsn + 1)), acknowledged=False)
        # The writer tells nodes of its epoch the VDL it has reached, now and then.
        for node in sorted(self.synced):
            if rnd.random() < 0.7:
                self.hints[node] = max(self.hints[node], rnd.choice(vdl_timeline))

    # --- what a node answers when sealed --------------------------------------------------
    def chain(self, node: str, pg: int) -> int:
        scl = 0
        for lsn in sorted(lsn for lsn, r in self.records.items() if r.pg == pg and not covered(lsn, self.known[node])):
            if node not in self.holders[lsn]:
                break
            scl = lsn
        return scl

    def seal(self, node: str, epoch: int, rnd: random.Random) -> SealReply:
        hint = self.hints[node]
        segments = []
        for pg in range(self.protection_groups):
            mine = sorted(lsn for lsn, r in self.records.items() if r.pg == pg and node in self.holders[lsn])
            above = tuple(RecordHeader(lsn, self.records[lsn].prev_lsn, self.records[lsn].flags) for lsn in mine if lsn > hint)
            last_at_hint = max((lsn for lsn in mine if lsn <= hint), default=0)
            segments.append(SegmentSummary(node, pg, self.chain(node, pg), hint, last_at_hint, above))
        rnd.shuffle(segments)
        truncations = tuple(sorted(self.known[node], key=lambda r: (r.first, r.epoch)))
        return SealReply(node, epoch, tuple(segments), truncations)

    # --- after the recovery ---------------------------------------------------------------
    def apply(self, plan, answered: list[str], rnd: random.Random) -> None:
        """What the recovery driver does with the plan, and the next writer's start."""
        if plan.truncation is not None:
            self.ranges.append(plan.truncation)
        # Records above the cut that no node holds were in flight to nodes that now refuse the
        # old epoch: they are gone, and the new writer may reuse their LSNs.
        for lsn in [lsn for lsn in self.records if lsn >= plan.next_lsn]:
            assert not self.holders[lsn], f"lsn {lsn} is held by {self.holders[lsn]} above the cut"
            del self.records[lsn], self.holders[lsn]
        self.batches = [(f, last) for f, last in self.batches if last < plan.next_lsn]
        # The nodes that answered, and some that come back later, adopt the new epoch: they learn
        # every truncation range and drop what lies inside. The others keep stale records.
        others = [n for n in NODES if n not in answered]
        extra = max(0, WRITE_QUORUM - len(answered))
        synced = set(answered) | set(rnd.sample(others, rnd.randint(extra, len(others))))
        for node in synced:
            self.known[node] = frozenset(self.ranges)
            for lsn in self.records:
                if covered(lsn, self.ranges):
                    self.holders[lsn].discard(node)
        for _pg, lsn, _holders in plan.replicate:
            self.holders[lsn] |= synced
        for node in synced:
            self.hints[node] = max(self.hints[node], plan.base)
        self.synced = synced
        self.epoch = plan.epoch
        self.vdl, self.next_lsn, self.tails = plan.vdl, plan.next_lsn, list(plan.tails)


def check_plan(volume: Volume, plan, replies: list[SealReply], all_sealed: bool) -> None:
    """The plan against the model; `volume` is as it was when the nodes were sealed."""
    answered = {r.node for r in replies}
    ranges = volume.ranges
    assert {t for r in replies for t in r.truncations} == set(ranges)  # the model keeps them known
    base = max(volume.hints[n] for n in answered)
    assert plan.base == base

    # No acknowledged write is lost, and the new writer starts no lower than the old one did.
    assert plan.vdl >= volume.writer_vdl >= volume.vdl
    # VDL is a consistency point of a record that is not void, or the base.
    assert plan.vdl == base or (
        plan.vdl in volume.records and volume.records[plan.vdl].flags & FLAG_CPL and not covered(plan.vdl, ranges)
    )
    assert not any(first <= plan.vdl < last for first, last in volume.batches), "VDL inside a batch"

    # Every LSN in (base, VDL] is in some answer (or void), so it can be made durable again.
    present = {lsn for lsn, nodes in volume.holders.items() if lsn > base and nodes & answered and not covered(lsn, ranges)}
    for lsn in range(base + 1, plan.vdl + 1):
        assert lsn in present or covered(lsn, ranges), lsn
    vcl = base
    while vcl + 1 in present or covered(vcl + 1, ranges):
        vcl += 1
    assert plan.vcl == vcl
    assert plan.vdl == max([base] + [lsn for lsn in present if lsn <= vcl and volume.records[lsn].flags & FLAG_CPL])
    expected_replicate = tuple(
        (volume.records[lsn].pg, lsn, tuple(sorted(volume.holders[lsn] & answered))) for lsn in sorted(present) if lsn <= plan.vdl
    )
    assert plan.replicate == expected_replicate

    # Each PG's tail is its last record at or below VDL; nothing void comes back.
    for pg in range(volume.protection_groups):
        mine = [lsn for lsn, r in volume.records.items() if r.pg == pg and lsn <= plan.vdl and not covered(lsn, ranges)]
        assert plan.tails[pg] == max(mine, default=0), pg
    assert not covered(plan.vdl, ranges)

    # The cut starts right above VDL and reaches every LSN the old writer may have used.
    held = [lsn for lsn, nodes in volume.holders.items() if nodes]
    if plan.truncation is not None:
        assert (plan.truncation.epoch, plan.truncation.first) == (plan.epoch, plan.vdl + 1)
    if all_sealed:
        # Every node answered: nothing unseen exists, so the cut ends at the highest LSN held
        # (or at the end of an older cut it overlaps, which is void anyway), or is not needed.
        end = max([plan.vdl] + held + [r.last for r in ranges])
        if end == plan.vdl:
            assert plan.truncation is None
        else:
            assert plan.truncation == TruncationRange(plan.epoch, plan.vdl + 1, end)
    else:
        assert plan.truncation is not None and plan.truncation.last >= volume.allocated_max
    assert plan.next_lsn == (plan.truncation.last if plan.truncation else plan.vdl) + 1
    assert plan.next_lsn > max(held + [r.last for r in ranges], default=0)
    assert list(plan.truncations) == ranges + ([plan.truncation] if plan.truncation else [])


@st.composite
def recovery_runs(draw):
    return dict(
        protection_groups=draw(st.integers(1, 4), label="protection_groups"),
        lal=draw(st.integers(1, 10), label="lal"),
        epochs=draw(
            st.lists(
                st.tuples(st.integers(0, 4), st.integers(0, 4), st.integers(READ_QUORUM, REPLICAS), st.booleans()),
                min_size=1,
                max_size=5,
            ),
            label="epochs (acknowledged batches, batches in flight, nodes answering, all_sealed if 6)",
        ),
        seed=draw(st.integers(0, 2**32), label="seed"),
    )


@settings(deadline=None, max_examples=1000)
@given(run=recovery_runs())
def test_recovery_keeps_every_acknowledged_write_and_cuts_everything_else(run):
    rnd = random.Random(run["seed"])
    volume = Volume(run["protection_groups"], run["lal"])
    for acknowledged, in_flight, answering, claim_all_sealed in run["epochs"]:
        volume.write(rnd, acknowledged, in_flight)
        answered = rnd.sample(NODES, answering)
        all_sealed = answering == REPLICAS and claim_all_sealed
        epoch = volume.epoch + 1
        replies = [volume.seal(n, epoch, rnd) for n in answered]
        plan = plan_recovery(epoch, volume.protection_groups, replies, lal=volume.lal, all_sealed=all_sealed)
        assert plan.epoch == epoch
        if any(covered(lsn, volume.ranges) for lsn, nodes in volume.holders.items() if nodes & set(answered)):
            event("a node answered with records inside a range an earlier recovery cut")
        if all_sealed and plan.truncation is None:
            event("every node answered and nothing needed cutting")
        if plan.vdl > volume.writer_vdl:
            event("recovery exposed records the old writer never acknowledged")
        check_plan(volume, plan, replies, all_sealed)
        volume.apply(plan, answered, rnd)


# --- scripted cases, one per sentence ----------------------------------------------------------
def summary(node, pg=0, hint=0, last_at_hint=0, records=()):
    headers = tuple(RecordHeader(lsn, prev, FLAG_PUT | (FLAG_CPL if cpl else 0)) for lsn, prev, cpl in records)
    return SegmentSummary(node, pg, 0, hint, last_at_hint, headers)


def test_a_write_acknowledged_by_the_old_writer_survives_when_only_three_segments_answer():
    batch = [(1, 0, False), (2, 1, False), (3, 2, True)]  # on n1..n4 only: durable, acknowledged
    replies = [SealReply(n, 2, (summary(n, records=batch if n == "n4" else ()),)) for n in ("n4", "n5", "n6")]
    plan = plan_recovery(2, 1, replies, lal=10)
    assert (plan.vdl, plan.tails) == (3, (3,))
    assert plan.replicate == ((0, 1, ("n4",)), (0, 2, ("n4",)), (0, 3, ("n4",)))
    assert plan.truncation == TruncationRange(2, 4, 13) and plan.next_lsn == 14


def test_a_batch_that_missed_a_write_quorum_is_cut_whole():
    first = [(1, 0, True)]
    second = [(2, 1, False), (4, 2, True)]  # LSN 3 (another PG) reached nobody
    replies = [SealReply(n, 2, (summary(n, 0, records=first + second), summary(n, 1))) for n in NODES]
    plan = plan_recovery(2, 2, replies, lal=10, all_sealed=True)
    assert (plan.vcl, plan.vdl, plan.tails) == (2, 1, (1, 0))
    assert plan.truncation == TruncationRange(2, 2, 4) and plan.next_lsn == 5


def test_a_clean_volume_where_every_node_answered_needs_no_cut():
    records = [(1, 0, True)]
    replies = [SealReply(n, 2, (summary(n, records=records),)) for n in NODES]
    plan = plan_recovery(2, 1, replies, lal=10, all_sealed=True)
    assert (plan.vdl, plan.truncation, plan.next_lsn) == (1, None, 2)
    assert plan_recovery(2, 1, replies, lal=10, all_sealed=False).truncation == TruncationRange(2, 2, 11)


def test_a_second_recovery_does_not_resurrect_what_the_first_cut():
    # Recovery at epoch 2 kept VDL 1 and cut 2..12; n6 missed it and still holds LSN 2, a CPL.
    cut = TruncationRange(2, 2, 12)
    stale = SealReply("n6", 3, (summary("n6", hint=1, last_at_hint=1, records=[(2, 1, True)]),))
    fresh = [SealReply(n, 3, (summary(n, hint=1, last_at_hint=1),), (cut,)) for n in ("n1", "n2")]
    plan = plan_recovery(3, 1, [stale, *fresh], lal=5)
    assert (plan.vdl, plan.tails, plan.replicate) == (1, (1,), ())
    assert plan.truncation == TruncationRange(3, 2, 17) and plan.truncations == (cut, plan.truncation)
    # Without the range, the stale record would have come back: the range is what keeps it out.
    blind = plan_recovery(3, 1, [stale, *(SealReply(r.node, 3, r.segments) for r in fresh)], lal=5)
    assert blind.vdl == 2


@pytest.mark.parametrize("answering", [0, 1, 2])
def test_recovery_needs_three_segments_of_every_protection_group(answering):
    replies = [SealReply(n, 2, (summary(n, 0), summary(n, 1))) for n in NODES[:answering]]
    with pytest.raises(Unavailable):
        plan_recovery(2, 2, replies)


def test_one_protection_group_short_of_three_segments_makes_recovery_unavailable():
    replies = [SealReply(n, 2, (summary(n, 0), summary(n, 1))) for n in NODES[:3]]
    plan_recovery(2, 2, replies)  # three of each: fine
    replies[0] = SealReply("n1", 2, (summary("n1", 0),))  # n1 lost its segment of PG 1
    with pytest.raises(Unavailable):
        plan_recovery(2, 2, replies)


@settings(deadline=None, max_examples=100)
@given(run=recovery_runs(), drop=st.integers(0, 3))
def test_recovery_refuses_to_guess_with_fewer_than_three_summaries_of_a_pg(run, drop):
    rnd = random.Random(run["seed"])
    volume = Volume(run["protection_groups"], run["lal"])
    volume.write(rnd, *run["epochs"][0][:2])
    answered = rnd.sample(NODES, READ_QUORUM)
    replies = [volume.seal(n, 1, rnd) for n in answered]
    pg = drop % volume.protection_groups
    victim = replies[drop % len(replies)]
    replies[drop % len(replies)] = SealReply(victim.node, 1, tuple(s for s in victim.segments if s.pg != pg))
    with pytest.raises(Unavailable):
        plan_recovery(1, volume.protection_groups, replies, lal=volume.lal)


def test_during_a_membership_change_the_summaries_must_be_a_read_quorum_of_both_sets():
    """Halfway through replacing n1 by n7, {n1, n2, n7} are three summaries but three of neither
    set, and {n7, n3, n4} are three of the new set only: the new node may hold nothing yet."""
    joint = Membership(3, NODES, ("n7",) + NODES[1:])
    for nodes in (("n1", "n2", "n7"), ("n7", "n3", "n4")):
        replies = [SealReply(n, 4, (summary(n),)) for n in nodes]
        plan_recovery(4, 1, replies)  # a bare count of three would accept them
        with pytest.raises(Unavailable, match="read quorum"):
            plan_recovery(4, 1, replies, membership=joint)
    plan_recovery(4, 1, [SealReply(n, 4, (summary(n),)) for n in ("n2", "n3", "n4")], membership=joint)
