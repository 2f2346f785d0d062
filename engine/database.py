"""The public key-value API: `Database`, `Batch`, `Snapshot`.

Commit positions and read-your-writes: every write (put, delete, a committed batch) returns its
commit position, the CPL LSN of its unit (an int; `db.last_commit` keeps the newest this
`Database` made). A read with `after=position` is served only at a read point that covers it:
on the writer (embedded or remote) that is at once; on a reader instance
(`engine.connect(folder, role="reader")`) the read waits, bounded by the write timeout, for the
replica's read point to catch up, then reads (`ReplicaBehind` if it does not in time).

Request ids: every write unit (a put, a delete, a committed batch) carries a request id, chosen
by the caller (`request_id=`, 1..64 bytes) or made here (16 random bytes). The writer logs it
with the unit, so `status_of(request_id)` says whether the write committed, also after a writer
crash or failover; and a write sent again under the same id is applied at most once. Every
error a write raises carries its id as `error.request_id`: after a `WriteIndeterminate`, either
ask `status_of(error.request_id)` or send the same write again with `request_id=error.request_id`.

One `Database` class serves every deployment: it wraps a *backend* (the embedded volume, or the
gRPC client of a writer endpoint) that offers `write(ops)`, `get(key, quorum, view)`,
`scan(start, end, quorum, view)`, `view()`, `status()` and `close()`. Inputs are checked here,
before anything is logged, so a bad call changes nothing.

Conditional writes: `put`, `delete` and `batch` take `expect=` (one `engine.Condition` or a
list: `engine.exists(key)`, `engine.absent(key)`, `engine.equals(key, value)`,
`engine.unchanged(key, since=position)`). The writer checks them as it orders the unit, under its
lock, so the check and the writes are one atomic step; if any fails nothing is logged and the
write raises `PreconditionFailed` (`.failed`: the indices of the conditions that failed). A
condition sees every write ordered before it, also one not yet durable: durability advances as
a prefix of the log, so a unit that depends on it cannot become durable without it.

Expiry (`engine.head.expiry`): `put` and `Batch.put` take `ttl_s=` (a time to live, counted from
the write's commit time on the log's clock) or `expires_at_us=` (a deadline, microseconds since
the Unix epoch). Once the log's time passes the deadline, reads see no key; a background step
then deletes it through the log, on the condition that it still holds that version. A value of
an expiring put is at most 1 MiB - 8 bytes (the deadline is stored with it). `version(key)`
tells a key's version, deadline and the writer's clock (`Version`).

A `Database` that is dropped without `close()` closes its backend when it is garbage collected
(and at interpreter exit at the latest): an embedded volume then stops its threads, closes its
LMDB files and frees its folder for the next open.
"""

from __future__ import annotations

import math
import os
import struct
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from engine.core.conditions import Condition, check_conditions
from engine.core.constants import (
    DEADLINE_US_MAX,
    EXPIRES_BYTES,
    FLAG_DELETE,
    FLAG_EXPIRES,
    FLAG_PUT,
    LSN_VALID_MAX,
    OP_TTL,
    VALUE_BYTES_MAX,
)
from engine.core.types import RequestStatus
from engine.errors import Closed, InvalidArgument, SixfoldError
from engine.head.reads import check_key
from engine.head.writer import BATCH_OPS_MAX, check_request_id, check_value


def check_after(after, name: str = "after") -> int:
    """A commit position for `after=` (or the argument `name`): a non-negative int (bool
    refused), in LSN bounds."""
    if isinstance(after, bool) or not isinstance(after, int) or not 0 <= after <= LSN_VALID_MAX:
        raise InvalidArgument(f"{name}= is a commit position (an int LSN in 0..{LSN_VALID_MAX} a write returned), got {after!r}")
    return after


_DEADLINE = struct.Struct("<Q")
#: a time to live is at most this (about 292,000 years): it is added to a commit time in a u64
TTL_US_MAX = DEADLINE_US_MAX // 2


