"""The deployment spec (engine.cluster.spec): one file naming every process of a cluster whose
processes run on hosts of their own; `sixfold node|writer|reader serve --spec FILE` runs one of
them; each certificate names its own process's hosts.

Real processes here bind 127.0.0.2..4 (three "hosts" on loopback, no namespace needed): a
process that assumed 127.0.0.1, or a certificate that named only it, fails these tests."""

from __future__ import annotations

import json
import re
import os
import shutil
import signal
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import engine
from engine.cluster.manifest import (
    ENCRYPTED_MANIFEST_FORMAT,
    PLACED_MANIFEST_FORMAT,
    PLAIN_MANIFEST_FORMAT,
    ClusterError,
    identity_hosts,
    is_placed,
    load_manifest,
    new_manifest,
    save_manifest,
    tls_config,
)
from engine.cluster.spec import issue_certificates, load_spec, new_spec, processes, save_spec, three_host_spec
from engine.cluster.testing import Load, acknowledge_committed, check_all_readable, engine_env, free_base_port
from engine.errors import InvalidArgument, WrongFolder
from engine.security.certs import TlsFolder
from engine.security.tls import secure_channel
from waiting import eventually

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
HOSTS = {"a": "10.0.1.10", "b": "10.0.2.10", "c": "10.0.3.10"}


def read(path) -> dict:
    with open(path) as fh:
        return json.load(fh)


# --- the file -------------------------------------------------------------------------------
def _init_spec(tmp_path, spec: str, *, readers: int) -> str:
    """`sixfold spec init` of a cluster on three loopback "hosts" (127.0.0.2..4); returns `spec`."""
    base = free_base_port(count=9, host="127.0.0.2")
    out = subprocess.run([sys.executable, "-m", "engine", "spec", "init", spec, "--hosts",
                          "a=127.0.0.2,b=127.0.0.3,c=127.0.0.4", "--readers", str(readers), "--base-port", str(base),
                          "--data-root", str(tmp_path / "data"), "--no-durable", "--protection-groups", "2"],
                         capture_output=True, text=True, env=engine_env(), timeout=120)
    assert out.returncode == 0, out.stderr
    return spec


def test_a_three_host_spec_places_two_nodes_per_az_host_and_is_format_3(tmp_path):
    m = three_host_spec(HOSTS, readers=2, base_port=7400)
    path = str(tmp_path / "cluster.json")
    save_spec(path, m)
    folder, loaded = load_spec(path)
    assert folder == str(tmp_path)
    assert loaded["format"] == PLACED_MANIFEST_FORMAT == 3 and is_placed(loaded)
    by_id = {p["id"]: p for p in processes(loaded)}
    assert [by_id[n]["address"] for n in ("n1", "n2", "n3", "n4", "n5", "n6")] == [
        "10.0.1.10:7401", "10.0.1.10:7402", "10.0.2.10:7403", "10.0.2.10:7404", "10.0.3.10:7405", "10.0.3.10:7406"]
    assert by_id["writer"]["address"] == "10.0.1.10:7400"
    assert (by_id["r1"]["az"], by_id["r1"]["address"]) == ("b", "10.0.2.10:7407")
    assert (by_id["r2"]["az"], by_id["r2"]["address"]) == ("c", "10.0.3.10:7408")
    assert loaded["data_root"] == "/var/lib/sixfold"


def test_a_spec_refuses_what_it_cannot_place():
    with pytest.raises(InvalidArgument, match="every node"):
        new_spec({"n1": "10.0.0.1"}, "10.0.0.1")
    with pytest.raises(InvalidArgument, match="host for each AZ"):
        three_host_spec({"a": "10.0.0.1", "b": "10.0.0.2"})
    with pytest.raises(InvalidArgument, match="not a host"):
        three_host_spec({"a": "10.0.0.1", "b": "bad host", "c": "10.0.0.3"})
    with pytest.raises(InvalidArgument, match="absolute"):
        three_host_spec(HOSTS, data_root="relative/data")


@pytest.mark.parametrize("field,value,named", [
    ("listen", "0.0.0.0:99999", "nodes[2].listen"),
    ("data_root", "var/lib/sixfold", "data_root"),
    ("tls_dir", "", "tls_dir"),
])
def test_a_wrong_placement_field_is_named(tmp_path, field, value, named):
    m = three_host_spec(HOSTS, listen_any=True)
    if field == "listen":
        m["nodes"][2]["listen"] = value
    else:
        m[field] = value
    (tmp_path / "cluster.json").write_text(json.dumps(m))
    with pytest.raises(WrongFolder, match=re.escape(f"'{named}'")):
        load_spec(str(tmp_path / "cluster.json"))


