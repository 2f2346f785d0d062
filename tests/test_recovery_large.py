"""Recovery re-replicates a protection group larger than one fetch (finding 3 of issue 8).

A new writer copies every record in (base, VDL] to every node before it serves, where base is
the highest VDL any node was told. A node answers a fetch with at most 8 MiB and says whether
there is more; recovery that reads one frame and stops finds records missing and refuses to
open, on every attempt, for ever. Here the writer's VDL hint is held back so that about 10 MiB
of one PG lie above base when the writer crashes.
"""

from __future__ import annotations

import engine
from engine.embedded import ClusterControl, EmbeddedOptions, EmbeddedVolume
from engine.transport.base import Transport

VALUE_BYTES = 256 << 10
VALUES = 40  # 10 MiB in one PG: more than one fetch (8 MiB)


class HintHeldBack(Transport):
    """Passes every call through, but the writer's appends tell nodes a VDL of at most `cap`."""

    cap: int | None = None

    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        self.source = inner.source

    def _call(self, node, method, *args):
        cap = HintHeldBack.cap
        if method == "append" and self.source == "writer" and cap is not None:
            epoch, frame, hint, *points = args  # (the collection points: the node bounds them by the hint)
            args = (epoch, frame, min(hint, cap), *points)
        return self.inner._call(node, method, *args)

    def close(self) -> None:
        self.inner.close()


def value(i: int) -> bytes:
    return bytes([i % 251]) * VALUE_BYTES


def test_recovery_re_replicates_a_protection_group_of_more_than_one_fetch(tmp_path):
    HintHeldBack.cap = None
    vol = EmbeddedVolume(
        str(tmp_path / "d"),
        EmbeddedOptions(protection_groups=1, durable=False, write_timeout_s=10.0, gossip_interval_s=0.05),
        transport_wrapper=HintHeldBack,
    )
    db = engine.Database(vol, ClusterControl(vol))
    try:
        db.put(b"first", b"1")
        HintHeldBack.cap = db.status()["vdl"]
        for i in range(VALUES):
            db.put(b"v%03d" % i, value(i))  # acknowledged; no node learns a VDL past `first`
        vdl = db.status()["vdl"]
        db.cluster.crash_writer()  # a new writer must re-replicate all of it
        rec = db.status()["writer"]["recovery"]
        assert rec["base"] <= HintHeldBack.cap and rec["vdl"] == vdl
        assert rec["replicated_records"] == 2 * VALUES  # each put, and the request record logged with it
        HintHeldBack.cap = None
        for i in range(VALUES):
            assert db.get(b"v%03d" % i) == value(i)
            assert db.get(b"v%03d" % i, quorum=True) == value(i)
        assert db.get(b"first") == b"1"
        db.put(b"after", b"ok")
        db.cluster.crash_writer()  # and once more, now that the nodes know the VDL
        assert db.get(b"after") == b"ok" and db.get(b"v%03d" % (VALUES - 1)) == value(VALUES - 1)
    finally:
        HintHeldBack.cap = None
        db.close()
