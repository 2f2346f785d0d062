"""In-process transport: direct method calls on StorageNode objects of this process.

A `Registry` maps node ids to live nodes (None while a node is stopped); each source gets its
own `InProcessTransport` view of it. Calls to a stopped node raise Unavailable, as a dead process
would behind gRPC.
"""

from __future__ import annotations

import threading

from engine.errors import Closed, NodeNotFound, Unavailable
from engine.transport.base import Transport


class Registry:
    """The nodes of one embedded volume, by id. Thread-safe."""

    def __init__(self) -> None:
        self._nodes: dict[str, object] = {}
        self._lock = threading.Lock()

    def set(self, node_id: str, node) -> None:
        with self._lock:
            self._nodes[node_id] = node

    def get(self, node_id: str):
        # A single dict lookup is atomic under the GIL; the lock only orders writers (set).
        try:
            return self._nodes[node_id]
        except KeyError:
            raise NodeNotFound(f"no node {node_id!r} in this volume") from None


class InProcessTransport(Transport):
    #: A frame's index is handed to the node object as it is: a writer indexes a frame once for
    #: its six nodes (`Transport.append_indexed`); the node's own index would be the same.
    hands_indexed_frames = True

    def __init__(self, registry: Registry, source: str = "writer") -> None:
        self.registry = registry
        self.source = source

    def _call(self, node: str, method: str, *args):
        target = self.registry.get(node)
        if target is None:
            raise Unavailable(f"node {node} is down")
        try:
            return target.handle(method, *args)
        except Closed as e:
            raise Unavailable(f"node {node} is down ({e})") from None
