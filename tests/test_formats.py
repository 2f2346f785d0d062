"""Formats carry a version, and what an earlier release wrote still opens.

The fixtures in tests/fixtures/ were written by the release whose format they record
(tests/fixtures/make_fixtures.py); each test copies one to a temporary folder first, so the
kept files are never changed. A later release must keep these tests passing, or make them
expect a refusal whose message says how to upgrade.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

import engine
from engine.cluster.manifest import (
    ENCRYPTED_MANIFEST_FORMAT,
    MANIFEST_FORMAT,
    PLAIN_MANIFEST_FORMAT,
    ClusterError,
    load_manifest,
    new_manifest,
    save_manifest,
)
from engine.formats import format_of
from engine.embedded import PLAIN_VOLUME_FORMAT, VOLUME_FILE, VOLUME_FORMAT
from engine.errors import WrongFolder

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
VOLUME_1 = os.path.join(FIXTURES, "volume-format-1")
CLUSTER_1 = os.path.join(FIXTURES, "cluster-format-1")


def b(s: str) -> bytes:
    return s.encode("latin-1")  # the fixture's JSON writes bytes as latin-1 strings


@pytest.fixture
def expected() -> dict:
    with open(os.path.join(FIXTURES, "volume-format-1.json")) as fh:
        return json.load(fh)


@pytest.fixture
def volume_1(tmp_path) -> str:
    d = str(tmp_path / "volume")
    shutil.copytree(VOLUME_1, d)
    return d


def read_json(path: str) -> dict:
    with open(path) as fh:
        return json.load(fh)


def write_json(path: str, doc: dict) -> None:
    with open(path, "w") as fh:
        json.dump(doc, fh)


def check_contents(db, expected: dict) -> None:
    values = {b(k): b(v) for k, v in expected["values"].items()}
    for k, v in values.items():
        assert db.get(k) == v, k
        assert db.get(k, quorum=True) == v, k
    for k in expected["deleted"]:
        assert db.get(b(k)) is None, k
    assert list(db.scan()) == sorted(values.items()), "nothing more, nothing less, in key order"
    batch = expected["batch"]
    with db.snapshot() as snap:  # the batch is whole at one read point
        assert {b(k): snap.get(b(k)) for k in batch["puts"]} == {b(k): b(v) for k, v in batch["puts"].items()}
        assert all(snap.get(b(k)) is None for k in batch["deletes"])
        assert snap.read_point >= batch["lsn"]


def check_contents_except(db, expected: dict, extra: bytes) -> None:
    values = {b(k): b(v) for k, v in expected["values"].items()}
    assert [kv for kv in db.scan() if kv[0] != extra] == sorted(values.items())


# --- the kept volume ------------------------------------------------------------------------
#: every kept volume fixture (one per format combination written so far), opened by every release
KEPT_VOLUMES = sorted(n for n in os.listdir(FIXTURES) if n.startswith("volume-format-") and os.path.isdir(os.path.join(FIXTURES, n)))


@pytest.mark.parametrize("name", KEPT_VOLUMES)
def test_every_kept_volume_opens_with_what_it_holds(tmp_path, name):
    with open(os.path.join(FIXTURES, name + ".json")) as fh:
        kept = json.load(fh)
    d = str(tmp_path / "volume")
    shutil.copytree(os.path.join(FIXTURES, name), d)
    with engine.open(d) as db:
        check_contents(db, kept)
        for rid, lsn in kept.get("requests", {}).items():  # request ids (node format 2 and later)
            st = db.status_of(b(rid))
            assert (st.state, st.lsn) == ("committed", lsn), rid
        for k, deadline in kept.get("expiring", {}).items():  # deadlines (node format 4 and later)
            assert db.version(b(k)).deadline_us == deadline, k
        for k in kept["values"]:
            if k not in kept.get("expiring", {}):
                assert db.version(b(k)).deadline_us == 0, k


def test_the_kept_volumes_include_one_from_before_node_formats_and_one_of_this_release():
    from engine.node.store import NODE_FORMAT

    assert "volume-format-1" in KEPT_VOLUMES
    assert f"volume-format-1-node-{NODE_FORMAT}" in KEPT_VOLUMES


@pytest.mark.parametrize("name", KEPT_VOLUMES)
def test_the_fixture_is_small_and_holds_no_lock_files(name):
    total = 0
    for root, _dirs, files in os.walk(os.path.join(FIXTURES, name)):
        for name in files:
            assert name not in ("LOCK", "lock.mdb"), os.path.join(root, name)
            total += os.path.getsize(os.path.join(root, name))
    assert 0 < total <= 512 << 10


def test_a_format_1_volume_opens_with_every_key_and_the_batch(volume_1, expected):
    assert read_json(os.path.join(volume_1, VOLUME_FILE))["format"] == 1 == expected["format"]
    with engine.open(volume_1) as db:
        st = db.status()
        assert (st["volume_id"], st["protection_groups"]) == (expected["volume_id"], expected["protection_groups"])
        check_contents(db, expected)
        db.put(b"written:later", b"by this release")
    with engine.open(volume_1) as db:  # and it stays writable and readable
        assert db.get(b"written:later") == b"by this release"
        check_contents_except(db, expected, b"written:later")


def test_a_volume_written_before_the_format_field_is_upgraded_in_place(volume_1, expected):
    f = os.path.join(volume_1, VOLUME_FILE)
    doc = read_json(f)
    del doc["format"]  # format 0: format 1 without the field
    write_json(f, doc)
    with engine.open(volume_1) as db:
        check_contents(db, expected)
    upgraded = read_json(f)
    assert upgraded.pop("format") == PLAIN_VOLUME_FORMAT == 1
    assert upgraded == doc, "the upgrade only adds the field"


def test_a_newer_volume_format_is_refused_and_changes_nothing(volume_1):
    f = os.path.join(volume_1, VOLUME_FILE)
    doc = read_json(f)
    doc["format"] = VOLUME_FORMAT + 1
    write_json(f, doc)
    with open(f, "rb") as fh:
        before = fh.read()
    with pytest.raises(WrongFolder) as e:
        engine.open(volume_1)
    msg = str(e.value)
    assert f"format {VOLUME_FORMAT + 1}" in msg and f"reads format {VOLUME_FORMAT}" in msg and "newer" in msg
    with open(f, "rb") as fh:
        assert fh.read() == before
    doc["format"] = PLAIN_VOLUME_FORMAT
    write_json(f, doc)
    engine.open(volume_1).close()  # the refused open released the folder


@pytest.mark.parametrize("bad", ["1", True, -1, None], ids=["str", "bool", "negative", "null"])
def test_a_format_no_release_writes_is_refused(volume_1, bad):
    f = os.path.join(volume_1, VOLUME_FILE)
    doc = read_json(f)
    doc["format"] = bad
    write_json(f, doc)
    with pytest.raises(WrongFolder) as e:
        engine.open(volume_1)
    assert "format" in str(e.value)


def test_a_volume_file_missing_more_than_the_format_is_refused_not_upgraded(volume_1):
    f = os.path.join(volume_1, VOLUME_FILE)
    doc = read_json(f)
    del doc["format"], doc["nodes"]
    write_json(f, doc)
    with pytest.raises(WrongFolder) as e:
        engine.open(volume_1)
    assert "no nodes" in str(e.value)
    assert "format" not in read_json(f), "not upgraded"


def test_an_unreadable_volume_file_is_refused(volume_1):
    with open(os.path.join(volume_1, VOLUME_FILE), "w") as fh:
        fh.write('{"format": 1, "volume_')
    with pytest.raises(WrongFolder) as e:
        engine.open(volume_1)
    assert VOLUME_FILE in str(e.value)


def test_a_new_volume_records_this_releases_format(tmp_path):
    engine.open(tmp_path / "v").close()
    assert read_json(str(tmp_path / "v" / VOLUME_FILE))["format"] == PLAIN_VOLUME_FORMAT
    # an encrypted one records format 2, which a release before encryption refuses as newer
    engine.open(tmp_path / "e", encryption_key=b"k" * 32).close()
    assert read_json(str(tmp_path / "e" / VOLUME_FILE))["format"] == VOLUME_FORMAT == 2


def test_a_plain_volume_file_claiming_format_2_is_refused(volume_1):
    f = os.path.join(volume_1, VOLUME_FILE)
    doc = read_json(f)
    doc["format"] = 2  # the encrypted format, without an encryption field
    write_json(f, doc)
    with pytest.raises(WrongFolder, match="encryption"):
        engine.open(volume_1)


# --- the cluster manifest -------------------------------------------------------------------
def test_a_format_1_manifest_loads(tmp_path):
    d = str(tmp_path / "c")
    shutil.copytree(CLUSTER_1, d)
    m = load_manifest(d)
    assert m["format"] == PLAIN_MANIFEST_FORMAT == 1
    assert "encryption" not in m and "key_file" not in m
    assert m["volume_id"] == "00000000-0000-4000-8000-000000000001"
    assert [n["id"] for n in m["nodes"]] == ["n1", "n2", "n3", "n4", "n5", "n6"]
    assert m["writer"]["address"] == "127.0.0.1:7400"


def test_a_new_manifest_records_its_format(tmp_path):
    save_manifest(str(tmp_path), new_manifest(base_port=17400))
    assert read_json(str(tmp_path / "cluster.json"))["format"] == PLAIN_MANIFEST_FORMAT == 1


MASTER = bytes(range(32))


def encrypted_manifest(folder: str) -> dict:
    m = new_manifest(base_port=17400, master_key=MASTER, key_file="/somewhere/else/master.key")
    save_manifest(folder, m)
    return m


def test_an_encrypted_manifest_is_format_2_with_its_wrapped_key_and_key_file_path_never_the_key(tmp_path):
    import base64

    from engine.envelope import unwrap

    encrypted_manifest(str(tmp_path))
    text = (tmp_path / "cluster.json").read_text()
    doc = json.loads(text)
    assert doc["format"] == ENCRYPTED_MANIFEST_FORMAT == 2 and MANIFEST_FORMAT >= 2  # 3: placed (engine.cluster.spec)
    assert doc["key_file"] == "/somewhere/else/master.key"
    assert len(unwrap(doc["encryption"], MASTER, doc["volume_id"])) == 32, "the data key, wrapped by the master key"
    assert base64.b64encode(MASTER).decode() not in text and MASTER.hex() not in text
    m = load_manifest(str(tmp_path))  # and this release reads it back as it is
    assert m["format"] == 2 and m["encryption"] == doc["encryption"]


def test_a_release_before_encryption_refuses_an_encrypted_manifest_as_newer(tmp_path):
    """That release read format 1 at most (its MANIFEST_FORMAT): the same version check, with
    its number, refuses the encrypted manifest instead of starting a writer that serves
    ciphertext; a plain manifest of this release is still format 1, which it reads."""
    encrypted_manifest(str(tmp_path / "e"))
    with pytest.raises(ClusterError, match="format 2; this release reads format 1.*newer"):
        format_of(read_json(str(tmp_path / "e" / "cluster.json")), 1, "cluster.json", "cluster was set up", ClusterError)
    save_manifest(str(tmp_path / "p"), new_manifest(base_port=17400))
    assert format_of(read_json(str(tmp_path / "p" / "cluster.json")), 1, "cluster.json", "cluster was set up",
                     ClusterError) == 1


def test_format_and_encryption_field_must_agree(tmp_path):
    encrypted_manifest(str(tmp_path))
    f = str(tmp_path / "cluster.json")
    doc = read_json(f)
    plain_claiming_encrypted = {k: v for k, v in doc.items() if k != "encryption"}
    write_json(f, plain_claiming_encrypted)
    with pytest.raises(WrongFolder, match="'encryption'.*missing"):
        load_manifest(str(tmp_path))
    write_json(f, dict(doc, format=1))  # an encrypted volume dressed as format 1: an old release would serve it
    with pytest.raises(WrongFolder, match="'encryption'.*plain"):
        load_manifest(str(tmp_path))
    write_json(f, dict(doc, encryption={"scheme": "rot13", "wrapped_key": "AAAA"}))
    with pytest.raises(WrongFolder, match="encryption.scheme"):
        load_manifest(str(tmp_path))
    write_json(f, dict(doc, key_file="relative/master.key"))
    with pytest.raises(WrongFolder, match="'key_file'.*absolute"):
        load_manifest(str(tmp_path))
    m = dict(doc)
    m["format"] = 1
    with pytest.raises(AssertionError):  # the writer of the file never writes a mismatch either
        save_manifest(str(tmp_path), m)


def test_a_manifest_written_before_the_format_field_loads_and_gains_it_on_the_next_write(tmp_path):
    d = str(tmp_path / "c")
    shutil.copytree(CLUSTER_1, d)
    f = os.path.join(d, "cluster.json")
    doc = read_json(f)
    del doc["format"]
    write_json(f, doc)
    m = load_manifest(d)
    assert m["volume_id"] == doc["volume_id"]
    assert "format" not in read_json(f), "loading never writes"
    save_manifest(d, m)
    saved = read_json(f)
    assert saved.pop("format") == PLAIN_MANIFEST_FORMAT
    assert saved == doc


@pytest.mark.parametrize("bad", [MANIFEST_FORMAT + 1, "1", True], ids=["newer", "str", "bool"])
def test_a_manifest_of_another_format_is_refused(tmp_path, bad):
    d = str(tmp_path / "c")
    shutil.copytree(CLUSTER_1, d)
    f = os.path.join(d, "cluster.json")
    doc = read_json(f)
    doc["format"] = bad
    write_json(f, doc)
    # A newer format is the version check's ClusterError; a format that is no int is a wrong shape
    # (the schema's WrongFolder naming the field). Either way one clear line naming "format".
    with pytest.raises((ClusterError, WrongFolder)) as e:
        load_manifest(d)
    assert "format" in str(e.value)
    if bad == MANIFEST_FORMAT + 1:
        assert f"format {bad}" in str(e.value) and f"reads format {MANIFEST_FORMAT}" in str(e.value)
