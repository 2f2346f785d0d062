"""Automatic writer failover with real processes (engine.head.failover): a standby writer takes
over when the writer's lease lapses on a write quorum of nodes, clients follow it under their
request ids, nothing acknowledged is lost, and a writer fenced by the new one steps down."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from waiting import DEADLINE_S, eventually

import engine
from engine.cluster.launcher import Cluster
from engine.cluster.manifest import WRITER, load_manifest
from engine.cluster.testing import Load, acknowledge_committed, check_all_readable, engine_env, free_base_port

pytestmark = pytest.mark.cluster
P = 2


def standby(c: Cluster, tmp_path, name: str, az: str):
    port = free_base_port(1)
    log = open(tmp_path / f"{name}.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine", "writer", "serve", "--cluster", c.folder, "--standby",
         "--listen", f"127.0.0.1:{port}", "--az", az],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=engine_env(), start_new_session=True,
    )
    log.close()
    return proc, f"127.0.0.1:{port}"


def writer_of(c: Cluster) -> tuple[str, object]:
    w = load_manifest(c.folder)[WRITER]
    return w["address"], w.get("pid")


def stop(proc) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(DEADLINE_S)


def test_a_writer_sigkill_under_16_clients_fails_over_and_loses_nothing(tmp_path):
    c = Cluster(tmp_path / "c")
    c.up(base_port=free_base_port(), protection_groups=P, durable=False, timeout_s=DEADLINE_S)
    sb, sb_address = standby(c, tmp_path, "standby", "b")
    db = engine.connect(c.folder, timeout_s=10)
    try:
        db.put(b"before", b"1")
        old_address, old_pid = writer_of(c)
        with Load(db, prefix="fo", threads=16) as load:
            eventually(lambda: load.count() >= 100, "the load to get going")
            os.kill(old_pid, signal.SIGKILL)  # nobody acts after this
            eventually(lambda: writer_of(c)[0] == sb_address, "the standby to take over and record itself as writer")
            at_takeover = load.count()
            eventually(lambda: load.count() >= at_takeover + 100, "writes to resume through the new writer")
        assert not load.errors, load.errors  # only success, Unavailable or WriteIndeterminate
        # Indeterminate writes are resolved by their request ids; every acknowledged one is there.
        acknowledge_committed(db, load)
        check_all_readable(db, load)
        check_all_readable(db, load, quorum=True)
        assert db.get(b"before") == b"1"
        st = db.status()
        assert st["epoch"] >= 2 and sb.poll() is None
    finally:
        db.close()
        stop(sb)
        c.down(timeout_s=10)


def test_a_paused_writer_wakes_fenced_serves_no_old_value_and_steps_down(tmp_path):
    c = Cluster(tmp_path / "c")
    c.up(base_port=free_base_port(), protection_groups=P, durable=False, timeout_s=DEADLINE_S)
    sb, sb_address = standby(c, tmp_path, "standby", "c")
    db = engine.connect(c.folder, timeout_s=10)
    old = None
    try:
        db.put(b"k", b"old")
        old_address, old_pid = writer_of(c)
        old = engine.connect(old_address, tls=c.tls(), timeout_s=10, token=_operator_token(c))
        assert old.get(b"k") == b"old"
        os.kill(old_pid, signal.SIGSTOP)  # paused past its lease
        try:
            eventually(lambda: writer_of(c)[0] == sb_address, "the standby to take over")
            db.put(b"k", b"new")  # through the new writer (the client followed the manifest)
        finally:
            os.kill(old_pid, signal.SIGCONT)
        # A read sent to the old writer at once gets the new value or an error, never the old one.
        try:
            assert old.get(b"k") == b"new"
        except (engine.Unavailable, engine.StaleEpoch):
            pass
        eventually(lambda: _gone(old_pid), "the fenced writer to step down (exit)")
        assert db.get(b"k") == b"new"
    finally:
        if old is not None:
            old.close()
        db.close()
        stop(sb)
        c.down(timeout_s=10)


def _gone(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().split()[2] == "Z"


def _operator_token(c: Cluster):
    from engine.security.users import operator_token

    return operator_token(c.folder)


def test_a_reader_takes_over_when_the_writer_dies_and_again_when_the_new_one_does(tmp_path):
    """`cluster up --readers 2`: SIGKILL the writer under load, a reader (another AZ first)
    promotes itself; kill that one too, the other reader does. Nobody acts in between."""
    c = Cluster(tmp_path / "c")
    c.up(base_port=free_base_port(9), protection_groups=P, durable=False, timeout_s=DEADLINE_S, readers=2)
    readers = {r["id"]: r["address"] for r in load_manifest(c.folder)["readers"]}
    db = engine.connect(c.folder, timeout_s=10)
    try:
        with Load(db, prefix="ro", threads=16) as load:
            for round_ in range(2):
                eventually(lambda: load.count() >= 50 * (round_ + 1), "the load to get going")
                address, pid = writer_of(c)
                os.kill(pid, signal.SIGKILL)
                eventually(lambda: writer_of(c)[0] != address and writer_of(c)[0] in readers.values(),
                           f"a reader to take over (failover {round_ + 1})")
                at = load.count()
                eventually(lambda: load.count() >= at + 50, f"writes to resume after failover {round_ + 1}")
        assert not load.errors, load.errors
        acknowledge_committed(db, load)
        check_all_readable(db, load, quorum=True)
        m = load_manifest(c.folder)
        assert sum(1 for r in m["readers"] if r.get("promoted")) == 2
    finally:
        db.close()
        c.down(timeout_s=10)


def test_a_planned_failover_to_a_named_reader_loses_nothing_and_clients_only_wait(tmp_path):
    from engine.cli import main

    c = Cluster(tmp_path / "c")
    c.up(base_port=free_base_port(9), protection_groups=P, durable=False, timeout_s=DEADLINE_S, readers=2)
    readers = {r["id"]: r["address"] for r in load_manifest(c.folder)["readers"]}
    target = sorted(readers)[-1]  # not the one another-AZ preference alone would pick first
    db = engine.connect(c.folder, timeout_s=10)
    try:
        with Load(db, prefix="pf", threads=8) as load:
            eventually(lambda: load.count() >= 50, "the load to get going")
            assert main(["writer", "failover", "--cluster", c.folder, "--to", target]) == 0
            assert writer_of(c)[0] == readers[target]
            at = load.count()
            eventually(lambda: load.count() >= at + 50, "writes to go on through the new writer")
        assert not load.errors, load.errors
        # No client error at all, only a short wait: a write in flight when the old writer stops
        # is re-sent under its request id to the new one. (Before the fix of the racing
        # reconnections, each run here had a few WriteIndeterminate or Unavailable errors.)
        assert not load.unknown_ids, f"{len(load.unknown_ids)} writes came back WriteIndeterminate"
        assert load.failed == 0, f"{load.failed} writes came back Unavailable"
        check_all_readable(db, load, quorum=True)
        assert "failover_to" not in load_manifest(c.folder)
    finally:
        db.close()
        c.down(timeout_s=10)
