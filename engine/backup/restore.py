"""Point-in-time restore: a new volume from an archive, holding exactly the writes up to a point.

Theory of operation
-------------------
`restore(backup, into, to_time=T | to_lsn=L)`:

1. *Read the manifest* (the newest version that checks) and choose the point. A restore cuts
   only between atomic units, at a CPL. To a time T: the units whose commit time (the writer's
   stamp in the unit's request record; a unit without one takes the newest time before it) is at
   or below T. Every write acknowledged before T was stamped before it was acknowledged, so it
   is kept; a write invoked after T was stamped after, so it is not; a write whose call spans T
   may go either way. T must lie in the restore window: at or after the oldest base's time, at
   or before the time the archive is *complete through* (everything acknowledged before it is
   archived). To an LSN L: the units whose CPL is at or below L. Outside the window: BackupError
   naming it.
2. *The base*: the newest base at or before the point. Its parts are read and checked against
   the manifest's byte count and CRC, then each file's own checks (`engine.backup.format`).
3. *The log*: the segments from the base's LSN on, in order, each checked, each record required
   to continue its protection group's chain of backlinks. A missing or damaged file the restore
   needs is BackupCorrupt, and nothing is left behind.
4. *Build*: a new embedded volume (a new volume id; encrypted under `new_key`, or under `key`
   when the archive is encrypted and no new key is given; plain otherwise) in a temporary folder
   beside `into`, filled through the embedded engine's bulk path (`EmbeddedVolume.bulk_load`:
   frames appended to all six segments through the nodes' own append, then a recovery), then
   closed and renamed to `into`. With `cluster=True` the folder is laid out as a stopped cluster
   (`cluster.json`, `nodes/az-x/nY`): `sixfold cluster up --cluster INTO` starts it.

An encrypted archive is opened with the source volume's master key (`key`): values are unsealed
with the source's data key (its volume id, PG and LSN are in each seal's associated data) and
sealed again by the new volume's writer with its own. Progress goes to `progress(dict)`.
"""

from __future__ import annotations

import heapq
import json
import logging
import os
import shutil
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from engine.backup.archiver import load_current_manifest
from engine.backup.format import (
    KIND_BASE,
    KIND_SEGMENT,
    SEGMENTS,
    commit_time_of,
    decode_file,
    file_crc,
    iter_frames,
    parse_segment_name,
)
from engine.backup.target import BackupTarget, target_of
from engine.core.constants import EXPIRES_BYTES, FLAG_CPL, FLAG_DELETE, FLAG_EXPIRES, FLAG_PUT, FLAG_REQUEST
from engine.embedded import EmbeddedOptions, EmbeddedVolume, read_volume_file
from engine.envelope import VolumeCipher, load_master_key, unwrap
from engine.errors import BackupCorrupt, BackupError, EncryptionError, SixfoldError
from engine.files import atomic_write, fsync_folder

#: an expiring put's deadline, the first bytes of its stored value (node format 4)
_DEADLINE = struct.Struct("<Q")
log = logging.getLogger("sixfold.backup")

RESTORING_SUFFIX = ".restoring"


@dataclass(frozen=True)
class RestorePoint:
    """Where a restore cuts: the base it starts from and the bound it replays to."""

    base: dict
    to_time_us: int | None
    to_lsn: int | None


def time_to_us(t) -> int:
    """A time given as a datetime or seconds since the epoch, in microseconds."""
    if hasattr(t, "timestamp"):
        return int(round(t.timestamp() * 1_000_000))
    if isinstance(t, (int, float)) and not isinstance(t, bool):
        return int(round(t * 1_000_000))
    raise BackupError(f"a restore time is a datetime or seconds since the epoch, not {type(t).__name__}")


def fmt_time(us: int | None) -> str:
    if us is None:
        return "-"
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(us / 1e6)) + f".{us % 1_000_000:06d}Z"


