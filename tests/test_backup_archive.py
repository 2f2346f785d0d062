"""The archive as a whole: damaged files found by `backup verify` and refused by restore,
encrypted backups, retention, a volume written before commit times, and the command line."""

from __future__ import annotations

import gc
import json
import os
import shutil
import time

import pytest

import engine
from engine.backup.archiver import BackupOptions
from engine.backup.format import BASES, MANIFESTS, SEGMENTS
from engine.backup.restore import Archive, verify
from engine.backup.target import FolderTarget
from engine.cli import main
from engine.errors import BackupCorrupt, BackupError, EncryptionError
from waiting import eventually

FAST = BackupOptions(segment_s=0.05, round_s=0.01, idle_publish_s=0.05, request_poll_s=0.05)
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def wait_archived(db) -> None:
    vdl = db.status()["vdl"]
    eventually(lambda: db.status()["backup"]["position"] >= vdl, f"the archive to reach VDL {vdl}")


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """An archive with two bases and several segments: keys a*, then b*, then c* deleted."""
    root = tmp_path_factory.mktemp("archive")
    bk = str(root / "bk")
    with engine.open(str(root / "vol"), backup=bk, backup_options=FAST) as db:
        for i in range(50):
            db.put(b"a%03d" % i, b"A" * 100 + b"%d" % i)
        wait_archived(db)
        db.cluster.backup_now()
        for i in range(50):
            db.put(b"b%03d" % i, b"B%d" % i)
            if i % 10 == 9:
                wait_archived(db)  # several segments
        marks = {"before_c": db.status()["vdl"]}
        for i in range(20):
            db.delete(b"a%03d" % i)
        wait_archived(db)
    return {"root": root, "backup": bk, "marks": marks}


def copy(archive, tmp_path) -> str:
    dst = str(tmp_path / "bk")
    shutil.copytree(archive["backup"], dst)
    return dst


def flip(path: str, offset: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ 0x40]))


def test_a_whole_archive_verifies_and_restores(archive, tmp_path):
    r = verify(archive["backup"])
    assert r["ok"], r["problems"]
    assert r["bases"] == 2 and r["segments"] >= 3
    out = engine.restore(archive["backup"], str(tmp_path / "all"))
    with engine.open(str(tmp_path / "all")) as db:
        got = dict(db.scan())
    assert len(got) == 80 and b"a000" not in got and got[b"a020"].startswith(b"A" * 100) and got[b"b049"] == b"B49"
    assert out["keys"] == 80


def last_segment(bk: str) -> str:
    return sorted(FolderTarget(bk).list(SEGMENTS))[-1]


@pytest.mark.parametrize("damage", ["body-bit", "header-bit", "truncated", "missing", "other-archive"])
def test_a_damaged_segment_is_found_by_verify_and_refused_by_a_restore_that_needs_it(archive, tmp_path, damage, capsys):
    bk = copy(archive, tmp_path)
    name = last_segment(bk)
    path = os.path.join(bk, *name.split("/"))
    size = os.path.getsize(path)
    if damage == "body-bit":
        flip(path, size - 10)
    elif damage == "header-bit":
        flip(path, 9)
    elif damage == "truncated":
        os.truncate(path, size - 1)
    elif damage == "missing":
        os.unlink(path)
    else:  # a segment file of another volume's archive under this name
        other = str(tmp_path / "other")
        with engine.open(str(tmp_path / "ov"), backup=other, backup_options=FAST) as db:
            db.put(b"x", b"y")
            wait_archived(db)
        shutil.copyfile(os.path.join(other, *last_segment(other).split("/")), path)
    r = verify(bk)
    assert not r["ok"]
    assert any(name in p or "stops at LSN" in p for p in r["problems"]), r["problems"]
    assert main(["backup", "verify", "--backup", bk]) == 6
    assert name.split("/")[-1] in capsys.readouterr().out or damage == "missing"
    into = str(tmp_path / "restored")
    with pytest.raises(BackupCorrupt):
        engine.restore(bk, into)
    assert not os.path.exists(into) and not os.path.exists(into + ".restoring")
    assert main(["restore", "--backup", bk, "--into", into]) == 6
    # A point before the damage still restores (it never reads the damaged file).
    engine.restore(bk, str(tmp_path / "earlier"), to_lsn=archive["marks"]["before_c"])


