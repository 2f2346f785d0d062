"""The launcher: start, watch, heal and stop the processes of a multi-process cluster on loopback.

Theory of operation
-------------------
`Cluster(folder)` is the one object a caller needs (`sixfold cluster|node|writer ...`, the chaos
runner, tests, `db.cluster` of `engine.connect`). It holds no logic of its own: it composes one
module per concept, each over the folder's manifest (`manifest.py`):

* `supervisor.py` (`Supervisor`): the processes. Six storage nodes and one writer endpoint, each
  a detached subprocess with its log in `DIR/logs/`, its pid in the manifest (trusted only while
  `/proc/<pid>/cmdline` is ours), readiness by the gRPC health service, control by signal (kill,
  stop, cont, start, down), and the two locks: the manifest lock around every edit and the
  operation lock `DIR/cluster.lock` around `up`, `down` and `wipe_node`, so two `cluster up` at
  once start each process once.
* `status.py` (`StatusView`): every process's health and what it reports, each node's lag behind
  the writer's PGCLs.
* `healing.py` (`Healer`): wipe a node, follow a rebuild, replace a node (membership change run
  by the writer endpoint, retirement in the manifest).
* `admin.py` (`WriterAdmin`, `NodeAdmin`): the writer endpoint's KV admin RPCs and the nodes'
  admin calls (corrupt, scrub, set_faults).
* reader instances (`engine.head.replica`) are processes of the supervisor like the others:
  `up(readers=N)`, `add_reader`, `remove_reader`; `status()["readers"]` shows each one's lag.

Client authentication: unless the manifest turns it off (`"users_file": null`), `up` makes sure,
before any process starts, that the folder's users file holds an admin user "operator" whose
token is in `DIR/operator.token` (0600; `engine.security.users.UserStore.ensure_operator`), so
the local operator's `engine.connect(DIR)`, `sixfold put --cluster DIR` and this launcher's own
admin calls to the writer endpoint carry a valid token with no setup.

One `Cluster` has one `Supervisor`, shared by the others, so the operation lock is reentrant
across them within a thread (`up` holds it while it starts the processes and reads the status).
Each module's docstring says how its part works.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable

from engine.cluster.admin import NodeAdmin
from engine.cluster.healing import REPLACE_TIMEOUT_S, Healer
from engine.cluster.manifest import (
    MANIFEST_FILE,
    WRITER,
    ClusterError,
    active_nodes,
    active_readers,
    load_manifest,
    node_addresses,
    users_file,
)
from engine.cluster.status import StatusView, rebuild_progress
from engine.cluster.supervisor import DOWN_TIMEOUT_S, READY_TIMEOUT_S, Supervisor, port_free

__all__ = ["DOWN_TIMEOUT_S", "READY_TIMEOUT_S", "REPLACE_TIMEOUT_S", "Cluster", "port_free", "rebuild_progress"]


class Cluster:
    """Control of the processes of one cluster folder (see the module docstring).

    Process names are node ids ("n1".."n6") and "writer". Methods that change processes
    update the manifest; they are safe to call from several `sixfold` commands at once."""

    def __init__(self, folder: str | os.PathLike, *, python: str = sys.executable,
                 on_wait: Callable[[str], None] | None = None, manifest_file: str | None = None) -> None:
        # `manifest_file`: a deployment spec of another name than DIR/cluster.json, for its status view
        self.processes = Supervisor(folder, python=python, on_wait=on_wait, manifest_file=manifest_file)
        self.view = StatusView(self.processes)
        self.healer = Healer(self.processes, self.view)
        self.nodes_admin = NodeAdmin(lambda: node_addresses(self.manifest), tls=lambda: self.processes.tls(),
                                     volume=lambda: self.manifest["volume_id"])

    # --- the folder and its manifest --------------------------------------------------------
    @property
    def folder(self) -> str:
        return self.processes.folder

    @property
    def python(self) -> str:
        return self.processes.python

    @property
    def on_wait(self) -> Callable[[str], None] | None:
        """Told once, in a sentence, when an operation waits for another command's operation lock."""
        return self.processes.on_wait

    @on_wait.setter
    def on_wait(self, fn: Callable[[str], None] | None) -> None:
        self.processes.on_wait = fn

    @property
    def manifest(self) -> dict:
        return self.processes.manifest

    @property
    def exists(self) -> bool:
        return self.processes.exists

    @property
    def node_ids(self) -> list[str]:
        """The nodes that hold segments (retired ones left out)."""
        return [n["id"] for n in active_nodes(self.manifest)]

    @property
    def reader_ids(self) -> list[str]:
        """The reader instances configured (removed ones left out)."""
        return [r["id"] for r in active_readers(self.manifest)]

    def add_reader(self, az: str | None = None, *, wait: bool = True, timeout_s: float = READY_TIMEOUT_S) -> str:
        """Add a reader instance and start it (waits until it is SERVING); returns its id."""
        return self.processes.add_reader(az, wait=wait, timeout_s=timeout_s)

    def remove_reader(self, reader_id: str, timeout_s: float = DOWN_TIMEOUT_S) -> None:
        """Stop a reader instance and mark it removed (its id and port are not reused)."""
        self.processes.remove_reader(reader_id, timeout_s)

    @property
    def retired_ids(self) -> list[str]:
        return [n["id"] for n in self.manifest["nodes"] if n.get("retired")]

    def azs(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for n in active_nodes(self.manifest):
            out.setdefault(n["az"], []).append(n["id"])
        return out

    def address(self, name: str) -> str:
        return self.processes.address(name)

    @property
    def writer_address(self) -> str:
        return self.address(WRITER)

    # --- processes (supervisor.py) ----------------------------------------------------------
    def pid(self, name: str) -> int | None:
        """The pid of a live process of ours by that name, else None."""
        return self.processes.pid(name)

    def state(self, name: str) -> str:
        """'running', 'paused' (SIGSTOP) or 'down'."""
        return self.processes.state(name)

    def health(self, name: str, timeout_s: float = 0.5) -> str:
        """SERVING, NOT_SERVING, UNREACHABLE, PAUSED or DOWN."""
        return self.processes.health(name, timeout_s)

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
        allow_fault_injection: bool | None = None,
        encrypt: bool = False,
        key_file: str | None = None,
        no_auth: bool = False,
        readers: int | None = None,
        promote_readers: bool | None = None,
        max_storage_bytes: int | None = None,
        backup: dict | None = None,
        metrics_port_offset: int | None = None,
        no_metrics: bool = False,
        netns: bool = False,
    ) -> dict:
        """Create the cluster (or reopen its data: same volume id), start every process that is
        not running, wait until all are SERVING; returns `status()` plus `started` (the names
        this call started; empty when the cluster was up already). Holds the operation lock
        throughout, so a concurrent `up` waits and then finds the processes running.

        A new cluster is secure (mutual TLS, role checks) unless `insecure=True`;
        `allow_fault_injection=True` lets the admin role corrupt records and set fault rules
        (chaos runs and fault tests). `encrypt=True` with `key_file` (a master key file,
        `sixfold key new`) encrypts a new volume at rest; see `supervisor.py`. `no_auth=True`
        makes a new cluster whose endpoint checks no client token (a throwaway cluster or a
        benchmark baseline; `"users_file": null` in its manifest). `readers=N`: at least N reader
        instances (in the AZs other than the writer's), started with the rest.
        `max_storage_bytes`: the most each node's data may take (recorded in the manifest; nodes
        already running keep theirs until they restart). `backup`
        ({"target": folder, "retention_days": N or None}) backs the volume up from now on
        (engine.backup; the writer endpoint, and any writer after it, runs the archiver).
        Every process serves Prometheus metrics on loopback at its port plus
        `metrics_port_offset` (default 1000), or none with `no_metrics`; fixed at creation
        (`status()` lists each process's `metrics` address). `netns=True` (Linux, root): a new
        cluster whose every process has a network namespace of its own, reachable from this one
        (engine.cluster.netns); `down` removes them."""
        with self.processes.operation("cluster up"):
            if not (no_auth and not os.path.exists(os.path.join(self.folder, MANIFEST_FILE))):
                self.ensure_operator()
            started = self.processes.up(
                base_port=base_port, protection_groups=protection_groups, durable=durable,
                write_timeout_s=write_timeout_s, gossip_interval_s=gossip_interval_s, timeout_s=timeout_s,
                insecure=insecure, allow_fault_injection=allow_fault_injection, encrypt=encrypt, key_file=key_file,
                no_auth=no_auth, readers=readers, promote_readers=promote_readers, max_storage_bytes=max_storage_bytes,
                backup=backup, metrics_port_offset=metrics_port_offset, no_metrics=no_metrics, netns=netns,
            )
            st = self.status()
        st["started"] = started
        return st

    def ensure_operator(self) -> bool:
        """Make the local operator's admin token if it has none (see the module docstring);
        True when one was made. Nothing when the manifest turned authentication off."""
        from engine.security.users import UserStore

        new = not os.path.exists(os.path.join(self.folder, MANIFEST_FILE))  # a new cluster's manifest names the default
        path = users_file({} if new else load_manifest(self.folder), self.folder)
        if path is None:
            return False
        return UserStore(self.folder, path).ensure_operator()

    def rekey(self, old_key_file: str, new_key_file: str) -> dict:
        """Re-wrap the data key of an encrypted cluster under a new master key (no restart; the
        manifest records the new key file). See `Supervisor.rekey`."""
        return self.processes.rekey(old_key_file, new_key_file)

    def start(self, name: str, *, wait: bool = True, timeout_s: float = READY_TIMEOUT_S) -> int:
        """Start a process that is down, with the same arguments as before; returns its pid.
        A running process is left alone; a paused one is a ClusterError (use cont)."""
        return self.processes.start(name, wait=wait, timeout_s=timeout_s)

    def wait_serving(self, names: Iterable[str], timeout_s: float = READY_TIMEOUT_S) -> None:
        """Wait until every named process reports SERVING; ClusterError naming the first that
        dies or is not ready in time, with the tail of its log."""
        self.processes.wait_serving(names, timeout_s)

    _wait_serving = wait_serving  # the name tests used before it was public

    def kill(self, name: str) -> int:
        """SIGKILL: the process dies at once, as in a crash. Returns the pid killed."""
        return self.processes.kill(name)

    def stop(self, name: str) -> int:
        """SIGSTOP: the process freezes (its sockets stay open, nobody answers)."""
        return self.processes.stop(name)

    def cont(self, name: str) -> int:
        """SIGCONT: a frozen process resumes."""
        return self.processes.cont(name)

    def signal_pid(self, pid: int, sig: int) -> bool:
        """Signal a process this `Cluster` started, by pid (a writer paused before a failover,
        which the manifest no longer names); False when it has exited."""
        return self.processes.signal_child(pid, sig)

    def pid_alive(self, pid: int) -> bool:
        """True while a process this `Cluster` started runs or is paused."""
        return self.processes.child_alive(pid)

    def down(self, timeout_s: float = DOWN_TIMEOUT_S) -> None:
        """Stop everything: the writer first (its in-flight writes still reach the nodes), then
        the nodes; SIGTERM, then SIGKILL after `timeout_s`. The data stays."""
        self.processes.down(timeout_s)

    # --- status (status.py) -----------------------------------------------------------------
    def status(self) -> dict:
        """Every process: state, health and (when reachable) epoch, SCLs, VDL; per node its lag
        behind the writer's PGCLs and its rebuild progress (see `rebuild_progress`). JSON-ready."""
        return self.view.status()

    # --- healing (healing.py) ---------------------------------------------------------------
    def rebuild_status(self) -> dict:
        """`status()` plus `complete`: every active node is SERVING with no lag behind the
        writer's PGCLs."""
        return self.healer.rebuild_status()

    def wait_rebuilt(self, timeout_s: float = READY_TIMEOUT_S, interval_s: float = 1.0, progress=None) -> dict:
        """Poll `rebuild_status()` until it is complete; ClusterError after `timeout_s`.
        `progress(status)` is called after each poll."""
        return self.healer.wait_rebuilt(timeout_s, interval_s, progress)

    def wipe_node(self, node_id: str) -> None:
        """Kill a node, delete its data folder, start it empty: it rebuilds from its peers."""
        self.healer.wipe_node(node_id)

    def membership_status(self):
        """The writer endpoint's membership change state (`convert.MembershipChange`)."""
        return self.healer.membership_status()

    def replace_node(self, old: str, new: str, timeout_s: float = REPLACE_TIMEOUT_S, progress=None, *, on_change=None) -> dict:
        """Replace node `old` by a new node `new` in the same AZ, without stopping writes (see
        `healing.Healer.replace_node`). Returns a summary: replaced, reverted, seconds, epoch,
        members. ClusterError when it fails or times out."""
        return self.healer.replace_node(old, new, timeout_s, progress, on_change=on_change)

    # --- convenience for tests and chaos ----------------------------------------------------
    def connect(self, **options):
        """An `engine.Database` on this cluster's writer endpoint."""
        from engine.client import connect

        db = connect(self.folder, **options)
        db.cluster = self
        return db

    def transport(self, source: str = "chaos", identity: str | None = None):
        """A GrpcTransport to every node (admin calls: corrupt, scrub, set_faults, state...); in
        a secure cluster as the operator (`admin`), or as `identity` (a file of DIR/tls/)."""
        if identity is not None:
            from engine.cluster.manifest import tls_config
            from engine.transport.grpc_client import GrpcTransport

            return GrpcTransport(node_addresses(self.manifest), source=source,
                                 tls=tls_config(self.folder, self.manifest, identity), volume_id=self.manifest["volume_id"])
        return self.nodes_admin.transport(source)

    def tls(self, identity: str = "admin"):
        """The `TlsConfig` of an identity of this cluster (None when it is insecure)."""
        from engine.cluster.manifest import tls_config

        return tls_config(self.folder, self.manifest, identity)

    def corrupt(self, node_id: str, pg: int, lsn: int | None = None, bit: int = 0) -> int | None:
        """Flip a bit of a stored record on a node; returns the LSN hit (None: nothing there)."""
        return self.nodes_admin.corrupt(node_id, pg, lsn, bit)

    def scrub(self, node_id: str) -> int:
        """Make a node scrub every record now; returns the corrupt records it found."""
        return self.nodes_admin.scrub(node_id)

    def set_faults(self, node_id: str, rules=None):
        """Replace a node's transport fault rules (`engine.transport.convert.FaultRules`;
        None clears them)."""
        return self.nodes_admin.set_faults(node_id, rules)

    # The names `db.cluster` has in the embedded deployment (engine.embedded.ClusterControl):
    def stop_node(self, node_id: str) -> None:
        """Stop a node as a crash would (SIGKILL); its data stays."""
        self.processes.crash(node_id)

    def start_node(self, node_id: str) -> None:
        self.start(node_id)

    def stop_az(self, az: str) -> None:
        for n in self._az(az):
            self.stop_node(n)

    def start_az(self, az: str) -> None:
        for n in self._az(az):
            self.start(n, wait=False)
        self.wait_serving(self._az(az), READY_TIMEOUT_S)

    def _az(self, az: str) -> list[str]:
        nodes = self.azs().get(az)
        if not nodes:
            raise ClusterError(f"no AZ {az!r}; AZs are {', '.join(sorted(self.azs()))}")
        return nodes

    def crash_writer(self) -> None:
        """SIGKILL the writer endpoint and start a new one (recovery at a new epoch)."""
        self.processes.crash(WRITER)
        self.start(WRITER)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc) -> None:
        self.down()
