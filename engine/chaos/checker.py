"""Checkers for a fault-injection history: valid, invalid or unknown, with the evidence.

Theory of operation
-------------------
Each checker reads the paired operations of a `History` (`history.pair_ops`) and returns a frozen
`Verdict(name, result, detail, window)`: `valid`, `invalid` (with a sentence and the history
entries that show it), or `unknown` (it could not decide: time budget spent, nothing to judge).
A checker never says `invalid` unless no execution the API allows explains the history; an
`indeterminate` write may have taken effect at any time after its invocation, or never, and a
`fail` write never did. Checkers do no I/O; the only clock is the injected one that bounds
the search.

Real time is the history's order: op A precedes op B when A's completion entry comes before B's
invocation entry. Every written value is unique (the workload makes it so), which is what lets a
read name the write it saw; the search itself does not need it, and (c) takes as evidence only
values that were written once.

(a) `linearizable`: per key, the database must behave as one register. Linearizability is
local (Herlihy & Wing), so for single-key ops checking key by key is exact and keeps each search
small; batches and scans span keys, and their projections below check each key's part (what
atomicity across keys adds is (c)'s job). Projection: put sets the value, delete sets None,
get reads; a batch is a write to each of its keys (the last op of the key in the batch) with the
batch's invoke and completion; a scan is a read of every key of the history in [start, end):
the value it returned or None. A compare-and-set (`cas`, expected -> value) that applied is a
write guarded by "the register held expected"; one refused (its precondition failed) writes
nothing and is guarded by "it did not"; one indeterminate is a guarded write that may be left
out (a linearizable register with CAS). Fail writes and failed reads are removed; an indeterminate write
has completion +infinity and may be left out of the linearization. Indeterminate writes whose
value no read returned are dropped first: including one never changes what a read may see, so
it cannot change the answer, and it would only widen the search. The search is Wing & Gong's
with Lowe's memoisation of (linearized set as a bitmask, register value), as in Porcupine: walk
the calls that may go next in real-time order, linearize one if the register allows it, and
backtrack at the first completion whose op is not yet linearized. A deadline (checked every
`_CLOCK_EVERY` steps) and a bound on the memo make it end with `unknown`, never hang. On
`invalid` the window is the smallest failing window: start from the op the deepest search path
could not place, the ops concurrent with it and the write that set the register there (a
prefix of the key, or the whole key, if that is not yet a contradiction), then remove ops while
what is left stays non-linearizable *on its own*. Only reads, and writes whose value no
remaining read returned, are removed: such removals never create a contradiction, so the window
is a self-contained witness (nothing left out could explain it) and usually three or four ops.

(b) `no-lost-writes`: the final reads (`final: true`, taken at full health after the workload)
must see the effect of every acknowledged write. For a final read R of key k, a write W of k
(ok or indeterminate, invoked before R returned) may explain R's value unless W is *superseded*:
some ok write W2 of k began after W completed and completed before R began, so W2 lies between W
and R in every linearization. The initial None is a write that precedes everything. R's value
must come from a write that is not superseded; otherwise the detail names the acknowledged
write that is missing.

(c) `batches-atomic`: a scan is one read point, so it sees all of a batch or none. If a scan S
returned a batch B's (unique) value for key k1, B had taken effect at S's read point, so for
every other key k2 of B in S's range, S must not return a value that B certainly overwrote:
a value whose only write completed before B was invoked (it precedes B in every linearization),
or None when every delete of k2 completed before B was invoked (the initial None precedes
everything too). Only unique values count as evidence, so the rule never accuses a correct
database; it adds to (a), which projects a scan key by key and cannot see a torn batch by itself.

(d) `check_replicas_converge`: after repair, every node's digest of a protection group is equal.

(e) Reads served by read replicas (`replica: true`: a reader instance, `engine.connect(folder,
role="reader")`) are not linearizable: a replica reads at its read point, a VDL it learned from
the writer, which may be behind. So (a) leaves them out, and (b) reads only the final reads;
(c) keeps replica scans (a replica scan is one read point too). What a replica promises is
checked instead, from what is decidable. "W2 is older than W1" (for writes of one key) is
taken to mean *certainly older*: W2 was acknowledged before W1 was invoked, so W2 precedes W1 in
every linearization (and in the log: W1's records were not even sent when W2 was durable). Two
writes that overlap in time may lie in the log either way, and nothing in the history says which
(a commit position is the system's own claim, and positions of units that interleave need not
order their keys' records), so a read of either is accepted, with one exception: a unique value
read, then something else, then that value again is a contradiction in every order (the value
was written once; the register would have gone back). The checks:

* `replica-reads-written`: a replica read returns the final value of a write of that key that
  did not fail and was invoked before the read returned (or nothing); never a value that was
  never written, written only by a failed write, or an intermediate value of a batch.
* `replica-reads-monotonic`: within one client session (`session`), replica reads of a key never
  go backwards. For the session's reads of the key in order, let each value name its write (or,
  for nothing, the initial state or any delete not certainly after the read): it is invalid when
  a later read's write is certainly older than an earlier read's, when a value comes back after
  another was read in between, or when a read of nothing has no source that is neither
  certainly older than an earlier read's write nor certainly newer than a later read's. Reads of
  nothing are judged each against the reads that returned values (not against each other), so
  the check is sound but can miss a contradiction carried only by several reads of nothing.
* `replica-read-after`: a replica read with `after=A` covers every write whose returned commit
  position (`commit`) is at most A; for each key it reads, its value's write must not be
  certainly older than any of those writes, and nothing may be returned only if some delete of
  the key is not certainly older than every one of them. This is "a read after my put sees it
  or a newer write", for the session's own put that returned A and for any other write the
  position covers.

(f) `check_failovers`: what the cluster target saw of its writer faults (not in the history: the
processes themselves). Invalid when a writer that another replaced still ran a bound after it
was resumed or reconnected (a fenced writer must step down by itself), or when no reader took
over from a killed writer within a bound; a fault skipped for want of a candidate is counted.

`check_all` runs (a) to (e) (the replica checks when the history has replica reads); `render_table` and `verdicts_to_json` present the verdicts.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

from engine.chaos.history import Entry, History, Op, entry_to_dict, pair_ops

VALID = "valid"
INVALID = "invalid"
UNKNOWN = "unknown"
RESULTS = (VALID, INVALID, UNKNOWN)

#: How often the search looks at the clock (steps), and how many memo entries it may hold.
_CLOCK_EVERY = 512
CACHE_ENTRIES_MAX = 2_000_000
#: A window shows at most this many operations.
WINDOW_OPS_MAX = 24
#: The shrinker starts only from windows up to this many ops, passes over them at most this
#: often, and spends at most this much of what is left of the time budget.
SHRINK_OPS_MAX = 400
SHRINK_PASSES_MAX = 4
SHRINK_S_MAX = 10.0
DETAIL_KEYS_MAX = 8
TIME_BUDGET_S_DEFAULT = 60.0


@dataclass(frozen=True)
class Verdict:
    """One checker's answer. `window` holds the history entries that show an `invalid`."""

    name: str
    result: str
    detail: str
    window: tuple[Entry, ...] = ()

    def __post_init__(self) -> None:
        if self.result not in RESULTS:
            raise AssertionError(f"a verdict is one of {RESULTS}, not {self.result!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "result": self.result,
            "detail": self.detail,
            "window": [entry_to_dict(e) for e in self.window],
        }


