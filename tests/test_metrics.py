"""Metrics (issue 13, item 5): every process serves Prometheus text metrics, and the embedded
engine gives the same numbers in `db.metrics()`.

* The embedded engine's values move as the volume does: put and get counts, the VDL, flush
  sizes (every record reaches all six nodes), a node's SCL lag while it is down and its repair
  by gossip once it is back, a corrupt copy found by scrub, errors by class; two volumes in one
  process keep separate registries.
* The HTTP exporter answers a plain GET with the text, refuses a bad port or a non-loopback
  address, and frees its port when closed.
* `--metrics-port` refuses bad values with a clear message, and a busy metrics port before any
  data is opened; `cluster up` refuses a busy metrics port before it starts anything.
* A live cluster (real processes): every node's, the writer's and the reader's metrics port
  answers a plain GET (urllib) with the metric names and values that agree with what was done.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from waiting import eventually

import engine
from engine.cluster import Cluster
from engine.cluster.manifest import (
    METRICS_PORT_OFFSET_DEFAULT,
    WRITER,
    load_manifest,
    metrics_address,
    metrics_port,
    new_manifest,
    port_clashes,
    save_manifest,
)
from engine.cluster.testing import engine_env, free_base_port, hold_port
from engine.errors import InvalidArgument, WrongFolder
from engine.metrics import Metrics, serve
from engine.transport.grpc_server import AddressInUse, InsecureListen

NODES = ("n1", "n2", "n3", "n4", "n5", "n6")


def samples(text: str) -> dict[str, float]:
    """The samples of a Prometheus text exposition, keyed as `Metrics.values()` keys them, read
    by prometheus_client's own parser."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def scrape(address: str) -> str:
    """A plain HTTP GET of a metrics port, as Prometheus does it."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=30) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain"), reply.headers["Content-Type"]
        return reply.read().decode()


def busy_port() -> socket.socket:
    """A listening socket on a free loopback port (close it when done)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    return s


# --- the embedded engine ------------------------------------------------------------------------
def test_embedded_metrics_follow_puts_gets_flushes_and_errors(tmp_path):
    with engine.open(tmp_path / "v", durable=False, protection_groups=2, write_timeout_s=0.5) as db:
        m = db.metrics()
        assert m["sixfold_put_latency_seconds_count"] == 0 and m["sixfold_get_latency_seconds_count"] == 0
        assert m["sixfold_vdl"] == db.status()["vdl"] and m["sixfold_writer_serving"] == 1
        assert all(m[f'sixfold_node_up{{node="{n}"}}'] == 1 for n in NODES)

        puts = 20
        for i in range(puts):
            db.put(b"k%02d" % i, b"v%02d" % i)
        assert db.get(b"k01") == b"v01" and db.get(b"missing") is None
        assert db.get_many([b"k02", b"k03", b"k04"]) == [b"v02", b"v03", b"v04"]
        m = db.metrics()
        assert m["sixfold_put_latency_seconds_count"] == puts
        assert m['sixfold_put_latency_seconds_bucket{le="+Inf"}'] == puts
        assert 0 < m["sixfold_put_latency_seconds_sum"]
        assert m["sixfold_get_latency_seconds_count"] == 2 + 3, "a get of a missing key is a get; get_many counts each key"
        vdl = db.status()["vdl"]
        assert m["sixfold_vdl"] == vdl and vdl == 2 * puts, "each put logs its record and its request record"
        assert m["sixfold_epoch"] == db.status()["epoch"]

        # Every record is sent to each of the six nodes in some frame (the fifth and sixth may
        # get theirs a moment after the put returned).
        def all_sent():
            v = db.metrics()
            return v["sixfold_flush_records_sum"] == 6 * vdl and v
        m = eventually(all_sent, "every record counted in a frame sent to each of the six nodes")
        assert 0 < m["sixfold_flush_records_count"] <= 6 * vdl
        assert m["sixfold_flush_bytes_sum"] > 36 * m["sixfold_flush_records_sum"], "a record is at least its header"
        assert m['sixfold_flush_records_bucket{le="+Inf"}'] == m["sixfold_flush_records_count"]
        eventually(lambda: all(db.metrics()[f'sixfold_scl_lag_lsns{{node="{n}"}}'] == 0 for n in NODES),
                   "no node behind the PGCLs")
        m = db.metrics()
        assert max(m[f'sixfold_scl{{node="n1",pg="{pg}"}}'] for pg in (0, 1)) == vdl
        assert all(m[f'sixfold_node_records{{node="{n}"}}'] == vdl for n in NODES)

        # Errors by class: three nodes down leave no write quorum.
        for n in ("n4", "n5", "n6"):
            db.cluster.stop_node(n)
        eventually(lambda: all(db.metrics()[f'sixfold_link_up{{node="{n}"}}'] == 0 for n in ("n4", "n5", "n6")),
                   "the writer to see n4, n5 and n6 down")
        with pytest.raises(engine.Unavailable) as refused:
            db.put(b"k", b"v")
        assert type(refused.value) is engine.Unavailable, "refused before it was logged: no write quorum"
        m = db.metrics()
        assert m['sixfold_errors_total{kind="Unavailable"}'] == 1
        assert not any(k.startswith("sixfold_errors_total") and "Unavailable" not in k for k in m), m
        assert m["sixfold_put_latency_seconds_count"] == puts, "a refused write has no latency"
        assert m['sixfold_node_up{node="n5"}'] == 0 and f'sixfold_node_records{{node="n5"}}' not in m

        text = db.metrics_text()
        assert "# TYPE sixfold_put_latency_seconds histogram" in text and "# TYPE sixfold_vdl gauge" in text
        assert samples(text)["sixfold_put_latency_seconds_count"] == puts


