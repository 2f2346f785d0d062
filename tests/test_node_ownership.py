"""One owner per node folder: a node's store holds an OS lock on its folder for as long as it is
open. A second open of the same folder, from this process or another one (`sixfold node serve`
twice on one --data), raises FolderInUse naming the holder's pid and the folder, and changes
nothing; a second `node serve` exits non-zero saying so. LMDB itself would let both processes
write the same files.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from engine import codec
from engine.cluster.testing import engine_env, free_base_port, spawn_node
from engine.core.constants import FLAG_CPL, FLAG_PUT
from engine.core.types import Geometry, NodeInfo
from engine.errors import FolderInUse, GeometryMismatch
from engine.node.service import StorageNode
from engine.node.store import SegmentStore
from engine.transport.grpc_client import GrpcTransport

P = 2


def open_node(path, geometry=Geometry(P)):
    return StorageNode(str(path), NodeInfo("n1", "a"), geometry, "test-volume", durable=False)


def snapshot(folder) -> dict:
    """Size and modification time of every file of a folder (what "changes nothing" means on disk)."""
    return {name: (st.st_size, st.st_mtime_ns) for name in sorted(os.listdir(folder))
            for st in [os.stat(os.path.join(folder, name))]}


def test_a_second_open_in_the_same_process_is_refused_and_the_first_keeps_working(tmp_path):
    folder = tmp_path / "n1"
    first = open_node(folder)
    try:
        first.handle("append", 0, codec.encode_frame([codec.encode_record(1, 0, 0, FLAG_PUT | FLAG_CPL, b"k", b"v")]), 1)
        before = snapshot(folder)
        with pytest.raises(FolderInUse) as e:
            open_node(folder)
        assert e.value.holder_pid == os.getpid() and str(folder) in str(e.value) and "node folder" in str(e.value)
        with pytest.raises(FolderInUse):
            SegmentStore(str(folder), "n1", "a", Geometry(P), "test-volume", durable=False)
        assert snapshot(folder) == before, "a refused open changed the folder"
        assert first.handle("read", 0, b"k", 1, 1, 0).value == b"v"
    finally:
        first.close()
    again = open_node(folder)  # free once closed
    try:
        assert again.handle("read", 0, b"k", 1, 1, 0).value == b"v"
    finally:
        again.close()


def test_a_failed_open_releases_the_folder(tmp_path):
    folder = tmp_path / "n1"
    open_node(folder).close()
    with pytest.raises(GeometryMismatch):
        open_node(folder, Geometry(P + 1))
    open_node(folder).close()  # not held by the failed open


@pytest.mark.cluster
def test_a_folder_served_by_a_node_process_is_refused_to_this_process_and_to_a_second_serve(tmp_path):
    folder = tmp_path / "n1"
    port = free_base_port(2)
    proc = spawn_node(str(folder), port, protection_groups=P)
    try:
        t = GrpcTransport({"n1": f"127.0.0.1:{port}"}, source="cli", volume_id="test-volume")
        try:
            t.append("n1", 0, codec.encode_frame([codec.encode_record(1, 0, 1, FLAG_PUT | FLAG_CPL, b"k", b"v")]), 1)
            before = snapshot(folder)
            with pytest.raises(FolderInUse) as e:
                open_node(folder)
            assert e.value.holder_pid == proc.pid and f"process {proc.pid}" in str(e.value) and str(folder) in str(e.value)
            second = subprocess.run(
                [sys.executable, "-m", "engine", "node", "serve", "--id", "n1", "--az", "a", "--data", str(folder),
                 "--listen", f"127.0.0.1:{port + 1}", "--volume-id", "test-volume", "--protection-groups", str(P),
                 "--peers", f"n1=127.0.0.1:{port + 1}", "--no-durable"],
                capture_output=True, text=True, timeout=60, env=engine_env(),
            )
            assert second.returncode != 0
            assert "FolderInUse" in second.stderr and f"process {proc.pid}" in second.stderr and str(folder) in second.stderr, second.stderr
            assert snapshot(folder) == before, "a refused open changed the folder"
            assert proc.poll() is None and t.read("n1", 1, b"k", 1, 1, 0).value == b"v"
        finally:
            t.close()
    finally:
        proc.kill()  # SIGKILL: the kernel drops the lock with the process
        proc.wait(10)
    node = open_node(folder)
    try:
        assert node.handle("read", 1, b"k", 1, 1, 0).value == b"v"
    finally:
        node.close()
