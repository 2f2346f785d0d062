"""Encryption at rest for clusters: `sixfold cluster up --encrypt --key-file F`, real processes.

One encrypted cluster (TLS, the default) carries the module: the KV API works through
`engine.connect`; a grep of every file of the cluster folder (node data, logs, manifest,
certificates) finds neither a known key nor a known value; the status says encrypted; a writer
started without its key file, with a missing one or with a wrong key fails at once with an
EncryptionError that `writer serve` / `writer start` report (never a hang); `cluster rekey`
re-wraps the data key without a restart, and the writer restarts with the new key only. A plain
`--insecure` cluster is the control: the same grep finds the key and the value there, so the
grep can fail. The rekey test runs last (it changes the key).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

import engine
from waiting import DEADLINE_S

from engine.cli import main
from engine.cluster import Cluster
from engine.cluster.commands import status_table
from engine.cluster.manifest import load_manifest, locked, save_manifest
from engine.cluster.testing import engine_env, free_base_port
from engine.envelope import load_master_key, unwrap

P = 2
SECRET_KEY = b"customer:4711:ssn"
SECRET_VALUE = b"the-plaintext-that-must-never-reach-the-disk"
ROWS = {b"row:%03d" % i: b"row-value-%03d" % i for i in range(30)}

pytestmark = pytest.mark.cluster  # real node, writer and reader processes


def cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def found_in_files(folder, needle: bytes) -> list[str]:
    hits = []
    for root, _dirs, names in os.walk(folder):
        for n in names:
            path = os.path.join(root, n)
            with open(path, "rb") as fh:
                if needle in fh.read():
                    hits.append(os.path.relpath(path, folder))
    return hits


def fill(db) -> None:
    db.put(SECRET_KEY, SECRET_VALUE)
    with db.batch() as b:
        for k, v in ROWS.items():
            b.put(k, v)


def up_args(folder, *extra):
    return ("cluster", "up", "--cluster", folder, "--base-port", free_base_port(), "--protection-groups", P,
            "--no-durable", "--gossip-interval-s", "0.2", "--timeout-s", DEADLINE_S, *extra)


@pytest.fixture(scope="module")
def enc(tmp_path_factory):
    root = tmp_path_factory.mktemp("enc")
    keys = root / "keys"  # outside the cluster folder, as the docs say
    keys.mkdir()
    key, other = keys / "master.key", keys / "other.key"
    assert main(["key", "new", str(key)]) == 0 and main(["key", "new", str(other)]) == 0
    folder = root / "c"
    assert main([str(a) for a in up_args(folder, "--encrypt", "--key-file", key)]) == 0
    c = Cluster(folder)
    db = c.connect(timeout_s=30)
    try:
        fill(db)
        yield {"cluster": c, "db": db, "key": key, "other": other, "keys": keys}
    finally:
        db.close()
        c.down()


def writer_serve(folder, *extra, timeout_s=DEADLINE_S) -> subprocess.CompletedProcess:
    """`sixfold writer serve` by hand, on a free port (it must stop before it listens)."""
    argv = [sys.executable, "-m", "engine", "writer", "serve", "--cluster", str(folder),
            "--listen", f"127.0.0.1:{free_base_port(1)}", *map(str, extra)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, env=engine_env())


# --- without processes ------------------------------------------------------------------------
def test_key_new_writes_a_private_key_file_and_never_overwrites_one(tmp_path, capsys):
    f = tmp_path / "m.key"
    code, out, _ = cli(capsys, "key", "new", f)
    assert code == 0 and str(f) in out
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o600
    before = f.read_bytes()
    assert len(load_master_key(before)) == 32
    code, _, err = cli(capsys, "key", "new", f)
    assert code == 2 and "never overwritten" in err
    assert f.read_bytes() == before


@pytest.mark.parametrize("flags", [("--key-file", "KEY"), ("--encrypt",)], ids=["key-file-alone", "encrypt-alone"])
def test_encrypt_and_key_file_go_together_or_it_is_a_usage_error(tmp_path, capsys, flags):
    main(["key", "new", str(tmp_path / "k")])
    folder = tmp_path / "c"
    code, _, err = cli(capsys, "cluster", "up", "--cluster", folder, *(str(tmp_path / "k") if a == "KEY" else a for a in flags))
    assert code == 2, err
    assert ("--encrypt" in err) and ("--key-file" in err)
    assert not folder.exists(), "a usage error creates nothing"


# --- against an encrypted cluster -----------------------------------------------------------
def test_put_get_scan_delete_work_on_an_encrypted_cluster(enc):
    db = enc["db"]
    assert db.get(SECRET_KEY) == SECRET_VALUE
    assert db.get(SECRET_KEY, quorum=True) == SECRET_VALUE
    assert list(db.scan(b"row:", b"row;")) == sorted(ROWS.items()), "keys come back in order"
    assert list(db.scan(b"row:010", b"row:013")) == [(k, ROWS[k]) for k in (b"row:010", b"row:011", b"row:012")]
    db.put(b"tmp:1", b"gone soon")
    db.delete(b"tmp:1")
    assert db.get(b"tmp:1") is None
    assert db.get(b"never:written") is None


def test_a_reader_instance_opens_values_with_the_key_file_the_manifest_names(enc):
    c, db = enc["cluster"], enc["db"]
    rid = c.add_reader()
    try:
        lsn = db.put(b"tmp:reader", b"sealed for the reader")
        with engine.connect(c.folder, role="reader") as ro:
            assert ro.get(SECRET_KEY, after=lsn) == SECRET_VALUE
            assert ro.get(b"tmp:reader") == b"sealed for the reader"
            assert list(ro.scan(b"row:010", b"row:013")) == [(k, ROWS[k]) for k in (b"row:010", b"row:011", b"row:012")]
            assert ro.status()["encrypted"] is True
        assert f"--key-file\x00{c.manifest['key_file']}".encode() in open(f"/proc/{c.pid(rid)}/cmdline", "rb").read()
    finally:
        c.remove_reader(rid)
        db.delete(b"tmp:reader")


def test_no_plaintext_key_or_value_in_any_file_of_the_cluster_folder(enc):
    c, key = enc["cluster"], enc["key"]
    folder = c.folder
    nodes = [os.path.join(folder, n["data"]) for n in c.manifest["nodes"]]
    assert all(found_in_files(n, b"") for n in nodes), "every node has data files (the grep reads something)"
    assert os.path.getsize(os.path.join(folder, "logs", "writer.log")) > 0
    # The grep covers node data folders, logs, the manifest and the certificates.
    assert found_in_files(folder, SECRET_KEY) == []
    assert found_in_files(folder, SECRET_VALUE) == []
    assert found_in_files(folder, b"row-value-007") == []
    # The manifest names the key file and holds the wrapped data key, never the master key.
    text = open(os.path.join(folder, "cluster.json")).read()
    master = load_master_key(key.read_bytes())
    assert key.read_text().strip() not in text and master.hex() not in text
    m = json.loads(text)
    assert m["format"] == 2 and m["key_file"] == str(key)
    assert len(unwrap(m["encryption"], master, m["volume_id"])) == 32


def test_a_plain_insecure_cluster_is_the_control_the_same_grep_finds_both(tmp_path, capsys, enc):
    folder = tmp_path / "plain"
    assert main([str(a) for a in up_args(folder, "--insecure")]) == 0
    c = Cluster(folder)
    try:
        with c.connect(timeout_s=30) as db:
            fill(db)
            assert db.get(SECRET_KEY) == SECRET_VALUE
            assert db.status()["encrypted"] is False
        nodes = os.path.join(str(folder), "nodes")
        assert found_in_files(nodes, SECRET_KEY), "the control stores the key in the clear"
        assert found_in_files(nodes, SECRET_VALUE), "the control stores the value in the clear"
        assert load_manifest(str(folder))["format"] == 1, "a plain cluster stays format 1 (older releases read it)"
        # Encryption is chosen at creation: a plain cluster cannot be switched on in place.
        before = (folder / "cluster.json").read_bytes()
        code, _, err = cli(capsys, "cluster", "up", "--cluster", folder, "--encrypt", "--key-file", enc["key"])
        assert code == 3 and "EncryptionError" in err and "not encrypted" in err, err
        assert (folder / "cluster.json").read_bytes() == before
    finally:
        c.down()


def test_status_says_the_volume_is_encrypted(enc, capsys):
    c, db = enc["cluster"], enc["db"]
    assert db.status()["encrypted"] is True  # the KV Status of the writer endpoint
    code, out, _ = cli(capsys, "cluster", "status", "--cluster", c.folder, "--json")
    assert code == 0
    st = json.loads(out)
    assert st["security"]["encrypted"] is True and st["security"]["key_file"] == str(enc["key"])
    assert st["writer"]["encrypted"] is True, "the running writer seals with the data key"
    assert "encrypted at rest" in status_table(st) and str(enc["key"]) in status_table(st)
    code, out, _ = cli(capsys, "status", "--cluster", c.folder)
    assert code == 0 and "encrypted True" in out


def test_a_writer_without_its_key_file_or_with_a_wrong_key_stops_at_once_with_a_clear_error(enc):
    folder = enc["cluster"].folder
    r = writer_serve(folder)
    assert r.returncode == 3, r.stderr
    assert "EncryptionError" in r.stderr and "is encrypted" in r.stderr and "--key-file" in r.stderr
    r = writer_serve(folder, "--key-file", enc["other"])
    assert r.returncode == 3 and "EncryptionError: wrong encryption key" in r.stderr, r.stderr
    r = writer_serve(folder, "--key-file", enc["keys"] / "no-such.key")
    assert r.returncode == 3 and "cannot read the key file" in r.stderr, r.stderr
    assert enc["db"].get(SECRET_KEY) == SECRET_VALUE, "the cluster's own writer kept serving"


def _point_key_file_at(folder, path) -> None:
    with locked(folder):
        m = load_manifest(folder)
        m["key_file"] = str(path)
        save_manifest(folder, m)


def test_writer_start_with_a_wrong_or_missing_key_is_reported_not_waited_for(enc, capsys):
    c = enc["cluster"]
    folder = c.folder
    assert cli(capsys, "writer", "kill", "--cluster", folder)[0] == 0
    try:
        for path, words in ((enc["other"], "wrong encryption key"), (enc["keys"] / "moved.key", "cannot read the key file")):
            _point_key_file_at(folder, path)
            code, _, err = cli(capsys, "writer", "start", "--cluster", folder, "--timeout-s", DEADLINE_S)
            assert code == 3, err
            assert "exited" in err and "EncryptionError" in err and words in err, err
            assert "not SERVING after" not in err, "it died at once: no waiting for the timeout"
    finally:
        _point_key_file_at(folder, enc["key"])
    assert cli(capsys, "writer", "start", "--cluster", folder, "--timeout-s", DEADLINE_S)[0] == 0
    with c.connect(timeout_s=30) as db:
        assert db.get(SECRET_KEY) == SECRET_VALUE
        assert dict(db.scan(b"row:", b"row;")) == ROWS


def test_cluster_up_with_a_wrong_key_file_on_the_encrypted_cluster_changes_nothing(enc, capsys):
    folder = enc["cluster"].folder
    before = open(os.path.join(folder, "cluster.json"), "rb").read()
    code, _, err = cli(capsys, "cluster", "up", "--cluster", folder, "--encrypt", "--key-file", enc["other"])
    assert code == 3 and "wrong encryption key" in err, err
    assert open(os.path.join(folder, "cluster.json"), "rb").read() == before


def test_rekey_rewraps_without_a_restart_and_the_writer_restarts_with_the_new_key_only(enc, capsys):
    c, old = enc["cluster"], enc["key"]
    folder = c.folder
    new = enc["keys"] / "new.key"
    assert main(["key", "new", str(new)]) == 0
    before = load_manifest(folder)
    writer_pid = c.pid("writer")
    code, out, err = cli(capsys, "cluster", "rekey", "--cluster", folder, "--key-file", old, "--new-key-file", new)
    assert code == 0, err
    after = load_manifest(folder)
    assert after["key_file"] == str(new) and after["encryption"] != before["encryption"]
    assert after["volume_id"] == before["volume_id"] and after["format"] == 2
    new_master = load_master_key(new.read_bytes())
    assert unwrap(after["encryption"], new_master, after["volume_id"]) == unwrap(
        before["encryption"], load_master_key(old.read_bytes()), before["volume_id"]), "the same data key, re-wrapped"
    # No restart: the same writer serves, reads and writes.
    assert c.pid("writer") == writer_pid
    db = enc["db"]
    db.put(b"after:rekey", b"still sealed")
    assert db.get(SECRET_KEY) == SECRET_VALUE
    # The old key no longer opens the volume.
    code, _, err = cli(capsys, "cluster", "rekey", "--cluster", folder, "--key-file", old, "--new-key-file", new)
    assert code == 3 and "wrong encryption key" in err, err
    r = writer_serve(folder, "--key-file", old)
    assert r.returncode == 3 and "wrong encryption key" in r.stderr, r.stderr
    # Restart with what the manifest now records: the new key.
    assert cli(capsys, "writer", "kill", "--cluster", folder)[0] == 0
    assert cli(capsys, "writer", "start", "--cluster", folder, "--timeout-s", DEADLINE_S)[0] == 0
    assert "--key-file\x00" + str(new) in open(f"/proc/{c.pid('writer')}/cmdline").read()
    with c.connect(timeout_s=30) as db2:
        assert db2.get(SECRET_KEY) == SECRET_VALUE
        assert db2.get(b"after:rekey") == b"still sealed"
        assert dict(db2.scan(b"row:", b"row;")) == ROWS
    assert found_in_files(folder, b"still sealed") == []
