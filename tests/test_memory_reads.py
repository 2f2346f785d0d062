"""Gets the writer answers from its memory of its recent writes (`Writer.remembered`,
engine.head.reads): exact answers, never a stale one, and never where a segment must be asked.

Real embedded volumes (six LMDB segments, background senders); every answer is checked against
what was written, and the counter says which gets asked no segment.
"""

from __future__ import annotations

import time

from waiting import eventually

import engine
from engine.core.constants import FLAG_PUT

KEY = bytes(range(32))


def memory_reads(db) -> int:
    return db.status()["writer"]["stats"]["reads_from_memory"]


def writer(db):
    return db._backend._w


def test_a_get_of_a_key_this_writer_wrote_asks_no_segment_and_sees_puts_deletes_and_overwrites(tmp_path):
    with engine.open(tmp_path / "v", durable=False, protection_groups=2) as db:
        db.put(b"a", b"1")
        db.put(b"b", b"2")
        db.put(b"a", b"3")
        db.delete(b"b")
        before = memory_reads(db)
        assert (db.get(b"a"), db.get(b"b")) == (b"3", None)
        assert db.get_many([b"a", b"b", b"never"]) == [b"3", None, None]
        # a, b alone and a, b in the batch; "never" was read from the segments
        assert memory_reads(db) - before == 4


def test_a_write_above_the_read_point_says_nothing_about_the_version_below_it(tmp_path):
    with engine.open(tmp_path / "v", durable=False, protection_groups=2) as db:
        first = db.put(b"k", b"old")
        second = db.put(b"k", b"new")
        w = writer(db)
        lsn, value, deadline = w.remembered(b"k", second)  # a put returns its unit's last LSN (its CPL)
        assert (value, deadline) == (b"new", 0) and first < lsn <= second
        assert w.remembered(b"k", lsn - 1) is None, "at a read point below the newest write: ask the segments"
        assert w.remembered(b"k", first) is None
        assert w.remembered(b"other", second) is None


def test_quorum_gets_snapshot_gets_and_a_new_writer_ask_the_segments(tmp_path):
    with engine.open(tmp_path / "v", durable=False, protection_groups=2) as db:
        db.put(b"k", b"v1")
        snap = db.snapshot()
        db.put(b"k", b"v2")
        before = memory_reads(db)
        assert db.get(b"k", quorum=True) == b"v2"
        assert snap.get(b"k") == b"v1", "a snapshot reads its own read point from the segments"
        assert memory_reads(db) == before
        snap.close()
    with engine.open(tmp_path / "v", durable=False) as db:  # a new writer remembers nothing yet
        assert db.get(b"k") == b"v2"
        assert memory_reads(db) == 0
        db.put(b"k", b"v3")
        assert db.get(b"k") == b"v3" and memory_reads(db) == 1


def test_a_remembered_key_with_a_lapsed_deadline_reads_as_absent(tmp_path):
    with engine.open(tmp_path / "v", durable=False, protection_groups=2) as db:
        db.put(b"short", b"v", ttl_s=0.2)
        db.put(b"long", b"v", ttl_s=3600)
        assert db.get(b"short") == b"v" and db.get(b"long") == b"v"
        time.sleep(0.25)
        db.put(b"tick", b"t")  # the log's clock moves with commits
        eventually(lambda: db.get(b"short") is None, "the lapsed deadline to hide the value")
        assert db.get(b"long") == b"v"


def test_an_encrypted_volume_answers_plaintext_from_memory_and_the_same_from_the_segments(tmp_path):
    with engine.open(tmp_path / "v", durable=False, protection_groups=2, encryption_key=KEY) as db:
        db.put(b"secret", b"plain value")
        before = memory_reads(db)
        assert db.get(b"secret") == b"plain value" and db.get_many([b"secret"]) == [b"plain value"]
        assert memory_reads(db) - before == 2
        assert db.get(b"secret", quorum=True) == b"plain value"  # the segments' sealed copy opens to it
    with engine.open(tmp_path / "v", durable=False, encryption_key=KEY) as db:
        assert db.get(b"secret") == b"plain value" and memory_reads(db) == 0


def test_many_threads_reading_and_writing_one_key_never_see_a_value_go_back(tmp_path):
    """Each reader's successive gets of a counter that writers raise never go down, whether the
    memory or a segment answered."""
    import threading

    with engine.open(tmp_path / "v", durable=False, protection_groups=2) as db:
        db.put(b"n", b"%08d" % 0)
        stop = threading.Event()
        errors: list[str] = []

        def write() -> None:
            try:
                for i in range(1, 301):
                    db._write([(FLAG_PUT, b"n", b"%08d" % i)], None)
            finally:
                stop.set()  # a failed write must not leave the readers looping

        def read() -> None:
            last = -1
            while not stop.is_set():
                v = int(db.get(b"n"))
                if v < last:
                    errors.append(f"{v} after {last}")
                last = v

        threads = [threading.Thread(target=write)] + [threading.Thread(target=read) for _ in range(3)]
        [t.start() for t in threads]
        [t.join(timeout=120) for t in threads]
        assert not any(t.is_alive() for t in threads), "a thread did not finish in 120 s"
        assert not errors, errors[:5]
        assert db.get(b"n") == b"%08d" % 300
