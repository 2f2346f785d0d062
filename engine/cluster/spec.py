"""The deployment spec: one file naming every process of a cluster that runs on hosts of its own.

Theory of operation
-------------------
A deployment spec is a cluster manifest (`manifest.py`, checked by `schema.py`), not a second
format: the same JSON names the volume, every node (id, AZ, address, data folder), the writer
endpoint and the reader instances, their ports and the TLS material. What a spec adds is
placement (manifest format 3): a process may bind another address than the one the others dial
(`"listen": "0.0.0.0:7403"`), the nodes' data folders lie under each host's `"data_root"`, and the
TLS material is in `"tls_dir"`. Any cluster.json is a spec of a one-machine cluster; a spec named
`cluster.json` in a folder is a cluster folder that `engine.connect(folder)` and the CLI open.

One process per host: `sixfold node serve --spec FILE --id n3` (and `writer serve --spec FILE`,
`reader serve --spec FILE --id r1`) runs that one process from the spec, binding its `listen`
address (else its address) and presenting `tls_dir/<id>.pem`, whose certificate names the hosts
of its own address and listen address (`manifest.identity_hosts`), so a peer dialling
`10.0.2.11:7403` checks the name it dialled. Nothing is recorded into a spec by a serving process
(a spec is often a read-only file: a ConfigMap, a file under /etc): the writer and readers serve
at the addresses the spec names. A reader of a spec promotes itself when the writer's lease
lapses, as a launcher's does (the lease is on the nodes), and records nothing: who is the writer
is asked of the spec's writer candidates (`engine.cluster.locate`) by clients, readers and the
status view, and a spec's writer starts as a candidate that waits while another holds the lease
(`is_spec` says which manifests are specs).

Making a spec: `sixfold spec init FILE --hosts a=10.0.1.10,b=10.0.2.10,c=10.0.3.10` writes a
three-host layout (two nodes per AZ host, the writer on AZ a's host, readers on the others);
`new_spec` takes one host per process (what `cluster up --netns` uses, one namespace each).
`sixfold spec certs FILE` makes the CA and every process's certificate in `tls_dir`, to be
copied to each host; `sixfold spec check FILE` shows the processes it names.

Rules of this module: the manifest's modules and `engine.security.certs` only; it starts nothing.
"""

from __future__ import annotations

import ipaddress
import os

from engine.cluster.manifest import (
    BASE_PORT_DEFAULT,
    OPERATOR,
    PLACED_MANIFEST_FORMAT,
    READERS,
    WRITER,
    ClusterError,
    address_host,
    identity_hosts,
    identity_roles,
    is_placed,
    is_secure,
    load_manifest_file,
    manifest_format,
    new_manifest,
    tls_folder,
)
from engine.core.types import default_nodes
from engine.errors import InvalidArgument
from engine.files import atomic_write

#: Where a spec's nodes keep their data on their hosts unless told otherwise.
DATA_ROOT_DEFAULT = "/var/lib/sixfold"
#: The bind-all address a spec's processes listen on unless told otherwise (their address is
#: what certificates name and peers dial).
LISTEN_ANY = "0.0.0.0"
#: The most processes a spec names (six nodes, a writer, fifteen readers, replacements).
PROCESSES_MAX = 64


def load_spec(path: str) -> tuple[str, dict]:
    """(folder, manifest) of the spec at `path`: its folder is the one relative paths of the
    spec (users file, logs, a relative tls_dir) are taken from. ClusterError / WrongFolder when
    it is missing or of the wrong shape."""
    path = os.path.abspath(path)
    return os.path.dirname(path), load_manifest_file(path)


def is_spec(manifest: dict) -> bool:
    """True for a deployment spec: a placed manifest (format 3) that no launcher records into
    (a `cluster up --netns` folder is placed too, and its launcher records who is the writer).
    A spec's clients and readers find the writer by asking its candidates
    (`engine.cluster.locate`), since nothing in the file says who took over."""
    return is_placed(manifest) and not manifest.get("netns")


def check_host(host: str, what: str) -> str:
    """A host for an address: an IP address or a DNS name (InvalidArgument otherwise)."""
    if not isinstance(host, str) or not host or len(host) > 253 or any(c.isspace() or c in "/:@[]," for c in host):
        try:
            ipaddress.ip_address(host)
            return host
        except ValueError:
            raise InvalidArgument(f"{what}: {host!r} is not a host (an IP address or a DNS name)") from None
    return host


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def new_spec(
    node_hosts: dict[str, str],
    writer_host: str,
    reader_hosts: list[tuple[str, str]] = (),
    *,
    base_port: int = BASE_PORT_DEFAULT,
    listen_any: bool = False,
    data_root: str | None = DATA_ROOT_DEFAULT,
    tls_dir: str | None = "tls",
    **manifest_options,
) -> dict:
    """A placed manifest: node n<i> at `node_hosts[n<i>]`:base_port+i, the writer at
    `writer_host`:base_port, reader r<j> (AZ, host) at base_port+6+j. `listen_any`: every
    process binds 0.0.0.0 at its port (hosts whose address is not their own interface's, such
    as a Kubernetes pod behind a Service name). `manifest_options` go to `new_manifest`
    (protection_groups, durable, tls, tokens, metrics_port_offset...)."""
    nodes = [n.id for n in default_nodes()]
    if sorted(node_hosts) != sorted(nodes):
        raise InvalidArgument(f"a spec places every node: {', '.join(nodes)}; got {', '.join(sorted(node_hosts)) or 'none'}")
    if len(reader_hosts) > 15:
        raise InvalidArgument("a spec names at most 15 readers")
    manifest_options.setdefault("tls", True)  # off loopback a cluster is secure (grpc_server refuses plaintext there)
    m = new_manifest(base_port=base_port, **manifest_options)
    for i, n in enumerate(m["nodes"]):
        n["address"] = _address(check_host(node_hosts[n["id"]], f"node {n['id']}"), base_port + i + 1)
    m[WRITER]["address"] = _address(check_host(writer_host, "the writer"), base_port)
    azs = sorted({n["az"] for n in m["nodes"]})
    readers = []
    for j, (az, host) in enumerate(reader_hosts, start=1):
        if az not in azs:
            raise InvalidArgument(f"reader r{j}: AZ {az!r} is none of the nodes' AZs ({', '.join(azs)})")
        readers.append({"id": f"r{j}", "az": az, "address": _address(check_host(host, f"reader r{j}"), base_port + 6 + j),
                        "pid": None, "log": os.path.join("logs", f"r{j}.log")})
    if readers:
        m[READERS] = readers
    if listen_any:
        for e in (m[WRITER], *m["nodes"], *readers):
            e["listen"] = f"{LISTEN_ANY}:{e['address'].rpartition(':')[2]}"
    if data_root is not None:
        if not os.path.isabs(data_root):
            raise InvalidArgument(f"the data root must be an absolute folder (each node host's), got {data_root!r}")
        m["data_root"] = data_root
    if tls_dir is not None:
        m["tls_dir"] = tls_dir
    m["format"] = manifest_format(m)
    return m