# --- reading the archive ----------------------------------------------------------------------
class Archive:
    """An archive opened for reading: its manifest and segments, every file checked on read."""

    def __init__(self, backup) -> None:
        self.target: BackupTarget = target_of(backup)
        m, _highest, self.manifest_problems = load_current_manifest(self.target)
        if m is None:
            raise BackupError(f"{self.target.describe()} holds no backup (no manifest)")
        self.manifest = m
        self.volume_id: str = m["volume_id"]
        self.P: int = m["protection_groups"]
        self.segments = sorted((parse_segment_name(n), n) for n in self.target.list(SEGMENTS) if parse_segment_name(n))
        self._later_meta: dict | None = None

    @property
    def bases(self) -> list[dict]:
        return self.manifest["bases"]

    def latest(self) -> tuple[int, int]:
        """(LSN, complete-through time) of the newest restore point: the manifest's position,
        or a segment written after it (a crash between a segment and its manifest version)."""
        pos = self.manifest["position"]
        lsn, complete = pos["lsn"], pos["complete_through_us"]
        for (after, last), name in self.segments:
            if after == lsn and last > lsn:
                try:
                    meta, _ = decode_file(name, self.target.read(name), KIND_SEGMENT, self.volume_id)
                except BackupCorrupt:
                    break
                lsn, complete = last, max(complete, meta["complete_through_us"])
        return lsn, complete

    def window(self) -> dict:
        """The restore window: the oldest and newest points a restore may cut at."""
        lsn, complete = self.latest()
        bases = self.bases
        return {"oldest_lsn": bases[0]["lsn"] if bases else None,
                "oldest_time_us": bases[0]["time_us"] if bases else None,
                "latest_lsn": lsn if bases else None, "latest_time_us": complete if bases else None}

    def read_base(self, base: dict):
        """Yield (pg, lsn, key, value) of every version in a base, each part checked."""
        for part in base["parts"]:
            data = self.target.read(part["name"])
            if len(data) != part["bytes"] or file_crc(data) != part["crc32c"]:
                raise BackupCorrupt(f"backup file {part['name']}: {len(data)} bytes with CRC {file_crc(data):#010x}, "
                                    f"the manifest records {part['bytes']} bytes with CRC {part['crc32c']:#010x}")
            meta, body = decode_file(part["name"], data, KIND_BASE, self.volume_id)
            if meta["lsn"] != base["lsn"]:
                raise BackupCorrupt(f"backup file {part['name']} is a part of the base at LSN {meta['lsn']}, not {base['lsn']}")
            n = 0
            for records in iter_frames(part["name"], body):
                for r in records:
                    if r.lsn > base["lsn"] or r.pg >= self.P or not r.flags & FLAG_PUT:
                        raise BackupCorrupt(f"backup file {part['name']}: record {r.lsn} (PG {r.pg}) does not belong "
                                            f"in a base at LSN {base['lsn']}")
                    n += 1
                    yield r.pg, r.lsn, r.flags, r.key, r.value
            if n != meta["records"]:
                raise BackupCorrupt(f"backup file {part['name']} holds {n} records, its meta says {meta['records']}")

    def chain_after(self, lsn: int):
        """Yield (name, meta, records in LSN order) of the segments that continue the log from
        `lsn`, in order, each checked; stops where no segment continues it."""
        pos = lsn
        while True:
            nxt = [(a, l, n) for (a, l), n in self.segments if a <= pos < l]
            if not nxt:
                return
            nxt.sort(key=lambda s: (s[0] != pos, -s[1]))  # one that starts exactly here, the longest
            # Segments may overlap (two archivers, or one that died between a segment and its
            # manifest): one LSN names one record for ever, so any of them serves. A damaged one
            # is passed over for the next (verify still reports it); all damaged: the first error.
            first_error: BackupCorrupt | None = None
            for after, last, name in nxt:
                try:
                    meta, records = self._read_segment(name, after, last)
                    break
                except BackupCorrupt as e:
                    if first_error is None:
                        first_error = e
                    log.warning("restore: passing over %s, another segment covers LSN %d: %s", name, pos, e)
            else:
                raise first_error
            yield name, meta, records
            pos = last

    def _read_segment(self, name: str, after: int, last: int):
        """(meta, records in LSN order) of segment `name`, every check made (BackupCorrupt)."""
        meta, body = decode_file(name, self.target.read(name), KIND_SEGMENT, self.volume_id)
        if (meta["after_lsn"], meta["last_lsn"]) != (after, last) or len(meta["pg_after"]) != self.P:
            raise BackupCorrupt(f"backup file {name}: its meta says ({meta['after_lsn']}, {meta['last_lsn']}] for "
                                f"{len(meta['pg_after'])} PGs, its name and the archive say ({after}, {last}] for {self.P}")
        per_pg = list(iter_frames(name, body))
        records = list(heapq.merge(*per_pg, key=lambda r: r.lsn))
        if len(records) != meta["records"]:
            raise BackupCorrupt(f"backup file {name} holds {len(records)} records, its meta says {meta['records']}")
        if not records or records[-1].lsn != last or not records[-1].flags & FLAG_CPL:
            raise BackupCorrupt(f"backup file {name} does not end with the CPL record {last}")
        return meta, records


