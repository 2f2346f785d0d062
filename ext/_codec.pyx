# cython: language_level=3
"""Segment codec, Cython twin of `engine.codec._python`; built as `engine.codec._cython`.

Theory of operation
-------------------
The pure-Python module `engine.codec._python` is the specification of the byte format. This module
implements the same public functions with the same results and the same exceptions (class and
message) for every input, only faster. Checking is done by C-level code that walks a
`(const unsigned char*, Py_ssize_t)` buffer and allocates nothing: when a check fails it fills a
`Fault` (which check, where, which values) and returns -1, and only then does Python code turn
the fault into the reference's exact message. `verify_frame` therefore creates no Python object
per record, and releases the GIL on large frames so that other threads of a node keep running.
`decode_frame` and `index_frame` first verify the whole frame, as the reference does (a bad frame
is rejected whole), then build the result objects in a second pass.

Inputs the fast paths accept are the common ones: exact `bytes`, exact `bytearray` and
one-dimensional byte-sized contiguous `memoryview`s for buffers; exact `int` and exact `bytes` for
record fields; a `list` of exact `bytes` for frames. Anything else (a subclass, a float, a
generator, a strided view...) is handed to the reference implementation itself, which is the
simplest way to raise exactly what the specification raises for odd inputs without copying
every quirk of Python's `len`, slicing and `struct` here.

CRC32C comes from Google's maintained, hardware-accelerated library (SSE4.2 / ARMv8 CRC
instructions), the one the `google-crc32c` wheel ships: we locate its shared library at import
and call `crc32c_extend` through a C function pointer, with no Python call per record. If the
library cannot be found (a source build of google-crc32c, an unusual platform), we fall back to
calling `google_crc32c.extend` through Python, which is correct but slower; `CRC_BACKEND` says
which path is in use ("libcrc32c" or "python").
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.ref cimport Py_INCREF
from cpython.tuple cimport PyTuple_SET_ITEM
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t, uintptr_t
from libc.string cimport memcpy, memset

import ctypes
import ctypes.util
import glob
import os

import google_crc32c

from engine.codec import _python as _reference
from engine.codec._python import IndexedRecord, Record
from engine.core import constants as _constants
from engine.core.constants import (
    EXPIRES_BYTES,
    FLAG_CPL,
    FLAG_DELETE,
    FLAG_EXPIRES,
    FLAG_PUT,
    FRAME_HEADER_BYTES,
    KEY_BYTES_MAX,
    LSN_MAX,
    PG_MAX,
    RECORD_HEADER_BYTES,
    VALUE_BYTES_MAX,
)
from engine.errors import CorruptRecord, InvalidArgument

# ---------------------------------------------------------------------------------------------
# Constants. The byte offsets below are compiled in, so the layout constants they derive from
# are checked at import: a change to the format must change this file too.
# ---------------------------------------------------------------------------------------------
if RECORD_HEADER_BYTES != 36 or FRAME_HEADER_BYTES != 16:
    raise ImportError("engine.codec._cython was compiled for 36-byte record and 16-byte frame headers")

cdef Py_ssize_t _RECORD_HEADER = 36
cdef Py_ssize_t _FRAME_HEADER = 16
cdef uint32_t _FRAME_MAGIC = _constants.FRAME_MAGIC
cdef uint32_t _FLAG_PUT = FLAG_PUT
cdef uint32_t _FLAG_DELETE = FLAG_DELETE
cdef uint32_t _FLAGS_KNOWN = _constants.FLAGS_KNOWN
cdef uint32_t _FLAG_EXPIRES = _constants.FLAG_EXPIRES
cdef uint32_t _EXPIRES_BYTES = _constants.EXPIRES_BYTES
cdef uint64_t _KEY_BYTES_MAX = KEY_BYTES_MAX
cdef uint64_t _VALUE_BYTES_MAX = VALUE_BYTES_MAX
cdef uint64_t _FRAME_BYTES_MAX = _constants.FRAME_BYTES_MAX
cdef uint64_t _FRAME_RECORDS_MAX = _constants.FRAME_RECORDS_MAX
cdef uint64_t _PG_MAX = PG_MAX
if LSN_MAX != (1 << 64) - 1:
    raise ImportError("engine.codec._cython keeps LSNs in uint64_t: LSN_MAX must be 2**64 - 1")

#: Frames at least this large are verified without the GIL: the CRC of 64 KiB takes several
#: microseconds, far more than releasing and taking back the GIL costs.
cdef Py_ssize_t _NOGIL_BYTES_MIN = 64 * 1024

# ---------------------------------------------------------------------------------------------
# CRC32C backend.
# ---------------------------------------------------------------------------------------------
ctypedef uint32_t (*crc32c_extend_fn)(uint32_t crc, const uint8_t* data, size_t count) noexcept nogil

# The address of `crc32c_extend` in Google's library, or NULL when the Python fallback is in use.
# It is set once at import (and only by `_set_crc_backend` after that, which tests use).
cdef crc32c_extend_fn _crc_fn = NULL
# The ctypes handle of that library, kept so that the library stays loaded.
_crc_library = None
_crc_library_address = 0

#: Which CRC32C path is in use: "libcrc32c" (a direct C call) or "python" (google_crc32c.extend).
CRC_BACKEND = "python"
#: Path of the shared library `crc32c_extend` was taken from, or None.
CRC_LIBRARY = None


def _library_candidates():
    """Paths that may hold Google's libcrc32c, most specific first.

    auditwheel (Linux wheels) vendors the library next to the package as
    `site-packages/google_crc32c.libs/libcrc32c-<hash>.so.*`; delocate (macOS wheels) puts it in
    `google_crc32c/.dylibs/`; a build against a system library finds it on the loader's path."""
    package_dir = os.path.dirname(os.path.abspath(google_crc32c.__file__))
    site_dir = os.path.dirname(package_dir)
    found = sorted(glob.glob(os.path.join(site_dir, "google_crc32c.libs", "libcrc32c*.so*")))
    found += sorted(glob.glob(os.path.join(package_dir, ".dylibs", "libcrc32c*.dylib")))
    system = ctypes.util.find_library("crc32c")
    if system:
        found.append(system)
    return found