def parse_hosts(text: str) -> dict[str, str]:
    """--hosts "a=10.0.1.10,b=10.0.2.10,c=10.0.3.10": {AZ: host}."""
    out: dict[str, str] = {}
    for item in text.split(","):
        az, sep, host = item.strip().partition("=")
        if not sep or not az or not host:
            raise InvalidArgument(f"--hosts wants AZ=HOST,..., got {item!r}")
        out[az.strip()] = check_host(host.strip(), f"AZ {az}")
    return out


def three_host_spec(hosts: dict[str, str], *, readers: int = 0, **options) -> dict:
    """One host per AZ (the three-host layout of the README): both nodes of an AZ on its host,
    the writer on AZ a's host, `readers` readers on the hosts of b and c in turn."""
    azs = sorted({n.az for n in default_nodes()})
    if sorted(hosts) != azs:
        raise InvalidArgument(f"give a host for each AZ: {', '.join(azs)}; got {', '.join(sorted(hosts)) or 'none'}")
    node_hosts = {n.id: hosts[n.az] for n in default_nodes()}
    others = [az for az in azs if az != "a"]
    reader_hosts = [(others[i % len(others)], hosts[others[i % len(others)]]) for i in range(readers)]
    return new_spec(node_hosts, hosts["a"], reader_hosts, **options)


def save_spec(path: str, manifest: dict) -> None:
    """Write a spec (atomically; 0644: it holds no secret, only the wrapped data key if any)."""
    import json

    if manifest.get("format", manifest_format(manifest)) != manifest_format(manifest):
        raise AssertionError(f"saving a spec of format {manifest.get('format')!r}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode(), mode=0o644)


def processes(manifest: dict) -> list[dict]:
    """Every process a spec names, in start order (nodes, the writer, readers): kind, id, AZ,
    address, listen and, for nodes, data."""
    out = []
    for n in manifest["nodes"]:
        if not n.get("retired"):
            out.append({"kind": "node", "id": n["id"], "az": n["az"], "address": n["address"],
                        "listen": n.get("listen") or n["address"], "data": n["data"]})
    w = manifest[WRITER]
    out.append({"kind": "writer", "id": WRITER, "az": w.get("az", "a"), "address": w["address"],
                "listen": w.get("listen") or w["address"], "data": None})
    for r in manifest.get(READERS, ()):
        if not r.get("retired"):
            out.append({"kind": "reader", "id": r["id"], "az": r["az"], "address": r["address"],
                        "listen": r.get("listen") or r["address"], "data": None})
    assert len(out) <= PROCESSES_MAX, len(out)
    return out


def hosts(manifest: dict) -> list[str]:
    """The distinct hosts a spec's processes are dialled at, in order of first mention."""
    return list(dict.fromkeys(address_host(p["address"]) for p in processes(manifest)))


def issue_certificates(folder: str, manifest: dict, *, renew: bool = False) -> list[str]:
    """The CA (if none) and a certificate for every process of the spec and the operator, each
    naming its own hosts, in the spec's tls_dir; returns the ids issued. `renew`: reissue those
    that exist too (after a host moved). ClusterError for an insecure spec."""
    if not is_secure(manifest):
        raise ClusterError("this spec is insecure (\"tls\": false): it has no certificates. Secure clusters on hosts of "
                           "their own are the only kind that listens off loopback")
    tf = tls_folder(folder, manifest)
    roles = identity_roles(manifest)
    roles.setdefault(OPERATOR, "admin")
    hosts_of = {ident: identity_hosts(manifest, ident) for ident in roles}
    if renew and tf.exists:
        for ident, role in roles.items():
            tf.issue(ident, role, hosts=hosts_of[ident])
        return list(roles)
    return tf.ensure(roles, hosts_of=hosts_of)


__all__ = ["DATA_ROOT_DEFAULT", "LISTEN_ANY", "PLACED_MANIFEST_FORMAT", "check_host", "hosts", "is_spec",
           "issue_certificates", "load_spec", "new_spec", "parse_hosts", "processes", "save_spec", "three_host_spec"]
