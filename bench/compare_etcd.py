"""Sixfold against etcd, same harness, same workload, same run.

    python bench/compare_etcd.py [--seconds 3] [--json out.json] [--seed 1] [--pairs both|plain|tls]
                                 [--etcd-target leader|round-robin] [--etcd-channels shared|per-client]
                                 [--clients 1,4,16,64] [--skip-etcd-1] [--no-etcd skip|sixfold]

Runs, one system at a time (never two at once on the same cores), with 100-byte values and unique
keys, the workload of bench/cluster.py: puts at 1, 4, 16 and 64 client threads, then
linearizable gets at 1, 4, 16 and 64 client threads over a pre-loaded key set (`--clients`
chooses other counts). Systems:
* etcd, one member;
* etcd, three members on loopback;
* Sixfold: six storage node processes and a writer endpoint on loopback (bench/cluster.py).
Two pairs, each printed as its own side-by-side table (the Security issue, part 10):
* plaintext: etcd over plain http (its default) against `sixfold cluster up --insecure`;
* TLS: etcd with its own mutual-TLS flags on client and peer URLs (--cert-file, --key-file,
  --trusted-ca-file, --client-cert-auth and the --peer-* twins; certificates made for the run
  with `cryptography`, bench/etcd/tls.py; the client uses `grpc.ssl_channel_credentials` with a
  client certificate) against Sixfold's default mutual TLS on every channel.
`--pairs plain` or `--pairs tls` runs one pair only; the one-member etcd runs in plaintext only.
Both are durable: every etcd member fsyncs its WAL before it acknowledges (etcd's default;
`--unsafe-no-fsync` is not used) and every Sixfold segment fsyncs before it acknowledges.

etcd is driven over plain gRPC with stubs compiled at run time from bench/etcd/rpc.proto (a
subset of etcd's API with its real field numbers); no etcd client library. By default every
client thread talks to the leader (found from its /metrics page after start-up) over one gRPC
channel shared by all threads: the setting that gave etcd its best figures here (trials on this
machine, 3 members, 64 clients: leader + shared channel ~3,100-3,700 puts/s and ~3,300-3,500
gets/s; round-robin over members with a channel per thread ~2,000-2,600 puts/s, because a
follower forwards each put to the leader and 64 connections cost the Python client more CPU).
--etcd-target and --etcd-channels select the other settings. Gets are linearizable Ranges (etcd's default,
a ReadIndex round through the leader), as Sixfold's gets are linearizable (read point = VDL).
Sixfold is driven through one shared `engine.connect()` Database, as designed (its boxcar
coalesces concurrent calls).

Each pair prints as a table, one line per measurement, the systems side by side and the ratio
Sixfold / etcd 3-member: ops/s at every client count, p50 and p99 at 1, 16 and 64 clients, puts
then gets. `--json` writes every row with its latency quantiles (bench/harness.py), which
bench/report.py draws as throughput against clients and latency CDFs (`make bench` does both).

etcd is never installed by this script: without an `etcd` binary on PATH it says how to install
one and exits 0, having measured nothing (`--no-etcd skip`, the default) or Sixfold alone
(`--no-etcd sixfold`, what `make bench` asks, so the plots still show Sixfold). Every etcd process
it starts is killed (SIGKILL, by pid) before it exits. Speed is reported, never asserted. Every
loop is bounded by time and count.

Exit codes: 0 done (or skipped without etcd), 2 bad arguments.
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

import grpc  # noqa: E402

import cluster as cluster_bench  # noqa: E402  (bench/cluster.py)
import harness  # noqa: E402  (bench/harness.py)
from etcd import launch, stubs as etcd_stubs  # noqa: E402  (bench/etcd/)

RPC_TIMEOUT_S = 30.0
#: Each client thread's own channel must get its own connection: gRPC Python otherwise shares one
#: subchannel (one TCP connection) among channels to the same address.
PER_CLIENT_CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]
TOTAL_BUDGET_S = 240.0  # a warning above it: the default run (5 systems x 8 measurements x 3 s) fits
SECONDS_MAX = 30.0
CLIENTS_DEFAULT = (1, 4, 16, 64)


class EtcdClients:
    """A harness client factory over etcd members (see the module docstring for the modes)."""

    def __init__(self, stubs, addresses: list[str], *, target: str, channels: str, leader: int | None,
                 channel_for=None) -> None:
        assert target in ("round-robin", "leader") and channels in ("per-client", "shared")
        self.stubs = stubs
        #: (address, options) -> grpc.Channel: plaintext by default, `launch.Etcd.channel` for TLS
        self.channel_for = channel_for or (lambda address, options: grpc.insecure_channel(address, options=options))
        self.addresses = addresses
        self.target = target
        self.channels_mode = channels
        self.leader = leader if leader is not None else 0
        self._channels: list[grpc.Channel] = []
        self._shared: dict[str, harness.Client] = {}
        self._per_client: dict[int, harness.Client] = {}

    def _address(self, c: int) -> str:
        if self.target == "leader" or len(self.addresses) == 1:
            return self.addresses[self.leader if self.target == "leader" else 0]
        return self.addresses[c % len(self.addresses)]

    def _client(self, address: str, options) -> harness.Client:
        ch = self.channel_for(address, options)
        self._channels.append(ch)
        stub = self.stubs.grpc.KVStub(ch)
        put_rpc, range_rpc = stub.Put, stub.Range
        PutRequest, RangeRequest = self.stubs.pb2.PutRequest, self.stubs.pb2.RangeRequest

        def put(key: bytes, value: bytes) -> None:
            put_rpc(PutRequest(key=key, value=value), timeout=RPC_TIMEOUT_S)

        def get(key: bytes) -> bytes | None:
            kvs = range_rpc(RangeRequest(key=key), timeout=RPC_TIMEOUT_S).kvs
            return kvs[0].value if kvs else None

        return harness.Client(put=put, get=get)

    def __call__(self, c: int) -> harness.Client:
        address = self._address(c)
        if self.channels_mode == "shared":
            if address not in self._shared:
                self._shared[address] = self._client(address, [])
            return self._shared[address]
        if c not in self._per_client:  # one channel per client thread, reused across runs
            self._per_client[c] = self._client(address, PER_CLIENT_CHANNEL_OPTIONS)
        return self._per_client[c]

    def close(self) -> None:
        for ch in self._channels:
            ch.close()
        self._channels.clear()


@contextlib.contextmanager
def etcd_cluster(binary: str, root: str, members: int, stubs, tls=None) -> Iterator[launch.Etcd]:
    e = launch.Etcd(binary, os.path.join(root, f"etcd-{members}" + ("-tls" if tls else "")), members, stubs, tls=tls)
    try:
        e.start()
        yield e
    finally:
        e.kill()


def workload(system: str, factory, args, log) -> list[dict]:
    return cluster_bench.standard_rows(system, factory, seconds=args.seconds, seed=args.seed, get_keys=args.get_keys,
                                       put_clients=args.clients, get_clients=args.clients, log=log)


def run_etcd(binary, root, members, stubs, args, log, tls=None) -> tuple[list[dict], dict]:
    system = f"etcd-{members}" + ("-tls" if tls is not None else "")
    t0 = time.perf_counter()
    with etcd_cluster(binary, root, members, stubs, tls) as e:
        leader = e.leader_index()
        info = {"members": members, "addresses": e.client_addresses, "leader": e.names[leader] if leader is not None else None,
                "target": args.etcd_target if members > 1 else "the one member", "channels": args.etcd_channels}
        if members > 1 and args.etcd_target == "leader" and leader is None:
            log(f"{system}: no member reports itself leader on /metrics; clients use {e.names[0]}")
        log(f"{system}: up in {time.perf_counter() - t0:.1f} s at {', '.join(e.client_addresses)}; leader {info['leader']}")
        clients = EtcdClients(stubs, e.client_addresses, target=args.etcd_target, channels=args.etcd_channels, leader=leader,
                              channel_for=e.channel)
        try:
            rows = workload(system, clients, args, log)
        finally:
            clients.close()
        info["leader_after"] = e.names[i] if (i := e.leader_index()) is not None else None
    return rows, info


def run_sixfold(args, log, *, insecure: bool) -> tuple[list[dict], dict]:
    system = "sixfold-insecure" if insecure else "sixfold-tls"
    t0 = time.perf_counter()
    with cluster_bench.sixfold_cluster(durable=True, base_port=args.base_port, insecure=insecure, no_auth=insecure) as (cluster, db):
        log(f"{system}: up in {time.perf_counter() - t0:.1f} s at {cluster.writer_address}")
        rows = workload(system, cluster_bench.sixfold_factory(db), args, log)
        info = {"writer": cluster.writer_address, "client": db.status().get("client", {})}
    return rows, info


#: Client counts whose table lines show p50 and p99 besides ops/s (the others show ops/s only).
TABLE_LATENCY_CLIENTS = (1, 16, 64)


def table_lines(clients) -> list[tuple[str, str, int, str]]:
    """(label, kind, clients, field) of the side-by-side table: puts then gets, by client count."""
    out = []
    for kind in ("put", "get"):
        for n in sorted(set(clients) | set(TABLE_LATENCY_CLIENTS)):
            who = f"{kind}, {n} client" + ("" if n == 1 else "s")
            out.append((f"{who}: ops/s", kind, n, "ops_s"))
            if n in TABLE_LATENCY_CLIENTS:
                out += [(f"{who}: p50 ms", kind, n, "p50_ms"), (f"{who}: p99 ms", kind, n, "p99_ms")]
    return out


# (label, kind, clients, field) of the side-by-side table, for the default client counts.
TABLE = table_lines(CLIENTS_DEFAULT)


#: The pairs: (name, etcd system, sixfold system, what).
PAIRS = (
    ("plain", "etcd-3", "sixfold-insecure", "plaintext: etcd over http, Sixfold --insecure"),
    ("tls", "etcd-3-tls", "sixfold-tls", "TLS: etcd with mutual TLS (client and peer), Sixfold's default mutual TLS"),
)


def side_by_side(rows: list[dict], systems: list[str], sixfold: str = "sixfold", etcd: str = "etcd-3") -> tuple[str, list[dict]]:
    """The table (text) and its lines as data; the ratio is `sixfold` / `etcd` (for ops/s higher
    is better for Sixfold, for latencies lower is). Lines no system measured are left out; a
    blank line separates puts from gets."""
    by = {(r["system"], r["kind"], r["clients"]): r for r in rows}
    width = max([11] + [len(s) + 2 for s in systems])
    head = f"{sixfold}/{etcd}" if etcd in systems else ""  # no ratio column without etcd
    out = [f"{'measurement':26}" + "".join(f"{s:>{width}}" for s in systems) + (f"{head:>{len(head) + 2}}" if head else "")]
    data = []
    last_kind = None
    for label, kind, n, fld in table_lines(sorted({r["clients"] for r in rows})):
        vals = {s: by[(s, kind, n)][fld] if (s, kind, n) in by else None for s in systems}
        if all(v is None for v in vals.values()):
            continue
        if last_kind is not None and kind != last_kind:
            out.append("")
        last_kind = kind
        ratio = (vals[sixfold] / vals[etcd]) if vals.get(sixfold) is not None and vals.get(etcd) else None
        fmt = "{:>%d,.0f}" % width if fld == "ops_s" else "{:>%d.2f}" % width
        out.append(f"{label:26}" + "".join(fmt.format(v) if v is not None else f"{'-':>{width}}" for v in vals.values())
                   + ("" if not head else f"{ratio:>{len(head) + 1}.2f}x" if ratio is not None else f"{'-':>{len(head) + 2}}"))
        data.append({"measurement": label, **vals, f"{sixfold}_over_{etcd}": ratio})
    errors = {s: sum(r["errors"] for r in rows if r["system"] == s) for s in systems}
    out.append(f"{'errors (all runs)':26}" + "".join(f"{errors[s]:>{width}}" for s in systems))
    return "\n".join(out), data


def client_counts(text: str) -> tuple[int, ...]:
    """The argparse type of --clients: "1,4,16,64" -> (1, 4, 16, 64), ascending, no repeats."""
    try:
        counts = tuple(sorted({int(x) for x in text.split(",") if x.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of client counts: {text!r}") from None
    if not counts or not all(1 <= c <= harness.CLIENTS_MAX for c in counts):
        raise argparse.ArgumentTypeError(f"client counts are 1 to {harness.CLIENTS_MAX}: {text!r}")
    return counts


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0,
                    help=f"time per measurement, above the {harness.WARMUP_S_DEFAULT:g} s warm-up and at most "
                         f"{SECONDS_MAX:g} (default 3; 8 measurements per system)")
    ap.add_argument("--clients", type=client_counts, default=CLIENTS_DEFAULT, metavar="N,N,...",
                    help="client thread counts, for puts and for gets (default 1,4,16,64)")
    ap.add_argument("--get-keys", type=int, default=cluster_bench.GET_KEYS_DEFAULT, help="pre-loaded keys for gets")
    ap.add_argument("--etcd-target", choices=("round-robin", "leader"), default="leader",
                    help="which etcd member each client thread talks to (default: the leader)")
    ap.add_argument("--etcd-channels", choices=("per-client", "shared"), default="shared",
                    help="one gRPC channel per member shared by all threads (default), or one per client thread")
    ap.add_argument("--skip-etcd-1", action="store_true", help="skip the one-member etcd")
    ap.add_argument("--no-etcd", choices=("skip", "sixfold"), default="skip",
                    help="without an etcd binary on PATH: measure nothing (default) or Sixfold alone")
    ap.add_argument("--base-port", type=int, default=None, help="Sixfold writer endpoint port (default: first free block)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON (bench/report.py draws them)")
    ap.add_argument("--pairs", choices=("both", "plain", "tls"), default="both",
                    help="which pairs to run: plaintext etcd vs --insecure Sixfold, etcd over TLS vs TLS Sixfold, or both")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    if not harness.WARMUP_S_DEFAULT < args.seconds <= SECONDS_MAX:
        ap.error(f"--seconds {args.seconds:g}: must be above the {harness.WARMUP_S_DEFAULT:g} s warm-up and at most "
                 f"{SECONDS_MAX:g}")
    if not 0 < args.get_keys <= harness.OPS_MAX_DEFAULT:
        ap.error(f"--get-keys {args.get_keys}: must be 1 to {harness.OPS_MAX_DEFAULT:,}")
    if args.base_port is not None and not 1024 <= args.base_port <= 65535 - cluster_bench.PORTS_PER_CLUSTER:
        ap.error(f"--base-port {args.base_port}: must be 1024 to {65535 - cluster_bench.PORTS_PER_CLUSTER}")
    pairs = [p for p in PAIRS if args.pairs in ("both", p[0])]
    binary = launch.etcd_binary()
    if binary is None:
        print(launch.INSTALL_HINT)
        if args.no_etcd == "skip":
            print("skipping the etcd comparison, both pairs (plaintext and TLS): no etcd binary on PATH. "
                  "bench/cluster.py --secure measures Sixfold's own TLS and encryption costs; "
                  "--no-etcd sixfold measures Sixfold alone.")
            return 0
        print("measuring Sixfold alone (--no-etcd sixfold): no etcd binary on PATH, so no ratios")
    version = launch.etcd_version(binary) if binary is not None else None
    etcd_one = binary is not None and not args.skip_etcd_1 and any(p[0] == "plain" for p in pairs)
    systems_n = len(pairs) * (2 if binary is not None else 1) + etcd_one
    estimate_s = systems_n * (2 * len(args.clients) * args.seconds + 20)
    load_before = load_average()
    print(f"seed {args.seed} | durable: etcd WAL fsync (default), Sixfold segments fsync | {args.seconds:g} s per "
          f"measurement | clients {','.join(map(str, args.clients))} | 100-byte values | "
          + (f"etcd {version} at {binary}" if binary is not None else "etcd not installed")
          + f" | load average {load_before[0]:.1f} on {os.cpu_count()} cores")
    print(f"etcd clients: {args.etcd_channels} gRPC channel(s), {args.etcd_target} over the members; "
          f"sixfold: one shared engine.connect() Database | estimated {estimate_s:.0f} s")
    if estimate_s > TOTAL_BUDGET_S:
        print(f"warning: --seconds {args.seconds:g} makes the run longer than {TOTAL_BUDGET_S:.0f} s")
    t_start = time.perf_counter()
    root = tempfile.mkdtemp(prefix="sixfold-vs-etcd-")
    rows: list[dict] = []
    info: dict = {}
    try:
        stubs = etcd_stubs.compile_stubs(os.path.join(root, "stubs")) if binary is not None else None
        for name, _etcd, _sixfold, what in pairs:
            print(f"--- pair {name}: {what}")
            tls = None
            if name == "tls" and binary is not None:
                from etcd.tls import make_certs  # noqa: E402  (bench/etcd/tls.py)

                tls = make_certs(os.path.join(root, "etcd-certs"))
            for members in ((1, 3) if name == "plain" and etcd_one else (3,)) if binary is not None else ():
                r, i = run_etcd(binary, root, members, stubs, args, print, tls=tls)
                rows += r
                info[r[0]["system"] if r else f"etcd-{members}"] = i
            r, i = run_sixfold(args, print, insecure=name == "plain")
            rows += r
            info["sixfold-insecure" if name == "plain" else "sixfold-tls"] = i
    finally:
        shutil.rmtree(root, ignore_errors=True)
    tables = {}
    for name, etcd, sixfold, what in pairs:
        systems = [s for s in (("etcd-1",) if name == "plain" else ()) + (etcd, sixfold) if any(r["system"] == s for r in rows)]
        text, tables[name] = side_by_side(rows, systems, sixfold=sixfold, etcd=etcd)
        print(f"\n{what}")
        print(text)
    if binary is not None:
        print(f"\nratio columns: Sixfold / etcd 3-member of the same pair (ops/s: > 1 is Sixfold faster; ms: < 1 is "
              f"Sixfold faster). total {time.perf_counter() - t_start:.0f} s")
    else:
        print(f"\nSixfold alone: {launch.INSTALL_HINT} total {time.perf_counter() - t_start:.0f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"seed": args.seed, "seconds": args.seconds, "clients": list(args.clients),
                       "etcd_version": version, "etcd_missing": launch.INSTALL_HINT if binary is None else None,
                       "durable": True, "etcd_target": args.etcd_target, "etcd_channels": args.etcd_channels,
                       "load_average_before": load_before, "load_average_after": load_average(),
                       "cpu_count": os.cpu_count(), "latency_quantiles": list(harness.CDF_QUANTILES),
                       "systems": info, "rows": rows, "table": tables}, fh, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
