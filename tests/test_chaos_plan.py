"""Fault plans are data: the same seed gives the same plan, JSON round-trips it exactly, every
fault is healed before the final healing period, and unless a plan is unbounded at most three
of the six segments are impaired at any instant. The budget is checked here by an independent
replay, not only by the module's own `replay`."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.chaos.plan import (
    AIMED_NAMES,
    DEFAULT_NODES,
    FAULT_NAMES,
    IMPAIRED_MAX,
    TAIL_FRACTION,
    WRITER,
    FaultEvent,
    FaultPlan,
    generate_plan,
    max_impaired,
    pick_corruption,
    replay,
    validate_plan,
)
from engine.core.constants import READ_QUORUM, WRITE_QUORUM
from engine.core.quorum import has_read_quorum, has_write_quorum
from engine.core.types import Membership
from engine.errors import InvalidArgument

NODES = dict(DEFAULT_NODES)


def oracle_impaired_after_each_event(plan: FaultPlan) -> list[tuple[float, set[str], bool]]:
    """A second, plain reading of the rules: (time, impaired nodes, anything at all faulty)."""
    return [(at_s, impaired, faulty) for at_s, impaired, _, faulty, _ in oracle_timeline(plan)]


def oracle_timeline(plan: FaultPlan):
    """Per event: (time, impaired nodes, the most impaired in one quorum set, anything faulty,
    the nodes that exist). Written apart from `replay`, from the module docstring's rules."""
    down, paused, corrupt, dropping, timing = set(), set(), set(), set(), {}
    sets = [set(NODES) if not plan.nodes else {n for n, _ in plan.nodes}]
    exist = set(sets[0])
    rebuilding: set[str] = set()
    groups = None
    one_way: set[str] = set()
    out = []
    for e in plan.events:
        t = set(e.targets)
        k = e.kind
        if k in ("kill", "az_down"):
            down |= t
        elif k in ("restart", "az_up"):
            down -= t
        elif k == "pause":
            paused |= t
        elif k == "resume":
            paused -= t
        elif k == "partition":
            groups, one_way = [set(g) for g in e.param("groups")], set()
        elif k == "one_way":
            # Either direction between the writer and a node loses that node to the writer.
            groups, one_way = None, {n for pair in e.param("drops") for n in pair} - {WRITER}
        elif k == "heal":
            groups, one_way = None, set()
        elif k == "corrupt":
            corrupt |= t
        elif k == "scrub":
            corrupt -= t
        elif k == "drop":
            dropping |= t
        elif k in ("duplicate", "reorder", "delay", "slow"):
            timing.setdefault(k, set()).update(t)
        elif k == "clear":
            dropping -= t
            for kind in ("duplicate", "reorder", "delay"):
                timing.get(kind, set()).difference_update(t)
        elif k == "unslow":
            timing.get("slow", set()).difference_update(t)
        elif k == "replace":
            (old,) = e.targets
            new = e.param("new")
            sets = [sets[0], (sets[0] - {old}) | {new}]
            rebuilding.add(new)
            exist.add(new)
        elif k == "replace_done":
            (old,) = e.targets
            sets = [sets[1]]
            rebuilding.discard(e.param("new"))
            exist.discard(old)
            for s in (down, paused, corrupt, dropping, *timing.values()):
                s.discard(old)
        cut, writer_alone = set(), False
        if groups:
            (writer_side,) = [g for g in groups if WRITER in g]
            cut = exist - writer_side
            for g in groups:
                if WRITER not in g and all(len(g & q) >= WRITE_QUORUM for q in sets):
                    cut -= g  # whole and together: only the writer is cut off
                    writer_alone = True
        impaired = down | paused | cut | (one_way & exist) | corrupt | dropping | rebuilding
        worst = max(len(impaired & q) for q in sets)
        faulty = bool(impaired) or any(timing.values()) or writer_alone
        out.append((e.at_s, impaired, worst, faulty, set(exist)))
    return out


fault_sets = st.sets(st.sampled_from(FAULT_NAMES), min_size=1)


def test_same_seed_same_plan():
    a = generate_plan(42, 120.0, set(FAULT_NAMES))
    b = generate_plan(42, 120.0, set(FAULT_NAMES))
    assert a == b and a.to_json() == b.to_json()
    assert generate_plan(43, 120.0, set(FAULT_NAMES)).to_json() != a.to_json()
    assert len(a.events) > 10


