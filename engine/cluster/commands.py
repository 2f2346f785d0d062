"""`sixfold cluster|node|writer ...`: the launcher and the server processes on the command line.

Registered by `engine.cli` (see COMMAND_MODULES there). The `serve` commands are what the
launcher runs in each process; people rarely type them. The commands that change which processes
run or what the cluster is (cluster up and down, node and writer kill/stop/cont/start, node
replace and wipe) are recorded in the cluster's audit log (`engine.cluster.access.audited`).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import threading
import time

from engine.cluster.access import audited
from engine.cluster.launcher import DOWN_TIMEOUT_S, READY_TIMEOUT_S, Cluster
from engine.cluster.manifest import (
    BASE_PORT_DEFAULT,
    GOSSIP_INTERVAL_S_DEFAULT,
    METRICS_PORT_OFFSET_DEFAULT,
    WRITER,
    ClusterError,
    endpoint_config,
    identity_hosts,
    listen_address,
    load_manifest,
    load_manifest_file,
    manifest_path,
    locked,
    metrics_port,
    node_entry,
    save_manifest,
    tls_config,
    tls_folder,
)


def _cluster(args) -> Cluster:
    if not args.cluster:
        raise SystemExit(f"sixfold {args.command}: say which cluster folder with --cluster DIR")  # exit 2 (engine.cli)
    return Cluster(args.cluster, on_wait=lambda text: print(f"sixfold: {text}", file=sys.stderr, flush=True))


def _logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
    )


def with_processes(st: dict, detail: bool = False) -> dict:
    """`st` (the launcher's status) with the one status view's rows (`engine.cluster.overview`)
    made again, per-PG detail in them with `detail` (the faults of the rows it had are kept)."""
    from engine.cluster.overview import from_launcher

    faults = {p["id"]: p.get("faults") or [] for p in st.get("processes", ())}
    rows = from_launcher(st, detail=detail)
    for r in rows:
        r["faults"] = faults.get(r["id"], r["faults"])
    st["processes"] = rows
    return st


def status_table(st: dict, detail: bool = False) -> str:
    """The one status view (every process: `engine.cluster.overview.table`), then the writer
    endpoint's line, storage warnings, security and client tokens."""
    from engine.cluster.overview import table as process_table

    if "processes" not in st or detail:
        with_processes(st, detail)
    out = process_table(st["processes"], detail=detail)
    out += "".join(f"\nwarning: {n['storage_warning']}" for n in st["nodes"] if n.get("storage_warning"))
    w = st["writer"]
    vid = st["volume_id"]
    out += (
        f"\nwriter endpoint {w['address']}  pid {w['pid'] or '-'}  volume {vid}  "
        f"epoch {w.get('epoch', '-')}  vdl {w.get('vdl', '-')}  metrics {w.get('metrics') or '-'}"
    )
    for r in st.get("readers", ()):
        if r.get("connected") is False or r.get("last_error"):
            out += f"\nreader {r['id']}: not connected to the writer" + (f" ({r['last_error']})" if r.get("last_error") else "")
    if not st["durable"]:
        out += "\n(not durable: nodes do not fsync before they acknowledge)"
    sec = st.get("security") or {}
    if sec:
        if sec.get("tls"):
            out += "\nsecurity: mutual TLS on every channel, calls authorised by certificate role"
        else:
            out += "\nsecurity: INSECURE (--insecure): plaintext, no authentication; anyone on this host can call any RPC"
        if sec.get("encrypted"):
            out += f"\nencrypted at rest: AES-256-GCM values, keyed-hash keys; master key file {sec.get('key_file') or '-'}"
        else:
            out += "\nnot encrypted at rest (create a cluster with --encrypt --key-file F for that)"
        if sec.get("allow_fault_injection"):
            out += "\nfault injection allowed (--allow-fault-injection): the admin role can corrupt records and drop requests"
        refused = sum(int((n.get("security") or {}).get("refused", 0)) for n in st["nodes"])
        if refused:
            out += f"\nrefused calls on the nodes: {refused} (see `--json` for who and why)"
        for w in sec.get("warnings", ()):
            out += f"\nwarning: {w}"
    auth = w.get("auth")
    if auth is not None:
        out += (f"\nclient tokens: {auth['users']} users" + (f" (NO TOKEN ACCEPTED: {auth['error']})" if auth["error"] else "")
                + f"; refused {auth['refused_unauthenticated']} unauthenticated, {auth['refused_permission']} "
                "without the role (see `sixfold audit tail`)")
    elif "vdl" in w:  # the endpoint answered, and checks no token
        out += "\nclient tokens: OFF (any local process may read and write)"
    return out


def _show(args, st: dict) -> None:
    from engine.output import print_json

    detail = getattr(args, "detail", False)
    if getattr(args, "json", False):
        print_json(with_processes(st, detail) if detail else st)
    else:
        print(status_table(st, detail))


# --- cluster --------------------------------------------------------------------------------
def _encryption_arguments(args) -> dict:
    """`--encrypt` and `--key-file` of `cluster up`: both or neither (exit 2 otherwise)."""
    if args.encrypt and not args.key_file:
        raise SystemExit("sixfold cluster up --encrypt: give the master key with --key-file F "
                         "(make one with `sixfold key new F`, kept outside the cluster folder)")
    if args.key_file and not args.encrypt:
        raise SystemExit("sixfold cluster up --key-file: a key file encrypts the volume only with --encrypt "
                         "(encryption is chosen when the cluster is created)")
    return {"encrypt": True, "key_file": args.key_file} if args.encrypt else {}


def _backup_argument(args) -> dict | None:
    """--backup DIR [--backup-retention-days N] (engine.backup), for the manifest."""
    if args.backup is None:
        if args.backup_retention_days is not None:
            raise SystemExit("sixfold cluster up: --backup-retention-days needs --backup DIR")
        return None
    if args.backup_retention_days is not None and not args.backup_retention_days > 0:
        raise SystemExit("sixfold cluster up: --backup-retention-days must be a positive number of days")
    return {"target": args.backup, "retention_days": args.backup_retention_days}


def cmd_cluster_up(args) -> int:
    from engine.security import audit

    c = _cluster(args)
    running = [n for n in c.node_ids if c.state(n) != "down"] if args.max_storage is not None and c.exists else []
    try:
        st = c.up(
            base_port=args.base_port, protection_groups=args.protection_groups,
            durable=False if args.no_durable else None, write_timeout_s=args.write_timeout_s,
            gossip_interval_s=args.gossip_interval_s, timeout_s=args.timeout_s,
            insecure=True if args.insecure else None, allow_fault_injection=True if args.allow_fault_injection else None,
            no_auth=args.no_auth, readers=args.readers, promote_readers=False if args.no_promote else None,
            max_storage_bytes=args.max_storage, backup=_backup_argument(args), **_encryption_arguments(args),
            metrics_port_offset=args.metrics_port_offset, no_metrics=args.no_metrics, netns=args.netns,
        )
    except Exception as e:
        if c.exists:
            audit.record(c.folder, "cluster up", target=c.folder, result=type(e).__name__)
        raise
    audit.record(c.folder, "cluster up", target=c.folder, result="ok", started=st["started"])
    if args.redis_port is not None or args.redis_read_port is not None:
        from engine.redis.cli import start_background

        for port, reader in ((args.redis_port, False), (args.redis_read_port, True)):
            if port is not None:
                pid = start_background(c.folder, port, reader=reader, timeout_s=args.timeout_s)
                print(f"sixfold: Redis endpoint ({'read-only, on the readers' if reader else 'writer'}) on 127.0.0.1:{port} "
                      f"(pid {pid}, log {c.folder}/logs/redis-{port}.log)", file=sys.stderr, flush=True)
    if not st["started"]:
        print(f"sixfold: cluster {c.folder} is already up (every process was running; nothing started)",
              file=sys.stderr, flush=True)
    if running:
        print(f"sixfold: the storage maximum is recorded; {', '.join(running)} kept theirs (they were running): it applies "
              "when each restarts (`sixfold node stop ID` then `sixfold node start ID`)", file=sys.stderr, flush=True)
    _show(args, st)
    if not args.foreground:
        return 0
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print("running in the foreground; Ctrl-C stops the cluster", file=sys.stderr, flush=True)
    reported: set[str] = set()
    while not stop.wait(1.0):
        for name in c.node_ids + [WRITER] + c.reader_ids:
            state = c.state(name)
            if state == "down" and name not in reported:
                print(f"{name} is down (see {c.folder}/logs/{name}.log)", file=sys.stderr, flush=True)
                reported.add(name)
            elif state != "down":
                reported.discard(name)
    print("stopping the cluster ...", file=sys.stderr, flush=True)
    from engine.redis.cli import stop_background

    stop_background(c.folder)
    c.down(args.down_timeout_s)
    audit.record(c.folder, "cluster down", target=c.folder, result="ok", foreground=True)
    return 0


#: `cluster status` exits with this when a process is not SERVING (engine.cli.EXIT_CODES).
EXIT_UNHEALTHY = 4


def unhealthy(st: dict) -> list[str]:
    """'n6 DOWN', 'writer PAUSED'...: every process of a status that is not SERVING."""
    procs = [(n["id"], n["health"]) for n in st["nodes"]] + [(WRITER, st["writer"]["health"])] + [
        (r["id"], r["health"]) for r in st.get("readers", ())]
    return [f"{name} {health}" for name, health in procs if health != "SERVING"]


def cmd_cluster_status(args) -> int:
    if getattr(args, "watch", False):
        return _watch_rebuild(args, _cluster(args), status_table)
    st = _cluster(args).status()
    _show(args, st)
    bad = unhealthy(st)
    if bad:
        print(f"sixfold: the cluster is not healthy: {', '.join(bad)}", file=sys.stderr)
        return EXIT_UNHEALTHY
    return 0


# --- healing: replace, wipe, rebuild progress -----------------------------------------------
class LiveLine:
    """One status line on stderr: rewritten in place on a terminal, else printed when it
    changes (at most once a second), so a log stays readable."""

    def __init__(self, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.last = ""
        self.printed_at = 0.0
        self.width = 0

    def show(self, text: str) -> None:
        import time

        if self.tty:
            self.stream.write("\r" + text.ljust(self.width))
            self.width = len(text)
            self.stream.flush()
        elif text != self.last and time.monotonic() - self.printed_at >= 1.0:
            print(text, file=self.stream, flush=True)
            self.printed_at = time.monotonic()
        self.last = text

    def done(self) -> None:
        if self.tty and self.width:
            self.stream.write("\n")
            self.stream.flush()
        self.width = 0


def _bar(fraction: float, width: int = 20) -> str:
    filled = int(round(max(0.0, min(1.0, fraction)) * width))
    return "[" + "#" * filled + "." * (width - filled) + "]"


def membership_table(st: dict) -> str:
    from engine.output import table

    members = set((st["writer"].get("membership") or {}).get("members") or ())
    rows = []
    for n in st["nodes"]:
        role = "member" if not members or n["id"] in members else "joining"
        scl = f"{n['scl_min']}..{n['scl_max']}" if "scl_min" in n else None
        rows.append([n["id"], n["az"], n["address"], role, n["health"], n.get("epoch"), scl, n.get("lag")])
    for r in st.get("retired", ()):
        rows.append([r["id"], r["az"], None, f"retired (-> {r['replaced_by']})" if r.get("replaced_by") else "retired",
                     None, None, None, None])
    return table(rows, ["node", "az", "address", "role", "health", "epoch", "scl(min..max)", "lag"])


def rebuild_table(st: dict, detail: bool = False) -> str:
    """`node rebuild-status`: the one status view (its repair column is each node's rebuild),
    then the writer's line."""
    from engine.cluster.overview import table as process_table

    if "processes" not in st or detail:
        with_processes(st, detail)
    out = process_table(st["processes"], detail=detail)
    w = st["writer"]
    out += f"\nwriter epoch {w.get('epoch', '-')}  vdl {w.get('vdl', '-')}"
    out += "  (lag: LSNs behind the writer's PGCL, summed over PGs; repair: share of those LSNs held)"
    return out


def _watch_rebuild(args, c: Cluster, render) -> int:
    """Redraw `render(status)` until every node caught up (exit 0) or the timeout (exit 3)."""
    from engine.output import print_json

    tty = sys.stdout.isatty()
    shown = [""]

    def show(st: dict) -> None:
        if getattr(args, "json", False):
            return
        text = render(st)
        if text == shown[0]:
            return
        shown[0] = text
        if tty:
            sys.stdout.write("\x1b[H\x1b[J")
        print(text + ("\n" if not tty else ""), flush=True)

    try:
        st = c.wait_rebuilt(timeout_s=args.timeout_s, interval_s=args.interval_s, progress=show)
    except ClusterError as e:
        print(f"sixfold: {e}", file=sys.stderr)
        return 3
    if getattr(args, "json", False):
        print_json(st)
    else:
        print("every node has caught up")
    return 0


def cmd_node_rebuild_status(args) -> int:
    c = _cluster(args)
    if args.watch:
        return _watch_rebuild(args, c, rebuild_table)
    st = c.rebuild_status()
    if args.json:
        from engine.output import print_json

        print_json(with_processes(st, args.detail) if args.detail else st)
    else:
        print(rebuild_table(st, args.detail))
    return 0


def cmd_node_wipe(args) -> int:
    c = _cluster(args)
    c.wipe_node(args.id)
    if not args.json:
        print(f"{args.id}: wiped and started empty (pid {c.pid(args.id)}); it rebuilds from its peers")
    if args.watch:
        return _watch_rebuild(args, c, rebuild_table)
    if args.json:
        from engine.output import print_json

        print_json({"node": args.id, "wiped": True, "pid": c.pid(args.id)})
    return 0


def cmd_node_replace(args) -> int:
    from engine.output import print_json

    c = _cluster(args)
    line = LiveLine()

    def on_change(ch) -> None:
        if args.json:
            return
        if ch.phase == "rebuilding":
            line.show(f"{ch.old} -> {ch.new}: {ch.new} rebuilding {_bar(ch.fraction)} {ch.fraction:6.1%}  "
                      f"{ch.fetched_records} records fetched, lag {ch.lag}  epoch {ch.epoch}  {ch.seconds:.1f} s")
        else:
            line.show(f"{ch.old} -> {ch.new}: {ch.phase} at epoch {ch.epoch} after {ch.seconds:.1f} s")

    if not args.json:
        print(f"replacing {args.id} by {args.new} ...", file=sys.stderr, flush=True)
    try:
        result = c.replace_node(args.id, args.new, timeout_s=args.timeout_s, on_change=on_change)
    finally:
        line.done()
    st = c.status()
    if args.json:
        print_json({**result, "status": st})
        return 0
    if result["replaced"]:
        print(f"{args.id} replaced by {args.new} in {result['seconds']:.1f} s; epoch {result['epoch']}")
    else:
        print(f"reverted: {args.id} answered again before {args.new} caught up; {args.new} retired")
    print(membership_table(st))
    return 0


def cmd_cluster_rekey(args) -> int:
    c = _cluster(args)
    result = c.rekey(args.key_file, args.new_key_file)
    if args.json:
        from engine.output import print_json

        print_json(result)
    else:
        print(f"cluster {c.folder}: data key re-wrapped under {result['key_file']}; the writer keeps serving "
              "(it needs the new key file from its next start)")
    return 0


def cmd_key_new(args) -> int:
    from engine.envelope import write_key_file

    try:
        path = write_key_file(args.path)
    except FileExistsError:
        raise SystemExit(f"sixfold key new: {args.path} exists; a key file is never overwritten (the data it "
                         "encrypts would be lost with it). Pick another path.") from None
    print(f"wrote a new master key to {path} (mode 0600). Keep it secret and outside the cluster folder; back it up: "
          "without it an encrypted volume cannot be read.")
    return 0


def _register_key(sub) -> None:
    p = sub.add_parser("key", help="master keys for encryption at rest", description=(
        "A master key is 32 random bytes, as base64 text in a file of its own (mode 0600). It wraps the data key of "
        "an encrypted volume (`sixfold cluster up --encrypt --key-file F`, engine.open(path, encryption_key=...))."))
    ksub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    a = ksub.add_parser("new", help="write a new master key file", description=(
        "Write 32 random bytes (base64) to PATH, created mode 0600. An existing PATH is never overwritten."))
    a.add_argument("path", metavar="PATH")
    a.set_defaults(func=cmd_key_new)


def cmd_cluster_down(args) -> int:
    from engine.cluster.netns import RECORD_FILE

    c = _cluster(args)
    netns_only = not c.exists and os.path.exists(os.path.join(c.folder, RECORD_FILE))  # a launcher died early
    if not c.exists and not netns_only:  # the library's down() is a no-op there; a person asked to stop something
        raise ClusterError(f"{c.folder} is not a cluster folder (no cluster.json): there is nothing to stop")
    from engine.redis.cli import stop_background

    stop_background(c.folder)  # the Redis endpoints `cluster up --redis-port` started, first
    c.down(args.timeout_s)
    if args.json:
        from engine.output import print_json

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


#: `--metrics-port off`: this process serves no metrics.
METRICS_OFF = "off"


def _metrics_port_argument(text: str) -> int | str:
    """An argparse type: a metrics port, 0..65535 (0: any free port), or `off`."""
    if text.strip().lower() == METRICS_OFF:
        return METRICS_OFF
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port: give 0..65535 (0: any free port) or off") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is out of range: give 0..65535 (0: any free port) or off")
    return port


def _metrics_offset_argument(text: str) -> int:
    """An argparse type: a metrics port offset, a whole number of at least 1 (the engine checks
    that every process's port plus it is a port)."""
    try:
        offset = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if offset < 1:
        raise argparse.ArgumentTypeError(f"{offset}: a metrics port offset is at least 1 (--no-metrics turns them off)")
    return offset


def _metrics_port_help(default: str) -> str:
    return (f"serve Prometheus metrics over HTTP on 127.0.0.1:PORT (loopback only; 0: any free port, logged; off: "
            f"none). Default: {default}")


def _serve_metrics(args, default_port: int | None, who: str, *, api: bool = True):
    """This process's metrics (engine.metrics), served on loopback at --metrics-port, else at
    `default_port` (a cluster process's: from the manifest); (None, None) when off. Bound before
    the process opens anything; a busy port is AddressInUse, as for the gRPC port."""
    port = args.metrics_port if args.metrics_port is not None else default_port
    if port is None or port == METRICS_OFF:
        return None, None
    from engine.metrics import Metrics, serve

    metrics = Metrics(process=True, api=api)
    server = serve(metrics, port)
    logging.getLogger("sixfold.metrics").info("%s: Prometheus metrics on %s", who, server.url)
    return metrics, server


def cmd_node_serve(args) -> int:
    from engine.transport.grpc_server import AddressInUse, InsecureListen, run_node_process

    _logging(args.log_level)
    maximum = _node_maximum(args)
    server = None
    try:
        if args.cluster or args.spec:
            # Everything else comes from the manifest (or the deployment spec), and gossip
            # re-reads it to reach nodes added later (engine.cluster.addresses).
            from engine.cluster.addresses import run_cluster_node

            folder, manifest_file = _manifest_source(args, "node serve")
            if not args.id:
                raise SystemExit(f"sixfold node serve {'--spec FILE' if args.spec else '--cluster DIR'}: say which node with --id")
            m = load_manifest_file(manifest_file, folder)
            metrics, server = _serve_metrics(args, metrics_port(m, node_entry(m, args.id)["address"]),
                                             f"node {args.id}", api=False)
            return run_cluster_node(
                folder, args.id, listen=args.listen, durable=False if args.no_durable else None,
                gossip_interval_s=args.gossip_interval_s, scrub_interval_s=args.scrub_interval_s,
                max_storage_bytes=maximum, reserve_bytes=args.reserve_bytes, metrics=metrics, manifest_file=manifest_file,
            )
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
        if args.gossip_interval_s is None:
            args.gossip_interval_s = GOSSIP_INTERVAL_S_DEFAULT
        metrics, server = _serve_metrics(args, None, f"node {args.id}", api=False)
        return run_node_process(
            node_id=args.id, az=args.az, data=args.data, listen=args.listen, volume_id=args.volume_id,
            protection_groups=args.protection_groups, peers=peers, durable=not args.no_durable,
            gossip_interval_s=args.gossip_interval_s, scrub_interval_s=args.scrub_interval_s,
            max_storage_bytes=maximum, reserve_bytes=args.reserve_bytes,
            allow_fault_injection=bool(args.allow_fault_injection), metrics=metrics,
        )
    except (AddressInUse, InsecureListen) as e:
        logging.getLogger("sixfold.node").error("%s", e)
        return 2
    finally:
        if server is not None:
            server.close()


def _directory(folder: str, manifest_file: str, me: str):
    """What an endpoint of the cluster answers `KV.Directory` with: every process its manifest
    or spec names (engine.cluster.addresses.ManifestDirectory)."""
    from engine.cluster.addresses import ManifestDirectory

    return ManifestDirectory(folder, me, manifest_file)


def _manifest_source(args, command: str) -> tuple[str, str]:
    """(folder, manifest file) of a serve command: --cluster DIR (DIR/cluster.json) or --spec
    FILE (a deployment spec, its folder the spec's; engine.cluster.spec), never both."""
    if args.cluster and args.spec:
        raise SystemExit(f"sixfold {command}: give --cluster DIR or --spec FILE, not both")
    if args.spec:
        path = os.path.abspath(args.spec)
        return os.path.dirname(path), path
    if not args.cluster:
        raise SystemExit(f"sixfold {command}: give --cluster DIR or --spec FILE (the process reads the cluster from it)")
    return os.path.abspath(args.cluster), manifest_path(args.cluster)


def _node_maximum(args) -> int | None:
    """`node serve`'s --max-storage (or its older spelling --map-bytes), checked against the
    filesystem of the node's folder (InvalidArgument: exit 3); None: the cluster's, or the default."""
    if args.max_storage is not None and args.map_bytes is not None and args.max_storage != args.map_bytes:
        raise SystemExit("sixfold node serve: --map-bytes is the older spelling of --max-storage; give one")
    maximum = args.max_storage if args.max_storage is not None else args.map_bytes
    if maximum is not None:
        from engine.sizes import check_fits_filesystem

        check_fits_filesystem(maximum, args.data or args.cluster or ".", "--max-storage")
    return maximum


def newer_writer_recorded(m: dict, epoch: int, who: str, pid: int) -> bool:
    """True (logged) when the manifest names another writer that opened at a newer epoch than
    `epoch`: a writer and a promoted reader that opened at about the same time record
    themselves in either order, and the one of the older epoch is fenced already, or soon."""
    recorded = m[WRITER].get("epoch")
    if recorded is not None and recorded > epoch and m[WRITER].get("pid") != pid:
        logging.getLogger("sixfold.writer").warning(
            "%s (pid %d) opened at epoch %d, but the manifest names a writer of epoch %d (pid %s): not recorded",
            who, pid, epoch, recorded, m[WRITER].get("pid"))
        return True
    return False


def _writer_source(args, folder: str, manifest_file: str, m: dict, identity: str):
    """(locator or None, writer_address(), writer_az()) of a serve command: of a cluster folder
    the writer its manifest records (follows `writer start` and a promotion); of a deployment
    spec, into which nothing is recorded, the candidate serving as the writer at the highest
    epoch (engine.cluster.locate), asked with this process's certificate `identity`."""
    if args.spec:
        from engine.cluster.locate import WriterLocator
        from engine.security.users import default_token

        locator = WriterLocator(manifest_file, folder, tls=tls_config(folder, m, identity), token=default_token(folder))
        return locator, locator.writer_address, locator.writer_az

    def writer_address() -> str:
        return load_manifest_file(manifest_file, folder)[WRITER]["address"]

    def writer_az() -> str:
        try:
            return load_manifest_file(manifest_file, folder)[WRITER].get("az", "a")
        except (ClusterError, OSError, ValueError):
            return ""

    return None, writer_address, writer_az


def cmd_writer_serve(args) -> int:
    from engine.head.endpoint import run_writer_process
    from engine.transport.grpc_server import AddressInUse, InsecureListen

    _logging(args.log_level)
    folder, manifest_file = _manifest_source(args, "writer serve")
    m = load_manifest_file(manifest_file, folder)
    if args.standby and not args.listen and not args.spec:
        raise SystemExit("sixfold writer serve --standby: give --listen HOST:PORT (the writer's own address is taken)")
    listen = args.listen or listen_address(m[WRITER])
    config = endpoint_config(m, folder)
    az = args.az or m[WRITER].get("az") or config.local_az
    config = dataclasses.replace(config, local_az=az, directory=_directory(folder, manifest_file, WRITER))

    # A writer of a deployment spec always starts as a candidate (a standby that may open a new
    # volume): the spec names it the writer, but whether it is one is the epochs' to decide. A
    # writer host restarted after a reader took over must not open at once, which would fence
    # the writer that took over; it takes over again only once that one's lease lapsed.
    standby = args.standby or bool(args.spec)
    locator, _writer_address, writer_az = _writer_source(args, folder, manifest_file, m, WRITER)
    if locator is not None and locator.find() is not None:  # who serves now (its AZ: writer_az)
        logging.getLogger("sixfold.writer").warning(
            "%s serves as the writer at epoch %d: this writer waits as a candidate until its lease lapses",
            locator.last.address, locator.last.epoch)

    # The cluster's writer records itself (with its epoch) once it opened: a standby that took
    # over, and the writer at the manifest's writer address (the launcher's). A writer serving at
    # another address by hand is not the cluster's writer of record, and a writer of a
    # deployment spec records nothing (the spec is the operator's file; engine.cluster.spec).
    records = not args.spec and (args.standby or listen == listen_address(m[WRITER]))

    def record_writer(epoch: int) -> None:
        """This process serves as the writer now, at `epoch`: clients and the launcher find it in
        the manifest (unless a writer of a newer epoch recorded itself meanwhile)."""
        with locked(folder):
            mm = load_manifest(folder)
            if not newer_writer_recorded(mm, epoch, "writer", os.getpid()) and (
                    (mm[WRITER]["address"], mm[WRITER].get("pid"), mm[WRITER].get("epoch")) != (listen, os.getpid(), epoch)):
                if (mm[WRITER]["address"], mm[WRITER].get("pid")) != (listen, os.getpid()):
                    logging.getLogger("sixfold.writer").warning(
                        "recording this process (pid %d, %s, AZ %s, epoch %d) as the cluster's writer (was %s, pid %s)",
                        os.getpid(), listen, az, epoch, mm[WRITER]["address"], mm[WRITER].get("pid"))
                mm[WRITER].update(address=listen, pid=os.getpid(), az=az, epoch=epoch)
                save_manifest(folder, mm)

    server = None
    try:
        metrics, server = _serve_metrics(args, metrics_port(m, listen), "writer endpoint")
        return run_writer_process(config, listen, args.workers, tls=tls_config(folder, m, WRITER),
                                  key_file=args.key_file, standby=standby, writer_az=writer_az,
                                  on_serving=record_writer if records else None, metrics=metrics,
                                  open_new=bool(args.spec))
    except (AddressInUse, InsecureListen) as e:
        logging.getLogger("sixfold.writer").error("%s", e)
        return 2
    finally:
        if server is not None:
            server.close()


def cmd_reader_serve(args) -> int:
    from dataclasses import replace

    from engine.cluster.manifest import reader_entry
    from engine.head.replica import run_reader_process
    from engine.security.users import default_token
    from engine.transport.grpc_server import AddressInUse, InsecureListen

    _logging(args.log_level)
    folder, manifest_file = _manifest_source(args, "reader serve")
    if not args.id:
        raise SystemExit("sixfold reader serve: give --id ID (the reader reads the rest from the manifest or spec)")
    m = load_manifest_file(manifest_file, folder)
    r = reader_entry(m, args.id)

    listen = args.listen or listen_address(r)
    # The writer address is asked before every (re)connection of the read point stream.
    _locator, writer_address, writer_az = _writer_source(args, folder, manifest_file, m, r["id"])

    def record_promotion(epoch: int) -> None:
        """This reader serves as the writer now: the manifest names it, and it is a reader no more
        (unless a writer of a newer epoch recorded itself meanwhile: it fences this one). A spec
        records nothing: its clients ask the candidates who serves (engine.cluster.locate)."""
        if args.spec:
            logging.getLogger("sixfold.reader").warning(
                "reader %s (pid %d, %s, AZ %s) serves as the writer at epoch %d; the spec is not changed (clients "
                "and readers find the writer by asking its candidates)", r["id"], os.getpid(), listen, r["az"], epoch)
            return
        with locked(folder):
            mm = load_manifest(folder)
            if newer_writer_recorded(mm, epoch, f"reader {r['id']}", os.getpid()):
                return
            logging.getLogger("sixfold.reader").warning(
                "recording reader %s (pid %d, %s, AZ %s) as the cluster's writer (was %s, pid %s)",
                r["id"], os.getpid(), listen, r["az"], mm[WRITER]["address"], mm[WRITER].get("pid"))
            mm[WRITER].update(address=listen, pid=os.getpid(), az=r["az"], epoch=epoch)
            mine = reader_entry(mm, r["id"])
            mine.update(retired=True, promoted=True, pid=None)
            mm.pop("failover_to", None)
            save_manifest(folder, mm)

    def preferred() -> str | None:
        try:
            return load_manifest_file(manifest_file, folder).get("failover_to")
        except (ClusterError, OSError, ValueError):
            return None

    def rank() -> int:
        """This reader's place among the live readers now (by id number): the first waits least.
        (A fixed place by id number made the survivors of many failovers wait longer each time.)"""
        try:
            live = [x["id"] for x in load_manifest_file(manifest_file, folder).get("readers", []) if not x.get("retired")]
        except (ClusterError, OSError, ValueError):
            live = []

        def number(rid: str) -> int:
            digits = "".join(ch for ch in rid if ch.isdigit())
            return int(digits) if digits else 0

        live.sort(key=number)
        return live.index(r["id"]) if r["id"] in live else len(live)

    directory = _directory(folder, manifest_file, r["id"])
    promotion = None
    if not args.no_promote:
        # A reader may become the writer: it holds the writer's identity for that (only a writer
        # certificate may seal), and takes over once the writer's lease lapsed (engine.head.failover).
        promotion = dict(promote=True, writer_tls=tls_config(folder, m, WRITER), writer_az=writer_az,
                         on_promoted=record_promotion, preferred=preferred, rank=rank,
                         refresh=lambda: dataclasses.replace(endpoint_config(load_manifest_file(manifest_file, folder), folder),
                                                             directory=directory))
    server = None
    try:
        metrics, server = _serve_metrics(args, metrics_port(m, listen), f"reader {r['id']}")
        # The reader authenticates to the writer endpoint with the folder's operator token (a
        # local process of the cluster) and to the nodes with its own certificate (role reader).
        return run_reader_process(replace(endpoint_config(m, folder), local_az=r["az"], directory=directory), r["id"], r["az"],
                                  listen, writer_address, tls=tls_config(folder, m, r["id"]),
                                  token=default_token(folder), key_file=args.key_file, promotion=promotion,
                                  metrics=metrics)
    except (AddressInUse, InsecureListen) as e:
        logging.getLogger("sixfold.reader").error("%s", e)
        return 2
    finally:
        if server is not None:
            server.close()


def _with_to(args):
    args.to = args.id
    return args


def cmd_writer_failover(args) -> int:
    """A planned failover: name the reader to take over, stop the writer cleanly (SIGTERM: its
    in-flight calls finish), wait until the reader has taken over."""
    from engine.cluster.manifest import reader_entry

    c = _cluster(args)
    target = args.to
    m = c.manifest
    r = reader_entry(m, target)
    if r.get("retired"):
        raise ClusterError(f"reader {target} is retired; pick a live reader (`sixfold cluster status`)")
    if c.health(target) != "SERVING":
        raise ClusterError(f"reader {target} is {c.health(target)}: it must be SERVING to take over")
    with locked(c.folder):
        mm = load_manifest(c.folder)
        mm["failover_to"] = target
        save_manifest(c.folder, mm)
    old = (m[WRITER]["address"], m[WRITER].get("pid"))
    t0 = time.monotonic()
    print(f"sixfold: stopping the writer at {old[0]} (pid {old[1]}) cleanly; {target} takes over once its lease "
          "lapses", file=sys.stderr, flush=True)
    pid = c.pid(WRITER)
    if pid is not None:  # SIGTERM: it finishes its in-flight calls and exits; its lease then lapses
        os.kill(pid, signal.SIGTERM)
    deadline = t0 + args.timeout_s
    while time.monotonic() < deadline:
        w = load_manifest(c.folder)[WRITER]
        if w["address"] == r["address"]:
            print(f"{target} is the writer at {w['address']} (pid {w.get('pid')}) after {time.monotonic() - t0:.2f} s")
            return 0
        time.sleep(0.1)
    raise ClusterError(f"{target} did not take over within {args.timeout_s:g} s (see {c.folder}/logs/{target}.log); "
                       "the writer was stopped: `sixfold writer start` brings it back")


def cmd_reader_add(args) -> int:
    c = _cluster(args)
    reader_id = c.add_reader(args.az, timeout_s=args.timeout_s)
    entry = next(r for r in c.manifest["readers"] if r["id"] == reader_id)
    if args.json:
        from engine.output import print_json

        print_json({"reader": reader_id, "az": entry["az"], "address": entry["address"]})
    else:
        print(f"{reader_id}: reader in AZ {entry['az']} at {entry['address']} (pid {c.pid(reader_id)})")
    return 0


def cmd_reader_remove(args) -> int:
    c = _cluster(args)
    c.remove_reader(args.id)
    print(f"{args.id}: removed")
    return 0


def _register_readers(sub, target: argparse.ArgumentParser) -> None:
    p = sub.add_parser("reader", help="run, add and remove reader instances (read replicas)", description=(
        "Reader instances serve reads (get, scan, status) from the storage nodes at the read point the writer "
        "endpoint streams to them; `engine.connect(DIR, role=\"reader\")` and `--role reader` spread reads over "
        "them. Writes to a reader are refused (ReadOnly)."))
    rsub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    a = rsub.add_parser("add", parents=[target], help="add a reader instance and start it", description=(
        "Add a reader (id r<N>, the next free port above the cluster's ports) and wait until it is SERVING. "
        "Up to 15. Default AZ: the one other than the writer's with the fewest readers (b, then c)."))
    a.add_argument("--az", default=None, help="the reader's availability zone (reads prefer nodes of its AZ)")
    a.add_argument("--timeout-s", type=float, default=READY_TIMEOUT_S, help="how long to wait for SERVING")
    a.add_argument("--json", action="store_true", help="print JSON for scripts")
    a.set_defaults(func=audited("reader add", cmd_reader_add, lambda args: args.az or "-"))
    a = rsub.add_parser("remove", parents=[target], help="stop a reader instance and remove it", description=(
        "SIGTERM the reader (SIGKILL after a grace) and mark it removed in the manifest; its id and port are not reused."))
    a.add_argument("id", help="reader id, e.g. r2")
    a.set_defaults(func=audited("reader remove", cmd_reader_remove, lambda args: args.id))
    a = rsub.add_parser("promote", parents=[target], help="make this reader the writer (a planned failover)", description=(
        "The same as `sixfold writer failover --to ID`: the writer is stopped cleanly and reader ID takes over "
        "once the writer's lease lapses (about a second); clients of the cluster folder follow it."))
    a.add_argument("id", help="reader id, e.g. r2")
    a.add_argument("--timeout-s", type=float, default=30.0, help="how long to wait for the takeover")
    a.set_defaults(func=audited("reader promote", lambda args: cmd_writer_failover(_with_to(args)), lambda args: args.id))
    for action, words in (
        ("kill", "SIGKILL: crash it at once"),
        ("stop", "SIGSTOP: freeze it (sockets stay open, nobody answers)"),
        ("cont", "SIGCONT: resume a frozen process"),
        ("start", "start it again (same arguments) and wait until it is SERVING"),
    ):
        a = rsub.add_parser(action, parents=[target], help=words, description=f"{words.capitalize()}.")
        a.add_argument("id", help="reader id, e.g. r1")
        if action == "start":
            a.add_argument("--timeout-s", type=float, default=READY_TIMEOUT_S, help="how long to wait for SERVING")
        a.set_defaults(func=audited(f"reader {action}", _control(action), lambda args: args.id))
    serve = rsub.add_parser("serve", help="run a reader instance in this process (until SIGTERM)", description=(
        "Run reader ID of DIR/cluster.json in the foreground, logging to stderr, until SIGTERM or Ctrl-C."))
    serve.add_argument("--cluster", metavar="DIR", help="the cluster folder")
    serve.add_argument("--spec", metavar="FILE", help=SPEC_HELP)
    serve.add_argument("--id", help="reader id (r1, r2 ...)")
    serve.add_argument("--listen", metavar="HOST:PORT", help="listen address (default: from the manifest)")
    serve.add_argument("--log-level", default="info", help="debug, info, warning or error")
    serve.add_argument("--key-file", metavar="F", default=None, help=(
        "an encrypted cluster's master key file (the launcher passes the one the manifest records)"))
    serve.add_argument("--metrics-port", type=_metrics_port_argument, default=None, metavar="PORT",
                       help=_metrics_port_help("the manifest's: this reader's port plus its metrics port offset"))
    serve.add_argument("--no-promote", action="store_true", help=(
        "never take over as the writer (by default a reader promotes itself once the writer's lease lapsed on a "
        "write quorum of nodes, one in another AZ than the writer's first)"))
    serve.set_defaults(func=cmd_reader_serve)


# --- certificates -----------------------------------------------------------------------------
def _secure_folder(args):
    c = _cluster(args)
    m = c.manifest
    if not m.get("tls"):
        raise ClusterError(f"cluster {c.folder} is insecure (created with --insecure): it has no certificates")
    return c, m, tls_folder(c.folder, m)


def cmd_certs_issue(args) -> int:
    import datetime

    c, m, tf = _secure_folder(args)
    not_after = None
    if args.not_after:
        try:
            not_after = datetime.datetime.fromisoformat(args.not_after)
        except ValueError:
            raise SystemExit(f"sixfold certs issue: --not-after wants an ISO date (2030-01-31), got {args.not_after!r}") from None
        if not_after.tzinfo is None:
            not_after = not_after.replace(tzinfo=datetime.timezone.utc)
    with locked(c.folder):
        hosts = tuple(dict.fromkeys((m.get("host", "127.0.0.1"), *identity_hosts(m, args.id))))
        path = tf.issue(args.id, args.role, days=args.days, hosts=hosts, not_after=not_after,
                        out=args.out)
    info = tf.info(path)
    if args.json:
        from engine.output import print_json

        print_json({"id": info.id, "role": info.role, "serial": info.serial, "not_after": info.not_after, "path": path})
    else:
        print(f"issued {info.role} certificate for {info.id} (serial {info.serial}): {path} (private key inside, mode 0600)")
    return 0


def cmd_certs_list(args) -> int:
    from engine.output import print_json, table

    _c, _m, tf = _secure_folder(args)
    infos = tf.list()
    if args.json:
        print_json([{"id": i.id, "role": i.role, "serial": i.serial, "not_after": i.not_after, "revoked": i.revoked,
                     "days_left": round(i.days_left(), 1), "path": i.path} for i in infos])
        return 0
    print(table([[i.id, i.role, i.serial, f"{i.days_left():.0f}", "revoked" if i.revoked else ""] for i in infos],
                ["id", "role", "serial", "days left", ""]))
    for w in tf.expiring():
        print(f"warning: {w}")
    return 0


def cmd_certs_revoke(args) -> int:
    c, _m, tf = _secure_folder(args)
    with locked(c.folder):
        serial = tf.revoke(args.id)
    print(f"revoked the certificate of {args.id} (serial {serial}): every server refuses it from its next call")
    return 0


def cmd_certs_rotate(args) -> int:
    c, m, tf = _secure_folder(args)
    with locked(c.folder):
        if args.finish:
            dropped = tf.finish_rotation()
            print(f"rotation finished: {dropped} old CA(s) no longer trusted")
            return 0
        ids = tf.rotate(hosts=(m.get("host", "127.0.0.1"),),
                        hosts_of={c.id: identity_hosts(m, c.id) for c in tf.list()})
    print(f"new CA made and trusted beside the old one; reissued {', '.join(ids)}. Servers and client transports pick "
          "the new files up without a restart. Once clients started before now have reconnected (or been restarted), "
          "run `sixfold certs rotate --finish` to stop trusting the old CA.")
    return 0


def _register_certs(sub, target: argparse.ArgumentParser) -> None:
    from engine.security.certs import CERT_DAYS, ROLES

    p = sub.add_parser("certs", help="issue, list, rotate and revoke the certificates of a secure cluster", description=(
        "A secure cluster (the default of `cluster up`) has its own CA in DIR/tls/ and one certificate per process, "
        "with its role (node, writer, reader, admin, client) and id in it. Every RPC is mutual TLS and authorised by "
        "that role on the server side."))
    csub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    a = csub.add_parser("issue", parents=[target], help="issue (or replace) the certificate of an id", description=(
        "Issue a certificate for ID in ROLE, signed by the cluster CA, to DIR/tls/ID.pem (certificate and private key "
        "in one file, mode 0600) or --out FILE."))
    a.add_argument("id", help="the identity, e.g. reader1 (it goes into the certificate and the file name)")
    a.add_argument("--role", required=True, choices=ROLES, help="what the identity may do")
    a.add_argument("--days", type=int, default=CERT_DAYS, help=f"validity in days (default {CERT_DAYS})")
    a.add_argument("--not-after", metavar="ISO-DATE", help=argparse.SUPPRESS)  # tests issue expired certificates
    a.add_argument("--out", metavar="FILE", help="write here instead of DIR/tls/ID.pem")
    a.add_argument("--json", action="store_true", help="print JSON for scripts")
    a.set_defaults(func=cmd_certs_issue)
    a = csub.add_parser("list", parents=[target], help="every certificate, its role, serial and days left")
    a.add_argument("--json", action="store_true", help="print JSON for scripts")
    a.set_defaults(func=cmd_certs_list)
    a = csub.add_parser("revoke", parents=[target], help="take a certificate out of service at once", description=(
        "Add the serial of ID's certificate to DIR/tls/revoked.json. Every server of the cluster re-reads the list "
        "when it changes and refuses the certificate (UNAUTHENTICATED) from its next call, open connections included. "
        "Issue a new certificate for ID to bring it back."))
    a.add_argument("id", help="the identity whose certificate to revoke")
    a.set_defaults(func=cmd_certs_revoke)
    a = csub.add_parser("rotate", parents=[target], help="new CA and certificates, without stopping the cluster",
                        description=(
        "Make a new CA, trust it beside the old one, then reissue every certificate under it; servers and client "
        "transports pick the files up without a restart. `--finish` later stops trusting the old CA."))
    a.add_argument("--finish", action="store_true", help="trust only the current CA (end a rotation)")
    a.set_defaults(func=cmd_certs_rotate)


def register(sub) -> None:
    target = argparse.ArgumentParser(add_help=False)
    target.add_argument("--cluster", metavar="DIR", default=os.environ.get("SIXFOLD_CLUSTER"),
                        help="the cluster folder (default: $SIXFOLD_CLUSTER)")
    _register_certs(sub, target)
    _register_key(sub)
    _register_readers(sub, target)

    # cluster up|status|down
    p = sub.add_parser("cluster", help="start, inspect and stop a cluster on this machine", description=(
        "A cluster is six storage node processes (two in each of AZs a, b, c) and one writer endpoint process, "
        "on loopback (or, with `cluster up --netns`, each in a network namespace of its own), described by "
        "DIR/cluster.json. Processes on hosts of their own run from a deployment spec: see `sixfold spec`."))
    csub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    up = csub.add_parser("up", parents=[target], help="start the cluster (create it if new)", description=(
        "Start every process of the cluster that is not running and return once all report SERVING on the gRPC "
        "health service. A new folder gets a new volume; an existing one is reopened with its data and volume id. "
        "Ports: the writer endpoint on BASE_PORT, node n<i> on BASE_PORT+i; each process serves Prometheus metrics on "
        "127.0.0.1 at its port plus the metrics port offset. While another `sixfold cluster up` (or "
        "down) works on the same folder, this one waits for it, then starts only what is not running: when all is up "
        "already it says so and exits 0."))
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
    up.add_argument("--redis-port", type=int, default=None, metavar="PORT", help=(
        "also run the Redis-compatible endpoint on 127.0.0.1:PORT (RESP2/RESP3; every write answered once durable "
        "on 4 of 6); `cluster down` stops it"))
    up.add_argument("--redis-read-port", type=int, default=None, metavar="PORT", help=(
        "also run a read-only Redis endpoint on 127.0.0.1:PORT whose reads are spread over the reader instances "
        "(needs --readers)"))
    up.add_argument("--insecure", action="store_true", help=(
        "a throwaway cluster: plaintext gRPC, no certificates, no authorisation (anyone on this host can call any "
        "RPC); loopback only. Fixed at creation. Default: mutual TLS with a cluster CA in DIR/tls/"))
    up.add_argument("--no-auth", action="store_true", help=(
        "a new cluster whose writer endpoint checks no client token (any local process may read and write; "
        "a throwaway cluster or a benchmark baseline). Default: every KV call needs a user's token"))
    up.add_argument("--allow-fault-injection", action="store_true", help=(
        "nodes serve the Corrupt and SetFaults RPCs (to the admin certificate only), for chaos runs and fault tests; "
        "without it they do not exist"))
    up.add_argument("--encrypt", action="store_true", help=(
        "encrypt the volume at rest (AES-256-GCM values, keyed-hash keys) under a data key wrapped by the master key "
        "of --key-file; fixed at creation. On an existing encrypted cluster: use this key file from now on"))
    up.add_argument("--key-file", metavar="F", help=(
        "with --encrypt: the master key file (`sixfold key new F`). Its absolute path goes into the manifest, never "
        "the key; keep it outside the cluster folder, readable by you only"))
    up.add_argument("--readers", type=int, default=None, metavar="N", help=(
        "run at least N reader instances (read replicas, up to 15) in the AZs other than the writer's; "
        "`sixfold reader add` adds more later"))
    up.add_argument("--backup", metavar="DIR", default=None, help=(
        "back the volume up continuously into folder DIR: the durable log, and base snapshots (daily, on `sixfold "
        "backup now`); the writer endpoint runs the archiver, and a writer after a failover continues it"))
    up.add_argument("--backup-retention-days", type=float, default=None, metavar="N", help=(
        "with --backup: remove what no restore point of the last N days needs (default: keep everything)"))
    up.add_argument("--no-promote", action="store_true", help=(
        "readers never take over as the writer (default: once the writer's lease lapses, a reader promotes itself)"))
    up.add_argument("--max-storage", type=_size_argument, default=None, metavar="SIZE", help=(
        "the most each node's data may take, e.g. 10GiB, 500MiB or plain bytes (default 32 GiB); nodes grow their "
        "storage up to it, and at it puts are refused with StorageFull while deletes still work. Recorded in "
        "cluster.json; on an existing cluster it applies to each node as it (re)starts, and is refused below the data "
        "a node already holds"))
    metrics = up.add_mutually_exclusive_group()
    metrics.add_argument("--metrics-port-offset", type=_metrics_offset_argument, default=None, metavar="N", help=(
        f"every process serves Prometheus metrics over HTTP on 127.0.0.1, at its own port plus N (default "
        f"{METRICS_PORT_OFFSET_DEFAULT}: writer {BASE_PORT_DEFAULT + METRICS_PORT_OFFSET_DEFAULT}, nodes "
        f"{BASE_PORT_DEFAULT + METRICS_PORT_OFFSET_DEFAULT + 1}-{BASE_PORT_DEFAULT + METRICS_PORT_OFFSET_DEFAULT + 6}); "
        "fixed when the cluster is created; `cluster status` lists every address"))
    metrics.add_argument("--no-metrics", action="store_true", help="a new cluster whose processes serve no metrics")
    up.add_argument("--netns", action="store_true", help=(
        "Linux, as root: every process of a new cluster runs in a network namespace of its own (an address in "
        "198.18.0.0/15, one subnet per AZ behind a bridge), reachable from this machine; real network faults cut "
        "their packets. `cluster down` removes every namespace and link (recorded in DIR/netns.json first)"))
    up.add_argument("--json", action="store_true",
                    help="print the status as JSON (with `started`: the processes this command started)")
    up.set_defaults(func=cmd_cluster_up)
    st = csub.add_parser("status", parents=[target], help="show every process, its health and SCLs", description=(
        "Show each node (AZ, address, metrics address, pid, health, epoch, SCL range, records) and the writer endpoint "
        "(VDL, epoch, metrics address). "
        "The JSON has each node's lag behind the writer's PGCLs and its rebuild progress. Exit code 0 when every "
        f"process is SERVING, {EXIT_UNHEALTHY} when one is not (DOWN, PAUSED, UNREACHABLE, NOT_SERVING; the status "
        "is printed all the same), 3 when the folder is no cluster."))
    st.add_argument("--json", action="store_true", help="print JSON for scripts")
    _watch_arguments(st)
    st.set_defaults(func=cmd_cluster_status)
    down = csub.add_parser("down", parents=[target], help="stop every process (the data stays)", description=(
        "Send SIGTERM to the writer endpoint, then to the nodes (they finish in-flight calls and close their data "
        "cleanly); SIGKILL whatever is still running after the timeout. Waits for a `cluster up` that is still "
        "starting the cluster. Exit code 3 when the folder is no cluster (no cluster.json)."))
    down.add_argument("--timeout-s", type=float, default=DOWN_TIMEOUT_S, help="grace before SIGKILL")
    down.add_argument("--json", action="store_true", help="print JSON for scripts")
    down.set_defaults(func=audited("cluster down", cmd_cluster_down, lambda args: os.path.abspath(args.cluster or "")))
    rk = csub.add_parser("rekey", parents=[target], help="re-wrap the data key under a new master key", description=(
        "Rotate the master key of an encrypted cluster: the volume's data key, unwrapped with --key-file, is wrapped "
        "again under --new-key-file, and the manifest records the new key file. No record changes and no process "
        "restarts (the running writer endpoint keeps its data key); every later start of the writer needs the new "
        "key. The old key file can be destroyed afterwards."))
    rk.add_argument("--key-file", metavar="OLD", required=True, help="the current master key file")
    rk.add_argument("--new-key-file", metavar="NEW", required=True, help="the new master key file (`sixfold key new`)")
    rk.add_argument("--json", action="store_true", help="print JSON for scripts")
    rk.set_defaults(func=audited("cluster rekey", cmd_cluster_rekey, lambda args: os.path.abspath(args.cluster or "")))

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
            a.set_defaults(func=audited(f"{family} {action}", _control(action),
                                        lambda args: getattr(args, "id", None) or WRITER))
        if family == "node":
            _register_healing(fsub, target)
        else:
            fo = fsub.add_parser("failover", parents=[target], help="a planned failover to a reader", description=(
                "Stop the writer cleanly (its in-flight calls finish) and have reader --to take over as soon as the "
                "lease lapses (about a second; the other readers wait). No acknowledged write is lost; clients of the "
                "cluster folder see a short wait. Exit 0 once the reader is the writer, 3 if it did not take over."))
            fo.add_argument("--to", required=True, metavar="READER", help="the reader to promote, e.g. r2")
            fo.add_argument("--timeout-s", type=float, default=30.0, help="how long to wait for the takeover")
            fo.set_defaults(func=audited("writer failover", cmd_writer_failover, lambda args: args.to))
        serve = fsub.add_parser("serve", help=f"run {what} in this process (until SIGTERM)", description=(
            f"Run {what} in the foreground, logging to stderr, until SIGTERM or Ctrl-C."))
        serve.add_argument("--cluster", metavar="DIR", help=(
            "read the parameters from DIR/cluster.json (with --id for a node; its gossip re-reads the manifest to "
            "reach nodes added later)"))
        serve.add_argument("--spec", metavar="FILE", help=SPEC_HELP)
        serve.add_argument("--listen", metavar="HOST:PORT", help="listen address (default: from the manifest)")
        serve.add_argument("--log-level", default="info", help="debug, info, warning or error")
        serve.add_argument("--metrics-port", type=_metrics_port_argument, default=None, metavar="PORT", help=_metrics_port_help(
            "with --cluster, the manifest's (this process's port plus the cluster's metrics port offset); without, off"
            if family == "node" else "the manifest's (the listen port plus the cluster's metrics port offset)"))
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
            serve.add_argument("--allow-fault-injection", action="store_true", help=(
                "serve Corrupt and SetFaults (without --cluster; a cluster node follows its manifest)"))
            serve.add_argument("--max-storage", type=_size_argument, default=None, metavar="SIZE", help=(
                "the most this node's data may take, e.g. 10GiB or plain bytes; its LMDB map grows up to it and it "
                "answers StorageFull beyond (default: the cluster's, else 32 GiB; the least of this, the file size limit "
                "and the disk's room is its capacity)"))
            serve.add_argument("--map-bytes", type=_byte_count(MAP_BYTES_MIN), default=None, metavar="N", help=(
                "the older spelling of --max-storage, in plain bytes"))
            serve.add_argument("--reserve-bytes", type=_byte_count(0), default=None, metavar="N", help=(
                "room kept for deletes and records already logged once the node reports space_low "
                "(default: max(capacity / 16, min(128 MiB, capacity / 4)))"))
            serve.set_defaults(func=cmd_node_serve)
        else:
            serve.add_argument("--workers", type=int, default=128, help="gRPC worker threads")
            serve.add_argument("--key-file", metavar="F", default=None, help=(
                "an encrypted cluster's master key file (the launcher passes the one the manifest records)"))
            serve.add_argument("--standby", action="store_true", help=(
                "a standby writer (needs --listen): serve nothing until the writer's lease lapses on a write quorum "
                "of nodes, then take over at a new epoch (fencing the old writer) and record this process as the "
                "cluster's writer in cluster.json, so clients follow it. A writer of a deployment spec (--spec) is "
                "always one (a new volume it opens at once) and records nothing: clients find it by asking the "
                "spec's writer candidates"))
            serve.add_argument("--az", default=None, help="the AZ of this writer (a standby in another AZ than the "
                               "writer's takes over first)")
            serve.set_defaults(func=cmd_writer_serve)


#: `--spec FILE` of the serve commands.
SPEC_HELP = ("a deployment spec (a placed cluster.json; engine.cluster.spec): run this one process of it on this "
             "host, binding its listen address; relative paths (users file, logs) are the spec's folder's")

#: The smallest --map-bytes (engine.sizes.STORAGE_BYTES_MIN).
MAP_BYTES_MIN = 1 << 20


def _size_argument(text: str) -> int:
    """An argparse type: a storage size (`10GiB`, `500MiB`, plain bytes; engine.sizes), in range."""
    from engine.errors import InvalidArgument
    from engine.sizes import check_storage_bytes, parse_size

    try:
        return check_storage_bytes(parse_size(text), "the size")
    except InvalidArgument as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _byte_count(least: int):
    """An argparse type: a whole number of bytes, at least `least` (a usage error otherwise)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of bytes") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{value} is below the least allowed, {least} bytes")
        return value

    return parse


def _watch_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--detail", action="store_true", help=(
        "per protection group detail too: each node's SCL, the writer's PGCL and the lag (a table, and `pgs` in "
        "each node's entry of `processes` in the JSON)"))
    p.add_argument("--watch", action="store_true",
                   help="redraw every --interval-s until every node has caught up with the writer (lag 0), then exit")
    p.add_argument("--interval-s", type=float, default=1.0, help="seconds between refreshes with --watch")
    p.add_argument("--timeout-s", type=float, default=600.0, help="with --watch: give up (exit 3) after this long")


def _register_healing(fsub, target: argparse.ArgumentParser) -> None:
    """`node replace`, `node wipe`, `node rebuild-status`."""
    from engine.cluster.launcher import REPLACE_TIMEOUT_S

    p = fsub.add_parser("replace", parents=[target], help="replace a node by a new one, without stopping writes", description=(
        "Add node NEW in the AZ of ID (next free port, a new data folder), start it, and have the writer endpoint "
        "replace ID by it in two epoch steps: NEW joins as a second quorum set, rebuilds from its peers, then ID is "
        "dropped. If ID was down and answers again before NEW caught up, the change is reverted instead. Shows NEW's "
        "rebuild progress, then the new membership; ID (or NEW, if reverted) is stopped and marked retired. Run it "
        "again after an interruption to resume."))
    p.add_argument("id", help="the node to replace, e.g. n3")
    p.add_argument("--with", dest="new", required=True, metavar="NEW", help="id of the new node, e.g. n7")
    p.add_argument("--timeout-s", type=float, default=REPLACE_TIMEOUT_S, help="how long NEW may take to catch up")
    p.add_argument("--json", action="store_true", help="print the result and the status as JSON")
    p.set_defaults(func=audited("node replace", cmd_node_replace, lambda args: f"{args.id} -> {args.new}"))

    p = fsub.add_parser("wipe", parents=[target], help="SIGKILL a node, delete its data, start it empty", description=(
        "Kill the node, delete its data folder and start it again empty: it rebuilds every segment from its peers "
        "(gossip), and serves a read alone only once its SCL covers it. --watch follows the rebuild."))
    p.add_argument("id", help="node id, e.g. n2")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    _watch_arguments(p)
    p.set_defaults(func=audited("node wipe", cmd_node_wipe, lambda args: args.id))

    p = fsub.add_parser("rebuild-status", parents=[target], help="each node's rebuild progress and lag", description=(
        "Show, per node: SCL range, lag (LSNs behind the writer's PGCL, summed over PGs, and the worst PG), the "
        "share rebuilt, records fetched from peers by gossip, records repaired, corrupt records found."))
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    _watch_arguments(p)
    p.set_defaults(func=cmd_node_rebuild_status)


__all__ = ["ClusterError", "LiveLine", "membership_table", "rebuild_table", "register", "status_table"]