def _check(condition: bool, message: str) -> None:
    # Contracts that `python -O` cannot remove (TIGER_STYLE).
    if not condition:
        raise AssertionError(message)


def overall(verdicts: Iterable[Verdict]) -> str:
    """invalid if any is invalid, else unknown if any is unknown, else valid."""
    results = [v.result for v in verdicts]
    if INVALID in results:
        return INVALID
    if UNKNOWN in results:
        return UNKNOWN
    return VALID


# --------------------------------------------------------------------------------------------
# Describing ops for people.


def _b(x: bytes | None) -> str:
    if x is None:
        return "None"
    try:
        s = x.decode("utf-8")
        if s.isprintable():
            return s
    except UnicodeDecodeError:
        pass
    return "0x" + x.hex()


def describe_op(op: Op) -> str:
    """One line: '#12 p3 put k000=p3-7 ok'."""
    if op.f == "put":
        what = f"put {_b(op.key)}={_b(op.value)}"
    elif op.f == "delete":
        what = f"delete {_b(op.key)}"
    elif op.f == "get":
        what = f"get {_b(op.key)}" + (f" -> {_b(op.result)}" if op.type == "ok" else "")
    elif op.f == "batch":
        parts = [f"{f} {_b(k)}" + (f"={_b(v)}" if v is not None else "") for f, k, v in op.ops or ()]
        what = "batch[" + ", ".join(parts) + "]"
    elif op.f == "cas":
        what = f"cas {_b(op.key)} {_b(op.expected)}->{_b(op.value)}"
        if op.type == "ok":
            what += " applied" if op.result else " refused"
    else:
        what = f"scan [{_b(op.start)}, {_b(op.end)})"
        if op.type == "ok":
            what += " -> {" + ", ".join(f"{_b(k)}={_b(v)}" for k, v in op.result) + "}"
    final = " (final)" if op.final else ""
    extra = ""
    if op.replica:
        extra += " on a replica" + (f" after={op.after}" if op.after is not None else "")
    if op.session is not None:
        extra += f" session={op.session}"
    if op.commit is not None:
        extra += f" commit={op.commit}"
    return f"#{op.call} p={op.process} {what} {op.type}{final}{extra}"


def _window(ops: Iterable[Op], by_index: Mapping[int, Entry]) -> tuple[Entry, ...]:
    idx: set[int] = set()
    for op in ops:
        idx.add(op.call)
        if op.completion is not None:
            idx.add(op.completion)
    return tuple(by_index[i] for i in sorted(idx) if i in by_index)


# --------------------------------------------------------------------------------------------
# Projection onto per-key registers.


@dataclass(frozen=True)
class RegisterOp:
    """One op of one key's register: a write of `value` (None = absent) or a read of it."""

    source: Op
    is_write: bool
    value: bytes | None
    call: int
    ret: int | None  # None: +infinity (indeterminate write)
    #: a compare-and-set's guard on the register before it: "eq" (it held `expect`: a cas that
    #: applied, or may have), "ne" (it did not: a cas refused, which writes nothing and reads no
    #: value), "" none
    guard: str = ""
    expect: bytes | None = None


def _allowed(r: RegisterOp, state: bytes | None) -> bool:
    """Whether `r` can take effect on a register holding `state`."""
    if r.guard == "eq":
        return state == r.expect
    if r.guard == "ne":
        return state != r.expect
    return r.is_write or state == r.value


def _cas_ops(op: Op) -> list[RegisterOp]:
    """A cas as register ops: none if it failed (not logged), a guarded write if it applied or
    may have, a guarded observation if its precondition was refused."""
    if op.type == "fail":
        return []
    if op.type == "ok" and not op.result:
        return [RegisterOp(op, False, None, op.call, op.ret, "ne", op.expected)]
    return [RegisterOp(op, True, op.value, op.call, op.ret if op.type == "ok" else None, "eq", op.expected)]


def _batch_values(op: Op) -> dict[bytes, bytes | None]:
    """The value a batch leaves in each of its keys (the key's last op in the batch)."""
    out: dict[bytes, bytes | None] = {}
    for f, k, v in op.ops or ():
        out[k] = v if f == "put" else None
    return out


def _in_range(key: bytes, start: bytes, end: bytes) -> bool:
    return start <= key < end


def history_keys(ops: Sequence[Op]) -> list[bytes]:
    """Every key the history names (writes, gets, scan results), sorted."""
    keys: set[bytes] = set()
    for op in ops:
        if op.key is not None:
            keys.add(op.key)
        for _, k, _ in op.ops or ():
            keys.add(k)
        if op.f == "scan" and op.type == "ok":
            keys.update(k for k, _ in op.result)
    return sorted(keys)