def test_fault_order_given_does_not_matter():
    assert generate_plan(5, 60, ["kill", "net", "az"]) == generate_plan(5, 60, {"az", "net", "kill"})


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**64), st.floats(1.0, 3600.0), fault_sets, st.booleans())
def test_json_round_trip(seed, duration_s, faults, unbounded):
    plan = generate_plan(seed, duration_s, faults, unbounded=unbounded)
    again = FaultPlan.from_json(plan.to_json())
    assert again == plan
    assert again.to_json() == plan.to_json()


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**32), st.floats(1.0, 600.0), fault_sets)
def test_budget_holds_at_every_instant_and_everything_heals(seed, duration_s, faults):
    plan = generate_plan(seed, duration_s, faults)
    timeline = oracle_timeline(plan)
    for at_s, impaired, worst, _, _ in timeline:
        assert worst <= IMPAIRED_MAX, f"seed={seed}: {sorted(impaired)} impaired at {at_s}s"
    if timeline:
        assert timeline[-1][1] == set() and not timeline[-1][3], f"seed={seed}: not healed"
    assert plan.healed_at_s <= duration_s * (1 - TAIL_FRACTION) + 1e-9, "a healing period ends the plan"
    assert validate_plan(plan) == []
    assert max_impaired(plan) == max((w for _, _, w, _, _ in timeline), default=0)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**32), fault_sets)
def test_unbounded_plans_still_heal_everything(seed, faults):
    plan = generate_plan(seed, 120.0, faults, unbounded=True)
    timeline = oracle_impaired_after_each_event(plan)
    if timeline:
        assert timeline[-1][1] == set() and not timeline[-1][2]
    assert validate_plan(plan) == []


def test_unbounded_plans_do_exceed_the_budget():
    worst = max(max_impaired(generate_plan(s, 120.0, {"kill", "partition"}, unbounded=True)) for s in range(20))
    assert worst > IMPAIRED_MAX


def test_az_plus_one_is_exactly_three():
    counts = set()
    for seed in range(30):
        plan = generate_plan(seed, 60.0, {"az+1"})
        counts |= {len(h.impaired) for h in replay(plan)}
        for h in replay(plan):
            if len(h.impaired) == 3:
                azs = sorted(NODES[n] for n in h.impaired)
                assert len(set(azs)) == 2, "an AZ and one node of another AZ"
    assert max(counts) == 3


def test_every_kind_appears_and_partitions_name_every_endpoint():
    kinds = set()
    for seed in range(40):
        plan = generate_plan(seed, 300.0, set(FAULT_NAMES))
        kinds |= {e.kind for e in plan.events}
        exist = set(NODES)
        for e, (_, _, _, _, after) in zip(plan.events, oracle_timeline(plan)):
            assert set(e.targets) <= exist | {WRITER}, f"seed={seed}: {e} names a node that does not exist"
            if e.kind == "partition":
                named = sorted(m for g in e.param("groups") for m in g)
                assert named == sorted(exist | {WRITER})
            exist = after
    assert kinds >= {"kill", "restart", "pause", "resume", "partition", "heal", "az_down", "az_up",
                     "corrupt", "scrub", "writer_crash", "slow", "unslow", "clear", "replace", "replace_done"}
    assert kinds & {"drop", "duplicate", "reorder", "delay"}


def test_custom_nodes_and_no_faults():
    nodes = {"x1": "east", "x2": "east", "x3": "west", "x4": "west", "x5": "south", "x6": "south"}
    plan = generate_plan(1, 60, {"az", "kill"}, nodes=nodes)
    assert {t for e in plan.events for t in e.targets} <= set(nodes)
    assert validate_plan(plan) == []
    assert generate_plan(1, 60, set()).events == ()


def test_bad_input_is_rejected():
    with pytest.raises(InvalidArgument):
        generate_plan(1, 60, {"meteor"})
    with pytest.raises(InvalidArgument):
        generate_plan(1, 0, {"kill"})
    with pytest.raises(InvalidArgument):
        FaultEvent(1.0, "explode", ("n1",))
    with pytest.raises(InvalidArgument):
        FaultPlan(seed=1, duration_s=10, events=(FaultEvent(2.0, "kill", ("n1",)), FaultEvent(1.0, "restart", ("n1",))))
    with pytest.raises(InvalidArgument):
        FaultPlan.from_json("{not json")