@pytest.mark.parametrize("damage", ["bit", "missing"])
def test_a_damaged_base_is_found_and_refused(archive, tmp_path, damage):
    bk = copy(archive, tmp_path)
    newest = Archive(bk).bases[-1]["parts"][0]["name"]
    path = os.path.join(bk, *newest.split("/"))
    if damage == "bit":
        flip(path, os.path.getsize(path) // 2)
    else:
        os.unlink(path)
    assert any(newest in p for p in verify(bk)["problems"])
    with pytest.raises(BackupCorrupt, match=newest.split("/")[-1]):
        engine.restore(bk, str(tmp_path / "r"))


def test_a_damaged_newest_manifest_is_reported_and_the_one_before_it_is_used(archive, tmp_path):
    bk = copy(archive, tmp_path)
    names = sorted(FolderTarget(bk).list(MANIFESTS))
    flip(os.path.join(bk, *names[-1].split("/")), 30)
    r = verify(bk)
    assert any(names[-1] in p for p in r["problems"])
    assert Archive(bk).manifest["seq"] < int(names[-1].split("/")[-1][:20])
    engine.restore(bk, str(tmp_path / "r"))


def test_a_restore_never_overwrites_and_needs_an_archive(archive, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "f").write_text("x")
    with pytest.raises(BackupError, match="not an empty folder"):
        engine.restore(archive["backup"], str(busy))
    with pytest.raises(BackupError, match="no backup"):
        engine.restore(str(tmp_path / "nothing"), str(tmp_path / "r"))


def test_list_and_restore_from_the_command_line(archive, tmp_path, capsys):
    assert main(["backup", "list", "--backup", archive["backup"], "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert len(listed["bases"]) == 2 and listed["window"]["latest_lsn"] >= archive["marks"]["before_c"]
    assert main(["backup", "list", "--backup", archive["backup"]]) == 0
    assert "restore window" in capsys.readouterr().out
    into = str(tmp_path / "cli")
    assert main(["restore", "--backup", archive["backup"], "--into", into, "--to-lsn", str(archive["marks"]["before_c"]),
                 "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["cut_lsn"] == archive["marks"]["before_c"] and r["keys"] == 100
    assert main(["restore", "--backup", archive["backup"], "--into", str(tmp_path / "x"), "--to-time", "not a time"]) == 2
    assert main(["restore", "--backup", archive["backup"], "--into", str(tmp_path / "x"), "--to-time", "2000-01-01T00:00:00Z"]) == 3


def test_backup_now_on_a_closed_volume_and_by_request_to_a_running_archiver(tmp_path, capsys):
    bk, vol = str(tmp_path / "bk"), str(tmp_path / "vol")
    with engine.open(vol) as db:
        db.put(b"k", b"v")
    assert main(["backup", "now", "--backup", bk, "--volume", vol, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["records"] == 1
    with engine.open(vol, backup=bk, backup_options=FAST) as db:
        db.put(b"k2", b"v2")
        assert main(["backup", "now", "--backup", bk, "--json"]) == 0
        base = json.loads(capsys.readouterr().out)
    assert base["records"] == 2 and len(Archive(bk).bases) == 2
    assert not FolderTarget(bk).list("requests/")


def test_an_encrypted_volume_is_never_archived_in_plaintext_and_restores_under_a_new_key(tmp_path):
    key, new_key = os.urandom(32), os.urandom(32)
    secret = b"secret-VALUE-4711-" * 4
    bk = str(tmp_path / "bk")
    with engine.open(str(tmp_path / "vol"), encryption_key=key, backup=bk, backup_options=FAST) as db:
        db.put(b"account:42", secret)
        db.cluster.backup_now()
        db.put(b"account:43", secret + b"!")
        db.delete(b"account:42")
        wait_archived(db)
    for folder, _dirs, files in os.walk(bk):
        for f in files:
            with open(os.path.join(folder, f), "rb") as fh:
                data = fh.read()
            assert b"secret-VALUE" not in data and b"account:4" not in data, f
    assert Archive(bk).manifest["encryption"] is not None
    with pytest.raises(EncryptionError):
        engine.restore(bk, str(tmp_path / "nokey"))
    r = engine.restore(bk, str(tmp_path / "r"), key=key, new_key=new_key)
    assert r["encrypted"]
    with pytest.raises(EncryptionError):
        engine.open(str(tmp_path / "r"), encryption_key=key).close()
    with engine.open(str(tmp_path / "r"), encryption_key=new_key) as db:
        assert dict(db.scan()) == {b"account:43": secret + b"!"}


def test_a_plain_volume_restored_with_a_key_becomes_encrypted(archive, tmp_path):
    key = os.urandom(32)
    r = engine.restore(archive["backup"], str(tmp_path / "enc"), new_key=key, to_lsn=archive["marks"]["before_c"])
    assert r["encrypted"]
    with open(tmp_path / "enc" / "volume.json") as fh:
        assert json.load(fh)["format"] == 2
    with engine.open(str(tmp_path / "enc"), encryption_key=key) as db:
        assert db.get(b"b049") == b"B49"


def test_retention_removes_only_what_no_restore_point_in_the_window_needs(tmp_path):
    day_us = 86_400 * 1_000_000
    clock = {"offset": 0}

    def wall_us() -> int:
        return time.time_ns() // 1000 + clock["offset"]

    from engine.embedded import EmbeddedOptions, EmbeddedVolume

    bk = str(tmp_path / "bk")
    from dataclasses import replace

    options = replace(FAST, base_interval_s=1e9)  # no base but those taken here
    v = EmbeddedVolume(str(tmp_path / "vol"), EmbeddedOptions(backup=bk, backup_options=options, backup_retention_days=2),
                       wall_clock_us=wall_us)
    bases = []
    try:
        for day, step in enumerate([0, day_us, day_us, day_us * 3 // 2]):
            clock["offset"] += step
            for i in range(5):
                v.write([(1, b"d%d-%d" % (day, i), b"x")], request_id=b"r%d-%d" % (day, i))
            v.backup_now()
            bases.append(Archive(bk).bases[-1])
    finally:
        v.close()
    a = Archive(bk)
    # Horizon: day 3.5 - 2 = day 1.5: the newest base at or before it is day 1's; day 0's goes.
    assert [b["lsn"] for b in a.bases] == [b["lsn"] for b in bases[1:]]
    assert all(last > bases[1]["lsn"] for (_a, last), _n in a.segments)
    assert not [n for n in FolderTarget(bk).list(BASES) if n.startswith(f"bases/{bases[0]['lsn']:020d}")]
    assert verify(bk)["ok"]
    start = bases[0]["time_us"] / 1e6
    engine.restore(bk, str(tmp_path / "r1"), to_time=start + 1.5 * 86_400)  # inside the window
    with pytest.raises(BackupError, match="before the oldest base"):
        engine.restore(bk, str(tmp_path / "r0"), to_time=start + 0.5 * 86_400)


def test_a_volume_written_before_commit_times_is_backed_up_and_restored(tmp_path):
    """tests/fixtures/volume-format-1-node-2: request records whose value is the digest alone."""
    with open(os.path.join(FIXTURES, "volume-format-1-node-2.json")) as fh:
        expected = json.load(fh)
    vol = str(tmp_path / "vol")
    shutil.copytree(os.path.join(FIXTURES, "volume-format-1-node-2"), vol)
    bk = str(tmp_path / "bk")
    with engine.open(vol, backup=bk, backup_options=FAST) as db:
        assert db.status_of(b"fixture-batch-1").state == "committed"  # the old record's digest still reads
        with db.batch(request_id=b"fixture-batch-1") as b:  # a re-send of it is applied at most once
            for k, v in expected["batch"]["puts"].items():
                b.put(k.encode("latin-1"), v.encode("latin-1"))
            for k in expected["batch"]["deletes"]:
                b.delete(k.encode("latin-1"))
        assert b.lsn == expected["batch"]["lsn"]
        lsn = db.put(b"new", b"after")
        wait_archived(db)
    r = engine.restore(bk, str(tmp_path / "r"))
    assert r["cut_lsn"] == lsn
    with engine.open(str(tmp_path / "r")) as db:
        got = dict(db.scan())
    want = {k.encode("latin-1"): v.encode("latin-1") for k, v in expected["values"].items()}
    want[b"new"] = b"after"
    assert got == want


def test_the_bulk_path_fills_only_an_empty_volume(tmp_path):
    from engine.embedded import EmbeddedOptions, EmbeddedVolume
    from engine.errors import InvalidArgument

    v = EmbeddedVolume(str(tmp_path / "vol"), EmbeddedOptions(protection_groups=2))
    try:
        assert v.bulk_load(((b"k%d" % i, b"v%d" % i) for i in range(1000)), chunk_bytes=1 << 12) == 1000
        assert gc.isenabled()  # the cyclic collector, paused for the load, runs again
        assert dict(v.scan(b"", None)) == {b"k%d" % i: b"v%d" % i for i in range(1000)}
        assert all(n.state().scls[pg] == v.writer.ledger.read_tails[pg] for n in v.nodes.values() for pg in range(2))
        with pytest.raises(InvalidArgument, match="new, empty volume"):
            v.bulk_load([(b"x", b"y")])
    finally:
        v.close()


class _OldEpoch:
    """A writer as a paused, already replaced one sees itself: every read point at an old epoch."""

    def __init__(self, writer, epoch: int) -> None:
        self._w, self._epoch = writer, epoch

    def __getattr__(self, name):
        return getattr(self._w, name)

    def read_point(self, sent_at: float = 0.0):
        from dataclasses import replace

        return replace(self._w.read_point(sent_at), epoch=self._epoch)


def test_an_archiver_of_a_replaced_writer_is_fenced_by_the_newer_ones_manifest(tmp_path):
    from engine.backup.archiver import Archiver
    from engine.errors import StaleEpoch

    bk = str(tmp_path / "bk")
    with engine.open(str(tmp_path / "vol"), protection_groups=2) as db:
        v = db._backend
        v.crash_writer()  # epoch 2
        old = Archiver(bk, volume_id=v.volume_id, protection_groups=2, options=FAST, background=False)
        old.attach(_OldEpoch(v.writer, 1))
        new = Archiver(bk, volume_id=v.volume_id, protection_groups=2, options=FAST, background=False)
        new.attach(v.writer)  # claims the archive at epoch 2
        db.put(b"k", b"v")
        with pytest.raises(StaleEpoch, match="newer writer"):
            old.step(force_segment=True)
        assert old.status()["state"] == "fenced"
        assert new.step(force_segment=True)
        assert Archive(bk).manifest["epoch"] == 2
        with pytest.raises(StaleEpoch):  # and it cannot claim the archive again
            Archiver(bk, volume_id=v.volume_id, protection_groups=2, options=FAST, background=False).attach(_OldEpoch(v.writer, 1))
        with pytest.raises(BackupError, match="another volume"):
            Archiver(bk, volume_id="another", protection_groups=2, options=FAST, background=False).attach(v.writer)


def test_a_segment_written_after_the_last_manifest_is_adopted_and_a_damaged_one_refetched(tmp_path):
    from engine.backup.archiver import Archiver

    bk = str(tmp_path / "bk")
    with engine.open(str(tmp_path / "vol"), protection_groups=2) as db:
        v = db._backend
        a = Archiver(bk, volume_id=v.volume_id, protection_groups=2, options=FAST, background=False)
        a.attach(v.writer)
        a.step()
        db.put(b"k1", b"v1")
        a.step(force_segment=True)
        db.put(b"k2", b"v2")
        a.step(force_segment=True)  # a crash lost the manifest version naming this segment:
        newest = sorted(FolderTarget(bk).list(MANIFESTS))[-1]
        FolderTarget(bk).delete(newest)
        b = Archiver(bk, volume_id=v.volume_id, protection_groups=2, options=FAST, background=False)
        b.attach(v.writer)
        assert b.position() == a.position()
        # A damaged last segment is removed and its records fetched again from the nodes.
        seg = sorted(FolderTarget(bk).list(SEGMENTS))[-1]
        flip(os.path.join(bk, *seg.split("/")), os.path.getsize(os.path.join(bk, *seg.split("/"))) - 3)
        FolderTarget(bk).delete(sorted(FolderTarget(bk).list(MANIFESTS))[-1])
        c = Archiver(bk, volume_id=v.volume_id, protection_groups=2, options=FAST, background=False)
        c.attach(v.writer)
        assert c.position() < a.position()
        c.step(force_segment=True)
        assert c.position() == a.position()
    assert verify(bk)["ok"]
    engine.restore(bk, str(tmp_path / "r"))
    with engine.open(str(tmp_path / "r")) as db:
        assert dict(db.scan()) == {b"k1": b"v1", b"k2": b"v2"}


def test_commit_times_never_go_back_across_writers_even_when_the_clock_does(tmp_path):
    from engine.embedded import EmbeddedOptions, EmbeddedVolume

    clock = {"offset": 0}
    bk = str(tmp_path / "bk")
    v = EmbeddedVolume(str(tmp_path / "vol"), EmbeddedOptions(protection_groups=2, backup=bk, backup_options=FAST),
                       wall_clock_us=lambda: time.time_ns() // 1000 + clock["offset"])
    try:
        for i in range(20):
            v.write([(1, b"a%d" % i, b"x")], request_id=b"a%d" % i)
        eventually(lambda: v.archiver.position() >= v.writer.ledger.vdl, "the archive to catch up")
        clock["offset"] = -3600 * 1_000_000  # the next writer's clock is an hour behind
        v.crash_writer()
        for i in range(20):
            v.write([(1, b"b%d" % i, b"x")], request_id=b"b%d" % i)
        eventually(lambda: v.archiver.position() >= v.writer.ledger.vdl, "the archive to catch up")
    finally:
        v.close()
    import test_backup_restore as h

    stamps = [t for _lsn, t, _e in h.commit_times_in_log_order(bk)]
    assert len(stamps) == 40 and stamps == sorted(stamps)


def test_a_restore_fills_its_log_pages(tmp_path):
    """The base comes PG by PG in key order; the bulk path gives LSNs in that order, so every
    node's log arrives ascending and is put with MDB_APPEND: three 1 KB records to a 4 KiB page
    (two before, when LMDB split each full page in half), on every node."""
    n = 1500
    bk, vol = str(tmp_path / "bk"), str(tmp_path / "vol")
    with engine.open(vol, protection_groups=4, backup=bk, backup_options=FAST) as db:
        for start in range(0, n, 500):
            with db.batch() as b:
                for i in range(start, start + 500):
                    b.put(b"user:%06d" % i, b"%04d" % i * 250)
        db.cluster.backup_now()
    out = str(tmp_path / "r")
    r = engine.restore(bk, out)
    assert r["keys"] == n
    from engine.embedded import EmbeddedOptions, EmbeddedVolume

    v = EmbeddedVolume(out, EmbeddedOptions())
    try:
        assert v.get(b"user:%06d" % 777) == b"0777" * 250
        for node in v.nodes.values():
            with node.store.env.begin() as txn:
                pages, entries = txn.stat(node.store._log)["leaf_pages"], txn.stat(node.store._log)["entries"]
            assert entries >= n and pages <= entries // 3 + 8, f"node {node.id}: {entries} records in {pages} pages"
    finally:
        v.close()


def test_a_damaged_segment_that_others_cover_is_passed_over_by_restore_and_reported_by_verify(archive, tmp_path):
    """Segments may overlap (two archivers; one that died between a segment and its manifest).
    A damaged one spanning two good ones is the longest, so restore tries it first: it passes it
    over for the good ones and restores the same volume; verify still names it."""
    from engine.backup.format import parse_segment_name, segment_name

    bk = copy(archive, tmp_path)
    names = sorted(FolderTarget(bk).list(SEGMENTS))
    (a, _l), (_l2, m) = parse_segment_name(names[-2]), parse_segment_name(names[-1])
    spanning = segment_name(a, m)
    with open(os.path.join(bk, *spanning.split("/")), "wb") as fh:
        fh.write(b"\x00garbage" * 100)
    r = verify(bk)
    assert not r["ok"] and any(spanning.split("/")[-1] in p for p in r["problems"]), r["problems"]
    out = engine.restore(bk, str(tmp_path / "r"))
    with engine.open(str(tmp_path / "r")) as db:
        got = dict(db.scan())
    assert len(got) == 80 and got[b"b049"] == b"B49" and out["keys"] == 80
