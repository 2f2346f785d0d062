"""Writes through a real AZ cut: put latencies before and during an nft cut of AZ b.

    python bench/netns_cut.py [--seconds 6] [--clients 8] [--durable] [--json out.json]

Linux, as root: starts a `cluster up --netns` cluster in a temporary folder (every process in
a network namespace of its own), runs `--clients` threads of puts for `--seconds` (steady), cuts
AZ b off with nft drop rules (engine.cluster.netfaults) and runs as long again, heals, checks
every acknowledged put reads back, and removes the cluster and its namespaces. Reports the
steady p50/p99, the p99 and slowest put during the cut, and the ratio of that slowest put to the
steady p99 (the issue's target: at most 2). Speed is reported, never asserted; every loop is
bounded by time and count.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import engine  # noqa: E402
from engine.cluster import Cluster  # noqa: E402
from engine.cluster.netfaults import NetFaults  # noqa: E402
from engine.cluster.netns import unavailable_reason  # noqa: E402

PUTS_MAX = 200_000


def _phase(db, clients: int, seconds: float, tag: str, acked: dict) -> list[float]:
    latencies: list[float] = []
    starts: list[float] = []
    began = time.perf_counter()
    lock = threading.Lock()
    stop = time.monotonic() + seconds
    errors: list[str] = []

    def run(i: int) -> None:
        n = 0
        while time.monotonic() < stop and n < PUTS_MAX:
            key, value = f"{tag}:{i}:{n}".encode(), f"v{n}".encode()
            t0 = time.perf_counter()
            try:
                db.put(key, value)
            except engine.SixfoldError as e:
                errors.append(f"{type(e).__name__}: {e}")
                continue
            finally:
                n += 1
            dt = time.perf_counter() - t0
            with lock:
                latencies.append(dt)
                starts.append(t0 - began)
                acked[key] = value

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        print(f"{tag}: {len(errors)} puts failed, first: {errors[0]}", file=sys.stderr)
    by_second: dict[int, list[float]] = {}
    for start, dt in zip(starts, latencies):
        by_second.setdefault(int(start), []).append(dt)
    BY_SECOND[tag] = {s: round(_pct(v, 0.99) * 1e3, 1) for s, v in sorted(by_second.items())}
    return latencies


#: {phase: {second: p99 ms}}: where in a phase the slow puts are
BY_SECOND: dict[str, dict[int, float]] = {}


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--durable", action="store_true", help="nodes fsync before acknowledging (default: not)")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    reason = unavailable_reason()
    if reason:
        print(f"netns_cut: {reason}", file=sys.stderr)
        return 2
    folder = tempfile.mkdtemp(prefix="sixfold-netns-cut-")
    c = Cluster(os.path.join(folder, "c"))
    try:
        c.up(netns=True, durable=args.durable, protection_groups=4, no_metrics=True)
        acked: dict[bytes, bytes] = {}
        with c.connect() as db:
            _phase(db, args.clients, 1.0, "warm", acked)
            steady = _phase(db, args.clients, args.seconds, "steady", acked)
            faults = NetFaults(c.folder)
            faults.cut_az("b")
            cut = _phase(db, args.clients, args.seconds, "cut", acked)
            faults.heal()
            lost = [k for k, v in acked.items() if db.get(k) != v]
        out = {
            "clients": args.clients, "seconds": args.seconds, "durable": args.durable,
            "steady_puts": len(steady), "steady_p50_ms": _pct(steady, 0.5) * 1e3, "steady_p99_ms": _pct(steady, 0.99) * 1e3,
            "cut_puts": len(cut), "cut_p50_ms": _pct(cut, 0.5) * 1e3, "cut_p99_ms": _pct(cut, 0.99) * 1e3,
            "steady_max_ms": max(steady) * 1e3 if steady else float("nan"),
            "cut_max_ms": max(cut) * 1e3 if cut else float("nan"),
            "lost": len(lost),
            "p99_ms_by_second": {k: v for k, v in BY_SECOND.items() if k != "warm"},
        }
        out["cut_max_over_steady_p99"] = out["cut_max_ms"] / out["steady_p99_ms"]
        print(json.dumps(out, indent=2))
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(out, fh, indent=2)
        return 0 if not lost else 1
    finally:
        c.down(timeout_s=10)
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