def test_validate_plan_finds_over_budget_and_unhealed_plans():
    over = FaultPlan(seed=0, duration_s=10, events=(
        FaultEvent(1.0, "az_down", ("n1", "n2"), {"az": "a"}),
        FaultEvent(1.5, "kill", ("n3", "n5")),
        FaultEvent(2.0, "restart", ("n3", "n5")),
        FaultEvent(3.0, "az_up", ("n1", "n2"), {"az": "a"}),
    ))
    assert any("budget" in p for p in validate_plan(over))
    assert validate_plan(FaultPlan(**{**over.__dict__, "unbounded": True})) == []
    unhealed = FaultPlan(seed=0, duration_s=10, events=(FaultEvent(1.0, "pause", ("n4",)),))
    assert any("not healed" in p for p in validate_plan(unhealed))
    late = FaultPlan(seed=0, duration_s=10, events=(FaultEvent(1.0, "slow", ("n4",), {"delay_ms": 5}),
                                                    FaultEvent(10.0, "unslow", ("n4",))))
    assert any("healing period" in p for p in validate_plan(late))


def test_event_params_accept_a_mapping_and_stay_hashable():
    e = FaultEvent(1, "partition", ["n1"], {"groups": [["writer", "n2"], ["n1"]]})
    assert e.params == (("groups", (("writer", "n2"), ("n1",))),)
    assert hash(e) == hash(FaultEvent.from_dict(e.to_dict()))
    assert e.param("groups")[1] == ("n1",) and e.param("missing", 7) == 7


def test_corruption_choice_is_deterministic():
    plan = generate_plan(9, 60, {"corrupt"})
    event = next(e for e in plan.events if e.kind == "corrupt")
    a = pick_corruption(event, record_count=100, record_bytes=64)
    assert a == pick_corruption(event, record_count=100, record_bytes=64)
    index, bits = a
    assert 0 <= index < 100 and 1 <= len(bits) <= 3 and all(0 <= b < 512 for b in bits)


def test_describe_names_the_seed_and_every_event():
    plan = generate_plan(11, 60, {"kill", "partition"})
    text = plan.describe()
    assert "seed=11" in text and len(text.splitlines()) == len(plan.events) + 1


# --- aimed episodes and membership changes ---------------------------------------------------

def _isolations(plan: FaultPlan):
    """Each `isolate` episode of a plan: (partition, writer_crash, kill, heal, restart)."""
    out = []
    events = list(plan.events)
    for i, p in enumerate(events):
        if p.kind != "partition":
            continue
        (writer_side,) = [set(g) for g in p.param("groups") if WRITER in g]
        minority = writer_side - {WRITER}
        if len(minority) != 2:
            continue
        later = events[i + 1:]
        crash = next(e for e in later if e.kind == "writer_crash")
        kill = next(e for e in later if e.kind == "kill" and set(e.targets) == minority)
        heal = next(e for e in later if e.kind in ("heal", "partition"))
        restart = next(e for e in later if e.kind == "restart" and set(e.targets) == minority)
        out.append((p, crash, kill, heal, restart))
    return out


def test_isolate_cuts_the_writer_off_with_a_minority_then_loses_it_inside_the_budget():
    """The shape that shows a write quorum of two: the writer reaches only two nodes while the
    other four reach each other; then the writer crashes and the two are lost with it, and the
    new writer can recover only from the four. Inside the budget: nothing is impaired while the
    writer is isolated (the four are whole), two nodes while they are down."""
    found = 0
    for seed in range(40):
        plan = generate_plan(seed, 5.0, set(FAULT_NAMES))
        assert validate_plan(plan) == [] and max_impaired(plan) <= IMPAIRED_MAX
        health = {(h.at_s, h.kind): h for h in replay(plan)}
        for p, crash, kill, heal, restart in _isolations(plan):
            found += 1
            (rest,) = [set(g) for g in p.param("groups") if WRITER not in g]
            h = health[(p.at_s, "partition")]
            assert len(h.present) == 6, "no membership change is under way"
            assert len(rest) == 4 and has_write_quorum(rest, Membership(0, tuple(sorted(h.present))))
            assert h.writer_isolated and h.isolated == frozenset(), "the four are whole: the writer is cut off"
            assert crash.at_s == kill.at_s, "the writer and the minority are lost at the same instant"
            assert heal.kind == "heal" and crash.at_s < heal.at_s < crash.at_s + crash.param("down_s"), \
                "the partition heals while the writer is down, so the new writer reaches the four"
            assert restart.at_s > crash.at_s + crash.param("down_s"), "the minority returns after the new writer opened"
            assert health[(kill.at_s, "kill")].impaired_max <= 2
    assert found >= 30, f"only {found} of 40 default plans isolate the writer"