def test_placement_in_a_format_1_or_2_manifest_is_refused_so_no_older_release_misreads_it(tmp_path):
    """An older release ignores data_root and listen; a file that uses them must say format 3,
    which it refuses as newer, instead of starting an empty node in the wrong folder."""
    m = three_host_spec(HOSTS)
    for fmt in (1, 2):
        (tmp_path / "cluster.json").write_text(json.dumps(dict(m, format=fmt)))
        with pytest.raises(WrongFolder, match="format 3"):
            load_manifest(str(tmp_path))
    m = new_manifest(base_port=17400)
    m["nodes"][0]["listen"] = "0.0.0.0:17401"
    m["format"] = 1
    (tmp_path / "cluster.json").write_text(json.dumps(m))
    with pytest.raises(WrongFolder, match="'nodes\\[0\\].listen'.*format 3"):
        load_manifest(str(tmp_path))


def test_old_manifests_open_as_specs_and_keep_their_format(tmp_path):
    """Formats 0, 1 and 2 open as before (and as specs of a one-machine cluster); saving one that
    places nothing keeps its format, so the releases before this one still read it."""
    d = tmp_path / "c1"
    shutil.copytree(os.path.join(FIXTURES, "cluster-format-1"), d)
    folder, m = load_spec(str(d / "cluster.json"))
    assert m["format"] == PLAIN_MANIFEST_FORMAT and not is_placed(m)
    assert [p["address"] for p in processes(m)][:2] == ["127.0.0.1:7401", "127.0.0.1:7402"]
    save_manifest(folder, m)
    assert read(d / "cluster.json")["format"] == PLAIN_MANIFEST_FORMAT
    doc = read(d / "cluster.json")
    doc.pop("format")  # format 0: written before the field existed
    (d / "cluster.json").write_text(json.dumps(doc))
    assert load_spec(str(d / "cluster.json"))[1]["format"] == PLAIN_MANIFEST_FORMAT
    enc = new_manifest(base_port=17400, master_key=bytes(range(32)), key_file="/elsewhere/master.key")
    save_manifest(str(tmp_path / "c2"), enc)
    assert read(tmp_path / "c2" / "cluster.json")["format"] == ENCRYPTED_MANIFEST_FORMAT
    # Encrypted and placed: format 3, and it keeps its descriptor.
    placed = dict(enc, data_root="/var/lib/sixfold")
    save_manifest(str(tmp_path / "c3"), placed)
    back = load_manifest(str(tmp_path / "c3"))
    assert back["format"] == PLACED_MANIFEST_FORMAT and back["encryption"] == enc["encryption"]


def test_a_format_above_3_is_refused_as_newer(tmp_path):
    (tmp_path / "cluster.json").write_text(json.dumps(dict(three_host_spec(HOSTS), format=4)))
    with pytest.raises(ClusterError, match="format 4; this release reads format 3"):
        load_spec(str(tmp_path / "cluster.json"))


# --- certificates ---------------------------------------------------------------------------
def test_each_certificate_names_its_own_hosts(tmp_path):
    m = three_host_spec(HOSTS, readers=1, listen_any=True)
    save_spec(str(tmp_path / "cluster.json"), m)
    issued = issue_certificates(str(tmp_path), m)
    assert set(issued) == {"n1", "n2", "n3", "n4", "n5", "n6", "r1", "writer", "admin"}
    tf = TlsFolder(str(tmp_path), m["volume_id"], path=str(tmp_path / "tls"))
    assert "10.0.2.10" in tf.hosts_of("n3") and "10.0.1.10" not in tf.hosts_of("n3")
    assert "0.0.0.0" not in tf.hosts_of("n3"), "a bind-all listen address is no host"
    # The writer's names the readers' hosts too: a reader that takes over serves its certificate.
    assert {"10.0.1.10", "10.0.2.10"} <= set(tf.hosts_of("writer"))
    assert identity_hosts(m, "admin") == ()
    # Every certificate still names loopback (a process is probed on its own host there).
    assert all("127.0.0.1" in tf.hosts_of(i) for i in issued)


