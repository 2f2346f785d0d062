"""Expiry (issue 14, item 2): a put may carry a time to live; the deadline is stored with the
record; a read sees no key once the log's time (the commit times the writer stamps, never going
backwards, also across writers) has passed it; a background step deletes expired keys through
the log on the condition that the version is still the one it expires."""

from __future__ import annotations

import time
import types

import pytest
from waiting import eventually

import engine
from engine.cluster import Cluster
from engine.cluster.testing import free_base_port
from engine.core.constants import EXPIRES_BYTES, FLAG_EXPIRES, FLAG_PUT, OP_TTL, VALUE_BYTES_MAX
from engine.errors import InvalidArgument
from engine.head import writer as writer_module
from engine.proto import kv_pb2
from engine.transport import convert


def now_us() -> int:
    return time.time_ns() // 1000


def test_a_key_with_a_ttl_is_read_until_it_expires_then_not_at_all(db):
    db.put(b"short", b"v", ttl_s=2.0)  # long enough to be read back first on a loaded machine
    db.put(b"long", b"w", ttl_s=3600)
    db.put(b"plain", b"x")
    v = db.version(b"short")
    assert v.value == b"v" and 0 < v.ttl_s <= 2.0 and v.lsn > 0
    assert db.version(b"plain").deadline_us == 0 and db.version(b"plain").ttl_s is None
    assert 3000 < db.version(b"long").ttl_s <= 3600  # not a timing: only that the deadline is an hour out
    eventually(lambda: db.get(b"short") is None, what="the key expired")
    assert db.get_many([b"short", b"long", b"plain"]) == [None, b"w", b"x"]
    assert list(db.scan()) == [(b"long", b"w"), (b"plain", b"x")]
    assert db.version(b"short") is None
    eventually(lambda: db._backend.writer.expiry.stats["expired"] == 1, what="the expiry step deleted it")


def test_a_read_hides_a_key_once_the_logs_time_passed_its_deadline_before_any_delete(db):
    w = db._backend.writer
    w.expiry.stop()  # no background deletes: only the log's time hides the key
    db.put(b"k", b"v", expires_at_us=now_us() + 200_000)
    assert db.get(b"k") == b"v"
    time.sleep(0.25)
    assert db.get(b"k") == b"v", "nothing committed since: the log's time has not passed the deadline"
    db.put(b"other", b"x")  # a commit stamps the log with a time after the deadline
    assert db.get(b"k") is None and list(db.scan()) == [(b"other", b"x")]
    lsn, value, deadline = w.reads.version(b"k")
    assert value == b"v" and deadline > 0, "the segments still hold the version: it is hidden, not gone"


def test_the_expiry_step_never_deletes_a_newer_value(db):
    w = db._backend.writer
    w.expiry.stop()
    db.put(b"k", b"old", ttl_s=0.05)
    db.put(b"k", b"new")  # written again, no ttl
    time.sleep(0.1)
    assert w.expiry.run_once() == 0 and w.expiry.stats["skipped"] == 1
    assert db.get(b"k") == b"new"
    db.put(b"j", b"1", ttl_s=0.05)
    time.sleep(0.1)
    assert w.expiry.run_once() == 1 and db.get(b"j") is None
    assert w.reads.version(b"j")[1] is None, "the expiry step logged a delete"


def test_an_overwrite_may_keep_the_deadline_under_a_version_condition(db):
    deadline = now_us() + 3_600_000_000
    db.put(b"k", b"1", expires_at_us=deadline)
    v = db.version(b"k")
    db.put(b"k", b"2", expires_at_us=v.deadline_us, expect=engine.at_version(b"k", v.lsn))
    assert db.version(b"k").deadline_us == deadline and db.get(b"k") == b"2"


def test_deadlines_survive_a_writer_crash_and_a_reopen_and_the_step_finds_them_by_a_scan(tmp_path):
    path = tmp_path / "v"
    with engine.open(path, durable=False, protection_groups=2) as db:
        db.put(b"later", b"v", ttl_s=3600)
        db.put(b"soon", b"v", ttl_s=0.5)
        deadline = db.version(b"later").deadline_us
        db.cluster.crash_writer()
        assert db.version(b"later").deadline_us == deadline
    with engine.open(path, durable=False, protection_groups=2) as db:
        assert db.version(b"later").deadline_us == deadline
        eventually(lambda: db.get(b"soon") is None, what="the key expired after the reopen")
        w = db._backend.writer
        eventually(lambda: w.expiry.stats["expired"] == 1 and w.expiry.stats["scans"] == 1,
                   what="the new writer's expiry step found it by a scan and deleted it")
        assert db.get(b"later") == b"v"


def test_the_logs_time_never_goes_backwards_across_writers_even_when_the_clock_does(tmp_path, monkeypatch):
    path = tmp_path / "v"
    with engine.open(path, durable=False, protection_groups=2) as db:
        db.put(b"k", b"v", expires_at_us=now_us() + 100_000)
        time.sleep(0.15)
        db.put(b"tick", b"")
        stamped = db._backend.writer.log_time_us()
        assert db.get(b"k") is None
    hour_us = 3_600_000_000
    fake = types.SimpleNamespace(time_ns=lambda: time.time_ns() - hour_us * 1000, monotonic=time.monotonic, time=time.time,
                                 sleep=time.sleep, perf_counter=time.perf_counter)
    monkeypatch.setattr(writer_module, "time", fake)  # the next writer's wall clock is an hour behind
    with engine.open(path, durable=False, protection_groups=2) as db:
        w = db._backend.writer
        w.expiry.stop()
        assert w.log_time_us() >= stamped and w.clock_us() >= stamped
        assert db.get(b"k") is None, "an expired key came back to life after a writer with a slow clock took over"
        db.put(b"t2", b"")
        assert w.log_time_us() >= stamped


