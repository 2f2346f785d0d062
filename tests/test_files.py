"""One atomic, durable file replace (`engine.files.atomic_write`), used by every file that must
survive a crash whole (volume.json, cluster.json).

What a crash keeps cannot be observed without pulling the power, so the durability tests watch
the system calls instead: `os.fsync` is wrapped (the real fsync still runs) to record which file
or folder each fsync reached, and what the target path held at that moment. The promise is the
order of the module docstring: the temporary file is fsynced before the rename, and the folder
after it (without that last fsync the rename can be lost to a crash after the call returned).
"""

from __future__ import annotations

import errno
import json
import os

import pytest

from engine import files
from engine.cluster.manifest import MANIFEST_FILE, load_manifest, new_manifest, save_manifest
from engine.embedded import VOLUME_FILE, write_volume_file


class FsyncLog:
    """Wraps os.fsync: records (what the fd is, the bytes at `watched` then) for every call."""

    def __init__(self, monkeypatch, watched: str) -> None:
        self.watched = watched
        self.calls: list[tuple[str, bytes | None]] = []
        real = os.fsync

        def fsync(fd):
            target = os.readlink(f"/proc/self/fd/{fd}")
            try:
                with open(watched, "rb") as fh:
                    now = fh.read()
            except FileNotFoundError:
                now = None
            self.calls.append((target, now))
            return real(fd)

        monkeypatch.setattr(os, "fsync", fsync)


def check_durable_replace(log: FsyncLog, folder: str, path: str, old: bytes | None, new: bytes) -> None:
    """The temporary file was fsynced while `path` still held the old bytes, then the folder was
    fsynced once `path` held the new ones."""
    tmp = path + files.TMP_SUFFIX
    assert (tmp, old) in log.calls, log.calls
    assert (os.path.realpath(folder), new) in log.calls, log.calls
    first_tmp = log.calls.index((tmp, old))
    folder_after = log.calls.index((os.path.realpath(folder), new))
    assert first_tmp < folder_after, log.calls


def test_atomic_write_fsyncs_the_file_then_the_folder_after_the_rename(tmp_path, monkeypatch):
    folder = os.path.realpath(tmp_path)
    path = os.path.join(folder, "f.json")
    with open(path, "wb") as fh:
        fh.write(b"old")
    log = FsyncLog(monkeypatch, path)
    files.atomic_write(path, b"new bytes")
    check_durable_replace(log, folder, path, b"old", b"new bytes")


def test_atomic_write_of_a_new_file_fsyncs_the_folder_too(tmp_path, monkeypatch):
    folder = os.path.realpath(tmp_path)
    path = os.path.join(folder, "new.bin")
    log = FsyncLog(monkeypatch, path)
    files.atomic_write(path, b"\x00\x01")
    check_durable_replace(log, folder, path, None, b"\x00\x01")


@pytest.mark.parametrize("size", [0, 1, 4096, 3 * 1024 * 1024 + 7])
def test_atomic_write_replaces_the_content_whole(tmp_path, size):
    path = str(tmp_path / "f")
    with open(path, "wb") as fh:
        fh.write(b"x" * 10_000)  # longer than some new contents: nothing of it may remain
    data = bytes((i * 7 + 3) % 256 for i in range(size))
    files.atomic_write(path, data)
    with open(path, "rb") as fh:
        assert fh.read() == data
    assert sorted(os.listdir(tmp_path)) == ["f"]  # no temporary file left behind


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path, monkeypatch):
    path = str(tmp_path / "f")
    with open(path, "wb") as fh:
        fh.write(b"old")

    def failing_fsync(fd):
        raise OSError(errno.EIO, "injected")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="injected"):
        files.atomic_write(path, b"new")
    monkeypatch.undo()
    with open(path, "rb") as fh:
        assert fh.read() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["f"]


def test_save_manifest_is_a_durable_replace(tmp_path, monkeypatch):
    folder = os.path.realpath(tmp_path)
    path = os.path.join(folder, MANIFEST_FILE)
    m = new_manifest(base_port=17400)
    save_manifest(folder, m)
    with open(path, "rb") as fh:
        old = fh.read()
    m["gossip_interval_s"] = 0.5
    log = FsyncLog(monkeypatch, path)
    save_manifest(folder, m)
    with open(path, "rb") as fh:
        new = fh.read()
    assert new == (json.dumps(m, indent=2, sort_keys=True) + "\n").encode()
    check_durable_replace(log, folder, path, old, new)
    assert load_manifest(folder)["gossip_interval_s"] == 0.5


def test_write_volume_file_is_a_durable_replace(tmp_path, monkeypatch):
    folder = os.path.realpath(tmp_path)
    path = os.path.join(folder, VOLUME_FILE)
    vol = {"format": 1, "volume_id": "v", "protection_groups": 2}
    log = FsyncLog(monkeypatch, path)
    write_volume_file(folder, vol)
    with open(path, "rb") as fh:
        new = fh.read()
    assert json.loads(new) == vol
    check_durable_replace(log, folder, path, None, new)