def project(ops: Sequence[Op]) -> dict[bytes, list[RegisterOp]]:
    """Per key, its register ops in invocation order; fail writes, non-ok reads and replica
    reads removed."""
    keys = history_keys(ops)
    per: dict[bytes, list[RegisterOp]] = {k: [] for k in keys}
    for op in ops:
        if op.f == "cas":
            _check(op.key is not None, "pair_ops validated this op")
            per[op.key].extend(_cas_ops(op))
        elif op.f in ("put", "delete", "batch"):
            if op.type == "fail":
                continue
            ret = op.ret if op.type == "ok" else None
            if op.f == "batch":
                for k, v in sorted(_batch_values(op).items()):
                    per[k].append(RegisterOp(op, True, v, op.call, ret))
            else:
                _check(op.key is not None, "pair_ops validated this op")
                per[op.key].append(RegisterOp(op, True, op.value if op.f == "put" else None, op.call, ret))
        elif op.replica:
            continue  # not linearizable: see (e)
        elif op.type == "ok" and op.f == "get":
            _check(op.key is not None, "pair_ops validated this op")
            per[op.key].append(RegisterOp(op, False, op.result, op.call, op.ret))
        elif op.type == "ok" and op.f == "scan":
            _check(op.start is not None and op.end is not None, "pair_ops validated this op")
            seen = dict(op.result)
            for k in keys:
                if _in_range(k, op.start, op.end):
                    per[k].append(RegisterOp(op, False, seen.get(k), op.call, op.ret))
    return per


# --------------------------------------------------------------------------------------------
# (a) The Wing & Gong / Lowe / Porcupine search on one register.


@dataclass(frozen=True)
class SearchResult:
    result: str
    steps: int
    #: On invalid: the op that could not be placed, the write that set the register at the
    #: deepest point (-1: the initial None), and the register's value there.
    blocked: int = -1
    last_writer: int = -1
    state: bytes | None = None
    why: str = ""


_NIL = -1


def search_register(
    reg: Sequence[RegisterOp],
    *,
    deadline_s: float,
    clock: Callable[[], float] = time.monotonic,
    cache_max: int = CACHE_ENTRIES_MAX,
) -> SearchResult:
    """Is this register history linearizable (initial value None)?"""
    events: list[tuple[int, int, int]] = []  # (time, 0 call | 1 return, op)
    for i, r in enumerate(reg):
        events.append((r.call, 0, i))
        if r.ret is not None:
            events.append((r.ret, 1, i))
    events.sort()
    m = len(events)
    # A doubly linked list of events: node 0 is the head, event j is node j + 1.
    nxt = [j + 1 for j in range(m + 1)]
    nxt[m] = _NIL
    prv = [j - 1 for j in range(m + 1)]
    is_call = [False] + [kind == 0 for _, kind, _ in events]
    op_of = [-1] + [i for _, _, i in events]
    ret_node = {i: j + 1 for j, (_, kind, i) in enumerate(events) if kind == 1}
    match = [_NIL] + [ret_node.get(i, _NIL) if kind == 0 else _NIL for _, kind, i in events]

    def unlink(k: int) -> None:
        p, q = prv[k], nxt[k]
        nxt[p] = q
        if q != _NIL:
            prv[q] = p

    def relink(k: int) -> None:
        p, q = prv[k], nxt[k]
        nxt[p] = k
        if q != _NIL:
            prv[q] = k

    remaining = sum(1 for r in reg if r.ret is not None)
    if remaining == 0:
        return SearchResult(VALID, 0)
    state: bytes | None = None
    linearized = 0
    cache: set[tuple[int, bytes | None]] = set()
    calls: list[tuple[int, bytes | None]] = []  # (call node, register value before it)
    writers: list[int] = []  # the last write linearized, after each push
    best_depth = -1
    best = (-1, -1, None)
    entry = nxt[0]
    steps = 0
    while True:
        steps += 1
        if steps % _CLOCK_EVERY == 0 and clock() > deadline_s:
            return SearchResult(UNKNOWN, steps, why="time budget spent")
        if entry == _NIL:
            # Every completion left in the list belongs to an unlinearized op, so the walk meets
            # one before the end unless all determinate ops are placed, which returned already.
            raise AssertionError("search walked off the list with ops left to place")
        if is_call[entry]:
            i = op_of[entry]
            r = reg[i]
            if _allowed(r, state):
                new_state = r.value if r.is_write else state
                lin = linearized | (1 << i)
                memo = (lin, new_state)
                if memo not in cache:
                    if len(cache) >= cache_max:
                        return SearchResult(UNKNOWN, steps, why=f"search memo exceeded {cache_max} entries")
                    cache.add(memo)
                    calls.append((entry, state))
                    writers.append(i if r.is_write else (writers[-1] if writers else -1))
                    state, linearized = new_state, lin
                    unlink(entry)
                    if match[entry] != _NIL:
                        unlink(match[entry])
                        remaining -= 1
                        if remaining == 0:
                            return SearchResult(VALID, steps)
                    entry = nxt[0]
                    continue
            entry = nxt[entry]
        else:
            # The op completing here is not linearized yet, so the last choice was wrong.
            if len(calls) > best_depth:
                best_depth = len(calls)
                best = (op_of[entry], writers[-1] if writers else -1, state)
            if not calls:
                return SearchResult(INVALID, steps, blocked=best[0], last_writer=best[1], state=best[2])
            entry, state = calls.pop()
            writers.pop()
            i = op_of[entry]
            linearized &= ~(1 << i)
            if match[entry] != _NIL:
                relink(match[entry])
                remaining += 1
            relink(entry)
            entry = nxt[entry]


def _heuristic_window(reg: Sequence[RegisterOp], res: SearchResult) -> set[int]:
    """Where the deepest search path got stuck: the op it could not place, the write that set
    the register there, and the ops between that write's invocation and the stuck op's end."""
    b = reg[res.blocked]
    b_ret = b.ret if b.ret is not None else b.call
    t0 = min(b.call, reg[res.last_writer].call) if res.last_writer >= 0 else b.call
    out = {res.blocked}
    if res.last_writer >= 0:
        out.add(res.last_writer)
    for i, r in enumerate(reg):
        if r.call <= b_ret and (r.call >= t0 if r.ret is None else r.ret >= t0):
            out.add(i)
    return out


def _close_over_sources(reg: Sequence[RegisterOp], chosen: set[int]) -> set[int]:
    """Add every write whose value a chosen read returned."""
    read_values = {reg[i].value for i in chosen if not reg[i].is_write and not reg[i].guard}
    read_values |= {reg[i].expect for i in chosen if reg[i].guard}
    return chosen | {i for i, r in enumerate(reg) if r.is_write and r.value in read_values}


