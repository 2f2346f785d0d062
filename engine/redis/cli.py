"""`sixfold redis serve|stop`: the Redis-compatible endpoint of a cluster, and the helpers that
`sixfold cluster up --redis-port` uses to run it beside the cluster's processes.

`serve` connects to the cluster's writer endpoint (`engine.connect(DIR)`, or with `--spec FILE`
`engine.connect(FILE)`, whose writer is asked of the spec's candidates; either follows the
writer across failovers) or, with `--reader`, to its reader endpoint (reads spread over the
reader instances, writes refused `READONLY`), and answers RESP on host:port until it is stopped.
When the cluster checks client tokens (its users file), so does the endpoint: `AUTH <token>`
(or `AUTH <user> <token>`, or `HELLO 3 AUTH <user> <token>`) with a Sixfold token.

A background endpoint (started by `cluster up --redis-port`) records its pid in
`DIR/redis/<port>.pid` and logs to `DIR/logs/redis-<port>.log`; `cluster down` and
`redis stop` end it (SIGTERM, then SIGKILL after a grace).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from engine.errors import SixfoldError

DEFAULT_PORT = 6380
READY_TIMEOUT_S = 30.0
STOP_GRACE_S = 5.0
#: endpoints this process started (reaped here, so a stopped one is not taken for live)
_children: dict[int, subprocess.Popen] = {}


def _port(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a port is a number in 0..65535, got {text!r}") from None
    if not 0 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"a port is a number in 0..65535, got {n}")
    return n


def register(sub) -> None:
    p = sub.add_parser("redis", help="a Redis-compatible endpoint (RESP2/RESP3) over a cluster", description=(
        "A Redis-compatible endpoint: redis-cli, redis-py and redis-benchmark talk to it; every write is answered "
        "once it is durable on 4 of 6 segments."))
    rsub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    s = rsub.add_parser("serve", help="serve RESP on a port until stopped", description=(
        "Serve the cluster's keys over RESP on HOST:PORT (default 127.0.0.1:6380) until SIGINT or SIGTERM."))
    s.add_argument("--cluster", metavar="DIR", default=os.environ.get("SIXFOLD_CLUSTER"),
                   help="the cluster folder (default: $SIXFOLD_CLUSTER)")
    s.add_argument("--spec", metavar="FILE", default=None, help=(
        "a deployment spec instead of --cluster (engine.cluster.spec): the writer is the candidate serving as "
        "the writer at the highest epoch, followed through a failover"))
    s.add_argument("--port", type=_port, default=DEFAULT_PORT, help=f"TCP port (default {DEFAULT_PORT}; 0: any free one)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--reader", action="store_true",
                   help="the read-only endpoint: reads from the cluster's reader instances, writes refused READONLY")
    s.add_argument("--no-auth", action="store_true",
                   help="accept connections without AUTH even when the cluster checks client tokens")
    s.set_defaults(func=cmd_serve)
    t = rsub.add_parser("stop", help="stop the endpoints `cluster up --redis-port` started")
    t.add_argument("--cluster", metavar="DIR", default=os.environ.get("SIXFOLD_CLUSTER"),
                   help="the cluster folder (default: $SIXFOLD_CLUSTER)")
    t.set_defaults(func=cmd_stop)


def _folder(args) -> str:
    if not args.cluster:
        raise SystemExit(f"sixfold {args.command}: say which cluster folder with --cluster DIR")
    return os.path.abspath(args.cluster)


def authenticator_of(folder: str, manifest_file: str | None = None):
    """The cluster's Authenticator (its users file), or None when it checks no tokens.
    `manifest_file`: a deployment spec of another name than DIR/cluster.json."""
    from engine.cluster.manifest import load_manifest, load_manifest_file, users_file
    from engine.security.users import Authenticator

    m = load_manifest_file(manifest_file, folder) if manifest_file else load_manifest(folder)
    path = users_file(m, folder)
    return None if path is None else Authenticator(path)


def cmd_serve(args) -> int:
    from engine.client import connect, reader_statuses
    from engine.redis.server import RedisServer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.spec:  # connect by the spec: the writer is found by asking its candidates
        if not os.path.isfile(args.spec):
            raise SystemExit(f"sixfold redis serve: --spec {args.spec}: no such file")
        spec = os.path.abspath(args.spec)
        folder, target = os.path.dirname(spec), spec
    else:
        folder = target = _folder(args)
        spec = None
    db = connect(target, role="reader" if args.reader else "writer")
    auth = None if args.no_auth else authenticator_of(folder, spec)
    server = RedisServer(db, args.host, args.port, authenticator=auth,
                         replicas=lambda: reader_statuses(folder, manifest_file=spec), read_only=args.reader)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    print(f"sixfold redis: serving {folder} ({'reader' if args.reader else 'writer'}) on {server.address}"
          + ("" if auth is None else " (AUTH with a Sixfold token)"), flush=True)
    stop.wait()
    server.stop()
    db.close()
    return 0


def _pid_dir(folder: str) -> str:
    return os.path.join(folder, "redis")


def ping(host: str, port: int, timeout_s: float = 1.0) -> bool:
    """Whether a RESP server answers PING on host:port (PONG, or NOAUTH: it is up)."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as s:
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            reply = s.recv(64)
    except OSError:
        return False
    return reply.startswith(b"+PONG") or reply.startswith(b"-NOAUTH")