def test_embedded_lag_repair_and_corruption_show(tmp_path):
    with engine.open(tmp_path / "v", durable=False, protection_groups=2, gossip_interval_s=0.05,
                     scrub_interval_s=0.05) as db:
        db.put(b"a", b"1")
        db.cluster.stop_node("n6")
        eventually(lambda: db.metrics()['sixfold_link_up{node="n6"}'] == 0, "the writer to see n6 down")
        for i in range(30):
            db.put(b"lag%02d" % i, b"x" * 100)
        m = eventually(lambda: (v := db.metrics())['sixfold_scl_lag_lsns{node="n1"}'] == 0 and v, "n1 at the PGCLs")
        assert m['sixfold_node_up{node="n6"}'] == 0
        assert m['sixfold_scl_lag_lsns{node="n6"}'] >= 60, "30 puts (60 records) n6 never got"
        db.cluster.start_node("n6")
        m = eventually(lambda: (v := db.metrics())['sixfold_scl_lag_lsns{node="n6"}'] == 0 and v, "n6 to catch up")
        assert m['sixfold_node_up{node="n6"}'] == 1 and m['sixfold_link_up{node="n6"}'] == 1

        # A wiped node rebuilds from its peers by gossip: the writer has sent it everything once.
        vdl = db.status()["vdl"]
        served_before = sum(m[f'sixfold_gossip_bytes_total{{direction="served",node="{n}"}}'] for n in NODES[:5])
        db.cluster.wipe_node("n6")
        m = eventually(lambda: (v := db.metrics())[f'sixfold_node_records{{node="n6"}}'] == vdl and v, "n6 to rebuild")
        assert m['sixfold_repair_bytes_total{node="n6"}'] > 30 * 100, "n6's records came back by repair"
        assert m['sixfold_gossip_bytes_total{direction="fetched",node="n6"}'] >= m['sixfold_repair_bytes_total{node="n6"}']
        assert m['sixfold_repaired_records_total{node="n6"}'] >= 60
        served = sum(m[f'sixfold_gossip_bytes_total{{direction="served",node="{n}"}}'] for n in NODES[:5])
        assert served - served_before >= m['sixfold_gossip_bytes_total{direction="fetched",node="n6"}']
        assert m['sixfold_gossip_rounds_total{node="n6"}'] > 0

        assert m['sixfold_corrupt_copies_found_total{node="n2"}'] == 0
        assert db.cluster.corrupt("n2", 0) is not None
        eventually(lambda: db.metrics()['sixfold_corrupt_copies_found_total{node="n2"}'] == 1,
                   "the scrub to find the corrupt copy on n2")


