"""A cluster.json that is valid JSON but the wrong shape is refused on load with one line naming
the field (`engine.errors.WrongFolder`), never a KeyError / AttributeError / TypeError later:
in `load_manifest`, `engine.connect(folder)`, the launcher's status, and the `sixfold` CLI
(`cluster status`, `get`, `cluster down`: exit 3, no traceback)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import engine
from engine.cluster import Cluster
from engine.cluster.manifest import MANIFEST_FORMAT as FORMAT, active_nodes, check_compatible, load_manifest, new_manifest, node_infos, used_ports
from engine.cluster.testing import engine_env
from engine.errors import SixfoldError, WrongFolder

BASE_PORT = 23400  # nothing is started: the ports are only written down


def good_manifest() -> dict:
    return new_manifest(base_port=BASE_PORT, protection_groups=4, durable=False)


def write(folder, manifest) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cluster.json").write_text(json.dumps(manifest))
    return str(folder)


def mutate(manifest: dict, field: str, value) -> dict:
    """A copy with `field` ("nodes[2].address", "writer.pid", "durable"...) set to `value`
    (or deleted, for DELETE)."""
    m = copy.deepcopy(manifest)
    parent, key = m, field
    if "." in field:
        head, key = field.split(".", 1)
        parent = m["writer"] if head == "writer" else m["nodes"][int(head[len("nodes["):-1])]
    elif field.startswith("nodes["):
        parent, key = m["nodes"], int(field[len("nodes["):-1])
    if value is DELETE:
        parent.pop(key, None) if isinstance(parent, dict) else parent.pop(key)
    else:
        parent[key] = value
    return m


DELETE = object()


def names(text: str, field: str) -> bool:
    """The message names `field` or a part of it (`'nodes[0]'` for a wrong `nodes`)."""
    return any(f"'{field}{end}" in text for end in ("'", ".", "["))

#: (field, wrong value): each must be named in the error.
MALFORMED = [
    ("volume_id", DELETE),
    ("volume_id", 7),
    ("protection_groups", "4"),
    ("protection_groups", 0),
    ("protection_groups", True),
    ("durable", "yes"),
    ("base_port", 70000),
    ("write_timeout_s", float("nan")),
    ("gossip_interval_s", -1),
    ("format", "1"),
    ("nodes", {"n1": {}}),
    ("nodes", []),
    ("nodes", ["n1", "n2"]),
    ("nodes[2]", None),
    ("nodes[2].address", "127.0.0.1"),
    ("nodes[2].address", "127.0.0.1:0"),
    ("nodes[2].address", "127.0.0.1:65536"),
    ("nodes[2].address", 7403),
    ("nodes[2].id", DELETE),
    ("nodes[2].id", ["n3"]),
    ("nodes[3].pid", "123"),
    ("nodes[3].pid", -5),
    ("nodes[4].data", None),
    ("nodes[4].data", "/etc"),
    ("nodes[5].retired", "no"),
    ("nodes[1].az", {}),
    ("writer", DELETE),
    ("writer", "127.0.0.1:7400"),
    ("writer.address", None),
    ("writer.log", DELETE),
]


def test_a_good_manifest_passes_and_extra_fields_are_allowed(tmp_path):
    m = good_manifest()
    m["comment"] = "written by hand"
    m["nodes"][0]["note"] = {"anything": [1, 2]}
    folder = write(tmp_path / "c", m)
    assert load_manifest(folder) == m
    assert Cluster(folder).node_ids == ["n1", "n2", "n3", "n4", "n5", "n6"]


@pytest.mark.parametrize("field,value", MALFORMED, ids=[f"{f}={'DELETE' if v is DELETE else repr(v)}" for f, v in MALFORMED])
def test_a_wrong_shape_is_refused_naming_the_field(tmp_path, field, value):
    folder = write(tmp_path / "c", mutate(good_manifest(), field, value))
    for attempt in (lambda: load_manifest(folder), lambda: engine.connect(folder), lambda: Cluster(folder).status(),
                    lambda: Cluster(folder).down()):
        with pytest.raises(WrongFolder) as info:
            attempt()
        text = str(info.value)
        assert names(text, field) and "cluster.json" in text and "\n" not in text, text
    assert not (tmp_path / "c" / "logs").exists(), "nothing was started"


def test_duplicate_ids_and_ports_are_named(tmp_path):
    m = mutate(good_manifest(), "nodes[4].id", "n2")
    with pytest.raises(WrongFolder, match=r"'nodes\[4\]\.id' must be unique \(it is the id of nodes\[1\] too\)"):
        load_manifest(write(tmp_path / "a", m))
    m = mutate(good_manifest(), "nodes[0].address", f"127.0.0.1:{BASE_PORT}")
    with pytest.raises(WrongFolder, match=r"'nodes\[0\]\.address' must be a port of its own \(port 23400 is writer's\)"):
        load_manifest(write(tmp_path / "b", m))


def test_a_newer_format_is_left_to_the_version_check(tmp_path):
    m = good_manifest()
    m["format"] = FORMAT + 1
    m["nodes"] = "a shape this release does not know"
    with pytest.raises(SixfoldError, match="format") as info:
        load_manifest(write(tmp_path / "c", m))
    assert not isinstance(info.value, WrongFolder) or "'nodes'" not in str(info.value)


def test_a_node_that_rereads_a_wrong_manifest_keeps_the_addresses_it_has(tmp_path):
    from engine.cluster.addresses import ManifestTransport

    folder = write(tmp_path / "c", good_manifest())
    transport = ManifestTransport(folder, "n1")
    try:
        before = dict(transport.addresses)
        write(tmp_path / "c", mutate(good_manifest(), "nodes", "n7"))
        assert transport.reload() is False
        assert transport.addresses == before
    finally:
        transport.close()


def sixfold(*args):
    return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True, timeout=120, env=engine_env())


@pytest.mark.parametrize("field,value", [("nodes", {"n1": {}}), ("writer", DELETE), ("nodes[2].address", "127.0.0.1")])
def test_the_cli_reports_a_wrong_shape_in_one_line_with_exit_3(tmp_path, field, value):
    folder = write(tmp_path / "c", mutate(good_manifest(), field, value))
    for args in (["cluster", "status", "--cluster", folder], ["get", "--cluster", folder, "k"],
                 ["cluster", "down", "--cluster", folder]):
        out = sixfold(*args)
        assert out.returncode == 3, (args, out.returncode, out.stderr)
        assert "Traceback" not in out.stderr and out.stderr.count("\n") == 1, out.stderr
        assert "WrongFolder" in out.stderr and names(out.stderr, field), out.stderr


# --- arbitrary JSON in place of every field -----------------------------------------------------
TOP_FIELDS = ["format", "volume_id", "protection_groups", "durable", "base_port", "host", "write_timeout_s",
              "gossip_interval_s", "nodes", "writer", "metrics_port_offset"]
NODE_FIELDS = ["id", "az", "address", "pid", "data", "log", "retired", "replaces", "replaced_by"]
FIELDS = (TOP_FIELDS + ["writer.address", "writer.pid", "writer.log"]
          + [f"nodes[{i}]" for i in (0, 5)] + [f"nodes[{i}].{f}" for i in (0, 3) for f in NODE_FIELDS])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
    | st.sampled_from(["127.0.0.1:1", "n1", "n9", "a", "x:y", "nodes/az-a/n1"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["id", "address", "pid", "x"]), inner, max_size=3),
    max_leaves=6,
)


def consumers(folder: str) -> None:
    """What reads a loaded manifest: any failure must be a SixfoldError."""
    from engine.client import resolve_target
    from engine.cluster.manifest import endpoint_config

    m = load_manifest(folder)
    c = Cluster(folder)
    c.node_ids, c.retired_ids, c.azs(), c.writer_address  # noqa: B018 - each reads the manifest
    active_nodes(m), node_infos(m), used_ports(m), endpoint_config(m)  # noqa: B018
    check_compatible(m, protection_groups=None, base_port=None)
    resolve_target(folder)
    c.status()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(FIELDS), value=st.one_of(st.just(DELETE), json_values))
def test_arbitrary_json_in_any_field_is_a_typed_error_or_works(tmp_path, field, value):
    folder = write(tmp_path / "h", mutate(good_manifest(), field, value))
    try:
        consumers(folder)
    except WrongFolder as e:
        text = str(e)
        entry = field.split(".")[0]
        named = names(text, field) or (entry in text and ("unique" in text or "of its own" in text))
        assert named and "\n" not in text, (field, value, text)
    except SixfoldError as e:
        assert field == "format", (field, value, e)  # the loader's version check


def test_readers_are_optional_and_checked(tmp_path):
    from engine.cluster.manifest import READERS_MAX, ClusterError, active_readers, add_reader_entry, identity_roles

    m = good_manifest()
    assert "readers" not in m and active_readers(load_manifest(write(tmp_path / "old", m))) == []  # an old manifest
    r1 = add_reader_entry(m, None, BASE_PORT + 7)
    r2 = add_reader_entry(m, None, BASE_PORT + 8)
    r3 = add_reader_entry(m, "a", BASE_PORT + 9)
    assert [(r["id"], r["az"]) for r in (r1, r2, r3)] == [("r1", "b"), ("r2", "c"), ("r3", "a")]
    assert add_reader_entry(copy.deepcopy(m), None, BASE_PORT + 10)["az"] == "b"  # b and c have one each: b first
    r2["retired"] = True
    assert [r["id"] for r in active_readers(load_manifest(write(tmp_path / "new", m)))] == ["r1", "r3"]
    assert identity_roles(m)["r1"] == "reader" and "r2" not in identity_roles(m)
    assert BASE_PORT + 8 in used_ports(m), "a removed reader's port is never reused"
    assert add_reader_entry(copy.deepcopy(m), None, BASE_PORT + 11)["id"] == "r4"
    for bad, match in (
        ({"readers": {"r1": {}}}, r"'readers' must be a list"),
        ({"readers": [dict(r1, id="n3")]}, r"'readers\[0\]\.id' must be unique \(it is the id of nodes\[2\] too\)"),
        ({"readers": [dict(r1, address=f"127.0.0.1:{BASE_PORT + 1}")]}, r"'readers\[0\]\.address' must be a port of its own"),
        ({"readers": [dict(r1, az="b c")]}, r"'readers\[0\]\.az'"),
        ({"readers": [{k: v for k, v in r1.items() if k != "log"}]}, r"'readers\[0\]\.log'"),
    ):
        with pytest.raises(WrongFolder, match=match):
            load_manifest(write(tmp_path / "bad", dict(m, **bad)))
    full = good_manifest()
    for i in range(READERS_MAX):
        add_reader_entry(full, None, BASE_PORT + 7 + i)
    with pytest.raises(ClusterError, match="15 readers"):
        add_reader_entry(full, None, BASE_PORT + 40)
