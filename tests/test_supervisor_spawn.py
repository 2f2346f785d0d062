"""A child the launcher just started is alive, whatever its command line says yet.

`subprocess.Popen` returns once the child's exec has closed its close-on-exec pipe, but the
kernel sets the new program's argument area a moment later (the ELF loader does it after the
point of no return), so /proc/<pid>/cmdline of a brand-new child can read empty. The launcher
used to decide "is this our process?" from the command line alone, so on a loaded machine
`cluster.start("r1")` right after a kill once failed with "r1 (pid N) exited before it was
ready" while r1's log showed that very pid SERVING a second later. The window is too short to
hold open from a test, so the test shows the supervisor a real child whose command line reads
empty, as the kernel does in that window.
"""

from __future__ import annotations

import subprocess
import sys

import engine.cluster.supervisor as supervisor
from engine.cluster.supervisor import Supervisor


def test_a_child_whose_command_line_is_not_set_yet_counts_as_live(tmp_path, monkeypatch):
    sup = Supervisor(str(tmp_path))
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        sup._children[child.pid] = child
        monkeypatch.setattr(supervisor, "_cmdline", lambda pid: b"")  # the exec window
        assert sup.live_pid("r1", child.pid) == child.pid
        child.kill()
        child.wait()
        assert sup.live_pid("r1", child.pid) is None
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()


def test_a_pid_not_started_here_is_still_checked_by_its_command_line(tmp_path):
    """A pid from the manifest (another launcher started it, or the pid was recycled) is ours
    only if its command line says so."""
    sup = Supervisor(str(tmp_path))
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert sup.live_pid("r1", other.pid) is None  # alive, but not a sixfold reader r1
    finally:
        other.kill()
        other.wait()


def test_a_promoted_reader_is_the_writer_for_a_launcher_that_did_not_start_it(tmp_path):
    """After a failover the manifest names a promoted reader's process (`reader serve`) as the
    writer. A launcher in another process (any CLI command) recognised a writer by `writer serve`
    in its command line only, so it called the new writer down: `cluster status` said DOWN and a
    second `writer kill` said the writer was not running."""
    from engine.cluster.manifest import WRITER

    sup = Supervisor(str(tmp_path))
    promoted = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "-m", "engine", "reader",
                                 "serve", "--cluster", str(tmp_path), "--id", "r2"])
    try:
        assert promoted.pid not in sup._children
        assert sup.live_pid(WRITER, promoted.pid) == promoted.pid
        assert sup.live_pid("r1", promoted.pid) is None  # not reader r1's
    finally:
        promoted.kill()
        promoted.wait()


def test_a_writer_of_an_older_epoch_does_not_overwrite_a_newer_ones_record():
    """A restarted `writer serve` and a reader promoting itself opened at about the same time (a
    chaos run): the reader recorded itself last although the writer had opened at the newer
    epoch and fenced it, so for three minutes the manifest named a dead writer and no client
    found the live one. Each records its epoch now, and an older one never overwrites a newer."""
    from engine.cluster.commands import newer_writer_recorded

    m = {"writer": {"address": "127.0.0.1:1", "pid": 100, "epoch": 5}}
    assert newer_writer_recorded(m, 4, "reader r1", 200)
    assert not newer_writer_recorded(m, 5, "reader r1", 200)  # the same epoch cannot be two writers'
    assert not newer_writer_recorded(m, 6, "reader r1", 200)
    assert not newer_writer_recorded(m, 4, "writer", 100)  # its own record
    assert not newer_writer_recorded({"writer": {"address": "127.0.0.1:1", "pid": 100}}, 1, "writer", 200)
