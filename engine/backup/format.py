"""The backup archive's files: their byte format, their checks, and the manifest.

Theory of operation
-------------------
An archive (one volume's backups, in one `engine.backup.target.BackupTarget`) holds three kinds
of object, each immutable once written::

    manifest/<seq:020>.json            manifest versions; the highest one that checks is current
    segments/<after:020>-<last:020>.sxs   the log: every record in (after, last], in LSN order
    bases/<lsn:020>-<part:04>.sxb         base snapshot parts: the newest version of every live
                                          key at CPL <lsn>, as the nodes store them

Segment and base files (format `FILE_FORMAT` = 1; little-endian)::

    offset size field
    0      4    magic          b"SXBK"
    4      2    format         1
    6      1    kind           1 segment, 2 base part
    7      1    reserved       0
    8      4    meta_len       bytes of the meta (JSON, UTF-8), at most META_BYTES_MAX
    12     8    body_len       bytes of the body, at most BODY_BYTES_MAX
    20     4    meta_crc32c    CRC32C of the meta
    24     4    body_crc32c    CRC32C of the body
    28     4    header_crc32c  CRC32C of bytes [0, 28)
    32     ..   meta, then body: frames (`engine.codec`) back to back

The records are the bytes the nodes hold (each with its own CRC32C, a sealed value on an
encrypted volume): the archive is never plaintext when the volume is not. A segment's records
are in strictly increasing LSN order and continue each protection group's chain of backlinks
from `pg_after` to `pg_last`; a base part's frames each hold the newest versions of some keys
(sorted by LSN within a frame, which the frame format requires).

Every file read back is checked before anything in it is used: header CRC, magic, format, kind,
lengths, both CRCs, the meta's fields and the volume id, then every frame and record CRC as the
body is walked. A failure is `BackupCorrupt` naming the object and what is wrong, never another
exception. The manifest carries a CRC32C of its own canonical JSON (`crc32c`).

Commit times: the writer stamps each unit's request record with its commit time
(`engine.core.constants.REQUEST_TIME_BYTES`); `commit_time_of` reads it back. Rules of this
module: no I/O; codec, constants, errors and the standard library only.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterator

from engine import codec
from engine.core.constants import (
    FLAG_REQUEST,
    FRAME_BYTES_MAX,
    FRAME_HEADER_BYTES,
    LSN_VALID_MAX,
    PROTECTION_GROUPS_MAX,
    REQUEST_DIGEST_BYTES,
    REQUEST_TIME_BYTES,
)
from engine.errors import BackupCorrupt, BackupError, CorruptRecord

MAGIC = b"SXBK"
#: The format of segment and base files this release writes and reads.
FILE_FORMAT = 1
#: The format of the manifest this release writes and reads.
MANIFEST_FORMAT = 1
MANIFEST_KIND = "sixfold-backup"
KIND_SEGMENT = 1
KIND_BASE = 2
KIND_NAMES = {KIND_SEGMENT: "segment", KIND_BASE: "base part"}
_HEADER = struct.Struct("<4sHBBIQIII")
HEADER_BYTES = 32
assert _HEADER.size == HEADER_BYTES
META_BYTES_MAX = 1 << 20
#: A segment or base part holds at most this many body bytes (a writer cuts files far smaller).
BODY_BYTES_MAX = 1 << 30
#: The newest commit time accepted (year 2262: microseconds that fit a signed 64-bit integer).
TIME_US_MAX = (1 << 63) - 1
_FRAME_HEAD = struct.Struct("<IIII")
_TIME = struct.Struct("<Q")
assert _TIME.size == REQUEST_TIME_BYTES

SEGMENTS = "segments/"
BASES = "bases/"
MANIFESTS = "manifest/"
REQUESTS = "requests/"
_SEGMENT_RE = re.compile(r"^segments/(\d{20})-(\d{20})\.sxs$")
_BASE_RE = re.compile(r"^bases/(\d{20})-(\d{4})\.sxb$")
_MANIFEST_RE = re.compile(r"^manifest/(\d{20})\.json$")


# --- names ----------------------------------------------------------------------------------
def segment_name(after_lsn: int, last_lsn: int) -> str:
    return f"{SEGMENTS}{after_lsn:020d}-{last_lsn:020d}.sxs"


def parse_segment_name(name: str) -> tuple[int, int] | None:
    """(after_lsn, last_lsn) of a segment's name, or None if `name` is not one."""
    m = _SEGMENT_RE.match(name)
    if m is None:
        return None
    after, last = int(m.group(1)), int(m.group(2))
    return (after, last) if after < last <= LSN_VALID_MAX else None


