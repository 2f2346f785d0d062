"""The failure policy of a node's background threads (gossip, scrub).

An expected error (a SixfoldError: a peer down, a full disk) is counted (per peer for gossip) and
logged once per change of cause, not once per round. An unexpected exception is logged with its
traceback, counted per thread in the node's state, and the thread carries on after a bounded
back-off: a dead gossip thread would leave holes unfilled for ever while the node looks healthy.

Faults are injected into the real store of a real node (a bound method swapped for one that
raises once, then does the real work), with real LMDB and the in-process transport.
"""

from __future__ import annotations

import logging

import pytest

from engine import codec
from engine.core.constants import FLAG_CPL, FLAG_PUT
from engine.core.types import Geometry, NodeInfo
from engine.node.service import StorageNode, wait_until
from engine.transport.inprocess import InProcessTransport, Registry

P = 2
DEADLINE_S = 60.0


def records(n: int) -> bytes:
    return codec.encode_frame([codec.encode_record(i, max(0, i - P), i % P, FLAG_PUT | FLAG_CPL, b"k%04d" % i, b"v%d" % i)
                               for i in range(1, n + 1)])


class Once:
    """Replace `obj.name` by a function that raises `exc` on its first `times` calls, then is the
    original."""

    def __init__(self, obj, name: str, exc: BaseException, times: int = 1) -> None:
        self.original = getattr(obj, name)
        self.exc = exc
        self.times = times
        self.raised = 0
        setattr(obj, name, self)

    def __call__(self, *args, **kwargs):
        if self.raised < self.times:
            self.raised += 1
            raise self.exc
        return self.original(*args, **kwargs)


@pytest.fixture
def pair(tmp_path):
    """n1 holds 40 records with the writer's VDL hint; n2 is empty and gossips with n1."""
    registry = Registry()
    nodes = {}
    for node_id in ("n1", "n2", "n3"):
        node = StorageNode(str(tmp_path / node_id), NodeInfo(node_id, "a"), Geometry(P), "vol", durable=False)
        node.attach(InProcessTransport(registry, node_id), lambda: ["n1", "n2", "n3"])
        nodes[node_id] = node
        registry.set(node_id, node)
    nodes["n1"].handle("append", 0, records(40), 40)
    registry.set("n3", None)  # n3 is down: gossip with it fails, as expected
    nodes["n3"].close()
    yield nodes, registry
    for node in nodes.values():
        node.close()


def test_an_unexpected_gossip_failure_is_logged_counted_and_gossip_resumes(pair, caplog):
    nodes, _registry = pair
    n1, n2 = nodes["n1"], nodes["n2"]
    caplog.set_level(logging.INFO, logger="sixfold.node")
    injected = Once(n2.store, "append", RuntimeError("injected gossip fault"))
    n2.start_background(gossip_interval_s=0.02, scrub_interval_s=60)
    assert wait_until(lambda: injected.raised == 1, DEADLINE_S), "gossip never tried to repair the hole"
    # The work resumes after the back-off: the hole is filled from n1.
    assert wait_until(lambda: n2.store.scls == n1.store.scls, DEADLINE_S), (n2.store.scls, n1.store.scls)
    extra = n2.handle("state").extra
    assert extra["background_errors"] == {"gossip": 1, "scrub": 0, "collect": 0}
    assert "RuntimeError: injected gossip fault" in extra["background_last_error"]
    faults = [r for r in caplog.records if r.name == "sixfold.node" and r.exc_info and "gossip" in r.getMessage()]
    assert len(faults) == 1 and "n2" in faults[0].getMessage() and faults[0].exc_info[0] is RuntimeError
    assert n2.handle("read", 0, b"k0040", 40, 40, 0).value == b"v40"


