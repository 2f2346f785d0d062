"""The segment codec: the Cython twin behaves exactly like the pure-Python reference (the spec).

Each property feeds both twins the same input and asserts the same value, or the same exception
class with the same message. Inputs cover valid frames built from random records, every prefix of
small frames, flipped bits, random bytes, records whose CRC is right but whose fields are wrong,
and odd argument types. Other tests state the guarantees of the format itself: decode inverts
encode, encoding rejects what it cannot represent, and any single flipped bit is detected.
"""

from __future__ import annotations

import gc
import glob
import os
import struct
import sys
import threading
import tracemalloc

import google_crc32c
import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

import engine.codec
from engine.codec import _python as py
from engine.codec._python import IndexedRecord, Record
from engine.core.constants import (
    FLAG_CPL,
    FLAG_DELETE,
    FLAG_PUT,
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

try:
    from engine.codec import _cython as cy
except ImportError as exc:  # the extension is not built in this environment
    cy = None
    CYTHON_MISSING = f"the Cython twin engine.codec._cython is not built ({exc}); run `make test`"
else:
    CYTHON_MISSING = ""

needs_cython = pytest.mark.skipif(cy is None, reason=CYTHON_MISSING)

DECODERS = ("verify_frame", "decode_frame", "index_frame")


# ---------------------------------------------------------------------------------------------
# Comparing the twins.
# ---------------------------------------------------------------------------------------------
def outcome(function, *args, **kwargs):
    """What a call did: ("returned", types, value) or ("raised", class, message)."""
    try:
        value = function(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any exception is an outcome to compare
        return ("raised", type(exc), str(exc))
    types = [type(v) for v in value] if isinstance(value, list) else type(value)
    return ("returned", types, value)


def same(name, *args, **kwargs):
    """Call `name` in both twins with the same arguments; assert the same outcome and return it."""
    expected = outcome(getattr(py, name), *args, **kwargs)
    if cy is not None:
        actual = outcome(getattr(cy, name), *args, **kwargs)
        assert actual == expected, f"{name}: cython {actual[:2]} != python {expected[:2]}"
    return expected


def same_decoders(frame):
    """All three frame decoders of both twins agree on `frame`; return verify_frame's outcome."""
    results = [same(name, frame) for name in DECODERS]
    if results[0][0] == "raised":
        # A bad frame is rejected whole: every decoder raises the same error.
        assert results[1][1:] == results[2][1:] == results[0][1:]
    return results[0]


# ---------------------------------------------------------------------------------------------
# Strategies.
# ---------------------------------------------------------------------------------------------
LSNS = st.one_of(st.integers(1, 64), st.integers(LSN_MAX - 64, LSN_MAX), st.integers(1, LSN_MAX))
PGS = st.one_of(st.integers(0, 8), st.just(PG_MAX), st.integers(0, PG_MAX))
FLAGS = st.sampled_from([FLAG_PUT, FLAG_DELETE, FLAG_PUT | FLAG_CPL, FLAG_DELETE | FLAG_CPL])
SMALL_KEYS = st.binary(min_size=1, max_size=24)
SMALL_VALUES = st.binary(max_size=64)
# Sizes at the limits are rare (one draw in 16) so that examples stay fast under the Python twin.
KEYS = st.integers(0, 15).flatmap(
    lambda c: st.binary(min_size=KEY_BYTES_MAX - 1, max_size=KEY_BYTES_MAX) if c == 0 else st.binary(min_size=1, max_size=40)
)
VALUES = st.integers(0, 15).flatmap(
    lambda c: st.sampled_from([VALUE_BYTES_MAX, VALUE_BYTES_MAX - 1]).map(lambda n: b"\xa5" * n)
    if c == 0
    else st.binary(max_size=200)
)


@st.composite
def record_fields(draw, lsn=None, prev_lsn=None, pg=None, keys=KEYS, values=VALUES):
    """The arguments of one valid encode_record call."""
    lsn = draw(LSNS) if lsn is None else lsn
    if prev_lsn is None:
        prev_lsn = draw(st.one_of(st.just(0), st.just(lsn - 1), st.integers(0, lsn - 1)))
    pg = draw(PGS) if pg is None else pg
    flags = draw(FLAGS)
    key = draw(keys)
    value = b"" if flags & FLAG_DELETE else draw(values)
    return (lsn, prev_lsn, pg, flags, key, value)


@st.composite
def record_lists(draw, records_max=8, keys=KEYS, values=VALUES):
    """Fields of records in strictly increasing LSN order, as one flush writes them.

    Half of the lists are chains: each record's prev_lsn is the LSN of the previous record of its
    protection group, as the head writes them; the others have arbitrary valid backlinks."""
    lsns = sorted(draw(st.sets(LSNS, max_size=records_max)))
    if draw(st.booleans()):
        last_lsn_of_pg: dict[int, int] = {}
        out = []
        for lsn in lsns:
            pg = draw(st.integers(0, 3))
            out.append(draw(record_fields(lsn, last_lsn_of_pg.get(pg, 0), pg, keys, values)))
            last_lsn_of_pg[pg] = lsn
        return out
    return [draw(record_fields(lsn, keys=keys, values=values)) for lsn in lsns]


def encode(records) -> bytes:
    return py.encode_frame([py.encode_record(*fields) for fields in records])


FRAMES = record_lists().map(encode)
SMALL_FRAMES = record_lists(records_max=3, keys=SMALL_KEYS, values=SMALL_VALUES).map(encode)


def frame_header(count: int, body: bytes, magic: int = FRAME_MAGIC) -> bytes:
    head = struct.pack("<III", magic, count, len(body))
    return head + struct.pack("<I", google_crc32c.value(head))


def raw_record(crc, total_len, lsn, prev_lsn, pg, flags, reserved, key_len, value_len, payload) -> bytes:
    """A record built field by field, CRC included unless `crc` is given: for wrong fields."""
    body = struct.pack("<IQQIBBHI", total_len, lsn, prev_lsn, pg, flags, reserved, key_len, value_len) + payload
    return struct.pack("<I", google_crc32c.value(body) if crc is None else crc) + body


# ---------------------------------------------------------------------------------------------
# Valid input: both twins encode the same bytes, and decoding gives back what was encoded.
# ---------------------------------------------------------------------------------------------
@given(record_lists())
def test_encoding_is_identical_and_decoding_inverts_it(records):
    encoded = [same("encode_record", *fields)[2] for fields in records]
    frame = same("encode_frame", encoded)[2]
    assert len(frame) == FRAME_HEADER_BYTES + sum(len(r) for r in encoded)

    assert same("verify_frame", frame)[2] == len(records)
    assert same("decode_frame", frame)[2] == [Record(*fields) for fields in records]
    expected_index = [
        IndexedRecord(
            pg,
            lsn,
            prev_lsn,
            flags,
            struct.pack(">IQ", pg, lsn),
            struct.pack(">I", pg) + key,
            record,
        )
        for (lsn, prev_lsn, pg, flags, key, _value), record in zip(records, encoded)
    ]
    assert same("index_frame", frame)[2] == expected_index
    for fields, record in zip(records, encoded):
        assert same("decode_record", record)[2] == Record(*fields)


@given(record_fields())
def test_a_record_round_trips_through_the_selected_twin(fields):
    record = engine.codec.encode_record(*fields)
    assert len(record) == RECORD_HEADER_BYTES + len(fields[4]) + len(fields[5])
    assert engine.codec.decode_record(record) == Record(*fields)
    assert engine.codec.decode_frame(engine.codec.encode_frame([record])) == [Record(*fields)]


def test_records_at_the_size_limits_round_trip():
    key, value = b"k" * KEY_BYTES_MAX, b"v" * VALUE_BYTES_MAX
    record = same("encode_record", LSN_MAX, LSN_MAX - 1, PG_MAX, FLAG_PUT | FLAG_CPL, key, value)[2]
    assert same("decode_record", record)[2] == Record(LSN_MAX, LSN_MAX - 1, PG_MAX, FLAG_PUT | FLAG_CPL, key, value)
    frame = same("encode_frame", [record] * 1)[2]
    assert same_decoders(frame)[2] == 1


def test_an_empty_frame_holds_no_records():
    frame = same("encode_frame", [])[2]
    assert frame == frame_header(0, b"")
    assert same("decode_frame", frame)[2] == []
    assert same("verify_frame", frame)[2] == 0


# ---------------------------------------------------------------------------------------------
# Damaged input: both twins reject it with the same message, and damage is always detected.
# ---------------------------------------------------------------------------------------------
@given(SMALL_FRAMES, st.binary(min_size=1, max_size=8))
def test_every_prefix_and_extension_of_a_frame_is_rejected_alike(frame, tail):
    for length in range(len(frame)):
        assert same_decoders(frame[:length])[1] is CorruptRecord
    assert same_decoders(frame)[0] == "returned"
    assert same_decoders(frame + tail)[1] is CorruptRecord


@given(record_fields(keys=SMALL_KEYS, values=SMALL_VALUES), st.binary(min_size=1, max_size=8))
def test_every_prefix_and_extension_of_a_record_is_rejected_alike(fields, tail):
    record = py.encode_record(*fields)
    for length in range(len(record)):
        assert same("decode_record", record[:length])[1] is CorruptRecord
    assert same("decode_record", record + tail)[1] is CorruptRecord


@given(record_fields(keys=SMALL_KEYS, values=SMALL_VALUES))
def test_any_single_flipped_bit_in_a_record_is_detected(fields):
    record = py.encode_record(*fields)
    for bit in range(len(record) * 8):
        damaged = bytearray(record)
        damaged[bit // 8] ^= 1 << (bit % 8)
        kind, error_class, message = same("decode_record", bytes(damaged))
        assert (kind, error_class) == ("raised", CorruptRecord), f"bit {bit}: {message}"


@given(FRAMES, st.data())
def test_any_single_flipped_bit_in_a_frame_is_detected(frame, data):
    bit = data.draw(st.integers(0, len(frame) * 8 - 1), label="bit")
    damaged = bytearray(frame)
    damaged[bit // 8] ^= 1 << (bit % 8)
    assert same_decoders(bytes(damaged))[1] is CorruptRecord


@given(FRAMES, st.lists(st.integers(0, (1 << 40) - 1), min_size=1, max_size=12))
def test_frames_with_flipped_bits_are_judged_alike(frame, positions):
    damaged = bytearray(frame)
    for position in positions:
        bit = position % (len(frame) * 8)
        damaged[bit // 8] ^= 1 << (bit % 8)
    same_decoders(bytes(damaged))


@given(st.binary(max_size=600))
@example(b"")
@example(b"SXF1")
def test_random_bytes_are_judged_alike(data):
    same_decoders(data)
    same("decode_record", data)


@given(st.integers(0, 4), st.binary(max_size=400), st.sampled_from([FRAME_MAGIC, FRAME_MAGIC ^ 1]))
def test_random_bodies_behind_a_valid_header_are_judged_alike(count, body, magic):
    same_decoders(frame_header(count, body, magic) + body)


CHANGES = ("reserved", "flags", "lsn", "prev_lsn", "key_len", "value_len", "delete_value", "lengths", "total_len", "crc", "payload")


@st.composite
def wrong_records(draw):
    """A valid record with one to three things wrong, mostly with a matching CRC, so that the checks
    after the CRC (reserved, flags, LSNs, key and value lengths) are reached, alone and in pairs."""
    lsn, prev_lsn, pg, flags, key, value = draw(record_fields(keys=SMALL_KEYS, values=SMALL_VALUES))
    reserved, crc = 0, None
    changes = draw(st.lists(st.sampled_from(CHANGES), min_size=1, max_size=3, unique=True))
    if "reserved" in changes:
        reserved = draw(st.integers(1, 255))
    if "flags" in changes:
        flags = draw(st.integers(0, 255))
    if "lsn" in changes:
        lsn = draw(st.one_of(st.just(0), LSNS))
    if "prev_lsn" in changes:
        prev_lsn = draw(st.one_of(st.just(lsn), st.integers(0, LSN_MAX)))
    if "key_len" in changes:
        key = draw(st.one_of(st.just(b""), st.binary(min_size=KEY_BYTES_MAX + 1, max_size=KEY_BYTES_MAX + 2)))
    if "value_len" in changes:
        value = b"\x5a" * (VALUE_BYTES_MAX + draw(st.integers(1, 2)))
    if "delete_value" in changes:
        flags = FLAG_DELETE | (flags & FLAG_CPL)
        value = value or b"v"
    payload = key + value
    key_len, value_len = len(key), len(value)
    if "lengths" in changes:  # length fields that the payload does not have
        key_len = draw(st.integers(0, 0xFFFF))
        value_len = draw(st.one_of(st.integers(0, 64), st.integers(0, 0xFFFFFFFF)))
    total_len = (RECORD_HEADER_BYTES + key_len + value_len) & 0xFFFFFFFF
    if "total_len" in changes:
        total_len = draw(st.one_of(st.integers(0, 64), st.integers(0, 0xFFFFFFFF)))
    if "payload" in changes:
        payload = draw(st.one_of(st.just(payload[:-1]), st.binary(max_size=16).map(lambda extra: payload + extra)))
    if "crc" in changes:
        crc = draw(st.integers(0, 0xFFFFFFFF))
    return raw_record(crc, total_len, lsn, prev_lsn, pg, flags, reserved, key_len, value_len, payload)


def damaged(**changes) -> bytes:
    """The record (10, 9, pg 1, PUT, b"key", b"value") with some header fields replaced, CRC right."""
    fields = dict(lsn=10, prev_lsn=9, pg=1, flags=FLAG_PUT, reserved=0, key=b"key", value=b"value", crc=None)
    fields.update(changes)
    key_len, value_len = len(fields["key"]), len(fields["value"])
    fields.setdefault("total_len", RECORD_HEADER_BYTES + key_len + value_len)
    return raw_record(
        fields["crc"], fields["total_len"], fields["lsn"], fields["prev_lsn"], fields["pg"], fields["flags"],
        fields["reserved"], key_len, value_len, fields["key"] + fields["value"],
    )


# Each check of a record, and pairs of adjacent checks (the first one must win), with words of the
# message it gives: this makes sure every check is reached, whatever hypothesis draws.
CHECKS = [
    (damaged(total_len=99), "length field 99 disagrees"),
    (damaged(key=b"k" * 40, total_len=RECORD_HEADER_BYTES + 45)[:50], "truncated (50 of 81 bytes)"),
    (damaged(crc=0x1234), "CRC mismatch (stored 0x00001234"),
    (damaged(reserved=1), "reserved byte is 1, not 0"),
    (damaged(reserved=1, flags=0), "reserved byte is 1, not 0"),
    (damaged(flags=0), "invalid flags 0x00"),
    (damaged(flags=FLAG_PUT | FLAG_DELETE), "invalid flags 0x03"),
    (damaged(flags=FLAG_PUT | 0x80), "invalid flags 0x81"),
    (damaged(flags=0, lsn=0), "invalid flags 0x00"),
    (damaged(lsn=0, prev_lsn=0), "lsn 0 with prev_lsn 0"),
    (damaged(prev_lsn=10), "lsn 10 with prev_lsn 10"),
    (damaged(prev_lsn=LSN_MAX), f"lsn 10 with prev_lsn {LSN_MAX}"),
    (damaged(lsn=0, key=b""), "lsn 0 with prev_lsn 9"),
    (damaged(key=b""), "key_len 0 out of range"),
    (damaged(key=b"k" * (KEY_BYTES_MAX + 1)), f"key_len {KEY_BYTES_MAX + 1} out of range"),
    (damaged(key=b"", value=b"v" * (VALUE_BYTES_MAX + 1)), "key_len 0 out of range"),
    (damaged(value=b"v" * (VALUE_BYTES_MAX + 1)), f"value_len {VALUE_BYTES_MAX + 1} invalid for flags 0x01"),
    (damaged(flags=FLAG_DELETE | FLAG_CPL), "value_len 5 invalid for flags 0x06"),
]


@pytest.mark.parametrize(("record", "words"), CHECKS, ids=[words for _record, words in CHECKS])
def test_every_record_check_is_reached_and_worded_alike(record, words):
    kind, error_class, message = same("decode_record", record)
    assert (kind, error_class) == ("raised", CorruptRecord)
    assert words in message, message
    body = py.encode_record(*VALID) + record
    kind, error_class, message = same_decoders(frame_header(2, body) + body)
    assert (kind, error_class) == ("raised", CorruptRecord)
    assert message.startswith(f"record 1 at offset {FRAME_HEADER_BYTES + RECORD_HEADER_BYTES + 8}: {words}"), message


@given(wrong_records(), st.lists(record_fields(keys=SMALL_KEYS, values=SMALL_VALUES), max_size=2))
def test_records_with_wrong_fields_are_rejected_alike(record, before):
    same("decode_record", record)
    good = [py.encode_record(*fields) for fields in before]
    body = b"".join(good) + record
    same_decoders(frame_header(len(good) + 1, body) + body)


@given(st.lists(record_fields(keys=SMALL_KEYS, values=SMALL_VALUES), max_size=5), st.integers(-2, 2))
def test_wrong_lsn_order_and_record_counts_are_rejected_alike(records, count_error):
    """Each record is valid, but LSNs may repeat or go down and the header's count may be wrong."""
    assume(len(records) + count_error >= 0)
    body = b"".join(py.encode_record(*fields) for fields in records)
    kind, error_class, _ = same_decoders(frame_header(len(records) + count_error, body) + body)
    lsns = [fields[0] for fields in records]
    in_order = all(a < b for a, b in zip(lsns, lsns[1:]))
    assert (kind == "returned") == (in_order and count_error == 0)


def test_frames_above_the_limits_are_rejected_alike():
    too_many = FRAME_RECORDS_MAX + 1
    assert same_decoders(frame_header(too_many, b""))[1:] == (
        CorruptRecord,
        f"frame of {too_many} records / {FRAME_HEADER_BYTES} bytes exceeds the limits",
    )
    body = bytes(FRAME_BYTES_MAX - FRAME_HEADER_BYTES + 1)
    assert same_decoders(frame_header(1, body) + body)[1:] == (
        CorruptRecord,
        f"frame of 1 records / {FRAME_BYTES_MAX + 1} bytes exceeds the limits",
    )


# ---------------------------------------------------------------------------------------------
# encode_record and encode_frame reject what they cannot represent.
# ---------------------------------------------------------------------------------------------
VALID = (10, 9, 1, FLAG_PUT, b"key", b"value")
OUT_OF_RANGE = [
    ("key", "not bytes"),
    ("key", bytearray(b"k")),
    ("value", None),
    ("key", b""),
    ("key", b"k" * (KEY_BYTES_MAX + 1)),
    ("value", b"v" * (VALUE_BYTES_MAX + 1)),
    ("lsn", 0),
    ("lsn", -1),
    ("lsn", LSN_MAX + 1),
    ("prev_lsn", 10),
    ("prev_lsn", 11),
    ("prev_lsn", -1),
    ("pg", -1),
    ("pg", PG_MAX + 1),
    ("flags", 0),
    ("flags", FLAG_PUT | FLAG_DELETE),
    ("flags", FLAG_CPL),
    ("flags", 0x10 | FLAG_PUT),  # 0x08 is REQUEST; 0x10 and above are unknown
    ("flags", 0x101),
    ("flags", -1),
    ("flags", 1 << 70),
    ("flags", (1 << 32) | FLAG_PUT),
    ("flags", (1 << 64) | FLAG_PUT),
]
FIELD_NAMES = ("lsn", "prev_lsn", "pg", "flags", "key", "value")


def with_field(name, value, base=VALID):
    fields = list(base)
    fields[FIELD_NAMES.index(name)] = value
    return tuple(fields)


@pytest.mark.parametrize(("name", "bad"), OUT_OF_RANGE, ids=[f"{n}={str(v)[:20]}" for n, v in OUT_OF_RANGE])
def test_encode_record_rejects_fields_out_of_range(name, bad):
    kind, error_class, message = same("encode_record", *with_field(name, bad))
    assert (kind, error_class) == ("raised", InvalidArgument), message


def test_encode_record_rejects_a_value_on_a_delete():
    assert same("encode_record", *with_field("flags", FLAG_DELETE))[1:] == (InvalidArgument, "a DELETE record carries no value")


ODD_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.floats(allow_nan=False, min_value=-2, max_value=1e20),
    st.integers(-(1 << 70), 1 << 70),
    st.text(max_size=3),
    st.binary(max_size=3).map(bytearray),
    st.binary(max_size=3).map(memoryview),
)


@given(st.sampled_from(FIELD_NAMES), ODD_VALUES, st.sampled_from([VALID, (1, 0, 0, FLAG_DELETE, b"k", b"")]))
def test_encode_record_meets_odd_arguments_alike(name, odd, base):
    same("encode_record", *with_field(name, odd, base))


def test_encode_record_takes_keyword_arguments():
    kwargs = dict(zip(FIELD_NAMES, VALID))
    assert same("encode_record", **kwargs)[2] == py.encode_record(*VALID)


@given(
    st.one_of(
        st.lists(st.binary(max_size=50), max_size=5),
        st.lists(st.one_of(st.binary(max_size=5), st.binary(max_size=5).map(bytearray), st.integers(0, 3)), max_size=4),
        st.lists(st.binary(max_size=5), max_size=4).map(tuple),
    )
)
def test_encode_frame_meets_any_list_alike(records):
    same("encode_frame", records)


def test_encode_frame_rejects_frames_above_the_limits():
    too_many = [b"r"] * (FRAME_RECORDS_MAX + 1)
    assert same("encode_frame", too_many)[1] is InvalidArgument
    too_large = [b"\0" * (1 << 20)] * (FRAME_BYTES_MAX >> 20)
    kind, error_class, message = same("encode_frame", too_large)
    assert (kind, error_class) == ("raised", InvalidArgument)
    assert f"{FRAME_BYTES_MAX} bytes" in message


def test_encode_frame_takes_a_generator_like_the_reference():
    records = [py.encode_record(*VALID)]
    expected = outcome(py.encode_frame, (r for r in records))
    if cy is not None:
        assert outcome(cy.encode_frame, (r for r in records)) == expected


# ---------------------------------------------------------------------------------------------
# Buffers other than bytes.
# ---------------------------------------------------------------------------------------------
@given(SMALL_FRAMES, st.integers(0, 3))
def test_frames_in_other_buffers_are_judged_like_bytes(frame, cut):
    for view in (
        bytearray(frame),
        memoryview(frame),
        memoryview(b"__" + frame + b"__")[2 : 2 + len(frame)],
        memoryview(frame)[: len(frame) - cut],
        memoryview(frame + frame)[::2],  # strided
        memoryview(frame + bytes(-len(frame) % 4)).cast("I"),  # items of 4 bytes
        memoryview(frame).cast("c"),
        "a string",
        12,
        None,
    ):
        same_decoders(view)
        same("decode_record", view)
    released = memoryview(frame)
    released.release()
    same_decoders(released)


# ---------------------------------------------------------------------------------------------
# CRC32C.
# ---------------------------------------------------------------------------------------------
@given(st.binary(max_size=300), st.integers(0, 0xFFFFFFFF))
@example(b"123456789", 0)
def test_crc32c_is_google_crc32c(data, seed):
    expected = google_crc32c.extend(seed, data) if seed else google_crc32c.value(data)
    assert same("crc32c", data, seed)[2] == expected
    assert same("crc32c", bytearray(data), seed)[2] == expected
    assert same("crc32c", memoryview(data), seed)[2] == expected
    assert same("crc32c", data)[2] == google_crc32c.value(data)
    assert engine.codec.crc32c(data, seed) == expected


def test_crc32c_check_value():
    assert same("crc32c", b"123456789")[2] == 0xE3069283


@given(st.one_of(st.just(b"abc"), st.text(max_size=3), st.integers(0, 5), st.none()), ODD_VALUES)
def test_crc32c_meets_odd_arguments_alike(data, seed):
    same("crc32c", data, seed)


@needs_cython
def test_the_cython_twin_uses_libcrc32c_when_the_wheel_ships_it():
    site = os.path.dirname(os.path.dirname(os.path.abspath(google_crc32c.__file__)))
    shipped = glob.glob(os.path.join(site, "google_crc32c.libs", "libcrc32c*.so*"))
    if not shipped:
        pytest.skip("this google-crc32c install ships no libcrc32c shared library")
    assert cy.CRC_BACKEND == "libcrc32c"
    assert cy.CRC_LIBRARY in shipped


@needs_cython
@given(FRAMES, st.integers(0, 1 << 20))
def test_the_python_crc_fallback_gives_the_same_results(frame, position):
    damaged = bytearray(frame)
    damaged[position % len(frame)] ^= 0x10
    previous = cy._set_crc_backend("python")
    try:
        assert cy.CRC_BACKEND == "python"
        for data in (frame, bytes(damaged)):
            same_decoders(data)
        assert same("crc32c", frame, 7)[0] == "returned"
    finally:
        cy._set_crc_backend(previous)
    assert cy.CRC_BACKEND == previous


# ---------------------------------------------------------------------------------------------
# The Cython twin's own concerns: large frames verified without the GIL, threads, no leaks.
# ---------------------------------------------------------------------------------------------
def large_frame(records: int = 700) -> bytes:
    """A frame above the size from which verify_frame releases the GIL (64 KiB)."""
    return encode([(i, i - 1, i % 5, FLAG_PUT, b"key-%06d" % i, bytes([i % 251]) * 100) for i in range(1, records + 1)])


def test_large_frames_and_damage_near_their_end_are_judged_alike():
    frame = large_frame()
    assert len(frame) > 64 * 1024
    assert same_decoders(frame)[2] == 700
    damaged = bytearray(frame)
    damaged[-3] ^= 0x01
    assert same_decoders(bytes(damaged))[1] is CorruptRecord
    assert same_decoders(frame[:-1])[1] is CorruptRecord


def test_threads_verify_large_frames_at_once():
    frame = large_frame()
    damaged = frame[:-1] + bytes([frame[-1] ^ 0x80])
    errors: list[str] = []

    def work() -> None:
        for _ in range(20):
            if engine.codec.verify_frame(frame) != 700:
                errors.append("wrong count")
            try:
                engine.codec.verify_frame(damaged)
                errors.append("damage not detected")
            except CorruptRecord:
                pass

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []


@needs_cython
def test_the_cython_twin_does_not_leak():
    frame = large_frame(50)
    records = [py.encode_record(*VALID)] * 3
    bad = frame[:-1]

    def exercise() -> None:
        for _ in range(200):
            cy.decode_frame(frame)
            cy.index_frame(bytearray(frame))
            cy.decode_record(records[0])
            cy.encode_frame(records)
            cy.encode_record(*VALID)
            try:
                cy.decode_frame(bad)
            except CorruptRecord:
                pass

    exercise()  # warm caches (interned strings, free lists) before measuring
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        exercise()
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # One leaked Record per call would be 200 * ~100 bytes * 50 records; allow noise well below.
    assert grown < 64 * 1024, f"{grown} bytes still allocated after 200 rounds"
    assert sys.getrefcount(frame) < 10


# ---------------------------------------------------------------------------------------------
# Keys, API surface and the twin selection.
# ---------------------------------------------------------------------------------------------
@given(PGS, LSNS, SMALL_KEYS)
def test_log_and_version_keys_are_identical(pg, lsn, key):
    assert same("log_key", pg, lsn)[2] == struct.pack(">IQ", pg, lsn)
    assert same("version_key", pg, key)[2] == struct.pack(">I", pg) + key


@given(ODD_VALUES, ODD_VALUES)
def test_log_and_version_keys_meet_odd_arguments_alike(pg, other):
    same("log_key", pg, other)
    same("version_key", pg, other)


@needs_cython
def test_the_twins_have_the_same_public_functions():
    assert sorted(cy.__all__) == sorted(py.__all__)
    for name in py.__all__:
        assert hasattr(cy, name), name
    assert cy.Record is Record and cy.IndexedRecord is IndexedRecord


def test_implementation_follows_sixfold_codec():
    choice = os.environ.get("SIXFOLD_CODEC", "").strip().lower()
    if choice in ("python", "cython"):
        assert engine.codec.IMPLEMENTATION == choice
    else:
        assert engine.codec.IMPLEMENTATION == ("python" if cy is None else "cython")
    expected_module = py if engine.codec.IMPLEMENTATION == "python" else cy
    assert engine.codec.verify_frame is expected_module.verify_frame
