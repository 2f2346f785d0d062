"""Fault plans are data: the same seed gives the same plan, JSON round-trips it exactly, every
fault is healed before the final healing period, and unless a plan is unbounded at most three
of the six segments are impaired at any instant. The budget is checked here by an independent
replay, not only by the module's own `replay`."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.chaos.plan import (
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
from engine.errors import InvalidArgument

NODES = dict(DEFAULT_NODES)


def oracle_impaired_after_each_event(plan: FaultPlan) -> list[tuple[float, set[str], bool]]:
    """A second, plain reading of the rules: (time, impaired nodes, anything at all faulty)."""
    down, paused, cut, corrupt, dropping, timing = set(), set(), set(), set(), set(), {}
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
            (writer_side,) = [set(g) for g in e.param("groups") if WRITER in g]
            cut = set(NODES) - writer_side
        elif k == "heal":
            cut = set()
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
        impaired = down | paused | cut | corrupt | dropping
        faulty = bool(impaired) or any(timing.values())
        out.append((e.at_s, impaired, faulty))
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
    timeline = oracle_impaired_after_each_event(plan)
    for at_s, impaired, _ in timeline:
        assert len(impaired) <= IMPAIRED_MAX, f"seed={seed}: {sorted(impaired)} impaired at {at_s}s"
    if timeline:
        assert timeline[-1][1] == set() and not timeline[-1][2], f"seed={seed}: not healed"
    assert plan.healed_at_s <= duration_s * (1 - TAIL_FRACTION) + 1e-9, "a healing period ends the plan"
    assert validate_plan(plan) == []
    assert max_impaired(plan) == max((len(i) for _, i, _ in timeline), default=0)


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
        for e in plan.events:
            if e.kind == "partition":
                named = sorted(m for g in e.param("groups") for m in g)
                assert named == sorted(list(NODES) + [WRITER])
    assert kinds >= {"kill", "restart", "pause", "resume", "partition", "heal", "az_down", "az_up",
                     "corrupt", "scrub", "writer_crash", "slow", "unslow", "clear"}
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
