"""The writer's senders as coroutines of one event loop (engine.head.senders) keep every promise
the sender threads kept, over real node processes and real gRPC: puts are acknowledged at 4/6
while an AZ is paused, the paused nodes are marked down and catch up once they resume, and
closing the writer ends the loop and its streams. Each test runs with both kinds of sender.
"""

from __future__ import annotations

import os
import signal
import threading

import pytest
from waiting import eventually

from engine.cluster.testing import free_base_port, spawn_node
from engine.core.types import Geometry, NodeInfo
from engine.head.writer import Writer, WriterOptions
from engine.transport.grpc_client import Deadlines, GrpcTransport

pytestmark = pytest.mark.cluster

P = 4
VOLUME = "test-volume"
NODES = tuple(NodeInfo(f"n{i + 1}", "abc"[i // 2]) for i in range(6))


@pytest.fixture
def nodes(tmp_path):
    base = free_base_port(6)
    procs = {}
    try:
        for i, info in enumerate(NODES):
            procs[info.id] = spawn_node(str(tmp_path / info.id), base + i, node_id=info.id, az=info.az,
                                        volume_id=VOLUME, protection_groups=P)
        yield {"addresses": {info.id: f"127.0.0.1:{base + i}" for i, info in enumerate(NODES)}, "procs": procs}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
                proc.wait(10)


def _sender_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("writer->") and t.is_alive()]


@pytest.mark.parametrize("loop", [True, False], ids=["loop", "threads"])
def test_puts_hold_at_four_of_six_with_an_az_paused_and_the_paused_nodes_catch_up(nodes, loop):
    t = GrpcTransport(nodes["addresses"], source="writer", volume_id=VOLUME,
                      deadlines=Deadlines(append_s=0.5, suspect_deadline_s=0.5, probe_interval_s=0.05))
    w = Writer(t, NODES, Geometry(P), WriterOptions(sender_loop=loop, write_timeout_s=30.0))
    paused = [nodes["procs"]["n5"].pid, nodes["procs"]["n6"].pid]
    try:
        w.open()
        if loop:
            assert w._sender_loop is not None and w._sender_loop.alive()
            assert _sender_threads() == []  # no thread per node
        else:
            assert w._sender_loop is None
            assert sorted(_sender_threads()) == [f"writer->{n.id}" for n in NODES]
        lsns = [w.put(b"k%03d" % i, b"before-%d" % i) for i in range(30)]
        assert lsns == sorted(lsns) and len(set(lsns)) == 30
        for pid in paused:
            os.kill(pid, signal.SIGSTOP)
        try:
            after = [w.put(b"k%03d" % i, b"after-%d" % i) for i in range(30)]  # 4/6 acknowledge each
            assert after[0] > lsns[-1] and after == sorted(after)
            eventually(lambda: not w.links["n5"].up and not w.links["n6"].up, "the paused nodes to be marked down")
            assert all(w.links[n].up for n in ("n1", "n2", "n3", "n4"))
        finally:
            for pid in paused:
                os.kill(pid, signal.SIGCONT)
        last = after[-1]
        eventually(lambda: all(link.up and link.sent_lsn >= last for link in w.links.values()),
                   "every node, the resumed ones too, to have taken every record")
        for i in range(30):
            assert w.get(b"k%03d" % i) == b"after-%d" % i
        # Each of the resumed nodes holds the records it missed (read from it alone).
        for n in ("n5", "n6"):
            assert max(t.state(n).scls) >= 1
        sender_loop = w._sender_loop
    finally:
        w.close()
    assert _sender_threads() == []
    admin = GrpcTransport(nodes["addresses"], source="cli", volume_id=VOLUME)
    try:
        def streams_ended() -> bool:
            return all(admin.state(n.id).extra["append_streams"]["open"] == 0 for n in NODES)

        if loop:  # the loop closed its own streams as it ended (the threads' stay pooled in the transport)
            assert not sender_loop.alive(), "the sender loop ended with the writer"
            eventually(streams_ended, "the sender loop's streams to end on every node")
        t.close()
        eventually(streams_ended, "the writer's streams to end on every node")
    finally:
        admin.close()