def test_replace_changes_membership_inside_the_budget():
    local, other, dead, swaps = 0, 0, 0, 0
    for seed in range(60):
        plan = generate_plan(seed, 5.0, set(FAULT_NAMES))
        assert validate_plan(plan) == []
        events = list(plan.events)
        azs = dict(NODES)
        members = sorted(NODES)
        for i, e in enumerate(events):
            if e.kind != "replace":
                continue
            (old,) = e.targets
            new = e.param("new")
            assert new not in azs, "a new node has a new id"
            azs[new] = azs[old]
            done = next(j for j in range(i + 1, len(events)) if events[j].kind == "replace_done")
            assert events[done].targets == (old,) and events[done].param("new") == new
            assert all(old not in x.targets for x in events[done + 1:]), "a retired node is never named again"
            assert all(new not in x.targets for x in events[:i]), "a new node is named only once it exists"
            local += azs[old] == "a"
            other += azs[old] != "a"
            before = [x for x in events[:i] if x.at_s == e.at_s and x.kind == "kill" and x.targets == (old,)]
            dead += bool(before) and not any(x.kind == "restart" and old in x.targets for x in events[i:])
            flips = [x for x in events[i + 1:done] if x.kind == "partition"]
            if len(flips) == 2:
                swaps += 1
                joint = Membership(1, tuple(members), tuple(sorted(new if n == old else n for n in members)))
                (trio,) = [set(g) - {WRITER} for g in flips[1].param("groups") if WRITER in g]
                (four,) = [set(g) for g in flips[1].param("groups") if WRITER not in g]
                assert old in trio and new in trio and len(trio) == 3
                assert not has_read_quorum(trio, joint), "the writer's side is no read quorum of either set"
                assert has_write_quorum(four, joint), "the writes went to a write quorum of both sets"
                assert {azs[n] for n in trio} == {azs[old]}, "the old node, its AZ peer and the new node"
            members = sorted(new if n == old else n for n in members)
    assert local >= 5 and other >= 5, (local, other)
    assert dead >= 3 and swaps >= 5, (dead, swaps)


def test_both_quorum_sets_count_against_the_budget_during_a_change():
    change = (FaultEvent(1.0, "replace", ("n1",), {"new": "n7"}), FaultEvent(4.0, "replace_done", ("n1",), {"new": "n7"}))
    kills = (FaultEvent(2.0, "kill", ("n3", "n4", "n5")), FaultEvent(3.0, "restart", ("n3", "n4", "n5")))
    plain = FaultPlan(seed=0, duration_s=10, events=kills)
    assert validate_plan(plain) == [] and max_impaired(plain) == 3
    # the new set {n7 (rebuilding), n2, n3, n4, n5, n6} has four impaired: over the budget
    during = FaultPlan(seed=0, duration_s=10, events=tuple(sorted(change + kills, key=lambda e: e.at_s)))
    assert max_impaired(during) == 4
    assert any("budget" in p for p in validate_plan(during))
    # the old node, once retired, no longer counts (it may even stay dead: it was replaced)
    dead = FaultPlan(seed=0, duration_s=10, events=(
        FaultEvent(1.0, "kill", ("n1",)), change[0], change[1],
        FaultEvent(5.0, "kill", ("n7", "n2")), FaultEvent(6.0, "restart", ("n7", "n2")),
    ))
    assert validate_plan(dead) == []
    health = replay(dead)
    assert health[-1].healthy and "n1" not in health[-1].present and "n7" in health[-1].present
    # n1 dead in the old set, n7 rebuilding in the new one: one each
    assert [h.impaired_max for h in health] == [1, 1, 0, 2, 0]