def _source_cipher(archive: Archive, key) -> VolumeCipher | None:
    d = archive.manifest["encryption"]
    if d is None:
        if key is not None:
            raise EncryptionError(f"the backup of volume {archive.volume_id} is not encrypted: restore it without its "
                                  "key (give new_key / --into-key-file to encrypt the new volume)")
        return None
    if key is None:
        raise EncryptionError(f"the backup of volume {archive.volume_id} is encrypted: give the volume's master key "
                              "(key=..., --key-file)")
    return VolumeCipher(unwrap(d, load_master_key(key), archive.volume_id), archive.volume_id)


def choose_point(archive: Archive, to_time_us: int | None, to_lsn: int | None) -> RestorePoint:
    """The base and bound of a restore, or BackupError naming the window."""
    bases = archive.bases
    if not bases:
        raise BackupError(f"the archive in {archive.target.describe()} has no base snapshot yet: nothing to restore from")
    w = archive.window()
    window = (f"the restore window is LSN {w['oldest_lsn']} ({fmt_time(w['oldest_time_us'])}) to LSN {w['latest_lsn']} "
              f"({fmt_time(w['latest_time_us'])})")
    if to_time_us is not None and to_lsn is not None:
        raise BackupError("restore to a time or to an LSN, not both")
    if to_lsn is not None:
        if not isinstance(to_lsn, int) or isinstance(to_lsn, bool) or to_lsn < 0:
            raise BackupError(f"restore LSN {to_lsn!r} is not an LSN")
        if to_lsn > w["latest_lsn"]:
            raise BackupError(f"LSN {to_lsn} is beyond the archive: {window}")
        usable = [b for b in bases if b["lsn"] <= to_lsn]
        if not usable:
            raise BackupError(f"LSN {to_lsn} is before the oldest base snapshot: {window}")
        return RestorePoint(usable[-1], None, to_lsn)
    if to_time_us is None:
        return RestorePoint(bases[-1], None, w["latest_lsn"])
    if to_time_us > w["latest_time_us"]:
        raise BackupError(f"time {fmt_time(to_time_us)} is after the newest restore point (writes acknowledged after "
                          f"{fmt_time(w['latest_time_us'])} may not be archived yet): {window}")
    usable = [b for b in bases if b["time_us"] is None or b["time_us"] <= to_time_us]
    if not usable:
        raise BackupError(f"time {fmt_time(to_time_us)} is before the oldest base snapshot: {window}")
    return RestorePoint(usable[-1], to_time_us, None)


