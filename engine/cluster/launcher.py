"""The launcher: start, watch and stop the processes of a multi-process cluster on loopback.

Theory of operation
-------------------
`Cluster(folder)` drives the processes named in the folder's manifest (`manifest.py`): six
storage nodes (`python -m engine node serve ...`) and one writer endpoint (`python -m engine
writer serve --cluster DIR`). Each is a detached subprocess in its own session (a Ctrl-C in the
terminal that ran `sixfold cluster up` does not reach it), with stdout and stderr appended to
`DIR/logs/<name>.log`. Its pid goes into the manifest, so any later `sixfold` command, in any
process, can signal it.

Readiness is the standard gRPC health service: `up` and `start` return once every process they
started reports SERVING, and fail with a `ClusterError` naming the process and quoting the tail of
its log if it exits first or is not SERVING in time (every wait is bounded). Ports are checked
before anything starts, so a busy port is an error at once, never a hang.

Process control is by signal, as the chaos runner needs it: kill (SIGKILL), stop (SIGSTOP,
the process freezes with its sockets open), cont (SIGCONT), start (the same arguments again), and
down (SIGTERM, which lets in-flight calls finish and LMDB close, then SIGKILL after a timeout).
A pid is trusted only while `/proc/<pid>/cmdline` still shows our command line, so a recycled
pid is never signalled.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from concurrent import futures

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

import engine
from engine.cluster.manifest import (
    BASE_PORT_DEFAULT,
    GOSSIP_INTERVAL_S_DEFAULT,
    WRITER,
    ClusterError,
    check_compatible,
    load_manifest,
    locked,
    new_manifest,
    node_addresses,
    node_entry,
    save_manifest,
)
from engine.errors import SixfoldError

READY_TIMEOUT_S = 60.0
DOWN_TIMEOUT_S = 10.0
LOG_TAIL_LINES = 20
HEALTH_POLL_S = 0.1
STATUS_RPC_TIMEOUT_S = 2.0


def _proc_state(pid: int | None) -> str | None:
    """The kernel's state letter of a live process (R, S, D, T...), None if it is gone."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read()
    except OSError:
        return None
    state = raw[raw.rindex(b")") + 2 : raw.rindex(b")") + 3].decode()
    return None if state in ("Z", "X") else state


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read()
    except OSError:
        return b""


