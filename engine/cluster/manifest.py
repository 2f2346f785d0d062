"""The cluster manifest: `DIR/cluster.json`, what a cluster folder holds and where it runs.

Layout of a cluster folder::

    DIR/cluster.json          this manifest (written atomically; guarded by DIR/.lock)
    DIR/nodes/az-a/n1 ...     one LMDB folder per storage node
    DIR/logs/n1.log ...       stderr of each process (appended across restarts)
    DIR/logs/writer.log
    DIR/tls/                  a secure cluster's CA, certificates and revocation list
                              (engine.security.certs)
    DIR/logs/audit.jsonl      the audit log (engine.security.audit)
    DIR/users.json            client users: token digests and roles (0600; engine.security.users)
    DIR/operator.token        the local operator's admin token (0600), made by `cluster up`

The manifest names the volume (id, geometry), every node (id, AZ, address, pid, data folder,
log) and the writer endpoint (address, pid, log). Paths are relative to DIR, so a stopped
cluster folder can be moved (the one absolute path, an encrypted cluster's key file, names a
file that belongs outside the folder). Ports: the writer endpoint listens on `base_port`, node n<i> on
`base_port + i` (7400 and 7401..7406 by default).

Membership changes (`sixfold node replace`) add entries: a new node gets the next free port
above every port the manifest names, a folder in its AZ and `"replaces": "<old>"`; when the
change completes the old node's entry stays, marked `"retired": true, "replaced_by": "<new>"`
(if it is reverted, the new node is the one retired). Retired nodes are never started again and
are left out of `active_nodes`, which is what the launcher, the writer endpoint and the nodes'
peer lists use. Entries are never removed, so a port or an id is never reused.

Security: `"tls": true` (what `sixfold cluster up` writes unless `--insecure`) makes every process
serve and call over mutual TLS with its certificate from `DIR/tls/` (`tls_config`); a manifest
without the field (written before it existed) or with `false` is an insecure cluster: plaintext,
no authorisation. `"allow_fault_injection": true` (`--allow-fault-injection`) lets nodes serve
`Corrupt` and `SetFaults`, to the admin role only; without it they do not exist.

Client authentication: `"users_file"` names the users file (relative to DIR) whose tokens the
writer endpoint requires on every KV call; `null` turns the check off (a throwaway cluster, by
hand). A manifest without the field (written before it existed) means the folder's `users.json`:
authentication is on, and `cluster up` makes the operator's admin token if there is none, so an
old cluster restarted by this release is protected at once. A writer started on such a folder
before `cluster up` ran refuses every call until a users file exists (fail closed).

Encryption at rest: `"encryption"` (what `sixfold cluster up --encrypt --key-file F` writes) is
the volume's envelope descriptor (`engine.envelope.new_descriptor`: the data key, wrapped by the
master key), and `"key_file"` the absolute path of the master key's file, which the launcher
passes to the writer endpoint (`writer serve --key-file F`) each time it starts it. The key itself
is never in the manifest, nor anywhere in the cluster folder unless the operator puts it there.
Only the writer endpoint unwraps the data key; nodes see ciphertext and keyed hashes.

Reader instances (`engine.head.replica`; `cluster up --readers N`, `reader add|remove`):
`"readers"` lists them, each with an id (r1, r2 ...), an AZ, an address, a pid and a log, like
the writer's entry; a removed reader stays, marked `"retired": true`, so an id or port is never
reused. A new reader's port is the next free one above every port the manifest names; its AZ,
unless given, is the AZ other than the writer's ("a") that has the fewest readers, b before c.
A manifest without the field (written before readers existed) has none; in a secure cluster each
reader gets a certificate of role `reader` under its id. `active_readers` leaves out the retired.

Storage maximum: `"max_storage_bytes"` (`cluster up --max-storage 10GiB`) is the most each node's
data may take (its LMDB map grows up to it; engine.node.growth); each node process reads it when
it starts, so a new value applies to the nodes started from then on. A manifest without the field
(written before it existed, or never given one) means the nodes' default (32 GiB). An additive
field, no new format: a release that knows no maximum ignores it and runs its nodes with its own
fixed map, which is what it did before.

Metrics (`engine.metrics`): every process serves Prometheus metrics over plaintext HTTP on
loopback, on its gRPC port plus `"metrics_port_offset"` (default 1000: the writer endpoint on
8400, nodes on 8401..8406, a reader at 7407 on 8407); `null` turns them off. Chosen when the
cluster is created (`cluster up --metrics-port-offset N`, `--no-metrics`; to change it, edit the
field while the cluster is down). The offset, not a
port per entry, so that a promoted reader's metrics, now the writer's entry, follow its address.
A manifest without the field (written before metrics) means the default: an additive field, no
new format (an older release ignores it and serves no metrics). Ports for new readers and nodes
are chosen so that neither the gRPC port nor its metrics port is any port the manifest names.

Placement (a deployment spec, `engine.cluster.spec`): a manifest may also say where each process
runs when the processes are on hosts of their own. `"listen"` on a process entry is the address it
binds ("0.0.0.0:7403", a pod's or a namespace's address) when that differs from `"address"`, the
one the others dial (and which its certificate names); `"data_root"` is the absolute folder on
each node's host under which the nodes' relative `data` paths lie (default: the manifest's
folder); `"tls_dir"` is the folder of the TLS material (ca.pem, <id>.pem; absolute, or relative
to the manifest's folder; default "tls"). A manifest that uses any of them is format
`PLACED_MANIFEST_FORMAT` (3), encrypted or not: a release from before placement would otherwise
ignore `data_root` and start an empty node in the wrong folder, so it must refuse the file as
newer instead. A manifest without them keeps format 1 or 2, so a single-machine cluster folder
stays readable by the releases before this one.

Format: a plain cluster's manifest records `"format": PLAIN_MANIFEST_FORMAT` (1), an encrypted
one's `ENCRYPTED_MANIFEST_FORMAT` (2), as an embedded volume.json does: a release from before
encryption reads format 1 only, so it refuses an encrypted cluster as "written by a newer
release" rather than start its writer and serve ciphertext as values. A placed manifest is
format 3 (above); this release reads 0..3 and writes the lowest format that says what the
manifest holds. `load_manifest` refuses a
format above MANIFEST_FORMAT with a message naming it, and accepts a manifest written before the
field existed (format 0, otherwise format 1): the field is added in memory and so written by the
next save. The schema (`engine.cluster.schema`) ties the format to the encryption field.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import uuid
from collections.abc import Iterator

from engine.core.types import Geometry, NodeInfo, default_nodes
from engine.formats import format_of
from engine.errors import GeometryMismatch, InvalidArgument, SixfoldError
from engine.files import atomic_write

MANIFEST_FILE = "cluster.json"
LOCK_FILE = ".lock"
#: The newest cluster.json format this release reads. 1: a plain cluster (0: the same without a
#: "format" field). 2: an encrypted cluster (an "encryption" field). 3: a placed cluster
#: (processes on hosts of their own: "listen", "data_root" or "tls_dir"), encrypted or not. See
#: the module docstring.
MANIFEST_FORMAT = 3
PLAIN_MANIFEST_FORMAT = 1
ENCRYPTED_MANIFEST_FORMAT = 2
PLACED_MANIFEST_FORMAT = 3
#: The fields that make a manifest a placed one (format 3).
PLACEMENT_FIELDS = ("data_root", "tls_dir")
TLS_DIR_DEFAULT = "tls"
BASE_PORT_DEFAULT = 7400
HOST_DEFAULT = "127.0.0.1"
WRITE_TIMEOUT_S_DEFAULT = 5.0
#: Gossip rounds of cluster nodes. Each round costs a State RPC to every peer (and fetches when
#: behind), about a millisecond of CPU on both ends in Python gRPC: the embedded 0.2 s would
#: spend a good part of a core on polling alone across six processes. The writer still sends
#: every record to every node; gossip only fills holes, so a slower round costs repair latency
#: only.
GOSSIP_INTERVAL_S_DEFAULT = 1.0
WRITER = "writer"
#: Metrics ports: each process's gRPC port plus this (see the module docstring).
METRICS_PORT_OFFSET_DEFAULT = 1000
#: The users file a manifest names when it names none (see the module docstring).
USERS_FILE_DEFAULT = "users.json"
AUDIT_LOG = os.path.join("logs", "audit.jsonl")


class ClusterError(SixfoldError):
    """A cluster folder or one of its processes is not in the state an operation needs (no
    manifest, a busy port, a process that died or did not become healthy in time...). Raised by
    the launcher only; it never crosses gRPC."""

    GRPC_STATUS = "FAILED_PRECONDITION"


def manifest_path(folder: str) -> str:
    return os.path.join(folder, MANIFEST_FILE)


def new_manifest(
    *,
    base_port: int = BASE_PORT_DEFAULT,
    protection_groups: int | None = None,
    durable: bool = True,
    write_timeout_s: float = WRITE_TIMEOUT_S_DEFAULT,
    gossip_interval_s: float = GOSSIP_INTERVAL_S_DEFAULT,
    host: str = HOST_DEFAULT,
    volume_id: str | None = None,
    tls: bool = False,
    allow_fault_injection: bool = False,
    master_key: bytes | None = None,
    key_file: str | None = None,
    tokens: bool = True,
    metrics_port_offset: int | None = METRICS_PORT_OFFSET_DEFAULT,
) -> dict:
    """A manifest for a new cluster (nothing started yet). `tls` False is an insecure cluster
    (`Supervisor.up` asks for a secure one unless told `insecure`). With `master_key` (and the
    `key_file` it was read from) the volume is encrypted: a new data key, wrapped by it.
    `metrics_port_offset` None: no process serves metrics."""
    geometry = Geometry(protection_groups) if protection_groups is not None else Geometry()
    nodes = list(default_nodes())
    if not 1 <= base_port <= 65535 - len(nodes):
        raise InvalidArgument(f"base port {base_port} leaves no room for {len(nodes)} node ports above it")
    check_metrics_port_offset(metrics_port_offset, base_port + len(nodes))
    volume_id = volume_id or str(uuid.uuid4())
    m = {
        "format": PLAIN_MANIFEST_FORMAT if master_key is None else ENCRYPTED_MANIFEST_FORMAT,
        "volume_id": volume_id,
        "protection_groups": geometry.protection_groups,
        "durable": bool(durable),
        "write_timeout_s": float(write_timeout_s),
        "gossip_interval_s": float(gossip_interval_s),
        "host": host,
        "base_port": base_port,
        "tls": bool(tls),
        "allow_fault_injection": bool(allow_fault_injection),
        "nodes": [
            {
                "id": n.id,
                "az": n.az,
                "address": f"{host}:{base_port + i + 1}",
                "pid": None,
                "data": os.path.join("nodes", f"az-{n.az}", n.id),
                "log": os.path.join("logs", f"{n.id}.log"),
            }
            for i, n in enumerate(nodes)
        ],
        WRITER: {"address": f"{host}:{base_port}", "pid": None, "log": os.path.join("logs", "writer.log")},
        "users_file": USERS_FILE_DEFAULT if tokens else None,
        "metrics_port_offset": metrics_port_offset,
    }
    if master_key is not None:
        from engine.envelope import new_descriptor

        assert key_file is not None, "an encrypted cluster records its key file's path"
        m["encryption"] = new_descriptor(master_key, volume_id)
        m["key_file"] = os.path.abspath(key_file)
    return m


def load_manifest(folder: str) -> dict:
    """Read DIR/cluster.json; ClusterError when there is none or it is unreadable."""
    return load_manifest_file(manifest_path(folder), folder)


def load_manifest_file(path: str, folder: str | None = None) -> dict:
    """Read a manifest from `path` (DIR/cluster.json, or a deployment spec of any name:
    `engine.cluster.spec`), check its shape and version; ClusterError when there is none or it
    is unreadable. `folder` only words the message of a missing DIR/cluster.json."""
    try:
        with open(path) as fh:
            manifest = json.load(fh)
    except FileNotFoundError:
        if folder is None:
            raise ClusterError(f"there is no manifest or deployment spec at {path}") from None
        raise ClusterError(f"{folder} is not a cluster folder (no {MANIFEST_FILE}); create one with `sixfold cluster up --cluster {folder}`") from None
    except (OSError, ValueError) as e:
        raise ClusterError(f"cannot read {path}: {e}") from None
    if not isinstance(manifest, dict):
        raise ClusterError(f"{path} is not a cluster manifest (it holds a JSON {type(manifest).__name__}, not an object)")
    from engine.cluster.schema import validate_manifest

    validate_manifest(manifest, path, format_max=MANIFEST_FORMAT)  # WrongFolder naming the field, never a KeyError later
    fmt = format_of(manifest, MANIFEST_FORMAT, path, "cluster was set up", ClusterError)
    if fmt < PLAIN_MANIFEST_FORMAT:
        # Format 0 is format 1 without the field: the next save writes it (a reader never writes).
        manifest["format"] = PLAIN_MANIFEST_FORMAT
    return manifest


def save_manifest(folder: str, manifest: dict) -> None:
    """Write the manifest atomically and durably (`engine.files.atomic_write`: temporary file,
    fsync, rename, fsync of the folder), in the format its encryption field calls for."""
    want = manifest_format(manifest)
    had = manifest.get("format", want)
    # Placement may be added to a cluster (format 1 or 2 becomes 3) or taken away (3 becomes 1
    # or 2); whether it is encrypted never changes in place, and load refuses other formats.
    if had != want and PLACED_MANIFEST_FORMAT not in (had, want):
        raise AssertionError(f"saving a manifest of format {manifest.get('format')!r}")
    manifest["format"] = want
    os.makedirs(folder, exist_ok=True)
    atomic_write(manifest_path(folder), (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())


@contextlib.contextmanager
def locked(folder: str) -> Iterator[None]:
    """Hold the folder's lock (concurrent `sixfold` commands edit the manifest one at a time)."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, LOCK_FILE), "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def check_compatible(manifest: dict, *, protection_groups: int | None, base_port: int | None) -> None:
    """An existing cluster keeps its geometry and ports."""
    if protection_groups is not None and protection_groups != manifest["protection_groups"]:
        raise GeometryMismatch(
            f"this cluster's volume has {manifest['protection_groups']} protection groups; asked for {protection_groups}. "
            "Leave --protection-groups out, or use another folder."
        )
    if base_port is not None and base_port != manifest["base_port"]:
        raise ClusterError(
            f"this cluster was created with base port {manifest['base_port']}; asked for {base_port}. "
            "Leave --base-port out, or use another folder."
        )


