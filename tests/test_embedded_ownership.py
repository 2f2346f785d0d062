"""One owner per embedded folder, and `engine.open` refuses folders that hold other data.

Finding 1 of issue 8: process A holds `engine.open(d)`; process B opened `d` too, wrote a=2 and
closed; A's acknowledged `put(b"a", b"3")` was then read back by A as b"2". Now the second open,
from another process or this one, raises FolderInUse naming the holder and changes nothing.

The processes here are real (`python -c` children driven over a pipe), the LMDB files are real.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

import engine
from engine.cluster.manifest import new_manifest, save_manifest
from engine.errors import FolderInUse, GeometryMismatch, WrongFolder

#: A process that opens a volume and obeys one command a line: "put K V", "get K", "close".
#: It answers each command with one JSON line.
HOLDER = textwrap.dedent(
    """
    import json, sys
    import engine
    try:
        db = engine.open(sys.argv[1], write_timeout_s=10)
    except Exception as e:
        print(json.dumps({"error": type(e).__name__, "message": str(e)}), flush=True)
        sys.exit(0)
    print(json.dumps({"opened": True}), flush=True)
    for line in sys.stdin:
        cmd, *args = line.split()
        try:
            if cmd == "put":
                db.put(args[0].encode(), args[1].encode())
                out = {"ok": True}
            elif cmd == "get":
                v = db.get(args[0].encode())
                out = {"value": None if v is None else v.decode()}
            elif cmd == "close":
                db.close()
                out = {"closed": True}
            else:
                out = {"error": "unknown command " + cmd}
        except Exception as e:
            out = {"error": type(e).__name__, "message": str(e)}
        print(json.dumps(out), flush=True)
        if cmd == "close":
            break
    """
)


class Holder:
    """A child process holding (or trying to hold) `engine.open(path)`."""

    def __init__(self, path) -> None:
        self.p = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.pid = self.p.pid
        self.first = self._answer()

    def _answer(self) -> dict:
        line = self.p.stdout.readline()
        assert line, f"process {self.pid} ended without answering (exit {self.p.poll()})"
        return json.loads(line)

    def ask(self, command: str) -> dict:
        self.p.stdin.write(command + "\n")
        self.p.stdin.flush()
        return self._answer()

    def end(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait(timeout=60)
        self.p.stdin.close()
        self.p.stdout.close()


def tree(path) -> dict:
    """Every file under `path` with its size, mtime and content digest: "changes nothing"."""
    out = {}
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            f = os.path.join(root, name)
            st = os.stat(f)
            with open(f, "rb") as fh:
                digest = hashlib.sha256(fh.read()).hexdigest()
            out[os.path.relpath(f, path)] = (st.st_size, st.st_mtime_ns, digest)
        for name in dirs:
            out[os.path.relpath(os.path.join(root, name), path) + "/"] = None
    return out


# --- one owner per folder -------------------------------------------------------------------
def test_a_second_process_cannot_open_a_held_volume_and_the_holder_reads_its_own_writes(tmp_path):
    """The issue's scenario with two real processes."""
    d = tmp_path / "vol"
    a = Holder(d)
    try:
        assert a.first == {"opened": True}
        assert a.ask("put a 1") == {"ok": True}
        with open(d / "volume.json", "rb") as fh:
            volume_file = fh.read()
        b = Holder(d)  # process B
        try:
            assert b.first["error"] == "FolderInUse", b.first
            assert f"process {a.pid}" in b.first["message"] and str(d) in b.first["message"]
        finally:
            b.end()
        with pytest.raises(FolderInUse) as e:  # this (third) process is refused the same way
            engine.open(d)
        assert e.value.holder_pid == a.pid and e.value.folder == str(d)
        with open(d / "volume.json", "rb") as fh:
            assert fh.read() == volume_file
        assert a.ask("put a 3") == {"ok": True}
        assert a.ask("get a") == {"value": "3"}, "the holder reads back its own acknowledged write"
        assert a.ask("close") == {"closed": True}
        assert a.p.wait(timeout=60) == 0
    finally:
        a.end()
    # A closed: B (this process) may open now, and sees what A acknowledged.
    with engine.open(d) as db:
        assert db.get(b"a") == b"3"


