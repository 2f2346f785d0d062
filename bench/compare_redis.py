"""Sixfold's Redis endpoint against redis-server with `appendfsync always`, same tool, same run.

    python bench/compare_redis.py [--requests 20000] [--clients 16] [--pipeline 16] [--json out.json]
                                  [--cache-ops 200000]

Both systems are durable before they answer: redis-server with `appendonly yes` and
`appendfsync always` (an fsync of the AOF before each reply, batched across clients by its event
loop), Sixfold with a write on 4 of 6 fsynced segments (a cluster on loopback, `sixfold cluster up`,
and its Redis endpoint from `--redis-port`). Each is driven by `redis-benchmark -t set,get -c
CLIENTS` (3-byte values, random keys out of 100,000), then again with `-P PIPELINE`; one system
at a time, never both on the same cores at once. The table gives requests per second and p50
latency side by side and the ratio Sixfold / Redis, against the targets of issue 14 (SET at 16
clients >= 0.25x, SET -P 16 >= 0.5x, GET >= 0.5x).

Then the client cache in process (`engine.cache`, through `Database.get` of an embedded volume):
the time of a hit and of a miss (a miss is a read of a segment), in microseconds (target: a hit
<= 5 us).

Needs redis-server and redis-benchmark (Debian: apt-get install -y redis-server redis-tools);
without them it says so and exits 0 after the cache figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import engine  # noqa: E402

TARGETS = {"SET": 0.25, "SET -P": 0.5, "GET": 0.5, "GET -P": None}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_benchmark(port: int, requests: int, clients: int, pipeline: int, password: str | None = None) -> dict[str, dict]:
    """{"SET": {"rps", "p50_ms"}, "GET": ...} from redis-benchmark's CSV."""
    argv = ["redis-benchmark", "-p", str(port), "-t", "set,get", "-n", str(requests), "-c", str(clients),
            "-P", str(pipeline), "-r", "100000", "--csv", "-q"]
    if password:
        argv += ["-a", password]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=True).stdout
    rows: dict[str, dict] = {}
    for line in out.splitlines():
        cells = [c.strip('"') for c in line.split(",")]
        if len(cells) >= 2 and cells[0] in ("SET", "GET"):
            rows[cells[0]] = {"rps": float(cells[1]), "p50_ms": float(cells[4]) if len(cells) > 4 else None}
    return rows


def run_redis(requests: int, clients: int, pipeline: int) -> dict:
    d = tempfile.mkdtemp(prefix="sixfold-bench-redis-")
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--dir", d, "--appendonly", "yes",
                             "--appendfsync", "always", "--save", ""], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        from engine.redis.cli import ping

        deadline = time.monotonic() + 20
        while not ping("127.0.0.1", port) and time.monotonic() < deadline:
            time.sleep(0.05)
        plain = redis_benchmark(port, requests, clients, 1)
        piped = redis_benchmark(port, requests, clients, pipeline)
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(d, ignore_errors=True)
    return {"SET": plain["SET"], "GET": plain["GET"], "SET -P": piped["SET"], "GET -P": piped["GET"]}


def run_sixfold(requests: int, clients: int, pipeline: int) -> dict:
    from engine.cluster import Cluster
    from engine.cluster.testing import free_base_port
    from engine.redis.cli import start_background, stop_background

    d = tempfile.mkdtemp(prefix="sixfold-bench-cluster-")
    c = Cluster(os.path.join(d, "c"))
    port = free_port()
    try:
        c.up(base_port=free_base_port(), protection_groups=8, timeout_s=120, no_auth=True, insecure=True)
        start_background(c.folder, port)
        plain = redis_benchmark(port, requests, clients, 1)
        piped = redis_benchmark(port, requests, clients, pipeline)
    finally:
        stop_background(c.folder)
        c.down(timeout_s=20)
        shutil.rmtree(d, ignore_errors=True)
    return {"SET": plain["SET"], "GET": plain["GET"], "SET -P": piped["SET"], "GET -P": piped["GET"]}


def cache_latencies(ops: int) -> dict:
    """Microseconds per Database.get: a cache hit, and a miss (a segment read), embedded."""
    d = tempfile.mkdtemp(prefix="sixfold-bench-cache-")
    try:
        with engine.open(os.path.join(d, "v"), durable=False, cache={"bytes_max": 64 << 20}) as db:
            keys = [b"key:%06d" % i for i in range(1000)]
            with db.batch() as b:
                for k in keys:
                    b.put(k, b"x" * 100)
            for k in keys:
                db.get(k)  # cached (write-through already did; this makes sure)
            t0 = time.perf_counter()
            for i in range(ops):
                db.get(keys[i % 1000])
            hit_us = (time.perf_counter() - t0) / ops * 1e6
            plain = db._backend._inner
            n = min(ops // 20, 5000)
            t0 = time.perf_counter()
            for i in range(n):
                plain.get(keys[i % 1000], quorum=False, view=None)
            miss_us = (time.perf_counter() - t0) / n * 1e6
            stats = db.cache_stats()
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return {"hit_us": round(hit_us, 2), "miss_us": round(miss_us, 1), "hit_ratio": stats["hit_ratio"], "target_hit_us": 5.0}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=20_000)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--pipeline", type=int, default=16)
    p.add_argument("--cache-ops", type=int, default=200_000)
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    result: dict = {"requests": args.requests, "clients": args.clients, "pipeline": args.pipeline}
    result["cache"] = cache_latencies(args.cache_ops)
    print(f"client cache, in process: hit {result['cache']['hit_us']} us (target <= 5), "
          f"miss {result['cache']['miss_us']} us")
    if not (shutil.which("redis-server") and shutil.which("redis-benchmark")):
        print("redis-server or redis-benchmark is absent (apt-get install -y redis-server redis-tools): "
              "the side-by-side run is skipped")
    else:
        result["redis"] = run_redis(args.requests, args.clients, args.pipeline)
        result["sixfold"] = run_sixfold(args.requests, args.clients, args.pipeline)
        print(f"\nredis-benchmark -t set,get -c {args.clients} -n {args.requests} (and -P {args.pipeline}), "
              "both durable before each reply")
        print(f"{'test':8} {'redis rps':>11} {'sixfold rps':>12} {'ratio':>7} {'target':>7}   p50 ms redis / sixfold")
        result["ratios"] = {}
        for name, target in TARGETS.items():
            r, s = result["redis"][name], result["sixfold"][name]
            ratio = s["rps"] / r["rps"] if r["rps"] else 0.0
            result["ratios"][name] = round(ratio, 3)
            tgt = f">={target}" if target is not None else "-"
            print(f"{name:8} {r['rps']:11.0f} {s['rps']:12.0f} {ratio:7.2f} {tgt:>7}   {r['p50_ms']} / {s['p50_ms']}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
