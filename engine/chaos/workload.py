"""The client side of a fault-injection run: threads that drive the key-value API and record it.

Theory of operation
-------------------
`Workload` runs `clients` threads against any object with the public API (`put`, `get`,
`delete`, `batch()`, `scan`), the real engine or a test fake. Each thread draws its operations
from its own `random.Random` seeded from (seed, client), so the *sequence* of operations a client
tries is the same for a seed; how threads interleave is up to the scheduler, unless `clients=1`.
Operations go to a few hot keys (`keys`), so they collide and the checkers have something to
judge. Every written value is unique (`p<process>-<n>`): a read then says exactly which write it
saw, which is what makes per-key linearizability checkable in practice.

Each operation is recorded in the `History` before the call and after it. An outcome is
classified by what the API promises:

- a write that returns is `ok`;
- a write that raises `Unavailable` was not logged: `fail`, except its subclass
  `WriteIndeterminate`, which may still become durable: `indeterminate`;
- a write that raises anything else (timeouts, broken connections) may or may not have happened:
  `indeterminate`;
- a read that raises is `fail`: reads change nothing.

After an indeterminate outcome the client continues as a new process (process += clients), as
in Jepsen: the old operation stays open forever, concurrent with everything after it.

Replica reads (a run with reader instances: `replica`, an object with `session(client) ->
(session id, database or None)`): a fraction `replica_fraction` of a client's operations are
gets and scans on a read replica, recorded with `replica: true`, the session id and the
`after=` position asked for: none, the commit position of the client's own last write, or
`db.last_commit` (the newest position any client of the shared writer connection got back).
Every write records the commit position it returned (`commit`) and the client's session. A
session is whatever the `replica` object says reads are promised to be monotonic over (the
cluster target: one client reading from one reader instance; a client that moves to another
reader starts a new session); with no database to read through the read is recorded as failed.

The run is bounded by `ops_max` operations in total and by `duration_s` on the injected clock,
and `stop()` ends it early; each client finishes the operation it is in. `final_reads()` reads
every key once from a separate process and records those gets with `final: true`; a checker
takes them as the state of the database at full health. A `progress` callback receives counts
every `progress_every_ops` completions; it runs on a client thread and must be quick. The
injected `clock_s` is read from every client thread, so it must be thread-safe. `describe()`
gives the one line (seed included) a runner prints so the run can be replayed.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from engine.chaos.history import History
from engine.core import conditions as cond
from engine.errors import PreconditionFailed, Unavailable, WriteIndeterminate

DEFAULT_MIX: Mapping[str, float] = {"put": 0.35, "get": 0.25, "delete": 0.05, "batch": 0.15, "scan": 0.20}
#: Operations a mix may name: the default mix's, and "cas" (a compare-and-set: get the key, then
#: put a new value expecting what the get returned; `cond.equals` / `cond.absent`), which the
#: default mix leaves out so that seeded runs from before it replay the same operations.
MIX_OPS = frozenset(DEFAULT_MIX) | {"cas"}
KEYS_MAX = 10_000
CLIENTS_MAX = 1_024
BATCH_OPS_MAX = 16
FINAL_READ_ATTEMPTS_MAX = 10
#: How long `run` waits past `duration_s` for clients to finish their last operation.
JOIN_GRACE_S = 30.0
#: Key after every workload key: scans that run to the end of the key space stop here.
SCAN_END = b"\xff"
FINAL_PROCESS = "final"
#: Pause of a client after an operation that did not succeed.
FAIL_BACKOFF_S = 0.02
#: With read replicas: the fraction of operations that are replica reads, how they split into
#: gets and scans, and how often they ask for `after=` (own last commit, db.last_commit).
REPLICA_FRACTION_DEFAULT = 0.3
REPLICA_SCAN_FRACTION = 0.25
AFTER_OWN_FRACTION = 0.4
AFTER_LAST_COMMIT_FRACTION = 0.2


@dataclass(frozen=True)
class Progress:
    """Counts of completed operations so far."""

    invoked: int
    ok: int
    fail: int
    indeterminate: int

    @property
    def completed(self) -> int:
        return self.ok + self.fail + self.indeterminate


def classify_write_error(exc: BaseException) -> str:
    """`fail` when the API promises the write was not applied, else `indeterminate`."""
    if isinstance(exc, WriteIndeterminate):
        return "indeterminate"
    if isinstance(exc, Unavailable):
        return "fail"
    return "indeterminate"


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:200]


def workload_keys(count: int) -> tuple[bytes, ...]:
    """Hot keys k000, k001, ...: zero-padded so byte order is numeric order."""
    if not (0 < count <= KEYS_MAX):
        raise AssertionError(f"keys must be in 1..{KEYS_MAX}")
    width = max(3, len(str(count - 1)))
    return tuple(b"k%0*d" % (width, i) for i in range(count))


class _Session:
    """What one client thread knows of its own session: its last write's commit position."""

    __slots__ = ("client", "last_commit")

    def __init__(self, client: int) -> None:
        self.client = client
        self.last_commit: int | None = None


