"""What checking a client token costs per KV call, measured in one run.

    python bench/auth.py [--calls 2000] [--rounds 5] [--json out.json]

One `WriterEndpoint` over six in-process storage nodes (real LMDB, not durable) is served by three
real gRPC servers on loopback: one whose `KVServicer` checks tokens (`engine.security.users.
Authenticator` over a users file with one user), and two that do not (the second is a control:
the gap between the two identical ones is the noise floor of the machine). The same client code
makes `--calls` sequential Get calls against each (one connection each, no boxcar: one RPC per
get; the token client sends its metadata), interleaved in `--rounds` so that drift of a shared
machine falls on all. Reported: the mean time per call on each, the differences in
microseconds, and the check alone (`Authenticator.admit` in a loop, no gRPC). Speed is
reported, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

try:
    import engine  # noqa: F401
except ImportError:  # run from a checkout that is not installed: use the tree this file is in
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.client import RemoteBackend
from engine.core.types import Geometry, default_nodes
from engine.database import Database
from engine.head.endpoint import EndpointConfig, KVServicer, WriterEndpoint
from engine.node.service import StorageNode
from engine.proto import kv_pb2_grpc
from engine.security.users import Authenticator, UserStore, bearer
from engine.transport.grpc_server import make_server
from engine.transport.inprocess import InProcessTransport, Registry

VOLUME_ID = "00000000-0000-4000-8000-0000000a0742"


def run(calls: int, rounds: int) -> dict:
    folder = tempfile.mkdtemp(prefix="sixfold-bench-auth-")
    servers, nodes, dbs = [], [], []
    endpoint = None
    try:
        token = UserStore(folder).add("bench", "read")
        geometry, infos = Geometry(2), tuple(default_nodes())
        registry = Registry()
        for info in infos:
            node = StorageNode(os.path.join(folder, info.id), info, geometry, VOLUME_ID, durable=False)
            node.attach(InProcessTransport(registry, info.id), lambda: [i.id for i in infos])
            registry.set(info.id, node)
            nodes.append(node)
        endpoint = WriterEndpoint(
            EndpointConfig(volume_id=VOLUME_ID, protection_groups=2, nodes=infos, durable=False),
            transport=InProcessTransport(registry, "writer"),
        )
        endpoint.open()
        auth = Authenticator(os.path.join(folder, "users.json"))
        addresses = {}
        for name, a in (("no token check", None), ("token check", auth), ("control", None)):
            server, port = make_server("127.0.0.1:0", 8)
            kv_pb2_grpc.add_KVServicer_to_server(KVServicer(endpoint, a), server)
            server.start()
            servers.append(server)
            addresses[name] = f"127.0.0.1:{port}"
        plain = Database(RemoteBackend(addresses["no token check"], boxcar=False))
        checked = Database(RemoteBackend(addresses["token check"], boxcar=False, token=token))
        control = Database(RemoteBackend(addresses["control"], boxcar=False))
        dbs += [plain, checked, control]
        plain.put(b"bench:k", b"v" * 100)
        for db in (plain, checked, control):  # warm up: connections, caches
            for _ in range(100):
                assert db.get(b"bench:k") == b"v" * 100
        spent = {"no token check": 0.0, "token check": 0.0, "control": 0.0}
        per_round = max(1, calls // rounds)
        for _ in range(rounds):
            for name, db in (("no token check", plain), ("token check", checked), ("control", control)):
                t0 = time.perf_counter()
                for _ in range(per_round):
                    db.get(b"bench:k")
                spent[name] += time.perf_counter() - t0
        n = per_round * rounds
        md = bearer(token)
        loops = 100_000
        t0 = time.perf_counter()
        for _ in range(loops):
            auth.admit("ipv4:127.0.0.1:1", md, "Get")
        check_us = (time.perf_counter() - t0) / loops * 1e6
        us = {name: s / n * 1e6 for name, s in spent.items()}
        return {
            "calls_each": n,
            "us_per_call_no_check": round(us["no token check"], 1),
            "us_per_call_with_check": round(us["token check"], 1),
            "difference_us_per_call": round(us["token check"] - us["no token check"], 1),
            "difference_percent": round(100 * (us["token check"] / us["no token check"] - 1), 1),
            "us_per_call_control": round(us["control"], 1),
            "noise_floor_us": round(abs(us["control"] - us["no token check"]), 1),
            "admit_alone_us": round(check_us, 2),
        }
    finally:
        for db in dbs:
            db.close()
        for server in servers:
            server.stop(0).wait(10)
        if endpoint is not None:
            endpoint.close()
        for node in nodes:
            node.close()
        shutil.rmtree(folder, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=2000, help="Get calls against each server")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds the calls are split into")
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    args = p.parse_args()
    result = run(args.calls, args.rounds)
    print(f"{result['calls_each']} sequential Get calls against each of three servers of one endpoint:")
    print(f"  without a token check  {result['us_per_call_no_check']:8.1f} us/call")
    print(f"  with a token check     {result['us_per_call_with_check']:8.1f} us/call  "
          f"({result['difference_us_per_call']:+.1f} us, {result['difference_percent']:+.1f}%)")
    print(f"  control (no check, a second identical server): {result['us_per_call_control']:.1f} us/call "
          f"(noise floor: {result['noise_floor_us']:.1f} us)")
    print(f"  Authenticator.admit alone (stat + SHA-256 + lookups): {result['admit_alone_us']:.2f} us")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
