"""The public key-value API: `Database`, `Batch`, `Snapshot`.

One `Database` class serves every deployment: it wraps a *backend* (the embedded volume, or the
gRPC client of a writer endpoint) that offers `write(ops)`, `get(key, quorum, view)`,
`scan(start, end, quorum, view)`, `view()`, `status()` and `close()`. Inputs are checked here,
before anything is logged, so a bad call changes nothing.

A `Database` that is dropped without `close()` closes its backend when it is garbage collected
(and at interpreter exit at the latest): an embedded volume then stops its threads, closes its
LMDB files and frees its folder for the next open.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator

from engine.core.constants import FLAG_DELETE, FLAG_PUT
from engine.errors import Closed, InvalidArgument
from engine.head.writer import BATCH_OPS_MAX, check_key, check_value


class Batch:
    """Writes applied atomically on exit of the `with` block: readers see all of them or none.

    An exception inside the block discards the batch; nothing is logged."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._ops: list[tuple[int, bytes, bytes]] = []
        self._done = False
        self.lsn: int | None = None

    def put(self, key: bytes, value: bytes) -> Batch:
        check_key(key)
        check_value(value)
        self._add((FLAG_PUT, key, value))
        return self

    def delete(self, key: bytes) -> Batch:
        check_key(key)
        self._add((FLAG_DELETE, key, b""))
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
        """Log the batch and wait until it is durable; returns its CPL LSN (None if empty)."""
        if self._done:
            raise InvalidArgument("this batch was already committed or discarded")
        self._done = True
        if not self._ops:
            return None
        self.lsn = self._db._backend.write(self._ops)
        return self.lsn

    def __enter__(self) -> Batch:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self._done = True


class Snapshot:
    """Repeatable reads at a fixed read point (the VDL when it was taken)."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self.view = db._backend.view()

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
        pass


class Database:
    """A Sixfold volume. Use as a context manager, or call close()."""

    def __init__(self, backend, cluster=None) -> None:
        self._backend = backend
        self.cluster = cluster
        self._closed = False
        # Runs backend.close once: on close(), when this object is collected, or at exit.
        self._finalizer = weakref.finalize(self, backend.close)

    def _check(self) -> None:
        if self._closed:
            raise Closed("the database is closed")

    def put(self, key: bytes, value: bytes) -> None:
        """Store `value` under `key`; returns once the write is durable (4 of 6 segments)."""
        self._check()
        check_key(key)
        check_value(value)
        self._backend.write(((FLAG_PUT, key, value),))

    def delete(self, key: bytes) -> None:
        """Remove `key` (a tombstone); returns once durable. Deleting a missing key is fine."""
        self._check()
        check_key(key)
        self._backend.write(((FLAG_DELETE, key, b""),))

    def get(self, key: bytes, *, quorum: bool = False) -> bytes | None:
        """The value of `key` at the current VDL, or None. Linearizable. `quorum=True` forces a
        3-of-6 quorum read instead of one segment known to be complete."""
        self._check()
        check_key(key)
        return self._backend.get(key, quorum=quorum, view=None)

    def scan(self, start: bytes = b"", end: bytes | None = None, *, quorum: bool = False) -> Iterator[tuple[bytes, bytes]]:
        """(key, value) pairs with start <= key < end, in key order, all at one read point."""
        self._check()
        return self._backend.scan(start, end, quorum=quorum, view=None)

    def batch(self) -> Batch:
        self._check()
        return Batch(self)

    def snapshot(self) -> Snapshot:
        self._check()
        return Snapshot(self)

    def status(self) -> dict:
        """A JSON-ready dict: at least `vdl` and `nodes` ({id, az, up, scl: {pg: lsn}, ...})."""
        self._check()
        return self._backend.status()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._finalizer()

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