def test_cluster_up_certificates_name_each_process_host(tmp_path):
    """The launcher's certificates are issued per process too (a one-machine cluster's are
    all 127.0.0.1; a manifest that placed a process elsewhere gets that host)."""
    from engine.cluster.supervisor import Supervisor

    m = new_manifest(base_port=17400, tls=True)
    m["nodes"][3]["address"] = "127.0.0.9:17404"
    save_manifest(str(tmp_path), m)
    Supervisor(str(tmp_path))._ensure_certificates(load_manifest(str(tmp_path)))
    tf = TlsFolder(str(tmp_path), m["volume_id"])
    assert "127.0.0.9" in tf.hosts_of("n4") and "127.0.0.9" not in tf.hosts_of("n3")


# --- real processes on three "hosts" ----------------------------------------------------------
def _spawn(argv: list[str], log) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "engine", *argv], stdout=log, stderr=subprocess.STDOUT,
                            env=engine_env(), start_new_session=True)


@pytest.fixture
def processes_started():
    """Processes a test starts; all stopped at the end, whatever happened."""
    procs: list[subprocess.Popen] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _health(address: str, tls) -> str:
    with secure_channel(address, tls) as ch:
        try:
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.RpcError as e:
            return e.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def _loopback_hosts_work() -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.3", 0))
        except OSError:
            return False
    return True


needs_loopback_hosts = pytest.mark.skipif(not _loopback_hosts_work(), reason="this machine cannot bind 127.0.0.3")


@pytest.mark.cluster
@needs_loopback_hosts
def test_a_cluster_of_spec_processes_on_three_hosts_takes_writes(tmp_path, processes_started):
    """`sixfold spec init` with three hosts, then one `serve --spec` per process (as each host
    would run it), then `engine.connect(folder)` on the spec's folder writes and reads."""
    folder = tmp_path / "spec"
    spec = _init_spec(tmp_path, str(folder / "cluster.json"), readers=1)
    _, m = load_spec(spec)
    logs = open(tmp_path / "processes.log", "ab")
    for i in range(1, 7):
        processes_started.append(_spawn(["node", "serve", "--spec", spec, "--id", f"n{i}", "--metrics-port", "off"], logs))
    processes_started.append(_spawn(["writer", "serve", "--spec", spec, "--metrics-port", "off"], logs))
    processes_started.append(_spawn(["reader", "serve", "--spec", spec, "--id", "r1", "--metrics-port", "off"], logs))
    admin = tls_config(str(folder), m)
    for p in processes(m):
        eventually(lambda: _health(p["address"], admin) == "SERVING", f"{p['id']} SERVING at {p['address']}")
    assert m["nodes"][2]["address"].startswith("127.0.0.3:")
    with engine.connect(str(folder)) as db:
        for i in range(20):
            db.put(f"k{i}".encode(), f"v{i}".encode())
        assert db.get(b"k7") == b"v7"
        assert len(list(db.scan(b"k", b"l"))) == 20
    # Each node keeps its data under the spec's data root, nothing under the spec's folder.
    assert os.path.isdir(tmp_path / "data" / "nodes" / "az-b" / "n3")
    assert not os.path.exists(folder / "nodes")
    # The spec is the operator's file: a serving process records nothing into it.
    assert read(spec) == read(spec) and read(spec)["writer"]["pid"] is None
    # `sixfold spec health` (the Kubernetes readiness probe) answers for a process, with its own certificate.
    probe = subprocess.run([sys.executable, "-m", "engine", "spec", "health", "--spec", spec, "--id", "n3"],
                           capture_output=True, text=True, env=engine_env(), timeout=60)
    assert probe.returncode == 0 and "SERVING" in probe.stdout, probe.stdout + probe.stderr