def node_entry(manifest: dict, node_id: str) -> dict:
    for n in manifest["nodes"]:
        if n["id"] == node_id:
            return n
    raise ClusterError(f"no node {node_id!r} in this cluster; nodes are {', '.join(n['id'] for n in manifest['nodes'])}")


def active_nodes(manifest: dict) -> list[dict]:
    """The entries of nodes that hold (or are joining to hold) segments: all but the retired."""
    return [n for n in manifest["nodes"] if not n.get("retired")]


def node_infos(manifest: dict) -> tuple[NodeInfo, ...]:
    return tuple(NodeInfo(n["id"], n["az"]) for n in active_nodes(manifest))


def node_addresses(manifest: dict) -> dict[str, str]:
    """Every node's address, retired ones included (a caller may still name one)."""
    return {n["id"]: n["address"] for n in manifest["nodes"]}


def used_ports(manifest: dict) -> set[int]:
    """Every gRPC port the manifest names (retired processes included: ports are never reused)."""
    ports = {int(manifest[WRITER]["address"].rpartition(":")[2])}
    ports.update(int(n["address"].rpartition(":")[2]) for n in manifest["nodes"])
    ports.update(int(r["address"].rpartition(":")[2]) for r in manifest.get(READERS, ()))
    return ports


# --- metrics ports ----------------------------------------------------------------------------
def check_metrics_port_offset(offset: int | None, highest_port: int) -> int | None:
    """A metrics port offset (None: metrics off) that keeps `highest_port` + offset a port."""
    if offset is None:
        return None
    if isinstance(offset, bool) or not isinstance(offset, int) or not 1 <= offset <= 65535 - highest_port:
        raise InvalidArgument(f"metrics port offset {offset!r}: give a whole number in 1..{65535 - highest_port}, so that "
                              f"every process's port plus it (up to {highest_port} + offset) is a port")
    return offset