def test_volumes_in_one_process_keep_their_own_metrics(tmp_path):
    with engine.open(tmp_path / "a", durable=False, protection_groups=2) as a, \
            engine.open(tmp_path / "b", durable=False, protection_groups=2) as b:
        for i in range(3):
            a.put(b"k%d" % i, b"v")
        assert a.metrics()["sixfold_put_latency_seconds_count"] == 3
        assert b.metrics()["sixfold_put_latency_seconds_count"] == 0
        assert b.metrics()["sixfold_vdl"] == 0
    with pytest.raises(engine.Closed):
        a.metrics()


# --- the HTTP exporter ----------------------------------------------------------------------------
def test_the_exporter_answers_a_plain_get_and_frees_its_port():
    m = Metrics(process=True)
    m.count_error(engine.Unavailable("x"))
    m.observe_put(0.003)
    server = serve(m, 0)
    try:
        assert server.port > 0 and server.address == f"127.0.0.1:{server.port}"
        got = samples(scrape(server.address))
        assert got['sixfold_errors_total{kind="Unavailable"}'] == 1 and got["sixfold_put_latency_seconds_count"] == 1
        assert got['sixfold_put_latency_seconds_bucket{le="0.005"}'] == 1
        assert got['sixfold_put_latency_seconds_bucket{le="0.0025"}'] == 0
        assert "process_cpu_seconds_total" in got, "a process's registry carries the standard process metrics"
        assert {k: v for k, v in got.items() if k.startswith("sixfold_")} == {
            k: v for k, v in m.values().items() if k.startswith("sixfold_")}, "the text and values() agree"
        request = urllib.request.Request(f"http://{server.address}/metrics", data=b"x", method="POST")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(request, timeout=30)
        assert e.value.code == 405
        with pytest.raises(AddressInUse, match=f"cannot serve metrics on 127.0.0.1:{server.port}"):
            serve(Metrics(), server.port)
    finally:
        server.close()
    again = serve(Metrics(), server.port)  # freed
    again.close()


@pytest.mark.parametrize("port", [-1, 65536, "8400", True, None])
def test_the_exporter_refuses_a_bad_port(port):
    with pytest.raises(InvalidArgument, match="a metrics port is an integer in 0..65535"):
        serve(Metrics(), port)


def test_the_exporter_serves_on_loopback_only():
    with pytest.raises(InsecureListen, match="plaintext HTTP, for loopback only"):
        serve(Metrics(), 0, host="0.0.0.0")


# --- the command line -----------------------------------------------------------------------------
def sixfold(*args, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine", *map(str, args)], capture_output=True, text=True,
                          env=engine_env(), timeout=timeout)


@pytest.mark.parametrize("value,message", [("70000", "port 70000 is out of range"), ("-5", "port -5 is out of range"),
                                           ("abc", "'abc' is not a port")])
@pytest.mark.parametrize("family", ["node", "writer", "reader"])
def test_bad_metrics_ports_are_usage_errors(family, value, message):
    out = sixfold(family, "serve", "--metrics-port", value)
    assert out.returncode == 2, out
    assert f"argument --metrics-port: {message}: give 0..65535 (0: any free port) or off" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_busy_metrics_port_stops_a_node_before_it_opens_its_data(tmp_path):
    data = tmp_path / "n1"
    with busy_port() as s:
        port = s.getsockname()[1]
        out = sixfold("node", "serve", "--id", "n1", "--az", "a", "--data", data, "--listen", f"127.0.0.1:{free_base_port(1)}",
                      "--volume-id", "v", "--protection-groups", 2, "--peers", "n2=127.0.0.1:1", "--metrics-port", port)
    assert out.returncode == 2, out
    assert f"cannot serve metrics on 127.0.0.1:{port}: Address already in use" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert not data.exists(), "nothing opened: the metrics port is bound first"


@pytest.mark.parametrize("value", ["0", "-3", "x"])
def test_cluster_up_refuses_a_bad_metrics_port_offset(tmp_path, value):
    out = sixfold("cluster", "up", "--cluster", tmp_path / "c", "--metrics-port-offset", value)
    assert out.returncode == 2 and "--metrics-port-offset" in out.stderr, out
    assert not (tmp_path / "c" / "cluster.json").exists()


