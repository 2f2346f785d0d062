"""One owner per folder: the OS lock of `engine.ownership`, tried with real processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from engine.errors import FolderInUse
from engine.ownership import hold, holder_pid

HOLDER = textwrap.dedent(
    """
    import sys, time
    from engine.ownership import hold
    lock = hold(sys.argv[1], "test folder")
    print("held", flush=True)
    sys.stdin.readline()
    """
)


def test_a_second_open_in_the_same_process_is_refused_and_names_this_process(tmp_path):
    first = hold(str(tmp_path), "test folder")
    with pytest.raises(FolderInUse) as e:
        hold(str(tmp_path), "test folder")
    assert e.value.holder_pid == os.getpid()
    assert str(tmp_path) in str(e.value) and "this process" in str(e.value)
    first.release()
    hold(str(tmp_path), "test folder").release()  # free again once released


def test_another_process_holding_the_folder_is_named_and_the_lock_dies_with_it(tmp_path):
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        with pytest.raises(FolderInUse) as e:
            hold(str(tmp_path), "test folder")
        assert e.value.holder_pid == p.pid and f"process {p.pid}" in str(e.value)
    finally:
        p.kill()  # SIGKILL: the kernel drops the lock, no stale lock file matters
        p.wait()
    lock = hold(str(tmp_path), "test folder")
    assert holder_pid(str(tmp_path)) == os.getpid()
    lock.release()
