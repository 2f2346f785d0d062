"""The transport: how a head (or a node's gossip) talks to storage nodes.

Theory of operation
-------------------
One small interface with several implementations: in-process calls (embedded), gRPC (cluster),
and a fault-injecting wrapper around either. A `Transport` belongs to one *source* (the writer,
a reader, or a node gossiping), so faults can be described as who cannot reach whom.

Every operation is a call `_call(node_id, method, *args)`; the typed methods below only name the
arguments. The node side exposes methods of the same names (`engine.node.service.StorageNode`).
Errors: a node that cannot be reached raises `Unavailable`; errors the node raises on purpose
(`StaleEpoch`, `EpochBehind`, `SegmentIncomplete`, `CorruptRecord`, ...) arrive as the same classes.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

from engine.core.types import AppendReply, FetchReply, Membership, NodeState, ReadReply, SealReply, TruncationRange, VersionEntry
from engine.errors import SixfoldError, Unavailable


class Transport(abc.ABC):
    """Calls to storage nodes on behalf of one source."""

    source: str = "writer"

    @abc.abstractmethod
    def _call(self, node: str, method: str, *args):
        """Invoke `method(*args)` on node `node`; raise Unavailable if it cannot be reached."""

    def call(self, node: str, method: str, *args):
        """Invoke a node method by name (a fault injector re-delivers held calls so)."""
        return self._call(node, method, *args)

    def close(self) -> None:
        """Release connections (no-op by default)."""

    def read_many(self, node: str, items: Sequence[tuple[int, bytes, int, int, int]]) -> list[ReadReply | SixfoldError]:
        """Many reads `(pg, key, read_point, required_lsn, epoch)` on one node, a result each
        (its ReadReply, or the error of that read alone); Unavailable, raised, if the node
        cannot be reached. A transport with a batched call overrides this."""
        out: list = []
        for pg, key, read_point, required, epoch in items:
            try:
                out.append(self.read(node, pg, key, read_point, required, epoch))
            except Unavailable:
                raise
            except SixfoldError as e:
                out.append(e)
        return out

    def append(self, node: str, epoch: int, frame: bytes, hint_lsn: int, collect_lsn: int = 0,
               collect_requests_lsn: int = 0) -> AppendReply:
        """Append a frame (or a heartbeat); `collect_lsn` and `collect_requests_lsn` are the
        writer's version collection points (engine.node.collection), 0 for none."""
        return self._call(node, "append", epoch, frame, hint_lsn, collect_lsn, collect_requests_lsn)

    #: Whether `append_indexed` hands the index to the node as it is (nodes in this process): a
    #: writer then indexes a frame once for all of them. A transport that may change what it
    #: carries (the fault injector) or sends bytes keeps False: the node indexes what it got.
    hands_indexed_frames: bool = False

    def append_indexed(self, node: str, epoch: int, frame: bytes, items, hint_lsn: int, collect_lsn: int = 0,
                       collect_requests_lsn: int = 0) -> AppendReply:
        """`append`, with the frame's `codec.index_frame` (`items`) that the caller already
        built from these very bytes (and so verified). Only where `hands_indexed_frames`; any
        other transport sends the frame alone."""
        if not self.hands_indexed_frames:
            return self.append(node, epoch, frame, hint_lsn, collect_lsn, collect_requests_lsn)
        return self._call(node, "append", epoch, frame, hint_lsn, collect_lsn, collect_requests_lsn, items)

    def repair_append(self, node: str, frame: bytes) -> AppendReply:
        return self._call(node, "repair_append", frame)

    def read(
        self, node: str, pg: int, key: bytes, read_point: int, required_lsn: int, epoch: int, namespace: int = 0
    ) -> ReadReply:
        return self._call(node, "read", pg, key, read_point, required_lsn, epoch, namespace)

    def scan(
        self, node: str, pg: int, start: bytes, end: bytes | None, read_point: int, required_lsn: int, limit: int, epoch: int
    ) -> tuple[list[VersionEntry], bytes | None]:
        return self._call(node, "scan", pg, start, end, read_point, required_lsn, limit, epoch)

    def seal(self, node: str, epoch: int) -> SealReply:
        return self._call(node, "seal", epoch)

    def sync_epoch(
        self, node: str, epoch: int, truncations: Sequence[TruncationRange], membership: Membership | None
    ) -> NodeState:
        return self._call(node, "sync_epoch", epoch, tuple(truncations), membership)

    def fetch(self, node: str, pg: int, after_lsn: int, max_bytes: int, upto_lsn: int | None) -> FetchReply:
        return self._call(node, "fetch", pg, after_lsn, max_bytes, upto_lsn)

    def state(self, node: str) -> NodeState:
        return self._call(node, "state")

    def corrupt(self, node: str, pg: int, lsn: int | None, bit: int) -> int | None:
        """Fault injection: flip a bit of a stored record on `node`."""
        return self._call(node, "corrupt", pg, lsn, bit)
