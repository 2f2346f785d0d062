"""A node refuses a truncation range that starts at or below its VDL hint (a real recovery's
range always starts above every VDL a writer announced), whoever sends it: a writer's SyncEpoch
or a peer's gossip. The one-message attack of the security issue (a SyncEpoch with a range,
spread by gossip, erased every acknowledged key) is replayed here on real LMDB nodes."""

from __future__ import annotations

import pytest

from engine import codec
from engine.core.constants import FLAG_CPL, FLAG_PUT
from engine.core.types import Geometry, NodeInfo, TruncationRange
from engine.errors import InvalidArgument
from engine.node.service import StorageNode
from engine.transport.inprocess import InProcessTransport, Registry

P = 2


def node(tmp_path, node_id="n1"):
    return StorageNode(str(tmp_path / node_id), NodeInfo(node_id, "a"), Geometry(P), "vol", durable=False)


def write(n: StorageNode, epoch: int, lsns, hint: int) -> None:
    recs, prev = [], 0
    for lsn in lsns:
        recs.append(codec.encode_record(lsn, prev, 0, FLAG_PUT | FLAG_CPL, b"k%d" % lsn, b"v%d" % lsn))
        prev = lsn
    n.append(epoch, codec.encode_frame(recs), hint)


def test_a_range_at_or_below_the_hint_is_refused_and_changes_nothing(tmp_path):
    n = node(tmp_path)
    try:
        n.seal(1)
        n.sync_epoch(1, (), None)
        write(n, 1, range(1, 11), hint=10)  # the writer announced VDL 10
        before = n.state()
        for first in (1, 5, 10):
            with pytest.raises(InvalidArgument, match="refuses truncation range"):
                n.sync_epoch(2, (TruncationRange(2, first, 100),), None)
        after = n.state()
        assert (after.epoch, after.scls, after.truncations) == (before.epoch, before.scls, before.truncations)
        assert n.read(0, b"k7", 10, 0, 1).value == b"v7"
        assert n.state().extra["refused_truncations"] == 3
        # a real recovery's range starts above the hint: taken
        n.sync_epoch(2, (TruncationRange(2, 11, 100),), None)
        assert TruncationRange(2, 11, 100) in n.state().truncations
    finally:
        n.close()


def test_a_poisoned_range_does_not_spread_by_gossip(tmp_path):
    """n2 was sent a range that would erase everything (as the attacker's SyncEpoch did); n1,
    which knows the durable VDL, gossips with it and refuses the range."""
    reg = Registry()
    n1, n2 = node(tmp_path, "n1"), node(tmp_path, "n2")
    try:
        for n in (n1, n2):
            reg.set(n.id, n)
            n.seal(1)
            n.sync_epoch(1, (), None)
        write(n1, 1, range(1, 11), hint=10)
        n2.sync_epoch(1, (TruncationRange(1, 1, 1 << 40),), None)  # n2 knew no hint: it took the poison
        n1.attach(InProcessTransport(reg, "n1"), lambda: ["n1", "n2"])
        n1.gossip_once()
        assert n1.state().truncations == () or all(t.first > 10 for t in n1.state().truncations)
        assert n1.read(0, b"k3", 10, 0, 1).value == b"v3"
        assert n1.state().extra["refused_truncations"] >= 1
    finally:
        n1.close()
        n2.close()
