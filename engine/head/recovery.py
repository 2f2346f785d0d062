"""The recovery driver: what a new writer does on the nodes before it serves.

Theory of operation
-------------------
`recover` runs the steps of `engine.core.recovery` (which decides; this module does the I/O):

1. *Discover*: ask every reachable node for its state; the newest membership and epoch any node
   knows (a new volume: the first six nodes at epoch 0).
2. *Seal* at epoch + 1 on every member: each node answers with its segments' summaries, taken
   atomically with the raise, after which the old writer can make nothing durable. A node that
   already holds a higher epoch refuses `StaleEpoch`: another writer is opening, and this one
   gives up. A write quorum of each quorum set must answer.
3. *Plan* (`plan_recovery`): base, VCL, VDL, the truncation range above VDL, and which records in
   (base, VDL] need copying.
4. *Sync* the sealed nodes to the new epoch with the truncation ranges and the membership (a write
   quorum must take it).
5. *Re-replicate* the records of (base, VDL] from a holder to every synced node, in frames of at
   most `REPLICATE_BYTES_MAX`, each on a write quorum before the next is sent.

The result (`Recovered`) is what the writer builds its ledger and links from. Any step that
cannot reach a write quorum raises Unavailable with what it reached; nothing is served.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from engine import codec
from engine.core.constants import FRAME_BYTES_MAX, WRITE_QUORUM
from engine.core.quorum import has_write_quorum
from engine.core.recovery import RecoveryPlan, plan_recovery
from engine.core.types import Membership, NodeInfo, SealReply
from engine.errors import SixfoldError, StaleEpoch, Unavailable

#: Bytes of records per re-replication frame (a node frame holds at most FRAME_BYTES_MAX).
REPLICATE_BYTES_MAX = FRAME_BYTES_MAX // 2


@dataclass(frozen=True)
class Recovered:
    """The outcome of a recovery at `epoch`."""

    epoch: int
    membership: Membership  # at `epoch`
    plan: RecoveryPlan
    sealed: frozenset[str]
    synced: tuple[str, ...]  # nodes that took the new epoch, truncations and membership
    replicated: int  # records copied again


def discover(transport, nodes: Sequence[NodeInfo]) -> tuple[Membership, int]:
    """The newest membership and epoch any reachable node knows (defaults for a new volume)."""
    epoch, membership = 0, None
    for n in nodes:
        try:
            st = transport.state(n.id)
        except SixfoldError:
            continue
        epoch = max(epoch, st.epoch)
        if st.membership is not None and (membership is None or st.membership.epoch > membership.epoch):
            membership = st.membership
    if membership is None:
        membership = Membership(0, tuple(n.id for n in nodes[:6]))
    return membership, max(epoch, membership.epoch)


def recover(transport, nodes: Sequence[NodeInfo], protection_groups: int, *, lal: int) -> Recovered:
    """Seal a new epoch, plan, sync and re-replicate (see the module docstring)."""
    membership, epoch = discover(transport, nodes)
    epoch += 1
    replies: list[SealReply] = []
    for n in membership.all_nodes:
        try:
            replies.append(transport.seal(n, epoch))
        except StaleEpoch as e:
            raise StaleEpoch(f"another writer raised the epoch while this one was opening: {e}") from None
        except SixfoldError:
            continue
    if not has_write_quorum((r.node for r in replies), membership):
        raise Unavailable(
            f"cannot open the volume: {len(replies)} of {len(membership.all_nodes)} nodes answered "
            f"({', '.join(r.node for r in replies) or 'none'}); a writer needs {WRITE_QUORUM} of each quorum set"
        )
    sealed = frozenset(r.node for r in replies)
    plan = plan_recovery(
        epoch, protection_groups, replies, lal=lal,
        all_sealed=all(n in sealed for n in membership.all_nodes), membership=membership,
    )
    membership = Membership(epoch, membership.members, membership.next_members)
    synced = []
    for r in replies:
        try:
            transport.sync_epoch(r.node, epoch, plan.truncations, membership)
            synced.append(r.node)
        except SixfoldError:
            continue
    if not has_write_quorum(synced, membership):
        raise Unavailable(f"cannot open the volume: truncation reached only {synced}")
    replicated = replicate(transport, epoch, plan, synced, membership)
    return Recovered(epoch, membership, plan, sealed, tuple(synced), replicated)


def replicate(transport, epoch: int, plan: RecoveryPlan, nodes: Sequence[str], membership: Membership) -> int:
    """Make the records of (base, VDL] durable again: copy each from a holder to every node.

    A PG is copied in frames of at most about REPLICATE_BYTES_MAX, each fetched a node frame
    at a time until the node says there is no more, and each must reach a write quorum of the
    membership (of both quorum sets during a change) before the next one is sent."""
    by_pg: dict[int, dict[int, tuple[str, ...]]] = {}
    for pg, lsn, holders in plan.replicate:
        if not holders:
            raise Unavailable(f"recovery found no intact copy of record {lsn} (PG {pg}); waiting for more nodes")
        by_pg.setdefault(pg, {})[lsn] = holders
    count = 0
    for pg, holders_of in sorted(by_pg.items()):
        wanted = sorted(holders_of)
        i = 0
        while i < len(wanted):
            chunk = _replicate_chunk(transport, pg, wanted, i, holders_of)
            frame = codec.encode_frame(chunk)
            acked = []
            for n in nodes:
                try:
                    transport.append(n, epoch, frame, plan.base)
                    acked.append(n)
                except SixfoldError:
                    continue
            if not has_write_quorum(acked, membership):
                raise Unavailable(
                    f"recovery could re-replicate records {wanted[i]}..{wanted[i + len(chunk) - 1]} of PG {pg} "
                    f"to only {', '.join(acked) or 'no node'}; it needs {WRITE_QUORUM} of each quorum set "
                    f"({' and '.join('/'.join(qs) for qs in membership.quorum_sets)})"
                )
            i += len(chunk)
            count += len(chunk)
    return count


def _replicate_chunk(transport, pg: int, wanted: list[int], i: int, holders_of: dict[int, tuple[str, ...]]) -> list[bytes]:
    """The records wanted[i], wanted[i+1], ... of `pg`, as many as fit REPLICATE_BYTES_MAX
    (at least one), fetched from their holders. Unavailable if a record has no answering holder."""
    got: dict[int, bytes] = {}

    def fetch(holder: str, after: int, upto: int) -> tuple[int, bool] | None:
        """Fetch one frame of `holder` above `after`; keep the wanted records. Returns
        (last LSN in the frame, more) or None if the holder cannot answer or has nothing."""
        try:
            frame, more, _complete, _horizon = transport.fetch(holder, pg, after, FRAME_BYTES_MAX, upto)
            items = codec.index_frame(frame)
        except SixfoldError:
            return None
        for it in items:
            if it.lsn in holders_of:
                got.setdefault(it.lsn, it.record)
        return (items[-1].lsn, more) if items else None

    hi = wanted[-1]
    first = wanted[i]
    end = None  # the chunk's records lie in [first, end]
    for holder in holders_of[first]:
        answer = fetch(holder, first - 1, hi)
        if answer is not None:
            last, more = answer
            end = last if more else hi
            break
    if end is None:
        raise Unavailable(f"recovery could not read record {first} of PG {pg} from {', '.join(holders_of[first])}")
    chunk: list[bytes] = []
    size = 0
    for lsn in wanted[i:]:
        if lsn > end:
            break
        if lsn not in got:
            # The holder asked first lacks it: ask its own holders. A fetch above lsn - 1 starts
            # with lsn if the holder has it (and brings the records after it, up to `end`).
            for holder in holders_of[lsn]:
                fetch(holder, lsn - 1, end)
                if lsn in got:
                    break
            if lsn not in got:
                raise Unavailable(f"recovery could not read record {lsn} of PG {pg} from {', '.join(holders_of[lsn])}")
        rec = got.pop(lsn)
        if chunk and size + len(rec) > REPLICATE_BYTES_MAX:
            break
        chunk.append(rec)
        size += len(rec)
    return chunk
