"""Failover benchmark: writer SIGKILLs under a write load, with readers that promote themselves.

    python bench/failover.py [--kills 10] [--clients 16] [--no-durable] [--seed 1] [--json out.json]
                             [--soak-s 600 --soak-clients 64] [--lag-rates 1000,5000 --lag-s 10]

One cluster (`cluster up --readers 2`, TLS) and `--clients` threads writing unique keys through
`engine.connect(folder)` (which follows the writer). Each round: wait until writes flow, SIGKILL
the writer, and time from the kill to the first write acknowledged after it (by the reader that
took over: nobody acts), then add a reader so that two candidates are left. At the end every
acknowledged write is read back with a quorum read: `lost` must be 0. Writes whose fate was
unknown are asked by their request ids. `--soak-s S`: first, S seconds of a `--soak-clients`
write load with no kill, counting the writer changes (spurious failovers: must be 0).
`--lag-rates R,...`: then, for each rate, a paced write load of R puts/s for `--lag-s` seconds
while the readers report their lag (commit durable on the writer to readable on the reader) and
a probe client times put-acknowledged to read-on-a-replica with `after=`: p50 and p99.
Reported, never asserted; every loop is bounded by time and count; the cluster is always torn
down. Prints the seed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import engine  # noqa: E402
from engine.cluster.launcher import Cluster  # noqa: E402
from engine.cluster.manifest import WRITER, load_manifest  # noqa: E402
from engine.cluster.testing import free_base_port  # noqa: E402

ROUND_TIMEOUT_S = 30.0
WARMUP_WRITES = 50


class Writers:
    """`clients` threads writing unique keys; records acknowledgement times and outcomes."""

    def __init__(self, db, clients: int) -> None:
        self.db = db
        self.acked: dict[bytes, bytes] = {}
        self.ack_times: list[float] = []
        self.unknown: dict[bytes, tuple[bytes, bytes]] = {}
        self.refused = 0
        self.other_errors: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def _run(self, i: int) -> None:
        n = 0
        while not self._stop.is_set() and n < 1_000_000:
            key, value = b"fo:%d:%d" % (i, n), b"v%d" % n
            n += 1
            started = time.monotonic()
            try:
                self.db.put(key, value)
                with self._lock:
                    self.acked[key] = value
                    self.ack_times.append((started, time.monotonic()))
            except engine.WriteIndeterminate as e:
                with self._lock:
                    self.unknown[key] = (value, e.request_id)
            except engine.Unavailable:
                with self._lock:
                    self.refused += 1
                time.sleep(0.02)
            except Exception as e:  # noqa: BLE001 - reported
                with self._lock:
                    self.other_errors.append(f"{type(e).__name__}: {e}")
                time.sleep(0.02)

    def count(self) -> int:
        with self._lock:
            return len(self.acked)

    def first_ack_after(self, t: float) -> float | None:
        """When the first write *sent* after `t` was acknowledged (only a new writer can)."""
        with self._lock:
            later = [end for start, end in self.ack_times if start > t]
        return min(later) if later else None

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)


def wait_for(pred, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--no-durable", action="store_true")
    ap.add_argument("--seed", type=int, default=1, help="(the run is not randomised; printed for the record)")
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--soak-s", type=float, default=0.0, help="seconds of load with no kill, counting writer changes")
    ap.add_argument("--soak-clients", type=int, default=64)
    ap.add_argument("--lag-rates", default="", help="puts/s for the replica lag measurement, e.g. 1000,5000")
    ap.add_argument("--lag-s", type=float, default=10.0)
    args = ap.parse_args(argv)
    print(f"seed {args.seed} | {args.kills} writer SIGKILLs | {args.clients} writing clients | durable {not args.no_durable}")
    root = tempfile.mkdtemp(prefix="sixfold-failover-bench-")
    c = Cluster(os.path.join(root, "c"))
    rounds: list[dict] = []
    try:
        c.up(base_port=free_base_port(7 + 2 + args.kills + 2), durable=not args.no_durable, readers=2)
        db = engine.connect(c.folder, timeout_s=10)
        extra: dict = {}
        if args.soak_s > 0:
            extra["soak"] = soak(c, db, args.soak_s, args.soak_clients)
        if args.lag_rates:
            extra["lag"] = [replica_lag(c, db, int(r), args.lag_s) for r in args.lag_rates.split(",") if r.strip()]
        w = Writers(db, args.clients)
        w.start()
        try:
            for k in range(args.kills):
                if not wait_for(lambda: w.count() >= WARMUP_WRITES * (k + 1), ROUND_TIMEOUT_S):
                    print(f"round {k + 1}: writes did not flow; stopping")
                    break
                m = load_manifest(c.folder)[WRITER]
                old = (m["address"], m["pid"])
                t_kill = time.monotonic()
                os.kill(m["pid"], signal.SIGKILL)
                took = wait_for(lambda: (load_manifest(c.folder)[WRITER]["address"], load_manifest(c.folder)[WRITER]["pid"]) != old,
                                ROUND_TIMEOUT_S)
                t_new = time.monotonic()
                resumed = wait_for(lambda: w.first_ack_after(t_kill) is not None, ROUND_TIMEOUT_S)
                first = w.first_ack_after(t_kill)
                row = {"round": k + 1, "took_over": took, "takeover_s": round(t_new - t_kill, 3),
                       "resume_s": round(first - t_kill, 3) if resumed and first else None,
                       "new_writer": load_manifest(c.folder)[WRITER]["address"]}
                rounds.append(row)
                print(f"round {k + 1:2}: writer {old[0]} killed; new writer {row['new_writer']} after "
                      f"{row['takeover_s']:.2f} s; first acknowledged write after {row['resume_s']} s")
                c.add_reader()  # two candidates again
        finally:
            w.stop()
        lost = 0
        for key, value in w.acked.items():
            if db.get(key, quorum=True) != value:
                lost += 1
        resolved_committed = sum(1 for key, (value, rid) in w.unknown.items() if db.status_of(rid).state == "committed")
        db.close()
    finally:
        try:
            c.down(timeout_s=10)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    resumes = [r["resume_s"] for r in rounds if r["resume_s"] is not None]
    summary = {
        "kills": len(rounds), "resumed": len(resumes),
        "resume_p50_s": round(statistics.median(resumes), 3) if resumes else None,
        "resume_max_s": max(resumes) if resumes else None,
        "acknowledged": len(w.acked), "lost": lost, "indeterminate": len(w.unknown),
        "indeterminate_committed": resolved_committed, "refused": w.refused, "other_errors": len(w.other_errors),
    }
    print(f"\nwrites resumed after {summary['resumed']}/{summary['kills']} kills: p50 {summary['resume_p50_s']} s, "
          f"max {summary['resume_max_s']} s (target p50 <= 2 s, max <= 5 s)")
    print(f"acknowledged {summary['acknowledged']}, lost {lost} (must be 0); indeterminate {summary['indeterminate']} "
          f"({resolved_committed} committed); refused (Unavailable) {w.refused}; other errors {len(w.other_errors)}")
    if w.other_errors:
        print("  first other errors:", w.other_errors[:3])
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"seed": args.seed, "rounds": rounds, "summary": summary, **extra}, fh, indent=2)
    return 0


def writer_identity(c) -> tuple:
    m = load_manifest(c.folder)[WRITER]
    return m["address"], m.get("pid")


def soak(c, db, seconds: float, clients: int) -> dict:
    """`clients` writers for `seconds`, no fault: how often did the writer change?"""
    w = Writers(db, clients)
    first = writer_identity(c)
    epoch0 = db.status()["epoch"]
    changes, last = 0, first
    t0 = time.monotonic()
    w.start()
    try:
        while time.monotonic() - t0 < seconds:
            now = writer_identity(c)
            if now != last:
                changes += 1
                last = now
            time.sleep(0.2)
    finally:
        w.stop()
    elapsed = time.monotonic() - t0
    epoch1 = db.status()["epoch"]
    out = {"seconds": round(elapsed, 1), "clients": clients, "puts_s": round(len(w.acked) / elapsed),
           "writer_changes": changes, "epoch_before": epoch0, "epoch_after": epoch1}
    print(f"soak: {clients} clients for {elapsed:.0f} s, {out['puts_s']:,} puts/s: writer changes {changes} "
          f"(spurious failovers, must be 0), epoch {epoch0} -> {epoch1}")
    return out


def replica_lag(c, db, rate: int, seconds: float) -> dict:
    """Paced puts at `rate`/s for `seconds`, and two views of replica lag:

    * the readers' own: each update of the read-point stream carries when its oldest commit
      became durable on the writer, and the reader counts arrival minus that (`lag_ms`; the
      status's `lag_ms_p99` covers its last 2,048 updates): read at the end of the load;
    * end to end, from a client: a probe thread (10 a second) puts a key, then reads it on the
      reader endpoint with `after=` its commit position; put-acknowledged to read-returned,
      which includes one read round trip, so it is an upper bound on the lag a client sees.
    """
    stop = threading.Event()
    done = [0]
    lock = threading.Lock()
    threads = max(16, min(256, rate // 15))  # each put takes a few ms to tens of ms: enough callers to pace
    per_thread = rate / threads

    def run(i: int) -> None:
        n, t0 = 0, time.monotonic()
        while not stop.is_set() and n < 10_000_000:
            due = t0 + n / per_thread
            wait = due - time.monotonic()
            if wait > 0:
                stop.wait(wait)
            try:
                db.put(b"lag:%d:%d" % (i, n), b"x" * 100)
                with lock:
                    done[0] += 1
            except engine.SixfoldError:
                pass
            n += 1

    probes: list[float] = []

    def probe() -> None:
        with engine.connect(c.folder, role="reader", timeout_s=10) as ro:
            n = 0
            while not stop.is_set() and n < 100_000:
                n += 1
                try:
                    lsn = db.put(b"lagprobe:%d" % n, b"p%d" % n)
                    acked = time.monotonic()
                    if ro.get(b"lagprobe:%d" % n, after=lsn) == b"p%d" % n:
                        probes.append((time.monotonic() - acked) * 1000.0)
                except engine.SixfoldError:
                    pass
                stop.wait(0.1)

    ts = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(threads)]
    for t in ts:
        t.start()
    samples: list[float] = []
    t0 = time.monotonic()
    time.sleep(min(1.0, seconds / 5))  # settle
    pt = threading.Thread(target=probe, daemon=True)
    pt.start()
    readers: list[dict] = []
    while time.monotonic() - t0 < seconds:
        time.sleep(0.25)
        readers = [r for r in c.status().get("readers", []) if not r.get("retired") and r.get("lag_ms") is not None]
        samples.extend(float(r["lag_ms"]) for r in readers)
    stop.set()
    pt.join(30)
    for t in ts:
        t.join(30)
    elapsed = time.monotonic() - t0

    def pct(xs: list[float], q: float):
        xs = sorted(xs)
        return round(xs[min(len(xs) - 1, int(q * len(xs)))], 2) if xs else None

    out = {"target_puts_s": rate, "achieved_puts_s": round(done[0] / elapsed),
           "status_samples": len(samples), "lag_ms_p50": pct(samples, 0.5),
           "reader_lag_ms_p99": {r["id"]: r.get("lag_ms_p99") for r in readers},
           "probes": len(probes), "probe_ms_p50": pct(probes, 0.5), "probe_ms_p99": pct(probes, 0.99)}
    print(f"replica lag at {rate:,} puts/s (achieved {out['achieved_puts_s']:,}): readers' p99 "
          f"{out['reader_lag_ms_p99']} ms (their last 2,048 updates), sampled p50 {out['lag_ms_p50']} ms; "
          f"client put-ack to replica read (after=) p50 {out['probe_ms_p50']} ms, p99 {out['probe_ms_p99']} ms "
          f"over {len(probes)} probes (target: lag p99 < 20 ms at 1,000/s)")
    return out


if __name__ == "__main__":
    raise SystemExit(main())
