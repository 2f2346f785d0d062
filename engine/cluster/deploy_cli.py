"""`sixfold spec ...` and `sixfold deploy ...`: deployment specs and what orchestrators read.

    sixfold spec init DIR/cluster.json --hosts a=10.0.1.10,b=10.0.2.10,c=10.0.3.10
    sixfold spec check DIR/cluster.json          the processes it names, one line each
    sixfold spec certs DIR/cluster.json          the CA and each process's certificate
    sixfold spec health --spec FILE --id n3      exit 0 when n3 is SERVING (a readiness probe)
    sixfold deploy kubernetes --spec FILE --namespace NS --out DIR
    sixfold deploy systemd --out DIR

Registered by `engine.cli` (COMMAND_MODULES). The specs are `engine.cluster.spec`'s, the
renderings `engine.cluster.deploy`'s; this module parses arguments and writes files.
"""

from __future__ import annotations

import argparse
import os
import sys

from engine.cluster.manifest import WRITER, listen_address, tls_config, users_file
from engine.cluster.spec import load_spec, processes, save_spec


def _spec_options(args) -> dict:
    options = {"tls": True, "tokens": True}
    if args.protection_groups is not None:
        options["protection_groups"] = args.protection_groups
    if args.base_port is not None:
        options["base_port"] = args.base_port
    if args.no_durable:
        options["durable"] = False
    return options


def _make_secrets(path: str) -> list[str]:
    """Certificates (in the spec's tls_dir) and the operator's token (users file beside the
    spec) for a new spec; returns the certificate ids issued."""
    from engine.cluster.spec import issue_certificates
    from engine.security.users import UserStore

    folder, m = load_spec(path)
    issued = issue_certificates(folder, m)
    users = users_file(m, folder)
    if users is not None:
        UserStore(folder, users).ensure_operator()
    return issued


def cmd_spec_init(args) -> int:
    from engine.cluster import deploy, spec

    if os.path.exists(args.file) and not args.force:
        raise SystemExit(f"sixfold spec init: {args.file} exists; give --force to replace it (its volume id changes)")
    if (args.hosts is None) == (args.kubernetes is None):
        raise SystemExit("sixfold spec init: give --hosts a=HOST,b=HOST,c=HOST or --kubernetes NAMESPACE")
    if args.kubernetes is not None:
        m = deploy.kubernetes_spec(args.kubernetes, readers=args.readers, **_spec_options(args))
    else:
        m = spec.three_host_spec(spec.parse_hosts(args.hosts), readers=args.readers, listen_any=args.listen_any,
                                 data_root=args.data_root, **_spec_options(args))
    save_spec(args.file, m)
    issued = [] if args.kubernetes is not None and args.no_certs else _make_secrets(args.file)
    folder = os.path.dirname(os.path.abspath(args.file))
    print(f"wrote {args.file}: {len(processes(m))} processes on {len(spec.hosts(m))} host(s)")
    if issued and args.kubernetes is not None:
        tls = tls_config(folder, m).folder
        files = " ".join(f"--from-file={tls}/{i}.pem" for i in ["ca", *issued])  # never ca-key.pem
        ns = args.kubernetes
        print(f"certificates for {', '.join(issued)} in {tls}. Load them, the users file and the readers' token as Secrets "
              f"(the CA's key ca-key.pem stays here):\n"
              f"  kubectl -n {ns} create secret generic sixfold-tls {files}\n"
              f"  kubectl -n {ns} create secret generic sixfold-auth --from-file={folder}/users.json "
              f"--from-file={folder}/operator.token\n"
              f"then: sixfold deploy kubernetes --spec {args.file} --namespace {ns} --out DIR; kubectl apply -f DIR")
    elif issued:
        print(f"certificates for {', '.join(issued)} in {tls_config(folder, m).folder}; the users file and operator.token "
              f"in {folder}. Copy to each host the spec, ca.pem and its own <id>.pem (the writer's host: users.json too; "
              "a reader's: operator.token); keep ca-key.pem off the hosts")
    return 0


def cmd_spec_check(args) -> int:
    from engine.output import print_json, table

    folder, m = load_spec(args.file)
    procs = processes(m)
    if args.json:
        print_json({"spec": os.path.abspath(args.file), "volume_id": m["volume_id"], "format": m["format"],
                    "processes": procs})
        return 0
    print(table([[p["kind"], p["id"], p["az"], p["address"], p["listen"], p["data"]] for p in procs],
                ["kind", "id", "az", "address", "listen", "data"]))
    root = m.get("data_root") or folder
    print(f"volume {m['volume_id']}  format {m['format']}  data under {root}  "
          + (f"TLS material in {tls_config(folder, m).folder}" if m.get("tls") else "INSECURE (loopback only)"))
    return 0


