"""The writer's senders as coroutines of one event loop (engine.head.senders) keep every promise
the sender threads kept, over real node processes and real gRPC: puts are acknowledged at 4/6
while an AZ is paused, the paused nodes are marked down and catch up once they resume, and
closing the writer ends the loop and its streams. Each test runs with both kinds of sender.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
import time

import pytest
from waiting import DEADLINE_S, eventually

from engine.cluster.testing import free_base_port, spawn_node
from engine.core.constants import FLAG_PUT
from engine.core.types import Geometry, NodeInfo
from engine.head import writer as writer_module
from engine.head.writer import Writer, WriterOptions
from engine.node.service import StorageNode
from engine.transport.grpc_client import Deadlines, GrpcTransport
from engine.transport.inprocess import InProcessTransport, Registry

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


class _PutWhileLooking:
    """A writer clock that, once armed, has another thread submit a put while n1's sender is
    looking for work (the clock is read in that look, under the writer lock, after the inbox
    was read): the put lands between the look and the wait."""

    def __init__(self) -> None:
        self.writer: Writer | None = None
        self.armed = threading.Event()
        self.submitted = threading.Event()
        self.ticket = None

    def __call__(self) -> float:
        if self.armed.is_set() and sys._getframe(1).f_code.co_name == "_next_send" and self._in_n1_sender() and self._idle():
            self.armed.clear()
            t = threading.Thread(target=self._submit)
            t.start()
            t.join(DEADLINE_S)  # the other senders are held, not waiting: submit takes no lock
            self.submitted.set()
        return time.monotonic()

    def _idle(self) -> bool:
        """n1's look found nothing to send (read under the lock its sender holds)."""
        w = self.writer
        return not w._inbox and max(w.links["n1"].sent_lsn + 1, w._tail_base) >= w._tail_base + len(w._tail)

    def _in_n1_sender(self) -> bool:
        me = threading.current_thread().name
        if me == "writer->n1":
            return True
        senders = self.writer._sender_loop if self.writer is not None else None
        if me != "writer-senders" or senders is None:
            return False
        task = asyncio.current_task(senders._loop)
        return task is not None and task.get_name() == "writer->n1"

    def _submit(self) -> None:
        _lsn, self.ticket = self.writer.submit(((FLAG_PUT, b"late", b"v"),))


class _HeldInProcess(InProcessTransport):
    """While `hold` is set, appends to every node but n1 wait (those senders are busy, not
    waiting), and n1's waits until all five are held: n1 looks for more work only then."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.hold = threading.Event()
        self.held: set[str] = set()

    def _hold(self, node) -> None:
        if self.hold.is_set():
            if node == "n1":
                eventually(lambda: len(self.held) == 5, "the other five senders to be held")
            else:
                self.held.add(node)
                while self.hold.is_set():
                    time.sleep(0.01)
                self.held.discard(node)

    def append(self, node, *args):
        self._hold(node)
        return super().append(node, *args)

    def append_indexed(self, node, *args):  # how the writer appends over this transport
        self._hold(node)
        return super().append_indexed(node, *args)


class _HeldGrpc(GrpcTransport):
    """The same for the sender loop's appends."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.hold = threading.Event()
        self.held: set[str] = set()

    async def append_async(self, node, *args):
        if self.hold.is_set():
            if node == "n1":
                while len(self.held) < 5:
                    await asyncio.sleep(0.01)
            else:
                self.held.add(node)
                while self.hold.is_set():
                    await asyncio.sleep(0.01)
                self.held.discard(node)
        return await super().append_async(node, *args)


def _in_process_nodes(tmp_path) -> Registry:
    registry = Registry()
    for info in NODES:
        node = StorageNode(str(tmp_path / info.id), info, Geometry(P), VOLUME, durable=False)
        node.attach(InProcessTransport(registry, info.id), lambda: [i.id for i in NODES])
        registry.set(info.id, node)
    return registry


@pytest.mark.parametrize("loop", [True, False], ids=["loop", "threads"])
def test_a_put_that_lands_while_a_sender_looks_for_work_wakes_it(tmp_path, monkeypatch, loop, request):
    """Before, a sender looked at the inbox, found nothing, and only then said it waited: a put
    submitted between the two found nobody waiting and woke nobody, and that node got it at its
    next heartbeat (an hour here: the miss outlasts any wait of the suite). The other five
    senders are held in an append (busy, not waiting), so nobody else takes the put in and the
    put wakes nobody."""
    monkeypatch.setattr(writer_module, "HEARTBEAT_S", 3600.0)
    clock = _PutWhileLooking()
    if loop:
        transport = _HeldGrpc(request.getfixturevalue("nodes")["addresses"], source="writer", volume_id=VOLUME)
    else:
        transport = _HeldInProcess(_in_process_nodes(tmp_path), "writer")
    w = clock.writer = Writer(transport, NODES, Geometry(P), WriterOptions(sender_loop=loop, write_timeout_s=20.0),
                              clock=clock)
    try:
        w.open()
        assert (w._sender_loop is not None) == loop
        w.put(b"first", b"v")
        eventually(lambda: all(link.sent_lsn == w.links["n1"].sent_lsn for link in w.links.values()),
                   "every node to have what was written")
        transport.hold.set()
        clock.armed.set()
        w.submit(((FLAG_PUT, b"second", b"v"),))  # n1 sends it, then looks for more: the put lands then
        assert clock.submitted.wait(DEADLINE_S), "n1's sender did not look for more"
        eventually(lambda: clock.ticket.lsn is not None and w.links["n1"].sent_lsn >= clock.ticket.lsn,
                   "n1's sender to send the put that landed while it looked")
    finally:
        transport.hold.clear()
        w.close()
        transport.close()
