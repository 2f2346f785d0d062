"""Two `sixfold cluster up` at once on one fresh folder start each process once.

The race: each `up` decided what to start under the manifest lock, let go of it, and took it
again to start processes and record their pids; a second `up` that decided in between started a
second set, whose pids overwrote the first in cluster.json. The second set then lost the ports,
its `up` stopped "its" processes (by the recorded pids) and cleared them from the manifest,
leaving seven serving processes that cluster.json no longer listed: `cluster status` said DOWN
and `cluster down` left them running.

Both tests run two real `sixfold cluster up` processes on a fresh folder and then check the same
things: exactly seven serving processes, every one listed in cluster.json, each started once
(one `up` started all seven, the other started nothing and said the cluster is already up), no
lock file of the launcher open in a serving process, `cluster status` healthy, and `cluster
down` ends every one of them.

* The start line: the test holds the manifest lock until both have opened a lock file of the
  folder (so both wait on a lock), then lets go; from there on the scheduler decides. On the
  old code this lost the processes in some runs only (the window was a few microseconds wide).
* The pause in the gap: the first `up` is the real CLI with one instrument, a pause right after
  its first hold of the manifest lock ends (where the old code had decided but not yet started
  anything), and the second `up` runs during that pause. On the old code it fails every time;
  with the fix the first `up` still holds the operation lock there, so the second waits.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from engine.cluster import Cluster
from engine.cluster.manifest import WRITER, load_manifest, locked
from engine.cluster.testing import engine_env, free_base_port

pytestmark = pytest.mark.cluster

DEADLINE_S = 240.0  # generous: 16 Python processes start on a loaded 2-core machine


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read()
    except OSError:
        return False
    return raw[raw.rindex(b")") + 2 : raw.rindex(b")") + 3] not in (b"Z", b"X")


def serving_processes(folder: str) -> dict[int, bytes]:
    """pid -> command line of every live `sixfold ... serve --cluster FOLDER` process."""
    needle = b"\x00--cluster\x00" + os.fsencode(folder) + b"\x00"
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmd = fh.read()
        except OSError:
            continue
        if b"\x00serve\x00" in cmd and needle in cmd and _alive(int(entry)):
            out[int(entry)] = cmd
    return out


def lock_files_open(pid: int, folder: str) -> list[str]:
    """The folder's lock files that process `pid` has open: a `cluster up` waiting on a lock, or
    a lock leaked into a serving process (it must not be)."""
    names = {os.path.join(folder, "cluster.lock"), os.path.join(folder, ".lock")}
    found = []
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return found
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target in names:
            found.append(target)
    return found


def wait_for(condition, what: str, timeout_s: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.05)


def sixfold(*args):
    return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True, timeout=DEADLINE_S,
                          env=engine_env())


def up_argv(folder: str, base: int) -> list[str]:
    return ["cluster", "up", "--cluster", folder, "--base-port", str(base), "--protection-groups", "2", "--no-durable", "--json"]


def check_one_cluster_started_once(folder: str, ups: list[subprocess.Popen], outs: list[tuple[str, str]]) -> None:
    report = "\n".join(f"up {i}: exit {p.returncode}\n{err}" for i, (p, (_, err)) in enumerate(zip(ups, outs)))

    # Exactly seven serving processes, and cluster.json lists every one of them.
    m = load_manifest(folder)
    listed = {n["id"]: n["pid"] for n in m["nodes"]} | {WRITER: m[WRITER]["pid"]}
    running = serving_processes(folder)
    assert sorted(running) == sorted(p for p in listed.values() if p is not None), (running, listed, report)
    assert len(running) == 7 and None not in listed.values(), (running, listed, report)

    # Both `up`s succeeded: one started all seven processes, the other waited and found them up.
    assert [p.returncode for p in ups] == [0, 0], report
    started = [json.loads(out)["started"] for out, _ in outs]
    assert sorted(started, key=len) == [[], sorted(listed, key=lambda n: (n == WRITER, n))], started
    second = outs[[len(s) for s in started].index(0)][1]
    assert "already up" in second and "Traceback" not in report, report

    # The launcher's locks do not leak into the long-running processes.
    assert {pid: lock_files_open(pid, folder) for pid in running} == {pid: [] for pid in running}

    st = sixfold("cluster", "status", "--cluster", folder, "--json")
    assert st.returncode == 0, st.stderr
    health = json.loads(st.stdout)
    assert [n["health"] for n in health["nodes"]] == ["SERVING"] * 6 and health["writer"]["health"] == "SERVING"
    assert sorted([n["pid"] for n in health["nodes"]] + [health["writer"]["pid"]]) == sorted(running)

    down = sixfold("cluster", "down", "--cluster", folder)
    assert down.returncode == 0, down.stderr
    wait_for(lambda: not any(_alive(pid) for pid in running), "every process to be gone after `cluster down`", 60)
    assert serving_processes(folder) == {}


def clean_up(folder: str, ups: list[subprocess.Popen]) -> None:
    for p in ups:
        if p.poll() is None:
            p.kill()
            p.communicate()
    Cluster(folder).down(timeout_s=10)
    for pid in serving_processes(folder):  # whatever the manifest lost track of (the bug)
        os.kill(pid, signal.SIGKILL)


def popen(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=engine_env())


def test_two_concurrent_ups_on_a_fresh_folder_start_each_process_once(tmp_path):
    folder = os.path.abspath(tmp_path / "c")
    os.makedirs(folder)  # fresh: no cluster.json yet
    argv = [sys.executable, "-m", "engine", *up_argv(folder, free_base_port())]
    ups: list[subprocess.Popen] = []
    try:
        with locked(folder):  # the start line (see the module docstring)
            ups = [popen(argv) for _ in range(2)]
            # A process that has one of the folder's lock files open is waiting for a lock: the
            # test holds the manifest lock, so nobody can be past it.
            wait_for(lambda: all(lock_files_open(p.pid, folder) or p.poll() is not None for p in ups),
                     "both `cluster up` to wait on a lock of the folder", 120)
            assert all(p.poll() is None for p in ups), [p.communicate() for p in ups]
        outs = [p.communicate(timeout=DEADLINE_S) for p in ups]
        check_one_cluster_started_once(folder, ups, outs)
    finally:
        clean_up(folder, ups)


#: `sixfold ARGS...` that pauses once, right after its first hold of the manifest lock ends: it
#: creates the file GAP and goes on only once the file GO exists (bounded).
PAUSING_SIXFOLD = r"""
import contextlib, os, sys, time
import engine.cluster.supervisor as supervisor
from engine.cli import main