def _load_libcrc32c():
    """Return (library, address of crc32c_extend, path), or (None, 0, None) if none is usable."""
    for path in _library_candidates():
        try:
            library = ctypes.CDLL(path)
            function = library.crc32c_extend
        except (OSError, AttributeError):
            continue
        address = ctypes.cast(function, ctypes.c_void_p).value
        if address:
            return library, address, path
    return None, 0, None


cdef bint _crc_fn_agrees(crc32c_extend_fn fn):
    """A library found by name is only trusted once it gives the known answers: the standard check
    value of CRC32C, and google_crc32c's own results on a few buffers, continuation included."""
    cdef bytes check = b"123456789"
    if fn(0, <const uint8_t*>PyBytes_AS_STRING(check), 9) != 0xE3069283:
        return False
    cdef bytes sample = bytes(range(256)) * 5
    cdef Py_ssize_t n
    for n in (0, 1, 7, 8, 63, 64, 65, 1279, 1280):
        if fn(0, <const uint8_t*>PyBytes_AS_STRING(sample), n) != google_crc32c.value(sample[:n]):
            return False
        if fn(0x12345678, <const uint8_t*>PyBytes_AS_STRING(sample), n) != google_crc32c.extend(0x12345678, sample[:n]):
            return False
    return True


def _set_crc_backend(str name):
    """Switch the CRC32C path ("libcrc32c" or "python") and return the previous one.

    For tests, which run the twin comparisons over the fallback path too. Not thread-safe: call it
    only while no other thread uses the codec."""
    global _crc_fn, _crc_library, _crc_library_address, CRC_BACKEND, CRC_LIBRARY
    previous = CRC_BACKEND
    if name == "python":
        _crc_fn = NULL
        CRC_BACKEND = "python"
    elif name == "libcrc32c":
        if not _crc_library_address:
            _crc_library, _crc_library_address, CRC_LIBRARY = _load_libcrc32c()
        if not _crc_library_address:
            raise RuntimeError("libcrc32c was not found next to google_crc32c")
        if not _crc_fn_agrees(<crc32c_extend_fn><uintptr_t>_crc_library_address):
            raise RuntimeError(f"{CRC_LIBRARY}: crc32c_extend gives wrong answers")
        _crc_fn = <crc32c_extend_fn><uintptr_t>_crc_library_address
        CRC_BACKEND = "libcrc32c"
    else:
        raise ValueError(f"CRC backend {name!r}: use 'libcrc32c' or 'python'")
    return previous


try:
    _set_crc_backend("libcrc32c")
except RuntimeError:
    # Correct but slower: every CRC then goes through google_crc32c.extend as a Python call.
    _set_crc_backend("python")


cdef inline int _crc(uint32_t seed, const unsigned char* data, size_t n, uint32_t* out) except -1 nogil:
    """CRC32C of data[0:n] continuing from `seed`, into out[0]. Raises only on the Python path."""
    if _crc_fn != NULL:
        out[0] = _crc_fn(seed, <const uint8_t*>data, n)
        return 0
    with gil:
        out[0] = google_crc32c.extend(seed, PyBytes_FromStringAndSize(<const char*>data, <Py_ssize_t>n))
    return 0