def test_a_partition_that_isolates_the_writer_impairs_no_segment():
    def plan_of(*groups):
        return FaultPlan(seed=0, duration_s=10, events=(
            FaultEvent(1.0, "partition", (), {"groups": groups}), FaultEvent(2.0, "heal", ())))
    alone = plan_of(("writer", "n1", "n2"), ("n3", "n4", "n5", "n6"))
    assert max_impaired(alone) == 0 and validate_plan(alone) == []
    assert replay(alone)[0].writer_isolated and not replay(alone)[0].healthy
    # the four do not reach each other: they are cut off, not whole
    scattered = plan_of(("writer", "n1", "n2"), ("n3", "n4"), ("n5", "n6"))
    assert max_impaired(scattered) == 4 and any("budget" in p for p in validate_plan(scattered))
    # three against three: neither side has a write quorum, the three cut off are impaired
    halves = plan_of(("writer", "n1", "n2", "n3"), ("n4", "n5", "n6"))
    assert max_impaired(halves) == 3 and not replay(halves)[0].writer_isolated
    assert READ_QUORUM + WRITE_QUORUM > 6


def test_validate_plan_finds_bad_membership_changes():
    r = lambda t, old, new: FaultEvent(t, "replace", (old,), {"new": new})  # noqa: E731
    d = lambda t, old, new: FaultEvent(t, "replace_done", (old,), {"new": new})  # noqa: E731
    def problems(*events):
        return " | ".join(validate_plan(FaultPlan(seed=0, duration_s=10, events=events)))
    assert problems(r(1, "n1", "n7"), d(2, "n1", "n7"), r(3, "n2", "n8"), d(4, "n2", "n8")) == ""
    assert "still under way" in problems(r(1, "n1", "n7"), r(2, "n2", "n8"), d(3, "n1", "n7"))
    assert "new, unused node id" in problems(r(1, "n1", "n2"), d(2, "n1", "n2"))
    assert "new, unused node id" in problems(r(1, "n1", "n7"), d(2, "n1", "n7"), r(3, "n2", "n7"), d(4, "n2", "n7"))
    assert "retired" in problems(r(1, "n1", "n7"), d(2, "n1", "n7"), FaultEvent(3, "kill", ("n1",)),
                                 FaultEvent(4, "restart", ("n1",)))
    assert "matches" not in problems(r(1, "n1", "n7"), d(2, "n1", "n7"))
    assert "does not finish" in problems(d(2, "n1", "n7"))
    assert "not healed" in problems(r(1, "n1", "n7"))
    # a partition during a change names the new node too
    groups = (("writer", "n2", "n3", "n4", "n5", "n6"), ("n1",))
    assert "every endpoint" in problems(r(1, "n1", "n7"), FaultEvent(2, "partition", (), {"groups": groups}),
                                        FaultEvent(3, "heal", ()), d(4, "n1", "n7"))


def test_aimed_families_are_reserved_windows():
    """With only an aimed family asked for, a plan still has its episode most of the time, and
    the JSON round trip and the budget hold."""
    for name in AIMED_NAMES:
        plans = [generate_plan(seed, 5.0, {name, "kill", "partition"}) for seed in range(20)]
        kinds = {"isolate": "writer_crash", "replace": "replace"}
        assert sum(any(e.kind == kinds[name] for e in p.events) for p in plans) >= 10
        for p in plans:
            assert validate_plan(p) == [] and FaultPlan.from_json(p.to_json()) == p


# --- writer faults and readers (the cluster target) -------------------------------------------

from engine.chaos.plan import CLUSTER_ONLY_NAMES, DEFAULT_FAULTS, OPT_IN_NAMES, READERS_DEFAULT, WRITER_FAULT_KINDS  # noqa: E402