@dataclass(frozen=True)
class Version:
    """A key's newest live version (`Database.version`): its value, its commit LSN, its deadline
    (microseconds on the log's clock; 0: none), and the writer's clock when it was read (the
    time to live left is `deadline_us - clock_us`)."""

    value: bytes
    lsn: int
    deadline_us: int
    clock_us: int

    @property
    def ttl_s(self) -> float | None:
        """Seconds left to live (never below 0), None without a deadline."""
        return None if not self.deadline_us else max(0, self.deadline_us - self.clock_us) / 1e6


@dataclass(frozen=True)
class Change:
    """One committed change a watch yields: the key, its new value (None: deleted), and the
    commit position of the unit that made it (the ops of one batch share it)."""

    key: bytes
    value: bytes | None
    position: int


def put_op(key: bytes, value: bytes, ttl_s=None, expires_at_us=None) -> tuple[int, bytes, bytes]:
    """The op of a put, with its deadline or time to live (checked; InvalidArgument)."""
    check_key(key)
    check_value(value)
    if ttl_s is None and expires_at_us is None:
        return (FLAG_PUT, key, value)
    if ttl_s is not None and expires_at_us is not None:
        raise InvalidArgument("a put takes ttl_s= or expires_at_us=, not both")
    if len(value) > VALUE_BYTES_MAX - EXPIRES_BYTES:
        raise InvalidArgument(f"value of {len(value)} bytes: an expiring value is at most {VALUE_BYTES_MAX - EXPIRES_BYTES} bytes")
    if ttl_s is not None:
        if isinstance(ttl_s, bool) or not isinstance(ttl_s, (int, float)) or not math.isfinite(ttl_s) or ttl_s <= 0:
            raise InvalidArgument(f"ttl_s= is a positive number of seconds, got {ttl_s!r}")
        ttl_us = max(1, round(ttl_s * 1e6))
        if ttl_us > TTL_US_MAX:
            raise InvalidArgument(f"ttl_s={ttl_s!r} is more than {TTL_US_MAX // 10**6} seconds")
        return (FLAG_PUT | FLAG_EXPIRES | OP_TTL, key, _DEADLINE.pack(ttl_us) + value)
    if isinstance(expires_at_us, bool) or not isinstance(expires_at_us, int) or not 1 <= expires_at_us <= DEADLINE_US_MAX:
        raise InvalidArgument(f"expires_at_us= is an int of microseconds since the Unix epoch in 1..{DEADLINE_US_MAX}, got {expires_at_us!r}")
    return (FLAG_PUT | FLAG_EXPIRES, key, _DEADLINE.pack(expires_at_us) + value)


def _conditions(expect) -> tuple[Condition, ...]:
    """`expect=` as given (None, one Condition, or an iterable of them), checked."""
    if expect is None:
        return ()
    if isinstance(expect, Condition):
        return check_conditions((expect,))
    if isinstance(expect, (bytes, str)) or not hasattr(expect, "__iter__"):
        raise InvalidArgument(f"expect= is an engine.Condition or a list of them, got {type(expect).__name__}")
    return check_conditions(tuple(expect))