# ---------------------------------------------------------------------------------------------
# Little-endian and big-endian loads and stores. Written byte by byte so that they are correct on
# any host and alignment; compilers turn each into one load or store (plus a byte swap) anyway.
# ---------------------------------------------------------------------------------------------
cdef inline uint16_t _le16(const unsigned char* p) noexcept nogil:
    return <uint16_t>(p[0] | (<uint16_t>p[1] << 8))


cdef inline uint32_t _le32(const unsigned char* p) noexcept nogil:
    return (<uint32_t>p[0]) | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16) | (<uint32_t>p[3] << 24)


cdef inline uint64_t _le64(const unsigned char* p) noexcept nogil:
    return (<uint64_t>_le32(p)) | ((<uint64_t>_le32(p + 4)) << 32)


cdef inline void _put_le16(unsigned char* p, uint16_t v) noexcept nogil:
    p[0] = <unsigned char>v
    p[1] = <unsigned char>(v >> 8)


cdef inline void _put_le32(unsigned char* p, uint32_t v) noexcept nogil:
    p[0] = <unsigned char>v
    p[1] = <unsigned char>(v >> 8)
    p[2] = <unsigned char>(v >> 16)
    p[3] = <unsigned char>(v >> 24)


cdef inline void _put_le64(unsigned char* p, uint64_t v) noexcept nogil:
    _put_le32(p, <uint32_t>v)
    _put_le32(p + 4, <uint32_t>(v >> 32))


cdef inline void _put_be32(unsigned char* p, uint32_t v) noexcept nogil:
    p[0] = <unsigned char>(v >> 24)
    p[1] = <unsigned char>(v >> 16)
    p[2] = <unsigned char>(v >> 8)
    p[3] = <unsigned char>v


cdef inline void _put_be64(unsigned char* p, uint64_t v) noexcept nogil:
    _put_be32(p, <uint32_t>(v >> 32))
    _put_be32(p + 4, <uint32_t>v)


# ---------------------------------------------------------------------------------------------
# Parsed headers and faults.
# ---------------------------------------------------------------------------------------------
cdef struct RecordHead:
    uint32_t crc        # stored CRC32C of the record's bytes [4, total_len)
    uint32_t total_len  # 36 + key_len + value_len, once checked
    uint64_t lsn        # log sequence number, >= 1 once checked
    uint64_t prev_lsn   # previous LSN of the same protection group, < lsn once checked
    uint32_t pg         # protection group
    uint32_t flags      # PUT / DELETE (+ CPL), a u8 on disk
    uint32_t reserved   # must be 0, a u8 on disk
    uint32_t key_len    # 1 ..= KEY_BYTES_MAX once checked, a u16 on disk
    uint32_t value_len  # 0 ..= VALUE_BYTES_MAX once checked

# Which check failed. Each kind has one message in `_fault_message`, copied from the reference.
cdef enum FaultKind:
    FAULT_FRAME_TRUNCATED = 1   # a: frame length
    FAULT_MAGIC                 # a: magic
    FAULT_HEADER_CRC            # a: stored, b: computed
    FAULT_BODY_LEN              # a: actual body bytes, b: body_len field
    FAULT_FRAME_LIMITS          # a: count, b: frame length
    FAULT_TRAILING_BYTES        # a: count; offset
    FAULT_LSN_ORDER             # index, offset; a: lsn, b: previous lsn
    FAULT_COUNT                 # a: count, b: records found
    FAULT_RECORD_HEADER         # index, offset; a: bytes available
    FAULT_RECORD_LENGTH         # index, offset; a: total_len, b: key_len, c: value_len
    FAULT_RECORD_TRUNCATED      # index, offset; a: bytes available, b: total_len
    FAULT_RECORD_CRC            # index, offset; a: stored, b: computed
    FAULT_RECORD_RESERVED       # index, offset; a: reserved byte
    FAULT_RECORD_FLAGS          # index, offset; a: flags
    FAULT_RECORD_LSN            # index, offset; a: lsn, b: prev_lsn
    FAULT_RECORD_KEY_LEN        # index, offset; a: key_len
    FAULT_RECORD_VALUE_LEN      # index, offset; a: value_len, b: flags
    FAULT_RECORD_TRAILING       # a: bytes after the record (decode_record)

cdef struct Fault:
    int kind            # a FaultKind
    Py_ssize_t index    # position of the record in the frame
    Py_ssize_t offset   # byte offset of the record (or of the trailing bytes) in the buffer
    uint64_t a          # the values the message shows, by kind (see FaultKind)
    uint64_t b
    uint64_t c


cdef inline int _fault(Fault* f, int kind, Py_ssize_t index, Py_ssize_t offset, uint64_t a, uint64_t b, uint64_t c) noexcept nogil:
    f.kind = kind
    f.index = index
    f.offset = offset
    f.a = a
    f.b = b
    f.c = c
    return -1


