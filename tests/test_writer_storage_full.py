"""The writer when nodes run out of space (finding 6 of issue 8, writer side).

Nodes raise `StorageFull` on an append they cannot store and say `space_low` in every append
reply while they live on their reserve. The node side is tested with real LMDB maps elsewhere;
here a transport wrapper plays the nodes' part for chosen nodes, so the writer's policy is tested
alone, on an otherwise real embedded volume:

* a full node is not "unreachable": it stays up (it serves reads), its state shows in status, and
  its records are retried until they land;
* a unit with a put is refused before anything is logged, with StorageFull naming the nodes, when
  the nodes with room are not a write quorum; a delete-only unit is still admitted while the nodes
  that are not full are, so a full volume can be emptied;
* a logged write that cannot become durable because nodes are full is WriteIndeterminate naming
  them; nothing acknowledged is lost, and writes resume once space returns.

The writer learns a node's space from its next append reply: every wait for that is on the
condition (`tests/waiting.py`), never a fixed time.
"""

from __future__ import annotations

import dataclasses

import pytest
from waiting import eventually, until_done

import engine
from engine import codec
from engine.embedded import ClusterControl, EmbeddedOptions, EmbeddedVolume
from engine.errors import StorageFull
from engine.transport.base import Transport

#: Writes that must succeed get this long; the one write that cannot become durable (three nodes
#: full) waits it out, so it is not longer than that needs on a loaded machine.
WRITE_TIMEOUT_S = 5.0

OK, LOW, FULL, FULL_ON_NEXT_WRITE = "ok", "low", "full", "full-on-next-write"


class Space(Transport):
    """Plays a node's space for the writer's appends: LOW answers with space_low, FULL refuses
    with StorageFull, FULL_ON_NEXT_WRITE lets heartbeats through until the first frame that
    carries records, then is FULL."""

    mode: dict = {}

    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        self.source = inner.source

    def _call(self, node, method, *args):
        mode = Space.mode.get(node, OK)
        if method != "append" or self.source != "writer" or mode == OK:
            return self.inner._call(node, method, *args)
        if mode == FULL_ON_NEXT_WRITE and codec.index_frame(args[1]):
            Space.mode[node] = mode = FULL
        if mode == FULL:
            raise StorageFull(f"node {node}: no room for this append (its map is full)")
        reply = self.inner._call(node, method, *args)
        return dataclasses.replace(reply, space_low=mode in (LOW, FULL_ON_NEXT_WRITE))

    def close(self) -> None:
        self.inner.close()


@pytest.fixture
def db(tmp_path):
    Space.mode = {}
    vol = EmbeddedVolume(
        str(tmp_path / "d"), EmbeddedOptions(durable=False, write_timeout_s=WRITE_TIMEOUT_S, gossip_interval_s=0.05),
        transport_wrapper=Space,
    )
    d = engine.Database(vol, ClusterControl(vol))
    yield d
    Space.mode = {}
    d.close()


def writer(db):
    return db.status()["writer"]


def admission_is(db, state) -> bool:
    return writer(db)["admission"] == state


def refused(db, write) -> bool:
    """True once `write` is refused with StorageFull (it is retried until then: the writer learns
    a node's space from its next reply, a heartbeat at the latest; a write admitted before that
    is logged, and may be indeterminate)."""
    try:
        write()
    except StorageFull:
        return True
    except engine.WriteIndeterminate as e:
        assert "nodes out of space" in str(e)
    return False


def put_eventually(db, key, value):
    until_done(lambda: db.put(key, value), f"a put of {key!r} to be admitted again", retry_on=(StorageFull, engine.Unavailable))


def test_puts_are_refused_naming_the_nodes_and_deletes_still_work(db):
    for i in range(10):
        db.put(b"k%d" % i, b"v%d" % i)
    Space.mode.update(n1=LOW, n3=LOW, n5=FULL)
    eventually(lambda: refused(db, lambda: db.put(b"probe", b"x")), "a put to be refused with StorageFull")
    assert admission_is(db, "deletes-only")
    st = writer(db)
    assert st["links"]["n5"]["up"] and st["links"]["n5"]["full"]  # full, but reachable
    assert st["links"]["n1"]["space_low"] and st["links"]["n3"]["space_low"] and not st["links"]["n1"]["full"]
    next_lsn = st["next_lsn"]
    with pytest.raises(StorageFull) as got:
        db.put(b"new", b"x")
    message = str(got.value)
    assert "full: n5" in message and "low on space: n1, n3" in message and "Nothing was logged" in message
    with pytest.raises(StorageFull):
        with db.batch() as b:  # a unit with any put is refused whole
            b.delete(b"k0")
            b.put(b"new", b"x")
    assert writer(db)["next_lsn"] == next_lsn, "nothing was logged"
    for i in range(5):
        db.delete(b"k%d" % i)  # n1..n4, n6 take deletes (low ones from their reserve)
    with db.batch() as b:
        b.delete(b"k5")
        b.delete(b"k6")
    assert [db.get(b"k%d" % i) for i in range(10)] == [None] * 7 + [b"v7", b"v8", b"v9"]
    assert db.get(b"new") is None and db.get(b"k9", quorum=True) == b"v9"
    # Space returns: puts are admitted again, and n5 gets the deletes it refused meanwhile.
    Space.mode.clear()
    eventually(lambda: admission_is(db, "all"), "admission to be back to all")
    db.put(b"new", b"after")
    assert db.get(b"new") == b"after"
    vdl = writer(db)["vdl"]
    eventually(lambda: writer(db)["links"]["n5"]["sent_lsn"] >= vdl and not writer(db)["links"]["n5"]["full"],
               f"n5 to take everything up to VDL {vdl}")


def test_with_a_write_quorum_full_even_deletes_are_refused_until_space_returns(db):
    db.put(b"k", b"v")
    Space.mode.update(n1=FULL, n3=FULL, n5=FULL)
    eventually(lambda: refused(db, lambda: db.delete(b"probe")), "a delete to be refused with StorageFull")
    assert admission_is(db, "full")
    with pytest.raises(StorageFull, match="full: n1, n3, n5"):
        db.delete(b"k")
    assert db.get(b"k") == b"v"  # full nodes still serve reads
    Space.mode.clear()
    eventually(lambda: admission_is(db, "all"), "admission to be back to all")
    db.delete(b"k")
    assert db.get(b"k") is None


def test_a_logged_write_that_full_nodes_stop_is_indeterminate_and_lands_once_space_returns(db):
    db.put(b"k", b"before")
    # n1, n2, n3 fill up with this very write: it is logged, three nodes hold it, three refuse it.
    Space.mode.update(n1=FULL_ON_NEXT_WRITE, n2=FULL_ON_NEXT_WRITE, n3=FULL_ON_NEXT_WRITE)
    with pytest.raises(engine.WriteIndeterminate) as got:
        db.put(b"k", b"during")
    assert "full: n1, n2, n3" in str(got.value)
    assert all(writer(db)["links"][n]["up"] for n in ("n1", "n2", "n3"))
    with pytest.raises(StorageFull):
        db.put(b"other", b"x")  # refused before anything is logged
    Space.mode.clear()  # space returns: the senders' retries land the logged write
    eventually(lambda: db.get(b"k") == b"during", "the logged write to land once space returned")
    put_eventually(db, b"other", b"after")
    assert db.get(b"other") == b"after" and db.get(b"k", quorum=True) == b"during"