def metrics_port_offset(manifest: dict) -> int | None:
    """The manifest's metrics port offset; None: metrics off (see the module docstring)."""
    return manifest.get("metrics_port_offset", METRICS_PORT_OFFSET_DEFAULT)


def metrics_port(manifest: dict, address: str) -> int | None:
    """The metrics port of the process that listens on `address` (None: metrics off, or a manifest
    of before metrics whose port plus the default offset is no port)."""
    offset = metrics_port_offset(manifest)
    if offset is None:
        return None
    port = int(address.rpartition(":")[2]) + offset
    return port if port <= 65535 else None


def metrics_address(manifest: dict, address: str) -> str | None:
    """Where the process that listens on `address` serves its metrics ("127.0.0.1:8401"), or None."""
    from engine.metrics import METRICS_HOST

    port = metrics_port(manifest, address)
    return None if port is None else f"{METRICS_HOST}:{port}"


def used_metrics_ports(manifest: dict) -> set[int]:
    """The metrics ports of every process the manifest names (empty with metrics off)."""
    offset = metrics_port_offset(manifest)
    return set() if offset is None else {p + offset for p in used_ports(manifest) if p + offset <= 65535}


def port_clashes(manifest: dict, port: int) -> bool:
    """True when a new process at `port` would share a gRPC or metrics port with one the manifest
    names, or its metrics port would be out of range."""
    taken = used_ports(manifest) | used_metrics_ports(manifest)
    offset = metrics_port_offset(manifest)
    return port in taken or (offset is not None and (port + offset > 65535 or port + offset in taken))


