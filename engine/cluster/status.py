"""The status view of a cluster: every process's state and health, and what it reports.

Theory of operation
-------------------
`StatusView(supervisor).status()` asks, in parallel and each with a short deadline
(`STATUS_RPC_TIMEOUT_S`): every active node's health and, when it answers, its state (epoch,
SCLs, records, bytes, corruption and gossip counters, `NodeState` over the Storage service); and
the writer endpoint's health and, when SERVING, its status (VDL, epoch, links, PGCLs, membership,
the membership change under way; the KV `Status` RPC through `admin.WriterAdmin`); and every
reader instance's health and, when SERVING, its read point and lag behind the writer (its own
KV `Status`: `lag_lsns`, `lag_ms`, `heard_ms`; see `engine.head.replica`; a reader of a
deployment spec that took over answers a writer's status instead, `serves_as_writer`: nothing
records a spec's promotion, `engine.cluster.locate`). A process that
does not answer is shown with its health (DOWN, PAUSED, UNREACHABLE...) and the error, never
waited for beyond the deadline, so `sixfold cluster status` answers while the cluster is broken.

Every process is listed with its metrics address (`metrics`: loopback, its port plus the
manifest's metrics port offset; null with metrics off), which Prometheus scrapes over HTTP.

Each node's progress is its SCLs against the writer's PGCLs (`rebuild_progress`): `lag` (LSNs
missing, summed over PGs), `lag_max` and `rebuild.fraction`. A node with lag 0 can serve reads
at the current VDL. The result is JSON-ready.

`status_via(address, tls, token)` is the same view given only one reachable process (`sixfold
status --via HOST:PORT`): that process's `Directory` names the others (every process its
manifest or spec names: `engine.cluster.addresses.ManifestDirectory`), and each is then asked
directly, as above, health first: one that does not answer is UNREACHABLE. A node is asked
`Storage.Directory` (which needs no volume: that is how the volume is learnt), a writer or
reader `KV.Directory`; an endpoint of an older release, which has no Directory, still answers
`Status` with the nodes it knows and their addresses, and the view is built from that (an
older node has nothing to offer: give the writer's address). There is no pid to go by (the
processes may run on other hosts), so the writer's and readers' pids are what they report.
Every call speaks mutual TLS with `tls` (the caller's `--cert`) and carries `token`: a caller
with no certificate of the cluster's CA gets no answer at all.

Rules of this module: it reads (the manifest, the processes, their answers) and changes nothing.
"""

from __future__ import annotations

import os
from concurrent import futures

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine.cluster.admin import STATUS_RPC_TIMEOUT_S, WriterAdmin, operator_token
from engine.cluster.manifest import WRITER, active_nodes, active_readers, data_folder, metrics_address, node_addresses
from engine.cluster.supervisor import Supervisor
from engine.errors import SixfoldError, Unavailable
from engine.proto import common_pb2, kv_pb2_grpc, storage_pb2_grpc
from engine.security.tls import secure_channel
from engine.sizes import storage_warning
from engine.transport import convert


def rebuild_progress(scls, pgcls) -> dict:
    """A node's progress against the writer's PGCLs: `lag` (LSNs missing, summed over PGs),
    `lag_max` (the worst PG) and `rebuild.fraction` (0..1; LSN-weighted, like the embedded
    `MembershipChange.fraction`). A node with lag 0 can serve reads at the current VDL."""
    assert len(scls) == len(pgcls), (scls, pgcls)
    lags = [max(0, int(p) - int(s)) for s, p in zip(scls, pgcls)]
    want = sum(int(p) for p in pgcls)
    have = want - sum(lags)
    return {"lag": sum(lags), "lag_max": max(lags, default=0), "fraction": 1.0 if want == 0 else round(have / want, 4)}


def security(folder: str, manifest: dict) -> dict:
    """TLS on or off, encryption at rest (and the key file's path), fault injection, and one
    warning per certificate that expires within `certs.EXPIRY_WARNING_DAYS` (or a rotation left
    unfinished, or a key file others can read)."""
    from engine.cluster.manifest import is_encrypted, is_secure, tls_folder
    from engine.security.certs import EXPIRY_WARNING_DAYS, CertificateError

    out = {"tls": is_secure(manifest), "encrypted": is_encrypted(manifest),
           "allow_fault_injection": bool(manifest.get("allow_fault_injection", False)), "warnings": []}
    if out["encrypted"]:
        from engine.envelope import key_file_is_private

        out["key_file"] = manifest.get("key_file")
        if out["key_file"] and os.path.exists(out["key_file"]) and not key_file_is_private(out["key_file"]):
            out["warnings"].append(f"the key file {out['key_file']} can be read by other users (chmod 600 it)")
    if out["tls"]:
        tf = tls_folder(folder, manifest)
        try:
            out["warnings"] = tf.expiring(EXPIRY_WARNING_DAYS)
            cas = len(tf.trusted())
            out["trusted_cas"] = cas
            out["revoked"] = len(tf.revoked())
            if cas > 1:
                out["warnings"].append(f"{cas} CAs are trusted: a rotation is under way; end it with "
                                       "`sixfold certs rotate --finish` once every process runs on the new certificates")
        except (CertificateError, OSError, ValueError) as e:
            out["warnings"].append(f"cannot read the TLS material: {e}")
    return out


