"""The one status view (engine.cluster.overview): `sixfold status`, `cluster status` and `node
rebuild-status` show one table of every process (node, writer, reader: AZ, address, role,
health, epoch, lag, storage, repair, faults) and the same `processes` in their JSON, with
per-PG detail under `--detail`; and for a deployment spec it asks the processes over the network
(no pids to go by)."""

from __future__ import annotations

import json
import os

import pytest
from waiting import eventually

from engine.cli import main
from engine.cluster import Cluster, overview
from engine.cluster.testing import free_base_port

KEYS = ("id", "role", "az", "address", "metrics", "pid", "health", "epoch", "lag", "lag_ms", "used_bytes",
        "capacity_bytes", "max_storage_bytes", "repair", "faults")


def launcher_status() -> dict:
    """A launcher status as StatusView builds it (two PGs, a reader; n3 paused and behind)."""
    node = lambda i, az, health="SERVING", scls=(5, 7): {  # noqa: E731
        "id": f"n{i}", "az": az, "address": f"127.0.0.1:740{i}", "metrics": None, "pid": 100 + i, "health": health,
        "epoch": 2, "scls": list(scls), "scl_min": min(scls), "scl_max": max(scls), "used_bytes": 1 << 20,
        "capacity_bytes": 1 << 30, "repaired": 0, "corrupt_found": 0,
        "rebuild": {"fraction": 1.0, "complete": True, "fetched_records": 0}, "lag": 0, "lag_max": 0}
    nodes = [node(1, "a"), node(2, "a"), node(3, "b", "PAUSED", (2, 7)), node(4, "b"), node(5, "c"), node(6, "c")]
    nodes[2].update(lag=3, lag_max=3, rebuild={"fraction": 0.75, "complete": False, "fetched_records": 4})
    return {"volume_id": "v", "nodes": nodes,
            "writer": {"address": "127.0.0.1:7400", "pid": 99, "health": "SERVING", "epoch": 2, "vdl": 7, "pgcl": [5, 7],
                       "metrics": None},
            "readers": [{"id": "r1", "az": "b", "address": "127.0.0.1:7407", "pid": 98, "health": "SERVING", "epoch": 2,
                         "lag_lsns": 1, "lag_ms": 2.5, "metrics": None}]}


def test_every_process_is_one_row_of_one_shape():
    rows = overview.from_launcher(launcher_status(), cuts={"n3": ["n1", "writer"]})
    assert [r["id"] for r in rows] == ["n1", "n2", "n3", "n4", "n5", "n6", "writer", "r1"]
    assert all(set(r) == set(KEYS) for r in rows), [set(r) ^ set(KEYS) for r in rows]
    n3 = rows[2]
    assert n3["faults"] == ["paused (SIGSTOP)", "cut from n1, writer"] and n3["lag"] == 3
    assert n3["repair"]["fraction"] == 0.75 and not n3["repair"]["complete"]
    assert rows[-1]["role"] == "reader" and rows[-1]["lag"] == 1 and rows[-1]["lag_ms"] == 2.5
    text = overview.table(rows)
    assert text.splitlines()[0].split() == list(overview.HEADERS)
    assert "75%" in text and "cut from n1, writer" in text and "1 MiB" in text and "1 GiB" in text


def test_detail_adds_each_nodes_pgs():
    rows = overview.from_launcher(launcher_status(), detail=True)
    assert rows[2]["pgs"] == [{"pg": 0, "scl": 2, "pgcl": 5, "lag": 3}, {"pg": 1, "scl": 7, "pgcl": 7, "lag": 0}]
    assert "pgs" not in overview.from_launcher(launcher_status())[0]
    text = overview.table(rows, detail=True)
    assert any(line.split() == ["n3", "0", "2", "5", "3"] for line in text.splitlines()), text


def test_the_writers_view_gives_the_same_shape():
    st = {"epoch": 3, "vdl": 9, "nodes": [
        {"id": "n1", "az": "a", "address": "10.0.1.10:7401", "up": True, "epoch": 3, "scl": {"0": 4, "1": 9},
         "lag": {"0": 1, "1": 0}, "used_bytes": 10, "capacity_bytes": 100},
        {"id": "n2", "az": "a", "address": "10.0.1.10:7402", "up": False}]}
    rows = overview.from_writer(st, "10.0.1.10:7400", detail=True)
    assert all(set(r) - {"pgs"} == set(KEYS) for r in rows)
    assert rows[0]["lag"] == 1 and rows[0]["pgs"][0] == {"pg": 0, "scl": 4, "pgcl": 5, "lag": 1}
    assert rows[1]["health"] == "UNREACHABLE" and rows[2]["address"] == "10.0.1.10:7400"


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path / "c")
    try:
        c.up(base_port=free_base_port(), protection_groups=2, durable=False, readers=1, no_metrics=True)
        yield c
    finally:
        c.down(timeout_s=10)


