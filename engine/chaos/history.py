"""The history of a fault-injection run: every operation's invocation and completion, in order.

Theory of operation
-------------------
A checker can only judge what was recorded, so the recorder is simple and strict (Jepsen's
model). A client calls `History.invoke(...)` just *before* it calls the database and
`History.complete(op_id, type, ...)` just *after* the call returns or raises. Both append an
`Entry` under one lock, and an entry's `index` is its position: if an operation's completion has
a smaller index than another's invocation, the first really finished before the second began.
That real-time order is all the checkers use; `time` is for people (nanoseconds from the
injected clock, or, when no clock is given, the logical step, which makes a deterministic run's
file byte-identical).

A completion's type is `ok` (it happened), `fail` (it certainly did not happen) or
`indeterminate` (it may have happened, at any time after its invocation, or never). A process
has at most one operation outstanding; after an indeterminate one the client continues as a new
process, so completions are paired with invocations by process (`pair_ops`). An invocation with
no completion (the client hung or the run stopped) is indeterminate.

On disk a history is `history.jsonl`: one JSON object per entry, keys sorted, fields that are
None left out. Bytes are written as text when they are printable UTF-8, else as "hex:" followed
by hex digits (text that itself starts with "hex:" is written as hex too, so decoding is exact).

Fields: `index, process, type (invoke|ok|fail|indeterminate), f (put|get|delete|batch|scan),
key, value, ops (batch: [[f, key, value], ...]), start, end (scan), result (get: the value or
null; scan: [[key, value], ...]), time, final (a read of the final phase), error (the exception's
class and message when it failed)`, and for runs with read replicas: `session` (the client
session an op belongs to: its writes through the writer endpoint and its replica reads; it
outlives the process numbers an indeterminate op moves on from), `replica` (true: a read served
by a reader instance, not linearizable), `after` (the commit position a read was asked to
cover) and `commit` (on an ok write's completion: the commit position it returned). A
completion repeats its invocation's inputs, so each line reads on its own. The replica fields
are optional and left out when unset, so histories written before them read unchanged.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

#: "cas": a compare-and-set, put `value` if the key holds `expected` (None: if it is absent);
#: an ok cas's result says whether it applied (False: the precondition failed, nothing logged)
FUNCTIONS = ("put", "get", "delete", "batch", "scan", "cas")
WRITES = frozenset(("put", "delete", "batch", "cas"))
READS = frozenset(("get", "scan"))
COMPLETIONS = ("ok", "fail", "indeterminate")
TYPES = ("invoke",) + COMPLETIONS
BATCH_FUNCTIONS = ("put", "delete")
HEX_MARK = "hex:"
#: A bound on one history (entries), so a runaway workload fails loudly instead of eating memory.
ENTRIES_MAX = 50_000_000

Process = int | str
BatchOps = tuple[tuple[str, bytes, "bytes | None"], ...]
ScanResult = tuple[tuple[bytes, bytes], ...]


def _check(condition: bool, message: str) -> None:
    # A programmer error in the caller: an AssertionError that `python -O` cannot remove.
    if not condition:
        raise AssertionError(message)


@dataclass(frozen=True)
class Entry:
    """One line of the history: an invocation or a completion."""

    index: int
    process: Process
    type: str
    f: str
    key: bytes | None = None
    value: bytes | None = None
    ops: BatchOps | None = None
    start: bytes | None = None
    end: bytes | None = None
    result: Any = None  # get: bytes | None; scan: ScanResult
    time: int = 0
    final: bool = False
    error: str | None = None
    session: Process | None = None
    replica: bool = False
    after: int | None = None
    commit: int | None = None
    expected: bytes | None = None  # cas: the value it expected (None: absent)


@dataclass(frozen=True)
class Op:
    """An invocation paired with its completion. `ret` is None when the op is indeterminate:
    it may take effect at any time after `call`, so a checker treats its end as +infinity."""

    process: Process
    f: str
    type: str
    call: int  # index of the invocation entry; also the op's id
    ret: int | None
    completion: int | None  # index of the completion entry, if one was recorded
    key: bytes | None = None
    value: bytes | None = None
    ops: BatchOps | None = None
    start: bytes | None = None
    end: bytes | None = None
    result: Any = None
    final: bool = False
    error: str | None = None
    session: Process | None = None
    replica: bool = False
    after: int | None = None
    commit: int | None = None  # the commit position an ok write returned, when recorded
    expected: bytes | None = None  # cas: the value it expected (None: absent)

    @property
    def id(self) -> int:
        return self.call


def _is_bytes(x: Any) -> bool:
    return isinstance(x, bytes)


def _normalise_inputs(f: str, key: Any, value: Any, ops: Any, start: Any, end: Any, expected: Any = None) -> BatchOps | None:
    _check(f in FUNCTIONS, f"f must be one of {FUNCTIONS}, not {f!r}")
    _check(expected is None or (f == "cas" and _is_bytes(expected)), "only a cas has an expected value (bytes)")
    if f in ("put", "cas"):
        _check(_is_bytes(key) and _is_bytes(value), "put needs key and value bytes")
    elif f in ("get", "delete"):
        _check(_is_bytes(key) and value is None, f"{f} needs a key (bytes) and no value")
    elif f == "scan":
        _check(_is_bytes(start) and _is_bytes(end), "scan needs start and end bytes")
    if f != "batch":
        _check(ops is None, "only a batch has ops")
        return None
    _check(ops is not None and len(ops) > 0, "a batch needs at least one op")
    out = []
    for op in ops:
        bf, k, v = op
        _check(bf in BATCH_FUNCTIONS, f"a batch op is put or delete, not {bf!r}")
        _check(_is_bytes(k), "a batch op's key is bytes")
        _check(_is_bytes(v) if bf == "put" else v is None, "batch put has a value, delete none")
        out.append((bf, k, v))
    return tuple(out)


#: Commit positions are LSNs: u64 values (engine.core.constants.LSN_VALID_MAX bounds what a
#: write returns; the history only needs them to be plausible integers).
POSITION_MAX = 2**64 - 1


def _position(x: Any, what: str) -> int | None:
    _check(x is None or (isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= POSITION_MAX),
           f"{what} is a commit position (an int in 0..2^64-1) or absent, not {x!r}")
    return x


def _normalise_replica(f: str, session: Any, replica: Any, after: Any) -> None:
    _check(session is None or isinstance(session, (int, str)) and not isinstance(session, bool),
           f"a session is an int or a str, not {session!r}")
    _check(isinstance(replica, bool), "replica is a bool")
    _check(not replica or f in READS, f"only reads are served by a replica, not a {f}")
    _check(after is None or f in READS, "only a read has an after= position")
    _position(after, "after")


def _normalise_result(f: str, type: str, result: Any) -> Any:
    if f == "cas" and type == "ok":
        _check(isinstance(result, bool), "an ok cas's result is whether it applied (a bool)")
        return result
    if type != "ok" or f not in READS:
        _check(result is None, f"only an ok read has a result ({f} {type})")
        return None
    if f == "get":
        _check(result is None or _is_bytes(result), "a get's result is bytes or None")
        return result
    pairs = tuple((k, v) for k, v in result)
    _check(all(_is_bytes(k) and _is_bytes(v) for k, v in pairs), "a scan's result is (bytes, bytes) pairs")
    return pairs


class History:
    """A thread-safe, append-only recorder of a run's operations.

    `clock_ns` is a callable returning monotonic nanoseconds (e.g. `time.monotonic_ns` or a
    simulated clock); without one, `time` is the logical step (the entry's index)."""

    def __init__(self, clock_ns: Callable[[], int] | None = None, entries_max: int = ENTRIES_MAX) -> None:
        self._clock_ns = clock_ns
        self._entries_max = entries_max
        self._lock = threading.Lock()
        self._entries: list[Entry] = []
        self._open: dict[int, Entry] = {}  # op_id -> its invocation
        self._open_process: dict[Process, int] = {}  # process -> its outstanding op_id

    def _time(self, index: int) -> int:
        return index if self._clock_ns is None else int(self._clock_ns())

    def _append(self, entry_fields: dict[str, Any]) -> Entry:
        _check(len(self._entries) < self._entries_max, f"history exceeds {self._entries_max} entries")
        index = len(self._entries)
        entry = Entry(index=index, time=self._time(index), **entry_fields)
        self._entries.append(entry)
        return entry

    def invoke(
        self,
        process: Process,
        f: str,
        *,
        key: bytes | None = None,
        value: bytes | None = None,
        ops: Iterable[tuple[str, bytes, bytes | None]] | None = None,
        start: bytes | None = None,
        end: bytes | None = None,
        final: bool = False,
        session: Process | None = None,
        replica: bool = False,
        after: int | None = None,
        expected: bytes | None = None,
    ) -> int:
        """Record that `process` is about to call `f`; returns the op id for `complete`.
        `session`, `replica` and `after`: see the module docstring; `expected`: a cas's."""
        batch_ops = _normalise_inputs(f, key, value, None if ops is None else tuple(ops), start, end, expected)
        _normalise_replica(f, session, replica, after)
        with self._lock:
            _check(
                process not in self._open_process,
                f"process {process!r} already has op {self._open_process.get(process)} outstanding",
            )
            entry = self._append(
                dict(process=process, type="invoke", f=f, key=key, value=value, ops=batch_ops,
                     start=start, end=end, final=final, session=session, replica=replica, after=after,
                     expected=expected)
            )
            self._open[entry.index] = entry
            self._open_process[process] = entry.index
            return entry.index

    def complete(self, op_id: int, type: str, *, result: Any = None, error: str | None = None,
                 commit: int | None = None) -> int:
        """Record how op `op_id` ended: ok, fail or indeterminate. Returns the entry's index.
        `commit`: the commit position an ok write returned."""
        _check(type in COMPLETIONS, f"a completion's type is one of {COMPLETIONS}, not {type!r}")
        _position(commit, "commit")
        with self._lock:
            inv = self._open.get(op_id)
            _check(inv is not None, f"op {op_id} was not invoked or is already complete")
            assert inv is not None
            res = _normalise_result(inv.f, type, result)
            _check(commit is None or (type == "ok" and inv.f in WRITES), "only an ok write has a commit position")
            del self._open[op_id]
            del self._open_process[inv.process]
            entry = self._append(
                dict(process=inv.process, type=type, f=inv.f, key=inv.key, value=inv.value,
                     ops=inv.ops, start=inv.start, end=inv.end, result=res, final=inv.final,
                     error=error, session=inv.session, replica=inv.replica, after=inv.after, commit=commit,
                     expected=inv.expected)
            )
            return entry.index

    def entries(self) -> tuple[Entry, ...]:
        """A snapshot of the entries so far."""
        with self._lock:
            return tuple(self._entries)

    def outstanding(self) -> int:
        with self._lock:
            return len(self._open)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def write_jsonl(self, path: str, *, include_time: bool = True) -> None:
        write_jsonl(path, self.entries(), include_time=include_time)


# --------------------------------------------------------------------------------------------
# JSON lines.


def encode_bytes(b: bytes) -> str:
    """Printable UTF-8 stays text; anything else (or text starting with the marker) is hex."""
    try:
        s = b.decode("utf-8")
    except UnicodeDecodeError:
        return HEX_MARK + b.hex()
    if s.isprintable() and not s.startswith(HEX_MARK):
        return s
    return HEX_MARK + b.hex()


def decode_bytes(s: str) -> bytes:
    if s.startswith(HEX_MARK):
        return bytes.fromhex(s[len(HEX_MARK):])
    return s.encode("utf-8")


def _enc_opt(b: bytes | None) -> str | None:
    return None if b is None else encode_bytes(b)


def _dec_opt(s: str | None) -> bytes | None:
    return None if s is None else decode_bytes(s)


def entry_to_dict(entry: Entry, *, include_time: bool = True) -> dict[str, Any]:
    d: dict[str, Any] = {"index": entry.index, "process": entry.process, "type": entry.type, "f": entry.f}
    if entry.key is not None:
        d["key"] = encode_bytes(entry.key)
    if entry.value is not None:
        d["value"] = encode_bytes(entry.value)
    if entry.ops is not None:
        d["ops"] = [[f, encode_bytes(k), _enc_opt(v)] for f, k, v in entry.ops]
    if entry.start is not None:
        d["start"] = encode_bytes(entry.start)
    if entry.end is not None:
        d["end"] = encode_bytes(entry.end)
    if entry.type == "ok" and entry.f == "get":
        d["result"] = _enc_opt(entry.result)  # null is an answer here: the key was absent
    elif entry.type == "ok" and entry.f == "scan":
        d["result"] = [[encode_bytes(k), encode_bytes(v)] for k, v in entry.result]
    elif entry.type == "ok" and entry.f == "cas":
        d["result"] = entry.result
    if entry.expected is not None:
        d["expected"] = encode_bytes(entry.expected)
    if include_time:
        d["time"] = entry.time
    if entry.final:
        d["final"] = True
    if entry.error is not None:
        d["error"] = entry.error
    if entry.session is not None:
        d["session"] = entry.session
    if entry.replica:
        d["replica"] = True
    if entry.after is not None:
        d["after"] = entry.after
    if entry.commit is not None:
        d["commit"] = entry.commit
    return d


def entry_from_dict(d: Mapping[str, Any]) -> Entry:
    f = d["f"]
    type = d["type"]
    _check(f in FUNCTIONS and type in TYPES, f"not a history entry: {dict(d)!r}")
    result: Any = None
    if type == "ok" and f == "get":
        result = _dec_opt(d.get("result"))
    elif type == "ok" and f == "scan":
        result = tuple((decode_bytes(k), decode_bytes(v)) for k, v in d.get("result", ()))
    elif type == "ok" and f == "cas":
        result = d.get("result")
    ops = d.get("ops")
    return Entry(
        index=int(d["index"]),
        process=d["process"],
        type=type,
        f=f,
        key=_dec_opt(d.get("key")),
        value=_dec_opt(d.get("value")),
        ops=None if ops is None else tuple((bf, decode_bytes(k), _dec_opt(v)) for bf, k, v in ops),
        start=_dec_opt(d.get("start")),
        end=_dec_opt(d.get("end")),
        result=result,
        time=int(d.get("time", d["index"])),
        final=bool(d.get("final", False)),
        error=d.get("error"),
        session=d.get("session"),
        replica=bool(d.get("replica", False)),
        after=d.get("after"),
        commit=d.get("commit"),
        expected=_dec_opt(d.get("expected")),
    )


def dumps_jsonl(entries: Iterable[Entry], *, include_time: bool = True) -> str:
    lines = [
        json.dumps(entry_to_dict(e, include_time=include_time), sort_keys=True, separators=(",", ":"))
        for e in entries
    ]
    return "".join(line + "\n" for line in lines)


def loads_jsonl(text: str) -> tuple[Entry, ...]:
    return tuple(entry_from_dict(json.loads(line)) for line in text.splitlines() if line.strip())


def write_jsonl(path: str, entries: Iterable[Entry], *, include_time: bool = True) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        fh.write(dumps_jsonl(entries, include_time=include_time))


def read_jsonl(path: str) -> tuple[Entry, ...]:
    with open(path, encoding="utf-8") as fh:
        return loads_jsonl(fh.read())


# --------------------------------------------------------------------------------------------
# Pairing.


def pair_ops(entries: Sequence[Entry]) -> tuple[Op, ...]:
    """Pair each invocation with its process's next completion; sorted by invocation.

    Indeterminate ops and invocations left open get `ret=None` (+infinity)."""
    open_: dict[Process, Entry] = {}
    ops: list[Op] = []
    for e in sorted(entries, key=lambda e: e.index):
        if e.type == "invoke":
            _check(e.process not in open_, f"process {e.process!r} invoked twice without completing (entry {e.index})")
            open_[e.process] = e
            continue
        inv = open_.pop(e.process, None)
        _check(inv is not None, f"entry {e.index} completes nothing: process {e.process!r} had no invocation open")
        assert inv is not None
        _check(inv.f == e.f, f"entry {e.index} completes a {inv.f} with a {e.f}")
        # Entries read from a file were never checked by `History.invoke`: check them here, so
        # the checkers can rely on every op being well formed.
        _normalise_inputs(inv.f, inv.key, inv.value, inv.ops, inv.start, inv.end, inv.expected)
        _normalise_result(inv.f, e.type, e.result)
        _normalise_replica(inv.f, inv.session, inv.replica, inv.after)
        _position(e.commit, "commit")
        _check(e.commit is None or (e.type == "ok" and inv.f in WRITES), f"entry {e.index}: only an ok write has a commit position")
        ops.append(
            Op(process=inv.process, f=inv.f, type=e.type, call=inv.index,
               ret=e.index if e.type != "indeterminate" else None, completion=e.index,
               key=inv.key, value=inv.value, ops=inv.ops, start=inv.start, end=inv.end,
               result=e.result, final=inv.final, error=e.error, session=inv.session,
               replica=inv.replica, after=inv.after, commit=e.commit, expected=inv.expected)
        )
    for inv in open_.values():
        _normalise_inputs(inv.f, inv.key, inv.value, inv.ops, inv.start, inv.end, inv.expected)
        _normalise_replica(inv.f, inv.session, inv.replica, inv.after)
        ops.append(
            Op(process=inv.process, f=inv.f, type="indeterminate", call=inv.index, ret=None,
               completion=None, key=inv.key, value=inv.value, ops=inv.ops, start=inv.start,
               end=inv.end, final=inv.final, error="never completed", session=inv.session,
               replica=inv.replica, after=inv.after, expected=inv.expected)
        )
    ops.sort(key=lambda o: o.call)
    return tuple(ops)


def op_entries(op: Op, entries_by_index: Mapping[int, Entry]) -> list[Entry]:
    """The history entries (invocation and completion, if any) of one op."""
    out = [entries_by_index[op.call]]
    if op.completion is not None:
        out.append(entries_by_index[op.completion])
    return out