def _smallest_window(
    reg: Sequence[RegisterOp], res: SearchResult, deadline_s: float, clock: Callable[[], float], cache_max: int
) -> list[RegisterOp]:
    """A small sub-history of the key that is not linearizable *by itself*.

    Removing a read, or a write whose value no remaining read returned, never turns a
    linearizable history into a non-linearizable one (drop the op from the linearization). So a
    sub-history reached by such removals that is still not linearizable is a genuine witness:
    nothing it leaves out could explain it. Start from the heuristic window (or, if that alone is
    linearizable, the key's history up to the stuck op, then the whole key), then remove ops one
    at a time, farthest from the stuck op first, while the rest stays non-linearizable. The
    result is 1-minimal: no single allowed removal keeps it a witness."""
    b = res.blocked
    b_ret = reg[b].ret if reg[b].ret is not None else reg[b].call

    def not_linearizable(chosen: set[int]) -> bool:
        sub = [reg[i] for i in sorted(chosen)]
        return search_register(sub, deadline_s=deadline_s, clock=clock, cache_max=cache_max).result == INVALID

    heuristic = _close_over_sources(reg, _heuristic_window(reg, res))
    starts = (heuristic, {i for i, r in enumerate(reg) if r.call <= b_ret}, set(range(len(reg))))
    chosen: set[int] | None = None
    for start in starts:
        start = _close_over_sources(reg, start)
        if len(start) <= SHRINK_OPS_MAX and not_linearizable(start):
            chosen = start
            break
    if chosen is None:
        # No witness small enough to shrink in the time left: show the heuristic window.
        return [reg[i] for i in sorted(heuristic)][:WINDOW_OPS_MAX]
    for _ in range(SHRINK_PASSES_MAX):
        changed = False
        for i in sorted(chosen, key=lambda i: (-abs(reg[i].call - reg[b].call), i)):
            if i == b or i not in chosen or clock() > deadline_s:
                continue
            r = reg[i]
            # A write a remaining read or cas guard needs stays; with a refused cas ("ne") left,
            # no write goes (without it the register could hold what that cas was refused on).
            if r.is_write and any((not reg[j].is_write and not reg[j].guard and reg[j].value == r.value)
                                  or (reg[j].guard and reg[j].expect == r.value) or reg[j].guard == "ne"
                                  for j in chosen):
                continue
            smaller = chosen - {i}
            if not_linearizable(smaller):
                chosen = smaller
                changed = True
        if not changed:
            break
    return [reg[i] for i in sorted(chosen)]


def _value_sources(ops: Sequence[Op]) -> dict[bytes, dict[bytes, list[Op]]]:
    """key -> value -> the ops that wrote it (failed ones included, intermediate batch values
    included), so a read can be traced to its write."""
    out: dict[bytes, dict[bytes, list[Op]]] = {}
    for op in ops:
        if op.f in ("put", "cas"):
            _check(op.key is not None and op.value is not None, "pair_ops validated this op")
            out.setdefault(op.key, {}).setdefault(op.value, []).append(op)
        elif op.f == "batch":
            for f, k, v in op.ops or ():
                if f == "put" and v is not None:
                    lst = out.setdefault(k, {}).setdefault(v, [])
                    if op not in lst:
                        lst.append(op)
    return out


def _linearizable(
    ops: Sequence[Op],
    by_index: Mapping[int, Entry],
    deadline_s: float,
    clock: Callable[[], float],
    cache_max: int,
) -> Verdict:
    name = "linearizable"
    per = project(ops)
    sources = _value_sources(ops)
    invalid: list[tuple[bytes, str, list[Op]]] = []
    stuck: list[tuple[Sequence[RegisterOp], SearchResult]] = []  # parallel to invalid; [] when the pre-check decided
    unknown: list[tuple[bytes, str]] = []
    total_ops = 0
    for key, reg in per.items():
        key_sources = sources.get(key, {})
        reads = [r for r in reg if not r.is_write and not r.guard]
        if not reads and not any(r.guard for r in reg):
            continue
        # A read of a value no possibly-effective write produced can never be linearized; say
        # so directly (it is the commonest failure and the clearest sentence).
        effective = {r.value for r in reg if r.is_write}
        bad = next((r for r in reads if r.value is not None and r.value not in effective), None)
        if bad is not None:
            writers = key_sources.get(bad.value, [])  # type: ignore[arg-type]
            if any(w.type == "fail" for w in writers):
                why = f"{describe_op(bad.source)} read a value written only by a failed write"
            elif writers:
                why = f"{describe_op(bad.source)} read an intermediate value of a batch"
            else:
                why = f"{describe_op(bad.source)} read a value that was never written"
            invalid.append((key, why, [bad.source] + list(writers)))
            stuck.append(([], SearchResult(INVALID, 0)))
            continue
        # A cas's expected value is read as much as a get's (its guard needs the write that made it).
        read_values = {r.value for r in reads} | {r.expect for r in reg if r.guard}
        reg = [r for r in reg if r.ret is not None or not r.is_write or r.value in read_values]
        total_ops += len(reg)
        if clock() > deadline_s:
            unknown.append((key, "time budget spent before this key"))
            continue
        res = search_register(reg, deadline_s=deadline_s, clock=clock, cache_max=cache_max)
        if res.result == INVALID:
            b = reg[res.blocked]
            at = f"the register held {_b(res.state)}"
            why = f"{describe_op(b.source)} cannot be linearized ({at} where the search got furthest)"
            invalid.append((key, why, []))
            stuck.append((reg, res))
        elif res.result == UNKNOWN:
            unknown.append((key, res.why))
    if invalid:
        key, why, wops = invalid[0]
        reg0, res0 = stuck[0]
        if reg0:
            # Shrink only the first key's witness, with what is left of the budget (bounded).
            shrink_deadline_s = min(deadline_s, clock() + SHRINK_S_MAX)
            window = _smallest_window(reg0, res0, shrink_deadline_s, clock, cache_max)
            wops = []
            for r in window:
                if r.source not in wops:
                    wops.append(r.source)
        more = ""
        if len(invalid) > 1:
            names = ", ".join(_b(k) for k, _, _ in invalid[:DETAIL_KEYS_MAX])
            more = f"; {len(invalid)} keys not linearizable: {names}"
        return Verdict(name, INVALID, f"key {_b(key)}: {why}{more}", _window(wops, by_index))
    if unknown:
        names = ", ".join(_b(k) for k, _ in unknown[:DETAIL_KEYS_MAX])
        return Verdict(name, UNKNOWN, f"{len(unknown)} of {len(per)} keys undecided ({unknown[0][1]}): {names}")
    return Verdict(name, VALID, f"{len(per)} keys, {total_ops} register ops searched")