class Batch:
    """Writes applied atomically on exit of the `with` block: readers see all of them or none.

    An exception inside the block discards the batch; nothing is logged."""

    def __init__(self, db: Database, request_id: bytes | None = None, expect=()) -> None:
        if request_id is not None:
            check_request_id(request_id)
        self._db = db
        self._ops: list[tuple[int, bytes, bytes]] = []
        #: the batch's preconditions (`expect=`, `expect()`): all must hold, or nothing is logged
        self.conditions: list[Condition] = list(_conditions(expect))
        self._done = False
        self.lsn: int | None = None
        #: the id the batch is logged under (chosen by the caller, or made at commit)
        self.request_id = request_id

    def put(self, key: bytes, value: bytes, *, ttl_s: float | None = None, expires_at_us: int | None = None) -> Batch:
        """Add a put; `ttl_s` / `expires_at_us`: it expires (see the module docstring)."""
        self._add(put_op(key, value, ttl_s, expires_at_us))
        return self

    def delete(self, key: bytes) -> Batch:
        check_key(key)
        self._add((FLAG_DELETE, key, b""))
        return self

    def expect(self, *conditions: Condition) -> Batch:
        """Add preconditions (see the module docstring)."""
        if self._done:
            raise InvalidArgument("this batch was already committed or discarded")
        self.conditions.extend(check_conditions(conditions))
        return self

    def _add(self, op) -> None:
        if self._done:
            raise InvalidArgument("this batch was already committed or discarded")
        if len(self._ops) >= BATCH_OPS_MAX:
            raise InvalidArgument(f"a batch holds at most {BATCH_OPS_MAX} operations")
        self._ops.append(op)

    def __len__(self) -> int:
        return len(self._ops)

    def commit(self) -> int | None:
        """Log the batch and wait until it is durable; returns its CPL LSN (None if empty: an
        empty batch logs nothing, and its conditions are not checked). PreconditionFailed if
        one of its conditions did not hold: nothing was logged."""
        if self._done:
            raise InvalidArgument("this batch was already committed or discarded")
        self._done = True
        if not self._ops:
            return None
        self.lsn, self.request_id = self._db._write(self._ops, self.request_id, self.conditions)
        return self.lsn

    def __enter__(self) -> Batch:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self._done = True


