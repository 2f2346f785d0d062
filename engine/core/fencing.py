"""What a node's refusal of an append on epoch grounds means for the writer. Pure.

Theory of operation
-------------------
Every append carries the epoch the writer was at when it built the request. A node compares it
with its own epoch (`engine.node.store`): lower is refused with `StaleEpoch`, higher with
`EpochBehind`. The writer's own epoch moves on too (each membership step is a new epoch), so a
refusal means different things depending on which epoch the request carried:

* `StaleEpoch` for a request sent at the writer's *current* epoch: some node has seen a newer
  epoch, which only another writer's seal can raise. A newer writer exists: FENCE (stop, and fail
  everything not yet durable as indeterminate).
* `StaleEpoch` for a request sent at an *older* epoch than the writer's current one: the writer's
  own membership step overtook the request in flight. Nothing is wrong: RESEND at the new epoch.
* `EpochBehind`: the node missed an epoch step (it was down, restarted or wiped). It must learn
  the epoch's truncation ranges and membership before it may accept anything: SYNC it, then resend.

Rules of this module: no I/O, threads, clocks or randomness (a test checks).
"""

from __future__ import annotations

from engine.errors import EpochBehind, SixfoldError, StaleEpoch

FENCE = "fence"
RESEND = "resend"
SYNC = "sync"


def on_epoch_refusal(error: SixfoldError, sent_epoch: int, current_epoch: int) -> str:
    """FENCE, RESEND or SYNC for an append sent at `sent_epoch` that a node refused with
    `error` (a StaleEpoch or EpochBehind) while the writer is at `current_epoch`."""
    assert 1 <= sent_epoch <= current_epoch, (sent_epoch, current_epoch)
    if isinstance(error, EpochBehind):
        return SYNC
    if isinstance(error, StaleEpoch):
        return FENCE if sent_epoch == current_epoch else RESEND
    raise AssertionError(f"not an epoch refusal: {type(error).__name__}")


__all__ = ["FENCE", "RESEND", "SYNC", "on_epoch_refusal"]