class Workload:
    """Concurrent clients driving `db`, recording into `history`.

    Call `run()` (blocking) or `start()` and later `join()`; then `final_reads()`."""

    def __init__(
        self,
        db: Any,
        history: History,
        seed: int,
        clients: int = 4,
        keys: int = 8,
        mix: Mapping[str, float] | None = None,
        duration_s: float = 10.0,
        ops_max: int = 10_000,
        clock_s: Callable[[], float] = time.monotonic,
        progress: Callable[[Progress], None] | None = None,
        progress_every_ops: int = 100,
        batch_ops_max: int = 3,
        replica: Any = None,
        replica_fraction: float = REPLICA_FRACTION_DEFAULT,
    ) -> None:
        mix = dict(DEFAULT_MIX if mix is None else mix)
        if not (0 < clients <= CLIENTS_MAX):
            raise AssertionError(f"clients must be in 1..{CLIENTS_MAX}")
        if not set(mix) <= MIX_OPS or not any(w > 0 for w in mix.values()):
            raise AssertionError(f"mix names ops among {sorted(MIX_OPS)} with a positive weight")
        if not (2 <= batch_ops_max <= BATCH_OPS_MAX):
            raise AssertionError(f"batch_ops_max must be in 2..{BATCH_OPS_MAX}")
        if not (ops_max >= 0 and duration_s >= 0 and progress_every_ops > 0):
            raise AssertionError("ops_max, duration_s and progress_every_ops are bounds >= 0")
        if not 0.0 <= replica_fraction <= 1.0:
            raise AssertionError("replica_fraction is a fraction of the operations, in 0..1")
        self.replica = replica
        self._replica_fraction = replica_fraction
        self.db = db
        self.history = history
        self.seed = seed
        self.clients = clients
        self.keys = workload_keys(keys)
        # Sorted names: the draw does not depend on the caller's dict order.
        self._mix_names = sorted(n for n, w in mix.items() if w > 0)
        self._mix_weights = [mix[n] for n in self._mix_names]
        self.duration_s = duration_s
        self.ops_max = ops_max
        self._clock_s = clock_s
        self._progress_cb = progress
        self._progress_every = progress_every_ops
        self._batch_ops_max = min(batch_ops_max, len(self.keys))
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._issued = 0
        self._counts = {"ok": 0, "fail": 0, "indeterminate": 0}
        self._threads: list[threading.Thread] = []
        self._errors: list[BaseException] = []
        self._t0 = 0.0

    def describe(self) -> str:
        """One line with everything needed to replay the run's client side; print it."""
        mix = ",".join(f"{n}={w:g}" for n, w in zip(self._mix_names, self._mix_weights))
        replica = f" replica_fraction={self._replica_fraction:g}" if self.replica is not None else ""
        return (
            f"workload seed={self.seed} clients={self.clients} keys={len(self.keys)} mix={mix} "
            f"ops_max={self.ops_max} duration_s={self.duration_s}{replica}"
        )

    # -- control ----------------------------------------------------------------------------

    def start(self) -> None:
        if self._threads:
            raise AssertionError("a workload runs once")
        self._t0 = self._clock_s()
        for client in range(self.clients):
            t = threading.Thread(target=self._client, args=(client,), name=f"chaos-client-{client}", daemon=True)
            self._threads.append(t)
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        """Ask every client to stop after its current operation."""
        self._stop.set()

    def join(self, timeout_s: float | None = None) -> bool:
        """Wait for the clients; True when all have finished (a client stuck in a call that never
        returns leaves its operation open, which the history treats as indeterminate)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for t in self._threads:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            t.join(left)
        if self._errors:
            raise self._errors[0]
        return not any(t.is_alive() for t in self._threads)

    def run(self, join_timeout_s: float | None = None) -> Progress:
        """Start, wait for the bound (ops_max or duration_s) and return the counts.

        Waits at most `join_timeout_s` (default: duration_s + JOIN_GRACE_S) so a database call
        that never returns cannot hang the run; its operation stays open (indeterminate)."""
        self.start()
        self.join(self.duration_s + JOIN_GRACE_S if join_timeout_s is None else join_timeout_s)
        return self.progress()

    def progress(self) -> Progress:
        with self._lock:
            return Progress(invoked=self._issued, **self._counts)

    # -- the clients ------------------------------------------------------------------------

    def _take_slot(self) -> bool:
        if self._stop.is_set() or self._clock_s() - self._t0 >= self.duration_s:
            return False
        with self._lock:
            if self._issued >= self.ops_max:
                return False
            self._issued += 1
            return True

    def _record(self, outcome: str) -> None:
        with self._lock:
            self._counts[outcome] += 1
            done = sum(self._counts.values())
        if self._progress_cb is not None and done % self._progress_every == 0:
            self._progress_cb(self.progress())

    def _client(self, client: int) -> None:
        rng = random.Random(f"{self.seed}/{client}")
        process = client
        written = 0
        state = _Session(client)
        try:
            # Bounded by ops_max: every iteration takes one slot or ends the loop.
            for _ in range(self.ops_max):
                if not self._take_slot():
                    break
                if self.replica is not None and rng.random() < self._replica_fraction:
                    outcome = self._replica_read(rng, process, state)
                else:
                    f = rng.choices(self._mix_names, self._mix_weights)[0]
                    if f in ("put", "batch", "cas"):
                        written += 1
                    outcome = self._one(rng, process, f, written, state)
                self._record(outcome)
                if outcome == "indeterminate":
                    process += self.clients
                if outcome != "ok" and self._stop.wait(FAIL_BACKOFF_S):
                    break  # an unavailable database answers at once: do not flood the history
        except BaseException as exc:  # a bug in the workload itself, not in the database
            self._errors.append(exc)
            self._stop.set()

    def _value(self, process: int, written: int, i: int = 0) -> bytes:
        return b"p%d-%d" % (process, written) if i == 0 else b"p%d-%d.%d" % (process, written, i)

    def _one(self, rng: random.Random, process: int, f: str, written: int, state: "_Session | None" = None) -> str:
        h = self.history
        session = self._session_of(state)
        if f == "put":
            key, value = rng.choice(self.keys), self._value(process, written)
            op = h.invoke(process, "put", key=key, value=value, session=session)
            return self._write(op, lambda: self.db.put(key, value), state)
        if f == "delete":
            key = rng.choice(self.keys)
            op = h.invoke(process, "delete", key=key, session=session)
            return self._write(op, lambda: self.db.delete(key), state)
        if f == "batch":
            n = rng.randint(2, self._batch_ops_max)
            ops = []
            for i, key in enumerate(sorted(rng.sample(self.keys, n))):
                if rng.random() < 0.8:
                    ops.append(("put", key, self._value(process, written, i)))
                else:
                    ops.append(("delete", key, None))
            op = h.invoke(process, "batch", ops=ops, session=session)
            return self._write(op, lambda: self._batch(ops), state)
        if f == "cas":
            return self._cas(process, rng.choice(self.keys), self._value(process, written), session, state)
        if f == "get":
            key = rng.choice(self.keys)
            op = h.invoke(process, "get", key=key)
            return self._read(op, lambda: self.db.get(key))
        if f == "scan":
            i = rng.randrange(len(self.keys))
            j = rng.randint(i + 1, len(self.keys))
            start, end = self.keys[i], self.keys[j] if j < len(self.keys) else SCAN_END
            op = h.invoke(process, "scan", start=start, end=end)
            return self._read(op, lambda: self._scan(start, end))
        raise AssertionError(f"unknown op {f}")

    def _cas(self, process: int, key: bytes, value: bytes, session: Any, state: "_Session | None") -> str:
        """Read `key` (unrecorded: the cas records what it expected), then put `value` on the
        condition that the key still holds it. A refused condition is an ok cas that did not
        apply (result False); nothing was logged."""
        try:
            expected = self.db.get(key)
        except Exception:
            return "fail"  # nothing invoked yet: a read that failed changes nothing
        op = self.history.invoke(process, "cas", key=key, value=value, expected=expected, session=session)
        condition = cond.absent(key) if expected is None else cond.equals(key, expected)
        try:
            lsn = self.db.put(key, value, expect=condition)
        except PreconditionFailed:
            self.history.complete(op, "ok", result=False)
            return "ok"
        except Exception as exc:
            outcome = classify_write_error(exc)
            self.history.complete(op, outcome, error=_describe(exc))
            return outcome
        commit = lsn if isinstance(lsn, int) and not isinstance(lsn, bool) and lsn >= 0 else None
        self.history.complete(op, "ok", result=True, commit=commit)
        if state is not None and commit is not None:
            state.last_commit = commit
        return "ok"

    def _session_of(self, state: "_Session | None") -> Any:
        if self.replica is None or state is None:
            return None
        return self.replica.session(state.client)[0]

    def _replica_read(self, rng: random.Random, process: int, state: "_Session") -> str:
        """A get or scan on a read replica, in the client's session, with or without after=."""
        h = self.history
        session, rdb = self.replica.session(state.client)
        draw = rng.random()
        after = None
        if draw < AFTER_OWN_FRACTION:
            after = state.last_commit
        elif draw < AFTER_OWN_FRACTION + AFTER_LAST_COMMIT_FRACTION:
            last = getattr(self.db, "last_commit", None)
            after = last if isinstance(last, int) else None
        kw = {} if after is None else {"after": after}
        if rng.random() < REPLICA_SCAN_FRACTION:
            i = rng.randrange(len(self.keys))
            j = rng.randint(i + 1, len(self.keys))
            start, end = self.keys[i], self.keys[j] if j < len(self.keys) else SCAN_END
            op = h.invoke(process, "scan", start=start, end=end, session=session, replica=True, after=after)
            call = (lambda: self._scan(start, end, rdb, **kw))
        else:
            key = rng.choice(self.keys)
            op = h.invoke(process, "get", key=key, session=session, replica=True, after=after)
            call = (lambda: rdb.get(key, **kw))
        if rdb is None:
            self.history.complete(op, "fail", error="Unavailable: no reader instance to read from")
            return "fail"
        return self._read(op, call)

    def _batch(self, ops: list[tuple[str, bytes, bytes | None]]) -> int | None:
        with self.db.batch() as b:
            for bf, key, value in ops:
                if bf == "put":
                    b.put(key, value)
                else:
                    b.delete(key)
        return getattr(b, "lsn", None)

    def _scan(self, start: bytes, end: bytes, db: Any = None, **kw) -> list[tuple[bytes, bytes]]:
        # Bounded: a scan cannot legitimately return more pairs than there are keys, so a
        # runaway iterator is cut off (and the checker sees the extra pairs it did return).
        limit = 2 * len(self.keys) + 1
        out: list[tuple[bytes, bytes]] = []
        for pair in (self.db if db is None else db).scan(start, end, **kw):
            out.append((bytes(pair[0]), bytes(pair[1])))
            if len(out) >= limit:
                break
        return out

    def _write(self, op: int, call: Callable[[], Any], state: "_Session | None" = None) -> str:
        try:
            lsn = call()
        except Exception as exc:
            outcome = classify_write_error(exc)
            self.history.complete(op, outcome, error=_describe(exc))
            return outcome
        # The commit position the write returned (a test fake may return none).
        commit = lsn if isinstance(lsn, int) and not isinstance(lsn, bool) and lsn >= 0 else None
        self.history.complete(op, "ok", commit=commit)
        if state is not None and commit is not None:
            state.last_commit = commit
        return "ok"

    def _read(self, op: int, call: Callable[[], Any]) -> str:
        try:
            result = call()
        except Exception as exc:
            self.history.complete(op, "fail", error=_describe(exc))
            return "fail"
        self.history.complete(op, "ok", result=result)
        return "ok"

    # -- the final phase --------------------------------------------------------------------

    def final_reads(self, attempts: int = 3) -> dict[bytes, bytes | None]:
        """Read every key once (retrying a failed read up to `attempts` times); every attempt
        is recorded as a get with final=True. Returns what was read; a key whose reads all
        failed is missing from the result."""
        if not (1 <= attempts <= FINAL_READ_ATTEMPTS_MAX):
            raise AssertionError(f"attempts must be in 1..{FINAL_READ_ATTEMPTS_MAX}")
        out: dict[bytes, bytes | None] = {}
        for key in self.keys:
            for _ in range(attempts):
                op = self.history.invoke(FINAL_PROCESS, "get", key=key, final=True)
                try:
                    value = self.db.get(key)
                except Exception as exc:
                    self.history.complete(op, "fail", error=_describe(exc))
                    continue
                self.history.complete(op, "ok", result=value)
                out[key] = value
                break
        return out