def port_free(host: str, port: int) -> bool:
    """True when nothing listens on host:port (bound the way the gRPC server will bind it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def log_tail(path: str, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 16384))
            text = fh.read().decode(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


class Cluster:
    """Control of the processes of one cluster folder (see the module docstring).

    Process names are node ids ("n1".."n6") and "writer". Methods that change processes
    update the manifest; they are safe to call from several `sixfold` commands at once."""

    def __init__(self, folder: str | os.PathLike, *, python: str = sys.executable) -> None:
        self.folder = os.path.abspath(os.fspath(folder))
        self.python = python
        self._children: dict[int, subprocess.Popen] = {}  # processes this object started

    # --- manifest ---------------------------------------------------------------------------
    @property
    def manifest(self) -> dict:
        return load_manifest(self.folder)

    @property
    def exists(self) -> bool:
        return os.path.exists(os.path.join(self.folder, "cluster.json"))

    @property
    def node_ids(self) -> list[str]:
        return [n["id"] for n in self.manifest["nodes"]]

    def azs(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for n in self.manifest["nodes"]:
            out.setdefault(n["az"], []).append(n["id"])
        return out

    def _entry(self, manifest: dict, name: str) -> dict:
        return manifest[WRITER] if name == WRITER else node_entry(manifest, name)

    def address(self, name: str) -> str:
        return self._entry(self.manifest, name)["address"]

    @property
    def writer_address(self) -> str:
        return self.address(WRITER)

    def _path(self, relative: str) -> str:
        return os.path.join(self.folder, relative)

    def _set_pid(self, name: str, pid: int | None) -> None:
        with locked(self.folder):
            m = load_manifest(self.folder)
            self._entry(m, name)["pid"] = pid
            save_manifest(self.folder, m)

    # --- process state ----------------------------------------------------------------------
    def _reap(self, pid: int | None) -> None:
        proc = self._children.get(pid) if pid else None
        if proc is not None and proc.poll() is not None:
            self._children.pop(pid, None)

    def _signature(self, name: str) -> bytes:
        return b"writer\x00serve" if name == WRITER else b"--id\x00" + name.encode() + b"\x00"

    def pid(self, name: str) -> int | None:
        """The pid of a live process of ours by that name, else None."""
        entry = self._entry(self.manifest, name)
        return self._live_pid(name, entry.get("pid"))

    def _live_pid(self, name: str, pid: int | None) -> int | None:
        self._reap(pid)
        if _proc_state(pid) is None:
            return None
        cmd = _cmdline(pid)
        if b"engine" not in cmd or self._signature(name) not in cmd + b"\x00":
            return None  # the pid was recycled by an unrelated process
        return pid

    def state(self, name: str) -> str:
        """'running', 'paused' (SIGSTOP) or 'down'."""
        pid = self.pid(name)
        if pid is None:
            return "down"
        return "paused" if _proc_state(pid) in ("T", "t") else "running"

    # --- starting ---------------------------------------------------------------------------
    def _argv(self, manifest: dict, name: str) -> list[str]:
        base = [self.python, "-m", "engine"]
        if name == WRITER:
            return base + ["writer", "serve", "--cluster", self.folder, "--listen", manifest[WRITER]["address"]]
        n = node_entry(manifest, name)
        peers = ",".join(f"{p['id']}={p['address']}" for p in manifest["nodes"] if p["id"] != name)
        argv = base + [
            "node", "serve",
            "--id", n["id"], "--az", n["az"], "--data", self._path(n["data"]), "--listen", n["address"],
            "--volume-id", manifest["volume_id"], "--protection-groups", str(manifest["protection_groups"]),
            "--peers", peers,
        ]
        argv += ["--gossip-interval-s", str(manifest.get("gossip_interval_s", GOSSIP_INTERVAL_S_DEFAULT))]
        if not manifest["durable"]:
            argv.append("--no-durable")
        return argv

    def _spawn(self, manifest: dict, name: str) -> int:
        entry = self._entry(manifest, name)
        log_path = self._path(entry["log"])
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        argv = self._argv(manifest, name)
        env = dict(os.environ)
        root = os.path.dirname(os.path.dirname(os.path.abspath(engine.__file__)))
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["PYTHONUNBUFFERED"] = "1"
        with open(log_path, "ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {name}: {' '.join(argv)}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=self.folder, env=env,
                start_new_session=True, close_fds=True,
            )
        self._children[proc.pid] = proc
        entry["pid"] = proc.pid
        return proc.pid

    def _check_ports(self, manifest: dict, names: Iterable[str]) -> None:
        for name in names:
            address = self._entry(manifest, name)["address"]
            host, port = _split(address)
            if not port_free(host, port):
                raise ClusterError(
                    f"port {port} ({address}, for {name}) is already in use by another process; "
                    f"stop it, or create the cluster with another --base-port"
                )

    def _wait_serving(self, names: Iterable[str], timeout_s: float) -> None:
        """Wait until every named process reports SERVING; ClusterError naming the first that
        dies or is not ready in time, with the tail of its log."""
        manifest = self.manifest
        pending = {name: self._entry(manifest, name) for name in names}
        channels = {name: grpc.insecure_channel(e["address"]) for name, e in pending.items()}
        deadline = time.monotonic() + timeout_s
        try:
            while pending:
                for name in sorted(pending):
                    entry = pending[name]
                    if self._live_pid(name, entry["pid"]) is None:
                        proc = self._children.get(entry["pid"])
                        code = f" with code {proc.returncode}" if proc is not None and proc.returncode is not None else ""
                        raise ClusterError(
                            f"{name} (pid {entry['pid']}) exited{code} before it was ready. "
                            f"Last lines of {self._path(entry['log'])}:\n{log_tail(self._path(entry['log']))}"
                        )
                    if _proc_state(entry["pid"]) in ("T", "t"):
                        raise ClusterError(f"{name} (pid {entry['pid']}) is paused (SIGSTOP); continue it with `cont` first")
                    try:
                        reply = health_pb2_grpc.HealthStub(channels[name]).Check(
                            health_pb2.HealthCheckRequest(service=""), timeout=0.5
                        )
                        if reply.status == health_pb2.HealthCheckResponse.SERVING:
                            del pending[name]
                    except grpc.RpcError:
                        pass
                if pending and time.monotonic() > deadline:
                    name = sorted(pending)[0]
                    entry = pending[name]
                    raise ClusterError(
                        f"{name} (pid {entry['pid']}, {entry['address']}) is not SERVING after {timeout_s:g} s. "
                        f"Last lines of {self._path(entry['log'])}:\n{log_tail(self._path(entry['log']))}"
                    )
                if pending:
                    time.sleep(HEALTH_POLL_S)
        finally:
            for ch in channels.values():
                ch.close()

    def up(
        self,
        *,
        base_port: int | None = None,
        protection_groups: int | None = None,
        durable: bool | None = None,
        write_timeout_s: float | None = None,
        gossip_interval_s: float | None = None,
        timeout_s: float = READY_TIMEOUT_S,
    ) -> dict:
        """Create the cluster (or reopen its data: same volume id), start every process that is
        not running, wait until all are SERVING; returns `status()`."""
        started: list[str] = []
        with locked(self.folder):
            if self.exists:
                manifest = load_manifest(self.folder)
                check_compatible(manifest, protection_groups=protection_groups, base_port=base_port)
            else:
                manifest = new_manifest(
                    base_port=BASE_PORT_DEFAULT if base_port is None else base_port,
                    protection_groups=protection_groups,
                    durable=True if durable is None else durable,
                )
            if durable is not None:
                manifest["durable"] = bool(durable)
            if write_timeout_s is not None:
                manifest["write_timeout_s"] = float(write_timeout_s)
            if gossip_interval_s is not None:
                manifest["gossip_interval_s"] = float(gossip_interval_s)
            names = [n["id"] for n in manifest["nodes"]] + [WRITER]
            for name in names:
                entry = self._entry(manifest, name)
                if self._live_pid(name, entry.get("pid")) is None:
                    entry["pid"] = None
            missing = [name for name in names if self._entry(manifest, name)["pid"] is None]
            self._check_ports(manifest, missing)
            save_manifest(self.folder, manifest)
        try:
            # Everything starts at once (Python start-up dominates); the writer endpoint retries
            # its recovery until a write quorum of nodes answers, then reports SERVING.
            with locked(self.folder):
                manifest = load_manifest(self.folder)
                for name in missing:
                    self._spawn(manifest, name)
                    started.append(name)
                save_manifest(self.folder, manifest)
            self._wait_serving(names, timeout_s)
        except BaseException:
            for name in reversed(started):  # leave nothing half-started behind
                self._terminate([name], DOWN_TIMEOUT_S)
            raise
        return self.status()

    def start(self, name: str, *, wait: bool = True, timeout_s: float = READY_TIMEOUT_S) -> int:
        """Start a process that is down, with the same arguments as before; returns its pid.
        A running process is left alone; a paused one is a ClusterError (use cont)."""
        with locked(self.folder):
            manifest = load_manifest(self.folder)
            entry = self._entry(manifest, name)
            pid = self._live_pid(name, entry.get("pid"))
            if pid is not None:
                if _proc_state(pid) in ("T", "t"):
                    raise ClusterError(f"{name} (pid {pid}) is paused (SIGSTOP); continue it with `cont`, not `start`")
                return pid
            self._check_ports(manifest, [name])
            pid = self._spawn(manifest, name)
            save_manifest(self.folder, manifest)
        if wait:
            self._wait_serving([name], timeout_s)
        return pid

    # --- signals ----------------------------------------------------------------------------
    def _signal(self, name: str, sig: int) -> int:
        pid = self.pid(name)
        if pid is None:
            raise ClusterError(f"{name} is not running")
        os.kill(pid, sig)
        return pid

    def kill(self, name: str) -> int:
        """SIGKILL: the process dies at once, as in a crash. Returns the pid killed."""
        pid = self._signal(name, signal.SIGKILL)
        self._wait_gone(pid, name, 5.0)
        self._set_pid(name, None)
        return pid

    def stop(self, name: str) -> int:
        """SIGSTOP: the process freezes (its sockets stay open, nobody answers)."""
        return self._signal(name, signal.SIGSTOP)

    def cont(self, name: str) -> int:
        """SIGCONT: a frozen process resumes."""
        return self._signal(name, signal.SIGCONT)

    def _wait_gone(self, pid: int, name: str, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._live_pid(name, pid) is None:
                return True
            proc = self._children.get(pid)
            if proc is not None:
                try:
                    proc.wait(timeout=0.05)
                except subprocess.TimeoutExpired:
                    pass
            else:
                time.sleep(0.05)
        return self._live_pid(name, pid) is None

    def _terminate(self, names: list[str], timeout_s: float) -> None:
        """SIGTERM (and SIGCONT, so a paused process can act on it), then SIGKILL after
        `timeout_s`."""
        manifest = self.manifest
        pids = {}
        for name in names:
            pid = self._live_pid(name, self._entry(manifest, name).get("pid"))
            if pid is None:
                continue
            os.kill(pid, signal.SIGTERM)
            os.kill(pid, signal.SIGCONT)
            pids[name] = pid
        deadline = time.monotonic() + timeout_s
        for name, pid in pids.items():
            if not self._wait_gone(pid, name, max(0.0, deadline - time.monotonic())):
                os.kill(pid, signal.SIGKILL)
                self._wait_gone(pid, name, 5.0)
        with locked(self.folder):
            m = load_manifest(self.folder)
            for name in names:
                self._entry(m, name)["pid"] = None
            save_manifest(self.folder, m)

    def down(self, timeout_s: float = DOWN_TIMEOUT_S) -> None:
        """Stop everything: the writer first (its in-flight writes still reach the nodes), then
        the nodes; SIGTERM, then SIGKILL after `timeout_s`. The data stays."""
        if not self.exists:
            return
        self._terminate([WRITER], timeout_s)
        self._terminate(self.node_ids, timeout_s)

    # --- status -----------------------------------------------------------------------------
    def health(self, name: str, timeout_s: float = 0.5) -> str:
        """SERVING, NOT_SERVING, UNREACHABLE, PAUSED or DOWN."""
        state = self.state(name)
        if state != "running":
            return state.upper()
        with grpc.insecure_channel(self.address(name)) as ch:
            try:
                reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
            except grpc.RpcError:
                return "UNREACHABLE"
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def status(self) -> dict:
        """Every process: state, health and (when reachable) epoch, SCLs, VDL. JSON-ready."""
        from engine.transport.grpc_client import Deadlines, GrpcTransport

        manifest = self.manifest
        transport = GrpcTransport(node_addresses(manifest), source="cli", deadlines=Deadlines(state_s=STATUS_RPC_TIMEOUT_S))

        def node(n: dict) -> dict:
            out = {"id": n["id"], "az": n["az"], "address": n["address"], "pid": self._live_pid(n["id"], n.get("pid")),
                   "data": self._path(n["data"]), "log": self._path(n["log"])}
            out["health"] = self.health(n["id"])
            if out["health"] in ("SERVING", "NOT_SERVING"):
                try:
                    st = transport.state(n["id"])
                    out.update(epoch=st.epoch, scl_min=min(st.scls), scl_max=max(st.scls), scls=list(st.scls),
                               records=st.records, bytes=st.bytes, corrupt_found=st.corrupt_found, repaired=st.repaired)
                except SixfoldError as e:
                    out["error"] = str(e)
            return out

        def writer() -> dict:
            w = manifest[WRITER]
            out = {"address": w["address"], "pid": self._live_pid(WRITER, w.get("pid")), "log": self._path(w["log"])}
            out["health"] = self.health(WRITER)
            if out["health"] == "SERVING":
                try:
                    from engine.client import RemoteBackend

                    backend = RemoteBackend(w["address"], timeout_s=STATUS_RPC_TIMEOUT_S * 2, connect_timeout_s=STATUS_RPC_TIMEOUT_S)
                    try:
                        st = backend.status()
                    finally:
                        backend.close()
                    out.update(vdl=st["vdl"], epoch=st["epoch"], in_flight=st["writer"].get("in_flight"),
                               links={k: v["up"] for k, v in st["writer"]["links"].items()})
                except SixfoldError as e:
                    out["error"] = str(e)
            return out

        try:
            with futures.ThreadPoolExecutor(max_workers=len(manifest["nodes"]) + 1) as pool:
                w = pool.submit(writer)
                nodes = list(pool.map(node, manifest["nodes"]))
                w = w.result()
        finally:
            transport.close()
        return {
            "cluster": self.folder,
            "volume_id": manifest["volume_id"],
            "protection_groups": manifest["protection_groups"],
            "durable": manifest["durable"],
            "base_port": manifest["base_port"],
            "nodes": nodes,
            "writer": w,
        }

    # --- convenience for tests and chaos ----------------------------------------------------
    def connect(self, **options):
        """An `engine.Database` on this cluster's writer endpoint."""
        from engine.client import connect

        return connect(self.folder, **options)

    def transport(self, source: str = "chaos"):
        """A GrpcTransport to every node (admin calls: corrupt, scrub, set_faults, state...)."""
        from engine.transport.grpc_client import GrpcTransport

        return GrpcTransport(node_addresses(self.manifest), source=source)

    def _admin(self, fn):
        t = self.transport()
        try:
            return fn(t)
        finally:
            t.close()

    def corrupt(self, node_id: str, pg: int, lsn: int | None = None, bit: int = 0) -> int | None:
        """Flip a bit of a stored record on a node; returns the LSN hit (None: nothing there)."""
        return self._admin(lambda t: t.corrupt(node_id, pg, lsn, bit))

    def scrub(self, node_id: str) -> int:
        """Make a node scrub every record now; returns the corrupt records it found."""
        return self._admin(lambda t: t.scrub(node_id, 0))

    def set_faults(self, node_id: str, rules=None):
        """Replace a node's transport fault rules (`engine.transport.convert.FaultRules`;
        None clears them)."""
        from engine.transport.convert import FaultRules

        return self._admin(lambda t: t.set_faults(node_id, rules or FaultRules()))

    # The names `db.cluster` has in the embedded deployment (engine.embedded.ClusterControl):
    def stop_node(self, node_id: str) -> None:
        """Stop a node as a crash would (SIGKILL); its data stays."""
        if self.state(node_id) != "down":
            self.kill(node_id)

    def start_node(self, node_id: str) -> None:
        self.start(node_id)

    def stop_az(self, az: str) -> None:
        for n in self._az(az):
            self.stop_node(n)

    def start_az(self, az: str) -> None:
        for n in self._az(az):
            self.start(n, wait=False)
        self._wait_serving(self._az(az), READY_TIMEOUT_S)

    def _az(self, az: str) -> list[str]:
        nodes = self.azs().get(az)
        if not nodes:
            raise ClusterError(f"no AZ {az!r}; AZs are {', '.join(sorted(self.azs()))}")
        return nodes

    def wipe_node(self, node_id: str) -> None:
        """Kill a node, delete its data folder, start it empty: it rebuilds from its peers."""
        self.stop_node(node_id)
        shutil.rmtree(self._path(node_entry(self.manifest, node_id)["data"]), ignore_errors=True)
        self.start(node_id)

    def crash_writer(self) -> None:
        """SIGKILL the writer endpoint and start a new one (recovery at a new epoch)."""
        if self.state(WRITER) != "down":
            self.kill(WRITER)
        self.start(WRITER)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc) -> None:
        self.down()
