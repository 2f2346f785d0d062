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

Concurrency: every command that edits the manifest does so under its lock (`manifest.locked`,
`DIR/.lock`), and one that starts a process decides, spawns and records the pid inside one hold
of it. The operations that decide *which* processes run (`up`, `down`, `wipe_node`) also hold
the operation lock `DIR/cluster.lock` from start to end, waiting for it (bounded) if another
`sixfold` command has it: two `cluster up` at once start each process once (the second finds
them running and starts nothing), and a `down` during an `up` waits for the `up` to finish.
Both locks are flocks on descriptors that no child inherits (close-on-exec, `close_fds`), so a
serving process never holds one; the kernel drops them when a command dies.

Healing (`replace_node`, `wipe_node`, `rebuild_status`): a replacement node is added to the
manifest (next free port, a folder in the old node's AZ), started, and handed to the writer
endpoint with the `ReplaceNode` admin RPC, which runs the two epoch steps; the launcher polls
`MembershipStatus` for progress and, when the change ends, retires the node that left (stops it,
marks it in the manifest). Nodes reach the new one through `engine.cluster.addresses`. Rebuild
progress is each node's SCLs against the writer's PGCLs, plus its gossip counters.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

import engine
from engine.cluster.manifest import (
    BASE_PORT_DEFAULT,
    WRITER,
    ClusterError,
    active_nodes,
    add_node_entry,
    check_compatible,
    load_manifest,
    locked,
    new_manifest,
    node_addresses,
    node_entry,
    save_manifest,
    used_ports,
)
from engine.errors import InvalidArgument, SixfoldError, Unavailable

READY_TIMEOUT_S = 60.0
DOWN_TIMEOUT_S = 10.0
LOG_TAIL_LINES = 20
HEALTH_POLL_S = 0.1
STATUS_RPC_TIMEOUT_S = 2.0
#: How long `replace_node` lets the new node catch up by default (the endpoint's bound), and how
#: much longer the launcher waits for the endpoint's verdict before giving up on it.
REPLACE_TIMEOUT_S = 120.0
REPLACE_GRACE_S = 30.0
REPLACE_POLL_S = 0.25
#: Deadline of the ReplaceNode RPC: epoch step 1 tells every node, each bounded by the writer's
#: recovery deadline.
REPLACE_RPC_TIMEOUT_S = 60.0
#: Ports tried above the highest port of the manifest when a node is added.
PORT_SEARCH_MAX = 1000
#: The operation lock (see the module docstring) and how long an operation waits for it: longer
#: than another `up` can take (READY_TIMEOUT_S, then stopping what failed).
OPERATION_LOCK_FILE = "cluster.lock"
OPERATION_LOCK_WAIT_S = 300.0
OPERATION_LOCK_POLL_S = 0.05


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


def rebuild_progress(scls, pgcls) -> dict:
    """A node's progress against the writer's PGCLs: `lag` (LSNs missing, summed over PGs),
    `lag_max` (the worst PG) and `rebuild.fraction` (0..1; LSN-weighted, like the embedded
    `EmbeddedVolume._rebuild_fraction`). A node with lag 0 can serve reads at the current VDL."""
    assert len(scls) == len(pgcls), (scls, pgcls)
    lags = [max(0, int(p) - int(s)) for s, p in zip(scls, pgcls)]
    want = sum(int(p) for p in pgcls)
    have = want - sum(lags)
    return {"lag": sum(lags), "lag_max": max(lags, default=0), "fraction": 1.0 if want == 0 else round(have / want, 4)}


class Cluster:
    """Control of the processes of one cluster folder (see the module docstring).

    Process names are node ids ("n1".."n6") and "writer". Methods that change processes
    update the manifest; they are safe to call from several `sixfold` commands at once."""

    def __init__(self, folder: str | os.PathLike, *, python: str = sys.executable,
                 on_wait: Callable[[str], None] | None = None) -> None:
        self.folder = os.path.abspath(os.fspath(folder))
        self.python = python
        #: Told once, in a sentence, when an operation waits for another command's operation lock.
        self.on_wait = on_wait
        self._children: dict[int, subprocess.Popen] = {}  # processes this object started
        # The thread of this object that holds the operation lock, and how deep (it is reentrant
        # for that thread; another thread waits for it like another process would).
        self._operation_owner: int | None = None
        self._operation_depth = 0

    # --- manifest ---------------------------------------------------------------------------
    @property
    def manifest(self) -> dict:
        return load_manifest(self.folder)

    @property
    def exists(self) -> bool:
        return os.path.exists(os.path.join(self.folder, "cluster.json"))

    @property
    def node_ids(self) -> list[str]:
        """The nodes that hold segments (retired ones left out)."""
        return [n["id"] for n in active_nodes(self.manifest)]

    @property
    def retired_ids(self) -> list[str]:
        return [n["id"] for n in self.manifest["nodes"] if n.get("retired")]

    def azs(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for n in active_nodes(self.manifest):
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

    @contextlib.contextmanager
    def _operation(self, what: str, wait_s: float = OPERATION_LOCK_WAIT_S) -> Iterator[None]:
        """Hold the operation lock `DIR/cluster.lock` (see the module docstring) for `what`
        ("cluster up"...), waiting up to `wait_s` for another command to finish; ClusterError
        naming the holder after that. Reentrant within one thread."""
        if self._operation_owner == threading.get_ident():
            self._operation_depth += 1
            try:
                yield
            finally:
                self._operation_depth -= 1
            return
        os.makedirs(self.folder, exist_ok=True)
        path = self._path(OPERATION_LOCK_FILE)
        # O_CLOEXEC (and Popen's close_fds): no process started under the lock inherits it.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            deadline = time.monotonic() + wait_s
            told = False
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as e:
                    if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        raise
                holder = self._operation_holder(path)
                if time.monotonic() >= deadline:
                    raise ClusterError(f"{holder} is still changing the cluster in {self.folder} after {wait_s:g} s of "
                                       f"waiting; `{what}` gave up (try again once it is done)")
                if not told and self.on_wait is not None:
                    self.on_wait(f"waiting for {holder}, which is changing the cluster in {self.folder} ...")
                    told = True
                time.sleep(OPERATION_LOCK_POLL_S)
            # Who holds it, for the messages of commands that wait (the lock itself is the flock).
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {what}\n".encode(), 0)
            self._operation_owner, self._operation_depth = threading.get_ident(), 1
            try:
                yield
            finally:
                self._operation_owner, self._operation_depth = None, 0
        finally:
            os.close(fd)  # closing the description drops the flock

    @staticmethod
    def _operation_holder(path: str) -> str:
        try:
            with open(path) as fh:
                pid, _, what = fh.read().strip().partition(" ")
            return f"`sixfold {what}` (pid {int(pid)})" if what else f"process {int(pid)}"
        except (OSError, ValueError):
            return "another sixfold command"

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
        # The node reads the rest (AZ, data folder, volume, peers, durability, gossip interval)
        # from the manifest, and re-reads it to reach nodes added later (engine.cluster.addresses).
        n = node_entry(manifest, name)
        return base + ["node", "serve", "--cluster", self.folder, "--id", n["id"], "--listen", n["address"]]

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
        not running, wait until all are SERVING; returns `status()` plus `started` (the names
        this call started; empty when the cluster was up already). Holds the operation lock
        throughout, so a concurrent `up` waits and then finds the processes running."""
        with self._operation("cluster up"):
            started: list[str] = []
            try:
                # One manifest lock from deciding what to start until the manifest records the
                # pids: a `start` (which takes only this lock) cannot slip in between.
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
                    names = [n["id"] for n in active_nodes(manifest)] + [WRITER]
                    for name in names:
                        entry = self._entry(manifest, name)
                        if self._live_pid(name, entry.get("pid")) is None:
                            entry["pid"] = None
                    missing = [name for name in names if self._entry(manifest, name)["pid"] is None]
                    self._check_ports(manifest, missing)  # before anything is written: a busy port creates nothing
                    # Everything starts at once (Python start-up dominates); the writer endpoint
                    # retries its recovery until a write quorum of nodes answers, then reports
                    # SERVING.
                    try:
                        for name in missing:
                            self._spawn(manifest, name)
                            started.append(name)
                    finally:
                        if started or not missing:
                            save_manifest(self.folder, manifest)  # the cleanup below finds what did start
                self._wait_serving(names, timeout_s)
            except BaseException:
                for name in reversed(started):  # leave nothing half-started behind
                    self._terminate([name], DOWN_TIMEOUT_S)
                raise
            st = self.status()
        st["started"] = started
        return st

    def start(self, name: str, *, wait: bool = True, timeout_s: float = READY_TIMEOUT_S) -> int:
        """Start a process that is down, with the same arguments as before; returns its pid.
        A running process is left alone; a paused one is a ClusterError (use cont)."""
        with locked(self.folder):
            manifest = load_manifest(self.folder)
            entry = self._entry(manifest, name)
            if entry.get("retired"):
                raise ClusterError(f"node {name} was retired (replaced by {entry.get('replaced_by') or 'another node'}); it is not started again")
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
        self._wait_port_free(name, 5.0)
        return pid

    def _wait_port_free(self, name: str, timeout_s: float) -> bool:
        """Wait until the process's port can be bound again. The thread-group leader of a killed
        multi-threaded process shows as a zombie while its other threads still tear down (and
        hold its sockets), so "gone" can come a moment before the port is free."""
        host, port = _split(self.address(name))
        deadline = time.monotonic() + timeout_s
        while not port_free(host, port):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

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
        with self._operation("cluster down"):
            self._terminate([WRITER], timeout_s)
            self._terminate([n["id"] for n in self.manifest["nodes"]], timeout_s)  # retired ones too, should one still run

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
        """Every process: state, health and (when reachable) epoch, SCLs, VDL; per node its lag
        behind the writer's PGCLs and its rebuild progress (see `rebuild_progress`). JSON-ready."""
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
                               records=st.records, bytes=st.bytes, corrupt_found=st.corrupt_found, repaired=st.repaired,
                               rebuild=dict(st.extra.get("rebuild") or {}), used_bytes=st.used_bytes,
                               capacity_bytes=st.capacity_bytes, space_low=st.space_low, room_bytes=st.room_bytes)
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
                               links={k: v["up"] for k, v in st["writer"]["links"].items()},
                               pgcl=st["writer"].get("pgcl"), membership=st["writer"].get("membership"),
                               membership_change=st.get("membership_change"))
                except SixfoldError as e:
                    out["error"] = str(e)
            return out

        try:
            with futures.ThreadPoolExecutor(max_workers=len(manifest["nodes"]) + 1) as pool:
                w = pool.submit(writer)
                nodes = list(pool.map(node, active_nodes(manifest)))
                w = w.result()
        finally:
            transport.close()
        for n in nodes:
            if "scls" in n and w.get("pgcl"):
                p = rebuild_progress(n["scls"], w["pgcl"])
                n.update(lag=p["lag"], lag_max=p["lag_max"])
                n["rebuild"].update(fraction=p["fraction"], complete=p["lag"] == 0)
        return {
            "cluster": self.folder,
            "volume_id": manifest["volume_id"],
            "protection_groups": manifest["protection_groups"],
            "durable": manifest["durable"],
            "base_port": manifest["base_port"],
            "nodes": nodes,
            "retired": [{"id": n["id"], "az": n["az"], "replaced_by": n.get("replaced_by")} for n in manifest["nodes"] if n.get("retired")],
            "writer": w,
        }

    def rebuild_status(self) -> dict:
        """`status()` plus `complete`: every active node is SERVING with no lag behind the
        writer's PGCLs. (The node's own `rebuild.active` flag is shown but not trusted: it can stay
        set after the writer's appends, rather than gossip, closed the last gap.)"""
        st = self.status()
        st["complete"] = bool(st["writer"].get("pgcl")) and all(n["health"] == "SERVING" and n.get("lag") == 0 for n in st["nodes"])
        return st

    def wait_rebuilt(self, timeout_s: float = READY_TIMEOUT_S, interval_s: float = 1.0, progress=None) -> dict:
        """Poll `rebuild_status()` until it is complete; ClusterError after `timeout_s`.
        `progress(status)` is called after each poll."""
        deadline = time.monotonic() + timeout_s
        while True:
            st = self.rebuild_status()
            if progress is not None:
                progress(st)
            if st["complete"]:
                return st
            if time.monotonic() >= deadline:
                behind = [f"{n['id']} (lag {n.get('lag', '?')}, {n['health']})" for n in st["nodes"]
                          if n["health"] != "SERVING" or n.get("lag") != 0]
                raise ClusterError(f"rebuild not complete after {timeout_s:g} s: {', '.join(behind) or 'a rebuild is still active'}")
            time.sleep(interval_s)

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
        """Kill a node, delete its data folder, start it empty: it rebuilds from its peers.
        Under the operation lock, so a concurrent `up` cannot start the node in between."""
        with self._operation("node wipe"):
            self.stop_node(node_id)
            shutil.rmtree(self._path(node_entry(self.manifest, node_id)["data"]), ignore_errors=True)
            self.start(node_id)

    # --- membership change ------------------------------------------------------------------
    def _next_port(self, manifest: dict) -> int:
        """The first free port above every port the manifest names."""
        host = manifest.get("host", "127.0.0.1")
        used = used_ports(manifest)
        port = max(used) + 1
        for _ in range(PORT_SEARCH_MAX):
            if port > 65535:
                break
            if port not in used and port_free(host, port):
                return port
            port += 1
        raise ClusterError(f"no free port found within {PORT_SEARCH_MAX} ports above {max(used)} for a new node")

    def _kv(self, rpc: str, request, timeout_s: float):
        """One admin call to the writer endpoint's KV service; Sixfold errors as raised there."""
        from engine.proto import kv_pb2_grpc
        from engine.transport import convert

        address = self.writer_address
        with grpc.insecure_channel(address) as ch:
            try:
                return getattr(kv_pb2_grpc.KVStub(ch), rpc)(request, timeout=timeout_s)
            except grpc.RpcError as e:
                raise convert.error_from_rpc(e, where=f"writer endpoint {address}") from None

    def membership_status(self):
        """The writer endpoint's membership change state (`convert.MembershipChange`)."""
        from engine.proto import kv_pb2
        from engine.transport import convert

        return convert.membership_change_from_pb(self._kv("MembershipStatus", kv_pb2.MembershipStatusRequest(), STATUS_RPC_TIMEOUT_S * 2))

    def replace_node(self, old: str, new: str, timeout_s: float = REPLACE_TIMEOUT_S, progress=None, *, on_change=None) -> dict:
        """Replace node `old` (say, failed for good) by a new node `new` in the same AZ, without
        stopping writes: add `new` to the manifest (next free port), start it, and have the
        writer endpoint run the change (epoch step 1 adds `new` as a second quorum set; once `new`
        holds every PG's durable chain, epoch step 2 drops `old`; if `old` was down and answers
        first, the change is reverted). Then the node that left is stopped and marked retired.

        `progress(fraction)` is called while `new` rebuilds (as in the embedded
        `replace_node`); `on_change(MembershipChange)` with the endpoint's full state. Returns a
        summary: replaced, reverted, seconds, epoch, members. Asking again after an interruption
        resumes the same change. ClusterError when it fails or times out."""
        from engine.transport import convert

        convert.check_node_id(new)
        if new == WRITER:
            raise ClusterError(f"{WRITER!r} names the writer endpoint; pick another node id")
        health = self.health(WRITER)
        if health != "SERVING":
            raise ClusterError(f"the writer endpoint is {health}; it runs the membership change, so start it first "
                               f"(`sixfold writer start --cluster {self.folder}`)")
        added = False
        with locked(self.folder):
            m = load_manifest(self.folder)
            o = node_entry(m, old)
            if o.get("retired"):
                raise ClusterError(f"node {old} is retired already (replaced by {o.get('replaced_by') or 'another node'})")
            existing = next((n for n in m["nodes"] if n["id"] == new), None)
            if existing is None:
                entry = add_node_entry(m, new, o["az"], self._next_port(m), replaces=old)
                data = self._path(entry["data"])
                if os.path.exists(data) and os.listdir(data):
                    raise ClusterError(f"{data} exists and is not empty; move it away or pick another node id")
                save_manifest(self.folder, m)
                added = True
            elif existing.get("replaces") != old or existing.get("retired"):
                raise ClusterError(f"node {new} already exists in this cluster; pick a new node id")
            entry = next(n for n in m["nodes"] if n["id"] == new)
        try:
            self.start(new)
        except BaseException:
            if added:  # never became part of anything: retire it so `up` does not start it
                self._terminate([new], DOWN_TIMEOUT_S)
                self._retire(new, None)
            raise
        t0 = time.monotonic()
        deadline = t0 + timeout_s + REPLACE_GRACE_S
        try:
            change = self._begin_replace(old, new, entry, timeout_s, t0 + REPLACE_GRACE_S)
        except InvalidArgument:
            if added:  # refused outright (nothing changed): the new node goes again
                self._terminate([new], DOWN_TIMEOUT_S)
                self._retire(new, None)
            raise
        while True:
            if on_change is not None:
                on_change(change)
            if change.phase != "rebuilding":
                break
            if progress is not None:
                progress(change.fraction)
            if time.monotonic() > deadline:
                raise ClusterError(f"the writer endpoint did not finish replacing {old} by {new} within {timeout_s:g} s")
            time.sleep(REPLACE_POLL_S)
            try:
                change = self.membership_status()
                if change.phase == "idle" or (change.old, change.new) != (old, new):
                    change = self._begin_replace(old, new, entry, timeout_s, deadline)  # the endpoint restarted: resume
            except Unavailable:
                continue  # the endpoint is down or recovering: keep asking until the deadline
        if change.phase == "failed":
            raise ClusterError(f"replacing {old} by {new} failed: {change.error}")
        leaving = old if change.phase == "replaced" else new
        self._terminate([leaving], DOWN_TIMEOUT_S)
        self._retire(leaving, new if change.phase == "replaced" else None)
        return {"replaced": change.phase == "replaced", "reverted": change.phase == "reverted", "old": old, "new": new,
                "seconds": round(time.monotonic() - t0, 3), "epoch": change.epoch, "members": list(change.members)}

    def _begin_replace(self, old: str, new: str, entry: dict, timeout_s: float, deadline: float):
        """Ask the endpoint to run (or resume) the change; retries while it is unreachable."""
        from engine.transport import convert

        request = convert.replace_node_request_to_pb(old, new, entry["address"], entry["az"], timeout_s)
        while True:
            try:
                return convert.membership_change_from_pb(self._kv("ReplaceNode", request, REPLACE_RPC_TIMEOUT_S))
            except Unavailable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(REPLACE_POLL_S)

    def _retire(self, node_id: str, replaced_by: str | None) -> None:
        with locked(self.folder):
            m = load_manifest(self.folder)
            e = node_entry(m, node_id)
            e["retired"] = True
            e["pid"] = None
            if replaced_by:
                e["replaced_by"] = replaced_by
            save_manifest(self.folder, m)

    def crash_writer(self) -> None:
        """SIGKILL the writer endpoint and start a new one (recovery at a new epoch)."""
        if self.state(WRITER) != "down":
            self.kill(WRITER)
        self.start(WRITER)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc) -> None:
        self.down()