# --------------------------------------------------------------------------------------------
# (b) No acknowledged write lost.


def _key_writes(ops: Sequence[Op]) -> dict[bytes, list[RegisterOp]]:
    """Per key, every write that may have taken effect (ok or indeterminate)."""
    per: dict[bytes, list[RegisterOp]] = {}
    for op in ops:
        if op.f == "cas":
            _check(op.key is not None, "pair_ops validated this op")
            per.setdefault(op.key, []).extend(r for r in _cas_ops(op) if r.is_write)
            continue
        if op.f not in ("put", "delete", "batch") or op.type == "fail":
            continue
        ret = op.ret if op.type == "ok" else None
        if op.f == "batch":
            for k, v in _batch_values(op).items():
                per.setdefault(k, []).append(RegisterOp(op, True, v, op.call, ret))
        else:
            _check(op.key is not None, "pair_ops validated this op")
            per.setdefault(op.key, []).append(RegisterOp(op, True, op.value if op.f == "put" else None, op.call, ret))
    return per


def _no_lost_writes(ops: Sequence[Op], by_index: Mapping[int, Entry]) -> Verdict:
    name = "no-lost-writes"
    finals = [op for op in ops if op.final and op.f == "get" and not op.replica]
    if not finals:
        return Verdict(name, UNKNOWN, "no final reads recorded")
    writes = _key_writes(ops)
    final_keys = sorted({op.key for op in finals if op.key is not None})
    read_keys: set[bytes] = set()
    problems: list[tuple[bytes, str, list[Op]]] = []
    for op in finals:
        if op.type != "ok" or op.ret is None:
            continue
        key = op.key
        _check(key is not None, "pair_ops validated this op")
        read_keys.add(key)
        candidates = [w for w in writes.get(key, []) if w.call < op.ret]
        acked_before = [w for w in candidates if w.ret is not None and w.ret < op.call]
        # W is superseded when an acknowledged write began after W completed and completed
        # before the final read began: the latest such beginning decides.
        latest_call = max((w.call for w in acked_before), default=-1)
        live = [w for w in candidates if w.ret is None or w.ret > latest_call]
        allowed = {w.value for w in live}
        if op.result in allowed or (op.result is None and not acked_before):
            continue
        last_acked = [w for w in acked_before if w.ret is not None and w.ret > latest_call]
        missing = ", ".join(describe_op(w.source) for w in last_acked[:3])
        source = [w for w in candidates if w.value == op.result and op.result is not None]
        if op.result is None:
            why = f"final read found nothing; acknowledged write lost: {missing}"
        elif source:
            why = (
                f"final read returned {_b(op.result)} from {describe_op(source[0].source)}, which "
                f"acknowledged writes superseded; lost: {missing}"
            )
        else:
            why = f"final read returned {_b(op.result)}, which no write produced; lost: {missing}"
        wops = [op] + [w.source for w in last_acked[:3]] + [w.source for w in source[:1]]
        problems.append((key, why, wops))
    if problems:
        key, why, wops = problems[0]
        more = f" ({len(problems)} keys lost writes)" if len(problems) > 1 else ""
        return Verdict(name, INVALID, f"key {_b(key)}: {why}{more}", _window(wops, by_index))
    unread = [k for k in final_keys if k not in read_keys]
    if unread:
        names = ", ".join(_b(k) for k in unread[:DETAIL_KEYS_MAX])
        return Verdict(name, UNKNOWN, f"every final read of {len(unread)} keys failed: {names}")
    return Verdict(name, VALID, f"{len(read_keys)} keys read at the end hold an allowed value")


# --------------------------------------------------------------------------------------------
# (c) Batches atomic under scans.


def _batches_atomic(ops: Sequence[Op], by_index: Mapping[int, Entry]) -> Verdict:
    name = "batches-atomic"
    sources = _value_sources(ops)
    deletes: dict[bytes, list[Op]] = {}
    for op in ops:
        if op.type == "fail":
            continue
        if op.f == "delete":
            _check(op.key is not None, "pair_ops validated this op")
            deletes.setdefault(op.key, []).append(op)
        elif op.f == "batch":
            for k, v in _batch_values(op).items():
                if v is None:
                    deletes.setdefault(k, []).append(op)

    def certainly_before(value: bytes | None, key: bytes, batch: Op) -> Op | None | bool:
        """The write of `value` to `key` if it certainly precedes `batch`, True for a None that
        certainly precedes it, else None."""
        if value is not None:
            writers = sources.get(key, {}).get(value, [])
            if len(writers) == 1:
                w = writers[0]
                if w.type == "ok" and w.ret is not None and w.ret < batch.call:
                    return w
            return None
        dels = [d for d in deletes.get(key, []) if d is not batch]
        if all(d.type == "ok" and d.ret is not None and d.ret < batch.call for d in dels):
            return True
        return None

    torn: list[tuple[str, list[Op]]] = []
    scans = 0
    for s in ops:
        if s.f != "scan" or s.type != "ok":
            continue
        scans += 1
        _check(s.start is not None and s.end is not None, "pair_ops validated this op")
        seen = dict(s.result)
        checked: set[int] = set()
        for k1, v1 in sorted(seen.items()):
            writers = sources.get(k1, {}).get(v1, [])
            if len(writers) != 1 or writers[0].f != "batch" or writers[0].type == "fail":
                continue
            batch = writers[0]
            values = _batch_values(batch)
            if batch.call in checked or values.get(k1) != v1:
                continue
            checked.add(batch.call)
            for k2, b2 in sorted(values.items()):
                if k2 == k1 or not _in_range(k2, s.start, s.end):
                    continue
                o2 = seen.get(k2)
                if o2 == b2:
                    continue
                before = certainly_before(o2, k2, batch)
                if before is None:
                    continue
                what = "nothing" if o2 is None else _b(o2)
                by = "" if before is True else f" (written by #{before.call}, complete before the batch began)"
                why = (
                    f"{describe_op(s)} saw {describe_op(batch)} on {_b(k1)} but {what} on {_b(k2)}"
                    f"{by}: the batch was torn"
                )
                wops = [s, batch] + ([before] if isinstance(before, Op) else [])
                torn.append((why, wops))
    if torn:
        why, wops = torn[0]
        more = f" ({len(torn)} torn observations)" if len(torn) > 1 else ""
        return Verdict(name, INVALID, why + more, _window(wops, by_index))
    if scans == 0:
        return Verdict(name, VALID, "no scans to judge")
    return Verdict(name, VALID, f"{scans} scans saw whole batches or none")


