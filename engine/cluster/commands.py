"""`sixfold cluster|node|writer ...`: the launcher and the server processes on the command line.

Registered by `engine.cli` (see COMMAND_MODULES there). The `serve` commands are what the
launcher runs in each process; people rarely type them.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from engine.cluster.launcher import DOWN_TIMEOUT_S, READY_TIMEOUT_S, Cluster
from engine.cluster.manifest import BASE_PORT_DEFAULT, GOSSIP_INTERVAL_S_DEFAULT, WRITER, ClusterError, endpoint_config, load_manifest, node_entry


def _cluster(args) -> Cluster:
    if not args.cluster:
        raise SystemExit(f"sixfold {args.command}: say which cluster folder with --cluster DIR")
    return Cluster(args.cluster)


def _logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
    )


def status_table(st: dict) -> str:
    from engine.cli import table

    rows = []
    for n in st["nodes"]:
        scl = f"{n['scl_min']}..{n['scl_max']}" if "scl_min" in n else None
        rows.append([n["id"], n["az"], n["address"], n["pid"], n["health"], n.get("epoch"), scl, n.get("records")])
    out = table(rows, ["node", "az", "address", "pid", "health", "epoch", "scl(min..max)", "records"])
    w = st["writer"]
    vid = st["volume_id"]
    out += (
        f"\nwriter endpoint {w['address']}  pid {w['pid'] or '-'}  {w['health']}  volume {vid}  "
        f"epoch {w.get('epoch', '-')}  vdl {w.get('vdl', '-')}"
    )
    if not st["durable"]:
        out += "\n(not durable: nodes do not fsync before they acknowledge)"
    return out


def _show(args, st: dict) -> None:
    from engine.cli import print_json

    if getattr(args, "json", False):
        print_json(st)
    else:
        print(status_table(st))


# --- cluster --------------------------------------------------------------------------------
def cmd_cluster_up(args) -> int:
    c = _cluster(args)
    st = c.up(
        base_port=args.base_port, protection_groups=args.protection_groups,
        durable=False if args.no_durable else None, write_timeout_s=args.write_timeout_s,
        gossip_interval_s=args.gossip_interval_s, timeout_s=args.timeout_s,
    )
    _show(args, st)
    if not args.foreground:
        return 0
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print("running in the foreground; Ctrl-C stops the cluster", file=sys.stderr, flush=True)
    reported: set[str] = set()
    while not stop.wait(1.0):
        for name in c.node_ids + [WRITER]:
            state = c.state(name)
            if state == "down" and name not in reported:
                print(f"{name} is down (see {c.folder}/logs/{name}.log)", file=sys.stderr, flush=True)
                reported.add(name)
            elif state != "down":
                reported.discard(name)
    print("stopping the cluster ...", file=sys.stderr, flush=True)
    c.down(args.down_timeout_s)
    return 0


def cmd_cluster_status(args) -> int:
    _show(args, _cluster(args).status())
    return 0


def cmd_cluster_down(args) -> int:
    c = _cluster(args)
    c.down(args.timeout_s)
    if args.json:
        from engine.cli import print_json

        print_json({"cluster": c.folder, "down": True})
    else:
        print(f"cluster {c.folder} is down (data kept)")
    return 0


# --- node and writer process control --------------------------------------------------------
def _control(action: str):
    def run(args) -> int:
        c = _cluster(args)
        name = getattr(args, "id", None) or WRITER
        if action == "start":
            pid = c.start(name, timeout_s=args.timeout_s)
        else:
            pid = getattr(c, action)(name)
        print(f"{name}: {action} (pid {pid})")
        return 0

    return run


def cmd_node_serve(args) -> int:
    from engine.transport.grpc_server import AddressInUse, run_node_process

    _logging(args.log_level)
    if args.cluster:
        m = load_manifest(args.cluster)
        n = node_entry(m, args.id)
        params = dict(
            node_id=n["id"], az=n["az"], data=os.path.join(os.path.abspath(args.cluster), n["data"]),
            listen=args.listen or n["address"], volume_id=m["volume_id"], protection_groups=m["protection_groups"],
            peers={p["id"]: p["address"] for p in m["nodes"]}, durable=m["durable"] and not args.no_durable,
        )
        if args.gossip_interval_s is None:
            args.gossip_interval_s = m.get("gossip_interval_s", GOSSIP_INTERVAL_S_DEFAULT)
    else:
        missing = [f"--{k.replace('_', '-')}" for k in ("id", "az", "data", "listen", "volume_id", "protection_groups", "peers")
                   if getattr(args, k) in (None, "")]
        if missing:
            raise SystemExit(f"sixfold node serve: give --cluster DIR, or all of {', '.join(missing)}")
        peers = {}
        for item in args.peers.split(","):
            node_id, sep, address = item.partition("=")
            if not sep or not node_id or not address:
                raise SystemExit(f"sixfold node serve: --peers wants id=host:port,..., got {item!r}")
            peers[node_id.strip()] = address.strip()
        params = dict(
            node_id=args.id, az=args.az, data=args.data, listen=args.listen, volume_id=args.volume_id,
            protection_groups=args.protection_groups, peers=peers, durable=not args.no_durable,
        )
    if args.gossip_interval_s is None:
        args.gossip_interval_s = GOSSIP_INTERVAL_S_DEFAULT
    try:
        return run_node_process(**params, gossip_interval_s=args.gossip_interval_s, scrub_interval_s=args.scrub_interval_s)
    except AddressInUse as e:
        logging.getLogger("sixfold.node").error("%s", e)
        return 2


def cmd_writer_serve(args) -> int:
    from engine.head.endpoint import run_writer_process
    from engine.transport.grpc_server import AddressInUse

    _logging(args.log_level)
    if not args.cluster:
        raise SystemExit("sixfold writer serve: give --cluster DIR (the writer reads the nodes from cluster.json)")
    m = load_manifest(args.cluster)
    try:
        return run_writer_process(endpoint_config(m), args.listen or m[WRITER]["address"], args.workers)
    except AddressInUse as e:
        logging.getLogger("sixfold.writer").error("%s", e)
        return 2


def register(sub) -> None:
    target = argparse.ArgumentParser(add_help=False)
    target.add_argument("--cluster", metavar="DIR", default=os.environ.get("SIXFOLD_CLUSTER"),
                        help="the cluster folder (default: $SIXFOLD_CLUSTER)")

    # cluster up|status|down
    p = sub.add_parser("cluster", help="start, inspect and stop a cluster on this machine", description=(
        "A cluster is six storage node processes (two in each of AZs a, b, c) and one writer endpoint process, "
        "all on loopback, described by DIR/cluster.json."))
    csub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    up = csub.add_parser("up", parents=[target], help="start the cluster (create it if new)", description=(
        "Start every process of the cluster that is not running and return once all report SERVING on the gRPC "
        "health service. A new folder gets a new volume; an existing one is reopened with its data and volume id. "
        f"Ports: the writer endpoint on BASE_PORT, node n<i> on BASE_PORT+i."))
    up.add_argument("--base-port", type=int, default=None,
                    help=f"first of 7 consecutive ports (default {BASE_PORT_DEFAULT}: writer 7400, nodes 7401-7406); "
                         "fixed when the cluster is created")
    up.add_argument("--protection-groups", type=int, default=None, metavar="N",
                    help="stripes of the key space, for a new volume (default 8)")
    up.add_argument("--no-durable", action="store_true", help="nodes do not fsync before acknowledging (faster, for tests)")
    up.add_argument("--write-timeout-s", type=float, default=None, help="how long a write waits to become durable (default 5)")
    up.add_argument("--gossip-interval-s", type=float, default=None,
                    help=f"seconds between a node's gossip rounds (default {GOSSIP_INTERVAL_S_DEFAULT:g}; 0 turns repair off)")
    up.add_argument("--timeout-s", type=float, default=READY_TIMEOUT_S, help="how long to wait for each process to be SERVING")
    up.add_argument("--down-timeout-s", type=float, default=DOWN_TIMEOUT_S, help=argparse.SUPPRESS)
    up.add_argument("--foreground", action="store_true", help="stay attached; Ctrl-C stops the whole cluster")
    up.add_argument("--json", action="store_true", help="print the status as JSON")
    up.set_defaults(func=cmd_cluster_up)
    st = csub.add_parser("status", parents=[target], help="show every process, its health and SCLs", description=(
        "Show each node (AZ, address, pid, health, epoch, SCL range, records) and the writer endpoint (VDL, epoch)."))
    st.add_argument("--json", action="store_true", help="print JSON for scripts")
    st.set_defaults(func=cmd_cluster_status)
    down = csub.add_parser("down", parents=[target], help="stop every process (the data stays)", description=(
        "Send SIGTERM to the writer endpoint, then to the nodes (they finish in-flight calls and close their data "
        "cleanly); SIGKILL whatever is still running after the timeout."))
    down.add_argument("--timeout-s", type=float, default=DOWN_TIMEOUT_S, help="grace before SIGKILL")
    down.add_argument("--json", action="store_true", help="print JSON for scripts")
    down.set_defaults(func=cmd_cluster_down)

    # node serve|kill|stop|cont|start, writer serve|kill|stop|cont|start
    for family in ("node", "writer"):
        what = "a storage node" if family == "node" else "the writer endpoint"
        p = sub.add_parser(family, help=f"run or control {what} process", description=(
            f"Control {what} of a cluster by signal (kill = SIGKILL, stop = SIGSTOP, cont = SIGCONT, start = start "
            "again with the same arguments), or run one (serve; the launcher does that)."))
        fsub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
        for action, words in (
            ("kill", "SIGKILL: crash it at once"),
            ("stop", "SIGSTOP: freeze it (sockets stay open, nobody answers)"),
            ("cont", "SIGCONT: resume a frozen process"),
            ("start", "start it again (same arguments) and wait until it is SERVING"),
        ):
            a = fsub.add_parser(action, parents=[target], help=words, description=f"{words.capitalize()}.")
            if family == "node":
                a.add_argument("id", help="node id, e.g. n3")
            if action == "start":
                a.add_argument("--timeout-s", type=float, default=READY_TIMEOUT_S, help="how long to wait for SERVING")
            a.set_defaults(func=_control(action))
        serve = fsub.add_parser("serve", help=f"run {what} in this process (until SIGTERM)", description=(
            f"Run {what} in the foreground, logging to stderr, until SIGTERM or Ctrl-C."))
        serve.add_argument("--cluster", metavar="DIR", help="read the parameters from DIR/cluster.json")
        serve.add_argument("--listen", metavar="HOST:PORT", help="listen address (default: from the manifest)")
        serve.add_argument("--log-level", default="info", help="debug, info, warning or error")
        if family == "node":
            serve.add_argument("--id", help="node id (n1..n6)")
            serve.add_argument("--az", help="availability zone of the node")
            serve.add_argument("--data", metavar="DIR", help="the node's LMDB folder")
            serve.add_argument("--volume-id", help="volume id (a node refuses a folder of another volume)")
            serve.add_argument("--protection-groups", type=int, help="protection groups of the volume")
            serve.add_argument("--peers", metavar="ID=HOST:PORT,...", help="the other nodes, for gossip")
            serve.add_argument("--no-durable", action="store_true", help="do not fsync before acknowledging")
            serve.add_argument("--gossip-interval-s", type=float, default=None,
                               help=f"seconds between gossip rounds (default {GOSSIP_INTERVAL_S_DEFAULT:g}; 0: off)")
            serve.add_argument("--scrub-interval-s", type=float, default=1.0, help="seconds between scrub steps")
            serve.set_defaults(func=cmd_node_serve)
        else:
            serve.add_argument("--workers", type=int, default=128, help="gRPC worker threads")
            serve.set_defaults(func=cmd_writer_serve)


__all__ = ["ClusterError", "register", "status_table"]
