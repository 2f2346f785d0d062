"""Process supervision of a cluster folder: spawn, pids, signals, health checks, the operation lock.

Theory of operation
-------------------
`Supervisor(folder)` runs the processes named in the folder's manifest (`manifest.py`): six
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
of it. The operations that decide *which* processes run (`up`, `down`, `wipe_node` of
`healing.py`) also hold the operation lock `DIR/cluster.lock` (`operation`) from start to end,
waiting for it (bounded) if another `sixfold` command has it: two `cluster up` at once start
each process once (the second finds them running and starts nothing), and a `down` during an
`up` waits for the `up` to finish. Both locks are flocks on descriptors that no child inherits
(close-on-exec, `close_fds`), so a serving process never holds one; the kernel drops them when a
command dies.

Security: a new cluster is secure unless `up(insecure=True)`: under the manifest lock, before
any process starts, `up` creates the cluster CA and a certificate for every process that has
none (`engine.security.certs`, in `DIR/tls/`), and so does `start` for a node added later.
Health checks then speak mutual TLS as the operator (`admin`). An insecure cluster on a
non-loopback host is refused before anything starts.

Encryption at rest: `up(encrypt=True, key_file=F)` on a new folder reads the master key from F
and writes the volume's wrapped data key and F's absolute path into the manifest (format 2,
`manifest.py`); every start of the writer endpoint passes `--key-file F` on its command line
(the path, never the key). The writer reads the key itself; one started without it or with a
wrong one exits at once with an EncryptionError in its log, which `wait_serving` reports with the
log's tail. `up(encrypt=True, key_file=F)` on an existing encrypted cluster checks that F unwraps
its data key and records F from then on; on a plain cluster it is refused (encryption is chosen
at creation). `rekey` re-wraps the data key under a new master key, under both locks.

Reader instances (`engine.head.replica`) are processes of the same kind, named by their ids
(r1, r2 ...; `python -m engine reader serve --cluster DIR --id r1`): `up(readers=N)` adds entries
until N are active and starts every active reader with the rest, `add_reader` adds and starts
one, `remove_reader` stops one and marks it retired. A reader reports SERVING once it has its
first read point from the writer. `down` stops the readers together with the writer.

Metrics ports (`engine.metrics`): each process serves its metrics on loopback at its port plus
the manifest's metrics port offset (`manifest.metrics_port`), passed as `--metrics-port` on its
command line; `up` and `start` check those ports with the gRPC ones before anything starts, `kill`
waits for both to be free, and a new reader's or node's port is one whose metrics port clashes
with nothing either (`next_free_port`).

Rules of this module: it knows processes, ports, pids and the manifest's process entries; it
asks a process nothing but its health (status and healing are `status.py` and `healing.py`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

import engine
from engine.cluster.manifest import (
    BASE_PORT_DEFAULT,
    HOST_DEFAULT,
    METRICS_PORT_OFFSET_DEFAULT,
    READERS_MAX,
    WRITER,
    OPERATOR,
    ClusterError,
    active_nodes,
    active_readers,
    add_reader_entry,
    is_reader,
    reader_entry,
    used_ports,
    check_compatible,
    data_folder,
    identity_hosts,
    identity_roles,
    is_encrypted,
    is_placed,
    listen_address,
    is_secure,
    load_manifest,
    load_manifest_file,
    locked,
    metrics_port,
    metrics_port_offset as manifest_metrics_offset,
    new_manifest,
    node_entry,
    port_clashes,
    save_manifest,
    tls_config,
    tls_folder,
)
from engine.errors import EncryptionError, InvalidArgument
from engine.security.tls import secure_channel

log = logging.getLogger("sixfold.launcher")

#: The manifest field of a cluster made by `cluster up --netns` (engine.cluster.netns): its
#: processes run in namespaces recorded in DIR/netns.json. An older release ignores it and
#: fails to bind the namespaces' addresses: a refusal, not a misreading.
NETNS = "netns"
READERS_KEY = "readers"

READY_TIMEOUT_S = 60.0
DOWN_TIMEOUT_S = 10.0
LOG_TAIL_LINES = 20
HEALTH_POLL_S = 0.1
#: The operation lock (see the module docstring) and how long an operation waits for it: longer
#: than another `up` can take (READY_TIMEOUT_S, then stopping what failed).
OPERATION_LOCK_FILE = "cluster.lock"
OPERATION_LOCK_WAIT_S = 300.0
OPERATION_LOCK_POLL_S = 0.05


def proc_state(pid: int | None) -> str | None:
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


def next_free_port(manifest: dict, what: str, search_max: int = 65535) -> int:
    """The first port above every port the manifest names (gRPC; metrics ports are not counted,
    so that a new process's port is what it was before metrics) that is free now, whose metrics
    port is free too, and neither of which is a port of the manifest's (`manifest.port_clashes`).
    ClusterError when none is left (`what` names the process it is for)."""
    from engine.metrics import METRICS_HOST

    host = manifest.get("host", HOST_DEFAULT)
    highest = max(used_ports(manifest))
    for port in range(highest + 1, min(65535, highest + search_max) + 1):
        if port_clashes(manifest, port) or not port_free(host, port):
            continue
        mport = metrics_port(manifest, f"{host}:{port}")
        if mport is None or port_free(METRICS_HOST, mport):
            return port
    raise ClusterError(f"no free port left above the cluster's ports ({highest}) for {what}")


def log_tail(path: str, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 16384))
            text = fh.read().decode(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


class Supervisor:
    """The processes of one cluster folder (see the module docstring).

    Process names are node ids ("n1".."n6") and "writer". Methods that change processes
    update the manifest; they are safe to call from several `sixfold` commands at once."""

    def __init__(self, folder: str | os.PathLike, *, python: str = sys.executable,
                 on_wait: Callable[[str], None] | None = None, manifest_file: str | None = None) -> None:
        self.folder = os.path.abspath(os.fspath(folder))
        #: a deployment spec of another name than DIR/cluster.json (engine.cluster.spec): read by
        #: the status view; a spec's processes are its orchestrator's, never started from here
        self.manifest_file = os.path.abspath(manifest_file) if manifest_file else None
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
        if self.manifest_file is not None:
            return load_manifest_file(self.manifest_file, self.folder)
        return load_manifest(self.folder)

    @property
    def exists(self) -> bool:
        return os.path.exists(os.path.join(self.folder, "cluster.json"))

    @staticmethod
    def entry(manifest: dict, name: str) -> dict:
        """The manifest entry of a process: the writer endpoint's, a reader's or a node's."""
        if name == WRITER:
            return manifest[WRITER]
        return reader_entry(manifest, name) if is_reader(manifest, name) else node_entry(manifest, name)

    def address(self, name: str) -> str:
        return self.entry(self.manifest, name)["address"]

    def tls(self, manifest: dict | None = None):
        """The operator's TlsConfig in a secure cluster, None in an insecure one."""
        return tls_config(self.folder, self.manifest if manifest is None else manifest)

    def _ensure_certificates(self, manifest: dict, names: Iterable[str] | None = None) -> list[str]:
        """A secure cluster: the CA and a certificate for each process of `names` (default all)
        and for the operator, made if missing; returns the ids issued."""
        if not is_secure(manifest):
            return []
        roles = identity_roles(manifest)
        wanted = dict(roles) if names is None else {n: roles.get(n, "reader" if is_reader(manifest, n) else "node")
                                                     for n in names}
        wanted.setdefault(OPERATOR, "admin")
        # Each certificate names its own process's hosts (its address and listen address), so a
        # process reached at a host of its own passes the hostname check (engine.cluster.spec).
        issued = tls_folder(self.folder, manifest).ensure(
            wanted, hosts=(manifest.get("host", HOST_DEFAULT),),
            hosts_of={ident: identity_hosts(manifest, ident) for ident in wanted})
        if issued:
            log.info("issued certificates for %s in %s", ", ".join(issued), self.path("tls"))
        return issued

    def path(self, relative: str) -> str:
        """A path of the manifest (relative to the folder) as an absolute path."""
        return os.path.join(self.folder, relative)

    def _set_pid(self, name: str, pid: int | None) -> None:
        with locked(self.folder):
            m = load_manifest(self.folder)
            self.entry(m, name)["pid"] = pid
            save_manifest(self.folder, m)

    @contextlib.contextmanager
    def operation(self, what: str, wait_s: float = OPERATION_LOCK_WAIT_S) -> Iterator[None]:
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
        path = self.path(OPERATION_LOCK_FILE)
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
        entry = self.entry(self.manifest, name)
        return self.live_pid(name, entry.get("pid"))

    def live_pid(self, name: str, pid: int | None) -> int | None:
        """`pid` if it is a live process of ours named `name` (the manifest's pid of it), else
        None (gone, or recycled by an unrelated process)."""
        self._reap(pid)
        proc = self._children.get(pid) if pid else None
        if proc is not None:
            # Our own child: poll() is the truth. Its cmdline is not: between fork and exec
            # /proc/<pid>/cmdline still shows this process's, which once read as "exited
            # before it was ready" on a loaded machine.
            return pid if proc.poll() is None else None
        if proc_state(pid) is None:
            return None
        cmd = _cmdline(pid) + b"\x00"
        if b"engine" not in cmd:
            return None  # the pid was recycled by an unrelated process
        if self._signature(name) in cmd:
            return pid
        if name == WRITER and b"reader\x00serve\x00" in cmd:
            return pid  # a reader that promoted itself: the manifest's writer now
        return None

    def state(self, name: str) -> str:
        """'running', 'paused' (SIGSTOP) or 'down'."""
        pid = self.pid(name)
        if pid is None:
            return "down"
        return "paused" if proc_state(pid) in ("T", "t") else "running"

    def health(self, name: str, timeout_s: float = 0.5) -> str:
        """SERVING, NOT_SERVING, UNREACHABLE, PAUSED or DOWN."""
        state = self.state(name)
        manifest = self.manifest
        # A process of a deployment spec runs on a host of its own under its orchestrator: no
        # pid here to go by, so it is asked over the network (engine.cluster.spec).
        remote = state == "down" and is_placed(manifest) and self.entry(manifest, name).get("pid") is None
        if state != "running" and not remote:
            return state.upper()
        with secure_channel(self.entry(manifest, name)["address"], self.tls(manifest)) as ch:
            try:
                reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
            except grpc.RpcError:
                return "UNREACHABLE"
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    # --- starting ---------------------------------------------------------------------------
    def _plan(self, manifest: dict):
        """The namespace plan of a `--netns` cluster (engine.cluster.netns), else None."""
        if not manifest.get(NETNS):
            return None
        from engine.cluster.netns import load_record

        return load_record(self.folder)

    def _in_namespace(self, manifest: dict, name: str) -> bool:
        """True when a namespace of the plan has the process's address (by address, not name:
        a promoted reader's namespace serves the writer's entry)."""
        plan = self._plan(manifest)
        return plan is not None and plan.namespace_at(_split(self.entry(manifest, name)["address"])[0]) is not None

    def _argv(self, manifest: dict, name: str) -> list[str]:
        from engine.cluster.netns import exec_prefix

        # A namespaced process is started by `ip netns exec NS`, which execs it: same pid.
        host = _split(self.entry(manifest, name)["address"])[0]
        base = [*exec_prefix(self._plan(manifest), host), self.python, "-m", "engine"]
        address = listen_address(self.entry(manifest, name))  # what it binds (engine.cluster.spec)
        port = metrics_port(manifest, address)
        # Said on the command line (what the process would take from the manifest anyway): `ps`
        # and the log's start line show where each process serves its metrics.
        metrics = ["--metrics-port", "off" if port is None else str(port)]
        if name == WRITER:
            argv = base + ["writer", "serve", "--cluster", self.folder, "--listen", address, *metrics]
            if manifest.get("key_file"):
                argv += ["--key-file", manifest["key_file"]]
            return argv
        if is_reader(manifest, name):
            r = reader_entry(manifest, name)
            argv = base + ["reader", "serve", "--cluster", self.folder, "--id", r["id"], "--listen", address, *metrics]
            if manifest.get("key_file"):
                argv += ["--key-file", manifest["key_file"]]
            if manifest.get("promote_readers", True) is False:
                argv.append("--no-promote")
            return argv
        # The node reads the rest (AZ, data folder, volume, peers, durability, gossip interval)
        # from the manifest, and re-reads it to reach nodes added later (engine.cluster.addresses).
        n = node_entry(manifest, name)
        return base + ["node", "serve", "--cluster", self.folder, "--id", n["id"], "--listen", address, *metrics]

    def _spawn(self, manifest: dict, name: str) -> int:
        entry = self.entry(manifest, name)
        if manifest.get(NETNS) and not self._in_namespace(manifest, name):
            # Added after `up --netns` (a reader, a replacement node): a namespace of its own,
            # and its address becomes that namespace's (same port), before its certificate.
            from engine.cluster.netns import add_process

            plan = add_process(self.folder, name, entry.get("az") or "a")
            entry["address"] = f"{plan.address(name)}:{_split(entry['address'])[1]}"
            if is_reader(manifest, name):  # the writer's certificate names every reader's host
                self._reissue_writer_certificate(manifest)
        log_path = self.path(entry["log"])
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        self._ensure_certificates(manifest, [name])
        argv = self._argv(manifest, name)
        env = dict(os.environ)
        root = os.path.dirname(os.path.dirname(os.path.abspath(engine.__file__)))
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["PYTHONUNBUFFERED"] = "1"
        with open(log_path, "ab") as out:
            out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {name}: {' '.join(argv)}\n".encode())
            out.flush()
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=self.folder, env=env,
                start_new_session=True, close_fds=True,
            )
        self._children[proc.pid] = proc
        entry["pid"] = proc.pid
        log.info("started %s (pid %d), log %s", name, proc.pid, log_path)
        return proc.pid

    def _reissue_writer_certificate(self, manifest: dict) -> None:
        """The writer's certificate again, naming every reader's host too (a reader that
        promotes itself serves it at its own address). Servers take the new file on their next
        connection (engine.security.tls)."""
        if is_secure(manifest):
            tls_folder(self.folder, manifest).issue(WRITER, "writer", hosts=(manifest.get("host", HOST_DEFAULT),
                                                                              *identity_hosts(manifest, WRITER)))

    def _check_ports(self, manifest: dict, names: Iterable[str]) -> None:
        from engine.metrics import METRICS_HOST

        for name in names:
            if self._in_namespace(manifest, name):
                continue  # a namespace of its own: nothing else binds there
            address = self.entry(manifest, name)["address"]
            host, port = _split(address)
            if not port_free(host, port):
                raise ClusterError(
                    f"port {port} ({address}, for {name}) is already in use by another process; "
                    f"stop it, or create the cluster with another --base-port"
                )
            mport = metrics_port(manifest, address)
            if mport is not None and not port_free(METRICS_HOST, mport):
                raise ClusterError(
                    f"port {mport} ({METRICS_HOST}:{mport}, the metrics port of {name}) is already in use by another "
                    "process; stop it, or give the cluster another --metrics-port-offset (or --no-metrics)"
                )

    def wait_serving(self, names: Iterable[str], timeout_s: float) -> None:
        """Wait until every named process reports SERVING; ClusterError naming the first that
        dies or is not ready in time, with the tail of its log."""
        manifest = self.manifest
        pending = {name: self.entry(manifest, name) for name in names}
        tls = self.tls(manifest)
        channels = {name: secure_channel(e["address"], tls) for name, e in pending.items()}
        deadline = time.monotonic() + timeout_s
        try:
            while pending:
                for name in sorted(pending):
                    entry = pending[name]
                    if self.live_pid(name, entry["pid"]) is None:
                        proc = self._children.get(entry["pid"])
                        code = f" with code {proc.returncode}" if proc is not None and proc.returncode is not None else ""
                        log.error("%s (pid %s) exited%s before it was ready; see %s", name, entry["pid"], code, self.path(entry["log"]))
                        raise ClusterError(
                            f"{name} (pid {entry['pid']}) exited{code} before it was ready. "
                            f"Last lines of {self.path(entry['log'])}:\n{log_tail(self.path(entry['log']))}"
                        )
                    if proc_state(entry["pid"]) in ("T", "t"):
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
                    log.error("%s (pid %s, %s) is not SERVING after %g s; see %s", name, entry["pid"], entry["address"],
                              timeout_s, self.path(entry["log"]))
                    raise ClusterError(
                        f"{name} (pid {entry['pid']}, {entry['address']}) is not SERVING after {timeout_s:g} s. "
                        f"Last lines of {self.path(entry['log'])}:\n{log_tail(self.path(entry['log']))}"
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
        insecure: bool | None = None,
        no_auth: bool = False,
        allow_fault_injection: bool | None = None,
        encrypt: bool = False,
        key_file: str | None = None,
        readers: int | None = None,
        promote_readers: bool | None = None,
        max_storage_bytes: int | None = None,
        backup: dict | None = None,
        metrics_port_offset: int | None = None,
        no_metrics: bool = False,
        netns: bool = False,
    ) -> list[str]:
        """Create the cluster (or reopen its data: same volume id), start every process that is
        not running, wait until all are SERVING; returns the names this call started (empty when
        the cluster was up already). Holds the operation lock throughout, so a concurrent `up`
        waits and then finds the processes running; on failure, stops what it started.

        A new cluster is secure (mutual TLS, certificates in DIR/tls/) unless `insecure`, which is
        fixed at creation; `allow_fault_injection` (Corrupt, SetFaults for the admin role) is
        recorded in the manifest and applies to the processes started from then on. `encrypt`
        with `key_file` encrypts a new volume at rest (see the module docstring). `readers`: make
        sure at least that many reader instances are configured (they all start with the rest).
        `max_storage_bytes`: the most each node's data may take, recorded in the manifest for the
        nodes started from then on (see `_set_maximum`). `metrics_port_offset` (default 1000) or
        `no_metrics`: where every process serves its metrics (its port plus the offset), or
        nowhere; fixed at creation, like the base port. `netns`: a new cluster whose every process
        runs in a network namespace of its own (engine.cluster.netns; Linux, root); an existing
        one keeps what it was created as."""
        if metrics_port_offset is not None and no_metrics:
            raise InvalidArgument("give a metrics port offset or no metrics, not both")
        if readers is not None and not 0 <= readers <= READERS_MAX:
            raise InvalidArgument(f"readers: 0..{READERS_MAX}, got {readers}")
        if encrypt and not key_file:
            raise InvalidArgument("an encrypted cluster needs the file of its master key (key_file)")
        if key_file and not encrypt:
            raise InvalidArgument("a key file encrypts a cluster only with encrypt=True")
        if netns:
            from engine.cluster.netns import NetnsError, unavailable_reason

            reason = unavailable_reason()
            if reason is not None:
                raise NetnsError(f"cluster up --netns: {reason}")
        with self.operation("cluster up"):
            started: list[str] = []
            try:
                # One manifest lock from deciding what to start until the manifest records the
                # pids: a `start` (which takes only this lock) cannot slip in between.
                with locked(self.folder):
                    if self.exists:
                        manifest = load_manifest(self.folder)
                        check_compatible(manifest, protection_groups=protection_groups, base_port=base_port)
                        if insecure is not None and bool(insecure) == is_secure(manifest):
                            raise ClusterError(
                                f"this cluster was created {'secure (TLS)' if is_secure(manifest) else 'insecure (--insecure)'}; "
                                "that is fixed at creation. Leave --insecure out, or use another folder."
                            )
                        if encrypt:
                            self._use_key_file(manifest, key_file)
                        wanted = None if no_metrics else metrics_port_offset
                        if (no_metrics or metrics_port_offset is not None) and wanted != manifest_metrics_offset(manifest):
                            had = manifest_metrics_offset(manifest)
                            raise ClusterError(
                                f"this cluster was created {'without metrics' if had is None else f'with metrics port offset {had}'}"
                                "; that is fixed at creation. Leave --metrics-port-offset and --no-metrics out, or use "
                                "another folder (or edit \"metrics_port_offset\" in cluster.json while it is down).")
                    else:
                        manifest = new_manifest(
                            base_port=BASE_PORT_DEFAULT if base_port is None else base_port,
                            protection_groups=protection_groups,
                            durable=True if durable is None else durable,
                            tls=not insecure,
                            allow_fault_injection=bool(allow_fault_injection),
                            master_key=self._master_key(key_file) if encrypt else None,
                            key_file=key_file if encrypt else None,
                            tokens=not no_auth,
                            metrics_port_offset=None if no_metrics else (
                                METRICS_PORT_OFFSET_DEFAULT if metrics_port_offset is None else metrics_port_offset),
                        )
                    if allow_fault_injection is not None:
                        manifest["allow_fault_injection"] = bool(allow_fault_injection)
                    if promote_readers is not None:
                        manifest["promote_readers"] = bool(promote_readers)
                    if backup is not None:  # the writer endpoint archives into it (engine.backup)
                        manifest["backup"] = {"target": os.path.abspath(backup["target"]),
                                              "retention_days": backup.get("retention_days")}
                    if not is_secure(manifest):
                        from engine.transport.grpc_server import is_loopback

                        host = manifest.get("host", HOST_DEFAULT)
                        if not is_loopback(f"{host}:0"):
                            raise ClusterError(f"an insecure cluster listens on loopback only; host {host!r} needs TLS "
                                               "(create the cluster without --insecure)")
                    if max_storage_bytes is not None:
                        self._set_maximum(manifest, max_storage_bytes)
                    if durable is not None:
                        manifest["durable"] = bool(durable)
                    if write_timeout_s is not None:
                        manifest["write_timeout_s"] = float(write_timeout_s)
                    if gossip_interval_s is not None:
                        manifest["gossip_interval_s"] = float(gossip_interval_s)
                    for _ in range(max(0, (readers or 0) - len(active_readers(manifest)))):
                        add_reader_entry(manifest, None, self._free_port(manifest))
                    names = [n["id"] for n in active_nodes(manifest)] + [WRITER] + [r["id"] for r in active_readers(manifest)]
                    if netns and self.exists and not manifest.get(NETNS):
                        raise ClusterError("this cluster was created without --netns; that is fixed at creation. Leave "
                                           "--netns out, or use another folder.")
                    if netns or manifest.get(NETNS):
                        self._ensure_namespaces(manifest, names, new=netns and not self.exists)
                    for name in names:
                        entry = self.entry(manifest, name)
                        if self.live_pid(name, entry.get("pid")) is None:
                            entry["pid"] = None
                    missing = [name for name in names if self.entry(manifest, name)["pid"] is None]
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
                self.wait_serving(names, timeout_s)
            except BaseException:
                for name in reversed(started):  # leave nothing half-started behind
                    self.terminate([name], DOWN_TIMEOUT_S)
                raise
            return started

    def _set_maximum(self, manifest: dict, max_storage_bytes: int) -> None:
        """Record the nodes' storage maximum, checked first (InvalidArgument, nothing changed): a
        size, at most the filesystem of the cluster folder, and at least what each node's data file
        already holds (LMDB never shrinks it; the node itself refuses such a maximum as well)."""
        from engine.sizes import check_fits_filesystem, check_storage_bytes, format_size

        check_storage_bytes(max_storage_bytes)
        check_fits_filesystem(max_storage_bytes, self.folder)
        for n in active_nodes(manifest):
            try:
                held = os.path.getsize(os.path.join(data_folder(self.folder, manifest, n), "data.mdb"))
            except OSError:
                continue  # no data yet
            if held > max_storage_bytes:
                raise InvalidArgument(
                    f"node {n['id']} already holds {format_size(held)} ({held} bytes; LMDB never shrinks its file); "
                    f"a maximum of {format_size(max_storage_bytes)} is below it. Give at least {held} bytes; "
                    "nothing was changed."
                )
        manifest["max_storage_bytes"] = max_storage_bytes

    # --- reader instances -------------------------------------------------------------------
    def _free_port(self, manifest: dict) -> int:
        """The next port above every port the manifest names that nothing listens on now (nor
        on its metrics port): `next_free_port`."""
        return next_free_port(manifest, "a new reader")

    def add_reader(self, az: str | None = None, *, wait: bool = True, timeout_s: float = READY_TIMEOUT_S) -> str:
        """Add a reader instance (in `az`, default as `manifest.next_reader_az`) and start it;
        returns its id. ClusterError when 15 run already."""
        if az is not None:
            from engine.transport.convert import check_node_id

            check_node_id(az, "AZ")
        with locked(self.folder):
            manifest = load_manifest(self.folder)
            entry = add_reader_entry(manifest, az, self._free_port(manifest))
            try:
                self._spawn(manifest, entry["id"])
            finally:
                save_manifest(self.folder, manifest)
        if wait:
            try:
                self.wait_serving([entry["id"]], timeout_s)
            except BaseException:
                self.terminate([entry["id"]], DOWN_TIMEOUT_S)
                raise
        return entry["id"]

    def remove_reader(self, reader_id: str, timeout_s: float = DOWN_TIMEOUT_S) -> None:
        """Stop a reader instance (SIGTERM, then SIGKILL) and mark it retired in the manifest."""
        entry = reader_entry(self.manifest, reader_id)
        if entry.get("retired"):
            raise ClusterError(f"reader {reader_id} was removed already")
        self.terminate([reader_id], timeout_s)
        with locked(self.folder):
            m = load_manifest(self.folder)
            reader_entry(m, reader_id)["retired"] = True
            save_manifest(self.folder, m)

    # --- encryption at rest -----------------------------------------------------------------
    def _master_key(self, key_file: str) -> bytes:
        """The master key in `key_file` (EncryptionError / InvalidArgument naming the file)."""
        from engine.envelope import key_file_is_private, read_key_file

        key = read_key_file(key_file)
        if not key_file_is_private(key_file):
            log.warning("the key file %s can be read by other users (chmod 600 it)", key_file)
        inside = os.path.commonpath([self.folder, os.path.abspath(key_file)]) == self.folder
        if inside:
            log.warning("the key file %s is inside the cluster folder: whoever copies the folder has the key too; "
                        "keep it elsewhere", key_file)
        return key

    def _use_key_file(self, manifest: dict, key_file: str) -> None:
        """An existing cluster asked to be encrypted with `key_file`: check it unwraps the data
        key and record it (a plain cluster cannot be switched on in place)."""
        from engine.envelope import unwrap

        if not is_encrypted(manifest):
            raise EncryptionError(
                f"cluster {self.folder} is not encrypted, and encryption is chosen when a cluster is created: it "
                "cannot be switched on in place. Leave --encrypt out, or copy the data into a new encrypted cluster "
                "(restore a backup into one, once backups exist).")
        unwrap(manifest["encryption"], self._master_key(key_file), manifest["volume_id"])
        manifest["key_file"] = os.path.abspath(key_file)

    def rekey(self, old_key_file: str, new_key_file: str) -> dict:
        """Re-wrap an encrypted cluster's data key under the master key of `new_key_file` and
        record that file in the manifest (atomic write, under the operation and manifest locks).
        The running writer keeps its data key: nothing restarts. EncryptionError if the cluster
        is plain or `old_key_file` does not unwrap its data key; the manifest is then unchanged."""
        from engine.envelope import rewrap

        with self.operation("cluster rekey"), locked(self.folder):
            manifest = load_manifest(self.folder)
            if not is_encrypted(manifest):
                raise EncryptionError(f"cluster {self.folder} is not encrypted: there is no key to rotate")
            old, new = self._master_key(old_key_file), self._master_key(new_key_file)
            if old == new:
                raise InvalidArgument("the new key file holds the same key as the old one")
            manifest["encryption"] = rewrap(manifest["encryption"], old, new, manifest["volume_id"])
            manifest["key_file"] = os.path.abspath(new_key_file)
            save_manifest(self.folder, manifest)
        log.info("re-wrapped the data key of %s under the key of %s", self.folder, manifest["key_file"])
        return {"cluster": self.folder, "rekeyed": True, "key_file": manifest["key_file"]}

    def start(self, name: str, *, wait: bool = True, timeout_s: float = READY_TIMEOUT_S) -> int:
        """Start a process that is down, with the same arguments as before; returns its pid.
        A running process is left alone; a paused one is a ClusterError (use cont)."""
        with locked(self.folder):
            manifest = load_manifest(self.folder)
            entry = self.entry(manifest, name)
            if entry.get("retired") and is_reader(manifest, name):
                raise ClusterError(f"reader {name} was removed; add a new one with `sixfold reader add`")
            if entry.get("retired"):
                raise ClusterError(f"node {name} was retired (replaced by {entry.get('replaced_by') or 'another node'}); it is not started again")
            pid = self.live_pid(name, entry.get("pid"))
            if pid is not None:
                if proc_state(pid) in ("T", "t"):
                    raise ClusterError(f"{name} (pid {pid}) is paused (SIGSTOP); continue it with `cont`, not `start`")
                return pid
            self._check_ports(manifest, [name])
            pid = self._spawn(manifest, name)
            save_manifest(self.folder, manifest)
        if wait:
            self.wait_serving([name], timeout_s)
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

    def crash(self, name: str) -> None:
        """SIGKILL the process if it runs or is paused (a crash; its data stays); nothing if down."""
        if self.state(name) != "down":
            self.kill(name)

    def _wait_port_free(self, name: str, timeout_s: float) -> bool:
        """Wait until the process's port can be bound again. The thread-group leader of a killed
        multi-threaded process shows as a zombie while its other threads still tear down (and
        hold its sockets), so "gone" can come a moment before the port is free."""
        from engine.metrics import METRICS_HOST

        manifest = self.manifest
        if self._in_namespace(manifest, name):
            return True  # its ports are in its own namespace, gone with the process
        address = self.entry(manifest, name)["address"]
        host, port = _split(address)
        mport = metrics_port(manifest, address)
        deadline = time.monotonic() + timeout_s
        while not port_free(host, port) or (mport is not None and not port_free(METRICS_HOST, mport)):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def signal_child(self, pid: int, sig: int) -> bool:
        """Signal a process this supervisor started, by pid, whatever the manifest names now (a
        writer paused before a failover is the writer no more); False when it has exited. Only
        our own children: their pid cannot be recycled while we hold them unreaped."""
        proc = self._children.get(pid)
        if proc is None or proc.poll() is not None:
            return False
        os.kill(pid, sig)
        return True

    def child_alive(self, pid: int) -> bool:
        """True while a process this supervisor started runs (or is paused)."""
        proc = self._children.get(pid)
        return proc is not None and proc.poll() is None

    def stop(self, name: str) -> int:
        """SIGSTOP: the process freezes (its sockets stay open, nobody answers)."""
        return self._signal(name, signal.SIGSTOP)

    def cont(self, name: str) -> int:
        """SIGCONT: a frozen process resumes."""
        return self._signal(name, signal.SIGCONT)

    def _wait_gone(self, pid: int, name: str, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.live_pid(name, pid) is None:
                return True
            proc = self._children.get(pid)
            if proc is not None:
                try:
                    proc.wait(timeout=0.05)
                except subprocess.TimeoutExpired:
                    pass
            else:
                time.sleep(0.05)
        return self.live_pid(name, pid) is None

    def terminate(self, names: list[str], timeout_s: float) -> None:
        """SIGTERM (and SIGCONT, so a paused process can act on it), then SIGKILL after
        `timeout_s`; the manifest then records no pid for any of `names`."""
        manifest = self.manifest
        pids = {}
        for name in names:
            pid = self.live_pid(name, self.entry(manifest, name).get("pid"))
            if pid is None:
                continue
            os.kill(pid, signal.SIGTERM)
            os.kill(pid, signal.SIGCONT)
            pids[name] = pid
        deadline = time.monotonic() + timeout_s
        for name, pid in pids.items():
            if not self._wait_gone(pid, name, max(0.0, deadline - time.monotonic())):
                log.warning("%s (pid %d) did not stop within %g s of SIGTERM: SIGKILL", name, pid, timeout_s)
                os.kill(pid, signal.SIGKILL)
                self._wait_gone(pid, name, 5.0)
        with locked(self.folder):
            m = load_manifest(self.folder)
            for name in names:
                self.entry(m, name)["pid"] = None
            save_manifest(self.folder, m)

    def down(self, timeout_s: float = DOWN_TIMEOUT_S) -> None:
        """Stop everything: the writer first (its in-flight writes still reach the nodes), then
        the nodes; SIGTERM, then SIGKILL after `timeout_s`. The data stays."""
        if not self.exists:
            from engine.cluster.netns import teardown

            teardown(self.folder)  # a launcher that died before it wrote the manifest
            return
        with self.operation("cluster down"):
            self.terminate([WRITER] + [r["id"] for r in self.manifest.get("readers", ())], timeout_s)
            self.terminate([n["id"] for n in self.manifest["nodes"]], timeout_s)  # retired ones too, should one still run
            from engine.cluster.netns import teardown

            removed = teardown(self.folder)  # every namespace and link `up --netns` recorded
            if removed:
                log.info("removed the network namespaces and links of %s: %s", self.folder, ", ".join(removed))

    def _ensure_namespaces(self, manifest: dict, names: list[str], *, new: bool) -> None:
        """A `--netns` cluster (engine.cluster.netns): make every process's namespace that is
        missing, recorded in DIR/netns.json first. A new cluster takes a free slot and its
        processes' addresses become their namespaces' (same ports); an existing one makes the
        namespaces of the addresses its manifest has (after a `down`, or a reboot)."""
        from engine.cluster import netns

        if new:
            if not is_secure(manifest):
                raise ClusterError("a --netns cluster listens off loopback, which needs TLS: leave out --insecure")
            if manifest.get(READERS_KEY) and any(r.get("retired") for r in manifest[READERS_KEY]):
                raise AssertionError("a new cluster has no retired reader")
        azs = {name: (self.entry(manifest, name).get("az") or "a") for name in names}
        plan = netns.load_record(self.folder)
        hosts = {n: _split(self.entry(manifest, n)["address"])[0] for n in names}
        if plan is not None:
            for n in names:  # processes added since (readers, replacements): each gets one
                if plan.namespace_at(hosts[n]) is None:
                    plan = netns.add_process(self.folder, n, azs[n])
                    hosts[n] = plan.address(n)
            netns.make(plan)  # idempotent: whatever is missing
        elif new:
            plan = netns.create(self.folder, [(n, azs[n]) for n in names])
        else:  # after a `down` or a reboot: the same addresses again
            plan = netns.create(self.folder, [(n, azs[n]) for n in names], slot=netns.slot_of(hosts[WRITER]),
                                addresses=hosts)
        for name in names:
            entry = self.entry(manifest, name)
            port = _split(entry["address"])[1]
            if new:
                entry["address"] = f"{plan.address(name)}:{port}"
            else:
                entry["address"] = f"{hosts[name]}:{port}"
                assert plan.namespace_at(hosts[name]) is not None, (name, hosts[name])
        manifest[NETNS] = True