def node_report(transport, node_id: str) -> dict:
    """What a serving node says of itself (`NodeState` over the Storage service), as the status
    view's fields; {"error": ...} when it does not answer in time."""
    try:
        st = transport.state(node_id)
    except SixfoldError as e:
        return {"error": str(e)}
    return dict(epoch=st.epoch, scl_min=min(st.scls), scl_max=max(st.scls), scls=list(st.scls),
                records=st.records, bytes=st.bytes, corrupt_found=st.corrupt_found, repaired=st.repaired,
                rebuild=dict(st.extra.get("rebuild") or {}), used_bytes=st.used_bytes,
                capacity_bytes=st.capacity_bytes, space_low=st.space_low, room_bytes=st.room_bytes,
                max_storage_bytes=st.extra.get("max_storage_bytes"), map_bytes=st.extra.get("map_bytes"),
                storage_warning=storage_warning(node_id, st.used_bytes, st.capacity_bytes, st.space_low)
                if st.capacity_bytes else None,
                security=dict(st.extra.get("security") or {}))


def writer_report(address: str, tls, token: str | None) -> dict:
    """What a serving writer endpoint says (its KV `Status`), as the status view's fields."""
    try:
        st = WriterAdmin(address, tls, token).status(STATUS_RPC_TIMEOUT_S * 2)
    except SixfoldError as e:
        return {"error": str(e)}
    return dict(vdl=st["vdl"], epoch=st["epoch"], in_flight=st["writer"].get("in_flight"),
                links={k: v["up"] for k, v in st["writer"]["links"].items()},
                pgcl=st["writer"].get("pgcl"), membership=st["writer"].get("membership"),
                membership_change=st.get("membership_change"), auth=st["endpoint"].get("auth"),
                encrypted=st.get("encrypted", False), endpoint_pid=st["endpoint"].get("pid"))


def reader_report(address: str, tls, token: str | None) -> dict:
    """What a serving reader instance says (its KV `Status`): read point and lag."""
    try:
        st = WriterAdmin(address, tls, token).status(STATUS_RPC_TIMEOUT_S * 2)
    except SixfoldError as e:
        return {"error": str(e)}
    if st.get("reader") is None:
        # It took over: a writer now. A launcher records that (the reader is retired); nothing
        # records a deployment spec's promotion, so its reader's row says so (`serves_as_writer`).
        w = st.get("writer") or {}
        return {"serves_as_writer": not w.get("fenced"), "epoch": st.get("epoch"), "vdl": st.get("vdl"),
                "pgcl": w.get("pgcl"), "endpoint_pid": (st.get("endpoint") or {}).get("pid")}
    out = {k: st["reader"][k] for k in ("read_point", "epoch", "writer_vdl", "lag_lsns", "lag_ms", "lag_ms_p99",
                                        "heard_ms", "connected", "updates", "last_error")}
    out["endpoint_pid"] = (st.get("endpoint") or {}).get("pid")
    return out


def serving_writer_of(writer: dict, readers: list[dict]) -> dict:
    """The status of the process serving as the writer: the writer entry's, or that of a
    deployment spec's reader that took over (nothing recorded it; `reader_report`)."""
    if writer.get("pgcl"):
        return writer
    return next((r for r in readers if r.get("serves_as_writer") and r.get("pgcl")), writer)


def add_progress(nodes: list[dict], writer: dict) -> None:
    """Each answering node's lag behind the writer's PGCLs and its rebuild progress."""
    for n in nodes:
        if "scls" in n and writer.get("pgcl"):
            p = rebuild_progress(n["scls"], writer["pgcl"])
            n.update(lag=p["lag"], lag_max=p["lag_max"])
            n["rebuild"].update(fraction=p["fraction"], complete=p["lag"] == 0)


