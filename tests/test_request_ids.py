"""Request ids: every write unit carries one, the writer logs it with the unit, `status_of` says
whether it committed (also after a writer crash, from the log), and a re-send under the same id
is applied at most once: from the writer's memory while it lives, from the log after it."""

from __future__ import annotations

import pytest
from waiting import eventually

import engine
from engine.cluster import Cluster
from engine.cluster.testing import free_base_port
from engine.core.constants import FLAG_PUT, FLAG_REQUEST
from engine.embedded import EmbeddedOptions, EmbeddedVolume
from engine.errors import InvalidArgument, Unavailable, WriteIndeterminate


def request_records(volume) -> int:
    """Request records on the node that holds the most (every node holds a segment of every PG;
    one node may lag behind the write quorum that acknowledged, so n1 alone could count fewer)."""
    counts = []
    for node in volume.nodes.values():
        if node is not None:
            with node.store.env.begin() as txn:
                counts.append(txn.stat(node.store._requests)["entries"])
    return max(counts)


def test_a_write_is_committed_under_its_id_and_a_resend_is_applied_at_most_once(db):
    db.put(b"k", b"first", request_id=b"r-1")
    st = db.status_of(b"r-1")
    assert (st.state, st.request_id) == ("committed", b"r-1") and st.lsn > 0
    db.put(b"k", b"second")
    db.put(b"k", b"first", request_id=b"r-1")  # a client retrying after losing the reply
    assert db.get(b"k") == b"second", "the re-send was applied a second time"
    assert db.status_of(b"r-1").lsn == st.lsn
    assert db._backend.writer.stats["requests_deduplicated"] == 1


def test_the_log_remembers_ids_across_a_writer_crash(db):
    with db.batch(request_id=b"batch-7") as b:
        b.put(b"a", b"1").put(b"b", b"1")
    lsn = db.status_of(b"batch-7").lsn
    db.put(b"a", b"2")
    records = request_records(db._backend)
    db.cluster.crash_writer()  # a new writer, at a new epoch, with an empty memory of requests
    assert db.status_of(b"batch-7").state == "committed" and db.status_of(b"batch-7").lsn == lsn
    with db.batch(request_id=b"batch-7") as b:
        b.put(b"a", b"1").put(b"b", b"1")
    assert b.lsn == lsn
    assert db.get(b"a") == b"2", "a re-send after a crash was applied again"
    assert request_records(db._backend) == records, "the re-send logged a second request record"


def test_an_id_reused_for_another_write_is_refused(db):
    db.put(b"k", b"v", request_id=b"same")
    with pytest.raises(InvalidArgument, match="already used"):
        db.put(b"k", b"other", request_id=b"same")
    db.cluster.crash_writer()
    with pytest.raises(InvalidArgument, match="already used"):
        db.put(b"k", b"other", request_id=b"same")
    assert db.get(b"k") == b"v"


def test_an_unknown_id_is_not_committed_and_ids_are_bounded(db):
    assert db.status_of(b"never-sent").state == "not_committed"
    for bad in (b"", b"x" * 65, "text"):
        with pytest.raises(InvalidArgument):
            db.status_of(bad)
        with pytest.raises(InvalidArgument):
            db.put(b"k", b"v", request_id=bad)
    assert db.get(b"k") is None


def test_request_records_are_invisible_to_reads_and_scans(db):
    db.put(b"user-key", b"v", request_id=b"user-key")
    assert db.get(b"user-key") == b"v"
    db.delete(b"user-key", request_id=b"another")
    assert db.get(b"user-key") is None
    assert list(db.scan()) == []
    assert db.status_of(b"user-key").state == db.status_of(b"another").state == "committed"


def test_embedded_ids_are_unique_across_threads_and_opens_and_consecutive_ones_sort_together(tmp_path):
    """An embedded volume's new ids: 8 bytes drawn at open, then a counter, so a flush's request
    records sit side by side in the request index. Unique across 8 threads and across two opens
    of the same folder; each is committed under its id."""
    import threading

    seen = []
    with engine.open(tmp_path / "v", durable=False, protection_groups=2) as d:
        ids: list[list[bytes]] = [[] for _ in range(8)]

        def work(t: int) -> None:
            for i in range(50):
                lsn, rid = d._write([(FLAG_PUT, b"t%d-%d" % (t, i), b"v")], None)
                ids[t].append(rid)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        for per in ids:
            assert per == sorted(per), "one thread's ids must ascend"
        first = [rid for per in ids for rid in per]
        assert len(set(first)) == 400 and all(len(r) == 16 for r in first)
        assert len({r[:8] for r in first}) == 1, "one open, one prefix"
        assert all(d.status_of(r).state == "committed" for r in first[::37])
        seen += first
    with engine.open(tmp_path / "v", durable=False) as d:
        d.put(b"again", b"v")
        again = d._write([(FLAG_PUT, b"again2", b"v")], None)[1]
        assert again[:8] != seen[0][:8] and again not in set(seen), "a second open draws a new prefix"


