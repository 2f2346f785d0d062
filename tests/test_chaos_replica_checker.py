"""The replica-read checks (engine.chaos.checker, section (e)) say invalid for every bad history
below and valid for every good one: replica reads return written values, a session's replica
reads of a key never go backwards, and a read with `after=` sees every write its position covers
(or a newer one). Replica reads are left out of the linearizability check: a replica may be
behind. Histories are scripts as in test_chaos_checker.py; entry order is real-time order."""

from __future__ import annotations

import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.chaos.checker import INVALID, UNKNOWN, VALID, check_all, check_linearizable, check_replica_reads
from engine.chaos.history import History, dumps_jsonl, loads_jsonl, pair_ops

K, K2 = b"k000", b"k001"


class Script:
    def __init__(self) -> None:
        self.h = History()
        self.commit = 0

    def inv(self, process, f, **kw) -> int:
        return self.h.invoke(process, f, **kw)

    def ok(self, op: int, result=None, commit=None) -> None:
        self.h.complete(op, "ok", result=result, commit=commit)

    def write_ok(self, op: int) -> int:
        self.commit += 10
        self.h.complete(op, "ok", commit=self.commit)
        return self.commit

    def put(self, p, k: bytes, v: bytes, session=None, outcome: str = "ok") -> int:
        """A put that completes at once; returns its commit position (ok) or 0."""
        op = self.inv(p, "put", key=k, value=v, session=session)
        if outcome == "ok":
            return self.write_ok(op)
        self.h.complete(op, outcome, error="test")
        return 0

    def delete(self, p, k: bytes, session=None) -> int:
        return self.write_ok(self.inv(p, "delete", key=k, session=session))

    def rget(self, session, k: bytes, result, after=None) -> int:
        op = self.inv(f"s{session}", "get", key=k, session=session, replica=True, after=after)
        self.ok(op, result)
        return op

    def rscan(self, session, start: bytes, end: bytes, result, after=None) -> int:
        op = self.inv(f"s{session}", "scan", start=start, end=end, session=session, replica=True, after=after)
        self.ok(op, tuple(result))
        return op

    def verdicts(self) -> dict[str, str]:
        return {v.name: v.result for v in check_replica_reads(self.h)}

    def verdict(self, name: str):
        return next(v for v in check_replica_reads(self.h) if v.name == name)


# --- monotonic per session ------------------------------------------------------------------

def test_forward_reads_in_a_session_are_valid():
    s = Script()
    s.put(1, K, b"v1")
    s.rget(0, K, None)  # a replica may be behind: nothing yet, though v1 is acknowledged
    s.rget(0, K, b"v1")
    s.put(1, K, b"v2")
    s.rget(0, K, b"v1")  # still behind: allowed
    s.rget(0, K, b"v2")
    assert s.verdicts() == {"replica-reads-written": VALID, "replica-reads-monotonic": VALID, "replica-read-after": UNKNOWN}


def test_a_read_going_back_to_a_certainly_older_write_is_invalid():
    s = Script()
    s.put(1, K, b"v1")
    s.put(1, K, b"v2")  # invoked after v1 was acknowledged: v1 is certainly older
    s.rget(0, K, b"v2")
    s.rget(0, K, b"v1")
    v = s.verdict("replica-reads-monotonic")
    assert v.result == INVALID, v
    assert "session 0" in v.detail and "v1" in v.detail and v.window


def test_other_sessions_may_see_other_points():
    s = Script()
    s.put(1, K, b"v1")
    s.put(1, K, b"v2")
    s.rget(0, K, b"v2")
    s.rget(7, K, b"v1")  # another session: replicas need not agree with each other
    assert s.verdict("replica-reads-monotonic").result == VALID


def test_overlapping_writes_read_in_either_order_are_valid():
    s = Script()
    a = s.inv(1, "put", key=K, value=b"v1")
    b = s.inv(2, "put", key=K, value=b"v2")
    s.write_ok(a)
    s.write_ok(b)
    s.rget(0, K, b"v2")
    s.rget(0, K, b"v1")  # the log may hold v2 before v1: nothing certain
    assert s.verdict("replica-reads-monotonic").result == VALID


def test_a_value_that_comes_back_is_invalid_even_for_overlapping_writes():
    s = Script()
    a = s.inv(1, "put", key=K, value=b"v1")
    b = s.inv(2, "put", key=K, value=b"v2")
    s.write_ok(a)
    s.write_ok(b)
    s.rget(0, K, b"v1")
    s.rget(0, K, b"v2")
    s.rget(0, K, b"v1")  # v1 was written once: in no order can the register return to it
    v = s.verdict("replica-reads-monotonic")
    assert v.result == INVALID and "came back" in v.detail, v


