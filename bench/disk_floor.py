"""The disk's floor under a durable embedded put: what six synced LMDB commits cost on this disk.

    python bench/disk_floor.py [--rounds 400] [--seed 1] [--json out.json]

An embedded put is durable when four of six segments (six LMDB environments, one folder each,
all on the same disk here) have committed it with sync on. No engine code can make that faster
than the disk lets six commits end. This measures, side by side in one run, with 16-byte keys and
100-byte values:

* one environment, one synced put per transaction (what bench/embedded.py calls raw LMDB);
* six environments, one thread each, every round one synced put in each, all started together:
  the time until the 4th commit ends (a write quorum) and until the 6th;
* the same six commits one after another in one thread.

Speed is reported, never asserted. Every loop is bounded by its round count.
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

import lmdb

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from harness import percentile  # noqa: E402  (bench/harness.py)

VALUE = b"v" * 100
NODES = 6
QUORUM = 4


def pct(xs, q):
    return percentile(sorted(xs), q)


def open_envs(root: str, n: int):
    envs = []
    for i in range(n):
        path = os.path.join(root, f"n{i}")
        os.makedirs(path)
        envs.append(lmdb.open(path, map_size=1 << 28, sync=True, metasync=True))
    return envs


def one_env(root: str, rounds: int, rng: random.Random) -> list[float]:
    (env,) = open_envs(os.path.join(root, "one"), 1)
    lat = []
    for i in range(rounds):
        key = rng.randbytes(16)
        t0 = time.perf_counter()
        with env.begin(write=True) as txn:
            txn.put(key, VALUE)
        lat.append(time.perf_counter() - t0)
    env.close()
    return lat


def six_parallel(root: str, rounds: int, rng: random.Random) -> tuple[list[float], list[float]]:
    envs = open_envs(os.path.join(root, "par"), NODES)
    keys = [rng.randbytes(16) for _ in range(rounds)]
    start = [threading.Semaphore(0) for _ in range(NODES)]
    ends = [[0.0] * rounds for _ in range(NODES)]

    def worker(n: int) -> None:
        env = envs[n]
        for i in range(rounds):
            start[n].acquire()
            with env.begin(write=True) as txn:
                txn.put(keys[i], VALUE)
            ends[n][i] = time.perf_counter()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(NODES)]
    for t in threads:
        t.start()
    q4, q6 = [], []
    for i in range(rounds):
        t0 = time.perf_counter()
        for s in start:
            s.release()
        while any(ends[n][i] == 0.0 for n in range(NODES)):
            time.sleep(0.00005)
        done = sorted(ends[n][i] for n in range(NODES))
        q4.append(done[QUORUM - 1] - t0)
        q6.append(done[-1] - t0)
    for t in threads:
        t.join()
    for env in envs:
        env.close()
    return q4, q6


def six_sequential(root: str, rounds: int, rng: random.Random) -> list[float]:
    envs = open_envs(os.path.join(root, "seq"), NODES)
    lat = []
    for i in range(rounds):
        key = rng.randbytes(16)
        t0 = time.perf_counter()
        for env in envs:
            with env.begin(write=True) as txn:
                txn.put(key, VALUE)
        lat.append(time.perf_counter() - t0)
    for env in envs:
        env.close()
    return lat


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=400, help="rounds per measurement (1..100000)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--dir", default=None, help="where the environments go (default: a temporary folder)")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    if not 1 <= args.rounds <= 100_000:
        ap.error("--rounds must be 1..100000")
    print(f"seed {args.seed}, {args.rounds} rounds each", flush=True)
    rng = random.Random(args.seed)
    root = tempfile.mkdtemp(prefix="sixfold-disk-floor-", dir=args.dir)
    try:
        one = one_env(root, args.rounds, rng)
        q4, q6 = six_parallel(root, args.rounds, rng)
        seq = six_sequential(root, args.rounds, rng)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rows = [
        ("1 env, synced put", one),
        ("6 envs in parallel, 4th commit", q4),
        ("6 envs in parallel, 6th commit", q6),
        ("6 envs one after another", seq),
    ]
    base = pct(one, 0.5)
    print(f"{'measurement':34} {'p50 us':>8} {'p99 us':>8} {'p50 / 1 env':>12}")
    out = {"seed": args.seed, "rounds": args.rounds, "rows": []}
    for name, xs in rows:
        p50, p99 = pct(xs, 0.5) * 1e6, pct(xs, 0.99) * 1e6
        print(f"{name:34} {p50:8.0f} {p99:8.0f} {p50 / (base * 1e6):11.2f}x")
        out["rows"].append({"measurement": name, "p50_us": round(p50, 1), "p99_us": round(p99, 1)})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