def oracle_writer_faults(plan: FaultPlan) -> list[tuple[float, str, int, int]]:
    """Per writer fault, from the events alone: (time, kind, readers down then, writer faults
    still unhealed then), with the rule of the docstring: a writer fault is healed by
    reader_add / writer_resume / heal."""
    down: set[int] = set()
    open_: list[str] = []
    out = []
    heals = {"reader_add": "writer_kill", "writer_resume": "writer_pause", "heal": "writer_partition"}
    for e in plan.events:
        if e.kind == "reader_kill":
            down.add(e.param("slot"))
        elif e.kind == "reader_restart":
            down.discard(e.param("slot"))
        elif e.kind in heals and heals[e.kind] in open_:
            open_.remove(heals[e.kind])
        elif e.kind in WRITER_FAULT_KINDS:
            out.append((e.at_s, e.kind, len(down), len(open_)))
            open_.append(e.kind)
    assert not open_, f"writer faults never healed: {open_}"
    assert not down, f"readers never restarted: {sorted(down)}"
    return out


reader_fault_sets = st.sets(st.sampled_from(FAULT_NAMES), min_size=1).map(lambda s: s | {"writer-kill", "az+1"})


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32), st.floats(5.0, 600.0), reader_fault_sets, st.integers(1, 4))
def test_a_writer_fault_always_leaves_a_reader_to_take_over(seed, duration_s, faults, readers):
    plan = generate_plan(seed, duration_s, faults, readers=readers)
    assert plan.readers == readers
    for at_s, kind, down, unhealed in oracle_writer_faults(plan):
        assert unhealed == 0, f"seed={seed}: {kind} at {at_s}s while another writer fault is in force"
        assert readers - down >= 1, f"seed={seed}: {kind} at {at_s}s with all {readers} readers down"
    assert validate_plan(plan) == [], validate_plan(plan)
    assert FaultPlan.from_json(plan.to_json()) == plan
    # a reader can take over only with a write quorum whole: at most 2 of 6 impaired meanwhile
    heals = {"reader_add": "writer_kill", "writer_resume": "writer_pause", "heal": "writer_partition"}
    in_force = None
    for e, (at_s, impaired, worst, _, _) in zip(plan.events, oracle_timeline(plan)):
        if e.kind in WRITER_FAULT_KINDS:
            in_force = e.kind
        elif heals.get(e.kind) == in_force:
            in_force = None
        if in_force:
            assert worst <= 2, f"seed={seed}: {sorted(impaired)} impaired at {at_s}s during {in_force}"
    # writer faults hold the writer: no writer crash, isolate or membership change overlaps one
    spans = []
    for e in plan.events:
        if e.kind in WRITER_FAULT_KINDS:
            spans.append([e.at_s, None])
        elif e.kind in ("reader_add", "writer_resume") or (e.kind == "heal" and spans and spans[-1][1] is None):
            if spans and spans[-1][1] is None:
                spans[-1][1] = e.at_s
    for e in plan.events:
        if e.kind in ("writer_crash", "replace"):
            assert not any(s < e.at_s < t for s, t in spans), f"seed={seed}: {e.kind} at {e.at_s}s inside a writer fault"


def test_writer_faults_appear_and_readers_default():
    kinds = set()
    for seed in range(20):
        plan = generate_plan(seed, 120.0, set(CLUSTER_ONLY_NAMES))
        assert plan.readers == READERS_DEFAULT
        kinds |= {e.kind for e in plan.events}
    assert kinds >= {"writer_kill", "reader_add", "writer_pause", "writer_resume", "writer_partition", "heal",
                     "reader_kill", "reader_restart"}
    assert generate_plan(1, 60.0, DEFAULT_FAULTS).readers == 0, "no reader families, no readers"
    assert not set(DEFAULT_FAULTS) & set(CLUSTER_ONLY_NAMES) and not set(DEFAULT_FAULTS) & set(OPT_IN_NAMES)
    assert set(DEFAULT_FAULTS) | set(CLUSTER_ONLY_NAMES) | set(OPT_IN_NAMES) == set(FAULT_NAMES)
    with pytest.raises(InvalidArgument):
        generate_plan(1, 60.0, {"writer-kill"}, readers=0)
    # one reader: writer faults, but no reader kills (the last candidate is never killed)
    one = generate_plan(3, 300.0, set(CLUSTER_ONLY_NAMES), readers=1)
    assert not any(e.kind == "reader_kill" for e in one.events) and any(e.kind in WRITER_FAULT_KINDS for e in one.events)


def test_readers_max_matches_the_replicas():
    from engine.chaos.plan import READERS_MAX
    from engine.head.replica import READERS_MAX as REPLICA_READERS_MAX

    assert READERS_MAX == REPLICA_READERS_MAX