def _scans_well_formed(ops: Sequence[Op], by_index: Mapping[int, Entry]) -> Verdict:
    """A scan returns keys in strictly increasing order, each within [start, end)."""
    name = "scans-well-formed"
    count = 0
    for s in ops:
        if s.f != "scan" or s.type != "ok":
            continue
        count += 1
        _check(s.start is not None and s.end is not None, "pair_ops validated this op")
        keys = [k for k, _ in s.result]
        if any(a >= b for a, b in zip(keys, keys[1:])):
            return Verdict(name, INVALID, f"{describe_op(s)}: keys not in strictly increasing order", _window([s], by_index))
        outside = [k for k in keys if not _in_range(k, s.start, s.end)]
        if outside:
            return Verdict(name, INVALID, f"{describe_op(s)}: returned {_b(outside[0])} outside its range", _window([s], by_index))
    return Verdict(name, VALID, f"{count} scans ordered and in range")


# --------------------------------------------------------------------------------------------
# (d) Replicas converge.


def check_replicas_converge(digests: Mapping[Any, Mapping[str, str | None]]) -> Verdict:
    """Every node's digest of each protection group is the same (None: node did not answer)."""
    name = "replicas-converge"
    if not digests:
        return Verdict(name, UNKNOWN, "no digests")
    differ: list[str] = []
    silent: list[str] = []
    for pg in sorted(digests, key=str):
        per_node = digests[pg]
        answered = {n: d for n, d in per_node.items() if d is not None}
        if len(answered) < len(per_node) or not answered:
            silent.append(f"pg {pg}: no digest from {sorted(n for n, d in per_node.items() if d is None)}")
        if len(set(answered.values())) > 1:
            groups: dict[str, list[str]] = {}
            for n, d in sorted(answered.items()):
                groups.setdefault(d, []).append(n)
            parts = "; ".join(f"{d[:12]} on {','.join(ns)}" for d, ns in sorted(groups.items()))
            differ.append(f"pg {pg}: {parts}")
    if differ:
        return Verdict(name, INVALID, f"{len(differ)} PGs differ: " + " | ".join(differ[:DETAIL_KEYS_MAX]))
    if silent:
        return Verdict(name, UNKNOWN, " | ".join(silent[:DETAIL_KEYS_MAX]))
    return Verdict(name, VALID, f"{len(digests)} PGs identical on every node")


# --------------------------------------------------------------------------------------------
# (e) Replica reads: written values, monotonic per session, read-after.

#: The initial state of every key (nothing), as a source of a read of nothing: it precedes
#: every write.
_INITIAL = None


def _certainly_before(a: RegisterOp | None, b: RegisterOp | None) -> bool:
    """`a` precedes `b` in every linearization: `a` (None: the initial state) was acknowledged
    before `b` was invoked. Nothing is certainly before the initial state."""
    if b is None:
        return False
    if a is None:
        return True
    return a.ret is not None and a.ret < b.call


@dataclass(frozen=True)
class _Observation:
    """One replica read's view of one key: the value, and the writes that may have produced it."""

    read: Op
    key: bytes
    value: bytes | None
    source: RegisterOp | None  # the write of `value` (None for a read of nothing)
    nothing_sources: tuple[RegisterOp | None, ...] = ()  # for a read of nothing: _INITIAL and deletes


class _ReplicaIndex:
    """Per key, the writes that may have taken effect (ok or indeterminate), by value, and the
    deletes; and every replica read's observations (a get: its key; a scan: every key of the
    history in its range, nothing where it returned none)."""

    def __init__(self, ops: Sequence[Op]) -> None:
        self.writes = _key_writes(ops)
        self.by_value: dict[bytes, dict[bytes, list[RegisterOp]]] = {}
        self.deletes: dict[bytes, list[RegisterOp]] = {}
        for key, ws in self.writes.items():
            for w in ws:
                if w.value is None:
                    self.deletes.setdefault(key, []).append(w)
                else:
                    self.by_value.setdefault(key, {}).setdefault(w.value, []).append(w)
        self.keys = history_keys(ops)
        self.reads = [op for op in ops if op.replica and op.type == "ok" and op.f in ("get", "scan")]

    def observations(self, read: Op) -> list[_Observation]:
        if read.f == "get":
            _check(read.key is not None, "pair_ops validated this op")
            pairs = [(read.key, read.result)]
        else:
            _check(read.start is not None and read.end is not None, "pair_ops validated this op")
            seen = dict(read.result)
            pairs = [(k, seen.get(k)) for k in self.keys if _in_range(k, read.start, read.end)]
        out = []
        for key, value in pairs:
            if value is None:
                dels = tuple(d for d in self.deletes.get(key, []) if read.ret is None or d.call < read.ret)
                out.append(_Observation(read, key, None, None, (_INITIAL,) + dels))
                continue
            ws = [w for w in self.by_value.get(key, {}).get(value, []) if read.ret is None or w.call < read.ret]
            out.append(_Observation(read, key, value, ws[0] if len(ws) == 1 else None))
        return out


