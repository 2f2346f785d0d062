"""How a node's LMDB map grows to its maximum: the sizes, and the gate that lets a resize have the
map alone.

Theory of operation
-------------------
LMDB maps its data file into memory at a fixed size, the *map*; a write that needs a page past it
fails with MDB_MAP_FULL. The map is address space, not disk (the file grows with the pages
used), but a map of the whole maximum per node costs address space a process may not have
(`ulimit -v`, six nodes of a large maximum in one embedded process), so a node opens with a
modest map (MAP_BYTES_INITIAL, or twice its data, at most its maximum) and grows it up to its
maximum (`SegmentStore.max_bytes`), geometrically:

* *ahead of need*: before a write, when the data file's high-water mark plus WRITE_COST_FACTOR
  times what the write brings (and SLACK_BYTES) would pass GROW_AT_FRACTION of the map, the map
  grows to at least GROW_FACTOR times itself (`next_map_bytes`), capped at the maximum;
* *on MDB_MAP_FULL in a transaction* (`retry_when_full`): LMDB aborts the transaction, and the
  store publishes nothing before a commit, so the write changed nothing; the map grows and the
  write runs again, until it fits or the map is at its maximum: then the error stands and the
  node answers StorageFull. Each retry follows a growth of at least GROW_FACTOR, so the retries
  are bounded by log2(maximum / initial map).

`Environment.set_mapsize` re-maps the file, so no transaction may be open in this process while it
runs (a reader's cursor would point into the old mapping; LMDB does not check). Writers are kept
out by the store's write lock, which a resize holds. Readers pass the `MapGate`: a read
transaction enters it (shared: a counter under a lock, twice per read), and a resize closes it to
new readers, waits for those inside to leave (at most GATE_WAIT_S: a resize that cannot get the
map alone is skipped and logged, the write then meets a full map as before), resizes, and opens it
again. A thread already inside never waits at the gate (a nested read passes), and a resize asked
for by a thread inside is skipped, so the gate cannot wait on itself; and no reader takes the
write lock while inside (the store quarantines a corrupt record found by a read only after the
read transaction ended), so a resize holding the write lock cannot wait on a reader that waits
on it.

Rules of this module: the standard library and lmdb only; the store owns the environment.
"""

from __future__ import annotations

import functools
import threading
import time

import lmdb

#: The map a node opens with (or its maximum, if smaller; or twice its data, if larger).
MAP_BYTES_INITIAL = 64 << 20
#: The map grows when a write could take the data file past this fraction of it...
GROW_AT_FRACTION = 0.75
#: ... to at least this many times itself (and twice what is needed).
GROW_FACTOR = 2
#: What a write may take in LMDB, per byte of the frame it brings (records, indexes, and the
#: pages copy-on-write keeps until the commit; engine.core.admission bounds it by about 2).
WRITE_COST_FACTOR = 2
#: What any write may take beyond its records (branch pages, meta, the free list).
SLACK_BYTES = 1 << 20
#: Maps are sized in whole MiB (and never past the maximum).
MAP_ROUND_BYTES = 1 << 20
#: The longest a resize waits for the readers inside the gate to leave.
GATE_WAIT_S = 10.0


def next_map_bytes(current: int, need: int, maximum: int) -> int:
    """The map to grow to: at least GROW_FACTOR x `current` and x `need`, whole MiB, at most
    `maximum`."""
    target = max(current, need) * GROW_FACTOR
    target = -(-target // MAP_ROUND_BYTES) * MAP_ROUND_BYTES
    return min(maximum, target)


def initial_map_bytes(file_bytes: int, maximum: int) -> int:
    """The map to open with: MAP_BYTES_INITIAL, or room for twice the data already in the file,
    at most `maximum` (LMDB itself raises a map below the data to the data's size)."""
    return min(maximum, max(MAP_BYTES_INITIAL, next_map_bytes(file_bytes, file_bytes, 1 << 62)))


class GateTimeout(Exception):
    """The readers inside the gate did not all leave within GATE_WAIT_S (internal to the store)."""


class MapGate:
    """Read transactions share the map; a resize has it alone. See the module docstring."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._inside = 0
        self._closed = False
        self._local = threading.local()

    def enter(self) -> None:
        local = self._local
        depth = getattr(local, "depth", 0)
        if depth == 0:
            with self._cond:
                while self._closed:
                    self._cond.wait()
                self._inside += 1
        local.depth = depth + 1

    def leave(self) -> None:
        local = self._local
        local.depth -= 1
        if local.depth == 0:
            with self._cond:
                self._inside -= 1
                if self._closed and self._inside == 0:
                    self._cond.notify_all()

    def inside(self) -> bool:
        """Whether this thread is inside the gate (then it must not wait for a resize)."""
        return getattr(self._local, "depth", 0) > 0

    def alone(self, resize, timeout_s: float = GATE_WAIT_S) -> None:
        """Run `resize()` with no reader inside; GateTimeout if they do not leave in time. The
        caller holds the store's write lock (one resize at a time) and is not inside."""
        assert not self.inside(), "a reader cannot resize the map it is reading"
        deadline = time.monotonic() + timeout_s
        with self._cond:
            assert not self._closed, "one resize at a time (under the store's write lock)"
            self._closed = True
            try:
                while self._inside:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise GateTimeout(f"{self._inside} read transaction(s) still open after {timeout_s:g} s")
                    self._cond.wait(left)
                resize()
            finally:
                self._closed = False
                self._cond.notify_all()


def retry_when_full(method):
    """Decorate a SegmentStore write: on MDB_MAP_FULL, grow the map (`store.grow_after_full`)
    and run the write again; the error stands once the map cannot grow (see the module docstring).
    Only for writes that publish nothing before their commit, so that a failed run changed nothing."""

    @functools.wraps(method)
    def run(store, *args, **kwargs):
        while True:
            seen = store.map_bytes
            try:
                return method(store, *args, **kwargs)
            except lmdb.MapFullError:
                if not store.grow_after_full(seen):
                    raise

    return run


__all__ = ["GateTimeout", "MapGate", "initial_map_bytes", "next_map_bytes", "retry_when_full"]
