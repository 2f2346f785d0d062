"""The writer lease and automatic failover: who may serve, and when another may take over.

Theory of operation
-------------------
**The lease lives on the storage nodes and is renewed by what the writer sends anyway.** Every
append the writer sends at a node's epoch (records, or the empty heartbeat it sends every
HEARTBEAT_S when idle) and its seal renew the lease there: the node notes the time by its own
monotonic clock and reports the age (`NodeState.lease_age_ms`). A node just (re)started counts
from its start: it cannot see a lease it forgot, so it assumes one was renewed then.

**A candidate** (`Candidate`: a standby writer or a reader allowed to become the writer) asks the
nodes for their state and takes over only when a write quorum of the membership reports the lease
older than `lease_s`: the writer then cannot make anything durable (it needs that quorum's acks)
and has not heard from it for a full period. It takes over by opening the volume at a new epoch
(`Writer.open`, which seals): the existing epoch rule fences the old writer, and two candidates
racing cannot both win (the second seal at the same epoch is refused, `StaleEpoch`, and that
candidate goes back to watching). A candidate in another AZ than the writer it replaces goes
first; one in the same AZ waits `same_az_delay_s` more, so the takeover prefers another AZ.
A deployment spec's writer is a candidate too (`open_new`: it alone may also open a volume no
writer ever opened), so a writer host that comes back never fences the writer that took over
(engine.cluster.locate).

**Reads are fenced too.** A writer serves a linearizable read only while its lease holds by its
own clock, counted from when the renewals were *sent*: the read-quorum-th newest send time of an
acknowledged append (three of the six; three of each quorum set during a change), plus
`lease_s - lease_margin(lease_s)` (`Writer.view`). A node renewed no earlier than that send, so
its count runs out no earlier than send + lease_s; the writer's runs out before it by the margin,
which covers the clocks' rates differing (below). While the writer's lease holds, a read quorum
of nodes has not seen it lapse, so fewer than a write quorum can report it lapsed (3 + 4 > 6):
no candidate can take over, and the VDL the writer knows is the newest. This is also why an AZ
plus a node lost (three nodes left) keeps linearizable reads: the three renew the lease. A
writer paused past a failover cannot answer from the VDL it cached, and its first request after
waking meets nodes at a newer epoch and is refused (`StaleEpoch`): it steps down
(`engine.head.endpoint`: the process exits). Nodes also refuse reads from an older epoch.
Snapshot reads (a `ReadView` taken earlier) are reads of the past by definition and need no
lease. An operator's `sixfold writer start` opens at once, without waiting for the lease: that
is the manual override, as before.

**The clock assumption**: no synchronised clocks. Each process measures intervals with its own
monotonic clock, and the rates of any two clocks differ by less than MARGIN_RATE (10%; real
clocks drift by parts per million) plus a fixed MARGIN_S for scheduling. Nothing compares one
process's clock reading with another's.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from engine.core.quorum import has_write_quorum
from engine.core.types import Membership, NodeInfo
from engine.errors import SixfoldError

log = logging.getLogger("sixfold.failover")

#: The writer's lease, in seconds: short enough to fail over fast (writes resume within about
#: lease_s + a recovery), long enough not to lapse on a loaded machine (heartbeats every 0.1 s).
LEASE_S_DEFAULT = 1.0
MARGIN_RATE = 0.10
MARGIN_S = 0.05
#: How often a candidate asks the nodes.
WATCH_S = 0.1
#: State calls to nodes a candidate watches are bounded by this.
STATE_TIMEOUT_S = 0.5


def lease_margin(lease_s: float) -> float:
    """What the writer takes off its lease for the clocks' rates and scheduling."""
    return lease_s * MARGIN_RATE + MARGIN_S


def lease_lapsed(states: dict[str, object], membership: Membership, lease_s: float) -> tuple[bool, list[str]]:
    """(lapsed, the nodes that say so): True when the nodes whose lease is older than `lease_s`
    form a write quorum of `membership` (of each quorum set during a change)."""
    old = [n for n, st in states.items() if st is not None and st.lease_age_ms >= lease_s * 1000]
    return has_write_quorum(old, membership), old


class Candidate:
    """Watches the writer's lease on the nodes; `wait_for_lapse` returns once this process may
    try to take over (see the module docstring)."""

    def __init__(self, transport, nodes: Sequence[NodeInfo], *, lease_s: float = LEASE_S_DEFAULT, az: str = "",
                 writer_az: Callable[[], str] = lambda: "", same_az_delay_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic, me: str = "",
                 preferred: Callable[[], str | None] = lambda: None,
                 rank_delay_s: float | Callable[[], float] = 0.0, open_new: bool = False) -> None:
        """`preferred()`: the candidate a planned failover names (`writer failover --to`), if
        any: it goes at once, every other candidate waits two lease periods more. `open_new`:
        this candidate may open a volume no writer ever opened (a write quorum of its nodes
        answers and none knows a membership): a deployment spec's writer, which starts as a
        candidate, so that restarted it never fences a writer that took over meanwhile."""
        self.me = me
        self.open_new = open_new
        self.preferred = preferred
        #: candidates of one cluster wait by rank, so that the first one's seal (which renews the
        #: lease on the nodes) is seen by the others before they open too
        self.rank_delay_s = rank_delay_s
        self.transport = transport
        self.nodes = list(nodes)
        self.lease_s = lease_s
        self.az = az
        self.writer_az = writer_az
        self.same_az_delay_s = lease_s / 2 if same_az_delay_s is None else same_az_delay_s
        self.clock = clock
        self.last_seen: dict = {}

    def _states(self) -> dict[str, object]:
        out = {}
        for n in self.nodes:
            try:
                out[n.id] = self.transport.state(n.id)
            except SixfoldError:
                out[n.id] = None
        return out

    def check(self) -> tuple[bool, str]:
        """(lapsed now, why) from one round of node states."""
        states = self._states()
        known = [st.membership for st in states.values() if st is not None and st.membership is not None]
        if not known:
            answered = [n for n, st in states.items() if st is not None]
            if self.open_new and has_write_quorum(answered, Membership(0, tuple(n.id for n in self.nodes))):
                return True, f"a new volume: {', '.join(answered)} know no writer"
            return False, "no node answered with a membership"
        membership = max(known, key=lambda m: m.epoch)
        lapsed, old = lease_lapsed(states, membership, self.lease_s)
        self.last_seen = {n: (None if st is None else st.lease_age_ms) for n, st in states.items()}
        return lapsed, f"lease older than {self.lease_s:g} s on {', '.join(old) or 'no node'}"

    def wait_for_lapse(self, stop: threading.Event) -> bool:
        """Block until the lease lapsed (for `same_az_delay_s` more when this candidate is in the
        writer's AZ); False if `stop` was set first."""
        since = None
        while not stop.is_set():
            try:
                lapsed, why = self.check()
            except Exception:  # never let the watcher die silently
                log.exception("lease watch failed; retrying")
                lapsed, why = False, "watch failed"
            now = self.clock()
            if not lapsed:
                since = None
            else:
                if since is None:
                    since = now
                    log.warning("the writer's lease lapsed: %s", why)
                rank_delay = self.rank_delay_s() if callable(self.rank_delay_s) else self.rank_delay_s
                delay = (self.same_az_delay_s if self.az and self.az == self.writer_az() else 0.0) + rank_delay
                chosen = self.preferred()
                if chosen:
                    delay = 0.0 if chosen == self.me else 2 * self.lease_s
                if now - since >= delay:
                    return True
            stop.wait(WATCH_S)
        return False