def base_part_name(lsn: int, part: int) -> str:
    return f"{BASES}{lsn:020d}-{part:04d}.sxb"


def parse_base_part_name(name: str) -> tuple[int, int] | None:
    m = _BASE_RE.match(name)
    return None if m is None else (int(m.group(1)), int(m.group(2)))


def manifest_name(seq: int) -> str:
    return f"{MANIFESTS}{seq:020d}.json"


def parse_manifest_name(name: str) -> int | None:
    m = _MANIFEST_RE.match(name)
    return None if m is None else int(m.group(1))


# --- commit times ---------------------------------------------------------------------------
def commit_time_of(flags: int, value: bytes) -> int | None:
    """The commit time (microseconds) a request record's value carries, or None: not a request
    record, or one written before commit times existed (its value is the digest alone)."""
    if not flags & FLAG_REQUEST or len(value) != REQUEST_DIGEST_BYTES + REQUEST_TIME_BYTES:
        return None
    return _TIME.unpack_from(value, REQUEST_DIGEST_BYTES)[0]


# --- segment and base files ----------------------------------------------------------------
def encode_file(kind: int, meta: dict, frames: list[bytes]) -> bytes:
    """A whole segment or base file: header, meta, frames."""
    assert kind in KIND_NAMES, kind
    meta_bytes = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
    body = b"".join(frames)
    assert len(meta_bytes) <= META_BYTES_MAX and len(body) <= BODY_BYTES_MAX, (len(meta_bytes), len(body))
    head = _HEADER.pack(MAGIC, FILE_FORMAT, kind, 0, len(meta_bytes), len(body), codec.crc32c(meta_bytes),
                        codec.crc32c(body), 0)[:28]
    return head + struct.pack("<I", codec.crc32c(head)) + meta_bytes + body


def file_crc(data: bytes) -> int:
    """The CRC32C a manifest records for a whole file."""
    return codec.crc32c(data)


def decode_file(name: str, data: bytes, kind: int, volume_id: str | None) -> tuple[dict, memoryview]:
    """(meta, body) of a segment or base file, after checking its header, lengths, CRCs, kind,
    format and (if given) volume id. BackupCorrupt (BackupError for a newer format)."""
    what = f"backup file {name}"
    if len(data) < HEADER_BYTES:
        raise BackupCorrupt(f"{what}: {len(data)} bytes, shorter than its {HEADER_BYTES}-byte header (truncated)")
    magic, fmt, got_kind, reserved, meta_len, body_len, meta_crc, body_crc, header_crc = _HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise BackupCorrupt(f"{what}: not a Sixfold backup file (magic {magic!r})")
    computed = codec.crc32c(data[:28])
    if computed != header_crc:
        raise BackupCorrupt(f"{what}: header CRC mismatch (stored {header_crc:#010x}, computed {computed:#010x})")
    if fmt > FILE_FORMAT:
        raise BackupError(f"{what} has format {fmt}; this release reads format {FILE_FORMAT}: it was written by a "
                          "newer Sixfold release, which can restore it")
    if fmt < 1 or reserved != 0 or got_kind not in KIND_NAMES:
        raise BackupCorrupt(f"{what}: format {fmt}, kind {got_kind}, reserved {reserved}: not a valid header")
    if got_kind != kind:
        raise BackupCorrupt(f"{what}: holds a {KIND_NAMES[got_kind]}, expected a {KIND_NAMES[kind]}")
    if meta_len > META_BYTES_MAX or body_len > BODY_BYTES_MAX or HEADER_BYTES + meta_len + body_len != len(data):
        raise BackupCorrupt(f"{what}: {len(data)} bytes, its header says {HEADER_BYTES} + {meta_len} + {body_len} (truncated or padded)")
    view = memoryview(data)
    meta_bytes = view[HEADER_BYTES:HEADER_BYTES + meta_len]
    body = view[HEADER_BYTES + meta_len:]
    if codec.crc32c(meta_bytes) != meta_crc:
        raise BackupCorrupt(f"{what}: meta CRC mismatch")
    computed = codec.crc32c(body)
    if computed != body_crc:
        raise BackupCorrupt(f"{what}: body CRC mismatch (stored {body_crc:#010x}, computed {computed:#010x})")
    try:
        meta = json.loads(bytes(meta_bytes))
    except ValueError as e:
        raise BackupCorrupt(f"{what}: meta is not JSON ({e})") from None
    problems = (_segment_meta_problems if kind == KIND_SEGMENT else _base_meta_problems)(meta)
    if problems:
        raise BackupCorrupt(f"{what}: meta is not valid: {'; '.join(problems)}")
    if volume_id is not None and meta["volume_id"] != volume_id:
        raise BackupCorrupt(f"{what} belongs to volume {meta['volume_id']}, not {volume_id} (a file of another archive)")
    return meta, body


