"""Backups and restore on the embedded engine: what archiving costs, and how fast it goes.

    python bench/backup.py [--mb 64] [--value-bytes 1024,16384] [--seconds 4] [--rounds 2] [--json out.json]

Measures (bench/lifecycle.py's `backup` and `restore` scenarios call `put_overhead` and
`backup_and_restore`; `run(...)` returns all the figures):
* put latency p50/p99, one thread, 100-byte values, without and with continuous backups
  (alternating runs, so drift of the machine falls on both): the archiver's cost on the put path;
* backup MB/s: a base snapshot of `--mb` MB of live data, and the log archived while it is written;
* restore MB/s: live data per second of a restore from that archive into a new embedded volume
  (the bulk path: six copies written, durable), per value size.
Speed is reported, never asserted. Every loop is bounded by time and count.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import engine  # noqa: E402
from engine.backup.archiver import BackupOptions  # noqa: E402

PUTS_MAX = 200_000
SECONDS_MAX = 60.0


def pct(sorted_values, q):
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * q))] if sorted_values else 0.0


def put_latency(folder: str, seconds: float, backup: str | None) -> dict:
    """p50/p99 of sequential 100-byte puts for `seconds` (after a 0.5 s warm-up)."""
    shutil.rmtree(folder, ignore_errors=True)
    opts = {"backup": backup, "backup_options": BackupOptions()} if backup else {}
    lat = []
    with engine.open(folder, **opts) as db:
        value = b"v" * 100
        warm = time.perf_counter() + 0.5
        while time.perf_counter() < warm:
            db.put(b"warm", value)
        stop = time.perf_counter() + min(seconds, SECONDS_MAX)
        i = 0
        while i < PUTS_MAX and time.perf_counter() < stop:
            t0 = time.perf_counter()
            db.put(b"key:%08d" % i, value)
            lat.append(time.perf_counter() - t0)
            i += 1
        st = db.status().get("backup")
    lat.sort()
    return {"puts": len(lat), "p50_ms": round(pct(lat, 0.5) * 1e3, 3), "p99_ms": round(pct(lat, 0.99) * 1e3, 3),
            "archived": st["records_archived"] if st else None}


def load(db, mb: int, value_bytes: int) -> int:
    """Write `mb` MB of live data in batches of 1,000; returns the bytes written."""
    value = os.urandom(value_bytes // 2).hex().encode()[:value_bytes]
    total, i = 0, 0
    deadline = time.monotonic() + SECONDS_MAX
    while total < mb * 1_000_000 and time.monotonic() < deadline:
        with db.batch() as b:
            for _ in range(1000):
                key = b"user:%010d" % i
                b.put(key, value)
                total += len(key) + len(value)
                i += 1
    return total


def put_overhead(root: str, seconds: float = 4.0, rounds: int = 2) -> dict:
    """The archiver's cost on the put path: `rounds` pairs of runs, without then with backups
    (alternating, so drift of the machine falls on both); p50 of each, the best of each side, and
    the median of the pairs' ratios (the steadier figure on a noisy machine)."""
    runs: dict = {"without": [], "with": []}
    for rep in range(rounds):
        runs["without"].append(put_latency(os.path.join(root, f"p{rep}a"), seconds, None))
        runs["with"].append(put_latency(os.path.join(root, f"p{rep}b"), seconds, os.path.join(root, f"pbk{rep}")))
        for side in "ab":
            shutil.rmtree(os.path.join(root, f"p{rep}{side}"), ignore_errors=True)
        shutil.rmtree(os.path.join(root, f"pbk{rep}"), ignore_errors=True)
    p50 = {k: sorted(r["p50_ms"] for r in v)[0] for k, v in runs.items()}
    ratios = sorted(b["p50_ms"] / a["p50_ms"] for a, b in zip(runs["without"], runs["with"]) if a["p50_ms"])
    return {"runs": runs, "p50_ms_without": p50["without"], "p50_ms_with": p50["with"],
            "p50_overhead_pct": round(100 * (p50["with"] / p50["without"] - 1), 1),
            "p50_overhead_pct_median_of_pairs": round(100 * (ratios[len(ratios) // 2] - 1), 1) if ratios else None}


def backup_and_restore(root: str, mb: int, vb: int) -> tuple[dict, dict]:
    """`mb` MB of `vb`-byte values written to a volume backed up as it goes, then a base taken
    on demand, then a restore from it into a new embedded volume: (backup, restore) figures."""
    vol, bk = os.path.join(root, f"vol{vb}"), os.path.join(root, f"bk{vb}")
    try:
        with engine.open(vol, backup=bk, backup_options=BackupOptions(segment_s=1.0)) as db:
            t0 = time.monotonic()
            written = load(db, mb, vb)
            vdl = db.status()["vdl"]
            while db.status()["backup"]["position"] < vdl and time.monotonic() - t0 < SECONDS_MAX:
                time.sleep(0.01)
            log_s = time.monotonic() - t0
            t1 = time.monotonic()
            db.cluster.backup_now()
            base_s = time.monotonic() - t1
            st = db.status()["backup"]
        shutil.rmtree(vol, ignore_errors=True)
        backup = {"live_bytes": written, "log_mb_per_s_while_writing": round(written / 1e6 / log_s, 1),
                  "base_mb_per_s": round(written / 1e6 / base_s, 1), "base_s": round(base_s, 2),
                  "archive_bytes": st["bytes_written"]}
        c0 = time.process_time()
        r = engine.restore(bk, os.path.join(root, f"restored{vb}"))
        cpu_s = time.process_time() - c0
        restore = {k: r[k] for k in ("keys", "live_bytes", "seconds", "mb_per_s", "records")}
        restore["mb_per_cpu_s"] = round(r["live_bytes"] / 1e6 / cpu_s, 1)
        return backup, restore
    finally:
        for name in (f"vol{vb}", f"bk{vb}", f"restored{vb}"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def run(mb: int = 64, value_bytes: tuple[int, ...] = (1024, 16384), seconds: float = 4.0, root: str | None = None,
        rounds: int = 2) -> dict:
    root = root or tempfile.mkdtemp(prefix="sixfold-bench-backup-")
    out: dict = {"mb": mb, "value_bytes": list(value_bytes), "load_average": os.getloadavg()[0]}
    try:
        out["put_latency"] = put_overhead(root, seconds, rounds)
        out["backup"], out["restore"] = {}, {}
        for vb in value_bytes:
            out["backup"][vb], out["restore"][vb] = backup_and_restore(root, mb, vb)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=int, default=64, help="MB of live data for the backup and restore figures (default 64)")
    p.add_argument("--value-bytes", default="1024,16384", help="value sizes of that data, each measured (default 1024,16384)")
    p.add_argument("--seconds", type=float, default=4.0, help="seconds per put-latency run (default 4)")
    p.add_argument("--rounds", type=int, default=2, help="pairs of put-latency runs, without and with backups (default 2)")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = p.parse_args()
    if not 1 <= args.rounds <= 20 or not 1 <= args.mb <= 4096 or not 0 < args.seconds <= SECONDS_MAX:
        p.error("--rounds must be in 1..20, --mb in 1..4096, --seconds in (0, 60]")
    r = run(args.mb, tuple(int(x) for x in args.value_bytes.split(",")), args.seconds, rounds=args.rounds)
    pl = r["put_latency"]
    print(f"put p50, one thread: {pl['p50_ms_without']} ms without backups, {pl['p50_ms_with']} ms with "
          f"({pl['p50_overhead_pct']:+.1f}%; median of {args.rounds} alternating pairs: "
          f"{pl['p50_overhead_pct_median_of_pairs']:+.1f}%)")
    for vb, b in r["backup"].items():
        print(f"{vb}-byte values: backup: log archived at {b['log_mb_per_s_while_writing']} MB/s while written; base "
              f"snapshot {b['base_mb_per_s']} MB/s ({b['live_bytes'] / 1e6:.1f} MB in {b['base_s']} s)")
        rs = r["restore"][vb]
        print(f"{vb}-byte values: restore: {rs['live_bytes'] / 1e6:.1f} MB of live data ({rs['keys']} keys) in "
              f"{rs['seconds']} s = {rs['mb_per_s']} MB/s ({rs['mb_per_cpu_s']} MB per CPU second; six copies, durable)")
    print(f"(load average {r['load_average']:.1f} on {os.cpu_count()} cores at the start)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(r, fh, indent=2)


if __name__ == "__main__":
    main()
