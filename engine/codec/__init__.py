"""Segment codec: picks the Cython twin when it is built, else the pure-Python reference.

`IMPLEMENTATION` says which one is loaded ("cython" or "python"). Set the environment variable
`SIXFOLD_CODEC=python` to force the reference, or `SIXFOLD_CODEC=cython` to insist on the
extension (an ImportError then says it is not built). Both twins share one API, one set of
exception classes (`engine.errors`) and the same messages; `engine.codec._python` is the spec.
"""

from __future__ import annotations

import os

from engine.codec import _python
from engine.codec._python import IndexedRecord, Record, log_key, version_key

_choice = os.environ.get("SIXFOLD_CODEC", "auto").strip().lower()
if _choice not in ("auto", "python", "cython"):
    raise ImportError(f"SIXFOLD_CODEC={_choice!r}: use 'python', 'cython' or leave it unset")

_impl = _python
IMPLEMENTATION = "python"
if _choice != "python":
    try:
        from engine.codec import _cython as _impl  # type: ignore[no-redef]

        IMPLEMENTATION = "cython"
    except ImportError:
        if _choice == "cython":
            raise ImportError(
                "SIXFOLD_CODEC=cython but the extension engine.codec._cython is not built: "
                "run `pip install -e .` (make demo does it)"
            ) from None

crc32c = _impl.crc32c
encode_record = _impl.encode_record
encode_frame = _impl.encode_frame
verify_frame = _impl.verify_frame
decode_frame = _impl.decode_frame
index_frame = _impl.index_frame
decode_record = _impl.decode_record

__all__ = [
    "IMPLEMENTATION",
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