cdef str _fault_message(Fault* f):
    """The reference's message for a fault, word for word."""
    cdef object a = f.a, b = f.b, c = f.c
    kind = f.kind
    where = f"record {f.index} at offset {f.offset}"
    if kind == FAULT_FRAME_TRUNCATED:
        return f"frame truncated: {a} bytes, header needs {FRAME_HEADER_BYTES}"
    if kind == FAULT_MAGIC:
        return f"not a frame: magic {a:#010x}"
    if kind == FAULT_HEADER_CRC:
        return f"frame header CRC mismatch (stored {a:#010x}, computed {b:#010x})"
    if kind == FAULT_BODY_LEN:
        return f"frame body is {a} bytes, header says {b}"
    if kind == FAULT_FRAME_LIMITS:
        return f"frame of {a} records / {b} bytes exceeds the limits"
    if kind == FAULT_TRAILING_BYTES:
        return f"frame has bytes after its {a} records (offset {f.offset})"
    if kind == FAULT_LSN_ORDER:
        return f"{where}: lsn {a} not above previous lsn {b}"
    if kind == FAULT_COUNT:
        return f"frame header says {a} records, body holds {b}"
    if kind == FAULT_RECORD_HEADER:
        return f"{where}: truncated header ({a} of {RECORD_HEADER_BYTES} bytes)"
    if kind == FAULT_RECORD_LENGTH:
        return f"{where}: length field {a} disagrees with key_len {b} and value_len {c}"
    if kind == FAULT_RECORD_TRUNCATED:
        return f"{where}: truncated ({a} of {b} bytes)"
    if kind == FAULT_RECORD_CRC:
        return f"{where}: CRC mismatch (stored {a:#010x}, computed {b:#010x})"
    if kind == FAULT_RECORD_RESERVED:
        return f"{where}: reserved byte is {a}, not 0"
    if kind == FAULT_RECORD_FLAGS:
        return f"{where}: invalid flags {a:#04x}"
    if kind == FAULT_RECORD_LSN:
        return f"{where}: lsn {a} with prev_lsn {b} (need 0 <= prev_lsn < lsn)"
    if kind == FAULT_RECORD_KEY_LEN:
        return f"{where}: key_len {a} out of range 1..{KEY_BYTES_MAX}"
    if kind == FAULT_RECORD_VALUE_LEN:
        return f"{where}: value_len {a} invalid for flags {b:#04x}"
    if kind == FAULT_RECORD_TRAILING:
        return f"record 0 at offset 0: {a} bytes after the record"
    raise AssertionError(f"unknown fault kind {kind}")


cdef int _raise_fault(Fault* f) except -1:
    raise CorruptRecord(_fault_message(f))


# ---------------------------------------------------------------------------------------------
# The checks: the same order and the same conditions as `_parse_record`, `_parse_frame_header`
# and `_walk` in the reference, so that the first failing check (and so the message) is the same.
# ---------------------------------------------------------------------------------------------
cdef inline bint _flags_valid(uint32_t flags) noexcept nogil:
    cdef uint32_t kind = flags & (_FLAG_PUT | _FLAG_DELETE)
    return (flags & ~_FLAGS_KNOWN) == 0 and (kind == _FLAG_PUT or kind == _FLAG_DELETE) \
        and not (flags & _FLAG_EXPIRES and kind != _FLAG_PUT)


cdef inline int _parse_record(const unsigned char* buf, Py_ssize_t offset, Py_ssize_t end, Py_ssize_t index,
                              RecordHead* h, Fault* f) except -2 nogil:
    """Check the record at buf[offset:end]; fill `h` and return 0, or fill `f` and return -1."""
    cdef const unsigned char* p = buf + offset
    cdef Py_ssize_t available = end - offset
    cdef uint32_t computed = 0
    if available < _RECORD_HEADER:
        return _fault(f, FAULT_RECORD_HEADER, index, offset, <uint64_t>available, 0, 0)
    h.crc = _le32(p)
    h.total_len = _le32(p + 4)
    h.lsn = _le64(p + 8)
    h.prev_lsn = _le64(p + 16)
    h.pg = _le32(p + 24)
    h.flags = p[28]
    h.reserved = p[29]
    h.key_len = _le16(p + 30)
    h.value_len = _le32(p + 32)
    if <uint64_t>h.total_len != <uint64_t>_RECORD_HEADER + h.key_len + h.value_len:
        return _fault(f, FAULT_RECORD_LENGTH, index, offset, h.total_len, h.key_len, h.value_len)
    if <uint64_t>h.total_len > <uint64_t>available:
        return _fault(f, FAULT_RECORD_TRUNCATED, index, offset, <uint64_t>available, h.total_len, 0)
    _crc(0, p + 4, h.total_len - 4, &computed)
    if computed != h.crc:
        return _fault(f, FAULT_RECORD_CRC, index, offset, h.crc, computed, 0)
    if h.reserved != 0:
        return _fault(f, FAULT_RECORD_RESERVED, index, offset, h.reserved, 0, 0)
    if not _flags_valid(h.flags):
        return _fault(f, FAULT_RECORD_FLAGS, index, offset, h.flags, 0, 0)
    if h.lsn == 0 or h.prev_lsn >= h.lsn:
        return _fault(f, FAULT_RECORD_LSN, index, offset, h.lsn, h.prev_lsn, 0)
    if h.key_len < 1 or h.key_len > _KEY_BYTES_MAX:
        return _fault(f, FAULT_RECORD_KEY_LEN, index, offset, h.key_len, 0, 0)
    if h.value_len > _VALUE_BYTES_MAX or (h.flags & _FLAG_DELETE and h.value_len) \
            or (h.flags & _FLAG_EXPIRES and h.value_len < _EXPIRES_BYTES):
        return _fault(f, FAULT_RECORD_VALUE_LEN, index, offset, h.value_len, h.flags, 0)
    return 0


