"""A flush is encoded and indexed once for the six nodes of an embedded volume, not once per
node (`Writer._indexed_frame_of`, `Transport.append_indexed`), and only where the transport hands
the index to the node as it is: behind the fault injector, which may change what it carries, each
node indexes the bytes it got. Real LMDB nodes, real sender threads."""

from __future__ import annotations

import pytest

import engine
from engine import codec
from engine.core.constants import FLAG_CPL, FLAG_PUT, FRAME_HEADER_BYTES
from engine.embedded import EmbeddedOptions, EmbeddedVolume
from engine.head.writer import _Send
from engine.transport.faults import FaultyTransport, NetworkFaults


@pytest.fixture
def counted(monkeypatch):
    """Counts `codec.index_frame` calls on frames that hold records (heartbeats hold none)."""
    calls = []
    real = codec.index_frame

    def index_frame(frame):
        if len(frame) > FRAME_HEADER_BYTES:
            calls.append(len(frame))
        return real(frame)

    monkeypatch.setattr(codec, "index_frame", index_frame)
    return calls


def test_single_puts_are_indexed_about_once_each_not_once_per_node(tmp_path, counted):
    puts = 60
    with engine.open(str(tmp_path / "d"), durable=False) as db:
        db.put(b"warm", b"up")
        del counted[:]
        for i in range(puts):
            db.put(b"k%03d" % i, b"v%d" % i)
        indexed = len(counted)
        assert all(db.get(b"k%03d" % i) == b"v%d" % i for i in range(puts))
    # Six per put before: each node indexed its own copy. Senders that take different records
    # (one woke later and found another put too) build their own frame, so not exactly one.
    assert indexed < 2 * puts, f"{indexed} index passes for {puts} puts"


def test_senders_of_the_same_records_share_one_frame_and_one_index(tmp_path, counted):
    with engine.open(str(tmp_path / "d"), durable=False) as db:
        w = db._backend.writer
        start = w.ledger.next_lsn + 1000  # LSNs no sender will be sending: the cache is ours
        records = [codec.encode_record(start + i, 0, 0, FLAG_PUT | FLAG_CPL, b"x%d" % i, b"v") for i in range(3)]
        job = _Send(start, records, 0, w.epoch, 0, 0)
        del counted[:]
        links = sorted(w.links.values(), key=lambda link: link.id)
        got = [w._indexed_frame_of(link, job, True) for link in links]
        assert len(counted) == 1
        frame, items = got[0][1], got[0][2]
        assert all(g[1] is frame and g[2] is items for g in got)
        assert items == codec.index_frame(frame) and codec.decode_frame(frame) == [codec.decode_record(r) for r in records]
        # A full node is probed with one record: a frame of its own, never the shared one.
        links[0].full = True
        try:
            one = w._indexed_frame_of(links[0], job, True)
        finally:
            links[0].full = False
        assert one[0] == records[:1] and one[1] != frame and one[2] == codec.index_frame(one[1])


def test_behind_the_fault_injector_every_node_indexes_what_it_got(tmp_path, counted):
    faults = NetworkFaults(seed=1)
    vol = EmbeddedVolume(str(tmp_path / "d"), EmbeddedOptions(durable=False),
                         transport_wrapper=lambda t: FaultyTransport(t, faults))
    db = engine.Database(vol)
    try:
        assert vol.writer._hand_indexed is False
        db.put(b"warm", b"up")
        del counted[:]
        db.put(b"k", b"v")
        assert db.get(b"k") == b"v"
        # The writer indexed nothing; the nodes that took the put each indexed their frame.
        assert len(counted) >= 4
    finally:
        db.close()
