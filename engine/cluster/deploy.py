"""Deployments rendered from a spec: Kubernetes manifests and systemd units (`sixfold deploy ...`).

Theory of operation
-------------------
Sixfold runs one process per host from a deployment spec (`engine.cluster.spec`); it never
schedules or supervises processes across machines itself. Kubernetes or systemd does that, and
this module writes what they read, from the spec, so that the addresses, ports, ids and AZs they
name are the spec's and nothing is typed twice:

* `kubernetes_spec(namespace)`: a spec whose addresses are Kubernetes names: node n<i> is pod
  `sixfold-n<i>-0` of its own StatefulSet behind the headless Service `sixfold-nodes`
  (`sixfold-n3-0.sixfold-nodes.NS.svc.cluster.local:7403`), the writer and each reader a
  Service of their own. Every process binds 0.0.0.0 at its port; its certificate names its
  Service name (the address peers dial) and 127.0.0.1 (what its readiness probe dials).
* `render_kubernetes(spec, ...)`: the objects, as dicts: a ConfigMap with the spec; the headless
  Service (publishing not-ready addresses, since nodes must gossip before they are SERVING);
  one StatefulSet per node (one replica, a PersistentVolumeClaim for its data folder, required
  node affinity to its zone's `topology.kubernetes.io/zone` and preferred anti-affinity to the
  other node of its zone, so the two pods of a zone land on two machines); one
  PodDisruptionBudget per AZ (maxUnavailable 1: a drain never takes both nodes of a zone, so
  a write quorum of 4/6 survives a zone loss during maintenance); the writer as a Deployment
  (one replica, Recreate) with a Service; each reader as a Deployment with a Service.
  Certificates come from the Secret `sixfold-tls` (each pod mounts the bundle and its own
  identity file only), the users file and the operator token from the Secret `sixfold-auth`.
  Readiness is the gRPC health service, asked over mutual TLS by `sixfold spec health` (an
  exec probe: the kubelet's own gRPC probe speaks no TLS).
* `to_yaml(objects)`: YAML documents (strings double-quoted, JSON-style, so nothing is read as
  a number or a boolean by accident).
* `render_systemd(spec_path, kind)`: a unit per process kind (`sixfold-node@.service` with
  the node id as its instance, `sixfold-writer.service`, `sixfold-reader@.service`).

Rules of this module: standard library and the manifest's modules only; values in, text or
dicts out. It starts nothing and talks to no cluster; `tests/test_deploy.py` validates what it
renders against the Kubernetes schemas offline (`kubernetes-validate`).
"""

from __future__ import annotations

import json
import re

from engine.cluster.manifest import WRITER, address_host
from engine.cluster.spec import new_spec, processes
from engine.core.types import default_nodes
from engine.errors import InvalidArgument

APP = "sixfold"
NODES_SERVICE = "sixfold-nodes"
SPEC_CONFIGMAP = "sixfold-spec"
TLS_SECRET = "sixfold-tls"
AUTH_SECRET = "sixfold-auth"
#: Where the pods find the spec and their state folder (an emptyDir: logs, audit log).
CONFIG_DIR = "/etc/sixfold"
SPEC_PATH = f"{CONFIG_DIR}/cluster.json"
TLS_DIR = f"{CONFIG_DIR}/tls"
DATA_ROOT = "/var/lib/sixfold"
ZONE_LABEL = "topology.kubernetes.io/zone"
IMAGE_DEFAULT = "sixfold:latest"
STORAGE_DEFAULT = "10Gi"
#: Kubernetes object names (RFC 1123 labels) and namespaces.
K8S_NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
QUANTITY_RE = re.compile(r"[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?")


def _k8s_name(value: str, what: str) -> str:
    if not isinstance(value, str) or not K8S_NAME_RE.fullmatch(value):
        raise InvalidArgument(f"{what} {value!r} is not a Kubernetes name (lower-case letters, digits and -, at most 63)")
    return value


def node_pod(node_id: str) -> str:
    """The pod of node `node_id`: replica 0 of its own StatefulSet."""
    return f"{APP}-{node_id.lower()}-0"


