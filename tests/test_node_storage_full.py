"""Storage errors are typed end to end: a node whose LMDB map or data file is full answers
StorageFull (gRPC RESOURCE_EXHAUSTED, class name in `sixfold-error`), never INTERNAL (which a
writer reads as "unreachable"), keeps serving reads, and says `space_low` in every AppendReply
and in its state before it is full, while it still has a reserve of room (for what the writer
already logged, and for deletes).

The file-size limit is tried on a real `sixfold node serve` process started with a small
RLIMIT_FSIZE: it must answer StorageFull, not die of SIGXFSZ.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys

import grpc
import pytest

from engine import codec
from engine.cluster.testing import engine_env, free_base_port, storage_channel, wait_serving
from engine.core.constants import FLAG_CPL, FLAG_DELETE, FLAG_PUT, LSN_VALID_MAX
from engine.core.types import Geometry, NodeInfo
from engine.errors import StorageError, StorageFull
from engine.node.service import StorageNode
from engine.proto import storage_pb2, storage_pb2_grpc
from engine.transport import convert
from engine.transport.grpc_server import NodeServer

P = 2
SOURCE = (("sixfold-source", "cli"),)
MAP_BYTES = 4 << 20
RESERVE_BYTES = 1 << 20
VALUE = b"v" * 16_000


class Filler:
    """Appends frames of four 16 kB records, each PG's chain extended, until the node refuses."""

    def __init__(self):
        self.lsn = 0
        self.prev = [0] * P
        self.keys: list[tuple[int, int, bytes]] = []  # (pg, lsn, key) of records acknowledged

    def frame(self, records: int = 4, value: bytes = VALUE, flags: int = FLAG_PUT | FLAG_CPL) -> tuple[bytes, list]:
        recs, meta = [], []
        for _ in range(records):
            self.lsn += 1
            pg = self.lsn % P
            key = f"key-{self.lsn:06d}".encode()
            recs.append(codec.encode_record(self.lsn, self.prev[pg], pg, flags, key, value))
            meta.append((pg, self.lsn, key))
            self.prev[pg] = self.lsn
        return codec.encode_frame(recs), meta

    def undo(self, meta) -> None:
        """The frame was refused: its LSNs are free again (the writer would resend the same)."""
        self.lsn = meta[0][1] - 1
        for pg, _lsn, _key in meta:
            self.prev[pg] = max([lsn for p, lsn, _ in self.keys if p == pg], default=0)


def fill(append, filler: Filler, steps_max: int = 2000):
    """Append until refused; returns (the error, bytes acknowledged after the first space_low)."""
    after_low = None
    for _ in range(steps_max):
        frame, meta = filler.frame()
        try:
            reply = append(frame)
        except Exception as e:  # noqa: BLE001 - the caller asserts on what it is
            filler.undo(meta)
            return e, after_low
        filler.keys.extend(meta)
        if after_low is not None:
            after_low += len(frame)
        elif reply.space_low:
            after_low = 0
    raise AssertionError(f"the node took {steps_max} frames without refusing one")


@pytest.fixture
def node(tmp_path):
    n = StorageNode(str(tmp_path / "n1"), NodeInfo("n1", "a"), Geometry(P), "vol", durable=False, map_bytes=MAP_BYTES,
                    reserve_bytes=RESERVE_BYTES)
    yield n
    n.close()


