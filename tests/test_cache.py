"""The client cache (issue 14, item 5): bounded by bytes with LRU eviction, optional TTL,
write-through for the client's own writes, invalidated by the watch stream, each fill tagged with
the read point it was read at so an invalidation that overtakes a fill is not lost."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st
from waiting import eventually

import engine
from engine.cache import ENTRY_OVERHEAD_BYTES, Cache, CacheOptions, cache_options
from engine.cluster import Cluster
from engine.cluster.testing import free_base_port
from engine.core.constants import FLAG_PUT
from engine.errors import InvalidArgument


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def entry(key: bytes, value: bytes) -> int:
    return len(key) + len(value) + ENTRY_OVERHEAD_BYTES


def test_eviction_is_least_recently_used_first_within_the_byte_bound():
    c = Cache(CacheOptions(bytes_max=3 * entry(b"a", b"1")))
    for k in (b"a", b"b", b"c"):
        assert c.fill(k, b"1", 0)
    assert c.lookup(b"a") == (True, b"1")  # a is now the most recently used
    c.fill(b"d", b"1", 0)
    assert c.lookup(b"b") == (False, None), "b was the least recently used"
    assert [c.lookup(k)[0] for k in (b"a", b"c", b"d")] == [True, True, True]
    assert c.stats()["evictions"] == 1 and c.stats()["bytes"] <= 3 * entry(b"a", b"1")
    assert not c.fill(b"huge", bytes(10_000), 0), "an entry larger than the whole cache is not stored"


def test_entries_expire_after_the_ttl():
    clock = Clock()
    c = Cache(CacheOptions(ttl_s=5), clock=clock)
    c.fill(b"k", b"v", 0)
    clock.t += 4.9
    assert c.lookup(b"k") == (True, b"v")
    clock.t += 0.2
    assert c.lookup(b"k") == (False, None) and c.stats()["expired"] == 1
    c.fill(b"j", b"v", 0, ttl_s=100)  # cache-aside stores with its own ttl
    clock.t += 50
    assert c.lookup(b"j") == (True, b"v")


def test_an_invalidation_that_overtakes_a_fill_is_not_lost():
    c = Cache(CacheOptions())
    c.invalidate(b"k", 10)  # the change at 10 arrived while a read that began at 5 was in flight
    assert not c.fill(b"k", b"old", 5) and c.lookup(b"k") == (False, None)
    assert c.stats()["dropped_fills"] == 1
    assert c.fill(b"k", b"new", 10) and c.lookup(b"k") == (True, b"new")
    c.invalidate(b"k", 10)  # its own change, seen again by the watch: the entry already reflects it
    assert c.lookup(b"k") == (True, b"new")
    c.invalidate(b"k", 11)
    assert c.lookup(b"k") == (False, None)


def test_a_reset_drops_everything_and_fills_from_before_it():
    c = Cache(CacheOptions())
    c.fill(b"k", b"v", 3)
    c.reset(20)
    assert c.lookup(b"k") == (False, None) and not c.fill(b"k", b"v", 19) and c.fill(b"k", b"v", 20)


@given(st.lists(st.tuples(st.sampled_from(["fill", "inv", "get"]), st.integers(0, 20)), max_size=60))
def test_the_cache_never_serves_a_value_older_than_an_invalidation_it_applied(ops):
    """Model: the value written at position p is b"%d" % p; a fill at tag t stores the value of
    some position <= t. Whatever the order, a hit is never older than the newest invalidation."""
    c = Cache(CacheOptions())
    newest_inv = -1
    for op, p in ops:
        if op == "fill":
            c.fill(b"k", b"%d" % p, p)
        elif op == "inv":
            c.invalidate(b"k", p)
            newest_inv = max(newest_inv, p)
        else:
            hit, value = c.lookup(b"k")
            if hit:
                assert int(value) >= newest_inv


def test_cache_options_are_checked():
    assert cache_options(None) is None and cache_options(True) == CacheOptions() and cache_options(1000).bytes_max == 1000
    for bad in (0, -1, 2**41, "x", {"bytes_max": 10, "bogus": 1}, {"ttl_s": 0}, {"ttl_s": True}):
        with pytest.raises(InvalidArgument):
            cache_options(bad)


@pytest.fixture
def cached(tmp_path):
    d = engine.open(tmp_path / "v", durable=False, protection_groups=2, cache={"bytes_max": 1 << 20})
    try:
        yield d
    finally:
        d.close()


def another_client_writes(db, key: bytes, value: bytes) -> int:
    """A write that does not pass through this database's cache (as another process's would)."""
    return db._backend._inner.write(((FLAG_PUT, key, value),), request_id=b"other-" + key + value[:8])


def test_own_writes_go_through_and_are_hits(cached):
    cached.put(b"k", b"v")
    assert cached.get(b"k") == b"v"
    s = cached.cache_stats()
    assert (s["hits"], s["misses"]) == (1, 0), "the client's own put filled the cache"
    cached.delete(b"k")
    assert cached.get(b"k") is None
    assert cached.status()["cache"]["entries"] >= 0


def test_another_clients_write_invalidates_the_entry(cached):
    cached.put(b"k", b"mine")
    assert cached.get(b"k") == b"mine"
    another_client_writes(cached, b"k", b"theirs")
    eventually(lambda: cached.get(b"k") == b"theirs", what="the watch stream invalidated the entry")
    assert cached.cache_stats()["invalidations"] >= 1


def test_concurrent_fills_and_foreign_writes_end_fresh(cached):
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            cached.get(b"hot")

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for i in range(50):
        another_client_writes(cached, b"hot", b"%d" % i)
    stop.set()
    for t in threads:
        t.join()
    eventually(lambda: cached.get(b"hot") == b"49", what="the last foreign write is what the cache serves")


def test_get_or_load_is_cache_aside_with_a_ttl(cached):
    calls = []

    def load(key):
        calls.append(key)
        return b"loaded:" + key

    assert cached.get_or_load(b"u:1", load, ttl_s=60) == b"loaded:u:1"
    assert cached.get_or_load(b"u:1", load, ttl_s=60) == b"loaded:u:1"
    assert calls == [b"u:1"] and 30 < cached.version(b"u:1").ttl_s <= 60


def test_a_database_without_a_cache_says_so(tmp_path):
    with engine.open(tmp_path / "p", durable=False, protection_groups=2) as db:
        with pytest.raises(InvalidArgument, match="no cache"):
            db.cache_stats()


@pytest.mark.cluster
def test_a_remote_cache_is_invalidated_by_another_clients_write(tmp_path):
    c = Cluster(tmp_path / "c")
    try:
        c.up(base_port=free_base_port(), protection_groups=2, timeout_s=60)
        with engine.connect(c.folder, cache={"bytes_max": 1 << 20}) as mine, engine.connect(c.folder) as theirs:
            mine.put(b"k", b"1")
            assert mine.get(b"k") == b"1" and mine.cache_stats()["hits"] == 1
            theirs.put(b"k", b"2")
            eventually(lambda: mine.get(b"k") == b"2", what="another client's write reached the cache by the watch")
            assert mine.cache_stats()["invalidations"] >= 1
    finally:
        c.down(timeout_s=10)