def test_an_expected_gossip_error_is_counted_per_peer_and_logged_once_per_cause(pair, caplog):
    nodes, registry = pair
    n2 = nodes["n2"]
    caplog.set_level(logging.INFO, logger="sixfold.node")
    n2.start_background(gossip_interval_s=0.02, scrub_interval_s=60)
    assert wait_until(lambda: n2.handle("state").extra["gossip_peer_errors"].get("n3", 0) >= 5, DEADLINE_S)
    about_n3 = [r for r in caplog.records if r.name == "sixfold.node" and "n3" in r.getMessage()]
    assert len(about_n3) == 1, [r.getMessage() for r in about_n3]
    assert "Unavailable" in about_n3[0].getMessage() and "n2" in about_n3[0].getMessage() and not about_n3[0].exc_info
    st = n2.handle("state")
    assert st.extra["background_errors"] == {"gossip": 0, "scrub": 0, "collect": 0}, "an expected error is not a background fault"
    assert "n1" not in st.extra["gossip_peer_errors"]
    # The peer returns: one line says so, and the count stops growing.
    n3 = StorageNode(nodes["n3"].store.path, NodeInfo("n3", "a"), Geometry(P), "vol", durable=False)
    nodes["n3"] = n3
    n3.attach(InProcessTransport(registry, "n3"), lambda: ["n1", "n2", "n3"])
    registry.set("n3", n3)
    assert wait_until(lambda: any("n3" in r.getMessage() and "again" in r.getMessage() for r in caplog.records), DEADLINE_S)


def test_an_unexpected_scrub_failure_is_logged_counted_and_scrub_resumes(tmp_path, caplog):
    node = StorageNode(str(tmp_path / "n1"), NodeInfo("n1", "a"), Geometry(P), "vol", durable=False)
    try:
        caplog.set_level(logging.INFO, logger="sixfold.node")
        node.handle("append", 0, records(40), 40)
        injected = Once(node.store, "iter_log", RuntimeError("injected scrub fault"))
        node.start_background(gossip_interval_s=60, scrub_interval_s=0.02)
        assert wait_until(lambda: injected.raised == 1, DEADLINE_S)
        assert wait_until(lambda: node.handle("state").extra["background_errors"]["scrub"] == 1, DEADLINE_S)
        # Scrub carries on: a record damaged afterwards is found and quarantined.
        assert node.handle("corrupt", 1, 39, 123) == 39
        assert wait_until(lambda: node.handle("state").corrupt_found == 1, DEADLINE_S)
        st = node.handle("state")
        assert st.scls[1] == 37 and st.extra["background_errors"] == {"gossip": 0, "scrub": 1, "collect": 0}
        assert "RuntimeError: injected scrub fault" in st.extra["background_last_error"]
        faults = [r for r in caplog.records if r.name == "sixfold.node" and r.exc_info]
        assert len(faults) == 1 and "scrub" in faults[0].getMessage() and faults[0].exc_info[0] is RuntimeError
    finally:
        node.close()


def test_the_threads_end_when_the_node_closes(tmp_path):
    node = StorageNode(str(tmp_path / "n1"), NodeInfo("n1", "a"), Geometry(P), "vol", durable=False)
    node.handle("append", 0, records(10), 10)
    node.start_background(gossip_interval_s=0.01, scrub_interval_s=0.01)
    threads = list(node._threads)
    assert all(t.is_alive() for t in threads)
    node.close()
    assert not any(t.is_alive() for t in threads)
    assert node.background_errors == {"gossip": 0, "scrub": 0, "collect": 0}, "closing is not a fault"


def test_an_expected_scrub_error_is_counted_and_logged_once(tmp_path, caplog):
    from engine.errors import StorageFull

    node = StorageNode(str(tmp_path / "n1"), NodeInfo("n1", "a"), Geometry(P), "vol", durable=False)
    try:
        caplog.set_level(logging.INFO, logger="sixfold.node")
        node.handle("append", 0, records(10), 10)
        injected = Once(node.store, "iter_log", StorageFull("node n1 is full: injected"), times=5)
        node.start_background(gossip_interval_s=60, scrub_interval_s=0.02)
        # The same cause five times in a row: counted five times, logged once; then once more when it clears.
        assert wait_until(lambda: any("scrub works again" in r.getMessage() for r in caplog.records), DEADLINE_S)
        assert injected.raised == 5 and node.handle("state").extra["background_expected_errors"]["scrub"] == 5
        lines = [r.getMessage() for r in caplog.records if r.name == "sixfold.node" and "scrub failed" in r.getMessage()]
        assert len(lines) == 1 and "StorageFull" in lines[0], lines
        assert node.handle("state").extra["background_errors"] == {"gossip": 0, "scrub": 0, "collect": 0}
    finally:
        node.close()
