"""The `sixfold` command's contract for scripts, run as a real subprocess (`python -m engine`)
against one real cluster for the module: exit codes (0 ok, 1 key not found only, 2 usage or bad
argument, 3 engine error, 4 `cluster status` not healthy), values from a file or stdin, base64
in and out, arguments that are not UTF-8, a closed pipe, `--version`, and the exit codes being
written down in `--help` and the README."""

from __future__ import annotations

import base64
import importlib.metadata
import json
import os
import random
import re
import subprocess
import sys

import pytest

from engine.cluster import Cluster
from engine.cluster.testing import engine_env, free_base_port

pytestmark = pytest.mark.cluster

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def env() -> dict:
    e = engine_env()
    e.pop("SIXFOLD_CLUSTER", None)  # every command below says which cluster, or means not to
    return e


def sixfold(*args, stdin: bytes | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `sixfold ARGS` (str or bytes arguments); stdout and stderr as bytes."""
    return subprocess.run([sys.executable, "-m", "engine", *args], input=stdin if stdin is not None else b"",
                          capture_output=True, timeout=timeout, env=env())


def ok(out: subprocess.CompletedProcess, code: int = 0) -> subprocess.CompletedProcess:
    """Assert the exit code, and that nothing ended in a traceback."""
    err = out.stderr.decode(errors="replace")
    assert out.returncode == code, f"exit {out.returncode}, wanted {code}: {out.args[3:]}\n{err}"
    assert "Traceback" not in err, err
    return out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("cli") / "c")
    try:
        c.up(base_port=free_base_port(), protection_groups=2, durable=False)
        yield c
    finally:
        c.down(timeout_s=10)


@pytest.fixture
def seed() -> int:
    s = random.SystemRandom().randrange(1 << 32)
    print(f"seed {s}")
    return s


# --- exit codes --------------------------------------------------------------------------------
def test_ok_and_not_found(cluster):
    f = cluster.folder
    ok(sixfold("put", "--cluster", f, "contract:k", "v"))
    assert ok(sixfold("get", "--cluster", f, "contract:k")).stdout == b"v\n"
    out = ok(sixfold("get", "--cluster", f, "contract:missing"), 1)
    assert out.stdout == b"" and b"not found" in out.stderr
    out = ok(sixfold("get", "--cluster", f, "--json", "contract:missing"), 1)
    assert json.loads(out.stdout) == {"key": "contract:missing", "found": False, "value": None}


@pytest.mark.parametrize("args,says", [
    (["put", "--bogus", "k", "v"], b"unrecognized arguments"),
    (["get", "--hex", "zz"], b"not hex"),
    (["get", "--base64", "not base64!"], b"not base64"),
    (["put", "--hex", "--base64", "00", "00"], b"not allowed with"),
    (["put", "k", "--value-file", "/nonexistent/value"], b"/nonexistent/value"),
    (["put", "k", "v", "--value-file", "/etc/hostname"], b"not both"),
    (["put", "k"], b"--value-file"),
    (["get", "--raw", "--json", "k"], b"--raw"),
    (["scan", "--limit", "-1"], b"--limit"),
], ids=["unknown-option", "bad-hex", "bad-base64", "hex-and-base64", "unreadable-value-file", "value-twice",
        "no-value", "raw-and-json", "negative-limit"])
def test_usage_and_bad_arguments_exit_2(cluster, args, says):
    out = ok(sixfold(*args[:1], "--cluster", cluster.folder, *args[1:]), 2)
    assert says in out.stderr, out.stderr


def test_a_value_file_that_is_a_folder_exits_2(cluster, tmp_path):
    out = ok(sixfold("put", "--cluster", cluster.folder, "k", "--value-file", str(tmp_path)), 2)
    assert str(tmp_path).encode() in out.stderr


def test_no_cluster_given_exits_2():
    for args in (["get", "k"], ["cluster", "status"], ["cluster", "down"], ["node", "kill", "n1"]):
        out = ok(sixfold(*args), 2)
        assert b"--cluster" in out.stderr, (args, out.stderr)


def test_engine_errors_exit_3(cluster, tmp_path):
    out = ok(sixfold("put", "--cluster", cluster.folder, "", "x"), 3)
    assert b"InvalidArgument" in out.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    for args in (["get", "--cluster", str(empty), "k"], ["cluster", "status", "--cluster", str(empty)]):
        out = ok(sixfold(*args), 3)
        assert b"not a cluster folder" in out.stderr, out.stderr


def test_cluster_down_on_a_folder_that_is_no_cluster_exits_3(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for folder in (empty, tmp_path / "absent"):
        out = ok(sixfold("cluster", "down", "--cluster", str(folder)), 3)
        assert b"not a cluster folder" in out.stderr and str(folder).encode() in out.stderr, out.stderr
    assert not (tmp_path / "absent").exists(), "a down creates nothing"


def test_cluster_status_exits_4_unless_every_process_serves(cluster):
    f = cluster.folder
    assert ok(sixfold("cluster", "status", "--cluster", f)).stdout.count(b"SERVING") == 7
    ok(sixfold("node", "kill", "--cluster", f, "n6"))
    try:
        out = ok(sixfold("cluster", "status", "--cluster", f, "--json"), 4)
        st = json.loads(out.stdout)  # the status is still printed
        assert {n["id"]: n["health"] for n in st["nodes"]}["n6"] == "DOWN"
        assert b"not healthy" in out.stderr and b"n6" in out.stderr, out.stderr
        out = ok(sixfold("cluster", "status", "--cluster", f), 4)
        assert b"DOWN" in out.stdout
    finally:
        ok(sixfold("node", "start", "--cluster", f, "n6"))
    ok(sixfold("cluster", "status", "--cluster", f))


# --- values from files and stdin, base64, raw output ------------------------------------------
def test_a_200_kb_value_from_a_file_and_from_stdin_reads_back_byte_exact(cluster, tmp_path, seed):
    rng = random.Random(seed)
    f = cluster.folder
    value = rng.randbytes(200 * 1024)
    path = tmp_path / "value.bin"
    path.write_bytes(value)
    ok(sixfold("put", "--cluster", f, "contract:file", "--value-file", str(path)))
    assert ok(sixfold("get", "--cluster", f, "--raw", "contract:file")).stdout == value

    other = rng.randbytes(200 * 1024)
    ok(sixfold("put", "--cluster", f, "contract:stdin", "-", stdin=other))
    assert ok(sixfold("get", "--cluster", f, "--raw", "contract:stdin")).stdout == other
    ok(sixfold("put", "--cluster", f, "contract:stdin2", "--value-file", "-", stdin=value[:1000]))
    k64 = base64.b64encode(b"contract:stdin2").decode()
    assert base64.b64decode(ok(sixfold("get", "--cluster", f, "--base64", k64)).stdout) == value[:1000]

    with cluster.connect() as db:  # and the engine agrees
        assert db.get(b"contract:file") == value and db.get(b"contract:stdin") == other

    # Over the 1 MiB limit: the engine refuses it, as it refuses an oversized argument.
    path.write_bytes(value * 6)
    out = ok(sixfold("put", "--cluster", f, "contract:file", "--value-file", str(path)), 3)
    assert b"InvalidArgument" in out.stderr, out.stderr
    assert ok(sixfold("get", "--cluster", f, "--raw", "contract:file")).stdout == value


def test_base64_round_trip_of_a_binary_key_and_value(cluster, seed):
    rng = random.Random(seed)
    f = cluster.folder
    key = b"contract:b64:\x00\xff\n\t" + rng.randbytes(16)
    value = bytes(range(256)) + rng.randbytes(64)
    k64, v64 = base64.b64encode(key).decode(), base64.b64encode(value).decode()
    ok(sixfold("put", "--cluster", f, "--base64", k64, v64))
    assert ok(sixfold("get", "--cluster", f, "--base64", k64)).stdout == v64.encode() + b"\n"
    got = json.loads(ok(sixfold("get", "--cluster", f, "--base64", "--json", k64)).stdout)
    assert got == {"key": k64, "found": True, "value": v64}
    start, end = base64.b64encode(b"contract:b64:").decode(), base64.b64encode(b"contract:b64;").decode()
    lines = ok(sixfold("scan", "--cluster", f, "--base64", start, end)).stdout.splitlines()
    assert lines == [f"{k64}\t{v64}".encode()]
    with cluster.connect() as db:
        assert db.get(key) == value
    ok(sixfold("delete", "--cluster", f, "--base64", k64))
    ok(sixfold("get", "--cluster", f, "--base64", k64), 1)


def test_arguments_that_are_not_utf8_are_the_bytes_given(cluster):
    f = cluster.folder
    key, value = b"contract:\xff\xfe-latin1-\xe9", b"caf\xe9 \xff"
    ok(sixfold("put", "--cluster", f, key, value))
    assert ok(sixfold("get", "--cluster", f, "--raw", key)).stdout == value
    assert ok(sixfold("get", "--cluster", f, "--hex", key.hex())).stdout == value.hex().encode() + b"\n"
    # Text output shows the bytes that are not UTF-8 as \xNN escapes, and never fails on them.
    assert ok(sixfold("get", "--cluster", f, key)).stdout == b"caf\\xe9 \\xff\n"
    got = json.loads(ok(sixfold("get", "--cluster", f, "--json", key)).stdout)
    assert got == {"key": "contract:\\xff\\xfe-latin1-\\xe9", "found": True, "value": "caf\\xe9 \\xff"}
    out = ok(sixfold("get", "--cluster", f, b"contract:\xff-missing"), 1)
    assert b"\\xff" in out.stderr
    with cluster.connect() as db:
        assert db.get(key) == value
    ok(sixfold("delete", "--cluster", f, key))
    ok(sixfold("get", "--cluster", f, key), 1)


def test_a_closed_pipe_ends_scan_quietly(cluster):
    with cluster.connect() as db:
        for i in range(6):  # 300 KB of scan output: far more than a pipe holds
            with db.batch() as b:
                for j in range(50):
                    b.put(b"contract:pipe:%d:%02d" % (i, j), b"x" * 1024)
    proc = subprocess.Popen([sys.executable, "-m", "engine", "scan", "--cluster", cluster.folder, "contract:pipe:",
                             "contract:pipe;"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env())
    try:
        first = proc.stdout.readline()  # like `| head -1`: read a line, then close the pipe
        assert first.startswith(b"contract:pipe:0:00\t"), first
        proc.stdout.close()
        err = proc.stderr.read()
        assert proc.wait(timeout=120) == 141, err  # 128 + SIGPIPE, as the shell reports a tool SIGPIPE ended
        assert b"Traceback" not in err and b"BrokenPipe" not in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- --version, --help and the README ---------------------------------------------------------
def test_version_comes_from_the_package_metadata():
    out = ok(sixfold("--version"))
    assert out.stdout == f"sixfold {importlib.metadata.version('sixfold')}\n".encode()


def test_help_and_the_readme_list_every_exit_code():
    from engine.cli import EXIT_CODES

    assert sorted(EXIT_CODES) == [0, 1, 2, 3, 4, 5, 6, 130, 141]
    help_text = " ".join(ok(sixfold("--help")).stdout.decode().split())
    with open(os.path.join(ROOT, "README.md")) as fh:
        readme = fh.read()
    section = readme[readme.index("## Command line"):]
    section = section[: section.index("\n## ", 1)]
    for code, meaning in EXIT_CODES.items():
        assert f"{code} {meaning}" in help_text, (code, help_text)
        assert re.search(rf"^\| {code} \| {re.escape(meaning)} \|$", section, re.M), (code, meaning)
