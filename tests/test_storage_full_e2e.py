"""Storage full, end to end, with real parts only (finding 6 of issue 8, its acceptance).

No transport wrapper plays the nodes here: the nodes are real LMDB environments with a small map,
or real `sixfold node serve --cluster` processes with a small map or a small file size limit
(RLIMIT_FSIZE, a size-limited file), behind the real writer endpoint and `engine.connect`.

What is shown:

* filling the volume ends in `StorageFull` (the class itself: not Unavailable, not
  WriteIndeterminate), refused before anything was logged, and its message names the nodes that
  are full or low on space;
* every acknowledged write reads back, before and after deletes, and after the volume (or every
  process of the cluster) is closed and opened again;
* deletes still work on a full volume (each node keeps a reserve for them), also after a unit
  bigger than the room left was refused;
* a full node is neither dead nor "unreachable": its process lives and is SERVING, the writer's
  link to it is up, and status shows each node's used and capacity bytes and `space_low`.

What does *not* hold, by design of this release: deleting does not give the room back (LMDB never
shrinks its file and a delete is a tombstone; old versions stay until version GC, a later
issue), so puts stay refused after deletes until a node gets more capacity (a larger map, here).
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time

import pytest

import engine
from engine.cluster import Cluster
from engine.cluster.manifest import WRITER, active_nodes, load_manifest, locked, new_manifest, node_entry, save_manifest
from engine.cluster.testing import engine_env, free_base_port, wait_serving
from engine.errors import StorageFull

NODES = ("n1", "n2", "n3", "n4", "n5", "n6")
P = 2
MAP_BYTES = 4 << 20
#: More puts than fit in MAP_BYTES: the fill loops are bounded by this, never by time.
PUTS_MAX = 1500
VALUE_BYTES = 8000
SMALL_VALUE_BYTES = 16
BIG_VALUE_BYTES = 1 << 20
WAIT_S = 60.0


def value_of(i: int, size: int = VALUE_BYTES) -> bytes:
    """A value that differs per key, so a mixed-up read shows."""
    stem = b"%06d;" % i
    return (stem * (size // len(stem) + 1))[:size]


def fill(db, acked: dict, prefix: bytes, value_bytes: int = VALUE_BYTES, puts_max: int = PUTS_MAX) -> StorageFull:
    """Put distinct keys until a put is refused; every acknowledged put goes into `acked`.
    Returns the refusal (the test fails on any other error, or if nothing is refused)."""
    for i in range(puts_max):
        key = prefix + b"%06d" % i
        try:
            db.put(key, value_of(i, value_bytes))
        except StorageFull as e:
            assert db.get(key) is None, "a refused put must not be there"
            return e
        acked[key] = value_of(i, value_bytes)
    raise AssertionError(f"{puts_max} puts of {value_bytes} bytes fitted in nodes of {MAP_BYTES} bytes")


def fill_up(db, acked: dict) -> StorageFull:
    """Fill with puts of VALUE_BYTES until one is refused, then with small ones until one is: a
    put is refused once it does not fit, so smaller ones may still fit for a while. Returns the
    last refusal."""
    refused = fill(db, acked, b"k")
    assert type(refused) is StorageFull and names_nodes(str(refused)) and "Nothing was logged" in str(refused), str(refused)
    assert len(acked) * VALUE_BYTES > MAP_BYTES // 3, f"only {len(acked)} puts of {VALUE_BYTES} bytes fitted"
    return fill(db, acked, b"s", SMALL_VALUE_BYTES)


def names_nodes(message: str, nodes=NODES) -> bool:
    return all(f" {n}" in message or f"{n}," in message or f"{n})" in message for n in nodes)


def wait_for(predicate, what: str, timeout_s: float = WAIT_S):
    deadline = time.monotonic() + timeout_s
    while True:
        got = predicate()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:g} s: {what}")
        time.sleep(0.05)


def check_reads(db, acked: dict, deleted: set = frozenset()) -> None:
    """Every acknowledged write reads back (a deleted key is gone), one segment and by quorum."""
    for key, value in acked.items():
        want = None if key in deleted else value
        assert db.get(key) == want, f"acknowledged write {key!r} lost or wrong"
    for key in list(acked)[:: max(1, len(acked) // 20)]:
        assert db.get(key, quorum=True) == (None if key in deleted else acked[key])
    assert dict(db.scan()) == {k: v for k, v in acked.items() if k not in deleted}


def space_of(st: dict) -> dict:
    return {n["id"]: (n["used_bytes"], n["capacity_bytes"], n["space_low"]) for n in st["nodes"]}


def delete_half(db, acked: dict) -> set:
    deleted = set(list(acked)[::2])
    for key in sorted(deleted):
        db.delete(key)  # must not raise: deletes draw on the nodes' reserve
    return deleted


# --- embedded ---------------------------------------------------------------------------------
def open_embedded(path, map_bytes: int = MAP_BYTES, **options):
    return engine.open(path, map_bytes=map_bytes, durable=False, protection_groups=P, gossip_interval_s=0.05, **options)


def test_an_embedded_volume_fills_refuses_puts_naming_the_nodes_keeps_deletes_and_every_ack(tmp_path):
    path = tmp_path / "v"
    acked: dict[bytes, bytes] = {}
    with open_embedded(path) as db:
        refused = fill_up(db, acked)
        assert type(refused) is StorageFull
        message = str(refused)
        assert names_nodes(message) and "Nothing was logged" in message and "deletes still work" in message, message
        st = db.status()
        for node_id, (used, capacity, low) in space_of(st).items():
            assert capacity == MAP_BYTES and 0 < used <= capacity and low, (node_id, used, capacity, low)
        w = st["writer"]
        assert w["admission"] == "deletes-only"
        assert all(link["up"] and link["space_low"] for link in w["links"].values()), w["links"]
        next_lsn = w["next_lsn"]
        with pytest.raises(StorageFull):
            db.put(b"refused", b"x")
        assert db.status()["writer"]["next_lsn"] == next_lsn, "a refused put logged something"
        check_reads(db, acked)

        deleted = delete_half(db, acked)
        with db.batch() as b:  # a delete-only batch is admitted too
            b.delete(b"k999998").delete(b"k999999")
        check_reads(db, acked, deleted)
        # What holds in this release: the deletes did not give the room back.
        with pytest.raises(StorageFull):
            db.put(b"after-deletes", b"x")
        assert all(low for _u, _c, low in space_of(db.status()).values())

    with open_embedded(path) as db:  # reopened as it was: still full, nothing lost
        check_reads(db, acked, deleted)
        with pytest.raises(StorageFull):
            db.put(b"after-reopen", b"x")
        db.delete(sorted(set(acked) - deleted)[0])
        deleted.add(sorted(set(acked) - deleted)[0])
        check_reads(db, acked, deleted)

    with open_embedded(path, map_bytes=4 * MAP_BYTES) as db:  # more capacity: puts are admitted again
        assert not any(low for _u, _c, low in space_of(db.status()).values())
        wait_for(lambda: db.status()["writer"]["admission"] == "all", "admission back to all")
        db.put(b"after-growing", b"room again")
        assert db.get(b"after-growing") == b"room again"
        check_reads(db, {**acked, b"after-growing": b"room again"}, deleted)


def test_a_writer_opened_on_a_full_volume_knows_it_before_its_first_append(tmp_path):
    """The writer learns each node's space from its state when it opens, not only from the
    replies to later appends: a put on a full volume is refused at once after an open, so an
    application that opens, puts and closes again cannot eat the reserve kept for deletes."""
    path = tmp_path / "v"
    acked: dict[bytes, bytes] = {}
    with open_embedded(path) as db:
        fill_up(db, acked)
    # No background threads: nothing is sent to any node before the put below asks.
    with open_embedded(path, background=False, write_timeout_s=1.0) as db:
        w = db.status()["writer"]
        assert w["admission"] == "deletes-only", w["admission"]
        assert all(link["space_low"] for link in w["links"].values())
        next_lsn = w["next_lsn"]
        with pytest.raises(StorageFull):
            db.put(b"after-reopen", b"x")
        assert db.status()["writer"]["next_lsn"] == next_lsn


def test_node_serve_takes_its_map_and_reserve_in_bytes_and_refuses_other_values(tmp_path):
    """`sixfold node serve --map-bytes N --reserve-bytes N`: what the cluster tests above start
    nodes with. A value that is not a whole number of bytes, or too small, is a usage error
    (exit 2) naming the option; nothing is started or created."""
    for bad, words in ((["--map-bytes", "4MiB"], "--map-bytes"), (["--map-bytes", "4096"], "below the least"),
                       (["--reserve-bytes", "-1"], "--reserve-bytes")):
        done = subprocess.run(
            [sys.executable, "-m", "engine", "node", "serve", "--cluster", str(tmp_path / "none"), "--id", "n1", *bad],
            capture_output=True, text=True, env=engine_env(), timeout=60,
        )
        assert done.returncode == 2 and words in done.stderr, (bad, done.returncode, done.stderr)
    assert not (tmp_path / "none").exists()