class Snapshot:
    """Repeatable reads at a fixed read point (the VDL when it was taken).

    The snapshot holds its read point against version collection (`engine.head.readpoints`)
    until it is closed (`close()`, the end of its `with` block, or when it is collected): after
    that, and after a writer change (a new writer does not know the old one's snapshots), its
    reads may raise SnapshotTooOld once the nodes collected past it."""

    def __init__(self, db: Database) -> None:
        self._db = db
        opener = getattr(db._backend, "open_snapshot", None)
        if opener is None:
            self.view, release = db._backend.view(), None
        else:
            self.view, release = opener()
        self._finalizer = weakref.finalize(self, release) if release is not None else None

    def close(self) -> None:
        """Release the read point (reads may then meet SnapshotTooOld)."""
        if self._finalizer is not None:
            self._finalizer()

    @property
    def read_point(self) -> int:
        return self.view.read_point

    def get(self, key: bytes, *, quorum: bool = False) -> bytes | None:
        return self._db._backend.get(key, quorum=quorum, view=self.view)

    def scan(self, start: bytes = b"", end: bytes | None = None, *, quorum: bool = False) -> Iterator[tuple[bytes, bytes]]:
        return self._db._backend.scan(start, end, quorum=quorum, view=self.view)

    def __enter__(self) -> Snapshot:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Database:
    """A Sixfold volume. Use as a context manager, or call close()."""

    def __init__(self, backend, cluster=None) -> None:
        self._backend = backend
        self.cluster = cluster
        self._closed = False
        #: the commit position (CPL LSN) of the newest write this Database made, None before any
        self.last_commit: int | None = None
        # Runs backend.close once: on close(), when this object is collected, or at exit.
        self._finalizer = weakref.finalize(self, backend.close)

    def _check(self) -> None:
        if self._closed:
            raise Closed("the database is closed")

    def _write(self, ops, request_id: bytes | None, conditions=()) -> tuple[int, bytes]:
        """Log one unit under a request id (the caller's, which may be a re-send, or a new one)
        and its conditions; returns (CPL LSN, request id). Errors carry the id as `request_id`."""
        resend = request_id is not None
        if resend:
            check_request_id(request_id)
        else:
            request_id = self._new_request_id()
        try:
            if conditions:
                lsn = self._backend.write(tuple(ops), request_id=request_id, resend=resend, conditions=tuple(conditions))
            else:
                lsn = self._backend.write(tuple(ops), request_id=request_id, resend=resend)
        except SixfoldError as e:
            e.request_id = request_id
            raise
        if self.last_commit is None or lsn > self.last_commit:
            self.last_commit = lsn
        return lsn, request_id

    def _new_request_id(self) -> bytes:
        make = getattr(self._backend, "new_request_id", None)
        return make() if make is not None else os.urandom(16)

    def put(self, key: bytes, value: bytes, *, request_id: bytes | None = None, expect=None,
            ttl_s: float | None = None, expires_at_us: int | None = None) -> int:
        """Store `value` under `key`; returns once the write is durable (4 of 6 segments), with
        its commit position (see the module docstring).

        `request_id` (1..64 bytes): send a write again under the id it had (see the module
        docstring); it is applied at most once. `expect`: preconditions; `ttl_s` (seconds) or
        `expires_at_us` (a deadline): the key expires (module docstring)."""
        self._check()
        return self._write((put_op(key, value, ttl_s, expires_at_us),), request_id, _conditions(expect))[0]

    def delete(self, key: bytes, *, request_id: bytes | None = None, expect=None) -> int:
        """Remove `key` (a tombstone); returns once durable, with its commit position. Deleting
        a missing key is fine. `expect`: preconditions (module docstring)."""
        self._check()
        check_key(key)
        return self._write(((FLAG_DELETE, key, b""),), request_id, _conditions(expect))[0]

    def get(self, key: bytes, *, quorum: bool = False, after: int | None = None) -> bytes | None:
        """The value of `key` at the current VDL, or None. Linearizable on the writer.
        `quorum=True` forces a 3-of-6 quorum read instead of one segment known to be complete.
        `after=position` (a write's return value, or `last_commit`): read at a read point that
        covers that write (see the module docstring)."""
        self._check()
        check_key(key)
        if after is None:
            return self._backend.get(key, quorum=quorum, view=None)
        return self._backend.get(key, quorum=quorum, view=None, after=check_after(after))

    def get_many(self, keys: Sequence[bytes], *, quorum: bool = False, after: int | None = None) -> list[bytes | None]:
        """The values of `keys` (None where a key has none), all at one read point, in one pass
        over the segments (one batched read per node). Raises the first key's error if any get
        fails (InvalidArgument for a bad key, before anything is read). `after`: as for `get`."""
        self._check()
        keys = list(keys)
        for key in keys:
            check_key(key)
        gets = [(key, quorum, None) for key in keys]
        results = self._backend.get_many(gets) if after is None else self._backend.get_many(gets, after=check_after(after))
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return results

    def scan(self, start: bytes = b"", end: bytes | None = None, *, quorum: bool = False,
             after: int | None = None) -> Iterator[tuple[bytes, bytes]]:
        """(key, value) pairs with start <= key < end, in key order, all at one read point.
        `after`: as for `get`."""
        self._check()
        if after is None:
            return self._backend.scan(start, end, quorum=quorum, view=None)
        return self._backend.scan(start, end, quorum=quorum, view=None, after=check_after(after))

    def watch(self, prefix: bytes = b"", start: int | None = None) -> Iterator[Change]:
        """The committed changes of keys starting with `prefix`, in commit order, as they
        commit: `Change(key, value or None, position)`. `start`: a commit position (a write's,
        `read_point()`, or the last `position` a watch gave: resume there; 0: the beginning);
        default now. Changes older than the writer's memory of them are read from the nodes'
        logs (`engine.head.watch`), and the watch holds version collection back from when this
        returns until it is closed. A position the nodes may have collected past, or a watch
        that falls more than the bound (`watch_hold_lsns`, 4,000,000 LSNs) behind the VDL,
        raises `Compacted` with `.oldest`, the oldest position still kept: never a silent gap.
        The iterator runs until closed (`close()`, or dropped)."""
        self._check()
        if not isinstance(prefix, bytes):
            raise InvalidArgument(f"a watch prefix is bytes, got {type(prefix).__name__}")
        if start is not None:
            check_after(start, "start")
        return self._backend.watch(prefix, start)

    def get_or_load(self, key: bytes, loader, ttl_s: float | None = None) -> bytes:
        """Cache-aside: the key's value; on a miss `loader(key)` makes it (bytes), and it is
        stored (with time to live `ttl_s`, if given) before it is returned."""
        value = self.get(key)
        if value is not None:
            return value
        value = loader(key)
        check_value(value)
        self.put(key, value, ttl_s=ttl_s)
        return value

    def cache_stats(self) -> dict:
        """The client cache's counters (`engine.cache`): hits, misses, hit_ratio, evictions,
        invalidations, dropped_fills, entries, bytes; InvalidArgument without a cache."""
        self._check()
        stats = getattr(self._backend, "cache_stats", None)
        if stats is None:
            raise InvalidArgument("this database has no cache: engine.connect(..., cache=...) makes one")
        return stats()

    def read_point(self) -> int:
        """The current read point (the VDL): a commit position at or above every write that
        returned before this call (what `engine.unchanged(key, since=...)` compares with)."""
        self._check()
        return self._backend.view().read_point

    def version(self, key: bytes) -> Version | None:
        """The newest live version of `key` (value, LSN, deadline, the writer's clock), or None
        when it has none (never written, deleted, or expired). Linearizable, like `get`; served
        by the writer (embedded, or the writer endpoint)."""
        self._check()
        check_key(key)
        lsn, value, deadline, clock_us = self._backend.version(key)
        if lsn == 0 or value is None:
            return None
        return Version(value, lsn, deadline, clock_us)

    def batch(self, *, request_id: bytes | None = None, expect=None) -> Batch:
        """A batch of writes applied atomically (see Batch); `expect`: its preconditions."""
        self._check()
        return Batch(self, request_id, _conditions(expect))

    def status_of(self, request_id: bytes) -> RequestStatus:
        """Whether the write sent under `request_id` committed: `.state` is "committed" (with its
        CPL `.lsn`), "pending" (logged, not yet durable) or "not_committed" (never logged, or cut
        by a recovery). A caller holding a WriteIndeterminate asks this, or re-sends under the id."""
        self._check()
        check_request_id(request_id)
        return self._backend.request_status(request_id)

    def snapshot(self) -> Snapshot:
        self._check()
        return Snapshot(self)

    def status(self) -> dict:
        """A JSON-ready dict: at least `vdl` and `nodes` ({id, az, up, scl: {pg: lsn}, ...})."""
        self._check()
        return self._backend.status()

    def metrics(self) -> dict[str, float]:
        """The embedded engine's metrics (`engine.metrics`): the same samples a cluster process
        serves on its metrics port, as a dict keyed by the sample as the Prometheus text writes it
        (`"sixfold_vdl"`, `'sixfold_scl_lag_lsns{node="n3"}'`, `"sixfold_put_latency_seconds_count"`);
        values are floats. `metrics_text()` gives the text itself. A database from
        `engine.connect` has none of its own (InvalidArgument): each cluster process serves its
        metrics over HTTP (`sixfold cluster status` lists the addresses)."""
        return self._metrics().values()

    def metrics_text(self) -> str:
        """The Prometheus text exposition of `metrics()` (what a cluster process serves)."""
        return self._metrics().text()

    def _metrics(self):
        self._check()
        m = getattr(self._backend, "metrics", None)
        if m is None:
            raise InvalidArgument("metrics() belongs to the embedded engine (engine.open); the processes of a cluster "
                                  "serve theirs over HTTP on their metrics ports (see `sixfold cluster status`)")
        return m

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._finalizer()

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
