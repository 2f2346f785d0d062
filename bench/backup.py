"""Backups and restore on the embedded engine: what archiving costs, and how fast it goes.

    python bench/backup.py [--mb 64] [--value-bytes 1024,16384] [--seconds 4] [--json out.json]

Measures (a section for bench/lifecycle.py to fold in: `run(...)` returns the figures):
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


def run(mb: int = 64, value_bytes: tuple[int, ...] = (1024, 16384), seconds: float = 4.0, root: str | None = None) -> dict:
    root = root or tempfile.mkdtemp(prefix="sixfold-bench-backup-")
    out: dict = {"mb": mb, "value_bytes": list(value_bytes), "load_average": os.getloadavg()[0]}
    try:
        # 1. The put path, without and with the archiver (alternating: ABAB).
        runs = {"without": [], "with": []}
        for rep in range(2):
            runs["without"].append(put_latency(os.path.join(root, f"p{rep}a"), seconds, None))
            runs["with"].append(put_latency(os.path.join(root, f"p{rep}b"), seconds, os.path.join(root, f"pbk{rep}")))
        p50 = {k: sorted(r["p50_ms"] for r in v)[0] for k, v in runs.items()}
        out["put_latency"] = {"runs": runs, "p50_ms_without": p50["without"], "p50_ms_with": p50["with"],
                              "p50_overhead_pct": round(100 * (p50["with"] / p50["without"] - 1), 1)}
        out["backup"], out["restore"] = {}, {}
        for vb in value_bytes:
            # 2. Backup: the log archived while it is written, then a base snapshot of it all.
            vol, bk = os.path.join(root, f"vol{vb}"), os.path.join(root, f"bk{vb}")
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
            out["backup"][vb] = {"live_bytes": written, "log_mb_per_s_while_writing": round(written / 1e6 / log_s, 1),
                                 "base_mb_per_s": round(written / 1e6 / base_s, 1), "base_s": round(base_s, 2),
                                 "archive_bytes": st["bytes_written"]}
            # 3. Restore from the newest base into a new embedded volume.
            c0 = time.process_time()
            r = engine.restore(bk, os.path.join(root, f"restored{vb}"))
            cpu_s = time.process_time() - c0
            out["restore"][vb] = {k: r[k] for k in ("keys", "live_bytes", "seconds", "mb_per_s", "records")}
            out["restore"][vb]["mb_per_cpu_s"] = round(r["live_bytes"] / 1e6 / cpu_s, 1)
            shutil.rmtree(vol, ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=int, default=64, help="MB of live data for the backup and restore figures (default 64)")
    p.add_argument("--value-bytes", default="1024,16384", help="value sizes of that data, each measured (default 1024,16384)")
    p.add_argument("--seconds", type=float, default=4.0, help="seconds per put-latency run (default 4; four runs)")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = p.parse_args()
    r = run(args.mb, tuple(int(x) for x in args.value_bytes.split(",")), args.seconds)
    pl = r["put_latency"]
    print(f"put p50, one thread: {pl['p50_ms_without']} ms without backups, {pl['p50_ms_with']} ms with "
          f"({pl['p50_overhead_pct']:+.1f}%)")
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
