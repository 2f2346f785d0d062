"""Storage lifecycle benchmarks: version collection, backups, restore.

    python bench/lifecycle.py [--only collection|backup|restore] [--keys 1000] [--puts 1000000]
                              [--batch 100] [--seconds 40] [--collect-delay-s 0.1] [--durable]
                              [--backup-mb 64] [--backup-value-bytes 1024,16384]
                              [--latency-seconds 3] [--latency-rounds 3] [--json out.json]

Each scenario is a function in SCENARIOS (name -> function(args) -> dict of results), run in
order and reported as one table row per measured figure; `--only` picks some. Every loop is
bounded by time and count; speed and size are reported, never asserted.

backup (bench/backup.py's functions): put latency p50, one thread, 100-byte values, without and
with continuous backups in alternating pairs of runs (the best of each side, and the median of
the pairs' ratios); per value size, `--backup-mb` MB written in batches of 1,000 while the log
is archived (MB/s of live data until the archive holds it all), then a base snapshot (MB/s).

restore: per value size, that archive restored from its base into a new embedded volume, six
copies written, durable (live MB per second of wall time and per CPU second).

collection (embedded volume, `--value-bytes` values (100), 1 unit = `--batch` puts of random keys):
* collection rate: overwrites are written while a snapshot holds the collection point back,
  then the snapshot is closed and the time until every node holds only the live versions is
  measured (records removed per second, per node; the six nodes collect at once);
* steady state under an overwrite-heavy workload: `--puts` puts over `--keys` keys (stopping
  early after `--seconds`, reported), sampling each node's LMDB pages in use (every table, as
  the node's `used_bytes` counts them; pages freed for reuse are not counted: LMDB files never
  shrink, their high-water mark is reported beside) against the live data (`--keys` records
  of 36 + key + value bytes), during
  the run (peak) and once collection caught up after it (settled).
  Request-id records are kept for `--request-retention-s` (the engine's default is 60 s; the
  bench's 0 measures versions only, and says so).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import engine  # noqa: E402
from engine.core.constants import RECORD_HEADER_BYTES  # noqa: E402

VALUE_BYTES_DEFAULT = 100
KEY_FORMAT = b"key:%08d"
SAMPLE_S = 0.5
#: a phase that has not converged by then reports what it reached
SETTLE_S_MAX = 60.0


def node_figures(db) -> list[dict]:
    return [n for n in db.status()["nodes"] if n.get("up")]


def open_volume(args, path):
    return engine.open(path, protection_groups=args.protection_groups, durable=args.durable,
                       collect_delay_s=args.collect_delay_s, request_retention_s=args.request_retention_s)


def collection(args) -> dict:
    rng = random.Random(args.seed)
    value = b"v" * args.value_bytes
    live_bytes = args.keys * (RECORD_HEADER_BYTES + len(KEY_FORMAT % 0) + args.value_bytes)
    out: dict = {"keys": args.keys, "batch": args.batch, "value_bytes": args.value_bytes, "durable": args.durable,
                 "collect_delay_s": args.collect_delay_s, "request_retention_s": args.request_retention_s,
                 "live_bytes": live_bytes}
    path = tempfile.mkdtemp(prefix="sixfold-lifecycle-")
    try:
        with open_volume(args, path) as db:
            # 1. Collection rate: a backlog held by a snapshot, then released.
            with db.batch() as b:
                for k in range(args.keys):
                    b.put(KEY_FORMAT % k, value)
            snap = db.snapshot()
            backlog = 0
            deadline = time.monotonic() + args.seconds / 2
            while backlog < args.backlog and time.monotonic() < deadline:
                with db.batch() as b:
                    for _ in range(args.batch):
                        b.put(KEY_FORMAT % rng.randrange(args.keys), value)
                backlog += args.batch
            before = node_figures(db)
            t0 = time.monotonic()
            snap.close()
            live = args.keys + 2  # (and a tombstone or request record in flight)
            while time.monotonic() - t0 < SETTLE_S_MAX and max(n["records"] for n in node_figures(db)) > live:
                time.sleep(0.05)
            seconds = time.monotonic() - t0
            after = node_figures(db)
            removed = [a["collected_records"] - b["collected_records"] for a, b in zip(after, before)]
            out["backlog_puts"] = backlog
            out["backlog_seconds"] = round(seconds, 3)
            out["collect_records_per_s_per_node"] = round(min(removed) / seconds) if seconds else 0
            out["collect_records_per_s_all_nodes"] = round(sum(removed) / seconds) if seconds else 0

            # 2. Steady state under overwrites, no snapshot open.
            puts = 0
            peak_pages = peak_used = 0
            samples = []
            t0 = last = time.monotonic()
            while puts < args.puts and time.monotonic() - t0 < args.seconds:
                with db.batch() as b:
                    for _ in range(args.batch):
                        b.put(KEY_FORMAT % rng.randrange(args.keys), value)
                puts += args.batch
                if time.monotonic() - last >= SAMPLE_S:
                    last = time.monotonic()
                    figs = node_figures(db)
                    pages = max(n["pages_bytes"] for n in figs)
                    peak_pages = max(peak_pages, pages)
                    peak_used = max(peak_used, max(n["bytes"] for n in figs))
                    samples.append((round(last - t0, 2), pages, max(n["records"] for n in figs)))
            put_seconds = time.monotonic() - t0
            figs = node_figures(db)
            t1 = time.monotonic()
            while time.monotonic() - t1 < SETTLE_S_MAX and max(n["records"] for n in node_figures(db)) > live:
                time.sleep(0.05)
            settled = node_figures(db)
            out["pages_bytes_settled"] = max(n["pages_bytes"] for n in settled)
            out["pages_vs_live_settled"] = round(out["pages_bytes_settled"] / live_bytes, 2)
            out["puts"] = puts
            out["puts_per_s"] = round(puts / put_seconds)
            out["stopped_early"] = puts < args.puts
            out["pages_bytes_peak"] = peak_pages
            out["pages_bytes_end"] = max(n["pages_bytes"] for n in figs)
            out["records_end_max"] = max(n["records"] for n in figs)
            out["pages_vs_live_peak"] = round(peak_pages / live_bytes, 2)
            out["pages_vs_live_end"] = round(out["pages_bytes_end"] / live_bytes, 2)
            out["file_bytes_high_water"] = max(peak_used, max(n["bytes"] for n in figs))
            out["collected_records_per_node"] = [n["collected_records"] for n in figs]
            out["samples_s_pages_records"] = samples[-10:]
    finally:
        shutil.rmtree(path, ignore_errors=True)
    return out


def _backup_bench():
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import backup as backup_bench  # bench/backup.py

    return backup_bench


_ARCHIVED: dict = {}  # value bytes -> (backup, restore) figures: one archive serves both scenarios


def _archive_figures(args, vb: int) -> tuple[dict, dict]:
    if vb not in _ARCHIVED:
        root = tempfile.mkdtemp(prefix="sixfold-lifecycle-backup-")
        try:
            _ARCHIVED[vb] = _backup_bench().backup_and_restore(root, args.backup_mb, vb)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    return _ARCHIVED[vb]


def backup(args) -> dict:
    """The archiver's cost on the put path (alternating pairs of runs), then per value size the
    log archived while `--backup-mb` MB are written and a base snapshot of them (MB/s)."""
    root = tempfile.mkdtemp(prefix="sixfold-lifecycle-latency-")
    try:
        pl = _backup_bench().put_overhead(root, args.latency_seconds, args.latency_rounds)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    out = {"put_p50_ms_without": pl["p50_ms_without"], "put_p50_ms_with": pl["p50_ms_with"],
           "put_p50_overhead_pct": pl["p50_overhead_pct"],
           "put_p50_overhead_pct_median_of_pairs": pl["p50_overhead_pct_median_of_pairs"]}
    for vb in args.backup_value_bytes:
        b, _r = _archive_figures(args, vb)
        out[f"live_mb_{vb}"] = round(b["live_bytes"] / 1e6, 1)
        out[f"log_archive_mb_per_s_{vb}"] = b["log_mb_per_s_while_writing"]
        out[f"base_mb_per_s_{vb}"] = b["base_mb_per_s"]
    return out


def restore(args) -> dict:
    """Per value size: a restore of `--backup-mb` MB of live data from a base into a new embedded
    volume (six copies, durable): live MB per second of wall time and per CPU second."""
    out = {}
    for vb in args.backup_value_bytes:
        _b, r = _archive_figures(args, vb)
        out[f"keys_{vb}"] = r["keys"]
        out[f"restore_mb_per_s_{vb}"] = r["mb_per_s"]
        out[f"restore_mb_per_cpu_s_{vb}"] = r["mb_per_cpu_s"]
    return out


#: name -> scenario, run in this order.
SCENARIOS = {"collection": collection, "backup": backup, "restore": restore}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", choices=sorted(SCENARIOS), help="run only these scenarios")
    ap.add_argument("--keys", type=int, default=1000)
    ap.add_argument("--puts", type=int, default=1_000_000, help="puts of the steady-state phase (default 1,000,000)")
    ap.add_argument("--backlog", type=int, default=200_000, help="puts held back by a snapshot (collection rate)")
    ap.add_argument("--batch", type=int, default=100, help="puts per atomic unit (default 100)")
    ap.add_argument("--value-bytes", type=int, default=VALUE_BYTES_DEFAULT, help="bytes per value (default 100)")
    ap.add_argument("--seconds", type=float, default=40.0, help="bound on each write phase (default 40)")
    ap.add_argument("--protection-groups", type=int, default=8)
    ap.add_argument("--collect-delay-s", type=float, default=0.1, help="engine option (default 0.1, the engine's)")
    ap.add_argument("--request-retention-s", type=float, default=0.0, help="engine option (engine default 60; bench 0)")
    ap.add_argument("--durable", action="store_true", help="segments fsync before acking (default: not)")
    ap.add_argument("--backup-mb", type=int, default=64, help="MB of live data backed up and restored (default 64)")
    ap.add_argument("--backup-value-bytes", default="1024,16384",
                    help="value sizes of the backup and restore data, each measured (default 1024,16384)")
    ap.add_argument("--latency-seconds", type=float, default=3.0, help="seconds per put-latency run (default 3)")
    ap.add_argument("--latency-rounds", type=int, default=3,
                    help="pairs of put-latency runs without and with backups (default 3)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = ap.parse_args(argv)
    for what in ("keys", "puts", "batch", "backlog", "value_bytes"):
        if not 1 <= getattr(args, what) <= 10_000_000:
            ap.error(f"--{what.replace('_', '-')} must be in 1..10,000,000")
    if args.value_bytes > 1 << 20:
        ap.error("--value-bytes must be at most 1 MiB")
    if not 0 < args.seconds <= 600:
        ap.error("--seconds must be in (0, 600]")
    try:
        args.backup_value_bytes = [int(x) for x in args.backup_value_bytes.split(",")]
    except ValueError:
        ap.error("--backup-value-bytes is a comma-separated list of sizes in bytes")
    if not all(1 <= vb <= 1 << 20 for vb in args.backup_value_bytes):
        ap.error("--backup-value-bytes: each size must be in 1..1 MiB")
    if not 1 <= args.backup_mb <= 4096 or not 1 <= args.latency_rounds <= 20 or not 0 < args.latency_seconds <= 60:
        ap.error("--backup-mb must be in 1..4096, --latency-rounds in 1..20, --latency-seconds in (0, 60]")
    print(f"seed {args.seed}")
    results = {}
    for name in args.only or list(SCENARIOS):
        results[name] = SCENARIOS[name](args)
        print(f"\n{name}")
        width = max(len(k) for k in results[name])
        for k, v in results[name].items():
            print(f"  {k:<{width}}  {v}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"seed": args.seed, "results": results}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