@pytest.mark.cluster
@needs_loopback_hosts
def test_a_certificate_that_does_not_name_the_host_is_refused_and_a_renewed_one_is_taken(tmp_path, processes_started):
    """Before, every certificate named 127.0.0.1 and the manifest's one host: a node at
    127.0.0.3 failed the hostname check of every peer. `spec certs --renew` reissues each with
    its hosts, and the running node takes the new file on the next connection."""
    base = free_base_port(count=7, host="127.0.0.3")
    m = three_host_spec({"a": "127.0.0.3", "b": "127.0.0.3", "c": "127.0.0.3"}, base_port=base,
                        data_root=str(tmp_path / "data"), protection_groups=1, durable=False)
    spec = str(tmp_path / "cluster.json")
    save_spec(spec, m)
    tf = TlsFolder(str(tmp_path), m["volume_id"], path=str(tmp_path / "tls"))
    tf.ensure({"n1": "node", "admin": "admin"})  # the old way: no host of n1's own
    processes_started.append(_spawn(["node", "serve", "--spec", spec, "--id", "n1", "--metrics-port", "off"],
                                    open(tmp_path / "n1.log", "ab")))
    admin = tls_config(str(tmp_path), m)
    address = m["nodes"][0]["address"]
    eventually(lambda: b" serving on " in (tmp_path / "n1.log").read_bytes(), "n1 serving (its log says so)")
    assert _health(address, admin) == "UNAVAILABLE", "the certificate does not name 127.0.0.3: the handshake fails"
    issue_certificates(str(tmp_path), m, renew=True)
    eventually(lambda: _health(address, admin) == "SERVING", "n1 SERVING with its renewed certificate")