def test_validate_plan_finds_unsafe_writer_faults():
    def plan(*events, readers=2):
        return FaultPlan(seed=1, duration_s=20.0, events=tuple(events), readers=readers)

    ok = plan(FaultEvent(1.0, "reader_kill", (), {"slot": 0}), FaultEvent(2.0, "writer_kill", (WRITER,)),
              FaultEvent(5.0, "reader_add", ()), FaultEvent(6.0, "reader_restart", (), {"slot": 0}))
    assert validate_plan(ok) == []
    assert replay(ok)[1].writer_fault == "writer_kill" and replay(ok)[1].candidates == 0 and not replay(ok)[-1].writer_fault
    no_reader = plan(FaultEvent(1.0, "writer_pause", (WRITER,)), FaultEvent(3.0, "writer_resume", ()), readers=0)
    assert any("no reader to take over" in p for p in validate_plan(no_reader))
    all_down = plan(FaultEvent(1.0, "reader_kill", (), {"slot": 0}), FaultEvent(1.0, "reader_kill", (), {"slot": 1}),
                    FaultEvent(2.0, "writer_partition", (WRITER,)), FaultEvent(3.0, "heal", ()),
                    FaultEvent(4.0, "reader_restart", (), {"slot": 0}), FaultEvent(4.0, "reader_restart", (), {"slot": 1}))
    assert any("no reader to take over" in p for p in validate_plan(all_down))
    overlapping = plan(FaultEvent(1.0, "writer_kill", (WRITER,)), FaultEvent(2.0, "writer_pause", (WRITER,)),
                       FaultEvent(3.0, "writer_resume", ()), FaultEvent(4.0, "reader_add", ()), readers=3)
    assert any("not healed yet" in p for p in validate_plan(overlapping))
    unhealed = plan(FaultEvent(1.0, "writer_pause", (WRITER,)))
    assert any("writer fault writer_pause not healed" in p for p in validate_plan(unhealed))
    stray = plan(FaultEvent(1.0, "writer_resume", ()))
    assert any("heals no writer_pause" in p for p in validate_plan(stray))
    no_quorum = plan(FaultEvent(1.0, "az_down", ("n5", "n6"), {"az": "c"}), FaultEvent(1.5, "kill", ("n1",)),
                     FaultEvent(2.0, "writer_kill", (WRITER,)), FaultEvent(4.0, "reader_add", ()),
                     FaultEvent(5.0, "restart", ("n1",)), FaultEvent(5.0, "az_up", ("n5", "n6"), {"az": "c"}))
    assert any("no write quorum is whole" in p for p in validate_plan(no_quorum))
    bad_slot = plan(FaultEvent(1.0, "reader_kill", (), {"slot": 2}), FaultEvent(2.0, "reader_restart", (), {"slot": 2}))
    assert any("slot 2" in p for p in validate_plan(bad_slot))
    with pytest.raises(InvalidArgument):
        FaultPlan(seed=1, duration_s=10.0, readers=16)
    assert FaultPlan.from_json(ok.to_json()).readers == 2
    assert "readers" not in generate_plan(1, 60.0, {"kill"}).to_dict(), "plans without readers keep their JSON"


# --- network faults: what `--network real` cuts (issue 15) -------------------------------------

from engine.chaos.plan import NETWORK_SHAPES, network_shape  # noqa: E402

#: The families whose events are network faults: what a real-network cluster run turns into nft rules.
NETWORK_FAMILIES = ("partition", "isolate", "one-way")


def shapes_of(plan: FaultPlan) -> list[tuple[FaultEvent, str]]:
    exist = dict(plan.nodes)
    out = []
    for e, (_, _, _, _, after) in zip(plan.events, oracle_timeline(plan)):
        shape = network_shape(e, {n: exist.get(n, NODES.get(n, "?")) for n in sorted(exist)})
        if shape is not None:
            out.append((e, shape))
        exist = {n: dict(plan.nodes).get(n, "?") for n in after}
    return out


