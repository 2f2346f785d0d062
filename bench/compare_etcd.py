"""Sixfold against etcd, same harness, same workload, same run.

    python bench/compare_etcd.py [--seconds 3] [--json out.json] [--seed 1] [--pairs both|plain|tls]
                                 [--etcd-target leader|round-robin] [--etcd-channels shared|per-client]

Runs, one system at a time (never two at once on the same cores), with 100-byte values and unique
keys, the workload of bench/cluster.py: puts at 1, 16 and 64 client threads, then linearizable
gets at 16 and 64 client threads over a pre-loaded key set. Systems:
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

etcd is never installed by this script: without an `etcd` binary on PATH it says how to install
one and exits 0. Every etcd process it starts is killed (SIGKILL, by pid) before it exits.
Speed is reported, never asserted. Every loop is bounded by time and count.
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
TOTAL_BUDGET_S = 180.0


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
            rows = cluster_bench.standard_rows(system, clients, seconds=args.seconds, seed=args.seed,
                                               get_keys=args.get_keys, log=log)
        finally:
            clients.close()
        info["leader_after"] = e.names[i] if (i := e.leader_index()) is not None else None
    return rows, info


def run_sixfold(args, log, *, insecure: bool) -> tuple[list[dict], dict]:
    system = "sixfold-insecure" if insecure else "sixfold-tls"
    t0 = time.perf_counter()
    with cluster_bench.sixfold_cluster(durable=True, base_port=args.base_port, insecure=insecure, no_auth=insecure) as (cluster, db):
        log(f"{system}: up in {time.perf_counter() - t0:.1f} s at {cluster.writer_address}")
        rows = cluster_bench.standard_rows(system, cluster_bench.sixfold_factory(db), seconds=args.seconds,
                                           seed=args.seed, get_keys=args.get_keys, log=log)
        info = {"writer": cluster.writer_address, "client": db.status().get("client", {})}
    return rows, info


# (label, kind, clients, field) of the side-by-side table.
TABLE = [
    ("put, 1 client: ops/s", "put", 1, "ops_s"),
    ("put, 1 client: p50 ms", "put", 1, "p50_ms"),
    ("put, 1 client: p99 ms", "put", 1, "p99_ms"),
    ("put, 16 clients: ops/s", "put", 16, "ops_s"),
    ("put, 16 clients: p50 ms", "put", 16, "p50_ms"),
    ("put, 16 clients: p99 ms", "put", 16, "p99_ms"),
    ("put, 64 clients: ops/s", "put", 64, "ops_s"),
    ("put, 64 clients: p50 ms", "put", 64, "p50_ms"),
    ("put, 64 clients: p99 ms", "put", 64, "p99_ms"),
    ("get, 16 clients: ops/s", "get", 16, "ops_s"),
    ("get, 16 clients: p99 ms", "get", 16, "p99_ms"),
    ("get, 64 clients: ops/s", "get", 64, "ops_s"),
    ("get, 64 clients: p99 ms", "get", 64, "p99_ms"),
]


#: The pairs: (name, etcd system, sixfold system, what).
PAIRS = (
    ("plain", "etcd-3", "sixfold-insecure", "plaintext: etcd over http, Sixfold --insecure"),
    ("tls", "etcd-3-tls", "sixfold-tls", "TLS: etcd with mutual TLS (client and peer), Sixfold's default mutual TLS"),
)


def side_by_side(rows: list[dict], systems: list[str], sixfold: str = "sixfold", etcd: str = "etcd-3") -> tuple[str, list[dict]]:
    """The table (text) and its lines as data; the ratio is `sixfold` / `etcd` (for ops/s higher
    is better for Sixfold, for latencies lower is)."""
    by = {(r["system"], r["kind"], r["clients"]): r for r in rows}
    width = max([11] + [len(s) + 2 for s in systems])
    head = f"{sixfold}/{etcd}"
    out = [f"{'measurement':26}" + "".join(f"{s:>{width}}" for s in systems) + f"{head:>{len(head) + 2}}"]
    data = []
    for label, kind, n, fld in TABLE:
        vals = {s: by[(s, kind, n)][fld] if (s, kind, n) in by else None for s in systems}
        ratio = (vals[sixfold] / vals[etcd]) if vals.get(sixfold) is not None and vals.get(etcd) else None
        fmt = "{:>%d,.0f}" % width if fld == "ops_s" else "{:>%d.2f}" % width
        out.append(f"{label:26}" + "".join(fmt.format(v) if v is not None else f"{'-':>{width}}" for v in vals.values())
                   + (f"{ratio:>{len(head) + 1}.2f}x" if ratio is not None else f"{'-':>{len(head) + 2}}"))
        data.append({"measurement": label, **vals, f"{sixfold}_over_{etcd}": ratio})
    errors = {s: sum(r["errors"] for r in rows if r["system"] == s) for s in systems}
    out.append(f"{'errors (all runs)':26}" + "".join(f"{errors[s]:>{width}}" for s in systems))
    return "\n".join(out), data


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0, help="time per measurement (default 3; 15 measurements)")
    ap.add_argument("--get-keys", type=int, default=cluster_bench.GET_KEYS_DEFAULT, help="pre-loaded keys for gets")
    ap.add_argument("--etcd-target", choices=("round-robin", "leader"), default="leader",
                    help="which etcd member each client thread talks to (default: the leader)")
    ap.add_argument("--etcd-channels", choices=("per-client", "shared"), default="shared",
                    help="one gRPC channel per member shared by all threads (default), or one per client thread")
    ap.add_argument("--skip-etcd-1", action="store_true", help="skip the one-member etcd")
    ap.add_argument("--base-port", type=int, default=None, help="Sixfold writer endpoint port (default: first free block)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    ap.add_argument("--pairs", choices=("both", "plain", "tls"), default="both",
                    help="which pairs to run: plaintext etcd vs --insecure Sixfold, etcd over TLS vs TLS Sixfold, or both")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    assert 0 < args.seconds <= 30
    binary = launch.etcd_binary()
    if binary is None:
        print(launch.INSTALL_HINT)
        print("skipping the etcd comparison, both pairs (plaintext and TLS): no etcd binary on PATH. "
              "bench/cluster.py --secure measures Sixfold's own TLS and encryption costs.")
        return 0
    version = launch.etcd_version(binary)
    pairs = [p for p in PAIRS if args.pairs in ("both", p[0])]
    etcd_one = not args.skip_etcd_1 and any(p[0] == "plain" for p in pairs)
    estimate_s = (2 * len(pairs) + etcd_one) * 5 * args.seconds + 20 * (2 * len(pairs) + etcd_one)
    print(f"seed {args.seed} | durable: etcd WAL fsync (default), Sixfold segments fsync | {args.seconds:g} s per "
          f"measurement | 100-byte values | etcd {version} at {binary} | load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores")
    print(f"etcd clients: {args.etcd_channels} gRPC channel(s), {args.etcd_target} over the members; "
          f"sixfold: one shared engine.connect() Database | estimated {estimate_s:.0f} s")
    if estimate_s > TOTAL_BUDGET_S:
        print(f"warning: --seconds {args.seconds:g} makes the run longer than {TOTAL_BUDGET_S:.0f} s")
    t_start = time.perf_counter()
    root = tempfile.mkdtemp(prefix="sixfold-vs-etcd-")
    rows: list[dict] = []
    info: dict = {}
    try:
        stubs = etcd_stubs.compile_stubs(os.path.join(root, "stubs"))
        for name, _etcd, _sixfold, what in pairs:
            print(f"--- pair {name}: {what}")
            tls = None
            if name == "tls":
                from etcd.tls import make_certs  # noqa: E402  (bench/etcd/tls.py)

                tls = make_certs(os.path.join(root, "etcd-certs"))
            for members in ((1, 3) if name == "plain" and etcd_one else (3,)):
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
    print(f"\nratio columns: Sixfold / etcd 3-member of the same pair (ops/s: > 1 is Sixfold faster; ms: < 1 is "
          f"Sixfold faster). total {time.perf_counter() - t_start:.0f} s")
    table = tables
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"seed": args.seed, "seconds": args.seconds, "etcd_version": version, "durable": True,
                       "etcd_target": args.etcd_target, "etcd_channels": args.etcd_channels, "systems": info,
                       "rows": rows, "table": table}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
