"""The status view of a cluster: every process's state and health, and what it reports.

Theory of operation
-------------------
`StatusView(supervisor).status()` asks, in parallel and each with a short deadline
(`STATUS_RPC_TIMEOUT_S`): every active node's health and, when it answers, its state (epoch,
SCLs, records, bytes, corruption and gossip counters, `NodeState` over the Storage service); and
the writer endpoint's health and, when SERVING, its status (VDL, epoch, links, PGCLs, membership,
the membership change under way; the KV `Status` RPC through `admin.WriterAdmin`); and every
reader instance's health and, when SERVING, its read point and lag behind the writer (its own
KV `Status`: `lag_lsns`, `lag_ms`, `heard_ms`; see `engine.head.replica`). A process that
does not answer is shown with its health (DOWN, PAUSED, UNREACHABLE...) and the error, never
waited for beyond the deadline, so `sixfold cluster status` answers while the cluster is broken.

Every process is listed with its metrics address (`metrics`: loopback, its port plus the
manifest's metrics port offset; null with metrics off), which Prometheus scrapes over HTTP.

Each node's progress is its SCLs against the writer's PGCLs (`rebuild_progress`): `lag` (LSNs
missing, summed over PGs), `lag_max` and `rebuild.fraction`. A node with lag 0 can serve reads
at the current VDL. The result is JSON-ready.

Rules of this module: it reads (the manifest, the processes, their answers) and changes nothing.
"""

from __future__ import annotations

import os
from concurrent import futures

from engine.cluster.admin import STATUS_RPC_TIMEOUT_S, WriterAdmin, operator_token
from engine.cluster.manifest import WRITER, active_nodes, active_readers, data_folder, metrics_address, node_addresses
from engine.cluster.supervisor import Supervisor
from engine.errors import SixfoldError
from engine.sizes import storage_warning


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
        transport = GrpcTransport(node_addresses(manifest), source="cli", deadlines=Deadlines(state_s=STATUS_RPC_TIMEOUT_S),
                                  tls=tls, volume_id=manifest["volume_id"])

        def node(n: dict) -> dict:
            out = {"id": n["id"], "az": n["az"], "address": n["address"], "pid": sup.live_pid(n["id"], n.get("pid")),
                   "metrics": metrics_address(manifest, n["address"]), "data": data_folder(sup.folder, manifest, n), "log": sup.path(n["log"])}
            out["health"] = sup.health(n["id"])
            if out["health"] in ("SERVING", "NOT_SERVING"):
                try:
                    st = transport.state(n["id"])
                    out.update(epoch=st.epoch, scl_min=min(st.scls), scl_max=max(st.scls), scls=list(st.scls),
                               records=st.records, bytes=st.bytes, corrupt_found=st.corrupt_found, repaired=st.repaired,
                               rebuild=dict(st.extra.get("rebuild") or {}), used_bytes=st.used_bytes,
                               capacity_bytes=st.capacity_bytes, space_low=st.space_low, room_bytes=st.room_bytes,
                               max_storage_bytes=st.extra.get("max_storage_bytes"), map_bytes=st.extra.get("map_bytes"),
                               storage_warning=storage_warning(n["id"], st.used_bytes, st.capacity_bytes, st.space_low)
                               if st.capacity_bytes else None,
                               security=dict(st.extra.get("security") or {}))
                except SixfoldError as e:
                    out["error"] = str(e)
            return out

        def writer() -> dict:
            w = manifest[WRITER]
            out = {"address": w["address"], "pid": sup.live_pid(WRITER, w.get("pid")),
                   "metrics": metrics_address(manifest, w["address"]), "log": sup.path(w["log"])}
            out["health"] = sup.health(WRITER)
            if out["health"] == "SERVING":
                try:
                    st = WriterAdmin(w["address"], tls, operator_token(sup.folder)).status(STATUS_RPC_TIMEOUT_S * 2)
                    out.update(vdl=st["vdl"], epoch=st["epoch"], in_flight=st["writer"].get("in_flight"),
                               links={k: v["up"] for k, v in st["writer"]["links"].items()},
                               pgcl=st["writer"].get("pgcl"), membership=st["writer"].get("membership"),
                               membership_change=st.get("membership_change"), auth=st["endpoint"].get("auth"),
                               encrypted=st.get("encrypted", False))
                except SixfoldError as e:
                    out["error"] = str(e)
            return out

        def reader(r: dict) -> dict:
            out = {"id": r["id"], "az": r["az"], "address": r["address"], "pid": sup.live_pid(r["id"], r.get("pid")),
                   "metrics": metrics_address(manifest, r["address"]), "log": sup.path(r["log"])}
            out["health"] = sup.health(r["id"])
            if out["health"] == "SERVING":
                try:
                    st = WriterAdmin(r["address"], tls, operator_token(sup.folder)).status(STATUS_RPC_TIMEOUT_S * 2)
                    out.update({k: st["reader"][k] for k in ("read_point", "epoch", "writer_vdl", "lag_lsns", "lag_ms",
                                                             "lag_ms_p99", "heard_ms", "connected", "updates", "last_error")})
                except SixfoldError as e:
                    out["error"] = str(e)
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
        for n in nodes:
            if "scls" in n and w.get("pgcl"):
                p = rebuild_progress(n["scls"], w["pgcl"])
                n.update(lag=p["lag"], lag_max=p["lag_max"])
                n["rebuild"].update(fraction=p["fraction"], complete=p["lag"] == 0)
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