class StatusView:
    """The status of the cluster `supervisor` runs (see the module docstring)."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.sup = supervisor

    def status(self) -> dict:
        """Every process: state, health and (when reachable) epoch, SCLs, VDL; per node its lag
        behind the writer's PGCLs and its rebuild progress (see `rebuild_progress`). JSON-ready."""
        from engine.transport.grpc_client import Deadlines, GrpcTransport

        sup = self.sup
        manifest = sup.manifest
        tls = sup.tls(manifest)
        token = operator_token(sup.folder)
        transport = GrpcTransport(node_addresses(manifest), source="cli", deadlines=Deadlines(state_s=STATUS_RPC_TIMEOUT_S),
                                  tls=tls, volume_id=manifest["volume_id"])

        def node(n: dict) -> dict:
            out = {"id": n["id"], "az": n["az"], "address": n["address"], "pid": sup.live_pid(n["id"], n.get("pid")),
                   "metrics": metrics_address(manifest, n["address"]), "data": data_folder(sup.folder, manifest, n), "log": sup.path(n["log"])}
            out["health"] = sup.health(n["id"])
            if out["health"] in ("SERVING", "NOT_SERVING"):
                out.update(node_report(transport, n["id"]))
            return out

        def writer() -> dict:
            w = manifest[WRITER]
            out = {"address": w["address"], "pid": sup.live_pid(WRITER, w.get("pid")),
                   "metrics": metrics_address(manifest, w["address"]), "log": sup.path(w["log"])}
            out["health"] = sup.health(WRITER)
            if out["health"] == "SERVING":
                report = writer_report(w["address"], tls, token)
                report.pop("endpoint_pid", None)
                out.update(report)
            return out

        def reader(r: dict) -> dict:
            out = {"id": r["id"], "az": r["az"], "address": r["address"], "pid": sup.live_pid(r["id"], r.get("pid")),
                   "metrics": metrics_address(manifest, r["address"]), "log": sup.path(r["log"])}
            out["health"] = sup.health(r["id"])
            if out["health"] == "SERVING":
                report = reader_report(r["address"], tls, token)
                report.pop("endpoint_pid", None)
                out.update(report)
            return out

        readers_of = active_readers(manifest)
        try:
            with futures.ThreadPoolExecutor(max_workers=len(manifest["nodes"]) + 1 + len(readers_of)) as pool:
                w = pool.submit(writer)
                rs = [pool.submit(reader, r) for r in readers_of]
                nodes = list(pool.map(node, active_nodes(manifest)))
                w = w.result()
                readers = [f.result() for f in rs]
        finally:
            transport.close()
        add_progress(nodes, serving_writer_of(w, readers))
        out = {
            "cluster": sup.folder,
            "volume_id": manifest["volume_id"],
            "protection_groups": manifest["protection_groups"],
            "durable": manifest["durable"],
            "base_port": manifest["base_port"],
            "security": security(sup.folder, manifest),
            "nodes": nodes,
            "retired": [{"id": n["id"], "az": n["az"], "replaced_by": n.get("replaced_by")} for n in manifest["nodes"] if n.get("retired")],
            "writer": w,
            "readers": readers,
        }
        # The one status view (engine.cluster.overview): every process in one shape.
        from engine.cluster.overview import from_launcher, network_cuts

        out["processes"] = from_launcher(out, cuts=network_cuts(sup.folder) if manifest.get("netns") else None)
        return out


# --- the view from one reachable process (`sixfold status --via`) ----------------------------
#: The most processes one view asks (six nodes, one more during a change, the writer and at most
#: 15 readers fit many times over); a directory naming more is cut here, not followed.
VIA_PROCESSES_MAX = 64
#: Deadline of a health check (each a new channel with its TLS handshake, all at once: a loaded
#: machine needs more than the launcher's 0.5 s for its local children; a cut-off process costs
#: this once, in parallel with the others).
HEALTH_TIMEOUT_S = STATUS_RPC_TIMEOUT_S


