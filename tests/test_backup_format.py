"""The backup archive's file formats: every file read back is checked, and a bad one is a typed
error (BackupCorrupt), never a crash and never a wrong answer."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import codec
from engine.backup.format import (
    HEADER_BYTES,
    KIND_BASE,
    KIND_SEGMENT,
    commit_time_of,
    decode_file,
    decode_manifest,
    encode_file,
    encode_manifest,
    iter_frames,
    parse_segment_name,
    segment_name,
)
from engine.core.constants import FLAG_CPL, FLAG_PUT, FLAG_REQUEST, LSN_VALID_MAX
from engine.errors import BackupCorrupt, BackupError

VID = "11111111-2222-4333-8444-555555555555"


def segment_meta(**over) -> dict:
    m = {"volume_id": VID, "after_lsn": 0, "last_lsn": 3, "pg_after": [0, 0], "pg_last": [3, 2], "records": 3,
         "epoch": 1, "first_time_us": 5, "last_time_us": 7, "complete_through_us": 9}
    m.update(over)
    return m


def frames() -> list[bytes]:
    a = codec.encode_frame([codec.encode_record(1, 0, 0, FLAG_PUT, b"a", b"x"), codec.encode_record(3, 1, 0, FLAG_PUT | FLAG_CPL, b"b", b"")])
    b = codec.encode_frame([codec.encode_record(2, 0, 1, FLAG_PUT | FLAG_CPL | FLAG_REQUEST, b"rid", b"d" * 16 + (7).to_bytes(8, "little"))])
    return [a, b]


def manifest(**over) -> dict:
    m = {"seq": 1, "volume_id": VID, "protection_groups": 2, "encryption": None, "epoch": 1, "written_us": 10,
         "position": {"lsn": 3, "pg_last": [3, 2], "time_us": 7, "complete_through_us": 9}, "bases": [],
         "retention_days": None}
    m.update(over)
    return m


def test_a_segment_round_trips_with_its_records():
    data = encode_file(KIND_SEGMENT, segment_meta(), frames())
    meta, body = decode_file("s", data, KIND_SEGMENT, VID)
    assert meta == segment_meta()
    lsns = sorted(r.lsn for fr in iter_frames("s", body) for r in fr)
    assert lsns == [1, 2, 3]


def test_commit_times_are_read_from_request_records_only():
    assert commit_time_of(FLAG_PUT | FLAG_REQUEST, b"d" * 16 + (7).to_bytes(8, "little")) == 7
    assert commit_time_of(FLAG_PUT | FLAG_REQUEST, b"d" * 16) is None  # written before commit times existed
    assert commit_time_of(FLAG_PUT, b"d" * 24) is None


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_flipped_bit_is_found(data):
    raw = encode_file(KIND_SEGMENT, segment_meta(), frames())
    i = data.draw(st.integers(0, len(raw) - 1))
    bit = data.draw(st.integers(0, 7))
    bad = raw[:i] + bytes([raw[i] ^ (1 << bit)]) + raw[i + 1:]
    with pytest.raises(BackupCorrupt):
        meta, body = decode_file("s", bad, KIND_SEGMENT, VID)
        for _ in iter_frames("s", body):
            pass


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_a_truncated_or_padded_file_is_found(data):
    raw = encode_file(KIND_BASE, {"volume_id": VID, "lsn": 3, "part": 0, "records": 3}, frames())
    n = data.draw(st.integers(0, len(raw) - 1))
    for bad in (raw[:n], raw + b"\0" * (n + 1)):
        with pytest.raises(BackupCorrupt):
            decode_file("b", bad, KIND_BASE, VID)


def test_a_file_of_another_volume_or_kind_or_newer_format_is_refused():
    raw = encode_file(KIND_SEGMENT, segment_meta(), frames())
    with pytest.raises(BackupCorrupt, match="another archive"):
        decode_file("s", raw, KIND_SEGMENT, "another-volume")
    with pytest.raises(BackupCorrupt, match="expected a base part"):
        decode_file("s", raw, KIND_BASE, VID)
    newer = bytearray(raw)
    newer[4] = 2  # format 2, header CRC fixed up: a newer release wrote it
    newer[28:32] = codec.crc32c(bytes(newer[:28])).to_bytes(4, "little")
    with pytest.raises(BackupError, match="newer Sixfold release") as e:
        decode_file("s", bytes(newer), KIND_SEGMENT, VID)
    assert not isinstance(e.value, BackupCorrupt)


@pytest.mark.parametrize("field,value", [
    ("after_lsn", -1), ("last_lsn", LSN_VALID_MAX + 1), ("pg_after", [0]), ("records", 0), ("epoch", "1"),
    ("complete_through_us", None), ("first_time_us", -5), ("volume_id", 7),
])
def test_a_segment_meta_out_of_bounds_is_refused(field, value):
    raw = encode_file(KIND_SEGMENT, segment_meta(**{field: value}), frames())
    with pytest.raises(BackupCorrupt, match="meta is not valid"):
        decode_file("s", raw, KIND_SEGMENT, None)


def test_a_manifest_round_trips_and_any_change_is_found():
    raw = encode_manifest(manifest())
    assert decode_manifest("m", raw)["position"]["lsn"] == 3
    doc = json.loads(raw)
    doc["position"]["lsn"] = 4  # edited by hand, CRC not updated
    with pytest.raises(BackupCorrupt, match="CRC"):
        decode_manifest("m", json.dumps(doc).encode())


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_a_damaged_manifest_is_a_typed_error_never_a_crash(data):
    raw = encode_manifest(manifest())
    i = data.draw(st.integers(0, len(raw) - 1))
    bad = raw[:i] + bytes([data.draw(st.integers(0, 255))]) + raw[i + 1:]
    try:
        m = decode_manifest("m", bad)
    except BackupError:
        return
    assert m == decode_manifest("m", raw)  # only a change JSON ignores (whitespace) may pass


@pytest.mark.parametrize("over", [
    {"protection_groups": 0}, {"seq": 0}, {"position": {"lsn": 3}}, {"bases": [{"lsn": 1}]},
    {"position": {"lsn": 3, "pg_last": [3], "time_us": 7, "complete_through_us": 9}}, {"retention_days": -1},
])
def test_a_manifest_with_a_bad_field_is_refused_even_with_a_good_crc(over):
    with pytest.raises(BackupCorrupt, match="is not valid"):
        decode_manifest("m", encode_manifest(manifest(**over)))


def test_a_newer_manifest_format_is_refused_as_newer():
    doc = json.loads(encode_manifest(manifest()))
    doc["format"] = 2
    with pytest.raises(BackupError, match="newer Sixfold release"):
        decode_manifest("m", json.dumps(doc).encode())


@given(st.integers(0, LSN_VALID_MAX - 1), st.integers(1, 1 << 20))
def test_segment_names_round_trip(after, span):
    last = min(LSN_VALID_MAX, after + span)
    assert parse_segment_name(segment_name(after, last)) == (after, last)


def test_the_header_is_32_bytes():
    assert HEADER_BYTES == 32
