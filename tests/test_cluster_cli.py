"""The `sixfold` command round trip with real processes: up, put, get, scan, status, node
control, down, and up again on the same folder (same volume, same data)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from engine.cluster import Cluster, port_free
from engine.cluster.testing import engine_env, free_base_port, hold_port

pytestmark = pytest.mark.cluster


def sixfold(*args, check=True, timeout=120):
    out = subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True, timeout=timeout, env=engine_env())
    if check and out.returncode != 0:
        raise AssertionError(f"sixfold {' '.join(args)} exited {out.returncode}:\n{out.stdout}\n{out.stderr}")
    return out


def run(capsys, *args):
    """`sixfold ARGS` in this process (quicker than a new interpreter): (exit code, stdout, stderr)."""
    from engine.cli import main

    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_round_trip(tmp_path, capsys):
    folder = str(tmp_path / "c1")
    base = free_base_port()
    try:
        up = json.loads(sixfold("cluster", "up", "--cluster", folder, "--base-port", str(base), "--protection-groups", "4",
                                "--no-durable", "--json").stdout)
        assert [n["health"] for n in up["nodes"]] == ["SERVING"] * 6
        assert up["writer"]["health"] == "SERVING" and up["writer"]["address"] == f"127.0.0.1:{base}"
        assert [n["address"] for n in up["nodes"]] == [f"127.0.0.1:{base + i}" for i in range(1, 7)]
        volume = up["volume_id"]

        sixfold("put", "--cluster", folder, "user:1", "alice")
        assert run(capsys, "put", "--cluster", folder, "user:2", "bob")[0] == 0
        assert sixfold("get", "--cluster", folder, "user:1").stdout == "alice\n"
        cert = os.path.join(folder, "tls", "admin.pem")  # a secure cluster: --target needs a certificate
        token_file = os.path.join(folder, "operator.token")  # ... and a token
        assert run(capsys, "get", "--target", f"127.0.0.1:{base}", "--cert", cert, "--token-file", token_file,
                   "user:2")[1] == "bob\n"
        code, _out, err = run(capsys, "get", "--cluster", folder, "user:3")
        assert code == 1 and "not found" in err
        got = json.loads(sixfold("get", "--cluster", folder, "user:1", "--json").stdout)
        assert got == {"key": "user:1", "found": True, "value": "alice"}
        assert run(capsys, "put", "--cluster", folder, "--hex", "00ff", "cafe")[0] == 0
        assert run(capsys, "get", "--cluster", folder, "--hex", "00ff")[1] == "cafe\n"
        assert run(capsys, "scan", "--cluster", folder, "user:", "user;")[1] == "user:1\talice\nuser:2\tbob\n"
        assert json.loads(run(capsys, "scan", "--cluster", folder, "--json", "user:", "user;")[1]) == [
            {"key": "user:1", "value": "alice"}, {"key": "user:2", "value": "bob"}]
        assert run(capsys, "delete", "--cluster", folder, "user:2")[0] == 0
        assert run(capsys, "get", "--cluster", folder, "user:2")[0] == 1
        code, _out, err = run(capsys, "put", "--cluster", folder, "", "x")
        assert code == 3 and "InvalidArgument" in err

        st = json.loads(sixfold("status", "--cluster", folder, "--json").stdout)
        assert st["volume_id"] == volume and st["vdl"] >= 4 and len(st["nodes"]) == 6
        table = run(capsys, "cluster", "status", "--cluster", folder)[1]
        assert "SERVING" in table and f"writer endpoint 127.0.0.1:{base}" in table and volume in table

        assert run(capsys, "node", "kill", "--cluster", folder, "n3")[0] == 0
        st = json.loads(run(capsys, "cluster", "status", "--cluster", folder, "--json")[1])
        assert {n["id"]: n["health"] for n in st["nodes"]}["n3"] == "DOWN"
        assert run(capsys, "put", "--cluster", folder, "user:4", "dave")[0] == 0  # five of six: writes go on
        assert run(capsys, "node", "stop", "--cluster", folder, "n4")[0] == 0
        st = json.loads(run(capsys, "cluster", "status", "--cluster", folder, "--json")[1])
        assert {n["id"]: n["health"] for n in st["nodes"]}["n4"] == "PAUSED"
        assert run(capsys, "node", "cont", "--cluster", folder, "n4")[0] == 0
        assert run(capsys, "node", "start", "--cluster", folder, "n3")[0] == 0
        st = json.loads(sixfold("cluster", "status", "--cluster", folder, "--json").stdout)
        assert [n["health"] for n in st["nodes"]] == ["SERVING"] * 6

        sixfold("cluster", "down", "--cluster", folder)
        out = sixfold("cluster", "status", "--cluster", folder, "--json", check=False)
        assert out.returncode == 4, out.stderr  # not healthy: every process is down
        st = json.loads(out.stdout)
        assert [n["health"] for n in st["nodes"]] == ["DOWN"] * 6 and st["writer"]["health"] == "DOWN"

        # Up again on the same folder: the same volume, with its data.
        up = json.loads(sixfold("cluster", "up", "--cluster", folder, "--json").stdout)
        assert up["volume_id"] == volume
        assert sixfold("get", "--cluster", folder, "user:1").stdout == "alice\n"
        assert run(capsys, "get", "--cluster", folder, "user:4")[1] == "dave\n"
        code, _out, err = run(capsys, "cluster", "up", "--cluster", folder, "--protection-groups", "8")
        assert code == 3 and "GeometryMismatch" in err
    finally:
        Cluster(folder).down(timeout_s=10)


def test_a_busy_port_is_a_clear_error_not_a_hang(tmp_path):
    base = free_base_port()
    try:
        with hold_port("127.0.0.1", base + 3):
            out = sixfold("cluster", "up", "--cluster", str(tmp_path / "c"), "--base-port", str(base), check=False, timeout=60)
            assert out.returncode == 3
            assert f"port {base + 3}" in out.stderr and "n3" in out.stderr and "in use" in out.stderr
            assert not (tmp_path / "c" / "cluster.json").exists(), "a cluster that could not start is not created"
            assert all(port_free("127.0.0.1", base + i) for i in (0, 1, 2, 4, 5, 6)), "nothing may be left running"
    finally:
        Cluster(tmp_path / "c").down(timeout_s=10)


def test_a_process_that_dies_at_start_is_named_with_its_log(tmp_path, caplog):
    caplog.set_level("INFO", logger="sixfold.launcher")
    c = Cluster(tmp_path / "c")
    try:
        c.up(base_port=free_base_port(), protection_groups=2, durable=False)
        c.down()
        # Give n5's data folder to another volume: the node refuses it at start.
        import shutil

        m = c.manifest
        n5 = next(n for n in m["nodes"] if n["id"] == "n5")
        n6 = next(n for n in m["nodes"] if n["id"] == "n6")
        shutil.rmtree(tmp_path / "c" / n5["data"])
        import lmdb

        env = lmdb.open(str(tmp_path / "c" / n5["data"]), max_dbs=4)
        meta = env.open_db(b"meta")
        with env.begin(write=True) as txn:
            txn.put(b"volume", json.dumps({"volume_id": "other", "node": "n5", "protection_groups": 2}).encode(), db=meta)
        env.close()
        with pytest.raises(Exception) as info:
            c.up()  # n5 dies at once; the others get the launcher's generous readiness deadline
        text = str(info.value)
        assert "n5" in text and "GeometryMismatch" in text and "Last lines" in text
        # the launcher's log says it too: one line, the process and where its log is
        faults = [r.getMessage() for r in caplog.records if r.name == "sixfold.launcher" and r.levelname == "ERROR"]
        assert len(faults) == 1 and "n5" in faults[0] and "exited" in faults[0] and "n5.log" in faults[0], faults
        assert c.state("n6") == "down", "a failed up stops what it started"
        assert n6["pid"] is None or c.pid("n6") is None
    finally:
        c.down(timeout_s=10)


def test_help_explains_every_command(capsys):
    from engine.cli import main

    for args in (["--help"], ["cluster", "up", "--help"], ["cluster", "status", "--help"], ["cluster", "down", "--help"],
                 ["node", "kill", "--help"], ["node", "serve", "--help"], ["writer", "start", "--help"],
                 ["put", "--help"], ["get", "--help"], ["scan", "--help"], ["status", "--help"]):
        with pytest.raises(SystemExit) as info:
            main(args)
        assert info.value.code == 0
        out = capsys.readouterr().out
        assert "usage: sixfold" in out and len(out) > 200, args