def restore(
    backup,
    into: str | os.PathLike,
    *,
    to_time=None,
    to_lsn: int | None = None,
    key=None,
    new_key=None,
    cluster: bool = False,
    base_port: int | None = None,
    key_file: str | None = None,
    protection_groups: int | None = None,
    durable: bool = True,
    progress: Callable[[dict], None] | None = None,
) -> dict:
    """Restore the archive `backup` (a folder or a BackupTarget) into a new volume at `into`
    (missing or empty), to `to_time` (a datetime or seconds since the epoch) or `to_lsn`, or
    to the newest point. See the module docstring. Returns what was restored (the new volume
    id, the cut, counts, seconds). BackupError / BackupCorrupt / EncryptionError, with nothing
    left at `into`."""
    t0 = time.monotonic()
    into = os.path.abspath(os.fspath(into))
    if os.path.exists(into) and (not os.path.isdir(into) or os.listdir(into)):
        raise BackupError(f"restore into {into}: it exists and is not an empty folder (a restore builds a new volume)")
    archive = Archive(backup)
    source = _source_cipher(archive, key)
    point = choose_point(archive, None if to_time is None else time_to_us(to_time), to_lsn)
    target_key = new_key if new_key is not None else key if source is not None else None
    if cluster and target_key is not None and key_file is None:
        raise BackupError("an encrypted cluster needs the file of its master key: give key_file (--into-key-file)")
    work = into + RESTORING_SUFFIX
    if os.path.exists(work):
        marker = os.path.join(work, "restore.json")
        if not os.path.exists(marker):
            raise BackupError(f"{work} exists and is not a restore's work folder: remove it or restore elsewhere")
        shutil.rmtree(work)  # a restore that did not finish
    os.makedirs(os.path.join(work, "volume"))
    atomic_write(os.path.join(work, "restore.json"), json.dumps({"backup": archive.target.describe(), "pid": os.getpid()}).encode())
    try:
        result = _build(archive, point, source, os.path.join(work, "volume"), target_key,
                        protection_groups or archive.P, durable, progress)
        built = os.path.join(work, "volume")
        if cluster:
            built = _as_cluster(work, result, base_port, key_file)
        if os.path.exists(into):
            os.rmdir(into)
        os.rename(built, into)
        fsync_folder(os.path.dirname(into))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result.update(path=into, cluster=cluster, seconds=round(time.monotonic() - t0, 3))
    result["mb_per_s"] = round(result["live_bytes"] / 1e6 / max(result["seconds"], 1e-9), 2)
    log.info("restored volume %s (from %s, cut at LSN %d) into %s: %d keys, %.1f MB, %.1f s",
             result["volume_id"], archive.volume_id, result["cut_lsn"], into, result["keys"], result["live_bytes"] / 1e6,
             result["seconds"])
    return result