def kubernetes_spec(namespace: str, *, readers: int = 0, domain: str = "cluster.local", **options) -> dict:
    """A spec for Kubernetes (see the module docstring): Service names as addresses, 0.0.0.0 as
    every listen address, data under DATA_ROOT, TLS material in TLS_DIR."""
    _k8s_name(namespace, "namespace")
    if not re.fullmatch(r"[a-z0-9.-]{1,200}", domain):
        raise InvalidArgument(f"cluster domain {domain!r} is not a DNS domain")
    node_hosts = {n.id: f"{node_pod(n.id)}.{NODES_SERVICE}.{namespace}.svc.{domain}" for n in default_nodes()}
    azs = sorted({n.az for n in default_nodes()})
    others = [az for az in azs if az != "a"]
    reader_hosts = [(others[(j - 1) % len(others)], f"{APP}-r{j}.{namespace}.svc.{domain}") for j in range(1, readers + 1)]
    # tls_dir relative: the pods' spec folder is CONFIG_DIR, so it is TLS_DIR there, and the
    # folder beside the spec where `sixfold spec init` makes the certificates.
    return new_spec(node_hosts, f"{APP}-writer.{namespace}.svc.{domain}", reader_hosts, listen_any=True,
                    data_root=DATA_ROOT, tls_dir="tls", **options)


def _labels(component: str, **more: str) -> dict:
    out = {"app.kubernetes.io/name": APP, "app.kubernetes.io/component": component}
    out.update({f"sixfold.io/{k}": v for k, v in more.items()})
    return out


def _port(address: str) -> int:
    return int(address.rpartition(":")[2])


def _probe(ident: str, *, period_s: int, failures: int, alive: bool = False) -> dict:
    # Liveness (`alive`) counts NOT_SERVING as alive: a writer that waits as a candidate after
    # a reader took over is where it should be (engine.cluster.locate), not stuck.
    return {"exec": {"command": ["sixfold", "spec", "health", "--spec", SPEC_PATH, "--id", ident, *(["--alive"] if alive else [])]},
            "periodSeconds": period_s, "timeoutSeconds": 5, "failureThreshold": failures}


def _pod_spec(ident: str, argv: list[str], port: int, tls_items: list[str], *, auth_items: list[str],
              data_claim: str | None, extra: dict | None = None) -> dict:
    mounts = [
        {"name": "state", "mountPath": CONFIG_DIR},
        {"name": "spec", "mountPath": SPEC_PATH, "subPath": "cluster.json", "readOnly": True},
        {"name": "tls", "mountPath": TLS_DIR, "readOnly": True},
    ]
    mounts += [{"name": "auth", "mountPath": f"{CONFIG_DIR}/{item}", "subPath": item, "readOnly": True} for item in auth_items]
    if data_claim is not None:
        mounts.append({"name": data_claim, "mountPath": DATA_ROOT})
    volumes = [
        {"name": "state", "emptyDir": {}},
        {"name": "spec", "configMap": {"name": SPEC_CONFIGMAP}},
        {"name": "tls", "secret": {"secretName": TLS_SECRET, "defaultMode": 0o400,
                                   "items": [{"key": f"{i}.pem", "path": f"{i}.pem"} for i in tls_items]}},
    ]
    if auth_items:
        volumes.append({"name": "auth", "secret": {"secretName": AUTH_SECRET, "defaultMode": 0o400,
                                                   "items": [{"key": i, "path": i} for i in auth_items]}})
    container = {
        "name": ident.lower(), "image": "IMAGE", "args": argv,
        "ports": [{"name": "grpc", "containerPort": port, "protocol": "TCP"}],
        "volumeMounts": mounts,
        # Not ready until the gRPC health service says SERVING; restarted only when it stays
        # unanswered for minutes (a node rebuilding or a writer in recovery is alive).
        "readinessProbe": _probe(ident, period_s=5, failures=3),
        "livenessProbe": _probe(ident, period_s=30, failures=10, alive=True),
        "env": [{"name": "PYTHONUNBUFFERED", "value": "1"}],
    }
    spec = {"containers": [container], "volumes": volumes, "terminationGracePeriodSeconds": 30,
            "securityContext": {"fsGroup": 1000, "runAsUser": 1000, "runAsGroup": 1000, "runAsNonRoot": True}}
    spec.update(extra or {})
    return spec


