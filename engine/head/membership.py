"""Membership change: the writer's epoch steps, and the one driver that runs a replacement.

Theory of operation
-------------------
Aurora replaces a segment without stopping writes in two epoch steps, ABCDEF -> ABCDEF+ABCDEG ->
ABCDEG (`engine.core.membership` decides each step; this module does the I/O):

* `MembershipSteps` (the writer's, `Writer.steps`): move the writer to a new epoch with the
  membership a core step gives, under the writer's epoch lock (so never at the same time as a
  refusal's step-up). The epoch is *owned* first: a strict `seal` at it on a write quorum of the
  new membership (of each quorum set), as a recovery seals; a node already at that epoch or
  above refuses. Without such a quorum nothing changes (Unavailable: try again; the seals that
  did land are a minority epoch, which the fencing rules step over like a failed open). Two
  write quorums meet, so a writer and a candidate opening at the same epoch cannot both have
  it. Then the writer adopts it (`Writer.adopt_membership`) and tells every member
  (`sync_epoch`); a member that missed the telling learns it as it answers (`EpochBehind`).

* `MembershipChange` is the *one* driver of a replacement, used by the embedded engine
  (`db.cluster.replace_node`, synchronously, or a simulator one `poll` at a time) and by the
  writer endpoint (`ReplaceNode`, from a background thread polled by `MembershipStatus`). The
  place it runs in is a `ChangeHost`: it gives the current writer, makes the new node reachable
  (the embedded engine starts it; the endpoint learns its address) and retires a node that left
  (the embedded engine stops it; the endpoint forgets it and the launcher stops the process).

  `begin()` checks the request (the old node a member, the new one not; asked again for the change
  under way, it resumes), adds the new node, runs step 1, and if step 1 is refused retires the
  node it added, so a refused change leaves nothing running (a step 1 that could not run, the
  writer being unavailable, leaves it for the retry). Each `poll()` then looks at the
  *current* writer's membership (a writer that crashed between steps is carried on by the next):
  step 1 again if it was lost; with `revert` on, if the old node was down at step 1 and answers
  before the new one has caught up, `revert_replace` and the new node is retired; once the new
  node holds every PG's durable chain (`replacement_caught_up`), step 2; and the old node is
  retired only once a write quorum of the new membership knows step 2 (until then a writer opened
  after a crash could still find the change under way, with the old node a member).
  Phases: rebuilding -> committing -> replaced | reverted | failed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from engine.core import membership as core_steps
from engine.core.quorum import has_write_quorum
from engine.core.types import Membership, NodeInfo
from engine.errors import InvalidArgument, SixfoldError, StaleEpoch, Unavailable

log = logging.getLogger("sixfold.writer")

#: The phases of a change still under way.
ACTIVE_PHASES = frozenset({"rebuilding", "committing"})
#: How often `run` polls the new node's progress.
POLL_S = 0.05
#: How often a change whose old node was down asks that node whether it is back (revert).
PROBE_S = 0.5


class MembershipSteps:
    """The writer's epoch steps of a membership change."""

    def __init__(self, writer) -> None:
        self._w = writer

    def step(self, membership_of: Callable[[Membership], Membership]) -> Membership:
        """Move to a new epoch with the membership `membership_of(current)` (a step of
        `engine.core.membership`; its refusal changes nothing); tell every reachable member.
        Writes go on: appends in flight at the old epoch are simply re-sent."""
        w = self._w
        with w.epoch_lock:  # not while a refusal steps the epoch up
            new = w.next_membership(membership_of)
            return self.take(new)

    def take(self, new: Membership) -> Membership:
        """Own `new.epoch` (strict seals on a write quorum of `new`), then adopt `new` and tell
        every member. Caller holds the writer's epoch lock. Short of a write quorum nothing
        changes but the seals that landed, which the writer remembers as its own (`own_seals`:
        its fencing rules do not take them for another writer's, and the step is taken again
        when a refusal from one of them comes in, or when asked again): Unavailable."""
        w = self._w
        epoch = new.epoch
        if epoch != w.epoch + 1:  # the writer stepped its epoch meanwhile: this step is void
            w.pending_step = None
            raise Unavailable(f"the writer's epoch moved to {w.epoch} during a membership step to {epoch}; try again")
        # (A lenient sync_epoch here once let a writer share an epoch with a candidate that had
        # just sealed it, and both wrote at it. A recovery needs a write quorum of strict seals
        # too, and two write quorums meet, so at most one of them gets an epoch.)
        own = w.own_seals.get(epoch, set())
        refused = []
        for n in new.all_nodes:
            if n in own:
                continue
            try:
                w.transport.seal(n, epoch)
                own.add(n)
            except StaleEpoch as e:
                refused.append(f"{n} ({e})")
            except SixfoldError:
                continue
        w.own_seals = {epoch: own} if own else {}
        if not has_write_quorum(own, new):
            w.pending_step = new
            why = f"refused by {'; '.join(refused)}" if refused else f"only {', '.join(sorted(own)) or 'no node'} answered"
            log.warning("membership step to epoch %d not taken yet: %s", epoch, why)
            raise Unavailable(f"membership step to epoch {epoch} did not reach a write quorum of "
                              f"{' + '.join('/'.join(qs) for qs in new.quorum_sets)}: {why}; nothing changed, "
                              "try again")
        w.pending_step = None
        w.own_seals = {}
        epoch, new = w.adopt_membership(new)
        log.info("membership at epoch %d: %s", epoch, " + ".join("/".join(qs) for qs in new.quorum_sets))
        told = []
        for n in new.all_nodes:
            try:
                w.transport.sync_epoch(n, epoch, w.truncations, new)
                told.append(n)
            except SixfoldError:
                continue
        if not has_write_quorum(told, new):
            raise Unavailable(f"membership step to epoch {epoch} reached only {told}; it completes as nodes return")
        return new

    def begin_replace(self, old: str, new: str) -> Membership:
        """Step 1: the new node joins as a member of a second quorum set that replaces `old`."""
        return self.step(lambda m: core_steps.begin_replace(m, old, new))

    def finish_replace(self) -> Membership:
        """Step 2: commit the change; the new set alone is the membership."""
        return self.step(core_steps.finish_replace)

    def revert_replace(self) -> Membership:
        """Undo step 1 (the old node came back before the change completed)."""
        return self.step(core_steps.revert_replace)

    def replacement_caught_up(self, new: str) -> bool:
        """True once `new` holds every PG's chain up to the PG's last durable record."""
        return core_steps.replacement_caught_up(*self._w.catch_up_inputs(new))

    def catch_up_progress(self, node: str) -> tuple[float, int]:
        """(fraction, lag) of `node` against every PG's read tail (1.0 and 0 once caught up)."""
        return core_steps.catch_up_progress(*self._w.catch_up_inputs(node))


