"""The checkers say invalid for every bad history below, valid for every good one, and unknown
(quickly) when the search runs out of budget. Histories are written as scripts: `inv` is a
client invoking an op, `ok`/`fail`/`ind` its completion; entry order is real-time order."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.chaos.checker import (
    INVALID,
    UNKNOWN,
    VALID,
    check_all,
    check_batches_atomic,
    check_linearizable,
    check_no_lost_writes,
    check_replicas_converge,
    check_scans_well_formed,
    overall,
    render_table,
    verdicts_to_json,
)
from engine.chaos.history import (
    Entry,
    History,
    decode_bytes,
    dumps_jsonl,
    encode_bytes,
    loads_jsonl,
    pair_ops,
    read_jsonl,
)


class Script:
    """A tiny DSL over History for hand-made histories."""

    def __init__(self) -> None:
        self.h = History()

    def inv(self, process, f, **kw) -> int:
        return self.h.invoke(process, f, **kw)

    def ok(self, op: int, result=None) -> None:
        self.h.complete(op, "ok", result=result)

    def fail(self, op: int) -> None:
        self.h.complete(op, "fail", error="Unavailable: test")

    def ind(self, op: int) -> None:
        self.h.complete(op, "indeterminate", error="WriteIndeterminate: test")

    # Sequential shorthands: invoke and complete at once.
    def put(self, p, k: bytes, v: bytes, outcome: str = "ok") -> int:
        op = self.inv(p, "put", key=k, value=v)
        getattr(self, outcome)(op)
        return op

    def delete(self, p, k: bytes, outcome: str = "ok") -> int:
        op = self.inv(p, "delete", key=k)
        getattr(self, outcome)(op)
        return op

    def get(self, p, k: bytes, result, final: bool = False) -> int:
        op = self.inv(p, "get", key=k, final=final)
        self.ok(op, result)
        return op

    def batch(self, p, ops, outcome: str = "ok") -> int:
        op = self.inv(p, "batch", ops=ops)
        getattr(self, outcome)(op)
        return op

    def scan(self, p, start: bytes, end: bytes, result) -> int:
        op = self.inv(p, "scan", start=start, end=end)
        self.ok(op, result)
        return op

    def entries(self) -> tuple[Entry, ...]:
        return self.h.entries()


def by_name(verdicts):
    return {v.name: v for v in verdicts}


# ---------------------------------------------------------------------------------------------
# Bad histories: each must be invalid.


def test_stale_read_after_an_acknowledged_write_is_invalid():
    s = Script()
    s.put(1, b"x", b"v1")
    s.put(1, b"x", b"v2")
    s.get(2, b"x", b"v1")  # v2 was acknowledged before this read began
    v = check_linearizable(s.entries())
    assert v.result == INVALID, v
    assert "x" in v.detail
    # The window is the witness: the stale read, the write it missed and the write it saw.
    shown = {(e.f, e.value, e.result) for e in v.window}
    assert ("get", None, b"v1") in shown and ("put", b"v2", None) in shown and ("put", b"v1", None) in shown
    assert len(v.window) == 6  # exactly those three ops, invoked and completed


def test_lost_acknowledged_write_is_invalid():
    s = Script()
    s.put(1, b"x", b"v1")
    s.put(1, b"x", b"v2")
    s.get("final", b"x", b"v1", final=True)
    v = check_no_lost_writes(s.entries())
    assert v.result == INVALID, v
    assert "v2" in v.detail  # names the acknowledged write that is missing
    assert check_linearizable(s.entries()).result == INVALID


def test_final_read_of_nothing_after_acknowledged_put_is_a_lost_write():
    s = Script()
    s.delete(1, b"x")
    s.put(1, b"x", b"v1")
    s.get("final", b"x", None, final=True)
    v = check_no_lost_writes(s.entries())
    assert v.result == INVALID and "v1" in v.detail, v


def test_torn_batch_seen_by_a_scan_is_invalid():
    s = Script()
    s.put(1, b"a", b"a0")
    s.put(1, b"b", b"b0")
    # The batch and the scan overlap in time, so key by key the scan could be explained; as one
    # read point it cannot: it saw the batch on a but the value the batch overwrote on b.
    bt = s.inv(2, "batch", ops=[("put", b"a", b"a1"), ("put", b"b", b"b1")])
    sc = s.inv(3, "scan", start=b"a", end=b"z")
    s.ok(sc, [(b"a", b"a1"), (b"b", b"b0")])
    s.ok(bt)
    assert check_linearizable(s.entries()).result == VALID
    v = check_batches_atomic(s.entries())
    assert v.result == INVALID, v
    assert "torn" in v.detail
    assert {e.f for e in v.window} == {"batch", "scan", "put"}


def test_torn_batch_that_deleted_a_key_seen_by_a_scan_is_invalid():
    s = Script()
    s.put(1, b"b", b"b0")
    bt = s.inv(2, "batch", ops=[("put", b"a", b"a1"), ("delete", b"b", None)])
    sc = s.inv(3, "scan", start=b"a", end=b"z")
    s.ok(sc, [(b"a", b"a1"), (b"b", b"b0")])
    s.ok(bt)
    assert check_batches_atomic(s.entries()).result == INVALID


def test_scan_missing_a_key_the_batch_wrote_is_torn_when_no_delete_can_explain_it():
    s = Script()
    bt = s.inv(2, "batch", ops=[("put", b"a", b"a1"), ("put", b"b", b"b1")])
    sc = s.inv(3, "scan", start=b"a", end=b"z")
    s.ok(sc, [(b"a", b"a1")])  # b absent, yet nothing but the initial state leaves it absent
    s.ok(bt)
    assert check_batches_atomic(s.entries()).result == INVALID


def test_value_from_nowhere_is_invalid():
    s = Script()
    s.put(1, b"x", b"v1")
    s.get(2, b"x", b"ghost")
    v = check_linearizable(s.entries())
    assert v.result == INVALID and "never written" in v.detail, v


def test_read_of_a_failed_writes_value_is_invalid():
    s = Script()
    s.put(1, b"x", b"v1")
    s.put(1, b"x", b"v2", outcome="fail")
    s.get(2, b"x", b"v2")
    v = check_linearizable(s.entries())
    assert v.result == INVALID and "failed write" in v.detail, v
    assert any(e.type == "fail" for e in v.window)


def test_read_going_back_in_time_across_two_sequential_reads_is_invalid():
    s = Script()
    s.put(1, b"x", b"v1")
    w = s.inv(1, "put", key=b"x", value=b"v2")  # still running during both reads
    s.get(2, b"x", b"v2")
    s.get(2, b"x", b"v1")  # after seeing v2, v1 can never come back: it was written once
    s.ok(w)
    v = check_linearizable(s.entries())
    assert v.result == INVALID
    assert len(pair_ops(v.window)) == 4


def test_indeterminate_write_once_seen_cannot_unhappen():
    s = Script()
    s.put(1, b"x", b"v1")
    s.put(1, b"x", b"v2", outcome="ind")
    s.get(2, b"x", b"v2")
    s.get(2, b"x", b"v1")
    assert check_linearizable(s.entries()).result == INVALID


def test_scan_stale_after_acknowledged_write_is_invalid():
    s = Script()
    s.put(1, b"a", b"a1")
    s.delete(1, b"a")
    s.scan(2, b"a", b"z", [(b"a", b"a1")])
    assert check_linearizable(s.entries()).result == INVALID


def test_badly_ordered_scan_is_invalid():
    s = Script()
    s.put(1, b"a", b"1")
    s.put(1, b"b", b"2")
    s.scan(2, b"a", b"z", [(b"b", b"2"), (b"a", b"1")])
    assert check_scans_well_formed(s.entries()).result == INVALID
    s2 = Script()
    s2.put(1, b"q", b"1")
    s2.scan(2, b"a", b"c", [(b"q", b"1")])
    assert check_scans_well_formed(s2.entries()).result == INVALID


# ---------------------------------------------------------------------------------------------
# Good histories: each must be valid.


def test_indeterminate_write_that_took_effect_is_valid():
    s = Script()
    s.put(1, b"x", b"v1")
    s.put(1, b"x", b"v2", outcome="ind")
    s.get(2, b"x", b"v2")
    s.get("final", b"x", b"v2", final=True)
    assert overall(check_all(s.entries())) == VALID, render_table(check_all(s.entries()))


def test_indeterminate_write_that_did_not_take_effect_is_valid():
    s = Script()
    s.put(1, b"x", b"v1")
    s.put(1, b"x", b"v2", outcome="ind")
    s.get(2, b"x", b"v1")
    s.get("final", b"x", b"v1", final=True)
    assert overall(check_all(s.entries())) == VALID


def test_indeterminate_write_may_take_effect_late():
    s = Script()
    s.put(1, b"x", b"v1", outcome="ind")
    s.put(2, b"x", b"v2")
    s.get(3, b"x", b"v2")
    s.get("final", b"x", b"v1", final=True)  # the old indeterminate write landed last
    assert overall(check_all(s.entries())) == VALID


def test_invocation_without_completion_is_indeterminate():
    s = Script()
    s.inv(1, "put", key=b"x", value=b"v1")  # the client hung
    s.get(2, b"x", None)
    s.get(2, b"x", b"v1")
    s.get("final", b"x", b"v1", final=True)
    assert [o.type for o in pair_ops(s.entries())][0] == "indeterminate"
    assert overall(check_all(s.entries())) == VALID


@pytest.mark.parametrize("first,second", [(b"v1", b"v2"), (b"v2", b"v1")])
def test_concurrent_overlapping_writes_read_either_way_are_valid(first, second):
    s = Script()
    w1 = s.inv(1, "put", key=b"x", value=b"v1")
    w2 = s.inv(2, "put", key=b"x", value=b"v2")
    s.ok(w1)
    s.ok(w2)
    s.get(3, b"x", second)
    s.get("final", b"x", second, final=True)
    assert overall(check_all(s.entries())) == VALID
    # A read concurrent with both may also see the first, then the second.
    s = Script()
    w1 = s.inv(1, "put", key=b"x", value=b"v1")
    w2 = s.inv(2, "put", key=b"x", value=b"v2")
    s.get(3, b"x", first)
    s.get(3, b"x", second)
    s.ok(w1)
    s.ok(w2)
    assert check_linearizable(s.entries()).result == VALID


def test_failed_write_never_happened_is_valid():
    s = Script()
    s.put(1, b"x", b"v1")
    s.put(1, b"x", b"v2", outcome="fail")
    s.get(2, b"x", b"v1")
    s.get("final", b"x", b"v1", final=True)
    assert overall(check_all(s.entries())) == VALID


def test_whole_batches_seen_by_scans_are_valid():
    s = Script()
    s.put(1, b"a", b"a0")
    s.put(1, b"b", b"b0")
    bt = s.inv(2, "batch", ops=[("put", b"a", b"a1"), ("delete", b"b", None), ("put", b"c", b"c1")])
    s.scan(3, b"a", b"z", [(b"a", b"a0"), (b"b", b"b0")])  # none of it
    s.scan(3, b"a", b"z", [(b"a", b"a1"), (b"c", b"c1")])  # all of it
    s.ok(bt)
    s.scan(3, b"b", b"c", [])  # a range holding only part of the batch
    for k, v in ((b"a", b"a1"), (b"b", None), (b"c", b"c1")):
        s.get("final", k, v, final=True)
    vs = check_all(s.entries())
    assert overall(vs) == VALID, render_table(vs)


def test_scan_seeing_a_batch_and_a_later_write_is_valid():
    s = Script()
    s.put(1, b"b", b"b0")
    s.batch(2, [("put", b"a", b"a1"), ("put", b"b", b"b1")])
    w = s.inv(1, "put", key=b"b", value=b"b2")
    s.scan(3, b"a", b"z", [(b"a", b"a1"), (b"b", b"b2")])
    s.ok(w)
    assert overall(check_all(s.entries())[1:3]) == VALID


def test_delete_then_final_nothing_is_valid():
    s = Script()
    s.put(1, b"x", b"v1")
    s.delete(1, b"x")
    s.get("final", b"x", None, final=True)
    s.get("final", b"y", None, final=True)  # a key never written
    assert overall(check_all(s.entries())) == VALID


def test_no_final_reads_is_unknown_for_lost_writes():
    s = Script()
    s.put(1, b"x", b"v1")
    assert check_no_lost_writes(s.entries()).result == UNKNOWN


# ---------------------------------------------------------------------------------------------
# Budget: unknown, quickly, never a hang.


def _hard_history(n: int) -> tuple[Entry, ...]:
    """n concurrent writes, then three sequential reads v0, v1, v0: not linearizable (v0 was
    written once), but proving it visits about n * 2**(n-1) states."""
    s = Script()
    ws = [s.inv(i, "put", key=b"x", value=b"v%d" % i) for i in range(n)]
    for w in ws:
        s.ok(w)
    s.get("r", b"x", b"v0")
    s.get("r", b"x", b"v1")
    s.get("r", b"x", b"v0")
    return s.entries()


def test_small_hard_history_is_invalid_given_time_and_its_window_is_minimal():
    v = check_linearizable(_hard_history(8), time_budget_s=30)
    assert v.result == INVALID
    # Two writes and two reads suffice: after all writes completed, v0 then v1 cannot be read.
    ops = pair_ops(v.window)
    assert sorted((o.f, o.value or o.result) for o in ops) == [
        ("get", b"v0"), ("get", b"v1"), ("put", b"v0"), ("put", b"v1")]
    assert check_linearizable(v.window).result == INVALID


def test_search_over_a_tiny_budget_returns_unknown_quickly():
    entries = _hard_history(18)
    t0 = time.monotonic()
    v = check_linearizable(entries, time_budget_s=0.05)
    assert v.result == UNKNOWN, v
    assert time.monotonic() - t0 < 2.0


def test_search_budget_uses_the_injected_clock():
    ticks = iter(range(10**9))
    v = check_linearizable(_hard_history(18), time_budget_s=5, clock=lambda: float(next(ticks)))
    assert v.result == UNKNOWN
    assert overall(check_all(_hard_history(18), time_budget_s=5, clock=lambda: float(next(ticks)))) == UNKNOWN


def test_memo_bound_returns_unknown():
    assert check_linearizable(_hard_history(12), cache_max=100).result == UNKNOWN


# ---------------------------------------------------------------------------------------------
# Replica digests.


def test_replicas_converge():
    same = {0: {f"n{i}": "abc" for i in range(1, 7)}, 1: {f"n{i}": "def" for i in range(1, 7)}}
    assert check_replicas_converge(same).result == VALID
    differ = {0: dict(same[0], n4="xyz")}
    v = check_replicas_converge(differ)
    assert v.result == INVALID and "n4" in v.detail
    assert check_replicas_converge({0: dict(same[0], n2=None)}).result == UNKNOWN
    assert check_replicas_converge({}).result == UNKNOWN


# ---------------------------------------------------------------------------------------------
# The file format and presentation.


def test_history_jsonl_round_trip_and_byte_identical(tmp_path):
    def build() -> History:
        s = Script()
        s.put(1, b"k\x00bin", b"\xff\xfe")
        s.put(1, b"hex:looks-marked", b"plain text")
        s.batch(2, [("put", b"a", b"1"), ("delete", b"b", None)])
        s.scan(3, b"a", b"\xff", [(b"a", b"1")])
        s.get(3, b"b", None, final=True)
        s.inv(4, "put", key=b"z", value=b"open")
        return s.h

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    build().write_jsonl(str(a))
    build().write_jsonl(str(b))
    assert a.read_bytes() == b.read_bytes()
    entries = build().entries()
    assert read_jsonl(str(a)) == entries
    assert loads_jsonl(dumps_jsonl(entries, include_time=False)) == entries  # time = logical step
    first = json.loads(a.read_text().splitlines()[0])
    assert first["key"].startswith("hex:") and first["value"] == "hex:fffe"
    assert list(first) == sorted(first)
    for raw in (b"", b"abc", b"hex:abc", b"\x00", "é".encode(), b"\n"):
        assert decode_bytes(encode_bytes(raw)) == raw


def test_history_rejects_misuse():
    h = History()
    op = h.invoke(1, "get", key=b"x")
    with pytest.raises(AssertionError):
        h.invoke(1, "get", key=b"y")  # one outstanding op per process
    h.complete(op, "ok", result=b"v")
    with pytest.raises(AssertionError):
        h.complete(op, "ok")
    with pytest.raises(AssertionError):
        h.invoke(2, "put", key=b"x")  # a put needs a value
    with pytest.raises(AssertionError):
        h.complete(h.invoke(2, "get", key=b"x"), "maybe")


def test_history_uses_injected_clock():
    ns = iter(range(1000, 10**6, 7))
    h = History(clock_ns=lambda: next(ns))
    h.complete(h.invoke(1, "get", key=b"x"), "ok", result=None)
    assert [e.time for e in h.entries()] == [1000, 1007]


def test_render_table_and_json():
    s = Script()
    s.put(1, b"x", b"v1")
    s.put(1, b"x", b"v2")
    s.get("final", b"x", b"v1", final=True)
    vs = check_all(s.entries())
    table = render_table(vs)
    header = [c.strip() for c in table.splitlines()[0].split("|")]
    assert header == ["check", "verdict", "detail"]
    assert "no-lost-writes" in table and "invalid" in table and "overall: invalid" in table
    d = json.loads(verdicts_to_json(vs))
    assert d["overall"] == "invalid"
    assert {v["name"] for v in d["verdicts"]} >= {"linearizable", "no-lost-writes", "batches-atomic"}


def test_malformed_history_is_reported_not_raised():
    e = [Entry(index=0, process=1, type="ok", f="get", key=b"x")]
    vs = check_all(e)
    assert vs[0].name == "history-well-formed" and vs[0].result == INVALID
    assert overall(vs) == INVALID


# ---------------------------------------------------------------------------------------------
# Property: histories of a sequential dict model, with random concurrency windows around each
# op's linearization point, are always valid; changing one read to a never-written value makes
# them invalid.

KEYS = (b"a", b"b", b"c")


@st.composite
def model_history(draw):
    n = draw(st.integers(1, 24))
    model: dict[bytes, bytes] = {}
    spans = []  # (invoke_time, complete_time or None, invoke kwargs, f, outcome, result)
    for i in range(n):
        lin = 100 * (i + 1)  # op i takes effect at this instant, in this order
        f = draw(st.sampled_from(("put", "put", "get", "delete", "batch", "scan")))
        kw: dict = {}
        result = None
        if f in ("put", "delete", "batch"):
            outcome = draw(st.sampled_from(("ok", "ok", "ok", "fail", "applied", "lost", "open")))
            if f == "put":
                kw = dict(key=draw(st.sampled_from(KEYS)), value=b"v%d" % i)
                effect = [("put", kw["key"], kw["value"])]
            elif f == "delete":
                kw = dict(key=draw(st.sampled_from(KEYS)))
                effect = [("delete", kw["key"], None)]
            else:
                ks = draw(st.lists(st.sampled_from(KEYS), min_size=1, max_size=3, unique=True))
                effect = [
                    ("put", k, b"v%d.%d" % (i, j)) if draw(st.booleans()) else ("delete", k, None)
                    for j, k in enumerate(ks)
                ]
                kw = dict(ops=effect)
            # ok and "applied" (indeterminate that took effect) change the model; fail and "lost"
            # (indeterminate that did not) do not; "open" never completes and may go either way.
            applies = outcome in ("ok", "applied") or (outcome == "open" and draw(st.booleans()))
            if applies:
                for bf, k, v in effect:
                    if bf == "put":
                        model[k] = v
                    else:
                        model.pop(k, None)
        else:
            outcome = draw(st.sampled_from(("ok", "ok", "ok", "fail")))
            if f == "get":
                kw = dict(key=draw(st.sampled_from(KEYS)))
                result = model.get(kw["key"])
            else:
                lo = draw(st.integers(0, 2))
                hi = draw(st.integers(lo + 1, 3))
                start = KEYS[lo]
                end = KEYS[hi] if hi < 3 else b"\xff"
                kw = dict(start=start, end=end)
                result = [(k, v) for k, v in sorted(model.items()) if start <= k < end]
        invoke_t = lin - draw(st.integers(1, 250))
        complete_t = None if outcome == "open" else lin + draw(st.integers(1, 250))
        spans.append((invoke_t, complete_t, kw, f, outcome, result))
    events = []
    for i, (it, ct, *_rest) in enumerate(spans):
        events.append((it, 0, i))
        if ct is not None:
            events.append((ct, 1, i))
    events.sort()
    h = History()
    ids = {}
    for _, kind, i in events:
        it, ct, kw, f, outcome, result = spans[i]
        if kind == 0:
            ids[i] = h.invoke(i, f, **kw)
        elif outcome == "ok":
            h.complete(ids[i], "ok", result=result if f in ("get", "scan") else None)
        elif outcome == "fail":
            h.complete(ids[i], "fail")
        else:
            h.complete(ids[i], "indeterminate")
    for k in KEYS:
        h.complete(h.invoke("final", "get", key=k, final=True), "ok", result=model.get(k))
    return h.entries()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model_history())
def test_model_histories_are_valid(entries):
    vs = check_all(entries, time_budget_s=30)
    assert all(v.result == VALID for v in vs), render_table(vs)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model_history(), st.data())
def test_one_read_of_a_never_written_value_is_invalid(entries, data):
    reads = [e for e in entries if e.type == "ok" and e.f == "get"]
    target = data.draw(st.sampled_from(reads))
    mutated = [dataclasses.replace(e, result=b"never-written") if e is target else e for e in entries]
    vs = check_all(mutated, time_budget_s=30)
    lin = by_name(vs)["linearizable"]
    assert lin.result == INVALID, render_table(vs)
    assert overall(vs) == INVALID
    # The window is a witness by itself.
    assert check_linearizable(lin.window).result == INVALID


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model_history(), st.data())
def test_one_stale_read_window_is_a_self_contained_witness(entries, data):
    """Mutating a read to an older value may or may not be a violation (concurrency can explain
    it); whenever the checker says invalid, its window alone must be invalid too."""
    reads = [e for e in entries if e.type == "ok" and e.f == "get"]
    target = data.draw(st.sampled_from(reads))
    older = [e.value for e in entries if e.f == "put" and e.key == target.key and e.index < target.index]
    older += [None]
    mutated = [dataclasses.replace(e, result=data.draw(st.sampled_from(older))) if e is target else e
               for e in entries]
    lin = check_linearizable(mutated, time_budget_s=30)
    assert lin.result in (VALID, INVALID)
    if lin.result == INVALID:
        assert lin.window and check_linearizable(lin.window).result == INVALID


# ---------------------------------------------------------------------------------------------
# The search against a brute-force oracle: every order of every allowed subset of ops.

from itertools import combinations, permutations  # noqa: E402

from engine.chaos.checker import RegisterOp, search_register  # noqa: E402
from engine.chaos.history import Op  # noqa: E402


def brute_force_linearizable(reg) -> bool:
    determinate = [i for i, r in enumerate(reg) if r.ret is not None]
    optional = [i for i, r in enumerate(reg) if r.ret is None]
    for k in range(len(optional) + 1):
        for subset in combinations(optional, k):
            chosen = determinate + list(subset)
            for order in permutations(chosen):
                pos = {op: n for n, op in enumerate(order)}
                if any(reg[a].ret is not None and reg[a].ret < reg[b].call and pos[a] > pos[b]
                       for a in chosen for b in chosen):
                    continue
                state, good = None, True
                for i in order:
                    if reg[i].is_write:
                        state = reg[i].value
                    elif reg[i].value != state:
                        good = False
                        break
                if good:
                    return True
    return False


@st.composite
def register_history(draw):
    n = draw(st.integers(1, 6))
    times = draw(st.permutations(list(range(2 * n))))
    dummy = Op(process=0, f="get", type="ok", call=0, ret=1, completion=1, key=b"x")
    reg = []
    for i in range(n):
        call, ret = sorted(times[2 * i: 2 * i + 2])
        is_write = draw(st.booleans())
        value = draw(st.sampled_from((None, b"1", b"2", b"3")))  # values repeat: harder than real runs
        if is_write and draw(st.integers(0, 3)) == 0:
            ret = None  # indeterminate
        reg.append(RegisterOp(dummy, is_write, value, call, ret))
    return reg


@settings(max_examples=500, deadline=None)
@given(register_history())
def test_search_agrees_with_brute_force(reg):
    got = search_register(reg, deadline_s=time.monotonic() + 30).result
    assert got == (VALID if brute_force_linearizable(reg) else INVALID)


def test_malformed_history_file_is_reported(tmp_path):
    path = tmp_path / "history.jsonl"
    path.write_text(
        '{"f":"put","index":0,"key":"x","process":1,"type":"invoke"}\n'
        '{"f":"put","index":1,"key":"x","process":1,"type":"ok"}\n'
    )
    vs = check_all(read_jsonl(str(path)))
    assert vs[0].result == INVALID and "value" in vs[0].detail