def test_a_value_that_comes_back_after_nothing_is_invalid():
    s = Script()
    s.put(1, K, b"v1")
    d = s.inv(2, "delete", key=K)
    s.rget(0, K, b"v1")
    s.rget(0, K, None)
    s.rget(0, K, b"v1")
    s.write_ok(d)
    assert s.verdict("replica-reads-monotonic").result == INVALID


def test_nothing_after_a_value_needs_a_delete_after_it():
    s = Script()
    s.put(1, K, b"v1")
    s.rget(0, K, b"v1")
    s.rget(0, K, None)  # only the initial state explains it, which precedes v1's write
    assert s.verdict("replica-reads-monotonic").result == INVALID
    s2 = Script()
    s2.put(1, K, b"v1")
    s2.delete(1, K)
    s2.rget(0, K, b"v1")
    s2.rget(0, K, None)  # the delete after v1
    assert s2.verdict("replica-reads-monotonic").result == VALID


def test_nothing_explained_only_by_a_delete_before_the_earlier_value_is_invalid():
    s = Script()
    s.delete(1, K)
    s.put(1, K, b"v1")
    s.rget(0, K, b"v1")
    s.rget(0, K, None)
    assert s.verdict("replica-reads-monotonic").result == INVALID


def test_a_value_older_than_every_delete_that_explains_an_earlier_nothing_is_invalid():
    s = Script()
    s.put(1, K, b"v1")
    s.delete(1, K)
    s.rget(0, K, None)  # the delete (not the initial state: ... it may be either)
    s.rget(0, K, b"v1")
    # The initial state explains the nothing too, and v1 is newer than it: valid.
    assert s.verdict("replica-reads-monotonic").result == VALID
    s2 = Script()
    s2.put(1, K, b"v0")
    s2.put(1, K, b"v1")
    s2.delete(1, K)
    s2.rget(0, K, b"v1")
    s2.rget(0, K, None)  # the delete after v1
    s2.rget(0, K, b"v0")  # older than v1 (and than the delete)
    assert s2.verdict("replica-reads-monotonic").result == INVALID


def test_scans_are_session_reads_of_every_key_in_range():
    s = Script()
    s.put(1, K, b"v1")
    s.put(1, K, b"v2")
    s.put(1, K2, b"w1")
    s.rscan(0, b"k", b"l", [(K, b"v2"), (K2, b"w1")])
    s.rget(0, K, b"v1")
    assert s.verdict("replica-reads-monotonic").result == INVALID
    s2 = Script()
    s2.put(1, K, b"v1")
    s2.put(1, K2, b"w1")
    s2.rget(0, K2, b"w1")
    s2.rscan(0, b"k", b"l", [(K, b"v1")])  # nothing for K2 after w1, and no delete of K2
    assert s2.verdict("replica-reads-monotonic").result == INVALID


# --- read-after ------------------------------------------------------------------------------

def test_a_read_after_my_put_sees_it_or_newer():
    s = Script()
    c = s.put(0, K, b"mine", session=0)
    s.rget(0, K, b"mine", after=c)
    s.put(1, K, b"newer")
    s.rget(0, K, b"newer", after=c)
    assert s.verdict("replica-read-after").result == VALID


def test_a_read_after_my_put_that_misses_it_is_invalid():
    s = Script()
    c = s.put(0, K, b"mine", session=0)
    s.rget(0, K, None, after=c)
    v = s.verdict("replica-read-after")
    assert v.result == INVALID and "found nothing" in v.detail, v
    s2 = Script()
    s2.put(1, K, b"old")
    c = s2.put(0, K, b"mine", session=0)
    s2.rget(0, K, b"old", after=c)
    v = s2.verdict("replica-read-after")
    assert v.result == INVALID and "older than" in v.detail, v


def test_a_read_after_an_earlier_position_may_miss_a_later_write():
    s = Script()
    s.put(1, K, b"old")
    c = s.put(0, K, b"mine", session=0)
    s.rget(0, K, b"old", after=c - 1)  # the position does not cover "mine"
    s.rget(0, K, b"old")  # no after=: any point
    assert s.verdict("replica-read-after").result == VALID