def test_an_error_carries_the_request_id(tmp_path):
    with engine.open(tmp_path / "v", durable=False, protection_groups=2, write_timeout_s=0.2) as d:
        for n in ("n1", "n2", "n3"):
            d.cluster.stop_node(n)
        # Once the writer saw them go (its heartbeats fail), a write is refused before logging.
        eventually(lambda: not any(d.status()["writer"]["links"][n]["up"] for n in ("n1", "n2", "n3")),
                   "the writer to see n1, n2, n3 down")
        with pytest.raises(Unavailable) as e:
            d.put(b"k", b"v")
        assert not isinstance(e.value, WriteIndeterminate)
        assert isinstance(e.value.request_id, bytes) and len(e.value.request_id) == 16
        assert d.status_of(e.value.request_id).state == "not_committed"


def test_an_indeterminate_write_is_pending_then_committed_and_a_resend_joins_it(tmp_path):
    # No background threads: the test decides which node gets each append, as a simulator does.
    v = EmbeddedVolume(str(tmp_path / "v"), EmbeddedOptions(background=False, durable=False, protection_groups=2))
    try:
        w = v.writer
        ops = ((FLAG_PUT, b"k", b"v"),)
        lsn, ticket = w.submit(ops, request_id=b"r")
        for n in ("n1", "n2"):
            w.send_once(w.links[n])
        with pytest.raises(WriteIndeterminate):
            w.wait(lsn, ticket, timeout_s=0)
        assert w.request_status(b"r").state == "pending" and w.request_status(b"r").lsn == lsn
        again, ticket2 = w.submit(ops, request_id=b"r", resend=True)
        assert again == lsn, "a re-send while the first is in flight must join it, not log again"
        for n in ("n3", "n4", "n5", "n6"):
            w.send_once(w.links[n])
        w.wait(again, ticket2, timeout_s=0)
        assert w.request_status(b"r").state == "committed"
        assert request_records(v) == 1
        assert w.get(b"k") == b"v"
    finally:
        v.close()


def test_a_truncated_request_is_not_committed_and_may_be_sent_again(tmp_path):
    v = EmbeddedVolume(str(tmp_path / "v"), EmbeddedOptions(background=False, durable=False, protection_groups=2))
    try:
        w = v.writer
        ops = ((FLAG_PUT, b"k", b"v"),)
        w.submit(ops, request_id=b"lost")
        w.send_once(w.links["n1"])  # one copy, not durable
        v.stop_node("n1")  # ... and out of sight of the recovery, which then cuts it
        v.crash_writer()
        w = v.writer
        assert w.recovery["truncated"] is not None
        assert w.request_status(b"lost").state == "not_committed"
        v.start_node("n1")
        lsn, ticket = w.submit(ops, request_id=b"lost", resend=True)
        for link in list(w.links.values()):
            w.send_once(link)
        w.wait(lsn, ticket, timeout_s=0)
        assert w.request_status(b"lost").state == "committed" and w.get(b"k") == b"v"
    finally:
        v.close()


@pytest.mark.cluster
def test_request_ids_through_a_cluster_and_a_writer_restart(tmp_path):
    c = Cluster(tmp_path / "c")
    try:
        c.up(base_port=free_base_port(), protection_groups=2, timeout_s=60)
        with engine.connect(c.folder) as db:
            db.put(b"k", b"one", request_id=b"cluster-r1")
            st = db.status_of(b"cluster-r1")
            assert st.state == "committed" and st.lsn > 0
            db.put(b"k", b"two")
            db.put(b"k", b"one", request_id=b"cluster-r1")
            assert db.get(b"k") == b"two"
            assert db.status_of(b"unknown").state == "not_committed"
            with pytest.raises(InvalidArgument, match="already used"):
                db.put(b"k", b"three", request_id=b"cluster-r1")
        c.crash_writer()  # SIGKILL and restart: the new writer knows the id from the log only
        with engine.connect(c.folder) as db:
            assert db.status_of(b"cluster-r1").lsn == st.lsn
            db.put(b"k", b"one", request_id=b"cluster-r1")
            assert db.get(b"k") == b"two"
    finally:
        c.down(timeout_s=10)