# --- reader instances -----------------------------------------------------------------------
READERS = "readers"
#: The most reader instances a cluster runs at once (engine.head.replica.READERS_MAX).
READERS_MAX = 15
#: The AZ of the writer endpoint (the manifest's writer entry may name another: "az").
WRITER_AZ_DEFAULT = "a"


def active_readers(manifest: dict) -> list[dict]:
    """The reader entries that run (or are to run): all but the removed ones."""
    return [r for r in manifest.get(READERS, ()) if not r.get("retired")]


def reader_entry(manifest: dict, reader_id: str) -> dict:
    for r in manifest.get(READERS, ()):
        if r["id"] == reader_id:
            return r
    known = ", ".join(r["id"] for r in active_readers(manifest)) or "none"
    raise ClusterError(f"no reader {reader_id!r} in this cluster; readers are {known}")


def is_reader(manifest: dict, name: str) -> bool:
    return any(r["id"] == name for r in manifest.get(READERS, ()))


def next_reader_az(manifest: dict) -> str:
    """The AZ for a new reader: of the nodes' AZs other than the writer's, the one with the
    fewest active readers (ties in AZ order: b before c); the writer's AZ if it is the only one."""
    writer_az = manifest[WRITER].get("az", WRITER_AZ_DEFAULT)
    azs = sorted({n["az"] for n in active_nodes(manifest)})
    others = [az for az in azs if az != writer_az] or azs
    count = {az: 0 for az in others}
    for r in active_readers(manifest):
        if r["az"] in count:
            count[r["az"]] += 1
    return min(others, key=lambda az: (count[az], az))