def iter_frames(name: str, body: memoryview) -> Iterator[list[codec.Record]]:
    """The records of each frame of a body, every frame and record checked (BackupCorrupt)."""
    offset, end = 0, len(body)
    while offset < end:
        if end - offset < FRAME_HEADER_BYTES:
            raise BackupCorrupt(f"backup file {name}: a truncated frame header at body offset {offset}")
        _magic, _count, body_len, _crc = _FRAME_HEAD.unpack_from(body, offset)
        size = FRAME_HEADER_BYTES + body_len
        if size > FRAME_BYTES_MAX or size > end - offset:
            raise BackupCorrupt(f"backup file {name}: the frame at body offset {offset} claims {size} bytes "
                                f"({end - offset} left)")
        try:
            records = codec.decode_frame(bytes(body[offset:offset + size]))
        except CorruptRecord as e:
            raise BackupCorrupt(f"backup file {name}: frame at body offset {offset}: {e}") from None
        yield records
        offset += size


# --- meta checks ----------------------------------------------------------------------------
def _is_lsn(v) -> bool:
    return type(v) is int and 0 <= v <= LSN_VALID_MAX


def _is_time(v) -> bool:
    return type(v) is int and 0 <= v <= TIME_US_MAX


def _lsn_list(v) -> bool:
    return isinstance(v, list) and 1 <= len(v) <= PROTECTION_GROUPS_MAX and all(_is_lsn(x) for x in v)


def _common_problems(meta, fields) -> list[str]:
    if not isinstance(meta, dict):
        return [f"a JSON {type(meta).__name__}, not an object"]
    problems = [f"no {k}" for k in fields if k not in meta]
    if problems:
        return problems
    if not isinstance(meta["volume_id"], str) or not meta["volume_id"]:
        problems.append("volume_id is not a string")
    return problems


def _segment_meta_problems(meta) -> list[str]:
    problems = _common_problems(meta, ("volume_id", "after_lsn", "last_lsn", "pg_after", "pg_last", "records", "epoch",
                                       "first_time_us", "last_time_us", "complete_through_us"))
    if problems:
        return problems
    if not (_is_lsn(meta["after_lsn"]) and _is_lsn(meta["last_lsn"]) and meta["after_lsn"] < meta["last_lsn"]):
        problems.append("after_lsn/last_lsn are not LSNs with after < last")
    if not (_lsn_list(meta["pg_after"]) and _lsn_list(meta["pg_last"]) and len(meta["pg_after"]) == len(meta["pg_last"])):
        problems.append("pg_after/pg_last are not lists of LSNs, one per protection group")
    if not (type(meta["records"]) is int and 1 <= meta["records"]):
        problems.append("records is not a positive count")
    if not (type(meta["epoch"]) is int and meta["epoch"] >= 0):
        problems.append("epoch is not a count")
    for k in ("first_time_us", "last_time_us"):
        if meta[k] is not None and not _is_time(meta[k]):
            problems.append(f"{k} is not a time")
    if not _is_time(meta["complete_through_us"]):
        problems.append("complete_through_us is not a time")
    return problems


def _base_meta_problems(meta) -> list[str]:
    problems = _common_problems(meta, ("volume_id", "lsn", "part", "records"))
    if problems:
        return problems
    if not _is_lsn(meta["lsn"]):
        problems.append("lsn is not an LSN")
    if not (type(meta["part"]) is int and 0 <= meta["part"] < 10_000):
        problems.append("part is not a part number")
    if not (type(meta["records"]) is int and meta["records"] >= 0):
        problems.append("records is not a count")
    return problems


# --- the manifest ---------------------------------------------------------------------------
def _canonical(m: dict) -> bytes:
    return json.dumps({k: v for k, v in m.items() if k != "crc32c"}, sort_keys=True, separators=(",", ":")).encode()