cdef Py_ssize_t _walk(const unsigned char* buf, Py_ssize_t n, Fault* f) except -2 nogil:
    """Check a whole frame: header, every record, LSN order and count. Return the record count,
    or fill `f` and return -1. Allocates nothing, so it runs with or without the GIL."""
    cdef uint32_t magic, count, body_len, header_crc
    cdef uint32_t computed = 0
    cdef Py_ssize_t offset, index
    cdef uint64_t last_lsn = 0
    cdef RecordHead h
    if n < _FRAME_HEADER:
        return _fault(f, FAULT_FRAME_TRUNCATED, 0, 0, <uint64_t>n, 0, 0)
    magic = _le32(buf)
    count = _le32(buf + 4)
    body_len = _le32(buf + 8)
    header_crc = _le32(buf + 12)
    if magic != _FRAME_MAGIC:
        return _fault(f, FAULT_MAGIC, 0, 0, magic, 0, 0)
    _crc(0, buf, 12, &computed)
    if computed != header_crc:
        return _fault(f, FAULT_HEADER_CRC, 0, 0, header_crc, computed, 0)
    if <uint64_t>body_len != <uint64_t>(n - _FRAME_HEADER):
        return _fault(f, FAULT_BODY_LEN, 0, 0, <uint64_t>(n - _FRAME_HEADER), body_len, 0)
    if count > _FRAME_RECORDS_MAX or <uint64_t>n > _FRAME_BYTES_MAX:
        return _fault(f, FAULT_FRAME_LIMITS, 0, 0, count, <uint64_t>n, 0)
    offset = _FRAME_HEADER
    index = 0
    while offset < n:
        if index == count:
            return _fault(f, FAULT_TRAILING_BYTES, 0, offset, count, 0, 0)
        if _parse_record(buf, offset, n, index, &h, f) < 0:
            return -1
        if h.lsn <= last_lsn:
            return _fault(f, FAULT_LSN_ORDER, index, offset, h.lsn, last_lsn, 0)
        last_lsn = h.lsn
        offset += h.total_len
        index += 1
    if index != count:
        return _fault(f, FAULT_COUNT, 0, 0, count, <uint64_t>index, 0)
    return count


# ---------------------------------------------------------------------------------------------
# Buffers.
# ---------------------------------------------------------------------------------------------
cdef int _get_bytes_view(object obj, Py_buffer* view) except -1:
    """Export obj's bytes into `view` and return 1 when, for obj, Python's `len` and slicing (what
    the reference uses) mean the plain bytes of the buffer; return 0 to hand obj to the reference.

    A held export also stops a bytearray from being resized while C code reads it."""
    cdef type kind = type(obj)
    if kind is memoryview:
        try:
            if not (obj.ndim == 1 and obj.itemsize == 1 and obj.c_contiguous):
                return 0
        except ValueError:  # a released view: the reference raises its own error for it
            return 0
    elif kind is not bytes and kind is not bytearray:
        return 0
    PyObject_GetBuffer(obj, view, PyBUF_SIMPLE)
    return 1


# ---------------------------------------------------------------------------------------------
# Public functions: the same names, signatures, results and errors as the reference.
# ---------------------------------------------------------------------------------------------
def crc32c(data, value=0):
    """CRC32C (Castagnoli) of `data`, continuing from `value`; hardware-accelerated."""
    cdef uint32_t seed = 0
    cdef uint32_t out = 0
    cdef Py_buffer view
    if value:
        # The reference passes any truthy `value` to google_crc32c.extend; only the in-range ints
        # are done here, so that every other value meets the same error there.
        if type(value) is not int or not 0 < value <= 0xFFFFFFFF:
            return _reference.crc32c(data, value)
        seed = value
    if type(data) is not bytes and type(data) is not bytearray:
        data = bytes(data)  # what the reference does, with the same errors
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        _crc(seed, <const unsigned char*>view.buf, <size_t>view.len, &out)
    finally:
        PyBuffer_Release(&view)
    return out


