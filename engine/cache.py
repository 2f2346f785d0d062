"""A client-side read cache (`engine.connect(..., cache=...)`), kept fresh by the watch stream.

Theory of operation
-------------------
`CachedBackend` wraps a database backend. A plain `get` (no snapshot, no quorum, no `after=`)
is answered from an in-process LRU of (key -> value or None) bounded by bytes, each entry with an
optional time to live; a miss reads through and fills. A background thread watches every key
(`backend.watch(b"", start)`) and, for each committed change at position P, drops the entry of
that key unless the entry already reflects P or later. So an entry is never staler than the
watch stream's lag.

The race a naive cache loses: a fill reads the old value, another client's write commits and its
invalidation arrives, *then* the fill stores the old value, which nothing will invalidate again.
Every fill is therefore tagged with a read point: the watch's position when the read began (the
read happens after, so it saw at least that much). The cache remembers, per key, the position of
the newest invalidation it applied (bounded; beyond the bound it remembers only the highest
position forgotten, `_forgotten_floor`); a fill whose tag is below that is dropped instead of
stored. The client's own writes go through: a put that returned at position P stores its value
tagged P (the state of the key at P exactly), under the same rule; deletes, batches and
conditional or expiring writes invalidate instead.

If the watch stream fails (Compacted, a lost connection, a writer change it could not follow),
nothing can be trusted: the cache empties itself and the watch starts again from the current
read point; entries filled before that are gone, so no change is missed.

`get_or_load(key, loader, ttl_s)` is the cache-aside helper (ElastiCache's pattern with Sixfold as
the cache store): read the key; on a miss call `loader(key)` and store what it returns with that
time to live. Hits, misses, evictions, invalidations and dropped fills are in `stats()` (and in
`db.status()["cache"]`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from engine.core.constants import FLAG_PUT
from engine.errors import InvalidArgument, SixfoldError

log = logging.getLogger("sixfold.cache")

#: the bytes an entry costs beyond its key and value (the dict and tuple around them)
ENTRY_OVERHEAD_BYTES = 100
#: invalidation positions remembered per key for racing fills
INVALIDATIONS_MAX = 65_536
#: pause before the watch starts again after it failed
REWATCH_PAUSE_S = 0.2


@dataclass(frozen=True)
class CacheOptions:
    """`bytes_max`: the cache's bound (keys, values and ENTRY_OVERHEAD_BYTES each); `ttl_s`: how
    long an entry may be served at most (None: until invalidated or evicted)."""

    bytes_max: int = 64 << 20
    ttl_s: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.bytes_max, bool) or not isinstance(self.bytes_max, int) or not 1 <= self.bytes_max <= 1 << 40:
            raise InvalidArgument(f"a cache's bytes_max is an int in 1..2^40, got {self.bytes_max!r}")
        if self.ttl_s is not None and (isinstance(self.ttl_s, bool) or not isinstance(self.ttl_s, (int, float))
                                       or not 0 < self.ttl_s < 1e9):
            raise InvalidArgument(f"a cache's ttl_s is a positive number of seconds or None, got {self.ttl_s!r}")


def cache_options(cache) -> CacheOptions | None:
    """`cache=` as given: None/False (no cache), True (the defaults), an int (bytes_max), a dict
    of CacheOptions fields, or CacheOptions."""
    if cache is None or cache is False:
        return None
    if cache is True:
        return CacheOptions()
    if isinstance(cache, CacheOptions):
        return cache
    if isinstance(cache, int):
        return CacheOptions(bytes_max=cache)
    if isinstance(cache, dict):
        unknown = set(cache) - {"bytes_max", "ttl_s"}
        if unknown:
            raise InvalidArgument(f"unknown cache option(s) {sorted(unknown)}: bytes_max, ttl_s")
        return CacheOptions(**cache)
    raise InvalidArgument(f"cache= is True, a byte bound, a dict or engine.cache.CacheOptions, got {type(cache).__name__}")


class Cache:
    """The LRU itself: thread-safe; positions are commit positions (LSNs)."""

    def __init__(self, options: CacheOptions, clock=time.monotonic) -> None:
        self.options = options
        self._clock = clock
        self._lock = threading.Lock()
        #: key -> (value or None, tag position, expires at (clock) or 0, size)
        self._entries: OrderedDict[bytes, tuple[bytes | None, int, float, int]] = OrderedDict()
        self._bytes = 0
        self._invalidated: OrderedDict[bytes, int] = OrderedDict()
        self._forgotten_floor = 0
        #: the watch's position: every change at or below it was applied
        self.position = 0
        self.stats_counts = {"hits": 0, "misses": 0, "evictions": 0, "invalidations": 0, "dropped_fills": 0,
                             "expired": 0, "resets": 0}

    def lookup(self, key: bytes):
        """(True, value or None) on a hit, (False, None) on a miss."""
        with self._lock:
            e = self._entries.get(key)
            if e is not None:
                if e[2] and e[2] <= self._clock():
                    self._drop_locked(key)
                    self.stats_counts["expired"] += 1
                else:
                    self._entries.move_to_end(key)
                    self.stats_counts["hits"] += 1
                    return True, e[0]
            self.stats_counts["misses"] += 1
            return False, None

    def fill(self, key: bytes, value: bytes | None, tag: int, ttl_s: float | None = None) -> bool:
        """Store what a read at (or after) position `tag` found, unless an invalidation newer than
        `tag` was applied to the key meanwhile (then the value may be stale: dropped)."""
        size = len(key) + (len(value) if value is not None else 0) + ENTRY_OVERHEAD_BYTES
        if size > self.options.bytes_max:
            return False
        ttl = self.options.ttl_s if ttl_s is None else ttl_s
        with self._lock:
            if tag < self._forgotten_floor or self._invalidated.get(key, -1) > tag:
                self.stats_counts["dropped_fills"] += 1
                return False
            old = self._entries.get(key)
            if old is not None:
                if old[1] > tag:
                    return False  # it holds a newer state already
                self._bytes -= old[3]
            self._entries[key] = (value, tag, self._clock() + ttl if ttl else 0.0, size)
            self._entries.move_to_end(key)
            self._bytes += size
            while self._bytes > self.options.bytes_max:
                k, e = self._entries.popitem(last=False)
                self._bytes -= e[3]
                self.stats_counts["evictions"] += 1
            return True

    def invalidate(self, key: bytes, position: int) -> None:
        """A change of `key` committed at `position`: an entry older than it goes."""
        with self._lock:
            e = self._entries.get(key)
            if e is not None and e[1] < position:
                self._drop_locked(key)
                self.stats_counts["invalidations"] += 1
            inv = self._invalidated
            if inv.get(key, -1) < position:
                inv[key] = position
                inv.move_to_end(key)
            while len(inv) > INVALIDATIONS_MAX:
                _k, p = inv.popitem(last=False)
                self._forgotten_floor = max(self._forgotten_floor, p)

    def advance(self, position: int) -> None:
        with self._lock:
            self.position = max(self.position, position)

    def reset(self, position: int) -> None:
        """Forget everything (the watch lost its place): no fill older than `position` is kept."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0
            self._invalidated.clear()
            self._forgotten_floor = max(self._forgotten_floor, position)
            self.position = position
            self.stats_counts["resets"] += 1

    def _drop_locked(self, key: bytes) -> None:
        e = self._entries.pop(key)
        self._bytes -= e[3]

    def stats(self) -> dict:
        with self._lock:
            c = dict(self.stats_counts)
            looked = c["hits"] + c["misses"]
            c.update(entries=len(self._entries), bytes=self._bytes, bytes_max=self.options.bytes_max,
                     hit_ratio=round(c["hits"] / looked, 4) if looked else 0.0, position=self.position)
            return c


