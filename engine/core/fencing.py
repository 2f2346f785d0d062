"""What a node's refusal of an append on epoch grounds means for the writer. Pure.

Theory of operation
-------------------
Every append carries the epoch the writer was at when it built the request. A node compares it
with its own epoch (`engine.node.store`): lower is refused with `StaleEpoch`, higher with
`EpochBehind`. The writer's own epoch moves on too (each membership step is a new epoch), so a
refusal means different things depending on which epoch the request carried:

* `StaleEpoch` for a request sent at an *older* epoch than the writer's current one: the writer's
  own epoch step overtook the request in flight. Nothing is wrong: RESEND at the new epoch.
* `EpochBehind`: the node missed an epoch step (it was down, restarted or wiped). It must learn
  the epoch's truncation ranges and membership before it may accept anything: SYNC it, then resend.
* `StaleEpoch` for a request sent at the writer's *current* epoch E: some node holds an epoch
  above E. Only a seal (a writer opening) raises a node's epoch, but a seal that reached no
  write quorum opened nothing: a writer cut off with a minority raises that minority by one at
  each failed attempt. A StaleEpoch therefore proves a newer writer only if the newer epoch
  *could* have been sealed on a write quorum. The writer probes every member's epoch
  (`decide_epoch_refusal`):

  - If the members still at E form a write quorum (`has_write_quorum`: of each quorum set during
    a change), no writer sealed a write quorum above E before the probe: its quorum and ours
    would share a node (2 * 4 > 6), and that node would be above E now (epochs only rise). The
    refusing nodes were raised by failed opens. STEP_UP to T = (highest epoch seen) + 1.
  - Otherwise a newer writer may exist: FENCE (stop, fail everything not durable as
    indeterminate). A real newer writer always lands here: it sealed a write quorum above E.
  - T above EPOCH_MAX, or more than EPOCH_STEP_MAX above E (the nodes at E would refuse it):
    FENCE; the volume is reopened by a new writer.

  The probe is not atomic with the step, so the step itself must exclude a writer W' that opened
  between the probe and the step at an epoch D in (E, T). The writer raises the nodes with a
  *seal* at T (strict: a node at T or above refuses), never with a blind `sync_epoch` (which
  accepts an equal epoch, and could so put two writers at T, or push W' aside after it
  acknowledged writes). The step holds (`step_up_holds`) only if the nodes that took the seal
  *and* hold no trace of a writer above E (a membership or truncation range with an epoch above
  E, read right after the seal, before this writer tells them anything) form a write quorum Q:

  - W' acknowledges nothing before its `sync_epoch` at D reached a write quorum Q'; Q and Q'
    share a node n. W''s sync of n cannot come after our seal (n is then at T > D and refuses
    it), so it came before, and n would show W''s membership at D > E (a node adopts a
    membership of an equal or higher epoch only, and keeps it). n is clean, so no such W'
    exists, and none can appear later below T (Q refuses its syncs).
  - A writer at exactly T cannot also seal a write quorum at T (seals are strict, quorums
    intersect). A writer above T is a legitimate successor: our next refusal finds the nodes at
    our epoch no quorum, and we FENCE.

  When the step does not hold, FENCE: a trace may be a failed open that synced a minority (then
  fencing costs liveness, not safety) or a real writer. After the step the writer adopts T
  (the membership re-stamped at T), tells every reachable node with `sync_epoch`, and re-sends
  what was refused at E; the nodes that refused catch up like any node that was behind.

Races, in the writer: refusals are decided one at a time (an epoch lock, also held by a
membership step); a refusal decided after the epoch moved on is a RESEND, so two concurrent
refusals step up once, to the highest epoch the probe saw.

Rules of this module: no I/O, threads, clocks or randomness (a test checks).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from engine.core.constants import EPOCH_MAX, EPOCH_STEP_MAX
from engine.core.quorum import has_write_quorum
from engine.core.types import Membership
from engine.errors import EpochBehind, SixfoldError, StaleEpoch

FENCE = "fence"
RESEND = "resend"
SYNC = "sync"
STEP_UP = "step_up"


@dataclass(frozen=True)
class Decision:
    """What to do about an epoch refusal; `epoch` is the epoch to step up to (STEP_UP only)."""

    action: str
    epoch: int = 0


def on_epoch_refusal(error: SixfoldError, sent_epoch: int, current_epoch: int) -> str:
    """FENCE, RESEND or SYNC for an append sent at `sent_epoch` that a node refused with
    `error` (a StaleEpoch or EpochBehind) while the writer is at `current_epoch`, knowing
    nothing of the members' epochs (FENCE is then the only safe answer to a StaleEpoch at the
    current epoch; `decide_epoch_refusal` can do better with a probe)."""
    assert 1 <= sent_epoch <= current_epoch, (sent_epoch, current_epoch)
    if isinstance(error, EpochBehind):
        return SYNC
    if isinstance(error, StaleEpoch):
        return FENCE if sent_epoch == current_epoch else RESEND
    raise AssertionError(f"not an epoch refusal: {type(error).__name__}")


def refusal_needs_probe(error: SixfoldError, sent_epoch: int, current_epoch: int) -> bool:
    """True when `decide_epoch_refusal` needs the members' epochs: a StaleEpoch at the current epoch."""
    return on_epoch_refusal(error, sent_epoch, current_epoch) == FENCE


