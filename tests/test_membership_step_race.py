"""A membership step races a new writer for the same epoch: only one of them may hold it.

The step used to raise the nodes with sync_epoch, which accepts an equal epoch: a writer that
had just opened (sealed a quorum) at E+1 then shared E+1 with the old writer, whose appends the
nodes took as the new writer's. The step now seals E+1 strictly and holds only with a write
quorum of seals; else the old writer stops."""

from __future__ import annotations

import pytest

from engine.core.constants import FLAG_PUT
from engine.embedded import EmbeddedOptions, EmbeddedVolume
from engine.errors import SixfoldError, StaleEpoch, Unavailable
from engine.head.writer import Writer, WriterOptions
from engine.transport.inprocess import InProcessTransport


def test_a_step_to_an_epoch_another_writer_holds_stops_this_writer(tmp_path):
    v = EmbeddedVolume(str(tmp_path / "v"), EmbeddedOptions(background=False, durable=False, protection_groups=2))
    try:
        old = v.writer
        epoch = old.epoch
        new = Writer(InProcessTransport(v.registry, "writer-2"), v.node_infos, v.geometry, WriterOptions(), background=False)
        new.open()  # seals every node at epoch + 1
        assert new.epoch == epoch + 1
        lsn, ticket = new.submit(((FLAG_PUT, b"k", b"new writer"),))
        for link in list(new.links.values()):
            new.send_once(link)
        new.wait(lsn, ticket, timeout_s=0)

        with pytest.raises(Unavailable, match="sealed only"):
            old.begin_replace("n1", "n7")  # its step would be epoch + 1 too
        assert old.fenced and old.epoch == epoch
        with pytest.raises((Unavailable, StaleEpoch)):
            old.submit(((FLAG_PUT, b"k", b"old writer"),))
        for link in list(old.links.values()):
            try:
                old.send_once(link)
            except SixfoldError:
                pass
        assert new.get(b"k", quorum=True) == b"new writer"
        assert all(v.nodes[n].store.epoch == epoch + 1 for n in ("n1", "n2", "n3", "n4", "n5", "n6"))
        assert all(v.nodes[n].store.membership.next_members is None for n in ("n1", "n2", "n3", "n4", "n5", "n6")), \
            "the stopped writer's membership step reached the nodes"
    finally:
        v.close()