def start_background(folder: str, port: int, *, reader: bool = False, timeout_s: float = READY_TIMEOUT_S) -> int:
    """Start `sixfold redis serve` for the cluster as a process of its own; return its pid once
    it answers PING (SixfoldError with its log's tail if it does not in time)."""
    folder = os.path.abspath(folder)
    os.makedirs(_pid_dir(folder), exist_ok=True)
    os.makedirs(os.path.join(folder, "logs"), exist_ok=True)
    pid_file = os.path.join(_pid_dir(folder), f"{port}.pid")
    old = _live_pid(pid_file)
    if old is not None and ping("127.0.0.1", port):
        return old
    log_path = os.path.join(folder, "logs", f"redis-{port}.log")
    argv = [sys.executable, "-m", "engine", "redis", "serve", "--cluster", folder, "--port", str(port)]
    if reader:
        argv.append("--reader")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=folder,
                                env=env, start_new_session=True, close_fds=True)
    _children[proc.pid] = proc
    with open(pid_file, "w") as fh:
        fh.write(f"{proc.pid}\n")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        if ping("127.0.0.1", port):
            return proc.pid
        time.sleep(0.1)
    tail = ""
    try:
        with open(log_path, "rb") as fh:
            tail = fh.read()[-2000:].decode("utf-8", "replace")
    except OSError:
        pass
    if proc.poll() is None:
        proc.kill()
    raise SixfoldError(f"the Redis endpoint on port {port} did not answer within {timeout_s:g} s. Last lines of {log_path}:\n{tail}")


def _live_pid(pid_file: str) -> int | None:
    try:
        with open(pid_file) as fh:
            pid = int(fh.read().strip())
        child = _children.get(pid)
        if child is not None and child.poll() is not None:
            return None
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def stop_background(folder: str, grace_s: float = STOP_GRACE_S) -> list[int]:
    """Stop every endpoint `start_background` started for the cluster; the ports stopped."""
    d = _pid_dir(os.path.abspath(folder))
    stopped = []
    try:
        names = sorted(os.listdir(d))
    except FileNotFoundError:
        return stopped
    for name in names:
        if not name.endswith(".pid"):
            continue
        path = os.path.join(d, name)
        pid = _live_pid(path)
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline and _live_pid(path) is not None:
                time.sleep(0.05)
            if _live_pid(path) is not None:
                os.kill(pid, signal.SIGKILL)
        os.remove(path)
        stopped.append(int(name[:-4]))
    return stopped


def cmd_stop(args) -> int:
    ports = stop_background(_folder(args))
    print("stopped the Redis endpoint(s) on port(s) " + ", ".join(map(str, ports)) if ports else "no Redis endpoint was running")
    return 0
