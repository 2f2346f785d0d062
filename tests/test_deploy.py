"""Deployments rendered from a spec (engine.cluster.deploy): the Kubernetes manifests validate
offline against the Kubernetes schemas (`kubernetes-validate`, strict: no unknown field), and
say what the design needs (six StatefulSets, two per zone, a disruption budget per zone, a
headless Service, claims for the data, Secrets for certificates, readiness from the health
service); the systemd units run commands the CLI accepts; the files committed under deploy/
are what the renderer makes of deploy/kubernetes/cluster.json.

Tested here: the rendering, its schema validation, and the units read by `systemd-analyze
verify` (offline, where it is installed). Not run here: a Kubernetes cluster, a container build,
systemd running the units (none exist on the test machine)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest

from engine.cli import build_parser
from engine.cluster.deploy import (
    SPEC_PATH,
    SYSTEMD_KINDS,
    ZONE_LABEL,
    kubernetes_spec,
    render_kubernetes,
    render_systemd,
    to_yaml,
)
from engine.cluster.spec import load_spec, three_host_spec
from engine.errors import InvalidArgument

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="the test extra installs kubernetes-validate")
yaml = pytest.importorskip("yaml", reason="kubernetes-validate brings PyYAML")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = os.path.join(ROOT, "deploy")
ZONES = {"a": "eu-west-1a", "b": "eu-west-1b", "c": "eu-west-1c"}


def schema_version() -> str:
    from kubernetes_validate.utils import latest_version

    return latest_version()


def rendered(readers: int = 2) -> list[dict]:
    spec = kubernetes_spec("sixfold", readers=readers)
    return render_kubernetes(spec, namespace="sixfold", image="registry.example/sixfold:1", zones=ZONES)


def of_kind(objects, kind):
    return [o for o in objects if o["kind"] == kind]


def test_every_rendered_object_is_valid_against_the_kubernetes_schemas():
    objects = rendered()
    docs = list(yaml.safe_load_all(to_yaml(objects)))
    assert docs == objects, "the YAML reads back as the objects rendered"
    version = schema_version()
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)  # raises ValidationError naming the field


def test_a_wrong_field_is_caught_by_the_validation():
    """The validation is not vacuous: an unknown field and a wrong type fail it."""
    sts = of_kind(rendered(), "StatefulSet")[0]
    sts["spec"]["replica"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(sts, schema_version(), strict=True)
    pdb = of_kind(rendered(), "PodDisruptionBudget")[0]
    pdb["spec"]["maxUnavailable"] = [1]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pdb, schema_version(), strict=True)


def test_six_node_statefulsets_two_per_zone_with_claims_and_zone_affinity():
    sets = of_kind(rendered(), "StatefulSet")
    assert [s["metadata"]["name"] for s in sets] == [f"sixfold-n{i}" for i in range(1, 7)]
    per_zone: dict[str, list[str]] = {}
    for s in sets:
        assert s["spec"]["serviceName"] == "sixfold-nodes" and s["spec"]["replicas"] == 1
        terms = s["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        (expr,) = terms[0]["matchExpressions"]
        assert expr["key"] == ZONE_LABEL and expr["operator"] == "In"
        per_zone.setdefault(expr["values"][0], []).append(s["metadata"]["name"])
        (claim,) = s["spec"]["volumeClaimTemplates"]
        mounts = {m["name"]: m["mountPath"] for m in s["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
        assert mounts[claim["metadata"]["name"]] == "/var/lib/sixfold"
    assert per_zone == {"eu-west-1a": ["sixfold-n1", "sixfold-n2"], "eu-west-1b": ["sixfold-n3", "sixfold-n4"],
                        "eu-west-1c": ["sixfold-n5", "sixfold-n6"]}


def test_a_disruption_budget_per_zone_lets_at_most_one_node_of_it_go():
    objects = rendered()
    budgets = of_kind(objects, "PodDisruptionBudget")
    assert len(budgets) == 3
    pods = [s["spec"]["template"]["metadata"]["labels"] for s in of_kind(objects, "StatefulSet")]
    for b in budgets:
        assert b["spec"]["maxUnavailable"] == 1 and "minAvailable" not in b["spec"]
        selected = [p for p in pods if all(p.get(k) == v for k, v in b["spec"]["selector"]["matchLabels"].items())]
        assert len(selected) == 2 and len({p["sixfold.io/az"] for p in selected}) == 1


def test_nodes_have_stable_names_behind_a_headless_service_that_the_spec_dials():
    objects = rendered()
    (headless,) = [s for s in of_kind(objects, "Service") if s["metadata"]["name"] == "sixfold-nodes"]
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True, "nodes gossip before they are SERVING"
    (config,) = of_kind(objects, "ConfigMap")
    spec = json.loads(config["data"]["cluster.json"])
    assert spec["nodes"][2]["address"] == "sixfold-n3-0.sixfold-nodes.sixfold.svc.cluster.local:7403"
    assert spec["nodes"][2]["listen"] == "0.0.0.0:7403"
    assert {p["port"] for p in headless["spec"]["ports"]} == {7401, 7402, 7403, 7404, 7405, 7406}


def test_writer_and_readers_are_workloads_of_their_own_and_every_command_parses():
    objects = rendered(readers=2)
    deployments = {d["metadata"]["name"]: d for d in of_kind(objects, "Deployment")}
    assert sorted(deployments) == ["sixfold-r1", "sixfold-r2", "sixfold-writer"]
    assert deployments["sixfold-writer"]["spec"]["strategy"]["type"] == "Recreate"
    parser = build_parser()
    pods = [o["spec"]["template"]["spec"] for o in objects if o["kind"] in ("StatefulSet", "Deployment")]
    assert len(pods) == 9
    for pod in pods:
        (c,) = pod["containers"]
        args = parser.parse_args(c["args"])  # the image's entrypoint is `sixfold`
        assert args.spec == SPEC_PATH
        probe = c["readinessProbe"]["exec"]["command"]
        assert probe[:3] == ["sixfold", "spec", "health"]
        assert parser.parse_args(probe[1:]).func.__name__ == "cmd_spec_health"
        # Certificates from the Secret: the bundle and the pod's own identity, never the CA key.
        (tls,) = [v for v in pod["volumes"] if v["name"] == "tls"]
        keys = [i["key"] for i in tls["secret"]["items"]]
        ident = getattr(args, "id", None) or "writer"
        assert f"{ident}.pem" in keys
        # A reader also holds the writer's certificate: it may take over (only a writer's may seal).
        reader = c["args"][0] == "reader"
        assert "ca.pem" in keys and "ca-key.pem" not in keys and len(keys) == (3 if reader else 2)
        assert ("writer.pem" in keys) == (reader or ident == "writer")
        # Alive is more than ready: a writer waiting as a candidate is NOT_SERVING, not stuck.
        alive = c["livenessProbe"]["exec"]["command"]
        assert alive[-1] == "--alive" and parser.parse_args(alive[1:]).alive


def test_render_refuses_a_spec_that_is_not_a_kubernetes_one():
    with pytest.raises(InvalidArgument, match="pod's name"):
        render_kubernetes(three_host_spec({"a": "10.0.0.1", "b": "10.0.0.2", "c": "10.0.0.3"}), namespace="sixfold")
    with pytest.raises(InvalidArgument, match="Kubernetes name"):
        render_kubernetes(kubernetes_spec("sixfold"), namespace="Six_Fold")
    with pytest.raises(InvalidArgument, match="quantity"):
        render_kubernetes(kubernetes_spec("sixfold"), namespace="sixfold", storage="ten gigs")


def test_the_committed_kubernetes_manifests_are_the_render_of_the_committed_spec():
    path = os.path.join(DEPLOY, "kubernetes", "cluster.json")
    _, spec = load_spec(path)
    objects = render_kubernetes(spec, namespace="sixfold")
    with open(os.path.join(DEPLOY, "kubernetes", "sixfold.yaml")) as fh:
        committed = fh.read()
    assert committed == to_yaml(objects), ("deploy/kubernetes/sixfold.yaml is stale: run `sixfold deploy kubernetes "
                                           "--spec deploy/kubernetes/cluster.json --namespace sixfold --out deploy/kubernetes`")
    for doc in yaml.safe_load_all(committed):
        kubernetes_validate.validate(doc, schema_version(), strict=True)


@pytest.mark.parametrize("kind", SYSTEMD_KINDS)
def test_systemd_units_run_a_command_the_cli_accepts_and_match_the_committed_ones(kind):
    name, text = render_systemd(kind)
    (exec_line,) = [line for line in text.splitlines() if line.startswith("ExecStart=")]
    argv = shlex.split(exec_line[len("ExecStart="):].replace("%i", "n3" if kind == "node" else "r1"))
    assert argv[0] == "/opt/sixfold/bin/sixfold"
    args = build_parser().parse_args(argv[1:])
    assert args.spec == SPEC_PATH and args.func.__name__ == f"cmd_{kind}_serve"
    # A fenced writer or reader exits 0 (it stepped down) and must come back as a candidate.
    assert ("Restart=always" if kind != "node" else "Restart=on-failure") in text.splitlines()
    with open(os.path.join(DEPLOY, "systemd", name)) as fh:
        assert fh.read() == text, f"deploy/systemd/{name} is stale: run `sixfold deploy systemd --out deploy/systemd`"


def test_systemd_refuses_what_would_break_a_unit():
    with pytest.raises(InvalidArgument):
        render_systemd("scheduler")
    with pytest.raises(InvalidArgument, match="absolute"):
        render_systemd("node", spec_path="cluster.json")
    with pytest.raises(InvalidArgument, match="user"):
        render_systemd("node", user="root; rm -rf /")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
@pytest.mark.parametrize("kind", SYSTEMD_KINDS)
def test_systemd_analyze_verify_finds_nothing_to_say_about_the_units(tmp_path, kind):
    """`systemd-analyze verify` (offline) reads each unit with no warning: every key known, the
    command executable (here the test's own sixfold)."""
    sixfold = shutil.which("sixfold", path=os.path.dirname(sys.executable))
    if sixfold is None:
        pytest.skip("no sixfold command beside this interpreter")
    name, text = render_systemd(kind, sixfold=sixfold)
    path = tmp_path / (name.replace("@.", "@n3.") if "@" in name else name)
    path.write_text(text)
    out = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "" and out.stderr.strip() == "", out.stdout + out.stderr