@pytest.mark.cluster
def test_the_three_commands_print_one_table_and_one_json_shape(cluster, capsys):
    with cluster.connect() as db:
        db.put(b"k", b"v")
    shapes, headers = [], []
    for argv in (["status"], ["cluster", "status"], ["node", "rebuild-status"]):
        assert main([*argv, "--cluster", cluster.folder, "--json"]) == 0
        st = json.loads(capsys.readouterr().out)
        shapes.append([(p["id"], p["role"], sorted(p)) for p in st["processes"]])
        assert main([*argv, "--cluster", cluster.folder]) == 0
        headers.append(capsys.readouterr().out.splitlines()[0].split())
    assert shapes[0] == shapes[1] == shapes[2]
    assert [s[:2] for s in shapes[0]] == [(f"n{i}", "node") for i in range(1, 7)] + [("writer", "writer"), ("r1", "reader")]
    assert headers[0] == headers[1] == headers[2] == list(overview.HEADERS)
    assert main(["cluster", "status", "--cluster", cluster.folder, "--json", "--detail"]) == 0
    st = json.loads(capsys.readouterr().out)
    n1 = next(p for p in st["processes"] if p["id"] == "n1")
    assert [g["pg"] for g in n1["pgs"]] == [0, 1] and all(g["lag"] == 0 for g in n1["pgs"])
    assert main(["status", "--cluster", cluster.folder, "--detail"]) == 0
    assert "pgcl" in capsys.readouterr().out


@pytest.mark.cluster
def test_status_shows_the_processes_when_the_writer_is_down(cluster, capsys):
    cluster.kill("writer")
    assert main(["status", "--cluster", cluster.folder]) == 3
    out = capsys.readouterr()
    assert "writer" in out.out and "DOWN" in out.out and "n6" in out.out


def test_one_way_drops_show_in_their_direction():
    """An nft fault table as `nft list table` prints it: the input chain names who the process
    cannot hear, the output chain whom it cannot reach; both ways is a cut."""
    listing = """table inet sixfold_faults {
	chain input {
		type filter hook input priority -300; policy accept;
		ip saddr { 198.18.13.11, 198.18.14.10 } drop
	}

	chain output {
		type filter hook output priority -300; policy accept;
		ip daddr { 198.18.14.10, 198.18.15.100 } drop
	}
}
"""
    by_address = {"198.18.13.11": "writer", "198.18.14.10": "n3", "198.18.15.10": "n5", "198.18.15.100": "r1"}
    drops = overview.chain_drops(listing, by_address)
    assert drops == {"reach": ["n3", "r1"], "hear": ["n3", "writer"]}
    assert overview._faults("n1", "SERVING", {"n1": drops}) == ["cut from n3", "cannot reach r1", "cannot hear writer"]
    assert overview.chain_drops("", by_address) == {"reach": [], "hear": []}


# --- the view from one reachable process: `sixfold status --via HOST:PORT` ----------------------
def _via(cluster, capsys, address: str, *extra: str) -> tuple[int, dict | None, str]:
    code = main(["status", "--via", address, "--json", *extra])
    out = capsys.readouterr()
    return code, json.loads(out.out) if out.out else None, out.err


def _shape(st: dict) -> list:
    return [(p["id"], p["role"], p["az"], p["address"], sorted(p)) for p in st["processes"]]