def _build(archive: Archive, point: RestorePoint, source: VolumeCipher | None, folder: str, target_key,
           protection_groups: int, durable: bool, progress) -> dict:
    """Replay the log after the base to the cut into an overlay (the newest op of every key it
    touches), then stream the base with the overlay applied, and the overlay's new keys, into a
    new volume through the bulk path. Memory: the overlay, i.e. the log since the base."""
    base = point.base
    report = {"phase": "log", "base_lsn": base["lsn"], "records": 0, "bytes": 0, "cut_lsn": base["lsn"]}
    last_report = [time.monotonic()]

    def tick(force: bool = False) -> None:
        if progress is not None and (force or time.monotonic() - last_report[0] >= 0.5):
            last_report[0] = time.monotonic()
            progress(dict(report))

    def plain(pg: int, lsn: int, flags: int, key: bytes, value: bytes) -> tuple[bytes, bytes, int]:
        """(key, value, deadline or 0) of a stored put: opened on an encrypted volume, its
        deadline (flag EXPIRES: the value's first bytes, outside the seal) kept apart."""
        deadline = 0
        if flags & FLAG_EXPIRES:
            deadline, value = _DEADLINE.unpack_from(value)[0], value[EXPIRES_BYTES:]
        if source is None:
            return key, value, deadline
        try:
            return (*source.open(pg, lsn, key, value), deadline)
        except SixfoldError as e:
            raise BackupCorrupt(f"record {lsn} (PG {pg}) of the backup does not open with the volume's key: {e}") from None

    # 1. The log, unit by unit, to the cut: overlay[stored key] = (key, value) or None (deleted).
    overlay: dict[bytes, tuple[bytes, bytes] | None] = {}
    pg_last = list(base["pg_tails"])
    pos = base["lsn"]
    time_us = base["time_us"] or 0
    cut_time = base["time_us"]
    done = point.to_lsn is not None and pos >= point.to_lsn
    unit: list = []
    segments = 0
    for name, _meta, records in ([] if done else archive.chain_after(pos)):
        segments += 1
        for r in records:
            if r.lsn <= pos:
                continue  # an overlapping segment (two archivers): already applied
            if r.pg >= archive.P or r.prev_lsn != pg_last[r.pg]:
                raise BackupCorrupt(f"backup file {name}: record {r.lsn} (PG {r.pg}) links to {r.prev_lsn}, the "
                                    f"chain is at {pg_last[r.pg] if r.pg < archive.P else '?'}: a segment is missing")
            pg_last[r.pg] = r.lsn
            unit.append(r)
            if not r.flags & FLAG_CPL:
                continue
            stamp = commit_time_of(r.flags, r.value)
            unit_time = max(time_us, stamp) if stamp is not None else time_us
            if (point.to_lsn is not None and r.lsn > point.to_lsn) or (
                    point.to_time_us is not None and unit_time > point.to_time_us):
                done = True
                break
            for op in unit:  # the unit is whole: apply it
                if op.flags & FLAG_REQUEST:
                    continue
                overlay[op.key] = None if op.flags & FLAG_DELETE else plain(op.pg, op.lsn, op.flags, op.key, op.value)
                report["records"] += 1
            unit = []
            pos, time_us = r.lsn, unit_time
            if stamp is not None:
                cut_time = unit_time
            report["cut_lsn"] = pos
            tick()
        if point.to_lsn is not None and pos >= point.to_lsn:
            done = True  # the next segment is not needed (not even read)
        if done:
            break
    if point.to_lsn is not None and not done and pos < point.to_lsn:
        raise BackupCorrupt(f"the archive's log stops at LSN {pos} (a segment after it is missing or damaged); "
                            f"LSN {point.to_lsn} was asked for")
    if point.to_time_us is not None and not done and pos < archive.latest()[0]:
        raise BackupCorrupt(f"the archive's log stops at LSN {pos} (a segment after it is missing or damaged)")

    # 2. The base with the overlay over it, then the keys the log created: one pass, each key once.
    counts = {"keys": 0, "live_bytes": 0}

    def pairs():
        report["phase"] = "base"
        for pg, lsn, flags, key, value in archive.read_base(base):
            if key in overlay:
                continue
            k, v, deadline = plain(pg, lsn, flags, key, value)
            counts["keys"] += 1
            counts["live_bytes"] += len(k) + len(v)
            report["records"] += 1
            report["bytes"] = counts["live_bytes"]
            tick()
            yield (k, v, deadline) if deadline else (k, v)
        report["phase"] = "log"
        for kv in overlay.values():
            if kv is not None:
                counts["keys"] += 1
                counts["live_bytes"] += len(kv[0]) + len(kv[1])
                report["bytes"] = counts["live_bytes"]
                yield kv if kv[2] else kv[:2]

    # No gossip or scrub while it is filled: every node gets every frame, and nothing else runs.
    volume = EmbeddedVolume(folder, EmbeddedOptions(protection_groups=protection_groups, durable=durable,
                                                    encryption_key=target_key, gossip_interval_s=0))
    try:
        volume.bulk_load(pairs())
        report.update(phase="done", keys=counts["keys"], bytes=counts["live_bytes"])
        tick(True)
        return {"volume_id": volume.volume_id, "source_volume_id": archive.volume_id, "base_lsn": base["lsn"],
                "cut_lsn": pos, "cut_time_us": cut_time, "segments": segments, "records": report["records"],
                "keys": counts["keys"], "live_bytes": counts["live_bytes"], "encrypted": volume.cipher is not None,
                "protection_groups": protection_groups}
    finally:
        volume.close()


def _as_cluster(work: str, result: dict, base_port: int | None, key_file: str | None) -> str:
    """Lay the restored volume out as a stopped cluster folder; returns its path."""
    from engine.cluster.manifest import BASE_PORT_DEFAULT, ENCRYPTED_MANIFEST_FORMAT, new_manifest, save_manifest

    src = os.path.join(work, "volume")
    vol = read_volume_file(src)
    dst = os.path.join(work, "cluster")
    m = new_manifest(base_port=BASE_PORT_DEFAULT if base_port is None else base_port, protection_groups=vol["protection_groups"],
                     volume_id=vol["volume_id"], tls=True)
    for n in m["nodes"]:
        os.makedirs(os.path.dirname(os.path.join(dst, n["data"])), exist_ok=True)
        os.rename(os.path.join(src, f"az-{n['az']}", n["id"]), os.path.join(dst, n["data"]))
    if vol.get("encryption") is not None:
        m["encryption"] = vol["encryption"]
        m["key_file"] = os.path.abspath(key_file)
        m["format"] = ENCRYPTED_MANIFEST_FORMAT
    save_manifest(dst, m)
    return dst


