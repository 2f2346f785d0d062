"""Storage that grows to a maximum (issue 12, item 2), with real LMDB environments only.

What is shown:

* sizes people write (`10GiB`, `500MiB`, plain bytes) parse to the bytes they say, and every
  other text, and every maximum out of range (0, negative, a bool, above 2^62, above the
  filesystem) is an InvalidArgument, never a crash;
* a node opens with a small map and grows it, geometrically and capped at its maximum, as data
  arrives: ahead of need, and on MDB_MAP_FULL in the middle of a transaction (grown, the
  transaction runs again), while readers on other threads read through every resize; after a
  reopen everything reads back;
* at its maximum a node is full (StorageFull naming it), and room freed inside its file counts as
  room again: LMDB reuses the pages of deleted records, so once records are gone appends land
  again, within the maximum. Today the records a node deletes are those a truncation cuts (what
  this test uses) and those version collection removes (engine.node.collection): a delete's
  older versions at once, its tombstone once every node swept past it; the room shows by itself;
* an embedded volume records its maximum in volume.json (an old volume without the field opens
  with the default), refuses a maximum below the data it holds (nothing changed), and at its
  maximum refuses puts naming the nodes while deletes still work; a larger maximum lets the
  writes resume, and nothing acknowledged is lost;
* status shows each node's maximum and, at 80% or more, a warning; the node logs the crossing once.

The cluster side (`cluster up --max-storage`) is in tests/test_storage_full_e2e.py, which already
runs a cluster to its limit.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

import engine
from engine import codec, sizes
from engine.cluster.manifest import load_manifest
from engine.cluster.schema import validate_manifest
from engine.core.constants import FLAG_CPL, FLAG_PUT, LSN_VALID_MAX
from engine.core.types import Geometry, NodeInfo, TruncationRange
from engine.embedded import VOLUME_FILE
from engine.errors import InvalidArgument, StorageFull, WrongFolder
from engine.node import growth
from engine.node.service import StorageNode

P = 2
MiB = 1 << 20
NODES = ("n1", "n2", "n3", "n4", "n5", "n6")
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
#: Bounds on every fill loop (never time).
FRAMES_MAX = 4000
PUTS_MAX = 3000


# --- sizes ---------------------------------------------------------------------------------------
@given(st.integers(0, 1 << 62), st.sampled_from(sorted(sizes.UNITS)), st.sampled_from(["", " "]), st.booleans())
def test_a_number_and_a_unit_parse_to_the_bytes_they_say(n, unit, space, upper):
    text = f"{n}{space}{unit.upper() if upper else unit}"
    assert sizes.parse_size(text) == n * sizes.UNITS[unit]


@given(st.text(max_size=60))
def test_any_text_is_a_size_or_an_invalid_argument(text):
    try:
        value = sizes.parse_size(text)
    except InvalidArgument as e:
        assert str(e)
    else:
        assert isinstance(value, int) and value >= 0


@given(st.integers(sizes.STORAGE_BYTES_MIN, sizes.STORAGE_BYTES_MAX))
def test_format_size_says_the_size_within_its_rounding(n):
    number, unit = sizes.format_size(n).split()
    factor = sizes.UNITS[unit.lower()]
    assert 1 <= float(number) < 1024 or unit == "PiB"
    assert abs(float(number) * factor - n) <= factor * 0.05


def test_a_size_just_below_a_unit_is_said_in_that_unit():
    """Found by the property above: the unit was chosen before rounding, so 1023.99 TiB read
    "1024.0 TiB"."""
    assert sizes.format_size(1_125_844_931_261_236) == "1 PiB"
    assert sizes.format_size((1 << 20) - 1) == "1 MiB"
    assert (sizes.format_size(1023), sizes.format_size(1536), sizes.format_size(10 << 30)) == ("1023 B", "1.5 KiB", "10 GiB")


@pytest.mark.parametrize("text, expected", [
    ("10GiB", 10 << 30), ("500MiB", 500 << 20), ("1.5GiB", 3 << 29), ("4096", 4096), ("2 TB", 2 * 10**12),
    (" 1 kib ", 1024), ("0", 0),
])
def test_sizes_people_write(text, expected):
    assert sizes.parse_size(text) == expected


@pytest.mark.parametrize("text, words", [
    ("10G", "ambiguous"), ("10 GiBs", "unknown unit"), ("-1GiB", "not a size"), ("", "not a size"),
    ("1.5B", "whole number"), ("0.3KiB", "whole number"), ("1e9", "not a size"), ("1 e", "unknown unit"), ("9" * 41, "not a size"),
])
def test_bad_sizes_say_why(text, words):
    with pytest.raises(InvalidArgument) as e:
        sizes.parse_size(text)
    assert words in str(e.value), str(e.value)


@pytest.mark.parametrize("value", [0, -1, MiB - 1, True, 1.5, "1GiB", None, (1 << 62) + 1, 1 << 80])
def test_a_maximum_out_of_range_is_refused(value):
    with pytest.raises(InvalidArgument):
        sizes.check_storage_bytes(value)


def test_a_maximum_above_the_whole_filesystem_is_refused(tmp_path):
    fs = os.statvfs(tmp_path)
    total = fs.f_blocks * fs.f_frsize
    sizes.check_fits_filesystem(total, str(tmp_path))
    with pytest.raises(InvalidArgument) as e:
        sizes.check_fits_filesystem(total + 1, str(tmp_path / "not" / "yet"))
    assert "filesystem" in str(e.value)


# --- a node -------------------------------------------------------------------------------------
class Filler:
    """Appends frames of records of distinct keys, each PG's chain extended."""

    def __init__(self, value_bytes: int = 8000, per_frame: int = 16):
        self.lsn, self.prev, self.value_bytes, self.per_frame = 0, [0] * P, value_bytes, per_frame
        self.acked: list[tuple[int, int, bytes]] = []

    def value(self, lsn: int) -> bytes:
        stem = b"%08d;" % lsn
        return (stem * (self.value_bytes // len(stem) + 1))[: self.value_bytes]

    def frame(self) -> tuple[bytes, list]:
        recs, meta = [], []
        for _ in range(self.per_frame):
            self.lsn += 1
            pg = self.lsn % P
            key = b"key-%08d" % self.lsn
            recs.append(codec.encode_record(self.lsn, self.prev[pg], pg, FLAG_PUT | FLAG_CPL, key, self.value(self.lsn)))
            meta.append((pg, self.lsn, key))
            self.prev[pg] = self.lsn
        return codec.encode_frame(recs), meta

    def undo(self, meta) -> None:
        self.lsn = meta[0][1] - 1
        for pg in range(P):
            self.prev[pg] = max([lsn for p, lsn, _ in self.acked if p == pg], default=0)

    def append(self, node, hint: int = 0):
        frame, meta = self.frame()
        try:
            reply = node.handle("append", 0, frame, hint)
        except BaseException:
            self.undo(meta)
            raise
        self.acked.extend(meta)
        return reply

    def check(self, node) -> None:
        for pg, lsn, key in self.acked:
            r = node.handle("read", pg, key, LSN_VALID_MAX, 0, 0)
            assert (r.lsn, r.value) == (lsn, self.value(lsn)), f"record {lsn} lost or wrong"


def open_node(path, max_bytes: int, **kw) -> StorageNode:
    return StorageNode(str(path), NodeInfo("n1", "a"), Geometry(P), "vol", durable=False, max_storage_bytes=max_bytes, **kw)


def grown(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "grew its LMDB map" in r.getMessage()]


def test_a_node_grows_its_map_from_a_small_start_to_well_above_it_and_reads_everything_after_a_reopen(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(growth, "MAP_BYTES_INITIAL", 1 * MiB)
    caplog.set_level(logging.INFO, logger="sixfold.store")
    node = open_node(tmp_path / "n1", 256 * MiB)
    filler = Filler()
    try:
        assert node.store.map_bytes == 1 * MiB
        maps = [node.store.map_bytes]
        while node.handle("state").bytes < 24 * MiB:
            assert len(filler.acked) < FRAMES_MAX * filler.per_frame
            filler.append(node)
            if node.store.map_bytes != maps[-1]:
                maps.append(node.store.map_bytes)
        assert maps[-1] >= 24 * MiB and maps[-1] <= 256 * MiB, maps
        assert all(b >= 2 * a for a, b in zip(maps, maps[1:])), f"growth is geometric: {maps}"
        assert len(maps) - 1 == len(grown(caplog)) and "ahead of a write" in grown(caplog)[0], grown(caplog)
        st = node.handle("state")
        assert (st.extra["map_bytes"], st.extra["max_storage_bytes"], st.capacity_bytes) == (maps[-1], 256 * MiB, 256 * MiB)
        assert st.used_bytes <= st.bytes <= maps[-1] and not st.space_low
        filler.check(node)
    finally:
        node.close()
    node = open_node(tmp_path / "n1", 256 * MiB)
    try:
        held = node.handle("state").bytes
        assert node.store.map_bytes >= 2 * held, "a reopened node maps room for twice its data"
        filler.check(node)
    finally:
        node.close()


def test_a_write_that_fills_the_map_mid_transaction_grows_it_and_runs_again(tmp_path, monkeypatch, caplog):
    """With growth ahead of need turned off, every growth is a transaction that met
    MDB_MAP_FULL, was aborted (changing nothing), and ran again on the larger map."""
    monkeypatch.setattr(growth, "MAP_BYTES_INITIAL", 1 * MiB)
    monkeypatch.setattr(growth, "GROW_AT_FRACTION", float("inf"))
    caplog.set_level(logging.INFO, logger="sixfold.store")
    node = open_node(tmp_path / "n1", 64 * MiB)
    filler = Filler(per_frame=64)  # frames of half a MiB: a few fill the first map
    try:
        for _ in range(40):
            reply = filler.append(node)
            assert list(reply.scls) == [max(lsn for p, lsn, _ in filler.acked if p == pg) for pg in range(P)]
        assert node.store.map_bytes > 8 * MiB
        messages = grown(caplog)
        assert messages and all("a write found it full" in m for m in messages), messages
        filler.check(node)
    finally:
        node.close()


def test_readers_on_other_threads_read_through_every_resize(tmp_path, monkeypatch):
    """A resize re-maps the file: the map gate keeps every read transaction out while it does.
    Readers (get, scan, fetch, state) run flat out on three threads while the map grows from 1 MiB
    several times; every read they make is right."""
    monkeypatch.setattr(growth, "MAP_BYTES_INITIAL", 1 * MiB)
    node = open_node(tmp_path / "n1", 256 * MiB)
    filler = Filler(value_bytes=2000, per_frame=32)
    filler.append(node)
    done = threading.Event()
    errors: list[BaseException] = []
    reads = [0]

    def reader(kind: int) -> None:
        try:
            while not done.is_set():
                pg, lsn, key = filler.acked[len(filler.acked) // 2]
                if kind == 0:
                    r = node.handle("read", pg, key, LSN_VALID_MAX, 0, 0)
                    assert (r.lsn, r.value) == (lsn, filler.value(lsn))
                elif kind == 1:
                    entries, _resume = node.handle("scan", pg, b"", None, LSN_VALID_MAX, 0, 50, 0)
                    assert entries and all(e.value == filler.value(e.lsn) for e in entries)
                else:
                    frame = node.handle("fetch", pg, 0, 1 << 20, None).frame
                    assert codec.index_frame(frame)
                    assert node.handle("state").used_bytes > 0
                reads[0] += 1
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    try:
        maps = {node.store.map_bytes}
        for _ in range(FRAMES_MAX):
            if len(maps) >= 5 or errors:
                break
            filler.append(node)
            maps.add(node.store.map_bytes)
    finally:
        done.set()
        for t in threads:
            t.join(60)
    try:
        assert not errors, errors
        assert len(maps) >= 5, f"the map grew only through {sorted(maps)}"
        assert reads[0] > 0
        filler.check(node)
    finally:
        node.close()


def test_at_its_maximum_a_node_is_full_and_room_freed_inside_its_file_is_room_again(tmp_path):
    """The node keeps a floor no append takes (`SegmentStore.floor_bytes`): in a full LMDB file
    even a delete needs fresh pages before it frees any, so without it nothing could ever give
    room back."""
    maximum = 4 * MiB
    node = open_node(tmp_path / "n1", maximum)
    filler = Filler(per_frame=4)
    try:
        for _ in range(FRAMES_MAX):
            try:
                filler.append(node)
            except StorageFull as e:
                refusal = e
                break
        else:
            raise AssertionError(f"{FRAMES_MAX} frames fitted in {maximum} bytes")
        assert "n1 is full" in str(refusal) and "collection" in str(refusal), str(refusal)
        st = node.handle("state")
        assert st.space_low and st.room_bytes == 0 and st.bytes <= maximum and node.store.map_bytes <= maximum, st
        filler.check(node)
        # The records of the upper half of the log go (a truncation cuts them: hint 0, so it may).
        cut_from = filler.acked[len(filler.acked) // 2][1]
        node.handle("sync_epoch", 0, (TruncationRange(1, cut_from, filler.lsn),), None)
        # LSNs inside the cut are refused for ever: the filler carries on above it.
        filler.acked = [a for a in filler.acked if a[1] < cut_from]
        filler.prev = [max([lsn for p, lsn, _ in filler.acked if p == pg], default=0) for pg in range(P)]
        st = node.handle("state")
        assert not st.space_low and st.room_bytes > maximum // 4, (st.used_bytes, st.bytes, st.room_bytes)
        assert st.used_bytes < st.bytes, "the freed pages are counted as room"
        before = len(filler.acked)
        for _ in range(FRAMES_MAX):
            try:
                filler.append(node)
            except StorageFull:
                break
        assert len(filler.acked) - before >= (len(filler.acked) // 4), "appends land again in the freed pages"
        assert os.path.getsize(tmp_path / "n1" / "data.mdb") <= maximum and node.store.map_bytes <= maximum
        filler.check(node)
    finally:
        node.close()


def test_at_the_floor_a_frame_of_records_the_node_holds_already_still_lands(tmp_path):
    """A recovery re-replicates to every node what some lack, full nodes too: records a node
    holds already cost it nothing, so they must not be refused for want of room (a check made
    before the transaction refused them, and a full volume could not be reopened)."""
    node = open_node(tmp_path / "n1", 4 * MiB)
    filler = Filler(per_frame=4)
    frames = []
    try:
        for _ in range(FRAMES_MAX):
            frame, meta = filler.frame()
            try:
                node.handle("append", 0, frame, 0)
            except StorageFull as e:
                assert "keeps the last" in str(e)
                filler.undo(meta)
                break
            filler.acked.extend(meta)
            frames.append(frame)
        for frame in frames[-8:]:  # re-sent, as by a recovery (repair) or a writer's resend
            node.handle("repair_append", frame)
            node.handle("append", 0, frame, 0)
        filler.check(node)
    finally:
        node.close()


def test_without_a_floor_a_node_filled_to_its_last_page_cannot_even_cut(tmp_path):
    """Why the floor: told to keep no reserve (so no floor), a node takes appends to its last
    page, and then even the transaction that would give room back (a truncation cut) needs fresh
    pages first and is refused. With the floor (the test above) the same cut runs."""
    node = open_node(tmp_path / "n1", 4 * MiB, reserve_bytes=0)
    filler = Filler(per_frame=1)
    try:
        for _ in range(FRAMES_MAX):
            try:
                filler.append(node)
            except StorageFull:
                break
        cut_from = filler.acked[len(filler.acked) // 2][1]
        with pytest.raises(StorageFull):
            node.handle("sync_epoch", 0, (TruncationRange(1, cut_from, filler.lsn),), None)
        filler.check(node)  # refused whole: nothing was cut
    finally:
        node.close()


def test_a_maximum_below_the_data_a_node_holds_is_refused_and_changes_nothing(tmp_path):
    node = open_node(tmp_path / "n1", 64 * MiB)
    filler = Filler()
    for _ in range(20):
        filler.append(node)
    held = node.handle("state").bytes
    node.close()
    data = tmp_path / "n1" / "data.mdb"
    before = (data.stat().st_size, data.read_bytes())
    with pytest.raises(InvalidArgument) as e:
        open_node(tmp_path / "n1", held - 4096)
    assert "n1" in str(e.value) and str(held) in str(e.value) and "nothing was changed" in str(e.value), str(e.value)
    assert (data.stat().st_size, data.read_bytes()) == before
    node = open_node(tmp_path / "n1", held)  # exactly its data: it opens (and is full)
    try:
        filler.check(node)
        assert node.handle("state").space_low
    finally:
        node.close()


def test_the_node_logs_crossing_eighty_percent_once(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="sixfold.store")
    node = open_node(tmp_path / "n1", 4 * MiB, reserve_bytes=0)
    filler = Filler(per_frame=2)
    try:
        for _ in range(FRAMES_MAX):
            try:
                filler.append(node)
            except StorageFull:
                break
        warnings = [r for r in caplog.records if "of its capacity" in r.getMessage() and r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "n1 uses" in warnings[0].getMessage(), [r.getMessage() for r in warnings]
    finally:
        node.close()


# --- an embedded volume -------------------------------------------------------------------------
def value_of(i: int, size: int = 8000) -> bytes:
    stem = b"%06d;" % i
    return (stem * (size // len(stem) + 1))[:size]


def open_volume(path, **options):
    return engine.open(path, durable=False, protection_groups=P, gossip_interval_s=0.05, **options)


def volume_file(path) -> dict:
    with open(os.path.join(path, VOLUME_FILE)) as fh:
        return json.load(fh)


def settled(db) -> bool:
    w = db.status()["writer"]
    return all(link["sent_lsn"] >= w["next_lsn"] - 1 for link in w["links"].values())


def fill(db, acked: dict, prefix: bytes, size: int) -> StorageFull:
    """Put until a put is refused twice (the second time once every node acknowledged all)."""
    from waiting import eventually

    for i in range(PUTS_MAX):
        key = prefix + b"%06d" % i
        try:
            db.put(key, value_of(i, size))
        except StorageFull:
            eventually(lambda: settled(db), "every node acknowledged everything logged")
            try:
                db.put(key, value_of(i, size))
            except StorageFull as e:
                return e
        acked[key] = value_of(i, size)
    raise AssertionError(f"{PUTS_MAX} puts fitted")


def check_reads(db, acked: dict, deleted=frozenset()) -> None:
    for key, value in acked.items():
        assert db.get(key) == (None if key in deleted else value), f"acknowledged write {key!r} lost or wrong"
    assert dict(db.scan()) == {k: v for k, v in acked.items() if k not in deleted}


def test_an_embedded_volume_at_its_maximum_refuses_puts_keeps_deletes_and_a_larger_maximum_resumes_writes(tmp_path):
    """What frees room is deleting data (version collection removes what the deletes hide) or a
    larger maximum (see the module docstring): the fill-delete-put loop holds without a reopen."""
    from waiting import eventually

    from engine.core.placement import protection_group_of

    path = tmp_path / "v"
    acked: dict[bytes, bytes] = {}
    with open_volume(path, max_storage_bytes=4 * MiB) as db:
        assert volume_file(path)["max_storage_bytes"] == 4 * MiB and volume_file(path)["format"] == 1
        fill(db, acked, b"k", 8000)
        refused = fill(db, acked, b"s", 16)
        message = str(refused)
        assert all(n in message for n in NODES) and "Nothing was logged" in message, message
        st = db.status()
        for n in st["nodes"]:
            assert (n["max_storage_bytes"], n["capacity_bytes"]) == (4 * MiB, 4 * MiB), n
            assert n["storage_warning"].startswith(f"node {n['id']} uses"), n
        deleted = set(list(acked)[::3])
        for key in sorted(deleted):
            db.delete(key)  # at the maximum: deletes draw on the reserve
        check_reads(db, acked, deleted)
        vol = db._backend
        P = vol.geometry.protection_groups

        def gone() -> bool:  # every version of every deleted key, tombstones included, on every node
            for node in vol.nodes.values():
                with node.store.env.begin() as txn:
                    cur = txn.cursor(db=node.store._versions)
                    if any(cur.set_key(protection_group_of(k, P).to_bytes(4, "big") + k) for k in deleted):
                        return False
            return True

        eventually(gone, "version collection removed the deleted values and their tombstones")

        def put_fits() -> bool:
            try:
                db.put(b"after-deletes", b"x")
                return True
            except StorageFull:
                return False

        eventually(put_fits, "the pages collection freed count as room: a put fits again")
        acked[b"after-deletes"] = b"x"
        fill(db, acked, b"t", 8000)  # and fills the volume to its maximum again

    with open_volume(path) as db:  # the maximum is the volume's: still 4 MiB, full again after a few puts
        assert {n["max_storage_bytes"] for n in db.status()["nodes"]} == {4 * MiB}
        # (compaction may have packed the tables since, freeing a few pages: fill those)
        for i in range(200):
            try:
                db.put(b"u%06d" % i, value_of(i, 8000))
            except StorageFull:
                break
            acked[b"u%06d" % i] = value_of(i, 8000)
        else:
            raise AssertionError("a volume at its maximum took 200 more puts of 8 KB")
        check_reads(db, acked, deleted)

    recorded = (path / VOLUME_FILE).read_bytes()
    with pytest.raises(InvalidArgument) as e:
        open_volume(path, max_storage_bytes=1 * MiB)
    assert "below it" in str(e.value) and "nothing was changed" in str(e.value), str(e.value)
    assert (path / VOLUME_FILE).read_bytes() == recorded

    with open_volume(path, max_storage_bytes=16 * MiB) as db:
        eventually(lambda: db.status()["writer"]["admission"] == "all", "admission back to all")
        more = {b"after-%03d" % i: value_of(i) for i in range(100)}
        for key, value in more.items():
            db.put(key, value)  # writes resume
        acked.update(more)
        check_reads(db, acked, deleted)
        assert {n["max_storage_bytes"] for n in db.status()["nodes"]} == {16 * MiB}
    assert volume_file(path)["max_storage_bytes"] == 16 * MiB
    with open_volume(path) as db:
        check_reads(db, acked, deleted)


def test_an_embedded_volume_grows_from_a_small_map_and_reads_everything_after_a_reopen(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(growth, "MAP_BYTES_INITIAL", 1 * MiB)
    caplog.set_level(logging.INFO, logger="sixfold.store")
    path = tmp_path / "v"
    acked = {}
    with open_volume(path, max_storage_bytes=256 * MiB) as db:
        for b in range(16):
            with db.batch() as batch:
                for i in range(b * 50, b * 50 + 50):
                    batch.put(b"k%06d" % i, value_of(i))
                    acked[b"k%06d" % i] = value_of(i)
        from waiting import eventually

        eventually(lambda: settled(db), "every node acknowledged everything logged")  # 4 of 6 acknowledge a write
        for n in db.status()["nodes"]:
            assert n["used_bytes"] > 4 * MiB and n["max_storage_bytes"] == 256 * MiB and "storage_warning" not in n, n
        messages = grown(caplog)
        assert all(any(f"node {n}: grew" in m for m in messages) for n in NODES), messages
        check_reads(db, acked)
    with open_volume(path) as db:
        check_reads(db, acked)


@pytest.mark.parametrize("value", [0, -1, True, "1GiB", 1 << 63, 1.0])
def test_engine_open_refuses_a_maximum_out_of_range_and_creates_nothing(tmp_path, value):
    with pytest.raises(InvalidArgument):
        engine.open(tmp_path / "v", max_storage_bytes=value)
    assert not (tmp_path / "v").exists()


def test_engine_open_refuses_a_maximum_above_the_filesystem(tmp_path):
    fs = os.statvfs(tmp_path)
    with pytest.raises(InvalidArgument) as e:
        engine.open(tmp_path / "v", max_storage_bytes=fs.f_blocks * fs.f_frsize + MiB)
    assert "filesystem" in str(e.value)
    assert not (tmp_path / "v").exists()


def test_map_bytes_is_the_older_name_and_the_two_must_agree(tmp_path):
    with pytest.raises(InvalidArgument):
        engine.open(tmp_path / "v", max_storage_bytes=8 * MiB, map_bytes=16 * MiB)
    with open_volume(tmp_path / "v", map_bytes=8 * MiB) as db:
        assert {n["max_storage_bytes"] for n in db.status()["nodes"]} == {8 * MiB}
    assert volume_file(tmp_path / "v")["max_storage_bytes"] == 8 * MiB


# --- formats --------------------------------------------------------------------------------------
def test_a_format_1_volume_without_the_field_opens_with_the_default_and_takes_a_maximum(tmp_path):
    path = str(tmp_path / "volume")
    shutil.copytree(os.path.join(FIXTURES, "volume-format-1"), path)
    original = volume_file(path)
    assert "max_storage_bytes" not in original and original["format"] == 1
    with engine.open(path) as db:
        st = db.status()
        assert {n["max_storage_bytes"] for n in st["nodes"]} == {32 << 30}
        assert dict(db.scan()), "it reads (what the fixture holds is checked by tests/test_formats.py)"
    assert volume_file(path) == original, "opening without a maximum writes nothing new"
    with engine.open(path, max_storage_bytes=64 * MiB) as db:
        assert {n["max_storage_bytes"] for n in db.status()["nodes"]} == {64 * MiB}
    after = volume_file(path)
    assert after == dict(original, max_storage_bytes=64 * MiB), "the field is added, the format stays 1"
    with engine.open(path) as db:
        assert {n["max_storage_bytes"] for n in db.status()["nodes"]} == {64 * MiB}


@pytest.mark.parametrize("bad", [0, True, "1GiB", -5, 1.5])
def test_a_volume_file_with_a_bad_maximum_is_refused(tmp_path, bad):
    path = str(tmp_path / "volume")
    shutil.copytree(os.path.join(FIXTURES, "volume-format-1"), path)
    vol = volume_file(path)
    vol["max_storage_bytes"] = bad
    with open(os.path.join(path, VOLUME_FILE), "w") as fh:
        json.dump(vol, fh)
    with pytest.raises(WrongFolder) as e:
        engine.open(path)
    assert "max_storage_bytes" in str(e.value)


def test_a_format_1_manifest_without_the_field_loads_and_a_bad_one_is_refused(tmp_path):
    folder = str(tmp_path / "c")
    shutil.copytree(os.path.join(FIXTURES, "cluster-format-1"), folder)
    assert "max_storage_bytes" not in load_manifest(folder)
    m = load_manifest(folder)
    validate_manifest(dict(m, max_storage_bytes=10 << 30))
    for bad in (0, True, "10GiB", 1 << 63, 1.0):
        with pytest.raises(WrongFolder) as e:
            validate_manifest(dict(m, max_storage_bytes=bad))
        assert "max_storage_bytes" in str(e.value)


def test_an_append_reply_measures_the_tables_only_now_and_then_and_never_states_more_room_than_there_is(tmp_path, monkeypatch):
    """LMDB's stats of every table (`SegmentStore.usage`) took most of an append's Python time;
    a reply now goes on the last measurement charged with a bound of what was appended since, and
    measures exactly when that is older than USAGE_REFRESH_S, when another transaction committed
    in between, or when the room is below USAGE_EXACT_ROOM_BYTES. The stated room is never more
    than an exact measurement at the same moment."""
    from engine.node import store as store_mod

    node = open_node(tmp_path / "n1", 1 << 30)
    measured = []
    real = store_mod.SegmentStore.usage

    def counting(self):
        measured.append(1)
        return real(self)

    monkeypatch.setattr(store_mod, "USAGE_REFRESH_S", 3600.0)  # the clock never forces one here
    monkeypatch.setattr(store_mod.SegmentStore, "usage", counting)
    filler = Filler(value_bytes=100, per_frame=2)
    try:
        filler.append(node)
        measured.clear()
        for _ in range(50):
            reply = filler.append(node)
            used, held = real(node.store)  # the truth, right after this reply
            capacity = node.store._capacity_bytes
            exact_room = max(0, capacity - used - node.store.reserve_bytes(capacity))
            assert reply.room_bytes <= exact_room, (reply.room_bytes, exact_room)
            assert reply.extent_bytes <= max(0, capacity - held - node.store.reserve_bytes(capacity))
        assert len(measured) <= 1, f"{len(measured)} measurements for 50 appends"
        # A transaction that is not an append (a quarantine, a collection step, a seal) commits:
        # the next reply measures again.
        node.store.count_repaired(1)
        measured.clear()
        filler.append(node)
        assert len(measured) == 1
        # Little room left: every reply measures.
        monkeypatch.setattr(store_mod, "USAGE_EXACT_ROOM_BYTES", 1 << 40)
        measured.clear()
        for _ in range(5):
            filler.append(node)
        assert len(measured) == 5
        filler.check(node)
    finally:
        node.close()
