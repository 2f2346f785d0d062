"""Repair benchmark (embedded): rebuild a wiped node, recover the writer, catch up a lagging node.

    python bench/repair.py [--gb 1.0] [--value-kb 64] [--catch-up-writes 20000] [--json out.json] [--seed 1]

1. Fill a volume with about `--gb` GB of records (values of `--value-kb` KiB, batched).
2. Rebuild: wipe n2's folder and restart it; time until every PG's SCL on n2 equals the others'.
   Reports seconds and MB/s of record bytes copied (gossip fetches 8 MiB frames from peers).
3. Writer recovery: crash the writer and open a new one on that volume (seal, plan, truncate,
   re-replicate); reports seconds.
4. Catch-up: stop n3, write `--catch-up-writes` 100-byte puts from 16 threads, start n3; time
   until it has caught up.
The fill runs with durable=False (it is set-up, not the measurement); the measured phases reopen
durable. Speed is reported, never asserted; every loop is bounded.
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

import engine  # noqa: E402
from engine.node.service import wait_until  # noqa: E402

TIMEOUT_S = 600


def node_records_bytes(db, node_id):
    n = next(n for n in db.status()["nodes"] if n["id"] == node_id)
    return n.get("records", 0), n.get("scl", {})


def scls_equal(db, node_id, ref="n1"):
    st = db.status()
    a = next(n for n in st["nodes"] if n["id"] == node_id)
    b = next(n for n in st["nodes"] if n["id"] == ref)
    return a.get("scl") is not None and a.get("scl") == b.get("scl")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=1.0, help="volume size to fill (default 1.0)")
    ap.add_argument("--value-kb", type=int, default=64, help="value size in KiB (default 64)")
    ap.add_argument("--catch-up-writes", type=int, default=20_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--dir", help="work folder (default: a temp folder, removed afterwards)")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    print(f"seed {args.seed} | fill {args.gb:g} GB with {args.value_kb} KiB values | codec {engine.codec_implementation()}")
    root = args.dir or tempfile.mkdtemp(prefix="sixfold-repair-")
    path = os.path.join(root, "vol")
    rows = []
    try:
        value_bytes = args.value_kb * 1024
        total = int(args.gb * (1 << 30))
        records = max(1, total // value_bytes)
        per_batch = max(1, (4 << 20) // value_bytes)
        t0 = time.perf_counter()
        with engine.open(path, durable=False, write_timeout_s=60) as db:
            done = 0
            while done < records:
                with db.batch() as b:
                    for i in range(min(per_batch, records - done)):
                        b.put(b"r%012d" % (done + i), rng.randbytes(value_bytes))
                done += per_batch
                if done % (per_batch * 20) == 0:
                    print(f"\r  filling: {min(done, records):,}/{records:,} records", end="", flush=True)
        fill_s = time.perf_counter() - t0
        print(f"\r  filled {records:,} records ({records * value_bytes / 1e9:.2f} GB of values) in {fill_s:.1f} s")

        with engine.open(path, write_timeout_s=60, gossip_interval_s=0.02) as db:
            recs, _ = node_records_bytes(db, "n1")
            data_bytes = sum(n.get("bytes", 0) for n in db.status()["nodes"] if n["id"] == "n1")
            t0 = time.perf_counter()
            db.cluster.wipe_node("n2")
            db.put(b"poke", b"1")
            last = -1
            while not scls_equal(db, "n2") and time.perf_counter() - t0 < TIMEOUT_S:
                got, _ = node_records_bytes(db, "n2")
                if got != last:
                    print(f"\r  rebuilding n2: {got:,}/{recs:,} records", end="", flush=True)
                    last = got
                time.sleep(0.05)
            rebuild_s = time.perf_counter() - t0
            payload = records * (value_bytes + 50)
            print(f"\r  rebuilt n2: {recs:,} records in {rebuild_s:.2f} s" + " " * 20)
            rows.append({"name": "rebuild wiped node", "seconds": rebuild_s, "MB_s": payload / rebuild_s / 1e6,
                         "records": recs, "lmdb_bytes": data_bytes})

            t0 = time.perf_counter()
            db.cluster.crash_writer()
            rec_s = time.perf_counter() - t0
            rows.append({"name": "writer recovery (crash + open)", "seconds": rec_s,
                         "recovery_reported_s": db.status()["writer"]["recovery"]["seconds"]})

            db.cluster.stop_node("n3")
            n = args.catch_up_writes
            threads = 16
            val = b"v" * 100

            def writer(t):
                for i in range(t, n, threads):
                    db.put(b"c%09d" % i, val)

            ts = [threading.Thread(target=writer, args=(t,)) for t in range(threads)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            t0 = time.perf_counter()
            db.cluster.start_node("n3")
            db.put(b"poke2", b"1")
            wait_until(lambda: scls_equal(db, "n3"), TIMEOUT_S, 0.01)
            rows.append({"name": f"catch-up after {n:,} missed writes", "seconds": time.perf_counter() - t0})
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    print(f"\n{'measurement':40} {'seconds':>9} {'MB/s':>9}")
    for r in rows:
        mbs = f"{r['MB_s']:.0f}" if "MB_s" in r else ""
        print(f"{r['name']:40} {r['seconds']:>9.3f} {mbs:>9}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"seed": args.seed, "gb": args.gb, "value_kb": args.value_kb, "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