def test_cluster_up_refuses_an_offset_past_the_last_port(tmp_path):
    out = sixfold("cluster", "up", "--cluster", tmp_path / "c", "--base-port", 60000, "--metrics-port-offset", 6000)
    assert out.returncode == 3, out
    assert "InvalidArgument: metrics port offset 6000: give a whole number in 1..5529" in out.stderr, out.stderr
    assert not (tmp_path / "c" / "cluster.json").exists()


def test_cluster_up_refuses_a_busy_metrics_port_before_it_starts_anything(tmp_path):
    base = free_base_port()
    with hold_port("127.0.0.1", base + METRICS_PORT_OFFSET_DEFAULT + 3):
        out = sixfold("cluster", "up", "--cluster", tmp_path / "c", "--base-port", base, "--insecure", "--timeout-s", 30)
    assert out.returncode == 3, out
    assert (f"port {base + METRICS_PORT_OFFSET_DEFAULT + 3} (127.0.0.1:{base + METRICS_PORT_OFFSET_DEFAULT + 3}, "
            "the metrics port of n3) is already in use") in out.stderr, out.stderr
    m = json.loads((tmp_path / "c" / "cluster.json").read_text()) if (tmp_path / "c" / "cluster.json").exists() else None
    assert m is None or all(n["pid"] is None for n in m["nodes"]), "nothing was started"


# --- the manifest's metrics ports -------------------------------------------------------------------
def test_metrics_ports_follow_each_process_port(tmp_path):
    m = new_manifest(base_port=7400)
    assert m["metrics_port_offset"] == METRICS_PORT_OFFSET_DEFAULT
    assert metrics_address(m, m[WRITER]["address"]) == "127.0.0.1:8400"
    assert [metrics_port(m, n["address"]) for n in m["nodes"]] == list(range(8401, 8407))
    # New processes take the next port above the gRPC ports, skipping one whose metrics port is taken.
    assert not port_clashes(m, 7407) and port_clashes(m, 7403) and port_clashes(m, 8401)
    m2 = dict(m, metrics_port_offset=1)
    assert port_clashes(m2, 7407), "7407 + 1 would be nobody's, but 7407 is n6's metrics port"
    # A manifest written before metrics has the default; `null` turns them off.
    old = {k: v for k, v in m.items() if k != "metrics_port_offset"}
    save_manifest(str(tmp_path / "old"), old)
    assert metrics_port(load_manifest(str(tmp_path / "old")), "127.0.0.1:7405") == 8405
    off = new_manifest(base_port=7400, metrics_port_offset=None)
    assert off["metrics_port_offset"] is None and metrics_address(off, "127.0.0.1:7401") is None
    assert not port_clashes(off, 7407)


@pytest.mark.parametrize("offset,match", [
    (0, r"'metrics_port_offset' must be an integer in 1..65534 or null"),
    ("1000", r"'metrics_port_offset' must be an integer in 1..65534 or null"),
    (3, r"'metrics_port_offset' must be an offset that makes every process's metrics port .* writer's 7400 \+ 3 is "
        r"nodes\[2\]'s port"),
    (60000, r"'metrics_port_offset' must be an offset .* writer's 7400 \+ 60000 is past 65535"),
])
def test_the_schema_checks_the_metrics_port_offset(tmp_path, offset, match):
    m = dict(new_manifest(base_port=7400), metrics_port_offset=offset)
    os.makedirs(tmp_path / "c")
    (tmp_path / "c" / "cluster.json").write_text(json.dumps(m))
    with pytest.raises(WrongFolder, match=match):
        load_manifest(str(tmp_path / "c"))


