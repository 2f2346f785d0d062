"""Expiry: puts with a deadline, the log's clock, and the step that deletes what expired.

Theory of operation
-------------------
A put may carry a deadline (flag EXPIRES, node format 4: the record's value starts with it, u64
LE microseconds; `engine.core.constants`). A time to live becomes a deadline in the writer, when
it orders the unit: its commit time plus the ttl (an `OP_TTL` op), so client clocks never matter.
The deadline is part of the record: durable, replicated, repaired, archived and restored with it.

The log's clock is the commit time the writer stamps on each unit (in its request record): the
writer's wall clock, never below the newest stamp before it, and never below the newest stamp
any node holds when a writer opens (each node keeps its newest in meta `commit_time`, and every
durable stamp is on a write quorum, so on one of the nodes the new writer synced). A read hides
a version whose deadline is at or before the *durable* log time (`Writer.log_time_us`: the stamp
of the newest durable unit), so no recovery can make an expired key live again.

The log's time moves only when something commits. This step makes it move when it matters: it
keeps a heap of the deadlines this writer ordered (and, after an open, of those a scan of the
volume found), and when the writer's clock passes one it logs a delete of that key under the
condition `VERSION(key, lsn)`, so it can never delete a newer value; the delete's own stamp is
past the deadline, so once it is durable every read agrees the key is gone. A key written again
meanwhile makes the condition fail: nothing is deleted. Each delete carries a request id (its
stamp is logged) and they go out together, sharing group commits.

What a clock jump does: forward, keys expire early (by the jump), and the log's time stays
ahead (stamps never go back) until real time catches up; backward, nothing expires until the
clock passes the newest stamp again (stamps are held at it), so a key lives at most as much
longer as the jump. Either way no key comes back to life, and a new writer on another machine
with a slower clock starts from the stamps the nodes hold.
"""

from __future__ import annotations

import logging
import os
import threading

from engine.core import conditions as cond
from engine.core.constants import FLAG_DELETE
from engine.errors import PreconditionFailed, SixfoldError

log = logging.getLogger("sixfold.expiry")

#: how often the step looks for deadlines passed (seconds), and the most deletes per pass
INTERVAL_S = 0.1
DELETES_PER_PASS_MAX = 1_000


class ExpiryStep:
    """The background step of one writer (a thread while it serves)."""

    def __init__(self, writer, interval_s: float = INTERVAL_S) -> None:
        self.writer = writer
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.stats = {"expired": 0, "skipped": 0, "scans": 0, "errors": 0}
        self.last_error = ""
        #: a scan of the volume is due (at open; after the writer's heap overflowed)
        self._scan_due = True

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="writer-expiry", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            if not self.writer.serving:
                continue
            try:
                if self._scan_due or self.writer.expiring_overflow:
                    self.scan_once()
                self.run_once()
            except SixfoldError as e:  # nodes unreachable, fenced...: try again next time
                if str(e) != self.last_error:
                    log.info("expiry step: %s", e)
                self.last_error = str(e)
                self.stats["errors"] += 1
            except Exception as e:  # a bug: logged once per cause, counted, and the step goes on
                if repr(e) != self.last_error:
                    log.exception("expiry step failed unexpectedly")
                self.last_error = repr(e)
                self.stats["errors"] += 1

    def scan_once(self) -> int:
        """Put every expiring version the volume holds at the current read point into the
        writer's heap (an open's writer knows none of its predecessor's). Returns how many."""
        self._scan_due = False
        self.writer.clear_expiring_overflow()
        found = list(self.writer.reads.expiring())
        self.writer.note_expiring(found)
        self.stats["scans"] += 1
        return len(found)

    def run_once(self) -> int:
        """Delete (conditionally) the keys whose deadline the writer's clock passed; returns how
        many were deleted."""
        w = self.writer
        due = w.take_due(w.clock_us(), DELETES_PER_PASS_MAX)
        tickets = []
        for _deadline, key, lsn in due:
            try:
                tickets.append(w.submit(((FLAG_DELETE, key, b""),), request_id=b"sixfold-expiry:" + os.urandom(12),
                                        conditions=(cond.at_version(key, lsn),))[1])
            except SixfoldError:
                w.note_expiring([(key, lsn, _deadline)])  # not logged: try again next pass
                raise
        deleted = 0
        failure: SixfoldError | None = None
        for (deadline, key, lsn), t in zip(due, tickets):
            try:
                w.wait(None, t)
                deleted += 1
            except PreconditionFailed:
                self.stats["skipped"] += 1  # written again (or deleted) since: nothing to do
            except SixfoldError as e:  # not known to be done: again next pass (its condition guards it)
                w.note_expiring([(key, lsn, deadline)])
                failure = e
        self.stats["expired"] += deleted
        if failure is not None:
            raise failure
        return deleted