def _replica_reads_written(ops: Sequence[Op], by_index: Mapping[int, Entry], index: _ReplicaIndex) -> Verdict:
    name = "replica-reads-written"
    sources = _value_sources(ops)
    count = 0
    for read in index.reads:
        for ob in index.observations(read):
            count += 1
            if ob.value is None or ob.source is not None:
                continue
            effective = index.by_value.get(ob.key, {}).get(ob.value, [])
            if len(effective) > 1:
                continue  # written twice (not by this workload): nothing to say
            writers = sources.get(ob.key, {}).get(ob.value, [])
            if effective:
                why = "a write invoked only after the read returned"
            elif any(w.type == "fail" for w in writers):
                why = "a write that failed"
            elif writers:
                why = "an intermediate value of a batch"
            else:
                why = "no write at all"
            detail = f"{describe_op(read)} returned {_b(ob.value)} for {_b(ob.key)}, the value of {why}"
            return Verdict(name, INVALID, detail, _window([read] + [w.source for w in effective] + list(writers), by_index))
    if not index.reads:
        return Verdict(name, UNKNOWN, "no replica read succeeded")
    return Verdict(name, VALID, f"{len(index.reads)} replica reads ({count} key observations) returned written values")


def _monotonic_problem(obs: list[_Observation]) -> tuple[str, list[Op]] | None:
    """The first way this session's reads of one key (in session order) go backwards, if any."""
    fixed = [(i, ob) for i, ob in enumerate(obs) if ob.value is not None and ob.source is not None]
    # A later read whose write is certainly older than an earlier read's.
    for a, (i, early) in enumerate(fixed):
        for j, late in fixed[a + 1:]:
            if late.source is not early.source and _certainly_before(late.source, early.source):
                return (f"{describe_op(late.read)} returned {_b(late.value)} for {_b(late.key)} after "
                        f"{describe_op(early.read)} had returned {_b(early.value)}, whose write began only after "
                        f"{_b(late.value)}'s was acknowledged", [early.read, late.read, early.source.source, late.source.source])
    # A value that comes back after something else was read in between.
    collapsed: list[_Observation] = []
    for ob in obs:
        if ob.value is not None and ob.source is None:
            continue  # a value written more than once names no one write: no evidence
        if collapsed and collapsed[-1].value == ob.value:
            continue
        collapsed.append(ob)
    first_seen: dict[bytes, _Observation] = {}
    for k, ob in enumerate(collapsed):
        if ob.value is None:
            continue
        if ob.value in first_seen:
            early = first_seen[ob.value]
            between = collapsed[k - 1]
            return (f"{describe_op(ob.read)} returned {_b(ob.value)} for {_b(ob.key)} again, after "
                    f"{describe_op(between.read)} had returned {_b(between.value)}: a value written once came back",
                    [early.read, between.read, ob.read])
        first_seen[ob.value] = ob
    # A read of nothing with no source between the values read before and after it.
    for p, ob in enumerate(obs):
        if ob.value is not None:
            continue
        earlier = [e for i, e in fixed if i < p]
        later = [e for i, e in fixed if i > p]
        fits = [c for c in ob.nothing_sources
                if not any(_certainly_before(c, e.source) for e in earlier)
                and not any(_certainly_before(e.source, c) for e in later)]
        if not fits:
            around = earlier[-1:] + later[:1]
            what = " and ".join(f"{describe_op(e.read)} ({_b(e.value)})" for e in around)
            return (f"{describe_op(ob.read)} found nothing for {_b(ob.key)}, which no delete explains between {what}",
                    [ob.read] + [e.read for e in around] + [e.source.source for e in around])
    return None


def _replica_reads_monotonic(ops: Sequence[Op], by_index: Mapping[int, Entry], index: _ReplicaIndex) -> Verdict:
    name = "replica-reads-monotonic"
    per: dict[tuple[str, bytes], list[_Observation]] = {}
    sessions: set[str] = set()
    for read in index.reads:  # in invocation order: a session's ops are sequential
        if read.session is None:
            continue
        sessions.add(repr(read.session))
        for ob in index.observations(read):
            per.setdefault((repr(read.session), ob.key), []).append(ob)
    problems = []
    for (session, key), obs in sorted(per.items()):
        found = _monotonic_problem(obs)
        if found is not None:
            problems.append((session, key, found))
    if problems:
        session, key, (why, wops) = problems[0]
        more = f" ({len(problems)} session-keys went backwards)" if len(problems) > 1 else ""
        return Verdict(name, INVALID, f"session {session}, key {_b(key)}: {why}{more}", _window(wops, by_index))
    if not per:
        return Verdict(name, UNKNOWN, "no replica reads in a session")
    return Verdict(name, VALID, f"{len(sessions)} sessions, {len(per)} session-keys: replica reads never went backwards")


def _replica_read_after(ops: Sequence[Op], by_index: Mapping[int, Entry], index: _ReplicaIndex) -> Verdict:
    name = "replica-read-after"
    committed: dict[bytes, list[RegisterOp]] = {
        key: sorted((w for w in ws if w.source.type == "ok" and w.source.commit is not None), key=lambda w: w.source.commit)
        for key, ws in index.writes.items()
    }
    judged = 0
    for read in index.reads:
        if not read.after:
            continue
        judged += 1
        for ob in index.observations(read):
            must = [w for w in committed.get(ob.key, []) if w.source.commit <= read.after]
            if not must:
                continue
            if ob.value is not None:
                older = next((w for w in must if ob.source is not None and ob.source is not w
                              and _certainly_before(ob.source, w)), None)
                if older is None:
                    continue
                why = (f"{describe_op(read)} returned {_b(ob.value)} for {_b(ob.key)}, older than "
                       f"{describe_op(older.source)}, which its position covers")
                wops = [read, older.source, ob.source.source]
            else:
                if any(not any(_certainly_before(c, w) for w in must) for c in ob.nothing_sources):
                    continue
                newest = must[-1]
                why = (f"{describe_op(read)} found nothing for {_b(ob.key)}, though its position covers "
                       f"{describe_op(newest.source)} and no delete came after it")
                wops = [read, newest.source]
            return Verdict(name, INVALID, why, _window(wops, by_index))
    if judged == 0:
        return Verdict(name, UNKNOWN, "no replica read with after= succeeded")
    return Verdict(name, VALID, f"{judged} replica reads with after= saw every write their position covers (or newer)")


def _replica_checks(ops: Sequence[Op], by_index: Mapping[int, Entry]) -> list[Verdict]:
    index = _ReplicaIndex(ops)
    return [
        _replica_reads_written(ops, by_index, index),
        _replica_reads_monotonic(ops, by_index, index),
        _replica_read_after(ops, by_index, index),
    ]