def test_bad_ttls_and_deadlines_are_refused_before_anything_is_logged(db):
    for kw in ({"ttl_s": 0}, {"ttl_s": -1}, {"ttl_s": float("nan")}, {"ttl_s": float("inf")}, {"ttl_s": True},
               {"ttl_s": "1"}, {"ttl_s": 1e300}, {"expires_at_us": 0}, {"expires_at_us": 1.5}, {"expires_at_us": 1 << 63},
               {"ttl_s": 1, "expires_at_us": 5}):
        with pytest.raises(InvalidArgument):
            db.put(b"k", b"v", **kw)
    with pytest.raises(InvalidArgument, match="expiring value is at most"):
        db.put(b"k", bytes(VALUE_BYTES_MAX - EXPIRES_BYTES + 1), ttl_s=1)
    db.put(b"k", bytes(VALUE_BYTES_MAX - EXPIRES_BYTES), ttl_s=60)
    assert len(db.get(b"k")) == VALUE_BYTES_MAX - EXPIRES_BYTES


def test_expiring_ops_over_grpc_are_checked_at_the_boundary():
    ok = kv_pb2.Unit(ops=[kv_pb2.Op(flags=FLAG_PUT | FLAG_EXPIRES | OP_TTL, key=b"k", value=(5).to_bytes(8, "little") + b"v")])
    assert convert.unit_from_pb(ok).ops[0][0] == FLAG_PUT | FLAG_EXPIRES | OP_TTL
    for flags, value in ((FLAG_PUT | FLAG_EXPIRES, b"short"), (FLAG_PUT | FLAG_EXPIRES, bytes(8)),
                         (FLAG_PUT | FLAG_EXPIRES | OP_TTL, (1 << 62).to_bytes(8, "little")),
                         (FLAG_PUT | OP_TTL, bytes(9)), (FLAG_EXPIRES, bytes(9)), (2 | FLAG_EXPIRES, bytes(9))):
        with pytest.raises(InvalidArgument):
            convert.unit_from_pb(kv_pb2.Unit(ops=[kv_pb2.Op(flags=flags, key=b"k", value=value)]))


def test_an_encrypted_volume_keeps_deadlines_outside_the_seal(tmp_path):
    with engine.open(tmp_path / "e", durable=False, protection_groups=2, encryption_key=bytes(range(32))) as db:
        db.put(b"k", b"secret", ttl_s=3.0)  # long enough to be read back first on a loaded machine
        db.put(b"j", b"kept", ttl_s=3600)
        assert db.get(b"k") == b"secret" and db.version(b"j").ttl_s > 3000
        db.cluster.crash_writer()  # the new writer's expiry step opens the sealed values to find their keys
        eventually(lambda: db.get(b"k") is None, what="the key expired")
        w = db._backend.writer
        eventually(lambda: w.expiry.stats["expired"] == 1, what="the expiry step deleted it")
        assert list(db.scan()) == [(b"j", b"kept")]


@pytest.mark.cluster
def test_expiry_over_grpc(tmp_path):
    c = Cluster(tmp_path / "c")
    try:
        c.up(base_port=free_base_port(), protection_groups=2, timeout_s=60)
        with engine.connect(c.folder) as db:
            db.put(b"k", b"v", ttl_s=3.0)  # long enough to be read back first on a loaded machine
            with db.batch() as b:
                b.put(b"j", b"w", ttl_s=3600).put(b"p", b"x")
            v = db.version(b"k")
            assert v.value == b"v" and 0 < v.ttl_s <= 3.0
            assert 3000 < db.version(b"j").ttl_s <= 3600 and db.version(b"p").deadline_us == 0
            eventually(lambda: db.get(b"k") is None, what="the key expired")
            assert db.version(b"k") is None and sorted(db.scan()) == [(b"j", b"w"), (b"p", b"x")]
    finally:
        c.down(timeout_s=10)


def test_deadlines_are_in_backups_and_a_restore_keeps_them(tmp_path):
    from engine.backup.archiver import BackupOptions

    fast = BackupOptions(segment_s=0.2, round_s=0.02, idle_publish_s=0.2, request_poll_s=0.1)
    vol, bk, into = str(tmp_path / "vol"), str(tmp_path / "bk"), str(tmp_path / "restored")
    with engine.open(vol, durable=False, protection_groups=2, backup=bk, backup_options=fast) as db:
        db.put(b"plain", b"p")
        db.put(b"later", b"v", ttl_s=3600)
        deadline = db.version(b"later").deadline_us
        db.put(b"soon", b"s", expires_at_us=now_us() + 300_000)
        end = now_us()
        eventually(lambda: db.status()["backup"]["complete_through_us"] > end, what="the archive caught up")
    engine.restore(bk, into)
    time.sleep(0.35)
    with engine.open(into, durable=False) as db:
        assert db.version(b"later").deadline_us == deadline and db.get(b"plain") == b"p"
        db.put(b"tick", b"")  # the log's time passes the restored key's deadline
        eventually(lambda: db.get(b"soon") is None, what="a restored deadline still expires its key")