def test_a_position_covers_other_sessions_writes_too():
    s = Script()
    s.put(1, K, b"old")
    c = s.put(2, K, b"theirs")  # another client's write, at a position the read asks to cover
    s.rget(0, K, b"old", after=c + 5)
    assert s.verdict("replica-read-after").result == INVALID


def test_nothing_after_my_put_is_valid_when_a_delete_may_follow_it():
    s = Script()
    c = s.put(0, K, b"mine", session=0)
    d = s.inv(1, "delete", key=K)
    s.rget(0, K, None, after=c)
    s.h.complete(d, "indeterminate", error="test")
    assert s.verdict("replica-read-after").result == VALID


def test_an_indeterminate_write_has_no_position_to_cover():
    s = Script()
    s.put(1, K, b"old")
    op = s.inv(0, "put", key=K, value=b"maybe", session=0)
    s.h.complete(op, "indeterminate", error="WriteIndeterminate: test")
    s.rget(0, K, b"old", after=10**6)
    assert s.verdict("replica-read-after").result == VALID


# --- written values -------------------------------------------------------------------------

def test_replica_reads_of_values_nobody_wrote_are_invalid():
    s = Script()
    s.rget(0, K, b"ghost")
    assert s.verdict("replica-reads-written").result == INVALID
    s2 = Script()
    s2.put(1, K, b"failed", outcome="fail")
    s2.rget(0, K, b"failed")
    v = s2.verdict("replica-reads-written")
    assert v.result == INVALID and "failed" in v.detail
    s3 = Script()
    s3.rget(0, K, b"future")
    s3.put(1, K, b"future")  # invoked after the read returned
    v = s3.verdict("replica-reads-written")
    assert v.result == INVALID and "after the read returned" in v.detail
    s4 = Script()
    b = s4.inv(1, "batch", ops=[("put", K, b"first"), ("put", K, b"second")])
    s4.write_ok(b)
    s4.rget(0, K, b"first")
    assert "intermediate" in s4.verdict("replica-reads-written").detail


# --- the other checks leave replica reads alone -----------------------------------------------

def test_a_stale_replica_read_is_not_a_linearizability_violation():
    s = Script()
    s.put(1, K, b"v1")
    s.rget(0, K, None)
    assert check_linearizable(s.h).result == VALID
    stale = Script()
    stale.put(1, K, b"v1")
    op = stale.inv(0, "get", key=K)  # the same read on the writer endpoint: stale
    stale.ok(op, None)
    assert check_linearizable(stale.h).result == INVALID


def test_check_all_adds_the_replica_checks_only_for_histories_with_replica_reads():
    s = Script()
    s.put(1, K, b"v1")
    names = [v.name for v in check_all(s.h)]
    assert not any(n.startswith("replica-") for n in names)
    s.rget(0, K, b"v1", after=10)
    names = {v.name: v.result for v in check_all(s.h)}
    assert names["replica-reads-monotonic"] == VALID and names["replica-read-after"] == VALID


def test_replica_fields_round_trip_and_old_histories_load():
    s = Script()
    c = s.put(0, K, b"v1", session=0)
    s.rget(0, K, b"v1", after=c)
    text = dumps_jsonl(s.h.entries())
    assert '"replica":true' in text and f'"after":{c}' in text and f'"commit":{c}' in text and '"session":0' in text
    again = loads_jsonl(text)
    assert again == s.h.entries()
    ops = pair_ops(again)
    assert ops[0].commit == c and ops[1].replica and ops[1].after == c and ops[1].session == 0
    old = '{"f":"put","index":0,"key":"k","process":0,"type":"invoke","value":"v"}\n' \
          '{"f":"put","index":1,"key":"k","process":0,"type":"ok","value":"v"}\n'
    (op,) = pair_ops(loads_jsonl(old))
    assert op.commit is None and not op.replica and op.session is None


def test_history_rejects_replica_misuse():
    import pytest

    h = History()
    with pytest.raises(AssertionError):
        h.invoke(0, "put", key=K, value=b"v", replica=True)  # a replica serves no writes
    with pytest.raises(AssertionError):
        h.invoke(0, "put", key=K, value=b"v", after=3)  # only reads wait for a position
    with pytest.raises(AssertionError):
        h.invoke(0, "get", key=K, after=-1)
    op = h.invoke(0, "get", key=K, replica=True)
    with pytest.raises(AssertionError):
        h.complete(op, "ok", result=None, commit=5)  # only an ok write has a commit position