def test_a_real_network_plan_makes_every_partition_the_issue_names():
    """An AZ cut off, one node isolated, one-way drops and a partition that separates the writer
    from a minority (both readings: a minority cut off from the writer, and the writer left
    with a minority): all come out of the generator, as data, for the cluster target's default
    (every family) and for the network families alone."""
    for faults in (set(FAULT_NAMES), set(NETWORK_FAMILIES)):
        seen = set()
        for seed in range(30):
            seen |= {shape for _e, shape in shapes_of(generate_plan(seed, 120.0, faults))}
        assert seen == set(NETWORK_SHAPES) == {"az", "node", "minority", "writer-minority", "one-way"}, (sorted(faults), seen)


def test_a_one_way_drop_is_data_between_the_writer_and_its_targets_and_heal_ends_it():
    plan = next(p for p in (generate_plan(s, 60.0, {"one-way"}) for s in range(20)) if p.events)
    e = plan.events[0]
    assert e.kind == "one_way" and e.to_dict()["params"]["drops"]
    for pair in e.param("drops"):
        assert len(pair) == 2 and (pair[0] == WRITER) != (pair[1] == WRITER)
    assert sorted(n for pair in e.param("drops") for n in pair if n != WRITER) == list(e.targets)
    assert plan.events[1].kind == "heal"
    again = FaultPlan.from_json(plan.to_json())
    assert again == plan and again.events[0].param("drops") == e.param("drops")
    # Both directions count: the writer that never hears n1 has lost it as surely as one n1 never hears.
    for drops in ((("writer", "n1"),), (("n1", "writer"),)):
        h = replay(FaultPlan(1, 10.0, (FaultEvent(1.0, "one_way", ("n1",), {"drops": drops}),
                                       FaultEvent(2.0, "heal", ()))))
        assert h[0].impaired == {"n1"} and h[1].healthy


def test_a_one_way_drop_that_names_no_writer_or_other_targets_is_refused():
    bad = [(("n1", "n2"),), (("writer", "writer"),), ()]
    for drops in bad:
        plan = FaultPlan(1, 10.0, (FaultEvent(1.0, "one_way", ("n1",), {"drops": drops}), FaultEvent(2.0, "heal", ())))
        assert any("one_way" in p for p in validate_plan(plan)), drops
    plan = FaultPlan(1, 10.0, (FaultEvent(1.0, "one_way", ("n2",), {"drops": (("writer", "n1"),)}), FaultEvent(2.0, "heal", ())))
    assert any("one_way" in p for p in validate_plan(plan))
    # An AZ down and two more one-way: four of six, over the budget.
    over = FaultPlan(1, 10.0, (FaultEvent(1.0, "az_down", ("n1", "n2"), {"az": "a"}),
                               FaultEvent(2.0, "one_way", ("n3", "n5"), {"drops": (("n3", "writer"), ("writer", "n5"))}),
                               FaultEvent(3.0, "heal", ()), FaultEvent(4.0, "az_up", ("n1", "n2"), {"az": "a"})))
    assert any("more than the budget" in p for p in validate_plan(over))


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32), st.floats(5.0, 600.0),
       st.sets(st.sampled_from(FAULT_NAMES), min_size=0).map(lambda s: s | {"one-way"}))
def test_one_way_drops_stay_inside_the_budget_at_every_step(seed, duration_s, faults):
    """Whatever else a plan holds, at most an AZ plus one node is lost at every step, a node at
    either end of a one-way drop counted lost; the oracle reads the rule apart from `replay`."""
    plan = generate_plan(seed, duration_s, faults)
    for e, (at_s, impaired, worst, _, _) in zip(plan.events, oracle_timeline(plan)):
        assert worst <= IMPAIRED_MAX, f"seed={seed}: {sorted(impaired)} lost after {e.kind} at {at_s}s"
        if e.kind == "one_way":
            assert set(e.targets) <= impaired
    assert validate_plan(plan) == []
    assert FaultPlan.from_json(plan.to_json()) == plan


def test_the_in_process_default_is_unchanged_by_the_one_way_family():
    """`one-way` is opt-in for the in-process targets: a seed's default plan is what it was."""
    import hashlib

    assert "one-way" not in DEFAULT_FAULTS
    plans = "".join(generate_plan(s, 60.0, DEFAULT_FAULTS).to_json() for s in range(10))
    # The digest of these ten plans before the family existed (main at abcb0b6).
    assert hashlib.sha256(plans.encode()).hexdigest()[:16] == "285837dddbcf02e5"