def add_reader_entry(manifest: dict, az: str | None, port: int) -> dict:
    """Add a reader (not started) to the manifest, with the next id; returns its entry."""
    if len(active_readers(manifest)) >= READERS_MAX:
        raise ClusterError(f"this cluster runs {READERS_MAX} readers already (the most it may); remove one first")
    assert port not in used_ports(manifest), port
    taken = {r["id"] for r in manifest.get(READERS, ())} | {n["id"] for n in manifest["nodes"]}
    i = 1
    while f"r{i}" in taken:
        i += 1
    entry = {
        "id": f"r{i}",
        "az": az or next_reader_az(manifest),
        "address": f"{manifest.get('host', HOST_DEFAULT)}:{port}",
        "pid": None,
        "log": os.path.join("logs", f"r{i}.log"),
    }
    manifest.setdefault(READERS, []).append(entry)
    return entry


def add_node_entry(manifest: dict, node_id: str, az: str, port: int, replaces: str) -> dict:
    """Add a node (not started) to the manifest; returns its entry."""
    assert all(n["id"] != node_id for n in manifest["nodes"]), node_id
    assert port not in used_ports(manifest), port
    entry = {
        "id": node_id,
        "az": az,
        "address": f"{manifest.get('host', HOST_DEFAULT)}:{port}",
        "pid": None,
        "data": os.path.join("nodes", f"az-{az}", node_id),
        "log": os.path.join("logs", f"{node_id}.log"),
        "replaces": replaces,
    }
    manifest["nodes"].append(entry)
    return entry


#: The identity of the launcher, the CLI and `engine.connect(cluster_folder)` (role admin).
OPERATOR = "admin"


def is_encrypted(manifest: dict) -> bool:
    """True for a cluster whose volume is encrypted at rest (an "encryption" field)."""
    return manifest.get("encryption") is not None


def is_placed(manifest: dict) -> bool:
    """True for a manifest that places processes on hosts of their own (see the module
    docstring): a data root, a TLS folder, or a process that binds another address than it is
    dialled at."""
    if any(manifest.get(f) is not None for f in PLACEMENT_FIELDS):
        return True
    entries = [manifest[WRITER], *manifest["nodes"], *manifest.get(READERS, ())]
    return any(e.get("listen") is not None for e in entries)