# --- properties -------------------------------------------------------------------------------

def _model(draw_plan):
    """A history from a model of a correct replica: one writer appends to a log (each write
    acknowledged before the next, with increasing commit positions); a session reads at read
    points that never go back, and, with after=, at a point at least that position."""
    s = Script()
    log: list[tuple[bytes, bytes | None, int]] = []  # (key, value, commit)
    read_point = 0
    reads = []  # (op id, key, read point)
    for step, (kind, key, jump, with_after) in enumerate(draw_plan):
        if kind == "write":
            value = None if jump % 5 == 0 else b"v%d" % step
            c = s.delete(1, key) if value is None else s.put(1, key, value)
            log.append((key, value, c))
            continue
        newest = log[-1][2] if log else 0
        after = None
        if with_after and log:
            after = log[jump % len(log)][2]
        low = max(read_point, after or 0)
        # Often the newest position (a replica that keeps up), else a little ahead of the last.
        read_point = newest if jump >= 4 else min(newest, low + 10 * jump)
        value = None
        for k, v, c in log:
            if k == key and c <= read_point:
                value = v
        op = s.rget(0, key, value, after=after)
        reads.append((op, key, read_point))
    return s, log, reads


plans = st.lists(
    st.tuples(st.sampled_from(["write", "read"]), st.sampled_from([K, K2]), st.integers(0, 6), st.booleans()),
    min_size=4, max_size=50,
)


@settings(max_examples=200, deadline=None)
@given(plans)
def test_model_replica_histories_are_valid(plan):
    s, _, _ = _model(plan)
    v = s.verdicts()
    assert INVALID not in v.values(), [x for x in check_replica_reads(s.h)]


@settings(max_examples=200, deadline=None)
@given(plans, st.data())
def test_a_session_read_moved_to_an_older_write_is_caught(plan, data):
    """Take a model history and make one read return a value certainly older than what an
    earlier read of the same key in the session saw: the monotonic check must say invalid."""
    s, log, reads = _model(plan)
    candidates = []
    for i, (op_i, key, rp_i) in enumerate(reads):
        seen = [c for k, v, c in log if k == key and c <= rp_i]
        if not seen or [v for k, v, c in log if c == seen[-1]][0] is None:
            continue
        older = [(v, c) for k, v, c in log if k == key and c < seen[-1] and v is not None]
        later = [j for j in range(i + 1, len(reads)) if reads[j][1] == key]
        if older and later:
            candidates.append((older, later))
    if not candidates:
        return
    older, later = data.draw(st.sampled_from(candidates))
    value, _ = data.draw(st.sampled_from(older))
    j = data.draw(st.sampled_from(later))
    entries = list(s.h.entries())
    target = reads[j][0]
    completion = next(e for e in entries if e.index > target and e.process == entries[target].process)
    entries[completion.index] = dataclasses.replace(completion, result=value)
    verdicts = {v.name: v.result for v in check_replica_reads(entries)}
    assert verdicts["replica-reads-monotonic"] == INVALID


# --- failovers (the cluster target's records of its writer faults) ------------------------------

def test_failover_records_judged():
    from engine.chaos.checker import check_failovers

    kill = {"kind": "writer_kill", "at_s": 1.0, "old_pid": 10, "took_over": True, "takeover_s": 2.5, "new_pid": 11}
    pause = {"kind": "writer_pause", "at_s": 5.0, "old_pid": 11, "took_over": True, "takeover_s": 1.5, "new_pid": 12,
             "stepped_down": True}
    kept = {"kind": "writer_partition", "at_s": 9.0, "old_pid": 12, "took_over": False, "kept": True}
    v = check_failovers([kill, pause, kept])
    assert v.result == VALID and "2 takeovers" in v.detail and "1 old writers stepped down" in v.detail and "1 kept" in v.detail
    still_running = dict(pause, stepped_down=False)
    v = check_failovers([kill, still_running])
    assert v.result == INVALID and "must step down" in v.detail
    unanswered = dict(kill, took_over=False, takeover_s=None)
    v = check_failovers([unanswered])
    assert v.result == INVALID and "no reader took over" in v.detail
    assert check_failovers([unanswered], liveness=False).result == VALID, "unbounded: safety only"
    skipped = dict(kill, skipped="no live reader")
    assert check_failovers([skipped]).result == UNKNOWN
    assert "1 skipped" in check_failovers([kill, skipped]).detail
    assert check_failovers([]).result == UNKNOWN