def encode_manifest(m: dict) -> bytes:
    m = dict(m, format=MANIFEST_FORMAT, kind=MANIFEST_KIND)
    m["crc32c"] = codec.crc32c(_canonical(m))
    return (json.dumps(m, indent=1, sort_keys=True) + "\n").encode()


def decode_manifest(name: str, data: bytes) -> dict:
    """A manifest version, checked (its CRC, format, kind and every field). BackupCorrupt, or
    BackupError for a newer format."""
    what = f"backup manifest {name}"
    try:
        m = json.loads(data)
    except ValueError as e:
        raise BackupCorrupt(f"{what} is not JSON ({e})") from None
    if not isinstance(m, dict) or m.get("kind") != MANIFEST_KIND:
        raise BackupCorrupt(f"{what} is not a Sixfold backup manifest")
    fmt = m.get("format")
    if type(fmt) is int and fmt > MANIFEST_FORMAT:
        raise BackupError(f"{what} has format {fmt}; this release reads format {MANIFEST_FORMAT}: the archive was "
                          "written by a newer Sixfold release")
    if fmt != MANIFEST_FORMAT:
        raise BackupCorrupt(f"{what}: format {fmt!r} is not one any release wrote")
    if m.get("crc32c") != codec.crc32c(_canonical(m)):
        raise BackupCorrupt(f"{what}: CRC mismatch (the file was changed or damaged)")
    problems = manifest_problems(m)
    if problems:
        raise BackupCorrupt(f"{what} is not valid: {'; '.join(problems)}")
    return m


def manifest_problems(m: dict) -> list[str]:
    problems = [f"no {k}" for k in ("seq", "volume_id", "protection_groups", "encryption", "epoch", "written_us",
                                    "position", "bases", "retention_days") if k not in m]
    if problems:
        return problems
    if not isinstance(m["volume_id"], str) or not m["volume_id"]:
        problems.append("volume_id is not a string")
    if not (type(m["protection_groups"]) is int and 1 <= m["protection_groups"] <= PROTECTION_GROUPS_MAX):
        problems.append("protection_groups is not a geometry")
    if m["encryption"] is not None and not isinstance(m["encryption"], dict):
        problems.append("encryption is not a descriptor")
    if not (type(m["seq"]) is int and m["seq"] >= 1 and type(m["epoch"]) is int and m["epoch"] >= 0):
        problems.append("seq/epoch are not counts")
    if not _is_time(m["written_us"]):
        problems.append("written_us is not a time")
    if m["retention_days"] is not None and not (isinstance(m["retention_days"], (int, float)) and m["retention_days"] > 0):
        problems.append("retention_days is not a positive number")
    pos = m["position"]
    if not (isinstance(pos, dict) and _is_lsn(pos.get("lsn")) and _lsn_list(pos.get("pg_last"))
            and (pos.get("time_us") is None or _is_time(pos.get("time_us"))) and _is_time(pos.get("complete_through_us"))):
        problems.append("position is not {lsn, pg_last, time_us, complete_through_us}")
    elif len(pos["pg_last"]) != m["protection_groups"]:
        problems.append("position.pg_last has not one LSN per protection group")
    if not isinstance(m["bases"], list):
        problems.append("bases is not a list")
    else:
        for i, b in enumerate(m["bases"]):
            p = _base_entry_problems(b, m.get("protection_groups"))
            if p:
                problems.append(f"bases[{i}]: {', '.join(p)}")
    return problems


def _base_entry_problems(b, pgs) -> list[str]:
    if not isinstance(b, dict):
        return ["not an object"]
    problems = [f"no {k}" for k in ("lsn", "time_us", "pg_tails", "parts", "records", "bytes", "written_us") if k not in b]
    if problems:
        return problems
    if not _is_lsn(b["lsn"]) or not (b["time_us"] is None or _is_time(b["time_us"])) or not _is_time(b["written_us"]):
        problems.append("lsn/time_us/written_us out of range")
    if not _lsn_list(b["pg_tails"]) or len(b["pg_tails"]) != pgs:
        problems.append("pg_tails is not one LSN per protection group")
    if not isinstance(b["parts"], list) or not all(
        isinstance(p, dict) and isinstance(p.get("name"), str) and parse_base_part_name(p["name"]) is not None
        and type(p.get("bytes")) is int and type(p.get("crc32c")) is int for p in b["parts"]
    ):
        problems.append("parts is not a list of {name, bytes, crc32c}")
    return problems