def manifest_format(manifest: dict) -> int:
    """The format a manifest is written in: the lowest that says what it holds (placement,
    then encryption; see the module docstring)."""
    if is_placed(manifest):
        return PLACED_MANIFEST_FORMAT
    return ENCRYPTED_MANIFEST_FORMAT if is_encrypted(manifest) else PLAIN_MANIFEST_FORMAT


def listen_address(entry: dict) -> str:
    """The address a process binds: its `listen`, else the address the others dial."""
    return entry.get("listen") or entry["address"]


def address_host(address: str) -> str:
    """The host of "host:port" ("[::1]:7401" gives "::1")."""
    host = address.rpartition(":")[0]
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


#: Bind-all hosts: no certificate names them.
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def identity_hosts(manifest: dict, ident: str) -> tuple[str, ...]:
    """The hosts a certificate of `ident` must name: its own address's host and (unless a
    wildcard) its listen host. The writer's names the hosts of every reader too, since a reader
    that takes over as the writer serves the writer's certificate at its own address. Other
    identities (the operator, clients) name none beyond the defaults."""
    entries: list[dict] = []
    if ident == WRITER:
        entries = [manifest[WRITER], *manifest.get(READERS, ())]
    else:
        entries = [e for e in (*manifest["nodes"], *manifest.get(READERS, ())) if e["id"] == ident]
    hosts: list[str] = []
    for e in entries:
        for address in (e["address"], e.get("listen")):
            if address is None:
                continue
            host = address_host(address)
            if host not in WILDCARD_HOSTS and host not in hosts:
                hosts.append(host)
    return tuple(hosts)


def data_folder(folder: str, manifest: dict, entry: dict) -> str:
    """The absolute data folder of a node entry: under the manifest's `data_root` when it has
    one (each host's own folder), else under the manifest's folder."""
    root = manifest.get("data_root") or folder
    return os.path.join(os.path.abspath(root), entry["data"])


def tls_path(folder: str, manifest: dict) -> str:
    """The absolute folder of the cluster's TLS material (`tls_dir`, default DIR/tls)."""
    return os.path.join(os.path.abspath(folder), manifest.get("tls_dir") or TLS_DIR_DEFAULT)


def is_secure(manifest: dict) -> bool:
    """True for a TLS cluster; a manifest without the field predates TLS: insecure."""
    return bool(manifest.get("tls", False))


def identity_roles(manifest: dict) -> dict[str, str]:
    """{identity: role} of every process a secure cluster runs (retired nodes left out)."""
    out = {n["id"]: "node" for n in active_nodes(manifest)}
    out.update({r["id"]: "reader" for r in active_readers(manifest)})
    out[WRITER] = "writer"
    out[OPERATOR] = "admin"
    return out


def tls_folder(folder: str, manifest: dict):
    from engine.security.certs import TlsFolder

    return TlsFolder(folder, manifest["volume_id"], path=tls_path(folder, manifest))


def tls_config(folder: str, manifest: dict, identity: str = OPERATOR):
    """The `TlsConfig` of `identity` in a secure cluster, None in an insecure one."""
    if not is_secure(manifest):
        return None
    from engine.security.tls import TlsConfig

    return TlsConfig(tls_path(folder, manifest), identity, manifest["volume_id"])


def users_file(manifest: dict, folder: str) -> str | None:
    """The absolute path of the users file the writer endpoint checks tokens against, or None
    when the manifest turned authentication off (see the module docstring)."""
    relative = manifest.get("users_file", USERS_FILE_DEFAULT)
    return None if relative is None else os.path.join(os.path.abspath(folder), relative)


def endpoint_config(manifest: dict, folder: str | None = None):
    """The writer endpoint's configuration for this cluster (with `folder`, its users file and
    audit log too)."""
    from engine.head.endpoint import EndpointConfig

    auth = {}
    if folder is not None:
        auth = dict(users_file=users_file(manifest, folder), audit_log=os.path.join(os.path.abspath(folder), AUDIT_LOG))
    return EndpointConfig(
        volume_id=manifest["volume_id"],
        protection_groups=manifest["protection_groups"],
        nodes=node_infos(manifest),
        addresses=node_addresses(manifest),
        durable=manifest["durable"],
        write_timeout_s=manifest.get("write_timeout_s", WRITE_TIMEOUT_S_DEFAULT),
        **auth,
        encryption=manifest.get("encryption"),
        backup=(manifest.get("backup") or {}).get("target"),
        backup_retention_days=(manifest.get("backup") or {}).get("retention_days"),
    )
