"""Codec benchmark: both twins side by side, on frames of records with 16-byte keys and 100-byte values.

Measures, for the pure-Python reference and the Cython twin in one run:
  encode        encode_record for every record, then encode_frame
  verify_frame  every length, field and CRC of the frame
  decode_frame  verify, then build Records
  index_frame   verify, then build what a storage node persists per record
and prints MB/s (10**6 bytes of frame per second), records/s and the cython/python ratio.

Each measurement repeats the operation for `--seconds` (after one warm-up call) and reports the
total; the run is bounded by 8 measurements of that budget plus set-up (under 30 s with the
default). Inputs come from `--seed`, which is printed so a run can be repeated.

    python bench/codec.py [--records 1000] [--seconds 0.5] [--seed N] [--json PATH]

`run(seconds, seed)` returns the rows as dicts, for bench/embedded.py to include.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

try:
    import engine  # noqa: F401
except ImportError:  # run from a checkout that is not installed: use the tree this file is in
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.codec import _python
from engine.core.constants import FLAG_PUT

try:
    from engine.codec import _cython
except ImportError:
    _cython = None

KEY_BYTES = 16
VALUE_BYTES = 100
RECORDS_DEFAULT = 1000
SECONDS_DEFAULT = 0.5
#: No budget above this: eight measurements must stay well under a minute.
SECONDS_MAX = 3.0
OPERATIONS = ("encode", "verify_frame", "decode_frame", "index_frame")


def make_fields(records: int, seed: int) -> list[tuple[int, int, int, int, bytes, bytes]]:
    """Fields of `records` PUT records in increasing LSN order across 8 protection groups."""
    rng = random.Random(seed)
    fields, lsn, last_lsn_of_pg = [], 0, {}
    for _ in range(records):
        lsn += rng.randint(1, 3)
        pg = rng.randrange(8)
        fields.append((lsn, last_lsn_of_pg.get(pg, 0), pg, FLAG_PUT, rng.randbytes(KEY_BYTES), rng.randbytes(VALUE_BYTES)))
        last_lsn_of_pg[pg] = lsn
    return fields


def _measure(call, seconds: float) -> tuple[int, float]:
    """Call `call()` repeatedly for about `seconds`; return (calls, elapsed seconds)."""
    call()  # warm-up: first-call costs (imports, caches) are not what we measure
    calls, start = 0, time.perf_counter()
    deadline = start + seconds
    while True:
        call()
        calls += 1
        now = time.perf_counter()
        if now >= deadline:
            return calls, now - start


def _operations(codec, fields, frame):
    def encode():
        return codec.encode_frame([codec.encode_record(*f) for f in fields])

    return {
        "encode": encode,
        "verify_frame": lambda: codec.verify_frame(frame),
        "decode_frame": lambda: codec.decode_frame(frame),
        "index_frame": lambda: codec.index_frame(frame),
    }


def run(seconds: float = SECONDS_DEFAULT, seed: int = 0, records: int = RECORDS_DEFAULT) -> list[dict]:
    """Measure every operation of both twins; one dict per (operation, twin).

    Each dict has: bench, operation, implementation, crc_backend, records_per_frame, key_bytes,
    value_bytes, frame_bytes, calls, seconds, mb_per_s, records_per_s, seed, and, on the Cython
    rows, ratio_vs_python (its MB/s over the reference's)."""
    assert 0 < seconds <= SECONDS_MAX, f"seconds must be in (0, {SECONDS_MAX}]"
    assert records >= 1
    fields = make_fields(records, seed)
    frame = _python.encode_frame([_python.encode_record(*f) for f in fields])
    twins = [("python", _python, "google_crc32c")]
    if _cython is not None:
        twins.append(("cython", _cython, _cython.CRC_BACKEND))
        # The benchmark is only meaningful if both twins agree on this input.
        assert _cython.encode_frame([_cython.encode_record(*f) for f in fields]) == frame
        assert _cython.decode_frame(frame) == _python.decode_frame(frame)
    rows: list[dict] = []
    for name, codec, crc_backend in twins:
        operations = _operations(codec, fields, frame)
        for operation in OPERATIONS:
            calls, elapsed = _measure(operations[operation], seconds)
            rows.append(
                {
                    "bench": "codec",
                    "operation": operation,
                    "implementation": name,
                    "crc_backend": crc_backend,
                    "records_per_frame": records,
                    "key_bytes": KEY_BYTES,
                    "value_bytes": VALUE_BYTES,
                    "frame_bytes": len(frame),
                    "calls": calls,
                    "seconds": round(elapsed, 4),
                    "mb_per_s": round(calls * len(frame) / elapsed / 1e6, 1),
                    "records_per_s": round(calls * records / elapsed),
                    "seed": seed,
                }
            )
    python_rate = {r["operation"]: r["mb_per_s"] for r in rows if r["implementation"] == "python"}
    for row in rows:
        if row["implementation"] == "cython":
            row["ratio_vs_python"] = round(row["mb_per_s"] / python_rate[row["operation"]], 1)
    return rows


def format_table(rows: list[dict]) -> str:
    """Both twins side by side, one line per operation."""
    by_key = {(r["operation"], r["implementation"]): r for r in rows}
    lines = [
        f"{'operation':<13} {'python MB/s':>11} {'python rec/s':>13} {'cython MB/s':>11} {'cython rec/s':>13} {'ratio':>7}",
    ]
    for operation in OPERATIONS:
        py_row, cy_row = by_key.get((operation, "python")), by_key.get((operation, "cython"))
        cells = [f"{operation:<13}"]
        for row in (py_row, cy_row):
            cells += [f"{row['mb_per_s']:>11,.1f}", f"{row['records_per_s']:>13,}"] if row else [f"{'-':>11}", f"{'-':>13}"]
        cells.append(f"{cy_row['ratio_vs_python']:>6.1f}x" if cy_row else f"{'-':>7}")
        lines.append(" ".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=RECORDS_DEFAULT, help="records per frame")
    parser.add_argument("--seconds", type=float, default=SECONDS_DEFAULT, help=f"budget per measurement (max {SECONDS_MAX})")
    parser.add_argument("--seed", type=int, default=None, help="input seed (random and printed when not given)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON to PATH")
    args = parser.parse_args(argv)
    if not 0 < args.seconds <= SECONDS_MAX:
        parser.error(f"--seconds must be in (0, {SECONDS_MAX}]")
    if args.records < 1:
        parser.error("--records must be at least 1")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    rows = run(args.seconds, seed, args.records)
    frame_bytes = rows[0]["frame_bytes"]
    crc = _cython.CRC_BACKEND if _cython is not None else "-"
    print(
        f"codec bench: seed {seed}, {args.records} records/frame ({KEY_BYTES}-byte keys, {VALUE_BYTES}-byte values, "
        f"{frame_bytes:,} bytes/frame), {args.seconds} s per measurement, cython crc32c via {crc}"
    )
    if _cython is None:
        print("the Cython twin is not built (pip install -e .): python rows only")
    print(format_table(rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(rows, out, indent=2)
            out.write("\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