def log_key(pg, lsn):
    """Key of a record in a node's log table: ordered by PG, then LSN."""
    cdef bytes out
    cdef unsigned char* p
    if type(pg) is not int or type(lsn) is not int or not (0 <= pg <= PG_MAX and 0 <= lsn <= LSN_MAX):
        return _reference.log_key(pg, lsn)
    out = PyBytes_FromStringAndSize(NULL, 12)
    p = <unsigned char*>PyBytes_AS_STRING(out)
    _put_be32(p, <uint32_t>pg)
    _put_be64(p + 4, <uint64_t>lsn)
    return out


def version_key(pg, key):
    """Key of a user key in a node's version index."""
    cdef bytes out
    cdef unsigned char* p
    cdef Py_ssize_t n
    if type(pg) is not int or type(key) is not bytes or not 0 <= pg <= PG_MAX:
        return _reference.version_key(pg, key)
    n = PyBytes_GET_SIZE(key)
    out = PyBytes_FromStringAndSize(NULL, 4 + n)
    p = <unsigned char*>PyBytes_AS_STRING(out)
    _put_be32(p, <uint32_t>pg)
    memcpy(p + 4, PyBytes_AS_STRING(key), n)
    return out


cdef bint _to_u64(object x, uint64_t* out):
    """Convert an exact int to uint64_t; False when it is negative or too large."""
    try:
        out[0] = x
    except OverflowError:
        return False
    return True


def encode_record(lsn, prev_lsn, pg, flags, key, value):
    """Encode one record, CRC included. Raises InvalidArgument for fields out of range."""
    cdef uint64_t c_lsn = 0, c_prev_lsn = 0, c_pg = 0, c_flags = 0
    cdef Py_ssize_t key_len, value_len, total_len
    cdef uint32_t crc = 0
    cdef bytes out
    cdef unsigned char* p
    if not (type(lsn) is int and type(prev_lsn) is int and type(pg) is int and type(flags) is int
            and type(key) is bytes and type(value) is bytes):
        return _reference.encode_record(lsn, prev_lsn, pg, flags, key, value)
    # The checks of the reference's `_check_fields`, in its order and with its messages.
    if not _to_u64(lsn, &c_lsn) or c_lsn < 1:
        raise InvalidArgument(f"lsn {lsn} out of range 1..{LSN_MAX}")
    if not _to_u64(prev_lsn, &c_prev_lsn) or c_prev_lsn >= c_lsn:
        raise InvalidArgument(f"prev_lsn {prev_lsn} must be below lsn {lsn}")
    if not _to_u64(pg, &c_pg) or c_pg > _PG_MAX:
        raise InvalidArgument(f"pg {pg} out of range 0..{PG_MAX}")
    # A negative or huge int has bits outside FLAGS_KNOWN, so it fails like in the reference.
    if not _to_u64(flags, &c_flags) or c_flags > 0xFF or not _flags_valid(<uint32_t>c_flags):
        raise InvalidArgument(f"flags {flags:#x}: need exactly one of PUT or DELETE, plus optional CPL")
    key_len = PyBytes_GET_SIZE(key)
    value_len = PyBytes_GET_SIZE(value)
    if not 1 <= key_len <= <Py_ssize_t>_KEY_BYTES_MAX:
        raise InvalidArgument(f"key of {key_len} bytes: keys are 1..{KEY_BYTES_MAX} bytes")
    if value_len > <Py_ssize_t>_VALUE_BYTES_MAX:
        raise InvalidArgument(f"value of {value_len} bytes: values are at most {VALUE_BYTES_MAX} bytes")
    if c_flags & _FLAG_DELETE and value_len:
        raise InvalidArgument("a DELETE record carries no value")
    if c_flags & _FLAG_EXPIRES and value_len < <Py_ssize_t>_EXPIRES_BYTES:
        raise InvalidArgument(f"an EXPIRES record's value starts with its {EXPIRES_BYTES}-byte deadline")
    total_len = _RECORD_HEADER + key_len + value_len
    out = PyBytes_FromStringAndSize(NULL, total_len)
    p = <unsigned char*>PyBytes_AS_STRING(out)
    _put_le32(p + 4, <uint32_t>total_len)
    _put_le64(p + 8, c_lsn)
    _put_le64(p + 16, c_prev_lsn)
    _put_le32(p + 24, <uint32_t>c_pg)
    p[28] = <unsigned char>c_flags
    p[29] = 0
    _put_le16(p + 30, <uint16_t>key_len)
    _put_le32(p + 32, <uint32_t>value_len)
    memcpy(p + _RECORD_HEADER, PyBytes_AS_STRING(key), key_len)
    memcpy(p + _RECORD_HEADER + key_len, PyBytes_AS_STRING(value), value_len)
    _crc(0, p + 4, total_len - 4, &crc)
    _put_le32(p, crc)
    return out


