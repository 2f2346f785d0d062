"""Fault-injecting transport: a wrapper around any transport that drops, duplicates, delays,
reorders and partitions calls, as described by a shared `NetworkFaults` value.

Theory of operation
-------------------
Faults are data: `NetworkFaults` says who cannot reach whom (pairs of endpoint names, where the
head is "writer" and nodes are their ids), which links are slow, and the probabilities of message
faults. Every transport of a deployment (the writer's and each node's gossip transport) is
wrapped with the same `NetworkFaults`, so one change to it applies everywhere at once.

* partition: a call from `source` to a node it cannot reach raises Unavailable without running.
* one-way drop (`one_way`): a pair (sender, receiver) loses what the sender sends. Calls are
  requests and replies, so ("writer", "n3") loses the writer's calls to n3 before they run, and
  ("n3", "writer") loses n3's replies to the writer's calls after they ran (the caller is told
  Unavailable and cannot tell that the call happened, as on a real link that drops one way).
* drop: the call is lost before it runs (Unavailable), or runs and its reply is lost (Unavailable
  too: the caller cannot tell which, as on a real network).
* duplicate: the call runs twice (the nodes must be idempotent).
* delay / slow: the call waits before running (real deployments sleep; a simulator passes a
  clock whose `sleep` advances simulated time).
* reorder: the call is held back and delivered later, after calls that were made after it; the
  caller is told Unavailable now. This is how a stale append from a dead epoch reaches a node late.

All randomness comes from the `random.Random` inside `NetworkFaults`, seeded by the run.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.errors import SixfoldError, Unavailable
from engine.transport.base import Transport

#: Requests that change a node's state and may be reordered; reads are answered or dropped.
_REORDERABLE = {"append", "repair_append"}
HELD_MAX = 64


@dataclass
class NetworkFaults:
    """The network's current faults; mutate through its methods (thread-safe)."""

    seed: int = 0
    blocked: set[tuple[str, str]] = field(default_factory=set)
    slow_ms: dict[str, float] = field(default_factory=dict)  # node -> added delay per call
    drop: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    delay_ms: float = 0.0
    delay_p: float = 0.0
    sleep: Callable[[float], None] = time.sleep
    #: per node: message faults on all of its links, {"drop": p, "duplicate": p, "reorder": p, "delay": p, "delay_ms": ms}
    link_faults: dict[str, dict[str, float]] = field(default_factory=dict)
    #: paused nodes (SIGSTOP): calls to them are held and delivered on resume; they send nothing
    paused: set[str] = field(default_factory=set)
    #: one-way drops as (callee, caller) pairs: the callee's replies to the caller are lost
    replies_lost: set[tuple[str, str]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.lock = threading.Lock()
        self.held: list[tuple[Transport, str, str, tuple]] = []
        self.held_paused: dict[str, list[tuple[Transport, str, tuple]]] = {}
        self.counts = {"dropped": 0, "duplicated": 0, "reordered": 0, "delayed": 0, "partitioned": 0}

    def partition(self, groups) -> None:
        """Nodes in different groups cannot reach each other (both directions)."""
        with self.lock:
            self.replies_lost = set()
            self.blocked = {
                (a, b) for i, ga in enumerate(groups) for j, gb in enumerate(groups) if i != j for a in ga for b in gb
            }

    def one_way(self, drops) -> None:
        """Lose what each (sender, receiver) pair's sender sends, in that direction only; this
        replaces the partition or one-way drops in force (see the module docstring)."""
        with self.lock:
            self.blocked = {(a, b) for a, b in drops}
            self.replies_lost = {(a, b) for a, b in drops}

    def heal(self) -> None:
        with self.lock:
            self.blocked = set()
            self.replies_lost = set()

    def clear(self, nodes=None) -> None:
        """Clear message faults (of `nodes`, or all of them, slow links and partitions too)."""
        with self.lock:
            if nodes:
                for n in nodes:
                    self.link_faults.pop(n, None)
                return
            self.blocked, self.slow_ms, self.link_faults, self.replies_lost = set(), {}, {}, set()
            self.drop = self.duplicate = self.reorder = self.delay_ms = self.delay_p = 0.0

    def set_link_fault(self, node: str, kind: str, value: float, delay_ms: float = 0.0) -> None:
        with self.lock:
            f = self.link_faults.setdefault(node, {})
            f[kind] = value
            if kind == "delay":
                f["delay_ms"] = delay_ms

    def pause(self, node: str) -> None:
        with self.lock:
            self.paused.add(node)

    def resume(self, node: str) -> int:
        """Un-pause a node and deliver what was sent to it meanwhile, in order."""
        with self.lock:
            self.paused.discard(node)
            held = self.held_paused.pop(node, [])
        for inner, method, args in held:
            try:
                inner.call(node, method, *args)
            except SixfoldError:
                pass
        return len(held)

    def _p(self, kind: str, source: str, node: str) -> float:
        """Probability of a message fault on the link source->node (caller holds the lock)."""
        base = {"drop": self.drop, "duplicate": self.duplicate, "reorder": self.reorder, "delay": self.delay_p}[kind]
        return max(base, self.link_faults.get(node, {}).get(kind, 0.0), self.link_faults.get(source, {}).get(kind, 0.0))

    def _delay_ms(self, source: str, node: str) -> float:
        return max(self.delay_ms, self.link_faults.get(node, {}).get("delay_ms", 0.0), self.link_faults.get(source, {}).get("delay_ms", 0.0))

    def _roll(self, p: float) -> bool:
        return p > 0 and self.rng.random() < p

    def release_held(self, count: int | None = None) -> int:
        """Deliver held-back (reordered) calls now; returns how many ran."""
        with self.lock:
            batch = self.held if count is None else self.held[:count]
            self.held = [] if count is None else self.held[count:]
        for inner, _source, node, (method, args) in batch:
            try:
                inner.call(node, method, *args)
            except SixfoldError:
                pass
        return len(batch)


class FaultyTransport(Transport):
    """Wraps `inner`, applying `faults` to every call made by `inner.source`."""

    def __init__(self, inner: Transport, faults: NetworkFaults) -> None:
        self.inner = inner
        self.faults = faults
        self.source = inner.source

    def _call(self, node: str, method: str, *args):
        f = self.faults
        src = self.source
        with f.lock:
            if src in f.paused:
                raise Unavailable(f"{src} is paused")
            if (src, node) in f.blocked:
                f.counts["partitioned"] += 1
                raise Unavailable(f"{src} cannot reach {node} (partition)")
            if node in f.paused:
                if method in _REORDERABLE and len(f.held_paused.get(node, ())) < HELD_MAX:
                    f.held_paused.setdefault(node, []).append((self.inner, method, args))
                raise Unavailable(f"{node} is paused (no answer)")
            delay_ms = f.slow_ms.get(node, 0.0) + f.slow_ms.get(src, 0.0)
            if f._roll(f._p("delay", src, node)):
                delay_ms += f._delay_ms(src, node)
                f.counts["delayed"] += 1
            p_drop = f._p("drop", src, node)
            drop_before = f._roll(p_drop / 2)
            drop_after = f._roll(p_drop / 2)
            dup = f._roll(f._p("duplicate", src, node))
            hold = method in _REORDERABLE and len(f.held) < HELD_MAX and f._roll(f._p("reorder", src, node))
            reply_lost = (node, src) in f.replies_lost
            release = bool(f.held) and f._roll(0.5)
        if release:
            f.release_held(1)
        if delay_ms:
            f.sleep(delay_ms / 1000.0)
        if drop_before:
            with f.lock:
                f.counts["dropped"] += 1
            raise Unavailable(f"message {self.source}->{node} {method} lost")
        if hold:
            with f.lock:
                f.held.append((self.inner, self.source, node, (method, args)))
                f.counts["reordered"] += 1
            raise Unavailable(f"message {self.source}->{node} {method} delayed (will arrive late)")
        result = self.inner.call(node, method, *args)
        if dup:
            with f.lock:
                f.counts["duplicated"] += 1
            try:
                self.inner.call(node, method, *args)
            except SixfoldError:
                pass
        if drop_after:
            with f.lock:
                f.counts["dropped"] += 1
            raise Unavailable(f"reply {node}->{self.source} to {method} lost")
        if reply_lost:
            with f.lock:
                f.counts["partitioned"] += 1
            raise Unavailable(f"reply {node}->{self.source} to {method} lost (one-way drop)")
        return result

    def close(self) -> None:
        self.inner.close()
