"""How the processes of a cluster reach a node that joined after they started.

Theory of operation
-------------------
A node added by a membership change (`sixfold node replace n3 --with n7`) gets its address in
`DIR/cluster.json` before it starts, and before any process is told that it exists. Two kinds of
process must then reach it:

* The **writer endpoint** is told by the launcher: the `ReplaceNode` RPC carries the new node's
  address and AZ, and the endpoint adds them to its transport before epoch step 1 (see
  `engine.head.endpoint`). This needs no file system access, so it also works for an endpoint
  named by `--target`.
* **Storage nodes** learn that n7 exists from the membership the writer sends them (`sync_epoch`)
  and then gossip with it. Their transport is a `ManifestTransport`: a call naming a node it has
  no address for re-reads the manifest (at most once per `RELOAD_INTERVAL_S`, so a bad id costs
  one small file read a second, not one per call) before it gives up with `NodeNotFound`.

Pull (re-read on an unknown id) rather than push for the nodes, because the manifest is already
the single place where addresses are decided and written under the folder lock, and because a
node that was down while the change happened learns the address the same way when it returns,
with no message to miss. Addresses of an id never change (ports are never reused), so a cached
address is never stale.

`run_cluster_node` is `sixfold node serve --cluster DIR --id ID`: `run_node_process` of
`engine.transport.grpc_server` with a `ManifestTransport` for gossip.

The other way round, a process tells who it knows: `ManifestDirectory` answers the
`Directory` RPC of a cluster's node, writer and reader processes with every active node, the
writer and every active reader the manifest (or deployment spec) names now, re-read at most once
per `RELOAD_INTERVAL_S`. That is what `sixfold status --via HOST:PORT` starts from: one
reachable process names the others (`engine.cluster.status.status_via`).
"""

from __future__ import annotations

import logging
import os
import threading
import time

from engine.cluster.manifest import (
    GOSSIP_INTERVAL_S_DEFAULT,
    WRITER,
    WRITER_AZ_DEFAULT,
    ClusterError,
    active_nodes,
    active_readers,
    data_folder,
    listen_address,
    load_manifest_file,
    manifest_path,
    node_addresses,
    node_entry,
)
from engine.errors import WrongFolder
from engine.transport.convert import Directory, KnownProcess
from engine.transport.grpc_client import GrpcTransport

log = logging.getLogger("sixfold.node")

#: At most one manifest re-read per this many seconds per transport.
RELOAD_INTERVAL_S = 1.0


class ManifestTransport(GrpcTransport):
    """A `GrpcTransport` that looks up nodes it does not know in the cluster manifest."""

    def __init__(self, folder: str, source: str, *, manifest_file: str | None = None, **kwargs) -> None:
        # kwargs: GrpcTransport's (tls, deadlines...). `manifest_file`: a deployment spec's path
        # (default DIR/cluster.json).
        self.folder = os.path.abspath(folder)
        self.manifest_file = manifest_file or manifest_path(self.folder)
        manifest = load_manifest_file(self.manifest_file, self.folder)
        kwargs.setdefault("volume_id", manifest["volume_id"])
        super().__init__(node_addresses(manifest), source, **kwargs)
        self._reload_lock = threading.Lock()
        self._reloaded_at = float("-inf")

    def _call(self, node: str, method: str, *args):
        if node not in self.addresses:
            self.reload()
        return super()._call(node, method, *args)

    def reload(self) -> bool:
        """Add the addresses of nodes the manifest names now; False when rate-limited or the
        manifest cannot be read (the call then fails with NodeNotFound, as before)."""
        now = time.monotonic()
        with self._reload_lock:
            if now - self._reloaded_at < RELOAD_INTERVAL_S:
                return False
            self._reloaded_at = now
        try:
            manifest = load_manifest_file(self.manifest_file, self.folder)
        except (ClusterError, WrongFolder) as e:  # missing, unreadable, or of the wrong shape
            log.warning("cannot re-read the cluster manifest for new node addresses: %s", e)
            return False
        for node_id, address in node_addresses(manifest).items():
            if node_id not in self.addresses:
                log.info("learned the address of node %s: %s", node_id, address)
                self.addresses[node_id] = address
        return True


def known_processes(manifest: dict) -> tuple[KnownProcess, ...]:
    """Every process a manifest names that runs or may run: active nodes, the writer (a promoted
    reader's address once one took over) and active readers."""
    nodes = tuple(KnownProcess(n["id"], "node", n["az"], n["address"]) for n in active_nodes(manifest))
    w = manifest[WRITER]
    writer = (KnownProcess(WRITER, "writer", w.get("az", WRITER_AZ_DEFAULT), w["address"]),)
    readers = tuple(KnownProcess(r["id"], "reader", r["az"], r["address"]) for r in active_readers(manifest))
    return nodes + writer + readers