def test_a_full_map_is_storage_full_after_space_low_and_reads_go_on(node):
    st = node.handle("state")
    assert st.capacity_bytes == MAP_BYTES and not st.space_low and 0 < st.used_bytes < MAP_BYTES
    filler = Filler()
    error, after_low = fill(lambda f: node.handle("append", 0, f, filler.lsn), filler)
    assert type(error) is StorageFull, repr(error)
    assert "n1" in str(error) and "full" in str(error)
    # space_low came early enough: most of the reserve was still taken after it (page overhead aside).
    assert after_low is not None and after_low >= RESERVE_BYTES // 2, after_low
    st = node.handle("state")
    assert st.space_low and st.used_bytes <= st.capacity_bytes == MAP_BYTES
    # Nothing of the refused frame is there; every acknowledged record reads back.
    assert list(st.scls) == [max(lsn for p, lsn, _ in filler.keys if p == pg) for pg in range(P)]
    for pg, lsn, key in filler.keys[:: max(1, len(filler.keys) // 20)]:
        r = node.handle("read", pg, key, LSN_VALID_MAX, lsn, 0)
        assert (r.lsn, r.value) == (lsn, VALUE)
    assert node.handle("read", filler.lsn % P, f"key-{filler.lsn + 1:06d}".encode(), LSN_VALID_MAX, 0, 0).lsn == 0
    # Small records (tombstones, a resend of what the writer logged) still fit in the freed room
    # of the aborted transaction; the node takes any append that physically fits.
    frame, meta = filler.frame(records=1, value=b"", flags=FLAG_DELETE | FLAG_CPL)
    assert node.handle("append", 0, frame, 0).space_low


def test_storage_errors_that_are_not_full_are_storage_errors(node, monkeypatch):
    import lmdb

    def broken(*_args, **_kw):
        raise lmdb.CorruptedError("mdb_txn_begin: MDB_CORRUPTED: Located page was wrong type")

    monkeypatch.setattr(node.store, "read", broken)  # a disk layer failure, not a full one
    with pytest.raises(StorageError) as e:
        node.handle("read", 0, b"k", 1, 0, 0)
    assert type(e.value) is StorageError and "n1" in str(e.value)


@pytest.mark.cluster
def test_over_grpc_a_full_node_answers_resource_exhausted_storage_full(tmp_path):
    port = free_base_port(1)
    ns = NodeServer.bind(
        lambda: StorageNode(str(tmp_path / "n1"), NodeInfo("n1", "a"), Geometry(P), "vol", durable=False,
                            map_bytes=MAP_BYTES, reserve_bytes=RESERVE_BYTES),
        f"127.0.0.1:{port}",
    )
    ns.start()
    try:
        with storage_channel(f"127.0.0.1:{port}", "vol") as channel:
            stub = storage_pb2_grpc.StorageStub(channel)
            filler = Filler()

            def append(frame):
                return stub.Append(storage_pb2.AppendRequest(epoch=0, frame=frame, hint_lsn=filler.lsn), timeout=30, metadata=SOURCE)

            error, after_low = fill(append, filler)
            assert isinstance(error, grpc.RpcError)
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (error.code(), error.details())
            assert dict(error.trailing_metadata())[convert.ERROR_METADATA_KEY] == "StorageFull"
            assert after_low is not None
            st = stub.State(storage_pb2.StateRequest(), timeout=30, metadata=SOURCE)
            assert st.space_low and st.capacity_bytes == MAP_BYTES and st.used_bytes <= MAP_BYTES
            pg, lsn, key = filler.keys[0]
            r = stub.Read(storage_pb2.ReadRequest(pg=pg, key=key, read_point=LSN_VALID_MAX, required_lsn=lsn), timeout=30,
                          metadata=SOURCE)
            assert r.found and r.value == VALUE
    finally:
        ns.stop()


@pytest.mark.cluster
def test_a_node_process_at_its_file_size_limit_answers_storage_full_and_lives(tmp_path):
    limit = 3 << 20
    port = free_base_port(1)
    data = str(tmp_path / "n1")
    argv = [
        sys.executable, "-m", "engine", "node", "serve", "--id", "n1", "--az", "a", "--data", data,
        "--listen", f"127.0.0.1:{port}", "--volume-id", "vol", "--protection-groups", str(P),
        "--peers", f"n1=127.0.0.1:{port}", "--gossip-interval-s", "0", "--no-durable",
    ]

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    log_path = tmp_path / "n1.log"

    def start(*extra):
        with open(log_path, "ab") as log:
            return subprocess.Popen(argv + list(extra), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    env=engine_env(), preexec_fn=small_files, start_new_session=True)

    # With its reserve, the node refuses appends above the floor it keeps for the transactions
    # that give room back (SegmentStore.floor_bytes); started again without a reserve (so without a
    # floor), it fills its file to the limit itself: EFBIG, typed.
    proc = start()
    filler = Filler()
    try:
        wait_serving(f"127.0.0.1:{port}", proc=proc)
        with storage_channel(f"127.0.0.1:{port}", "vol") as channel:
            stub = storage_pb2_grpc.StorageStub(channel)
            error, after_low = fill(lambda frame: stub.Append(storage_pb2.AppendRequest(epoch=0, frame=frame, hint_lsn=filler.lsn),
                                                              timeout=30, metadata=SOURCE), filler)
            assert isinstance(error, grpc.RpcError) and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
            assert "keeps the last" in error.details(), error.details()
            assert after_low is not None, "space_low was never reported before the node was full"
    finally:
        alive = proc.poll() is None
        proc.terminate()
        proc.wait(30)
    assert alive, open(log_path).read()[-3000:]
    proc = start("--reserve-bytes", "0")
    try:
        wait_serving(f"127.0.0.1:{port}", proc=proc)
        with storage_channel(f"127.0.0.1:{port}", "vol") as channel:
            stub = storage_pb2_grpc.StorageStub(channel)
            st = stub.State(storage_pb2.StateRequest(), timeout=30, metadata=SOURCE)
            assert st.capacity_bytes == limit, "the file size limit bounds the node's capacity"

            def append(frame):
                return stub.Append(storage_pb2.AppendRequest(epoch=0, frame=frame, hint_lsn=filler.lsn), timeout=30, metadata=SOURCE)

            error, after_low = fill(append, filler)
            assert proc.poll() is None, "the node process died at its file size limit"
            assert isinstance(error, grpc.RpcError)
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (error.code(), error.details())
            assert dict(error.trailing_metadata())[convert.ERROR_METADATA_KEY] == "StorageFull"
            assert "file size limit" in error.details()
            for _ in range(3):  # it keeps refusing, typed, and keeps living
                frame, meta = filler.frame()
                with pytest.raises(grpc.RpcError) as again:
                    append(frame)
                filler.undo(meta)
                assert dict(again.value.trailing_metadata())[convert.ERROR_METADATA_KEY] == "StorageFull"
            assert os.path.getsize(os.path.join(data, "data.mdb")) <= limit
            for pg, lsn, key in filler.keys[:: max(1, len(filler.keys) // 10)]:
                r = stub.Read(storage_pb2.ReadRequest(pg=pg, key=key, read_point=LSN_VALID_MAX, required_lsn=lsn), timeout=30,
                              metadata=SOURCE)
                assert r.found and r.value == VALUE and r.lsn == lsn
            st = stub.State(storage_pb2.StateRequest(), timeout=30, metadata=SOURCE)
            assert st.records == len(filler.keys)  # (no reserve: space_low only if not a page is left)
    finally:
        alive = proc.poll() is None
        proc.terminate()
        proc.wait(30)
    assert alive, open(log_path).read()[-3000:]


def test_a_write_that_fails_to_commit_changes_nothing_in_memory(tmp_path):
    """A refused transaction (here: the data file at this process's file size limit, a real
    EFBIG/EIO from the kernel) leaves the node's in-memory picture as the disk has it: a seal or an
    epoch sync that did not persist must fence nobody, a cut that did not persist cuts nothing."""
    from engine.core.types import TruncationRange

    n = StorageNode(str(tmp_path / "n1"), NodeInfo("n1", "a"), Geometry(P), "vol", durable=False)
    try:
        records = [codec.encode_record(i, max(0, i - P), i % P, FLAG_PUT | FLAG_CPL, b"k%06d" % i, b"x" * 100)
                   for i in range(1, 5001)]
        # The writer announced VDL 9 only: a recovery may cut above it (a node refuses a cut at or
        # below what it was told is durable).
        n.handle("append", 0, codec.encode_frame(records), 9)
        before = n.handle("state")
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(str(tmp_path / "n1" / "data.mdb")), hard))
        try:
            # Cutting 4,991 records rewrites every leaf page: more room than the file has.
            with pytest.raises(StorageFull, match="file size limit|File too large"):
                n.handle("sync_epoch", 1, (TruncationRange(1, 10, 5000),), None)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        after = n.handle("state")
        assert (after.epoch, after.scls, after.truncations, after.records) == (before.epoch, before.scls, (), 5000)
        assert n.store.max_lsn == [5000, 4999]
        # Appends at the old epoch still work (nothing was fenced), and the cut works once there is room.
        n.handle("append", 0, codec.encode_frame([codec.encode_record(5001, 4999, 1, FLAG_PUT | FLAG_CPL, b"z", b"z")]), 9)
        st = n.handle("sync_epoch", 1, (TruncationRange(1, 10, 5000),), None)
        assert st.epoch == 1 and st.records == 10 and n.handle("read", 1, b"z", 5001, 0, 1).value == b"z"
    finally:
        n.close()


def test_a_full_filesystem_is_storage_full(tmp_path):
    """A real ENOSPC: the node's folder on a 3 MiB tmpfs (needs the right to mount; skipped without)."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip()}")
    try:
        n = StorageNode(str(mount / "n1"), NodeInfo("n1", "a"), Geometry(P), "vol", durable=True, reserve_bytes=RESERVE_BYTES // 2)
        try:
            st = n.handle("state")
            assert st.capacity_bytes <= 3 << 20, "the filesystem's room bounds the capacity"
            filler = Filler()
            error, after_low = fill(lambda f: n.handle("append", 0, f, filler.lsn), filler)
            # The node refuses appends before the disk is quite full: it keeps a floor for the
            # transactions that give room back (SegmentStore.floor_bytes).
            assert type(error) is StorageFull and "keeps the last" in str(error), repr(error)
            floor = n.store.floor_bytes(st.capacity_bytes)
            # Appends went on into the reserve, down to the floor (frames cost more than their bytes).
            assert after_low is not None and after_low >= (RESERVE_BYTES // 2 - floor) // 4, (after_low, floor)
            pg, lsn, key = filler.keys[-1]
            assert n.handle("read", pg, key, LSN_VALID_MAX, lsn, 0).value == VALUE
            assert n.handle("state").space_low
        finally:
            n.close()
        # Without a reserve (and so without a floor) it fills the disk itself: ENOSPC, typed.
        n = StorageNode(str(mount / "n1"), NodeInfo("n1", "a"), Geometry(P), "vol", durable=True, reserve_bytes=0)
        try:
            error, _after_low = fill(lambda f: n.handle("append", 0, f, filler.lsn), filler)
            assert type(error) is StorageFull and "free" in str(error), repr(error)
            pg, lsn, key = filler.keys[-1]
            assert n.handle("read", pg, key, LSN_VALID_MAX, lsn, 0).value == VALUE
        finally:
            n.close()
    finally:
        subprocess.run(["umount", str(mount)], check=True)