def render_kubernetes(spec: dict, *, namespace: str, image: str = IMAGE_DEFAULT, storage: str = STORAGE_DEFAULT,
                      zones: dict[str, str] | None = None, storage_class: str | None = None) -> list[dict]:
    """The Kubernetes objects of a spec made by `kubernetes_spec` (see the module docstring).
    `zones`: {AZ: zone label value} (default: the AZ names themselves)."""
    _k8s_name(namespace, "namespace")
    if not isinstance(image, str) or not image or any(c.isspace() for c in image):
        raise InvalidArgument(f"image {image!r} is not an image reference")
    if not QUANTITY_RE.fullmatch(storage):
        raise InvalidArgument(f"storage {storage!r} is not a Kubernetes quantity (10Gi, 500Mi ...)")
    procs = processes(spec)
    azs = sorted({p["az"] for p in procs if p["kind"] == "node"})
    zones = {az: (zones or {}).get(az, az) for az in azs}
    meta = lambda name, labels: {"name": name, "namespace": namespace, "labels": labels}  # noqa: E731
    objects: list[dict] = [{
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": meta(SPEC_CONFIGMAP, _labels("spec")),
        "data": {"cluster.json": json.dumps(spec, indent=2, sort_keys=True) + "\n"},
    }, {
        "apiVersion": "v1", "kind": "Service", "metadata": meta(NODES_SERVICE, _labels("node")),
        "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": _labels("node"),
                 "ports": [{"name": p["id"].lower(), "port": _port(p["address"]), "targetPort": _port(p["address"])}
                           for p in procs if p["kind"] == "node"]},
    }]
    for p in procs:
        if p["kind"] != "node":
            continue
        expected = f"{node_pod(p['id'])}.{NODES_SERVICE}.{namespace}."
        if not address_host(p["address"]).startswith(expected):
            raise InvalidArgument(f"node {p['id']} of this spec is at {p['address']}, not at its pod's name {expected}...: "
                                  "render a spec made by `sixfold spec init --kubernetes NAMESPACE`")
        name = f"{APP}-{p['id'].lower()}"
        labels = _labels("node", node=p["id"], az=p["az"])
        port = _port(p["address"])
        affinity = {
            "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": ZONE_LABEL, "operator": "In", "values": [zones[p["az"]]]}]}]}},
            "podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 100, "podAffinityTerm": {
                "labelSelector": {"matchLabels": _labels("node", az=p["az"])}, "topologyKey": "kubernetes.io/hostname"}}]},
        }
        pod = _pod_spec(p["id"], ["node", "serve", "--spec", SPEC_PATH, "--id", p["id"]], port, ["ca", p["id"]],
                        auth_items=[], data_claim="data", extra={"affinity": affinity})
        claim = {"metadata": {"name": "data", "labels": labels},
                 "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": storage}}}}
        if storage_class:
            claim["spec"]["storageClassName"] = storage_class
        objects.append({
            "apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": meta(name, labels),
            "spec": {"serviceName": NODES_SERVICE, "replicas": 1, "podManagementPolicy": "Parallel",
                     "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels}, "spec": pod},
                     "volumeClaimTemplates": [claim]},
        })
    for az in azs:
        objects.append({
            "apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": meta(f"{APP}-az-{az.lower()}", _labels("node", az=az)),
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": _labels("node", az=az)}},
        })
    for p in procs:
        if p["kind"] == "node":
            continue
        ident = p["id"]
        name = f"{APP}-{ident.lower()}"
        expected = f"{name}.{namespace}."
        if not address_host(p["address"]).startswith(expected):
            raise InvalidArgument(f"{ident} of this spec is at {p['address']}, not at its Service's name {expected}...")
        labels = _labels(p["kind"], **({"reader": ident} if p["kind"] == "reader" else {}))
        port = _port(p["address"])
        if p["kind"] == "writer":
            argv = ["writer", "serve", "--spec", SPEC_PATH]
            # The writer checks client tokens against the users file, and asks the readers
            # (one may have taken over: engine.cluster.locate) with the operator token.
            tls_items, auth_items = ["ca", WRITER], ["users.json", "operator.token"]
        else:
            argv = ["reader", "serve", "--spec", SPEC_PATH, "--id", ident]
            # A reader authenticates to the writer with the operator token, and may become the
            # writer: it holds the writer certificate (only a writer's may seal) and, for the
            # writes it then serves, the users file.
            tls_items, auth_items = ["ca", ident, WRITER], ["operator.token", "users.json"]
        objects.append({"apiVersion": "v1", "kind": "Service", "metadata": meta(name, labels),
                        "spec": {"selector": labels, "ports": [{"name": "grpc", "port": port, "targetPort": port}]}})
        objects.append({
            "apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta(name, labels),
            "spec": {"replicas": 1, "strategy": {"type": "Recreate"}, "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels},
                                  "spec": _pod_spec(ident, argv, port, tls_items, auth_items=auth_items, data_claim=None)}},
        })
    for obj in objects:  # one image for every container
        pod = obj.get("spec", {}).get("template", {}).get("spec")
        for c in (pod or {}).get("containers", ()):
            c["image"] = image
    return objects


# --- YAML -------------------------------------------------------------------------------------
def _yaml_scalar(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a YAML double-quoted scalar
    raise TypeError(f"no YAML for {type(value).__name__}")


_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_./-]*")
_YAML_WORDS = {"y", "n", "yes", "no", "on", "off", "true", "false", "null"}


def _yaml_key(key) -> str:
    key = str(key)
    return key if _PLAIN_KEY.fullmatch(key) and key.lower() not in _YAML_WORDS else json.dumps(key)