def health_of(address: str, tls, timeout_s: float = HEALTH_TIMEOUT_S) -> str:
    """SERVING or NOT_SERVING as the process's health service says, UNREACHABLE when it does not
    answer (down, cut off, or it refused our certificate)."""
    with secure_channel(address, tls) as ch:
        try:
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
        except grpc.RpcError:
            return "UNREACHABLE"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def ask_directory(address: str, tls, token: str | None, timeout_s: float = STATUS_RPC_TIMEOUT_S):
    """Who the process at `address` knows (`convert.Directory`): a node's Storage.Directory, else
    an endpoint's KV.Directory, else (an endpoint of an older release) what its KV Status says.
    Sixfold errors: Unavailable when it does not answer, Unauthenticated / PermissionDenied when
    it refuses us."""
    from engine.security.users import bearer

    calls = (
        lambda ch: storage_pb2_grpc.StorageStub(ch).Directory(
            common_pb2.DirectoryRequest(), timeout=timeout_s, metadata=((convert.SOURCE_METADATA_KEY, "cli"),)),
        lambda ch: kv_pb2_grpc.KVStub(ch).Directory(
            common_pb2.DirectoryRequest(), timeout=timeout_s, metadata=bearer(token) if token else None),
    )
    with secure_channel(address, tls) as ch:
        for call in calls:  # a node has no KV service, an endpoint no Storage service
            try:
                return convert.directory_from_pb(call(ch))
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNIMPLEMENTED:
                    raise convert.error_from_rpc(e, where=address) from None
    admin = WriterAdmin(address, tls, token)
    # An endpoint of an older release: its status names the nodes it knows, and itself.
    try:
        st = admin.status(timeout_s * 2)
    except SixfoldError as e:
        raise Unavailable(f"{address} answers neither Directory nor Status (a node of a release before `status --via`? "
                          f"give --via the writer's address): {e}") from None
    nodes = tuple(convert.KnownProcess(n["id"], "node", n.get("az") or "", n["address"])
                  for n in st.get("nodes", ()) if n.get("address"))
    reader = st.get("reader")
    if reader:
        me = (convert.KnownProcess(reader["id"], "reader", reader.get("az") or "", address),)
        writer = (convert.KnownProcess(WRITER, "writer", "", reader["writer_address"]),) if reader.get("writer_address") else ()
        return convert.Directory(st["volume_id"], reader["id"], nodes + writer + me)
    return convert.Directory(st["volume_id"], WRITER, nodes + (convert.KnownProcess(WRITER, "writer", "", address),))


def status_via(address: str, *, tls=None, token: str | None = None) -> dict:
    """The status view (`StatusView.status`'s shape: nodes, writer, readers, processes) given only
    the process at `address` (see the module docstring)."""
    from engine.transport.grpc_client import Deadlines, GrpcTransport

    try:
        directory = ask_directory(address, tls, token)
    except Unavailable as e:
        hint = "" if tls is not None else " (a secure cluster answers only over mutual TLS: give --cert)"
        raise Unavailable(f"{e}{hint}") from None
    # One row per (role, id), in the order named: a directory that names a process twice (a
    # hand-edited spec, a hostile peer) does not make it two rows.
    first: dict[tuple[str, str], convert.KnownProcess] = {}
    for p in directory.processes[:VIA_PROCESSES_MAX]:
        first.setdefault((p.role, p.id), p)
    known = list(first.values())
    if not any(p.address == address for p in known):
        # A directory of its peers only (a node started with --peers) may not name the asked one.
        role = "node" if directory.me and all(p.role == "node" for p in known) else "writer"
        known.append(convert.KnownProcess(directory.me or role, role, "", address))
    nodes_of = [p for p in known if p.role == "node"]
    writers = [p for p in known if p.role == "writer"]
    readers_of = [p for p in known if p.role == "reader"]
    transport = GrpcTransport({p.id: p.address for p in nodes_of}, source="cli", deadlines=Deadlines(state_s=STATUS_RPC_TIMEOUT_S),
                              tls=tls, volume_id=directory.volume_id)

    def node(p) -> dict:
        out = {"id": p.id, "az": p.az, "address": p.address, "pid": None, "metrics": None, "health": health_of(p.address, tls)}
        if out["health"] in ("SERVING", "NOT_SERVING"):
            out.update(node_report(transport, p.id))
        return out

    def writer(p) -> dict:
        out = {"az": p.az, "address": p.address, "pid": None, "metrics": None, "health": health_of(p.address, tls)}
        if out["health"] == "SERVING":
            out.update(writer_report(p.address, tls, token))
            out["pid"] = out.pop("endpoint_pid", None)
        return out

    def reader(p) -> dict:
        out = {"id": p.id, "az": p.az, "address": p.address, "pid": None, "metrics": None, "health": health_of(p.address, tls)}
        if out["health"] == "SERVING":
            out.update(reader_report(p.address, tls, token))
            out["pid"] = out.pop("endpoint_pid", None)
        return out

    try:
        with futures.ThreadPoolExecutor(max_workers=len(known)) as pool:
            w = pool.submit(writer, writers[0]) if writers else None
            rs = [pool.submit(reader, r) for r in readers_of]
            nodes = list(pool.map(node, nodes_of))
            w = w.result() if w is not None else {"address": None, "pid": None, "metrics": None, "health": "UNKNOWN",
                                                   "error": f"{address} names no writer"}
            readers = [f.result() for f in rs]
    finally:
        transport.close()
    add_progress(nodes, serving_writer_of(w, readers))
    out = {"via": address, "volume_id": directory.volume_id, "nodes": nodes, "writer": w, "readers": readers}
    from engine.cluster.overview import from_launcher

    out["processes"] = from_launcher(out)
    return out

