"""Segment codec, pure-Python reference. This module is the specification of the byte format.

Theory of operation
-------------------
Records travel and rest as bytes. A *record* is one redo entry of one protection group; a *frame*
is a header followed by records in strictly increasing LSN order: one frame per flush carries
many records, so one gRPC message and one LMDB transaction carry many records. Storage nodes keep
each record's bytes unchanged in LMDB, so the CRC written by the head is the CRC checked at rest
by scrub, on every read and before repair copies a record to a peer.

Record layout (little-endian, 36-byte header)::

    offset size field
    0      4    crc32c      CRC32C of bytes [4, total_len): everything after this field
    4      4    total_len   36 + key_len + value_len
    8      8    lsn         >= 1
    16     8    prev_lsn    backlink: previous LSN of the same PG (0 for the first); < lsn
    24     4    pg          protection group
    28     1    flags       exactly one of PUT (1) / DELETE (2), optionally CPL (4), REQUEST (8),
                            EXPIRES (16, on a PUT only: the value's first 8 bytes are its deadline)
    29     1    reserved    0
    30     2    key_len     1 ..= KEY_BYTES_MAX
    32     4    value_len   0 ..= VALUE_BYTES_MAX; 0 for DELETE
    36     ..   key, then value

Frame layout (little-endian, 16-byte header)::

    0      4    magic       b"SXF1"
    4      4    count       number of records, 0 ..= FRAME_RECORDS_MAX
    8      4    body_len    bytes after the header: the records, back to back
    12     4    header_crc  CRC32C of bytes [0, 12)

Rules of this module: no I/O, no state. Every public function has a twin of the same name in the
Cython extension (`ext/_codec.pyx`) that returns equal values and raises the same exception
classes with the same messages, for any input bytes. Decoding trusts nothing: every length, every
field's meaning and every CRC is checked, and a bad frame is rejected whole with `CorruptRecord`.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

import google_crc32c

from engine.core.constants import (
    EXPIRES_BYTES,
    FLAG_CPL,
    FLAG_DELETE,
    FLAG_EXPIRES,
    FLAG_PUT,
    FLAGS_KNOWN,
    FRAME_BYTES_MAX,
    FRAME_HEADER_BYTES,
    FRAME_MAGIC,
    FRAME_RECORDS_MAX,
    KEY_BYTES_MAX,
    LSN_MAX,
    PG_MAX,
    RECORD_HEADER_BYTES,
    VALUE_BYTES_MAX,
)
from engine.errors import CorruptRecord, InvalidArgument

_RECORD_HEADER = struct.Struct("<IIQQIBBHI")
_FRAME_HEADER = struct.Struct("<IIII")
_LOG_KEY = struct.Struct(">IQ")
_PG_PREFIX = struct.Struct(">I")
assert _RECORD_HEADER.size == RECORD_HEADER_BYTES
assert _FRAME_HEADER.size == FRAME_HEADER_BYTES


class Record(NamedTuple):
    """One decoded log record (Python objects)."""

    lsn: int
    prev_lsn: int
    pg: int
    flags: int
    key: bytes
    value: bytes


class IndexedRecord(NamedTuple):
    """What a storage node needs to persist one record of a frame, built without a Record.

    `log_key` is `pg (u32 BE) | lsn (u64 BE)`, the key of the log table; `version_key` is
    `pg (u32 BE) | key`, the key of the version index, whose duplicate values are `log_key[4:]`
    (the LSN big-endian, so LMDB's byte order is LSN order); `record` is the record's bytes."""

    pg: int
    lsn: int
    prev_lsn: int
    flags: int
    log_key: bytes
    version_key: bytes
    record: bytes


def crc32c(data: bytes | bytearray | memoryview, value: int = 0) -> int:
    """CRC32C (Castagnoli) of `data`, continuing from `value`; hardware-accelerated."""
    return google_crc32c.extend(value, bytes(data)) if value else google_crc32c.value(bytes(data))


def log_key(pg: int, lsn: int) -> bytes:
    """Key of a record in a node's log table: ordered by PG, then LSN."""
    return _LOG_KEY.pack(pg, lsn)


def version_key(pg: int, key: bytes) -> bytes:
    """Key of a user key in a node's version index."""
    return _PG_PREFIX.pack(pg) + key


def _check_fields(lsn: int, prev_lsn: int, pg: int, flags: int, key, value) -> None:
    """Validate the fields of a record to be encoded; raises InvalidArgument."""
    if not isinstance(key, bytes) or not isinstance(value, bytes):
        raise InvalidArgument("key and value must be bytes")
    if not 1 <= lsn <= LSN_MAX:
        raise InvalidArgument(f"lsn {lsn} out of range 1..{LSN_MAX}")
    if not 0 <= prev_lsn < lsn:
        raise InvalidArgument(f"prev_lsn {prev_lsn} must be below lsn {lsn}")
    if not 0 <= pg <= PG_MAX:
        raise InvalidArgument(f"pg {pg} out of range 0..{PG_MAX}")
    if flags & ~FLAGS_KNOWN or (flags & (FLAG_PUT | FLAG_DELETE)) not in (FLAG_PUT, FLAG_DELETE) \
            or (flags & FLAG_EXPIRES and not flags & FLAG_PUT):
        raise InvalidArgument(f"flags {flags:#x}: need exactly one of PUT or DELETE, plus optional CPL")
    if not 1 <= len(key) <= KEY_BYTES_MAX:
        raise InvalidArgument(f"key of {len(key)} bytes: keys are 1..{KEY_BYTES_MAX} bytes")
    if len(value) > VALUE_BYTES_MAX:
        raise InvalidArgument(f"value of {len(value)} bytes: values are at most {VALUE_BYTES_MAX} bytes")
    if flags & FLAG_DELETE and value:
        raise InvalidArgument("a DELETE record carries no value")
    if flags & FLAG_EXPIRES and len(value) < EXPIRES_BYTES:
        raise InvalidArgument(f"an EXPIRES record's value starts with its {EXPIRES_BYTES}-byte deadline")


def encode_record(lsn: int, prev_lsn: int, pg: int, flags: int, key: bytes, value: bytes) -> bytes:
    """Encode one record, CRC included. Raises InvalidArgument for fields out of range."""
    _check_fields(lsn, prev_lsn, pg, flags, key, value)
    total_len = RECORD_HEADER_BYTES + len(key) + len(value)
    body = _RECORD_HEADER.pack(0, total_len, lsn, prev_lsn, pg, flags, 0, len(key), len(value))[4:] + key + value
    return struct.pack("<I", google_crc32c.value(body)) + body


def encode_frame(records: list[bytes]) -> bytes:
    """Join already-encoded records (in increasing LSN order) into a frame."""
    body = b"".join(records)
    if len(records) > FRAME_RECORDS_MAX or FRAME_HEADER_BYTES + len(body) > FRAME_BYTES_MAX:
        raise InvalidArgument(
            f"frame of {len(records)} records / {len(body)} bytes exceeds "
            f"{FRAME_RECORDS_MAX} records / {FRAME_BYTES_MAX} bytes"
        )
    head = struct.pack("<III", FRAME_MAGIC, len(records), len(body))
    return head + struct.pack("<I", google_crc32c.value(head)) + body


def _parse_record(buf: bytes, offset: int, end: int, index: int) -> tuple[int, int, int, int, int, int, int]:
    """Validate the record at `offset` and return (lsn, prev_lsn, pg, flags, key_len, value_len, total_len).

    `index` is the record's position, for messages. Raises CorruptRecord."""
    where = f"record {index} at offset {offset}"
    if end - offset < RECORD_HEADER_BYTES:
        raise CorruptRecord(f"{where}: truncated header ({end - offset} of {RECORD_HEADER_BYTES} bytes)")
    crc, total_len, lsn, prev_lsn, pg, flags, reserved, key_len, value_len = _RECORD_HEADER.unpack_from(buf, offset)
    if total_len != RECORD_HEADER_BYTES + key_len + value_len:
        raise CorruptRecord(f"{where}: length field {total_len} disagrees with key_len {key_len} and value_len {value_len}")
    if total_len > end - offset:
        raise CorruptRecord(f"{where}: truncated ({end - offset} of {total_len} bytes)")
    computed = google_crc32c.value(bytes(buf[offset + 4 : offset + total_len]))
    if computed != crc:
        raise CorruptRecord(f"{where}: CRC mismatch (stored {crc:#010x}, computed {computed:#010x})")
    if reserved != 0:
        raise CorruptRecord(f"{where}: reserved byte is {reserved}, not 0")
    if flags & ~FLAGS_KNOWN or (flags & (FLAG_PUT | FLAG_DELETE)) not in (FLAG_PUT, FLAG_DELETE) \
            or (flags & FLAG_EXPIRES and not flags & FLAG_PUT):
        raise CorruptRecord(f"{where}: invalid flags {flags:#04x}")
    if lsn == 0 or prev_lsn >= lsn:
        raise CorruptRecord(f"{where}: lsn {lsn} with prev_lsn {prev_lsn} (need 0 <= prev_lsn < lsn)")
    if not 1 <= key_len <= KEY_BYTES_MAX:
        raise CorruptRecord(f"{where}: key_len {key_len} out of range 1..{KEY_BYTES_MAX}")
    if value_len > VALUE_BYTES_MAX or (flags & FLAG_DELETE and value_len) or (flags & FLAG_EXPIRES and value_len < EXPIRES_BYTES):
        raise CorruptRecord(f"{where}: value_len {value_len} invalid for flags {flags:#04x}")
    return lsn, prev_lsn, pg, flags, key_len, value_len, total_len


def _parse_frame_header(frame: bytes) -> int:
    """Validate a frame header; return the record count. Raises CorruptRecord."""
    if len(frame) < FRAME_HEADER_BYTES:
        raise CorruptRecord(f"frame truncated: {len(frame)} bytes, header needs {FRAME_HEADER_BYTES}")
    magic, count, body_len, header_crc = _FRAME_HEADER.unpack_from(frame, 0)
    if magic != FRAME_MAGIC:
        raise CorruptRecord(f"not a frame: magic {magic:#010x}")
    computed = google_crc32c.value(bytes(frame[:12]))
    if computed != header_crc:
        raise CorruptRecord(f"frame header CRC mismatch (stored {header_crc:#010x}, computed {computed:#010x})")
    if body_len != len(frame) - FRAME_HEADER_BYTES:
        raise CorruptRecord(f"frame body is {len(frame) - FRAME_HEADER_BYTES} bytes, header says {body_len}")
    if count > FRAME_RECORDS_MAX or len(frame) > FRAME_BYTES_MAX:
        raise CorruptRecord(f"frame of {count} records / {len(frame)} bytes exceeds the limits")
    return count


def _walk(frame: bytes):
    """Yield (offset, lsn, prev_lsn, pg, flags, key_len, value_len, total_len) of every record,
    after checking the header, every record, LSN order and the count. Raises CorruptRecord."""
    count = _parse_frame_header(frame)
    offset, end, index, last_lsn = FRAME_HEADER_BYTES, len(frame), 0, 0
    parsed = []
    while offset < end:
        if index == count:
            raise CorruptRecord(f"frame has bytes after its {count} records (offset {offset})")
        fields = _parse_record(frame, offset, end, index)
        if fields[0] <= last_lsn:
            raise CorruptRecord(f"record {index} at offset {offset}: lsn {fields[0]} not above previous lsn {last_lsn}")
        last_lsn = fields[0]
        parsed.append((offset,) + fields)
        offset += fields[6]
        index += 1
    if index != count:
        raise CorruptRecord(f"frame header says {count} records, body holds {index}")
    return parsed


def verify_frame(frame: bytes) -> int:
    """Check every length, field and CRC of a frame; return its record count."""
    return len(_walk(frame))


def decode_frame(frame: bytes) -> list[Record]:
    """Decode a frame into Records, after verifying all of it."""
    out = []
    for offset, lsn, prev_lsn, pg, flags, key_len, value_len, _total in _walk(frame):
        k = offset + RECORD_HEADER_BYTES
        out.append(Record(lsn, prev_lsn, pg, flags, bytes(frame[k : k + key_len]), bytes(frame[k + key_len : k + key_len + value_len])))
    return out


def index_frame(frame: bytes) -> list[IndexedRecord]:
    """Verify a frame and return what a storage node persists for each record."""
    out = []
    for offset, lsn, prev_lsn, pg, flags, key_len, _value_len, total_len in _walk(frame):
        k = offset + RECORD_HEADER_BYTES
        lk = _LOG_KEY.pack(pg, lsn)
        out.append(
            IndexedRecord(pg, lsn, prev_lsn, flags, lk, lk[:4] + bytes(frame[k : k + key_len]), bytes(frame[offset : offset + total_len]))
        )
    return out


def decode_record(buf: bytes) -> Record:
    """Decode one stored record (exactly one, no frame header), verifying its CRC and fields."""
    lsn, prev_lsn, pg, flags, key_len, value_len, total_len = _parse_record(buf, 0, len(buf), 0)
    if total_len != len(buf):
        raise CorruptRecord(f"record 0 at offset 0: {len(buf) - total_len} bytes after the record")
    k = RECORD_HEADER_BYTES
    return Record(lsn, prev_lsn, pg, flags, bytes(buf[k : k + key_len]), bytes(buf[k + key_len : k + key_len + value_len]))


__all__ = [
    "FLAG_CPL",
    "FLAG_DELETE",
    "FLAG_EXPIRES",
    "FLAG_PUT",
    "IndexedRecord",
    "Record",
    "crc32c",
    "decode_frame",
    "decode_record",
    "encode_frame",
    "encode_record",
    "index_frame",
    "log_key",
    "verify_frame",
    "version_key",
]