def _yaml(value, indent: int) -> list[str]:
    pad = "  " * indent
    if isinstance(value, dict):
        if not value:
            return [pad + "{}"]
        lines = []
        for k, v in value.items():
            if isinstance(v, (dict, list)) and v:
                lines.append(f"{pad}{_yaml_key(k)}:")
                lines += _yaml(v, indent + 1)
            else:
                lines.append(f"{pad}{_yaml_key(k)}: {_yaml_scalar(v) if not isinstance(v, (dict, list)) else ('{}' if isinstance(v, dict) else '[]')}")
        return lines
    if isinstance(value, list):
        if not value:
            return [pad + "[]"]
        lines = []
        for item in value:
            sub = _yaml(item, indent + 1)
            first = sub[0].lstrip()
            lines.append(f"{pad}- {first}")
            lines += sub[1:]
        return lines
    return [pad + _yaml_scalar(value)]


def to_yaml(objects: list[dict]) -> str:
    """YAML documents, one per object, separated by `---`."""
    return "".join("---\n" + "\n".join(_yaml(obj, 0)) + "\n" for obj in objects)


# --- systemd ----------------------------------------------------------------------------------
SYSTEMD_KINDS = ("node", "writer", "reader")


def render_systemd(kind: str, *, spec_path: str = SPEC_PATH, sixfold: str = "/opt/sixfold/bin/sixfold",
                   user: str = "sixfold") -> tuple[str, str]:
    """(unit file name, its text) for one kind of process. A node's and a reader's unit is a
    template whose instance is the id: `systemctl enable --now sixfold-node@n3`."""
    if kind not in SYSTEMD_KINDS:
        raise InvalidArgument(f"a systemd unit is for a node, the writer or a reader, not {kind!r}")
    for value, what in ((spec_path, "spec path"), (sixfold, "sixfold path")):
        if not value.startswith("/") or any(c.isspace() for c in value):
            raise InvalidArgument(f"the {what} of a unit must be absolute, without spaces: {value!r}")
    if not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", user):
        raise InvalidArgument(f"user {user!r} is not a user name")
    if kind == "writer":
        name, what, command = "sixfold-writer.service", "the writer endpoint", f"writer serve --spec {spec_path}"
    else:
        name = f"sixfold-{kind}@.service"
        what = "storage node %i" if kind == "node" else "reader instance %i"
        command = f"{kind} serve --spec {spec_path} --id %i"
    # The spec's folder takes the logs and the audit log; a node's data root its data ("-": a
    # path that does not exist yet is no error).
    folder = spec_path.rsplit("/", 1)[0] or "/"
    # A writer or reader that was fenced by a newer writer steps down and exits 0; restarted,
    # it waits as a writer candidate again (engine.cluster.locate), so it comes back always.
    restart = ("# A fenced writer exits 0 (it stepped down); restarted, it waits as a candidate for the next failover.\n"
               "Restart=always\n") if kind != "node" else "Restart=on-failure\n"
    data = f"ReadWritePaths=-{folder}" + (f" -{DATA_ROOT}" if kind == "node" else "") + "\n"
    text = (
        f"# Sixfold {what}, one process of the deployment spec {spec_path} (engine.cluster.spec).\n"
        "# Rendered by `sixfold deploy systemd`. systemd restarts it; Sixfold supervises nothing across hosts.\n"
        "[Unit]\n"
        f"Description=Sixfold {what}\n"
        "Wants=network-online.target\n"
        "After=network-online.target\n"
        f"AssertPathExists={spec_path}\n"
        "\n"
        "[Service]\n"
        "Type=simple\n"
        f"User={user}\n"
        f"Group={user}\n"
        f"ExecStart={sixfold} {command}\n"
        "# SIGTERM lets in-flight calls finish and LMDB close; SIGKILL after the timeout.\n"
        "KillSignal=SIGTERM\n"
        "TimeoutStopSec=30\n"
        f"{restart}"
        "RestartSec=2\n"
        "# Exit code 2 is a bad configuration (a busy port, an insecure listen): restarting will not help.\n"
        "RestartPreventExitStatus=2\n"
        "LimitNOFILE=65536\n"
        "NoNewPrivileges=true\n"
        "ProtectSystem=strict\n"
        "ProtectHome=true\n"
        "PrivateTmp=true\n"
        f"{data}"
        "Environment=PYTHONUNBUFFERED=1\n"
        "\n"
        "[Install]\n"
        "WantedBy=multi-user.target\n"
    )
    return name, text


__all__ = ["IMAGE_DEFAULT", "SPEC_PATH", "SYSTEMD_KINDS", "kubernetes_spec", "render_kubernetes", "render_systemd", "to_yaml"]
