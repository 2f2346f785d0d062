"""Backups of a cluster (real processes): the writer endpoint archives, a reader that takes over
after the writer is SIGKILLed continues the same archive, `backup now` reaches the archiver
through the target, `sixfold status` shows the backup, and a restore starts as a new cluster
holding every acknowledged write."""

from __future__ import annotations

import os
import signal

import pytest
from waiting import DEADLINE_S, eventually

import engine
from engine.backup.restore import Archive, verify
from engine.cli import main
from engine.cluster.launcher import Cluster
from engine.cluster.manifest import WRITER, load_manifest
from engine.cluster.testing import Load, acknowledge_committed, free_base_port

pytestmark = pytest.mark.cluster
P = 2


def test_a_cluster_backup_survives_a_failover_and_restores_as_a_new_cluster(tmp_path, capsys):
    bk = str(tmp_path / "bk")
    c = Cluster(tmp_path / "c")
    c.up(base_port=free_base_port(8), protection_groups=P, durable=False, timeout_s=DEADLINE_S, readers=1,
         backup={"target": bk, "retention_days": None})
    db = engine.connect(c.folder, timeout_s=10)
    try:
        eventually(lambda: (db.status().get("backup") or {}).get("bases", 0) >= 1, "the first base snapshot")
        with Load(db, prefix="bk", threads=4) as load:
            eventually(lambda: load.count() >= 50, "the load to get going")
            pid = load_manifest(c.folder)[WRITER]["pid"]
            os.kill(pid, signal.SIGKILL)
            eventually(lambda: load_manifest(c.folder)[WRITER].get("pid") not in (None, pid), "a reader to take over")
            at = load.count()
            eventually(lambda: load.count() >= at + 50, "writes to resume on the promoted reader")
        acknowledge_committed(db, load)  # the kill left these indeterminate
        st = db.status()["backup"]
        assert st["state"] in ("archiving", "base"), st
        assert main(["backup", "now", "--backup", bk]) == 0  # the promoted reader's archiver takes it
        vdl = db.status()["vdl"]
        eventually(lambda: db.status()["backup"]["position"] >= vdl, "the archive to reach the VDL")
        assert main(["status", "--cluster", c.folder]) == 0
        assert "backup" in capsys.readouterr().out
    finally:
        db.close()
        c.down(timeout_s=10)
    a = Archive(bk)
    assert a.manifest["epoch"] >= 2 and len(a.bases) >= 2
    r = verify(bk)
    assert r["ok"], r["problems"]
    # The newest point, as a cluster of its own.
    into = str(tmp_path / "restored")
    assert main(["restore", "--backup", bk, "--into", into, "--cluster", "--base-port", str(free_base_port(7))]) == 0
    c2 = Cluster(into)
    c2.up(timeout_s=DEADLINE_S)
    db2 = engine.connect(into, timeout_s=10)
    try:
        assert db2.status()["volume_id"] != a.volume_id
        got = dict(db2.scan())
        missing = [k for k, v in load.acked.items() if got.get(k) != v]
        assert not missing, f"{len(missing)} acknowledged writes are not in the restored cluster"
    finally:
        db2.close()
        c2.down(timeout_s=10)