class ChangeHost(Protocol):
    """Where a membership change runs: the embedded volume or the writer endpoint."""

    def current_writer(self):
        """The open writer, or None while one is recovering."""

    def add_node(self, info: NodeInfo, address: str | None) -> bool:
        """Make `info` reachable (start it, or learn its address); True if it was added now
        (False: it existed already, e.g. a change asked again)."""

    def retire_node(self, node_id: str) -> None:
        """`node_id` left the volume (or never joined): stop using it."""


@dataclass
class MembershipChange:
    """One replacement of `old` by `new` (mutable; a driving thread and status readers share it)."""

    host: ChangeHost
    old: str
    new: str
    az: str
    address: str | None = None
    timeout_s: float = 120.0
    #: revert when the old node, down at step 1, answers before the new one caught up
    revert: bool = True
    clock: Callable[[], float] = time.monotonic
    phase: str = "rebuilding"
    was_down: bool = False
    fraction: float = 0.0
    lag: int = 0
    error: str = ""
    started: float = 0.0
    ended: float | None = None
    _probe_at: float = field(default=0.0, repr=False)

    # --- the steps ------------------------------------------------------------------------------
    def _writer(self):
        w = self.host.current_writer()
        if w is None:
            raise Unavailable("the writer is recovering; the change goes on once it is open")
        return w

    def _answers(self, w, node_id: str) -> bool:
        try:
            w.transport.state(node_id)
            return True
        except SixfoldError:
            return False

    def begin(self) -> MembershipChange:
        """Check the request, add the new node, run step 1 (see the module docstring). Asked
        for the change under way (or done already), it resumes (or reports it done)."""
        self.started = self.clock()
        w = self._writer()
        m = w.membership()
        expected = tuple(self.new if n == self.old else n for n in m.members)
        if m.next_members is None and self.new in m.members and self.old not in m.members:
            self._end("replaced", fraction=1.0)  # done already (asked again after an interruption)
            return self
        resume = m.next_members is not None
        if resume and m.next_members != expected:
            raise InvalidArgument(f"another membership change is under way ({', '.join(m.members)} -> {', '.join(m.next_members)})")
        if not resume:
            if self.old not in m.members:
                raise InvalidArgument(f"{self.old} is not a member ({', '.join(m.members)})")
            if self.new in m.members:
                raise InvalidArgument(f"{self.new} is already a member")
        added = self.host.add_node(NodeInfo(self.new, self.az), self.address)
        self.was_down = not self._answers(w, self.old)
        if not resume:
            try:
                w.steps.begin_replace(self.old, self.new)
            except Unavailable:
                # Step 1 is in the writer's ledger but reached fewer than a write quorum of
                # nodes: they learn it as they answer (EpochBehind), so the change goes on. Or
                # the writer stopped: the new node stays, and asking again resumes.
                if w.membership().next_members != expected:
                    raise
            except SixfoldError:
                if w.membership().next_members == expected:
                    pass  # the writer took this step meanwhile (a pending step taken again)
                else:
                    if added:  # refused outright: nothing changed, the new node goes again
                        self.host.retire_node(self.new)
                    raise
        log.info("membership change %s -> %s begun at epoch %d (%s was %s)", self.old, self.new, w.epoch, self.old,
                 "down" if self.was_down else "up")
        return self

    def poll(self, *, finish: bool = True) -> str:
        """Take the next step if it can be taken now; the phase after it. `finish=False` holds
        step 2 back (a simulator commits when its plan says). Raises what the step raised
        (Unavailable: try again later); a new node that does not catch up within `timeout_s`
        ends the change `failed` (it stays open in the membership: a new change resumes it)."""
        if self.phase not in ACTIVE_PHASES:
            return self.phase
        w = self._writer()
        w.check_usable()
        m = w.membership()
        if self.phase == "rebuilding":
            if self.new not in m.all_nodes:
                w.steps.begin_replace(self.old, self.new)  # step 1 was lost with a crashed writer: again
                return self.phase
            self.fraction, self.lag = w.steps.catch_up_progress(self.new)
            caught_up = m.next_members is None or w.steps.replacement_caught_up(self.new)
            if not caught_up:
                now = self.clock()
                if self.revert and self.was_down and now >= self._probe_at:
                    self._probe_at = now + PROBE_S
                    if self._answers(w, self.old):
                        self._step(w, w.steps.revert_replace, lambda m: self.new not in m.all_nodes)
                        self.host.retire_node(self.new)
                        self._end("reverted")
                        log.info("membership change %s -> %s reverted: %s answered first", self.old, self.new, self.old)
                        return self.phase
                if now - self.started > self.timeout_s:
                    self.fail(
                        f"Unavailable: {self.new} did not catch up within {self.timeout_s:g} s ({self.fraction:.0%} done); "
                        f"the change stays open: ask again to keep waiting, or bring {self.old} back to revert it"
                    )
                return self.phase
            if not finish:
                return self.phase
            if self.old in m.all_nodes:
                self._step(w, w.steps.finish_replace, lambda m: m.next_members is None and self.old not in m.all_nodes)
            self.fraction, self.lag = 1.0, 0
            self.phase = "committing"
        m = w.membership()
        told = [n for n in m.all_nodes if self._knows(w, n, m)]
        if not has_write_quorum(told, m):
            return self.phase  # the senders tell the others as they answer (EpochBehind)
        self.host.retire_node(self.old)
        self._end("replaced")
        log.info("membership change %s -> %s done at epoch %d in %.2f s", self.old, self.new, w.epoch, self.ended - self.started)
        return self.phase

    def run(self, stop: threading.Event | None = None, progress: Callable[[float], None] | None = None) -> str:
        """Poll until the change ends; the final phase. Never raises: a failure ends `failed`
        with its error (the change stays open in the membership: asking again resumes it)."""
        stop = stop or threading.Event()
        try:
            while True:
                if stop.is_set():
                    raise Unavailable("stopped; the change stays open (ask again to resume)")
                try:
                    phase = self.poll()
                except Unavailable:
                    phase = self.phase  # a writer recovering, a step known to too few nodes: retry
                    if self.clock() - self.started > self.timeout_s:
                        raise
                if phase not in ACTIVE_PHASES:
                    return phase
                if progress is not None:
                    progress(self.fraction)
                stop.wait(POLL_S)
        except SixfoldError as e:
            self.fail(f"{type(e).__name__}: {e}")
        except Exception as e:  # a bug: report it as a failed change rather than losing the thread silently
            log.exception("membership change %s -> %s failed unexpectedly", self.old, self.new)
            self.fail(f"SixfoldError: internal error {type(e).__name__}: {e}")
        return self.phase

    def fail(self, error: str) -> None:
        self.error = error
        self._end("failed")
        log.warning("membership change %s -> %s failed: %s", self.old, self.new, error)

    # --- helpers --------------------------------------------------------------------------------
    def _end(self, phase: str, fraction: float | None = None) -> None:
        if fraction is not None:
            self.fraction, self.lag = fraction, 0
        self.ended = self.clock()
        self.phase = phase

    @staticmethod
    def _step(w, step, done: Callable[[Membership], bool]) -> None:
        """Run step 2 (or the revert). One that reached fewer than a write quorum is still the
        writer's membership; the nodes learn it as they answer."""
        try:
            step()
        except Unavailable:
            if not done(w.membership()):
                raise
        except InvalidArgument:
            # The writer took this very step meanwhile (a pending step, taken again when its
            # nodes came back: `MembershipSteps.take`), so the core step finds nothing to do.
            if not done(w.membership()):
                raise

    @staticmethod
    def _knows(w, node_id: str, membership: Membership) -> bool:
        try:
            st = w.transport.state(node_id)
        except SixfoldError:
            return False
        return st.membership is not None and st.membership.epoch >= membership.epoch

    @property
    def seconds(self) -> float:
        return round((self.ended or self.clock()) - self.started, 3)