def decide_epoch_refusal(
    error: SixfoldError,
    sent_epoch: int,
    current_epoch: int,
    node_epochs: Mapping[str, int] | None,
    membership: Membership | None,
) -> Decision:
    """FENCE, RESEND, SYNC or STEP_UP (with the target epoch) for an append sent at `sent_epoch`
    and refused with `error` while the writer is at `current_epoch`. `node_epochs` is the probe
    (the epoch each reachable member holds now, the refusing node's too when it answered) and
    `membership` the writer's; both are needed only when `refusal_needs_probe`."""
    simple = on_epoch_refusal(error, sent_epoch, current_epoch)
    if simple != FENCE:
        return Decision(simple)
    if node_epochs is None or membership is None:
        return Decision(FENCE)
    members = set(membership.all_nodes)
    epochs = {n: e for n, e in node_epochs.items() if n in members}
    accepting = [n for n, e in epochs.items() if e == current_epoch]
    if not has_write_quorum(accepting, membership):
        return Decision(FENCE)  # a writer may have sealed a write quorum above us
    highest = max(epochs.values())
    if highest <= current_epoch:
        # Nobody answering is above us (the refusing node did not answer the probe, or was
        # wiped since): nothing to step over; the next send finds out again.
        return Decision(RESEND)
    target = highest + 1
    if target > EPOCH_MAX or target - current_epoch > EPOCH_STEP_MAX:
        return Decision(FENCE)  # no epoch left to step to that our nodes would take
    return Decision(STEP_UP, target)


def trace_epoch(membership_epoch: int | None, truncation_epochs: Iterable[int]) -> int:
    """The highest epoch of a writer's sync that a node's state shows (membership, truncations)."""
    return max([membership_epoch or 0, *truncation_epochs])


def step_up_holds(current_epoch: int, sealed_traces: Mapping[str, int], membership: Membership) -> bool:
    """Does a step from `current_epoch` hold? `sealed_traces`: for each node that took our seal
    at the target epoch, the `trace_epoch` it showed right after (before we synced it). The
    clean ones (no trace above `current_epoch`) must form a write quorum of `membership`."""
    clean = [n for n, t in sealed_traces.items() if t <= current_epoch]
    return has_write_quorum(clean, membership)


__all__ = [
    "FENCE", "RESEND", "STEP_UP", "SYNC", "Decision", "decide_epoch_refusal", "on_epoch_refusal",
    "refusal_needs_probe", "step_up_holds", "trace_epoch",
]