# --- a live cluster -------------------------------------------------------------------------------
@pytest.mark.cluster
def test_a_live_cluster_serves_metrics_on_every_process(tmp_path, capsys):
    from engine.cli import main

    c = Cluster(tmp_path / "c")
    try:
        c.up(base_port=free_base_port(8), protection_groups=2, durable=False, readers=1, timeout_s=120)
        st = c.status()
        addresses = {n["id"]: n["metrics"] for n in st["nodes"]} | {WRITER: st["writer"]["metrics"],
                                                                     "r1": st["readers"][0]["metrics"]}
        base = c.manifest["base_port"]
        assert addresses[WRITER] == f"127.0.0.1:{base + METRICS_PORT_OFFSET_DEFAULT}"
        assert addresses["n3"] == f"127.0.0.1:{base + 3 + METRICS_PORT_OFFSET_DEFAULT}"

        puts, gets = 12, 5
        with c.connect() as db:
            for i in range(puts):
                db.put(b"m%02d" % i, b"value %d" % i)
            for i in range(gets):
                assert db.get(b"m%02d" % i) == b"value %d" % i
            with pytest.raises(InvalidArgument, match="metrics ports"):
                db.metrics()
        with c.connect(role="reader") as ro:
            with pytest.raises(engine.ReadOnly):
                ro.put(b"k", b"v")

        vdl = c.status()["writer"]["vdl"]
        w = samples(scrape(addresses[WRITER]))
        assert w["sixfold_writer_serving"] == 1 and w["sixfold_vdl"] == vdl and vdl >= puts
        assert w["sixfold_put_latency_seconds_count"] == puts and w["sixfold_get_latency_seconds_count"] == gets
        assert w["sixfold_flush_records_count"] > 0 and w["sixfold_flush_records_sum"] >= 4 * puts
        assert w["sixfold_epoch"] == c.status()["writer"]["epoch"]
        assert "process_resident_memory_bytes" in w
        eventually(lambda: all(samples(scrape(addresses[WRITER]))[f'sixfold_scl_lag_lsns{{node="{n}"}}'] == 0 for n in NODES),
                   "every node caught up in the writer's metrics")
        records = {}
        for n in NODES:
            got = eventually(lambda: (v := samples(scrape(addresses[n])))[f'sixfold_node_vdl_hint{{node="{n}"}}'] == vdl
                             and v, f"{n} to be told VDL {vdl}")
            assert got[f'sixfold_node_up{{node="{n}"}}'] == 1
            # Not VDL records: LSNs need not be dense (a loaded CI run saw VDL 1,048,600 over
            # 24 records: the writer had opened past a truncated range, at a later epoch).
            records[n] = got[f'sixfold_node_records{{node="{n}"}}']
            assert puts <= records[n] <= vdl, (n, records[n], vdl)
            assert max(got[f'sixfold_scl{{node="{n}",pg="{pg}"}}'] for pg in (0, 1)) == vdl
            assert got[f'sixfold_corrupt_copies_found_total{{node="{n}"}}'] == 0
            assert f'sixfold_gossip_bytes_total{{direction="fetched",node="{n}"}}' in got
            assert f'sixfold_repair_bytes_total{{node="{n}"}}' in got
            assert "sixfold_put_latency_seconds_count" not in got, "a node serves no API"
        assert len(set(records.values())) == 1, f"every node holds every record: {records}"
        r = eventually(lambda: (v := samples(scrape(addresses["r1"])))["sixfold_read_point"] == vdl and v,
                       "the reader to serve at the VDL")
        assert r["sixfold_writer_serving"] == 0 and r["sixfold_replica_lag_lsns"] == 0
        assert r["sixfold_replica_writer_connected"] == 1
        assert r['sixfold_errors_total{kind="ReadOnly"}'] >= 1

        capsys.readouterr()
        assert main(["cluster", "status", "--cluster", c.folder]) == 0
        table = capsys.readouterr().out
        header = next(line for line in table.splitlines() if line.startswith("process"))  # the one status view
        assert header.split()[:4] == ["process", "az", "address", "metrics"], header
        assert all(a in table for a in addresses.values()), table
        assert main(["cluster", "status", "--cluster", c.folder, "--json"]) == 0
        js = json.loads(capsys.readouterr().out)
        assert {n["id"]: n["metrics"] for n in js["nodes"]} == {n: addresses[n] for n in NODES}
        assert js["writer"]["metrics"] == addresses[WRITER] and js["readers"][0]["metrics"] == addresses["r1"]
    finally:
        c.down(timeout_s=10)
    for a in addresses.values():
        with pytest.raises(urllib.error.URLError):
            scrape(a)