def encode_frame(records):
    """Join already-encoded records (in increasing LSN order) into a frame."""
    cdef Py_ssize_t count, i, body_len = 0, n
    cdef uint32_t crc = 0
    cdef object item
    cdef bytes out
    cdef unsigned char* p
    if type(records) is not list:
        return _reference.encode_frame(records)
    count = PyList_GET_SIZE(records)
    for i in range(count):
        item = <object>PyList_GET_ITEM(records, i)
        if type(item) is not bytes:
            return _reference.encode_frame(records)
        body_len += PyBytes_GET_SIZE(item)
    if <uint64_t>count > _FRAME_RECORDS_MAX or <uint64_t>(_FRAME_HEADER + body_len) > _FRAME_BYTES_MAX:
        raise InvalidArgument(
            f"frame of {count} records / {body_len} bytes exceeds "
            f"{_constants.FRAME_RECORDS_MAX} records / {_constants.FRAME_BYTES_MAX} bytes"
        )
    out = PyBytes_FromStringAndSize(NULL, _FRAME_HEADER + body_len)
    p = <unsigned char*>PyBytes_AS_STRING(out)
    _put_le32(p, _FRAME_MAGIC)
    _put_le32(p + 4, <uint32_t>count)
    _put_le32(p + 8, <uint32_t>body_len)
    _crc(0, p, 12, &crc)
    _put_le32(p + 12, crc)
    p += _FRAME_HEADER
    # No Python code runs in this loop, so the list cannot change under it.
    for i in range(count):
        item = <object>PyList_GET_ITEM(records, i)
        n = PyBytes_GET_SIZE(item)
        memcpy(p, PyBytes_AS_STRING(item), n)
        p += n
    return out


def verify_frame(frame):
    """Check every length, field and CRC of a frame; return its record count."""
    cdef Py_buffer view
    cdef Fault fault
    cdef Py_ssize_t count
    if not _get_bytes_view(frame, &view):
        return _reference.verify_frame(frame)
    try:
        if view.len >= _NOGIL_BYTES_MIN and _crc_fn != NULL:
            with nogil:
                count = _walk(<const unsigned char*>view.buf, view.len, &fault)
        else:
            count = _walk(<const unsigned char*>view.buf, view.len, &fault)
        if count < 0:
            _raise_fault(&fault)
        return count
    finally:
        PyBuffer_Release(&view)


cdef object _snapshot(object frame):
    """The bytes to decode from: `frame` itself when it is bytes, else an immutable copy.

    Building result objects runs Python code, during which another thread could change a
    bytearray under us; decoding from an immutable copy keeps every length verified by the first
    pass true in the second. Returns None when the reference should take the input."""
    cdef Py_buffer view
    if type(frame) is bytes:
        return frame
    if not _get_bytes_view(frame, &view):
        return None
    try:
        return PyBytes_FromStringAndSize(<const char*>view.buf, view.len)
    finally:
        PyBuffer_Release(&view)


# Result objects are the reference's NamedTuples. Calling `Record(...)` runs the NamedTuple's
# `__new__`, Python code, and `tuple.__new__(Record, items)` builds and copies a temporary tuple;
# allocating the instance through the type's `tp_alloc` and filling its slots is what
# `tuple.__new__` does for a subclass, without the temporary, and makes decoding 40% faster.
# That is valid only for tuple subclasses without a `__dict__` and with the fields we fill, which
# import checks here.
if not (issubclass(Record, tuple) and Record.__slots__ == () and Record._fields ==
        ("lsn", "prev_lsn", "pg", "flags", "key", "value")):
    raise ImportError("engine.codec._cython was compiled for another Record")
if not (issubclass(IndexedRecord, tuple) and IndexedRecord.__slots__ == () and IndexedRecord._fields ==
        ("pg", "lsn", "prev_lsn", "flags", "log_key", "version_key", "record")):
    raise ImportError("engine.codec._cython was compiled for another IndexedRecord")

cdef extern from *:
    """
    /* A new instance of a tuple subclass with n empty slots, as tuple.__new__ makes one. */
    static PyObject* sixfold_tuple_alloc(PyTypeObject* type, Py_ssize_t n) { return type->tp_alloc(type, n); }
    """
    object sixfold_tuple_alloc(type cls, Py_ssize_t n)