# --- verify -----------------------------------------------------------------------------------
def verify(backup, progress: Callable[[dict], None] | None = None) -> dict:
    """Read back every file of an archive and check it: every manifest version, every base part
    (against the manifest's size and CRC, then its own checks), every segment (its own checks,
    and that the segments form one chain of LSNs and backlinks from the oldest base to the
    newest). Returns {"ok", "problems": [...], "files", "bytes", ...}; never raises for a damaged
    file (BackupError only when there is no archive at all)."""
    from engine.backup.format import MANIFESTS, BASES, decode_manifest, parse_base_part_name, parse_manifest_name

    target = target_of(backup)
    problems: list[str] = []
    files = total = 0
    manifests = [n for n in target.list(MANIFESTS) if parse_manifest_name(n) is not None]
    if not manifests and not target.list(SEGMENTS) and not target.list(BASES):
        raise BackupError(f"{target.describe()} holds no backup")
    for name in manifests:
        files += 1
        try:
            data = target.read(name)
            total += len(data)
            decode_manifest(name, data)
        except BackupError as e:
            problems.append(str(e))
    try:
        archive = Archive(target)
    except BackupError as e:
        return {"ok": False, "problems": problems + [str(e)], "files": files, "bytes": total}
    listed = set()
    for b in archive.bases:
        for part in b["parts"]:
            listed.add(part["name"])
            files += 1
            try:
                for _ in archive.read_base({**b, "parts": [part]}):
                    pass
                total += part["bytes"]
            except BackupError as e:
                problems.append(str(e))
            if progress is not None:
                progress({"phase": "bases", "files": files, "bytes": total})
    for name in target.list(BASES):
        if name not in listed and parse_base_part_name(name) is not None:
            lsn = parse_base_part_name(name)[0]
            if not any(b["lsn"] == lsn for b in archive.bases):
                problems.append(f"backup file {name} is a part of no base the manifest lists (an interrupted base; "
                                "harmless, removed by retention)")
    # The segments: each checked, and one chain from the oldest base on.
    oldest = archive.bases[0]["lsn"] if archive.bases else None
    pos = oldest
    pg_last = list(archive.bases[0]["pg_tails"]) if archive.bases else None
    for (after, last), name in archive.segments:
        files += 1
        try:
            data = target.read(name)
            total += len(data)
            meta, body = decode_file(name, data, KIND_SEGMENT, archive.volume_id)
            per_pg = list(iter_frames(name, body))
            records = list(heapq.merge(*per_pg, key=lambda r: r.lsn))
            if (meta["after_lsn"], meta["last_lsn"]) != (after, last) or len(records) != meta["records"]:
                raise BackupCorrupt(f"backup file {name}: its meta disagrees with its name or its records")
            if pos is None or last <= pos:
                continue  # below the oldest base: not needed by any restore point
            if after > pos:
                problems.append(f"the archive's log has a gap: no segment holds LSNs ({pos}, {after}] (before {name})")
                pos, pg_last = last, list(meta["pg_last"])
                continue
            for r in records:
                if r.lsn <= pos:
                    continue
                if r.pg >= archive.P or r.prev_lsn != pg_last[r.pg]:
                    raise BackupCorrupt(f"backup file {name}: record {r.lsn} (PG {r.pg}) links to {r.prev_lsn}, the "
                                        f"chain is at {pg_last[r.pg] if r.pg < archive.P else '?'}")
                pg_last[r.pg] = r.lsn
            pos = last
        except BackupError as e:
            problems.append(str(e))
        if progress is not None:
            progress({"phase": "segments", "files": files, "bytes": total})
    latest_lsn, latest_us = archive.latest()
    if archive.bases and pos is not None and pos < latest_lsn:
        problems.append(f"the archive's log stops at LSN {pos}; the manifest's position is {latest_lsn}")
    w = archive.window()
    return {"ok": not problems, "problems": problems, "files": files, "bytes": total, "volume_id": archive.volume_id,
            "bases": len(archive.bases), "segments": len(archive.segments), **w}