@pytest.mark.cluster
def test_status_via_one_process_shows_every_process_in_the_folders_shape(cluster, capsys):
    """Given one node's address and nothing else (no folder): the node names the others, each is
    asked directly, and the JSON is the folder-based one; a killed node is UNREACHABLE seen from
    any process; without a certificate of the cluster nothing is told at all."""
    folder = cluster.folder
    auth = ("--cert", os.path.join(folder, "tls", "admin.pem"), "--token-file", os.path.join(folder, "operator.token"))
    with cluster.connect() as db:
        db.put(b"k", b"v")
    assert main(["status", "--cluster", folder, "--json"]) == 0
    by_folder = json.loads(capsys.readouterr().out)
    def all_serving():
        r = _via(cluster, capsys, cluster.address("n3"), *auth)
        return r if r[0] == 0 and all(p["health"] == "SERVING" for p in r[1]["processes"]) else None

    code, via, _ = eventually(all_serving, "status via n3 to find every process SERVING")
    assert sorted(via) == sorted(by_folder) and _shape(via) == _shape(by_folder)
    assert [(p["id"], p["role"]) for p in via["processes"]] == [(f"n{i}", "node") for i in range(1, 7)] + [
        ("writer", "writer"), ("r1", "reader")]
    assert via["processes"][6]["pid"] == cluster.pid("writer") and via["vdl"] == by_folder["vdl"]

    cluster.kill("n4")
    for asked in ("n1", "writer", "r1"):  # any reachable process will do: a node, the writer, a reader
        def n4_gone():
            r = _via(cluster, capsys, cluster.address(asked), *auth)
            health = {p["id"]: p["health"] for p in r[1]["processes"]}
            return r if health.pop("n4") == "UNREACHABLE" and set(health.values()) == {"SERVING"} else None

        code, via, _ = eventually(n4_gone, f"status via {asked} to see n4 gone and the others SERVING")
        rows = {p["id"]: p for p in via["processes"]}
        assert code == 0 and sorted(rows) == ["n1", "n2", "n3", "n4", "n5", "n6", "r1", "writer"]
        assert [i for i, p in rows.items() if p["health"] != "SERVING"] == ["n4"] and rows["n4"]["epoch"] is None
    assert main(["status", "--via", cluster.address("n1"), *auth]) == 0
    table = capsys.readouterr().out
    assert any(line.split()[:1] == ["n4"] and "UNREACHABLE" in line.split() for line in table.splitlines()), table

    # No certificate (an attacker on the network): the handshake fails, no process is named.
    code, via, err = _via(cluster, capsys, cluster.address("n3"))
    assert code == 3 and via is None and "--cert" in err and "n1" not in err
    code, via, err = _via(cluster, capsys, cluster.address("writer"), "--cert", os.path.join(folder, "tls", "no-such.pem"))
    assert code != 0 and via is None


@pytest.mark.cluster
def test_status_via_an_endpoint_of_an_older_release_builds_the_view_from_its_status(cluster):
    """An endpoint of a release before `Directory` answers that RPC UNIMPLEMENTED; its `Status`
    still names the nodes and their addresses, and the view is built from that. Stood in for here
    by a KV server that serves Status only (relayed to the real writer) and health."""
    import grpc

    from engine.cluster.admin import WriterAdmin
    from engine.cluster.status import status_via
    from engine.proto import common_pb2, kv_pb2_grpc
    from engine.security.users import default_token
    from engine.transport.grpc_server import add_health, make_server, set_health

    token = default_token(cluster.folder)
    writer = WriterAdmin(cluster.address("writer"), cluster.tls(), token)

    class OlderEndpoint(kv_pb2_grpc.KVServicer):  # the generated base answers UNIMPLEMENTED to the rest
        def Status(self, request, context):
            return writer.call("Status", request, 5.0)

    server, port = make_server("127.0.0.1:0", 2, tls=cluster.tls("writer"))
    kv_pb2_grpc.add_KVServicer_to_server(OlderEndpoint(), server)
    set_health(add_health(server, ("sixfold.v1.KV",)), ("sixfold.v1.KV",), True)
    server.start()
    try:
        address = f"127.0.0.1:{port}"
        with grpc.secure_channel(address, cluster.tls().channel_credentials()) as ch:
            with pytest.raises(grpc.RpcError) as e:
                kv_pb2_grpc.KVStub(ch).Directory(common_pb2.DirectoryRequest(), timeout=5)
            assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
        view = status_via(address, tls=cluster.tls(), token=token)
        rows = {p["id"]: p for p in view["processes"]}
        assert sorted(rows) == ["n1", "n2", "n3", "n4", "n5", "n6", "writer"]
        assert all(p["health"] == "SERVING" for p in rows.values()) and rows["writer"]["address"] == address
        assert rows["n2"]["address"] == cluster.address("n2") and rows["n2"]["az"] == "a"
    finally:
        server.stop(None)


def test_a_directory_a_process_of_this_release_would_not_send_is_refused():
    from engine.proto import common_pb2
    from engine.transport import convert

    good = convert.Directory("v", "n1", (convert.KnownProcess("n1", "node", "a", "10.0.1.10:7401"),
                                         convert.KnownProcess("writer", "writer", "a", "10.0.1.10:7400")))
    assert convert.directory_from_pb(convert.directory_to_pb(good)) == good
    for bad in (common_pb2.DirectoryReply(processes=[common_pb2.KnownProcess(id="x", role="admin", address="h:1")]),
                common_pb2.DirectoryReply(processes=[common_pb2.KnownProcess(id="", role="node", address="h:1")]),
                common_pb2.DirectoryReply(processes=[common_pb2.KnownProcess(id="n1", role="node", address="h" * 300)]),
                common_pb2.DirectoryReply(processes=[common_pb2.KnownProcess(id="n", role="node")] * 4097)):
        with pytest.raises(convert.InvalidArgument):
            convert.directory_from_pb(bad)