def test_the_lock_dies_with_a_killed_holder(tmp_path):
    d = tmp_path / "vol"
    a = Holder(d)
    try:
        assert a.first == {"opened": True}
        assert a.ask("put k acked") == {"ok": True}
        with pytest.raises(FolderInUse):
            engine.open(d)
        a.p.send_signal(signal.SIGKILL)
        a.p.wait(timeout=60)
    finally:
        a.end()
    with engine.open(d) as db:  # the kernel dropped the lock; no stale lock file matters
        assert db.get(b"k") == b"acked"


def test_a_second_open_in_the_same_process_is_refused_and_changes_nothing(tmp_path):
    d = tmp_path / "vol"
    db = engine.open(d, background=False)  # no threads: nothing writes while we compare files
    try:
        before = tree(d)
        with pytest.raises(FolderInUse) as e:
            engine.open(d)
        assert e.value.holder_pid == os.getpid() and "this process" in str(e.value) and str(d) in str(e.value)
        assert tree(d) == before
    finally:
        db.close()
    engine.open(d).close()  # free once closed


def test_a_failed_open_releases_the_folder(tmp_path):
    d = tmp_path / "vol"
    engine.open(d, protection_groups=4).close()
    with pytest.raises(GeometryMismatch):
        engine.open(d, protection_groups=5)
    with engine.open(d) as db:  # the refused open did not keep the lock
        db.put(b"k", b"v")


def test_a_database_dropped_without_close_releases_the_folder(tmp_path):
    d = tmp_path / "vol"
    db = engine.open(d)
    db.put(b"k", b"v")
    del db
    gc.collect()
    with engine.open(d) as db:
        assert db.get(b"k") == b"v"


# --- what engine.open refuses ---------------------------------------------------------------
def test_a_cluster_folder_is_refused_and_points_at_connect(tmp_path):
    c = tmp_path / "cluster"
    save_manifest(str(c), new_manifest(base_port=17400))
    before = tree(c)
    with pytest.raises(WrongFolder) as e:
        engine.open(c)
    msg = str(e.value)
    assert "cluster" in msg and "cluster.json" in msg and f"engine.connect({str(c)!r})" in msg
    assert tree(c) == before, "no volume.json, no LOCK, no node folder created in a cluster folder"


def test_a_node_folder_is_refused_and_names_its_volume(tmp_path):
    d = tmp_path / "vol"
    engine.open(d).close()
    node = d / "az-a" / "n1"
    assert (node / "data.mdb").exists()
    before = tree(d)
    with pytest.raises(WrongFolder) as e:
        engine.open(node)
    msg = str(e.value)
    assert "node" in msg and "data.mdb" in msg and str(d) in msg
    assert tree(d) == before


def test_a_folder_of_other_files_is_refused_and_lists_them(tmp_path):
    d = tmp_path / "photos"
    d.mkdir()
    for name in ("a.jpg", "b.jpg", "notes.txt"):
        (d / name).write_bytes(b"not sixfold")
    (d / "album").mkdir()
    before = tree(d)
    with pytest.raises(WrongFolder) as e:
        engine.open(d)
    msg = str(e.value)
    assert all(name in msg for name in ("a.jpg", "album", "b.jpg", "notes.txt"))
    assert tree(d) == before


def test_a_file_is_refused(tmp_path):
    f = tmp_path / "file"
    f.write_bytes(b"x")
    with pytest.raises(WrongFolder):
        engine.open(f)
    assert f.read_bytes() == b"x"


@pytest.mark.parametrize("exists", [False, True], ids=["missing", "empty"])
def test_an_empty_or_missing_folder_gets_a_new_volume(tmp_path, exists):
    d = tmp_path / "new"
    if exists:
        d.mkdir()
    with engine.open(d) as db:
        db.put(b"k", b"v")
    with engine.open(d) as db:
        assert db.get(b"k") == b"v"
    assert (d / "volume.json").exists()


def test_the_cluster_marker_is_the_manifest_file():
    from engine.cluster.manifest import MANIFEST_FILE
    from engine.embedded import MANIFEST_FILE as marker

    assert marker == MANIFEST_FILE
