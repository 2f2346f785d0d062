"""Replica lag is counted from when a commit became durable on the writer, not from when the
writer happened to send the update that carried it.

The writer keeps the times of its recent VDL advances (`Writer.durable_since`); the read-point
stream stamps each update with the time the VDL first moved past the previous update
(`ReadPointUpdate.committed_at`); a reader counts arrival minus that (`ReplicaSource.lags_ms`).
Before, `lag_ms` was "now minus the send time of the update served": it left out the coalescing
wait and mixed idle staleness into the figure. In process, with the real writer and log.
"""

from __future__ import annotations

import time
from dataclasses import replace

from engine.core.constants import FLAG_PUT
from engine.embedded import EmbeddedOptions, EmbeddedVolume
from engine.head.replica import ReaderOptions, ReplicaSource


def commit(w, key: bytes) -> int:
    lsn, ticket = w.submit(((FLAG_PUT, key, b"v"),))
    for n in ("n1", "n2", "n3", "n4"):
        w.send_once(w.links[n])
    w.wait(lsn, ticket, timeout_s=0)
    return lsn


def test_the_writer_knows_when_each_commit_became_durable(tmp_path):
    v = EmbeddedVolume(str(tmp_path / "v"), EmbeddedOptions(background=False, durable=False, protection_groups=2))
    try:
        w = v.writer
        before = w.ledger.vdl
        assert w.durable_since(before) == 0.0, "nothing above the VDL is durable yet"
        t0 = time.time()
        first = commit(w, b"a")
        t1 = time.time()
        time.sleep(0.05)
        commit(w, b"b")
        t2 = time.time()
        at_first = w.durable_since(before)
        assert t0 <= at_first <= t1, "the first advance past `before` is the first commit's"
        at_second = w.durable_since(first)
        assert t1 < at_second <= t2 and at_second - at_first >= 0.05
        assert w.durable_since(w.ledger.vdl) == 0.0
    finally:
        v.close()


def test_a_reader_counts_lag_from_the_commit_and_only_for_updates_that_bring_commits(tmp_path):
    v = EmbeddedVolume(str(tmp_path / "v"), EmbeddedOptions(background=False, durable=False, protection_groups=2))
    try:
        w = v.writer
        src = ReplicaSource(None, v.node_infos, 2, ReaderOptions())
        assert src.adopt(w.read_point(time.time()))
        assert list(src.lags_ms) == [], "the first update has nothing to compare with"
        assert src.adopt(w.read_point(time.time()))  # a heartbeat: no new commit, no lag sample
        assert list(src.lags_ms) == []
        commit(w, b"k")
        now = time.time()
        # Sent just now, but its commit became durable 300 ms ago (a coalescing or scheduling wait):
        assert src.adopt(replace(w.read_point(now), committed_at=now - 0.3))
        assert len(src.lags_ms) == 1 and 300.0 <= src.lags_ms[-1] < 10_000.0
        # An update from an earlier release (no committed_at) counts from its send time.
        commit(w, b"k2")
        assert src.adopt(replace(w.read_point(time.time() - 0.1), committed_at=0.0))
        assert len(src.lags_ms) == 2 and src.lags_ms[-1] >= 100.0
    finally:
        v.close()