def _status_rows(spec: str) -> dict[str, dict]:
    """`sixfold status --spec FILE --json`: every process's row, by id."""
    out = subprocess.run([sys.executable, "-m", "engine", "status", "--spec", spec, "--json"],
                         capture_output=True, text=True, env=engine_env(), timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return {r["id"]: r for r in json.loads(out.stdout)["processes"]}


@pytest.mark.cluster
@needs_loopback_hosts
def test_a_spec_reader_takes_over_from_a_killed_writer_and_a_spec_client_follows_it(tmp_path, processes_started):
    """Failover with nothing shared between hosts: six nodes, a writer and two readers of one
    spec, each its own `serve --spec` process on three loopback "hosts". kill -9 the writer
    under a load from `engine.connect(spec)`: a reader promotes itself (the lease is on the
    nodes), the client finds it by asking the spec's writer candidates and re-sends under its
    request ids, the load goes on and nothing acknowledged is lost; the spec file is unchanged,
    `sixfold status --spec` shows the reader as the writer, the other reader follows it, and the
    old writer restarted from the same spec waits as a candidate instead of fencing it."""
    from engine.cluster.admin import WriterAdmin, operator_token

    folder = tmp_path / "spec"
    spec = _init_spec(tmp_path, str(folder / "volume.json"), readers=2)  # a spec file of any name
    _, m = load_spec(spec)
    before = read(spec)
    logs = open(tmp_path / "processes.log", "ab")
    for i in range(1, 7):
        processes_started.append(_spawn(["node", "serve", "--spec", spec, "--id", f"n{i}", "--metrics-port", "off"], logs))
    writer = _spawn(["writer", "serve", "--spec", spec, "--metrics-port", "off"], logs)
    processes_started.append(writer)
    for r in ("r1", "r2"):
        processes_started.append(_spawn(["reader", "serve", "--spec", spec, "--id", r, "--metrics-port", "off"], logs))
    admin = tls_config(str(folder), m)
    for p in processes(m):
        eventually(lambda: _health(p["address"], admin) == "SERVING", f"{p['id']} SERVING at {p['address']}")
    readers = {r["id"]: r["address"] for r in m["readers"]}
    token = operator_token(str(folder))

    def serving_writer() -> str | None:
        """The id of the process whose Status says it serves as the writer (None: none)."""
        for ident, address in (("writer", m["writer"]["address"]), *readers.items()):
            try:
                st = WriterAdmin(address, admin, token).status(2.0)
            except engine.SixfoldError:
                continue
            if "writer" in st and not st["writer"].get("fenced"):
                return ident
        return None

    db = engine.connect(spec, timeout_s=10)
    try:
        db.put(b"before", b"1")
        epoch_before = db.status()["epoch"]
        with Load(db, prefix="sf", threads=3) as load:
            eventually(lambda: load.count() >= 30, "the load to get going")
            writer.send_signal(signal.SIGKILL)  # nobody acts after this
            killed_at = time.monotonic()
            writer.wait(30)
            at_kill = load.count()
            eventually(lambda: load.count() > at_kill, "a write acknowledged after the kill")
            print(f"writes resumed {time.monotonic() - killed_at:.2f} s after the kill -9")  # the README's figure
            promoted = eventually(lambda: serving_writer() in readers and serving_writer(), "a reader to take over")
            at_takeover = load.count()
            eventually(lambda: load.count() >= at_takeover + 30, "writes to resume through the reader that took over")
        assert not load.errors, load.errors  # only success, Unavailable or WriteIndeterminate
        acknowledge_committed(db, load)
        check_all_readable(db, load)
        check_all_readable(db, load, quorum=True)
        assert db.get(b"before") == b"1"
        epoch_after = db.status()["epoch"]
        assert epoch_after > epoch_before

        # Nothing was recorded into the spec; the status view asks the processes themselves.
        assert read(spec) == before
        rows = _status_rows(spec)
        assert (rows[promoted]["role"], rows[promoted]["health"], rows[promoted]["epoch"]) == ("writer", "SERVING", epoch_after)
        assert rows["writer"]["role"] == "candidate" and rows["writer"]["health"] != "SERVING"
        other = next(r for r in readers if r != promoted)
        assert rows[other]["role"] == "reader"
        # The other reader follows the new writer's read point stream.
        lsn = db.put(b"followed", b"1")
        eventually(lambda: (lambda st: st["writer_address"] == readers[promoted] and st["read_point"] >= lsn)(
            WriterAdmin(readers[other], admin, token).status(2.0)["reader"]),
                   f"reader {other} to follow {promoted} past LSN {lsn}", ignoring=(engine.SixfoldError,))

        # The old writer's host comes back with the same spec, which still names it the writer:
        # it waits as a candidate (the new writer holds the lease) and fences nobody.
        restarted = _spawn(["writer", "serve", "--spec", spec, "--metrics-port", "off"], open(tmp_path / "w2.log", "ab"))
        processes_started.append(restarted)
        eventually(lambda: b"waits as a candidate" in (tmp_path / "w2.log").read_bytes(), "the restarted writer to wait")
        eventually(lambda: _health(m["writer"]["address"], admin) == "NOT_SERVING", "the restarted writer to listen, "
                   "NOT_SERVING")
        db.put(b"after", b"2")
        assert (db.get(b"after"), serving_writer(), db.status()["epoch"]) == (b"2", promoted, epoch_after)
        assert restarted.poll() is None and _health(m["writer"]["address"], admin) == "NOT_SERVING"

        # The Redis endpoint connects by the spec too, and so writes to the reader that took over.
        import redis

        from engine.redis.cli import ping

        port = free_base_port(count=1)
        processes_started.append(_spawn(["redis", "serve", "--spec", spec, "--port", str(port), "--no-auth"], logs))
        eventually(lambda: ping("127.0.0.1", port), "the Redis endpoint to answer PING")
        cl = redis.Redis(port=port, socket_timeout=30)
        assert cl.set(b"via-redis", b"3") and cl.get(b"via-redis") == b"3"
        cl.close()
        assert db.get(b"via-redis") == b"3"
    finally:
        db.close()


def test_the_writer_is_the_candidate_serving_as_writer_at_the_highest_epoch():
    """engine.cluster.locate.pick: of the spec's writer candidates' Status answers, readers,
    fenced writers and silent hosts are not the writer; of those serving as the writer, the
    highest epoch is (an older one was fenced by its seal and cannot confirm its lease)."""
    from engine.cluster.locate import Candidate, candidates, pick

    def writer(epoch, pid=10, fenced=None, opened_at=1.5):
        return {"epoch": epoch, "writer": {"epoch": epoch, "fenced": fenced}, "endpoint": {"pid": pid, "opened_at": opened_at}}

    reader = {"epoch": 4, "reader": {"epoch": 4}, "endpoint": {"pid": 11, "opened_at": 2.0}}
    w, r1, r2 = Candidate("writer", "a", "h1:1"), Candidate("r1", "b", "h2:2"), Candidate("r2", "c", "h3:3")
    assert pick([(w, None), (r1, reader), (r2, None)]) is None
    found = pick([(w, writer(3)), (r1, writer(4, pid=1, opened_at=9.0)), (r2, reader)])
    assert (found.candidate, found.epoch, found.identity) == (r1, 4, ("h2:2", 1, 9.0))
    assert pick([(w, writer(5, fenced="StaleEpoch: epoch 6")), (r1, writer(4))]).candidate == r1
    # The candidates: the writer, then each active reader, each address once.
    m = three_host_spec(HOSTS, readers=2)
    assert [c.id for c in candidates(m)] == ["writer", "r1", "r2"]
    m["readers"][0]["retired"] = True
    m["writer"]["address"] = m["readers"][1]["address"]  # a launcher folder's promoted r2
    assert [(c.id, c.address) for c in candidates(m)] == [("writer", m["readers"][1]["address"])]