cdef inline void _set(object t, Py_ssize_t i, object item) noexcept:
    Py_INCREF(item)  # PyTuple_SET_ITEM steals a reference
    PyTuple_SET_ITEM(t, i, item)


def decode_frame(frame):
    """Decode a frame into Records, after verifying all of it."""
    cdef Fault fault
    cdef Py_ssize_t count, i, offset
    cdef const unsigned char* buf
    cdef const unsigned char* p
    cdef uint32_t key_len, value_len
    data = _snapshot(frame)
    if data is None:
        return _reference.decode_frame(frame)
    buf = <const unsigned char*>PyBytes_AS_STRING(data)
    count = _walk(buf, PyBytes_GET_SIZE(data), &fault)
    if count < 0:
        _raise_fault(&fault)
    # The frame is verified: every header below is known to be in bounds and well formed.
    out = []
    offset = _FRAME_HEADER
    for i in range(count):
        p = buf + offset
        key_len = _le16(p + 30)
        value_len = _le32(p + 32)
        r = sixfold_tuple_alloc(Record, 6)
        _set(r, 0, _le64(p + 8))
        _set(r, 1, _le64(p + 16))
        _set(r, 2, _le32(p + 24))
        _set(r, 3, <uint32_t>p[28])
        _set(r, 4, PyBytes_FromStringAndSize(<const char*>p + _RECORD_HEADER, key_len))
        _set(r, 5, PyBytes_FromStringAndSize(<const char*>p + _RECORD_HEADER + key_len, value_len))
        out.append(r)
        offset += _le32(p + 4)
    return out


def index_frame(frame):
    """Verify a frame and return what a storage node persists for each record."""
    cdef Fault fault
    cdef Py_ssize_t count, i, offset
    cdef const unsigned char* buf
    cdef const unsigned char* p
    cdef unsigned char* q
    cdef uint32_t key_len, total_len, pg
    cdef uint64_t lsn
    cdef bytes lk, vk
    data = _snapshot(frame)
    if data is None:
        return _reference.index_frame(frame)
    buf = <const unsigned char*>PyBytes_AS_STRING(data)
    count = _walk(buf, PyBytes_GET_SIZE(data), &fault)
    if count < 0:
        _raise_fault(&fault)
    out = []
    offset = _FRAME_HEADER
    for i in range(count):
        p = buf + offset
        total_len = _le32(p + 4)
        lsn = _le64(p + 8)
        pg = _le32(p + 24)
        key_len = _le16(p + 30)
        lk = PyBytes_FromStringAndSize(NULL, 12)
        q = <unsigned char*>PyBytes_AS_STRING(lk)
        _put_be32(q, pg)
        _put_be64(q + 4, lsn)
        vk = PyBytes_FromStringAndSize(NULL, 4 + key_len)
        q = <unsigned char*>PyBytes_AS_STRING(vk)
        _put_be32(q, pg)
        memcpy(q + 4, p + _RECORD_HEADER, key_len)
        r = sixfold_tuple_alloc(IndexedRecord, 7)
        _set(r, 0, pg)
        _set(r, 1, lsn)
        _set(r, 2, _le64(p + 16))
        _set(r, 3, <uint32_t>p[28])
        _set(r, 4, lk)
        _set(r, 5, vk)
        _set(r, 6, PyBytes_FromStringAndSize(<const char*>p, total_len))
        out.append(r)
        offset += total_len
    return out


def decode_record(buf):
    """Decode one stored record (exactly one, no frame header), verifying its CRC and fields."""
    cdef Fault fault
    cdef RecordHead h
    cdef const unsigned char* p
    cdef Py_ssize_t n
    data = _snapshot(buf)
    if data is None:
        return _reference.decode_record(buf)
    memset(&h, 0, sizeof(RecordHead))  # only read after _parse_record filled it; this quiets gcc
    p = <const unsigned char*>PyBytes_AS_STRING(data)
    n = PyBytes_GET_SIZE(data)
    if _parse_record(p, 0, n, 0, &h, &fault) < 0:
        _raise_fault(&fault)
    if <Py_ssize_t>h.total_len != n:
        _fault(&fault, FAULT_RECORD_TRAILING, 0, 0, <uint64_t>(n - h.total_len), 0, 0)
        _raise_fault(&fault)
    r = sixfold_tuple_alloc(Record, 6)
    _set(r, 0, h.lsn)
    _set(r, 1, h.prev_lsn)
    _set(r, 2, h.pg)
    _set(r, 3, h.flags)
    _set(r, 4, PyBytes_FromStringAndSize(<const char*>p + _RECORD_HEADER, h.key_len))
    _set(r, 5, PyBytes_FromStringAndSize(<const char*>p + _RECORD_HEADER + h.key_len, h.value_len))
    return r


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
