"""Reader endpoint benchmark: gets/s through `engine.connect(folder, role="reader")` with 1 and 2
reader instances, against the writer endpoint on the same cluster, and the readers' lag.

    python bench/readers.py [--seconds 3] [--clients 16,64] [--no-durable] [--json out.json] [--seed 1]

One TLS cluster (the default of `sixfold cluster up`) with one reader; keys pre-loaded through the
writer; then gets at each client count through the writer endpoint, through the reader endpoint
with one reader, and (after `reader add`) with two. Each get must return the pre-loaded value
(a wrong one counts as an error). Then the replica lag (`cluster status`: lag_lsns, lag_ms) of
each reader after a quiet second. On this 2-core machine every process shares the same two
cores, so a second reader adds serving threads, not CPU: the figure says what the balancing costs
or gains here, not what a reader on its own machine would. Speed is reported, never asserted;
every loop is bounded by time and count; the cluster is always torn down.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import harness  # noqa: E402  (bench/harness.py)
from cluster import free_base_port, sixfold_cluster  # noqa: E402  (bench/cluster.py)

import engine  # noqa: E402

GET_KEYS = 2_000
PORTS = 12  # writer, six nodes, room for the readers above them


def factory_of(db) -> harness.ClientFactory:
    client = harness.Client(put=db.put, get=db.get)
    return lambda _c: client


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0, help="time per measurement (default 3)")
    ap.add_argument("--clients", default="16,64", help="client thread counts (default 16,64)")
    ap.add_argument("--no-durable", action="store_true", help="segments do not fsync before acking")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    clients = [int(c) for c in args.clients.split(",") if c]
    rows: list[dict] = []
    with sixfold_cluster(durable=not args.no_durable, base_port=free_base_port(count=PORTS)) as (cluster, db):
        rid = cluster.add_reader()
        print(f"cluster {cluster.folder}: reader {rid} added")
        keys = harness.preload_keys("rget", GET_KEYS, args.seed)
        took = harness.preload(factory_of(db), keys, seed=args.seed)
        print(f"  preloaded {len(keys):,} keys in {took:.1f} s")

        def measure(system: str, target_db) -> None:
            for n in clients:
                r = harness.run_gets(factory_of(target_db), keys, name=f"{system} get, {n} clients", clients=n,
                                     seconds=args.seconds, seed=args.seed)
                rows.append({**r.row(), "kind": "get", "system": system})
                print(f"  {r.name:44} {r.ops_s:>9,.0f} ops/s  p99 {r.p99_ms:7.2f} ms  errors {r.errors}")

        measure("writer endpoint", db)
        last = db.put(b"rget:fence", b"x")
        with engine.connect(cluster.folder, role="reader") as ro:
            ro.get(b"rget:fence", after=last)
            measure("reader endpoint, 1 reader", ro)
        cluster.add_reader()
        with engine.connect(cluster.folder, role="reader") as ro:
            ro.get(b"rget:fence", after=last)
            measure("reader endpoint, 2 readers", ro)
        time.sleep(1.0)  # a quiet second, then the lag each reader reports
        lag = [{k: r.get(k) for k in ("id", "az", "lag_lsns", "lag_ms", "read_point")} for r in cluster.status()["readers"]]
    print()
    print(harness.format_table(rows))
    for r in lag:
        print(f"  reader {r['id']} (AZ {r['az']}): lag {r['lag_lsns']} LSNs, {r['lag_ms']} ms at read point {r['read_point']}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"latency_quantiles": list(harness.CDF_QUANTILES), "rows": rows, "lag": lag}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
