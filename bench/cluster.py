"""Multi-process cluster benchmark: six storage node processes and a writer endpoint on loopback,
driven over gRPC by `engine.connect` with the shared client harness (bench/harness.py).

    python bench/cluster.py [--seconds 3] [--no-durable] [--base-port P] [--json out.json] [--seed 1]
    python bench/cluster.py --secure [--seconds 3] ...     what TLS and encryption at rest cost

Measures, with 100-byte values and unique keys (one `Database` shared by every client thread:
its boxcar coalesces concurrent calls into shared RPCs, which is how the client is meant to be used):
* puts/s with p50/p99/max at 1, 4, 16 and 64 client threads (each put returns once 4 of 6
  segments hold it, fsynced unless --no-durable);
* gets/s at 1, 4, 16 and 64 client threads over a pre-loaded key set (linearizable: read point =
  VDL);
* batch ingest: records/s with `db.batch()` of 100 and of 1,000 records, from 4 threads;
* AZ loss under load: 64 clients putting; steady-state p99 over a few seconds, then SIGKILL of
  both nodes of AZ b (n3, n4) mid-run; reports the max put latency in the seconds after the kill,
  its ratio to the steady-state p99 (target <= 2x), and every put that failed.
The cluster is TLS (the default of `sixfold cluster up`). The cluster lives in a temporary folder
and is always torn down. Speed is reported, never asserted. Every loop is bounded by time and
count. Every put and get row of the JSON carries its latency quantiles (bench/harness.py), so
bench/report.py can draw it.

`--secure` measures instead what security costs, in one run: puts/s and gets/s at 1 and 64
client threads on three clusters started one after the other with the same workload and seed:
(a) `--insecure` (plaintext gRPC, no certificates), (b) the default mutual TLS, (c) TLS plus
encryption at rest (`--encrypt`, the master key in a temporary key file outside the cluster
folder). The table shows them side by side with the ratios TLS / insecure and TLS+encryption /
insecure, and the issue's target for 64 clients (TLS at most 15% below insecure).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import harness  # noqa: E402  (bench/harness.py)

from engine.cluster.launcher import Cluster, port_free  # noqa: E402

#: Default first port to try; the first free block of PORTS_PER_CLUSTER ports at or above it is
#: used, so a benchmark never collides with a test cluster on the launcher's default 7400.
BASE_PORT_SEARCH_FROM = 27400
PORTS_PER_CLUSTER = 7  # writer endpoint + six nodes
PORT_SEARCH_BLOCKS_MAX = 200
#: Client threads of the standard workload (bench/report.py draws throughput against them).
PUT_CLIENTS = (1, 4, 16, 64)
GET_CLIENTS = (1, 4, 16, 64)
GET_KEYS_DEFAULT = 5_000
BATCH_SIZES = (100, 1_000)
BATCH_THREADS = 4
AZ_LOSS_CLIENTS = 64
AZ_LOSS_NODES = ("n3", "n4")  # AZ b
AZ_LOSS_RATIO_TARGET = 2.0


def free_base_port(start: int = BASE_PORT_SEARCH_FROM, count: int = PORTS_PER_CLUSTER) -> int:
    """The first port p >= start with p .. p+count-1 all free on 127.0.0.1."""
    for block in range(PORT_SEARCH_BLOCKS_MAX):
        p = start + block * (count + 3)
        if p + count > 65535:
            break
        if all(port_free("127.0.0.1", p + i) for i in range(count)):
            return p
    raise RuntimeError(f"no block of {count} free ports at or above {start}")


@contextlib.contextmanager
def sixfold_cluster(*, durable: bool = True, base_port: int | None = None, protection_groups: int | None = None,
                    tmp_root: str | None = None, insecure: bool = False,
                    encrypt: bool = False, no_auth: bool = False) -> Iterator[tuple[Cluster, object]]:
    """A fresh cluster in a temporary folder and a connected `Database`; always torn down and
    deleted, whatever happens inside. TLS unless `insecure`; `encrypt` adds encryption at rest
    (a fresh master key in a key file beside, not inside, the cluster folder)."""
    root = tempfile.mkdtemp(prefix="sixfold-cluster-bench-", dir=tmp_root)
    folder = os.path.join(root, "cluster")
    cluster = Cluster(folder)
    db = None
    try:
        key_file = None
        if encrypt:
            from engine.envelope import write_key_file

            key_file = write_key_file(os.path.join(root, "master.key"))
        cluster.up(base_port=free_base_port() if base_port is None else base_port,
                   protection_groups=protection_groups, durable=durable, insecure=True if insecure else None,
                   encrypt=encrypt, key_file=key_file, no_auth=no_auth)
        db = cluster.connect()
        yield cluster, db
    finally:
        try:
            if db is not None:
                db.close()
        finally:
            try:
                cluster.down()
            finally:
                shutil.rmtree(root, ignore_errors=True)


def sixfold_factory(db) -> harness.ClientFactory:
    """Every client thread shares the one Database (thread-safe; its boxcar batches RPCs)."""
    client = harness.Client(put=db.put, get=db.get)
    return lambda _c: client


def standard_rows(system: str, factory: harness.ClientFactory, *, seconds: float, seed: int, get_keys: int,
                  put_clients=PUT_CLIENTS, get_clients=GET_CLIENTS, ops_max: int = harness.OPS_MAX_DEFAULT,
                  log=print) -> list[dict]:
    """The workload both benchmarks run on every system: puts at 1/4/16/64 clients, then gets at
    1/4/16/64 clients over `get_keys` pre-loaded keys. Rows are `Result.row()`s with `kind`."""
    def who(n: int) -> str:
        return f"{n} client" + ("" if n == 1 else "s")

    rows = []
    for n in put_clients:
        r = harness.run_puts(factory, name=f"{system} put, {who(n)}", clients=n, seconds=seconds, seed=seed,
                             prefix=f"put{n}", ops_max=ops_max)
        rows.append({**r.row(), "kind": "put", "system": system})
        log(f"  {r.name:40} {r.ops_s:>9,.0f} ops/s  p99 {r.p99_ms:7.2f} ms  errors {r.errors}")
    keys = harness.preload_keys("get", get_keys, seed)
    took = harness.preload(factory, keys, seed=seed)
    log(f"  preloaded {len(keys):,} keys in {took:.1f} s")
    for n in get_clients:
        r = harness.run_gets(factory, keys, name=f"{system} get, {who(n)}", clients=n, seconds=seconds,
                             seed=seed, ops_max=ops_max)
        rows.append({**r.row(), "kind": "get", "system": system})
        log(f"  {r.name:40} {r.ops_s:>9,.0f} ops/s  p99 {r.p99_ms:7.2f} ms  errors {r.errors}")
    return rows


def batch_rows(db, *, seconds: float, seed: int, log=print) -> list[dict]:
    """Records/s of `db.batch()` commits of 100 and 1,000 puts, from BATCH_THREADS threads."""
    rows = []
    value = harness.value_for(seed)
    for size in BATCH_SIZES:
        def op_for(c: int, size=size):
            def op(i: int) -> None:
                with db.batch() as b:
                    for j in range(size):
                        b.put(b"batch%d/%02d/%08d/%05d" % (size, c, i, j), value)
            return op

        r = harness.run(f"sixfold batch of {size:,}, {BATCH_THREADS} threads", op_for, clients=BATCH_THREADS,
                        seconds=seconds, seed=seed, records_per_op=size)
        rows.append({**r.row(), "kind": "batch", "system": "sixfold"})
        log(f"  {r.name:40} {r.ops_s:>9,.0f} records/s  p99 {r.p99_ms:7.2f} ms per batch  errors {r.errors}")
    return rows


def az_loss(cluster: Cluster, db, *, steady_s: float, after_s: float, seed: int, warmup_s: float = 1.0,
            log=print) -> dict:
    """64 clients putting; SIGKILL n3 and n4 (AZ b) at `steady_s`; compare the worst put latency
    of the following `after_s` seconds with the steady-state p99 before the kill."""
    kill_t: dict[str, float] = {}

    def kill_az_b() -> list[int]:
        pids = []
        for name in AZ_LOSS_NODES:
            kill_t.setdefault("first", time.perf_counter())
            pids.append(cluster.kill(name))
        return pids

    r = harness.run_puts(
        sixfold_factory(db), name=f"sixfold AZ-b loss, {AZ_LOSS_CLIENTS} clients", clients=AZ_LOSS_CLIENTS,
        seconds=steady_s + after_s, seed=seed, prefix="azloss", warmup_s=warmup_s,
        events=[(steady_s, "SIGKILL " + "+".join(AZ_LOSS_NODES), kill_az_b)], keep_samples=True,
    )
    ev = r.events[0] if r.events else {"at_s": steady_s}
    kill_at = ev["at_s"]
    # Steady state: operations that started after the warm-up and completed before the kill.
    steady = [s for s in r.samples if s.start_s >= warmup_s and s.start_s + s.latency_s < kill_at and s.ok]
    # Affected: every operation that completed after the kill signal (including those in flight
    # when it landed) and started within the `after_s` that follow it.
    after = [s for s in r.samples if s.start_s + s.latency_s >= kill_at and s.start_s < kill_at + after_s]
    after_ok = [s for s in after if s.ok]
    st_p50, st_p99, st_max = harness.stats_ms([s.latency_s for s in steady])
    af_p50, af_p99, af_max = harness.stats_ms([s.latency_s for s in after_ok])
    af_max_any = max((s.latency_s for s in after), default=0.0) * 1e3  # failed ones too
    steady_window = max(1e-9, kill_at - warmup_s)
    after_window = max(1e-9, min(r.window_s + warmup_s, kill_at + after_s) - kill_at)
    out = {
        "clients": AZ_LOSS_CLIENTS, "killed": list(AZ_LOSS_NODES), "kill_at_s": kill_at, "kill_done_s": ev.get("done_s"),
        "kill_error": ev.get("error"),
        "steady_ops_s": len(steady) / steady_window, "steady_p50_ms": st_p50, "steady_p99_ms": st_p99,
        "steady_max_ms": st_max,
        "after_ops_s": len([s for s in after_ok if s.start_s >= kill_at]) / after_window, "after_p50_ms": af_p50,
        "after_p99_ms": af_p99, "after_max_ms": max(af_max, af_max_any),
        "ratio_after_max_to_steady_p99": (max(af_max, af_max_any) / st_p99) if st_p99 else None,
        "target_ratio_max": AZ_LOSS_RATIO_TARGET,
        "puts_failed": r.errors, "failure_kinds": r.error_kinds, "clients_stuck": r.clients_stuck,
        "puts_total": len(r.samples),
    }
    out["target_met"] = out["ratio_after_max_to_steady_p99"] is not None and (
        out["ratio_after_max_to_steady_p99"] <= AZ_LOSS_RATIO_TARGET and out["puts_failed"] == 0
    )
    # The worst latencies after the kill, with when they started (for the report).
    worst = sorted(after, key=lambda s: -s.latency_s)[:5]
    out["worst_after"] = [{"start_s": round(s.start_s, 3), "latency_ms": round(s.latency_s * 1e3, 1), "ok": s.ok}
                          for s in worst]
    log(f"  AZ-b loss: kill at {kill_at:.2f} s; steady p99 {st_p99:.1f} ms, after-kill max {out['after_max_ms']:.1f} ms, "
        f"failed {r.errors}")
    return out


def format_az_loss(a: dict) -> str:
    ratio = a["ratio_after_max_to_steady_p99"]
    lines = [
        f"AZ-loss under load ({a['clients']} clients; SIGKILL {' and '.join(a['killed'])} at t={a['kill_at_s']:.2f} s)",
        f"  {'':28} {'ops/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}",
        f"  {'steady state (before kill)':28} {a['steady_ops_s']:>9,.0f} {a['steady_p50_ms']:>8.2f} "
        f"{a['steady_p99_ms']:>8.2f} {a['steady_max_ms']:>8.1f}",
        f"  {'after the kill':28} {a['after_ops_s']:>9,.0f} {a['after_p50_ms']:>8.2f} {a['after_p99_ms']:>8.2f} "
        f"{a['after_max_ms']:>8.1f}",
        f"  max after kill / steady p99: {ratio:.2f}x (target <= {a['target_ratio_max']:g}x): "
        f"{'met' if a['target_met'] else 'NOT met'}" if ratio is not None else "  (no steady-state samples)",
        f"  puts failed: {a['puts_failed']}" + (f" {a['failure_kinds']}" if a["failure_kinds"] else "")
        + f" of {a['puts_total']:,}",
    ]
    if a.get("kill_error"):
        lines.append(f"  kill error: {a['kill_error']}")
    return "\n".join(lines)


#: The --secure comparison: (system, what it is, sixfold_cluster options), in the order they run.
SECURE_SYSTEMS = (
    ("insecure", "--insecure --no-auth: plaintext gRPC, no client tokens", {"insecure": True, "no_auth": True}),
    ("tls", "mutual TLS + client tokens (the default)", {}),
    ("tls+enc", "mutual TLS + tokens + encryption at rest (--encrypt)", {"encrypt": True}),
)
SECURE_CLIENTS = (1, 64)
#: The issue's target: TLS (+ tokens) costs at most 15% of puts/s and gets/s at 64 clients.
SECURE_TARGET_LOSS = 0.15


def secure_rows(args, log=print) -> list[dict]:
    """Puts and gets at 1 and 64 clients on each of SECURE_SYSTEMS, one cluster at a time."""
    rows: list[dict] = []
    for system, what, options in SECURE_SYSTEMS:
        t0 = time.perf_counter()
        with sixfold_cluster(durable=not args.no_durable, base_port=args.base_port,
                             protection_groups=args.protection_groups, **options) as (cluster, db):
            st = db.status()
            log(f"{system}: {what}; up in {time.perf_counter() - t0:.1f} s at {cluster.writer_address} "
                f"(encrypted {st.get('encrypted')})")
            rows += standard_rows(system, sixfold_factory(db), seconds=args.seconds, seed=args.seed,
                                  get_keys=args.get_keys, put_clients=SECURE_CLIENTS, get_clients=SECURE_CLIENTS, log=log)
    return rows


def secure_table(rows: list[dict]) -> tuple[str, list[dict]]:
    """The three systems side by side, with TLS / insecure and TLS+encryption / insecure."""
    by = {(r["system"], r["kind"], r["clients"]): r for r in rows}
    systems = [s for s, _, _ in SECURE_SYSTEMS]
    lines = [f"{'measurement':26}" + "".join(f"{s:>11}" for s in systems) + f"{'tls/insecure':>14}{'tls+enc/insecure':>18}"]
    data = []
    for kind in ("put", "get"):
        for n in SECURE_CLIENTS:
            for fld, label in (("ops_s", "ops/s"), ("p99_ms", "p99 ms")):
                vals = {s: by[(s, kind, n)][fld] if (s, kind, n) in by else None for s in systems}
                base = vals["insecure"]
                ratios = [vals[s] / base if vals[s] is not None and base else None for s in ("tls", "tls+enc")]
                fmt = "{:>11,.0f}" if fld == "ops_s" else "{:>11.2f}"
                lines.append(f"{kind + ', ' + str(n) + (' client' if n == 1 else ' clients') + ': ' + label:26}"
                             + "".join(fmt.format(v) if v is not None else f"{'-':>11}" for v in vals.values())
                             + "".join(f"{r:>{w - 1}.2f}x" if r is not None else f"{'-':>{w}}" for r, w in zip(ratios, (14, 18))))
                data.append({"kind": kind, "clients": n, "field": fld, **vals,
                             "tls_over_insecure": ratios[0], "tls_enc_over_insecure": ratios[1]})
    errors = {s: sum(r["errors"] for r in rows if r["system"] == s) for s in systems}
    lines.append(f"{'errors (all runs)':26}" + "".join(f"{errors[s]:>11}" for s in systems))
    for kind in ("put", "get"):
        d = next((x for x in data if x["kind"] == kind and x["clients"] == 64 and x["field"] == "ops_s"), None)
        if d and d["tls_over_insecure"] is not None:
            loss = 1 - d["tls_over_insecure"]
            lines.append(f"{kind}s/s at 64 clients: TLS + tokens cost {loss:.1%} of insecure (target at most "
                         f"{SECURE_TARGET_LOSS:.0%}: {'met' if loss <= SECURE_TARGET_LOSS else 'NOT met'})"
                         + (f"; TLS+encryption costs {1 - d['tls_enc_over_insecure']:.1%}" if d["tls_enc_over_insecure"] else ""))
    return "\n".join(lines), data


def main_secure(args) -> int:
    print(f"seed {args.seed} | --secure: insecure vs TLS vs TLS+encryption, one cluster at a time | durable "
          f"{not args.no_durable} | {args.seconds:g} s per measurement | 100-byte values | {args.get_keys:,} keys for gets | "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    t0 = time.perf_counter()
    rows = secure_rows(args)
    text, data = secure_table(rows)
    print()
    print(text)
    print(f"(ratios: > 1 is faster than insecure for ops/s, slower for p99; total {time.perf_counter() - t0:.0f} s)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"seed": args.seed, "durable": not args.no_durable, "seconds": args.seconds,
                       "latency_quantiles": list(harness.CDF_QUANTILES), "rows": rows, "table": data}, fh, indent=2)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0, help="time per measurement (default 3)")
    ap.add_argument("--no-durable", action="store_true", help="segments do not fsync before acking (default: durable)")
    ap.add_argument("--base-port", type=int, default=None,
                    help=f"writer endpoint port; nodes use the next six (default: first free block from {BASE_PORT_SEARCH_FROM})")
    ap.add_argument("--protection-groups", type=int, default=None, help="protection groups (default: the engine's)")
    ap.add_argument("--get-keys", type=int, default=GET_KEYS_DEFAULT, help=f"pre-loaded keys for gets (default {GET_KEYS_DEFAULT:,})")
    ap.add_argument("--az-steady-s", type=float, default=4.0, help="AZ-loss: seconds of load before the kill (default 4)")
    ap.add_argument("--az-after-s", type=float, default=5.0, help="AZ-loss: seconds of load after the kill (default 5)")
    ap.add_argument("--no-az-loss", action="store_true", help="skip the AZ-loss scenario")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--secure", action="store_true",
                    help="compare --insecure, TLS and TLS + encryption at rest (puts and gets at 1 and 64 clients)")
    args = ap.parse_args(argv)
    assert 0 < args.seconds <= 60 and 1.5 <= args.az_steady_s <= 60 and 0 < args.az_after_s <= 60
    assert 0 < args.get_keys <= 1_000_000
    if args.secure:
        return main_secure(args)
    durable = not args.no_durable
    print(f"seed {args.seed} | durable {durable} | {args.seconds:g} s per measurement | 100-byte values | "
          f"one shared engine.connect() Database for all client threads | load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    rows: list[dict] = []
    az = None
    t0 = time.perf_counter()
    with sixfold_cluster(durable=durable, base_port=args.base_port, protection_groups=args.protection_groups) as (cluster, db):
        st = db.status()
        print(f"cluster up in {time.perf_counter() - t0:.1f} s at {cluster.writer_address} "
              f"({st.get('protection_groups', '?')} protection groups, codec {st.get('codec', '?')})")
        rows += standard_rows("sixfold", sixfold_factory(db), seconds=args.seconds, seed=args.seed, get_keys=args.get_keys)
        rows += batch_rows(db, seconds=args.seconds, seed=args.seed)
        client_stats = db.status().get("client", {})
        if not args.no_az_loss:
            az = az_loss(cluster, db, steady_s=args.az_steady_s, after_s=args.az_after_s, seed=args.seed)
    print()
    print(harness.format_table([r for r in rows if r["kind"] != "batch"]))
    print()
    print(harness.format_table([r for r in rows if r["kind"] == "batch"], unit="records/s").replace(
        "p50 ms", "p50/bat").replace("p99 ms", "p99/bat").replace("max ms", "max/bat"))
    if client_stats.get("write_rpcs"):
        print(f"\nclient boxcar: {client_stats['writes']:,} writes in {client_stats['write_rpcs']:,} Write RPCs, "
              f"{client_stats.get('gets', 0):,} gets in {client_stats.get('get_rpcs', 0):,} GetMany RPCs")
    if az is not None:
        print()
        print(format_az_loss(az))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"seed": args.seed, "durable": durable, "seconds": args.seconds,
                       "latency_quantiles": list(harness.CDF_QUANTILES), "rows": rows, "az_loss": az,
                       "client": client_stats}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