gap, go = sys.argv[1], sys.argv[2]
real_locked = supervisor.locked
holds = 0

@contextlib.contextmanager
def locked(folder):
    global holds
    with real_locked(folder):
        yield
    holds += 1
    if holds == 1:
        open(gap, "w").close()
        deadline = time.monotonic() + 120
        while not os.path.exists(go):
            if time.monotonic() > deadline:
                raise SystemExit("pausing sixfold: no GO within 120 s")
            time.sleep(0.02)

supervisor.locked = locked  # the module whose `up` decides and starts the processes
sys.exit(main(sys.argv[3:]))
"""


def test_an_up_during_another_ups_decision_starts_nothing_twice(tmp_path):
    folder = os.path.abspath(tmp_path / "c")
    os.makedirs(folder)
    gap, go = str(tmp_path / "gap"), str(tmp_path / "go")
    args = up_argv(folder, free_base_port())
    ups: list[subprocess.Popen] = []
    try:
        ups.append(popen([sys.executable, "-c", PAUSING_SIXFOLD, gap, go, *args]))
        wait_for(lambda: os.path.exists(gap) or ups[0].poll() is not None, "the first `up` to reach its pause", 120)
        assert ups[0].poll() is None, ups[0].communicate()
        ups.append(popen([sys.executable, "-m", "engine", *args]))
        # The second `up` either runs to its end (nothing stops it: the old code) or waits for
        # the operation lock, which the paused first `up` holds.
        wait_for(lambda: ups[1].poll() is not None or os.path.join(folder, "cluster.lock") in lock_files_open(ups[1].pid, folder),
                 "the second `up` to finish or to wait for the first")
        open(go, "w").close()
        outs = [p.communicate(timeout=DEADLINE_S) for p in ups]
        check_one_cluster_started_once(folder, ups, outs)
    finally:
        clean_up(folder, ups)