class ManifestDirectory:
    """The `Directory` answer of process `me` of the cluster in `folder` (see the module
    docstring): what its manifest (or spec, `manifest_file`) names, re-read at most once per
    RELOAD_INTERVAL_S; a manifest that cannot be read keeps the last answer."""

    def __init__(self, folder: str, me: str, manifest_file: str | None = None) -> None:
        self.folder = os.path.abspath(folder)
        self.me = me
        self.manifest_file = manifest_file or manifest_path(self.folder)
        manifest = load_manifest_file(self.manifest_file, self.folder)
        self._lock = threading.Lock()
        self._answer = Directory(manifest["volume_id"], me, known_processes(manifest))
        self._read_at = time.monotonic()

    def __call__(self) -> Directory:
        now = time.monotonic()
        with self._lock:
            if now - self._read_at < RELOAD_INTERVAL_S:
                return self._answer
            self._read_at = now
            try:
                manifest = load_manifest_file(self.manifest_file, self.folder)
                self._answer = Directory(manifest["volume_id"], self.me, known_processes(manifest))
            except (ClusterError, WrongFolder, KeyError) as e:
                log.warning("cannot re-read the cluster manifest for the directory: %s", e)
            return self._answer


def run_cluster_node(
    folder: str,
    node_id: str,
    *,
    listen: str | None = None,
    durable: bool | None = None,
    gossip_interval_s: float | None = None,
    scrub_interval_s: float = 1.0,
    max_storage_bytes: int | None = None,
    reserve_bytes: int | None = None,
    metrics=None,
    manifest_file: str | None = None,
) -> int:
    """Serve node `node_id` of the cluster in `folder` until SIGTERM/SIGINT; returns an exit code.
    `metrics`: the process's (`engine.metrics`, served by the caller). `manifest_file`: a
    deployment spec (`engine.cluster.spec`; default DIR/cluster.json): the node binds its
    listen address, keeps its data under the spec's data root and presents its certificate
    from the spec's TLS folder.

    Mirrors `engine.transport.grpc_server.run_node_process`, whose gossip transport is a plain
    `GrpcTransport` fixed at start-up; this one can reach nodes added later."""
    from engine.transport.grpc_server import run_node_process

    from engine.cluster.manifest import tls_config

    folder = os.path.abspath(folder)
    manifest_file = manifest_file or manifest_path(folder)
    m = load_manifest_file(manifest_file, folder)
    n = node_entry(m, node_id)
    tls = tls_config(folder, m, node_id)  # None: an insecure cluster
    if n.get("retired"):
        raise ClusterError(f"node {node_id} was retired (replaced by {n.get('replaced_by', 'another node')}); it does not serve")
    listen = listen or listen_address(n)
    durable = m["durable"] if durable is None else durable and m["durable"]
    if gossip_interval_s is None:
        gossip_interval_s = m.get("gossip_interval_s", GOSSIP_INTERVAL_S_DEFAULT)
    if max_storage_bytes is None:  # the cluster's maximum (`cluster up --max-storage`); absent: the default
        max_storage_bytes = m.get("max_storage_bytes")
    # Before the node knows a membership (new or wiped), it gossips with every active node.
    initial = {p["id"]: p["address"] for p in active_nodes(m)}

    def transport_factory(addresses):
        transport = ManifestTransport(folder, node_id, tls=tls, manifest_file=manifest_file)
        transport.addresses.update(addresses)
        # The server put its listen address under its own id; others (and its certificate) know
        # it by its address, which a bind-all listen address ("0.0.0.0:7403") is not.
        transport.addresses[node_id] = n["address"]
        return transport

    return run_node_process(
        node_id=node_id, az=n["az"], data=data_folder(folder, m, n), listen=listen, volume_id=m["volume_id"],
        protection_groups=m["protection_groups"], peers=initial, durable=durable, gossip_interval_s=gossip_interval_s,
        scrub_interval_s=scrub_interval_s, max_storage_bytes=max_storage_bytes, reserve_bytes=reserve_bytes,
        transport_factory=transport_factory, banner=f" of cluster {folder}", tls=tls,
        allow_fault_injection=bool(m.get("allow_fault_injection", False)), metrics=metrics,
        directory=ManifestDirectory(folder, node_id, manifest_file),
    )