# --------------------------------------------------------------------------------------------
# (f) Failovers.


def check_failovers(records: Sequence[Mapping[str, Any]], *, liveness: bool = True) -> Verdict:
    """One verdict over the cluster target's writer-fault records (`ClusterNemesis.stats()`):
    dicts with kind, at_s, old_pid, took_over (True, False or None), takeover_s, stepped_down
    (True, False, or None when the old writer kept the role or was killed), skipped (why).
    `liveness=False` (an unbounded plan, which may leave no write quorum for a takeover) judges
    only that replaced writers step down."""
    name = "failover"
    if not records:
        return Verdict(name, UNKNOWN, "no writer faults")
    bad = []
    for r in records:
        if r.get("skipped"):
            continue
        at = f"{r.get('kind')} at {r.get('at_s')}s (writer pid {r.get('old_pid')})"
        if r.get("stepped_down") is False:
            bad.append(f"{at}: the old writer still ran after pid {r.get('new_pid')} took over; a fenced writer must step down")
        if liveness and r.get("kind") == "writer_kill" and r.get("took_over") is False:
            bad.append(f"{at}: no reader took over")
    if bad:
        return Verdict(name, INVALID, "; ".join(bad[:DETAIL_KEYS_MAX]) + (f" ({len(bad)} problems)" if len(bad) > 1 else ""))
    applied = [r for r in records if not r.get("skipped")]
    times = sorted(r["takeover_s"] for r in applied if r.get("took_over") and r.get("takeover_s") is not None)
    median = f", median {times[len(times) // 2]:g} s" if times else ""
    kinds = ", ".join(f"{k} {sum(1 for r in applied if r.get('kind') == k)}" for k in sorted({r.get("kind") for r in applied}))
    detail = (f"{len(applied)} writer faults ({kinds or 'none applied'}): {len(times)} takeovers{median}, "
              f"{sum(1 for r in applied if r.get('stepped_down'))} old writers stepped down, "
              f"{sum(1 for r in applied if r.get('kept'))} kept the role")
    skipped = len(records) - len(applied)
    if skipped:
        detail += f"; {skipped} skipped (no live reader to take over)"
    if not applied:
        return Verdict(name, UNKNOWN, detail)
    return Verdict(name, VALID, detail)


# --------------------------------------------------------------------------------------------
# Running and presenting.


def _entries_of(history: History | Sequence[Entry]) -> tuple[Entry, ...]:
    return history.entries() if isinstance(history, History) else tuple(history)


def _paired(history: History | Sequence[Entry]) -> tuple[tuple[Op, ...], dict[int, Entry]]:
    entries = _entries_of(history)
    return pair_ops(entries), {e.index: e for e in entries}


def check_linearizable(
    history: History | Sequence[Entry],
    *,
    time_budget_s: float = TIME_BUDGET_S_DEFAULT,
    clock: Callable[[], float] = time.monotonic,
    cache_max: int = CACHE_ENTRIES_MAX,
) -> Verdict:
    ops, by_index = _paired(history)
    return _linearizable(ops, by_index, clock() + time_budget_s, clock, cache_max)


def check_no_lost_writes(history: History | Sequence[Entry]) -> Verdict:
    return _no_lost_writes(*_paired(history))


def check_batches_atomic(history: History | Sequence[Entry]) -> Verdict:
    return _batches_atomic(*_paired(history))


def check_scans_well_formed(history: History | Sequence[Entry]) -> Verdict:
    return _scans_well_formed(*_paired(history))


def check_replica_reads(history: History | Sequence[Entry]) -> list[Verdict]:
    """The checks of (e): replica reads written, monotonic per session, read-after."""
    return _replica_checks(*_paired(history))


def check_all(
    history: History | Sequence[Entry],
    *,
    time_budget_s: float = TIME_BUDGET_S_DEFAULT,
    clock: Callable[[], float] = time.monotonic,
    digests: Mapping[Any, Mapping[str, str | None]] | None = None,
    cache_max: int = CACHE_ENTRIES_MAX,
) -> list[Verdict]:
    """Every check of a history (and of replica digests when given)."""
    deadline_s = clock() + time_budget_s
    entries = _entries_of(history)
    try:
        ops = pair_ops(entries)
    except AssertionError as e:
        out = [Verdict("history-well-formed", INVALID, str(e))]
        out += [Verdict(n, UNKNOWN, "history is malformed") for n in
                ("scans-well-formed", "linearizable", "no-lost-writes", "batches-atomic")]
        return out
    by_index = {e.index: e for e in entries}
    verdicts = [
        Verdict("history-well-formed", VALID, f"{len(entries)} entries, {len(ops)} ops"),
        _scans_well_formed(ops, by_index),
        _linearizable(ops, by_index, deadline_s, clock, cache_max),
        _no_lost_writes(ops, by_index),
        _batches_atomic(ops, by_index),
    ]
    if any(op.replica for op in ops):
        verdicts += _replica_checks(ops, by_index)
    if digests is not None:
        verdicts.append(check_replicas_converge(digests))
    return verdicts


def render_table(verdicts: Sequence[Verdict], *, detail_chars_max: int = 160, window: bool = True) -> str:
    """A table for people: check | verdict | detail, then the window of each invalid check."""
    rows = [("check", "verdict", "detail")] + [
        (v.name, v.result, v.detail if len(v.detail) <= detail_chars_max else v.detail[: detail_chars_max - 3] + "...")
        for v in verdicts
    ]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = [f"{a:<{w0}} | {b:<{w1}} | {c}" for a, b, c in rows]
    lines.insert(1, f"{'-' * w0}-+-{'-' * w1}-+-{'-' * 6}")
    lines.append(f"overall: {overall(verdicts)}")
    if window:
        for v in verdicts:
            if v.window:
                lines.append(f"window of {v.name} ({len(v.window)} entries):")
                lines += ["  " + json.dumps(entry_to_dict(e), sort_keys=True) for e in v.window]
    return "\n".join(lines)


def verdicts_to_json(verdicts: Sequence[Verdict]) -> str:
    return json.dumps(
        {"overall": overall(verdicts), "verdicts": [v.to_dict() for v in verdicts]},
        sort_keys=True,
        indent=1,
    )
