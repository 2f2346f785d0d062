"""The chaos workload's compare-and-set operations and their check: a linearizable register
with CAS. A cas that applied is a write guarded by "the register held what it expected", a
refused one an observation that it did not; the real engine's conditional writes must pass."""

from __future__ import annotations

import engine
from engine.chaos.checker import INVALID, VALID, check_all, check_linearizable, overall, render_table
from engine.chaos.history import History, dumps_jsonl, loads_jsonl, pair_ops
from engine.chaos.runner import CAS_MIX
from engine.chaos.workload import Workload


def _history(steps) -> History:
    """Sequential ops: (process, f, kwargs, completion type, completion kwargs)."""
    h = History()
    for process, f, kw, outcome, done in steps:
        op = h.invoke(process, f, **kw)
        h.complete(op, outcome, **done)
    return h


def test_a_cas_that_applied_on_a_value_already_replaced_is_caught():
    h = _history([
        (1, "put", dict(key=b"k", value=b"a"), "ok", {}),
        (1, "cas", dict(key=b"k", value=b"b", expected=b"a"), "ok", dict(result=True)),
        (2, "cas", dict(key=b"k", value=b"c", expected=b"a"), "ok", dict(result=True)),  # a lost update
        (2, "get", dict(key=b"k"), "ok", dict(result=b"c")),
    ])
    v = check_linearizable(h)
    assert v.result == INVALID, v.detail


def test_a_cas_refused_although_the_register_held_its_value_is_caught():
    h = _history([
        (1, "put", dict(key=b"k", value=b"a"), "ok", {}),
        (2, "cas", dict(key=b"k", value=b"b", expected=b"a"), "ok", dict(result=False)),
        (1, "get", dict(key=b"k"), "ok", dict(result=b"a")),
    ])
    assert check_linearizable(h).result == INVALID
    # ... and one refused because the key was absent while it expected a value is fine.
    h = _history([(2, "cas", dict(key=b"k", value=b"b", expected=b"a"), "ok", dict(result=False)),
                  (1, "cas", dict(key=b"k", value=b"c"), "ok", dict(result=True)),
                  (1, "get", dict(key=b"k"), "ok", dict(result=b"c"))])
    assert check_linearizable(h).result == VALID


def test_an_indeterminate_cas_may_have_applied_or_not():
    for seen in (b"a", b"b"):
        h = _history([
            (1, "put", dict(key=b"k", value=b"a"), "ok", {}),
            (2, "cas", dict(key=b"k", value=b"b", expected=b"a"), "indeterminate", dict(error="lost reply")),
            (1, "get", dict(key=b"k"), "ok", dict(result=seen)),
        ])
        assert check_linearizable(h).result == VALID
    h = _history([
        (1, "put", dict(key=b"k", value=b"z"), "ok", {}),
        (2, "cas", dict(key=b"k", value=b"b", expected=b"a"), "indeterminate", dict(error="lost reply")),
        (1, "get", dict(key=b"k"), "ok", dict(result=b"b")),  # its guard never held
    ])
    assert check_linearizable(h).result == INVALID


def test_cas_entries_round_trip_through_jsonl():
    h = _history([(1, "cas", dict(key=b"k", value=b"v", expected=b"\xff"), "ok", dict(result=False)),
                  (1, "cas", dict(key=b"k", value=b"w"), "ok", dict(result=True, commit=7))])
    again = loads_jsonl(dumps_jsonl(h.entries()))
    assert again == h.entries()
    ops = pair_ops(again)
    assert [(o.expected, o.result) for o in ops] == [(b"\xff", False), (None, True)]


def test_the_engine_passes_a_contended_cas_workload(tmp_path):
    with engine.open(tmp_path / "v", durable=False, protection_groups=2) as db:
        history = History()
        w = Workload(db, history, seed=14, clients=4, keys=2, mix=CAS_MIX, ops_max=400, duration_s=60)
        w.run(join_timeout_s=60)
        w.final_reads()
    vs = check_all(history)
    assert overall(vs) == VALID, render_table(vs)
    cas = [o for o in pair_ops(history.entries()) if o.f == "cas"]
    assert {o.result for o in cas if o.type == "ok"} == {True, False}, "no contention: every cas applied (or none)"
