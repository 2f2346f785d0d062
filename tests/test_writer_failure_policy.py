"""The writer's failure policy for its sender threads (finding 7 of issue 8, writer side).

* An unexpected exception on a link (a bug, here injected into the transport) is logged once per
  cause with its traceback (logger "sixfold.writer"), counted on the link in `status()`, and the
  sender carries on after a bounded back-off: writes go on, and the link recovers by itself.
* An expected error (a node that is down) is logged once per change of cause, not once per retry.
* An unexpected exception while the ledger is being changed leaves the writer unable to trust its
  own bookkeeping: it fences itself with a reason that says so, and a new writer recovers.
"""

from __future__ import annotations

import logging

import pytest
from waiting import eventually

import engine
from engine.embedded import ClusterControl, EmbeddedOptions, EmbeddedVolume
from engine.transport.base import Transport


class Injector(Transport):
    """Passes calls through; raises `fail[node]` (an exception instance) on that node's next
    `count[node]` appends from the writer."""

    fail: dict = {}
    count: dict = {}

    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        self.source = inner.source

    def _call(self, node, method, *args):
        if method == "append" and self.source == "writer" and Injector.count.get(node, 0) > 0:
            Injector.count[node] -= 1
            raise Injector.fail[node]
        return self.inner._call(node, method, *args)

    def close(self) -> None:
        self.inner.close()


@pytest.fixture
def db(tmp_path):
    Injector.fail, Injector.count = {}, {}
    vol = EmbeddedVolume(
        str(tmp_path / "d"), EmbeddedOptions(durable=False, write_timeout_s=5.0, gossip_interval_s=0.05),
        transport_wrapper=Injector,
    )
    d = engine.Database(vol, ClusterControl(vol))
    yield d
    d.close()


def link(db, node):
    return db.status()["writer"]["links"][node]


def writer_records(caplog, level, node):
    return [r for r in caplog.records if r.name == "sixfold.writer" and r.levelno == level and f"-> {node}:" in r.getMessage()]


def test_an_unexpected_exception_in_a_sender_is_logged_once_counted_and_survived(db, caplog):
    caplog.set_level(logging.INFO, logger="sixfold.writer")
    db.put(b"before", b"1")
    Injector.fail["n3"] = RuntimeError("injected bug in the transport")
    Injector.count["n3"] = 3
    for i in range(20):
        db.put(b"k%d" % i, b"v%d" % i)  # four other nodes suffice meanwhile
    eventually(lambda: Injector.count["n3"] == 0, "the three injected faults to be met")
    # The link recovers by itself: up again, and sent everything.
    eventually(lambda: link(db, "n3")["up"] and link(db, "n3")["error"] == "", "the link to n3 to recover")
    db.put(b"after", b"2")
    vdl = db.status()["vdl"]
    eventually(lambda: link(db, "n3")["sent_lsn"] >= vdl, f"n3 to be sent everything up to VDL {vdl}")
    st = link(db, "n3")
    assert st["errors"] == 3
    assert st["last_error"] == "RuntimeError: injected bug in the transport"
    errors = writer_records(caplog, logging.ERROR, "n3")
    assert len(errors) == 1, [r.getMessage() for r in errors]  # one cause, logged once
    assert errors[0].exc_info is not None and errors[0].exc_info[0] is RuntimeError
    assert "RuntimeError" in errors[0].getMessage()
    assert writer_records(caplog, logging.INFO, "n3"), "the recovery of the link is logged"
    assert all(link(db, n)["errors"] == 0 for n in ("n1", "n2", "n4", "n5", "n6"))
    # Another cause is logged again.
    Injector.fail["n3"] = KeyError("another bug")
    Injector.count["n3"] = 1
    db.put(b"again", b"3")
    eventually(lambda: link(db, "n3")["errors"] == 4 and len(writer_records(caplog, logging.ERROR, "n3")) == 2,
               "the fourth fault counted and its new cause logged")
    for i in range(20):
        assert db.get(b"k%d" % i) == b"v%d" % i
    assert db.get(b"after") == b"2" and db.get(b"again") == b"3"


def test_a_node_that_is_down_is_logged_once_not_once_per_retry(db, caplog):
    caplog.set_level(logging.INFO, logger="sixfold.writer")
    db.put(b"before", b"1")
    db.cluster.stop_node("n5")
    for i in range(10):
        db.put(b"k%d" % i, b"v")
    eventually(lambda: not link(db, "n5")["up"], "the writer to see n5 down")
    retried_vdl = db.status()["vdl"]
    db.put(b"more", b"v")
    assert db.status()["vdl"] > retried_vdl
    warnings = writer_records(caplog, logging.WARNING, "n5")
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "Unavailable" in warnings[0].getMessage() and warnings[0].exc_info is None
    assert link(db, "n5")["errors"] == 0  # expected errors are not bugs
    db.cluster.start_node("n5")
    eventually(lambda: link(db, "n5")["up"], "the writer to see n5 up again")
    assert writer_records(caplog, logging.INFO, "n5")


def test_an_exception_while_the_ledger_changes_fences_the_writer_and_a_new_one_recovers(db, caplog):
    caplog.set_level(logging.INFO, logger="sixfold.writer")
    db.put(b"safe", b"acknowledged")
    w = db.cluster._v.writer
    real = w.ledger.record_scls

    def broken(node, scls):
        raise ZeroDivisionError("injected into the ledger")

    w.ledger.record_scls = broken
    # Indeterminate if it was logged first, Unavailable if the fence came first: both say why.
    with pytest.raises(engine.Unavailable, match="fenced itself"):
        db.put(b"doubt", b"x")
    eventually(lambda: w.fenced is not None, "the writer to fence itself")
    assert "fenced itself" in w.fenced and "ZeroDivisionError" in w.fenced
    with pytest.raises(engine.Unavailable, match="fenced itself"):
        db.put(b"refused", b"x")
    assert not w.serving
    critical = [r for r in caplog.records if r.name == "sixfold.writer" and r.levelno == logging.CRITICAL]
    assert len(critical) == 1 and critical[0].exc_info is not None
    w.ledger.record_scls = real
    db.cluster.crash_writer()
    assert db.get(b"safe") == b"acknowledged"
    assert db.get(b"refused") is None
    db.put(b"later", b"ok")
    assert db.get(b"later") == b"ok"
