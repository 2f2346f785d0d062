"""Embedded engine benchmark, side by side with raw LMDB in the same run.

    python bench/embedded.py [--seconds 3] [--no-durable] [--json out.json] [--seed 1] [--encrypt]

Measures, with 100-byte values and 16-byte keys:
* puts/s with p50/p99 at 1, 8 and 64 threads (each put waits until 4 of 6 segments hold it);
* batch ingest (records/s) at 1,000 records per batch;
* gets/s (single segment) and quorum gets/s, from 8 threads;
* raw LMDB with the same sync setting: one put per synced transaction (latency), and 1,000 puts
  per transaction (ingest) — one copy, where Sixfold writes six;
* the codec twins (bench/codec.py), when available.
Speed is reported, never asserted. Every loop is bounded by time and count.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lmdb  # noqa: E402

import engine  # noqa: E402

VALUE = b"v" * 100
OPS_MAX = 2_000_000


def pct(sorted_lat, q):
    return sorted_lat[min(len(sorted_lat) - 1, int(len(sorted_lat) * q))] if sorted_lat else 0.0


def run_threads(n_threads, seconds, op):
    """Run op(thread_index, i) from n threads for `seconds`; return (ops/s, p50_ms, p99_ms)."""
    stop_at = time.perf_counter() + seconds
    lat: list[list[float]] = [[] for _ in range(n_threads)]

    def worker(t):
        mine = lat[t]
        i = 0
        while i < OPS_MAX and time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            op(t, i)
            mine.append(time.perf_counter() - t0)
            i += 1

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    elapsed = time.perf_counter() - t0
    allv = sorted(x for l in lat for x in l)
    return len(allv) / elapsed, pct(allv, 0.5) * 1e3, pct(allv, 0.99) * 1e3


def bench_engine(root, seconds, durable, seed, encryption_key=None):
    rows = []
    label = "sixfold" if encryption_key is None else "encrypted"
    path = os.path.join(root, label)
    with engine.open(path, durable=durable, write_timeout_s=30, encryption_key=encryption_key) as db:
        for n in (1, 8, 64):
            ops, p50, p99 = run_threads(n, seconds, lambda t, i, n=n: db.put(b"p%02d-%03d-%09d" % (n, t, i), VALUE))
            rows.append({"name": f"{label} put, {n} threads", "ops_s": ops, "p50_ms": p50, "p99_ms": p99})
        batch = 1000
        t0 = time.perf_counter()
        done = 0
        while time.perf_counter() - t0 < seconds and done < OPS_MAX:
            with db.batch() as b:
                for i in range(batch):
                    b.put(b"b%012d" % (done + i), VALUE)
            done += batch
        rows.append({"name": f"{label} batch ingest ({batch}/batch)", "ops_s": done / (time.perf_counter() - t0)})
        rng = random.Random(seed)
        keys = [b"b%012d" % rng.randrange(max(1, done)) for _ in range(10_000)]
        ops, p50, p99 = run_threads(8, seconds, lambda t, i: db.get(keys[(t * 7919 + i) % len(keys)]))
        rows.append({"name": f"{label} get, 8 threads", "ops_s": ops, "p50_ms": p50, "p99_ms": p99})
        ops, p50, p99 = run_threads(8, seconds, lambda t, i: db.get(keys[(t * 7919 + i) % len(keys)], quorum=True))
        rows.append({"name": f"{label} quorum get, 8 threads", "ops_s": ops, "p50_ms": p50, "p99_ms": p99})
        codec_impl = db.status()["codec"]
    return rows, codec_impl


def bench_lmdb(root, seconds, durable):
    rows = []
    path = os.path.join(root, "raw-lmdb")
    env = lmdb.open(path, map_size=8 << 30, sync=durable, metasync=durable)
    ops, p50, p99 = run_threads(1, seconds, lambda t, i: _raw_put(env, b"r%012d" % i))
    rows.append({"name": "raw LMDB put, 1 txn each", "ops_s": ops, "p50_ms": p50, "p99_ms": p99})
    batch = 1000
    t0 = time.perf_counter()
    done = 0
    while time.perf_counter() - t0 < seconds and done < OPS_MAX:
        with env.begin(write=True) as txn:
            for i in range(batch):
                txn.put(b"b%012d" % (done + i), VALUE)
        done += batch
    rows.append({"name": f"raw LMDB ingest ({batch}/txn)", "ops_s": done / (time.perf_counter() - t0)})
    env.close()
    return rows


def _raw_put(env, key):
    with env.begin(write=True) as txn:
        txn.put(key, VALUE)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0, help="time per measurement (default 3)")
    ap.add_argument("--no-durable", action="store_true", help="segments do not fsync before acking (default: durable)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-codec", action="store_true", help="skip the codec twins")
    ap.add_argument("--encrypt", action="store_true",
                    help="also run every engine measurement on an encrypted volume (AES-GCM at rest), same run")
    args = ap.parse_args(argv)
    durable = not args.no_durable
    print(f"seed {args.seed} | durable {durable} | {args.seconds:g} s per measurement | 100-byte values")
    root = tempfile.mkdtemp(prefix="sixfold-bench-")
    try:
        raw = bench_lmdb(root, args.seconds, durable)
        rows, impl = bench_engine(root, args.seconds, durable, args.seed)
        if args.encrypt:
            rows += bench_engine(root, args.seconds, durable, args.seed, encryption_key=os.urandom(32))[0]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rows += raw
    by = {r["name"]: r for r in rows}
    ratios = {
        "batch ingest / raw LMDB ingest": by["sixfold batch ingest (1000/batch)"]["ops_s"] / by["raw LMDB ingest (1000/txn)"]["ops_s"],
        "put p50 (1 thread) / raw LMDB put p50": by["sixfold put, 1 threads"]["p50_ms"] / by["raw LMDB put, 1 txn each"]["p50_ms"],
    }
    if args.encrypt:
        for what in ("put, 1 threads", "put, 8 threads", "put, 64 threads", "batch ingest (1000/batch)", "get, 8 threads"):
            ratios[f"encrypted / plain: {what}"] = by[f"encrypted {what}"]["ops_s"] / by[f"sixfold {what}"]["ops_s"]
    print(f"codec twin in use: {impl}\n")
    print(f"{'measurement':40} {'ops/s':>10} {'p50 ms':>8} {'p99 ms':>8}")
    for r in rows:
        p50 = f"{r['p50_ms']:.2f}" if "p50_ms" in r else ""
        p99 = f"{r['p99_ms']:.2f}" if "p99_ms" in r else ""
        print(f"{r['name']:40} {r['ops_s']:>10,.0f} {p50:>8} {p99:>8}")
    print()
    for k, v in ratios.items():
        print(f"{k:45} {v:6.2f}x")
    codec_rows = []
    if not args.no_codec:
        try:
            sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
            import codec as codec_bench  # bench/codec.py

            print("\ncodec twins:")
            codec_rows = codec_bench.run(seconds=min(1.0, args.seconds), seed=args.seed)
            print(codec_bench.format_table(codec_rows))
        except ImportError as e:
            print(f"\n(codec benchmark unavailable: {e})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"seed": args.seed, "durable": durable, "codec": impl, "rows": rows, "ratios": ratios, "codec_rows": codec_rows}, fh, indent=2)


if __name__ == "__main__":
    main()