class CachedBackend:
    """A backend (embedded or remote) with a `Cache` in front of its plain gets."""

    def __init__(self, inner, options: CacheOptions) -> None:
        self._inner = inner
        self.cache = Cache(options)
        self._closed = False
        self._ready = threading.Event()
        self._watch = None
        self._thread = threading.Thread(target=self._follow, name="cache-watch", daemon=True)
        self._thread.start()
        self._ready.wait(5.0)

    def __getattr__(self, name):  # everything not cached goes to the backend as it is
        return getattr(self._inner, name)

    # --- the watch --------------------------------------------------------------------------
    def _follow(self) -> None:
        cache = self.cache
        while not self._closed:
            try:
                start = self._inner.view().read_point
                cache.reset(start)
                self._watch = self._inner.watch(b"", start)
                self._ready.set()
                for change in self._watch:
                    cache.invalidate(change.key, change.position)
                    cache.advance(change.position)
                    if self._closed:
                        return
            except SixfoldError as e:
                if self._closed:
                    return
                log.info("cache: the watch stream failed (%s); emptying the cache and watching again", e)
            except Exception:  # a bug: logged, and the cache starts over (never serves unwatched)
                if self._closed:
                    return
                log.exception("cache: the watch failed unexpectedly")
            self._ready.set()
            time.sleep(REWATCH_PAUSE_S)

    # --- reads --------------------------------------------------------------------------------
    def get(self, key, *, quorum=False, view=None, after=0):
        if quorum or view is not None or after:
            return self._inner.get(key, quorum=quorum, view=view, after=after) if after else \
                self._inner.get(key, quorum=quorum, view=view)
        hit, value = self.cache.lookup(key)
        if hit:
            return value
        tag = self.cache.position  # the read below sees at least every change the watch applied
        value = self._inner.get(key, quorum=False, view=None)
        self.cache.fill(key, value, tag)
        return value

    def get_many(self, gets, *, after=0):
        if after:
            return self._inner.get_many(gets, after=after)
        out: list = [None] * len(gets)
        missing = []
        for i, g in enumerate(gets):
            key, quorum, view = g
            if quorum or view is not None:
                missing.append(i)
                continue
            hit, value = self.cache.lookup(key)
            if hit:
                out[i] = value
            else:
                missing.append(i)
        if missing:
            tag = self.cache.position
            got = self._inner.get_many([gets[i] for i in missing])
            for i, r in zip(missing, got):
                out[i] = r
                key, quorum, view = gets[i]
                if not isinstance(r, BaseException) and not quorum and view is None:
                    self.cache.fill(key, r, tag)
        return out

    # --- writes (through) ---------------------------------------------------------------------
    def write(self, ops, *, request_id=None, resend=False, conditions=()):
        if conditions:
            lsn = self._inner.write(ops, request_id=request_id, resend=resend, conditions=conditions)
        else:
            lsn = self._inner.write(ops, request_id=request_id, resend=resend)
        if len(ops) == 1 and ops[0][0] == FLAG_PUT:
            _f, key, value = ops[0]
            self.cache.fill(key, value, lsn)  # the key's state at its own commit position
        else:
            for _f, key, _v in ops:
                self.cache.invalidate(key, lsn)
        return lsn

    def status(self) -> dict:
        st = self._inner.status()
        st["cache"] = self.cache.stats()
        return st

    def cache_stats(self) -> dict:
        return self.cache.stats()

    def close(self) -> None:
        self._closed = True
        w = self._watch
        self._inner.close()
        if w is not None:
            try:
                w.close()
            except Exception:  # noqa: BLE001 - a generator running in the other thread
                pass
        self._thread.join(timeout=5)