def cmd_spec_certs(args) -> int:
    from engine.cluster.spec import issue_certificates

    folder, m = load_spec(args.file)
    issued = issue_certificates(folder, m, renew=args.renew)
    print(f"issued {', '.join(issued) or 'nothing (every process has its certificate; --renew reissues them)'}")
    return 0


def cmd_spec_health(args) -> int:
    """A readiness probe: the gRPC health service of one process of the spec, asked over mutual
    TLS with that process's own certificate; exit 0 SERVING, 4 otherwise."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from engine.cluster.manifest import WILDCARD_HOSTS, address_host, node_entry, reader_entry
    from engine.security.tls import secure_channel

    folder, m = load_spec(args.spec)
    if args.id == WRITER:
        entry = m[WRITER]
    elif any(r["id"] == args.id for r in m.get("readers", ())):
        entry = reader_entry(m, args.id)
    else:
        entry = node_entry(m, args.id)
    listen = listen_address(entry)
    # On its own host a process is dialled where it binds; a bind-all address at 127.0.0.1,
    # which every certificate names.
    target = f"127.0.0.1:{listen.rpartition(':')[2]}" if address_host(listen) in WILDCARD_HOSTS else listen
    with secure_channel(target, tls_config(folder, m, args.id)) as ch:
        try:
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=args.timeout_s)
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.RpcError as e:
            status = f"UNREACHABLE ({e.code().name})"
    print(f"{args.id} {target}: {status}")
    return 0 if status == "SERVING" or (args.alive and status == "NOT_SERVING") else 4


def cmd_deploy_kubernetes(args) -> int:
    from engine.cluster import deploy

    _folder, m = load_spec(args.spec)
    zones = {}
    for item in (args.zones.split(",") if args.zones else ()):
        az, sep, zone = item.partition("=")
        if not sep or not az or not zone:
            raise SystemExit(f"sixfold deploy kubernetes: --zones wants AZ=ZONE,..., got {item!r}")
        zones[az.strip()] = zone.strip()
    objects = deploy.render_kubernetes(m, namespace=args.namespace, image=args.image, storage=args.storage, zones=zones,
                                       storage_class=args.storage_class)
    text = deploy.to_yaml(objects)
    if args.out in (None, "-"):
        sys.stdout.write(text)
        return 0
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "sixfold.yaml")
    with open(path, "w") as fh:
        fh.write(text)
    print(f"wrote {path}: {len(objects)} objects ({', '.join(sorted({o['kind'] for o in objects}))})", file=sys.stderr)
    return 0


def cmd_deploy_systemd(args) -> int:
    from engine.cluster import deploy

    os.makedirs(args.out, exist_ok=True)
    for kind in deploy.SYSTEMD_KINDS:
        name, text = deploy.render_systemd(kind, spec_path=args.spec_path, sixfold=args.sixfold, user=args.user)
        with open(os.path.join(args.out, name), "w") as fh:
            fh.write(text)
        print(f"wrote {os.path.join(args.out, name)}")
    return 0


def register(sub) -> None:
    from engine.cluster.deploy import IMAGE_DEFAULT, SPEC_PATH, STORAGE_DEFAULT
    from engine.cluster.spec import DATA_ROOT_DEFAULT

    p = sub.add_parser("spec", help="deployment specs: a cluster whose processes run on hosts of their own", description=(
        "A deployment spec is a cluster.json that places each process: its host address (and the address it binds), "
        "the nodes' data folder on their hosts, the TLS material. Each host runs its process with "
        "`sixfold node serve --spec FILE --id n3` (writer serve --spec FILE, reader serve --spec FILE --id r1)."))
    ssub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    a = ssub.add_parser("init", help="write a new spec, its certificates and the operator's token", description=(
        "--hosts a=H1,b=H2,c=H3: the three-host layout (both nodes of an AZ on its host, the writer on a's); "
        "--kubernetes NS: the addresses of `sixfold deploy kubernetes` in namespace NS."))
    a.add_argument("file", help="the spec to write (name it cluster.json so its folder opens as a cluster folder)")
    a.add_argument("--hosts", metavar="AZ=HOST,...", help="one host (IP address or DNS name) per AZ a, b, c")
    a.add_argument("--kubernetes", metavar="NAMESPACE", help="a spec for Kubernetes in this namespace")
    a.add_argument("--readers", type=int, default=0, help="reader instances, on the hosts of AZs b and c (default 0)")
    a.add_argument("--listen-any", action="store_true", help="every process binds 0.0.0.0 at its port (with --hosts)")
    a.add_argument("--data-root", default=DATA_ROOT_DEFAULT, help=f"the nodes' data folder on their hosts (default {DATA_ROOT_DEFAULT})")
    a.add_argument("--base-port", type=int, default=None, help="the writer's port; nodes on the next six (default 7400)")
    a.add_argument("--protection-groups", type=int, default=None, metavar="N", help="stripes of the key space (default 8)")
    a.add_argument("--no-durable", action="store_true", help="nodes do not fsync before acknowledging (tests only)")
    a.add_argument("--no-certs", action="store_true", help=argparse.SUPPRESS)
    a.add_argument("--force", action="store_true", help="replace an existing file")
    a.set_defaults(func=cmd_spec_init)
    a = ssub.add_parser("check", help="check a spec and list the processes it names")
    a.add_argument("file")
    a.add_argument("--json", action="store_true", help="print JSON for scripts")
    a.set_defaults(func=cmd_spec_check)
    a = ssub.add_parser("certs", help="make the CA and every process's certificate, naming its hosts")
    a.add_argument("file")
    a.add_argument("--renew", action="store_true", help="reissue the certificates that exist too (after a host moved)")
    a.set_defaults(func=cmd_spec_certs)
    a = ssub.add_parser("health", help="ask one process of a spec for its health (a readiness probe)", description=(
        "Ask the gRPC health service of process ID over mutual TLS with its own certificate. Exit 0 when SERVING, "
        "4 otherwise (with --alive: 0 when it answers at all)."))
    a.add_argument("--spec", required=True, metavar="FILE")
    a.add_argument("--id", required=True, help="n1..n6, writer, or a reader id")
    a.add_argument("--alive", action="store_true", help=(
        "a liveness probe: exit 0 for NOT_SERVING too (a writer waiting as a candidate after a reader took over, a "
        "reader waiting for its first read point are alive, and restarting them changes nothing)"))
    a.add_argument("--timeout-s", type=float, default=3.0)
    a.set_defaults(func=cmd_spec_health)

    p = sub.add_parser("deploy", help="render Kubernetes manifests or systemd units from a spec", description=(
        "Sixfold never schedules or supervises processes across machines: Kubernetes or systemd does. These commands "
        "write what they read, from the spec."))
    dsub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    a = dsub.add_parser("kubernetes", help="StatefulSets, Services, PodDisruptionBudgets and Deployments of a spec")
    a.add_argument("--spec", required=True, metavar="FILE", help="a spec made by `sixfold spec init --kubernetes NS`")
    a.add_argument("--namespace", required=True)
    a.add_argument("--image", default=IMAGE_DEFAULT, help=f"the container image (deploy/Containerfile; default {IMAGE_DEFAULT})")
    a.add_argument("--storage", default=STORAGE_DEFAULT, help=f"each node's volume claim (default {STORAGE_DEFAULT})")
    a.add_argument("--storage-class", default=None, help="the claims' storage class (default: the cluster's default)")
    a.add_argument("--zones", metavar="AZ=ZONE,...", default=None, help=(
        "the topology.kubernetes.io/zone value of each AZ (default: the AZ names a, b, c)"))
    a.add_argument("--out", metavar="DIR", default=None, help="write DIR/sixfold.yaml (default: standard output)")
    a.set_defaults(func=cmd_deploy_kubernetes)
    a = dsub.add_parser("systemd", help="systemd units for the node, writer and reader processes")
    a.add_argument("--out", metavar="DIR", required=True)
    a.add_argument("--spec-path", default=SPEC_PATH, help=f"where each host keeps its spec (default {SPEC_PATH})")
    a.add_argument("--sixfold", default="/opt/sixfold/bin/sixfold", help="the sixfold command on the hosts")
    a.add_argument("--user", default="sixfold", help="the user the processes run as")
    a.set_defaults(func=cmd_deploy_systemd)


__all__ = ["register"]
