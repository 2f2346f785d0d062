"""Deterministic simulation: the embedded cluster driven in one thread by a seeded scheduler.

Theory of operation
-------------------
FoundationDB-style: the real node and head code runs with no background threads
(`EmbeddedOptions(background=False)`), over the in-process transport wrapped in the fault
transport, with a simulated clock. One loop, one `random.Random(seed)`, decides every step:

* a client starts an operation (writes go through `Writer.submit(block=False)` and complete when
  VDL covers them, or turn indeterminate at their simulated deadline; reads run at once);
* the writer ships its tail to one node (`Writer.send_once`), which is where message faults bite;
* a node gossips (`gossip_once`) or scrubs a little (`scrub_step`), and collects a bounded step of
  versions after either (`collect_once`: no draw of its own, so plans replay as before);
* held-back (reordered) messages are delivered late;
* simulated time advances, and the fault plan's events fall due.

A membership change (`replace`) is driven as steps too: when the event falls due and a writer
is open, the new node starts and joins as a second quorum set (`EmbeddedVolume.begin_replace`,
the one membership driver, `engine.head.membership`); it
rebuilds by gossip like any node; once the plan's `replace_done` has fallen due *and* the writer
says the new node caught up, the change is committed and the old node retired
(`MembershipChange.poll`). The rest of the plan does not wait for either step: a crashed writer
or a slow rebuild delays only the change, and safety never depends on when it completes.

Nothing reads the wall clock or iterates an unordered set where order matters, and LMDB is
deterministic, so the same seed gives the same schedule, the same history and the same bytes in
`history.jsonl`. After the plan, everything is healed, the loop runs until the segments converge,
every key is read once (`final`), and the checkers judge the history.
"""

from __future__ import annotations

import os
import random
import shutil
import struct
import threading
from collections import deque
from dataclasses import dataclass

from engine import codec
from engine.chaos.history import History
from engine.chaos.plan import FaultEvent, FaultPlan, pick_corruption
from engine.chaos.workload import DEFAULT_MIX, SCAN_END, workload_keys
from engine.core.constants import FLAG_DELETE, FLAG_PUT
from engine.embedded import EmbeddedOptions, EmbeddedVolume
from engine.errors import InvalidArgument, SixfoldError, Unavailable
from engine.head.weakening import SAFE, Weakening
from engine.transport.faults import FaultyTransport, NetworkFaults
from engine.transport.inprocess import InProcessTransport

STEP_S = 0.001  # simulated time one idle step takes
WRITE_TIMEOUT_S = 2.0
SETTLE_STEPS_MAX = 20_000
STEPS_MAX = 2_000_000


class SimClock:
    """Simulated monotonic time, advanced only by the scheduler (and by simulated delays)."""

    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        assert dt >= 0
        self.t += dt


@dataclass
class _Pending:
    op: int
    lsn: int
    deadline: float
    writer: object


class Simulation:
    """One deterministic run. `run()` returns (history, digests, stats)."""

    def __init__(
        self,
        path: str,
        plan: FaultPlan,
        *,
        seed: int,
        clients: int = 4,
        keys: int = 8,
        ops_max: int = 5000,
        protection_groups: int = 4,
        weakening: Weakening = SAFE,
        progress=None,
    ) -> None:
        self.path = path
        self.plan = plan
        self.seed = seed
        self.rng = random.Random(seed)
        self.clock = SimClock()
        self.faults = NetworkFaults(seed=seed + 1, sleep=self.clock.advance)
        if os.path.exists(path):
            shutil.rmtree(path)
        self.vol = EmbeddedVolume(
            path,
            EmbeddedOptions(
                protection_groups=protection_groups, background=False, seed=seed, durable=False,
                write_timeout_s=WRITE_TIMEOUT_S, gossip_interval_s=0,
            ),
            transport_wrapper=lambda t: FaultyTransport(t, self.faults),
            weakening=weakening,
            clock=self.clock.now,
        )
        self.history = History(clock_ns=lambda: int(round(self.clock.t * 1e9)))
        self.keys = workload_keys(keys)
        self.clients = clients
        self.ops_max = ops_max
        self.mix_names = sorted(DEFAULT_MIX)
        self.mix_weights = [DEFAULT_MIX[n] for n in self.mix_names]
        self.process = list(range(clients))  # current process id of each client
        self.written = [0] * clients
        self.pending: dict[int, _Pending] = {}  # client -> its outstanding write
        self.issued = 0
        self.events = list(plan.events)
        self.writer_down_until = -1.0
        self.stats = {"steps": 0, "faults_applied": 0, "writer_crashes": 0, "nemesis_errors": []}
        self.changes = MembershipChanges(self.vol)
        self.progress = progress

    # --- the loop ---------------------------------------------------------------------------
    def run(self):
        try:
            while self.clock.t < self.plan.duration_s and self.stats["steps"] < STEPS_MAX:
                self.step(workload=True)
            self.heal_all()
            self.settle()
            self.final_reads()
            digests = self.digests()
            # Version collection ran under the faults too (`collect_once`): how much it removed.
            self.stats["collected_records"] = sum(
                n.store.counters.get("collected", 0) for n in self.vol.nodes.values() if n is not None
            )
        finally:
            self.vol.close()
        stats = dict(self.stats, faults=dict(self.faults.counts), replaced=self.changes.replaced)
        stats["nemesis_errors"] = stats["nemesis_errors"] + self.changes.errors
        return self.history, digests, stats

    def step(self, workload: bool) -> None:
        self.stats["steps"] += 1
        self._apply_due_events()
        if self.changes.pending:
            self.changes.step()
        self._complete_writes()
        r = self.rng.random()
        w = self.vol.writer
        if workload and r < 0.30 and self.issued < self.ops_max:
            idle = [c for c in range(self.clients) if c not in self.pending]
            if idle:
                self._start_op(self.rng.choice(idle))
                return
        if w is not None and r < 0.75:
            links = [w.links[n] for n in w.ledger.membership.all_nodes]
            self._guard(lambda: w.send_once(self.rng.choice(links), block=False))
            return
        if r < 0.85:
            node = self.vol.nodes.get(self.rng.choice(sorted(self.vol.nodes)))
            if node is not None:
                self._guard(node.gossip_once)
                self._guard(node.collect_once)
            return
        if r < 0.88:
            node = self.vol.nodes.get(self.rng.choice(sorted(self.vol.nodes)))
            if node is not None:
                self._guard(lambda: node.scrub_step(200))
                self._guard(node.collect_once)
            return
        if r < 0.90:
            self.faults.release_held(1)
            return
        self.clock.advance(STEP_S * (1 + self.rng.random() * 4))
        if w is None and self.clock.t >= self.writer_down_until:
            self._reopen_writer()

    def _guard(self, fn) -> None:
        try:
            fn()
        except SixfoldError:
            pass

    # --- clients ----------------------------------------------------------------------------
    def _value(self, client: int, i: int = 0) -> bytes:
        p, n = self.process[client], self.written[client]
        return b"p%d-%d" % (p, n) if i == 0 else b"p%d-%d.%d" % (p, n, i)

    def _start_op(self, c: int) -> None:
        self.issued += 1
        rng, h, process = self.rng, self.history, self.process[c]
        f = rng.choices(self.mix_names, self.mix_weights)[0]
        w = self.vol.writer
        if f in ("put", "delete", "batch"):
            self.written[c] += 1
            if f == "put":
                key, value = rng.choice(self.keys), self._value(c)
                op = h.invoke(process, "put", key=key, value=value)
                ops = [(FLAG_PUT, key, value)]
            elif f == "delete":
                key = rng.choice(self.keys)
                op = h.invoke(process, "delete", key=key)
                ops = [(FLAG_DELETE, key, b"")]
            else:
                n = rng.randint(2, 3)
                bops, ops = [], []
                for i, key in enumerate(sorted(rng.sample(self.keys, n))):
                    if rng.random() < 0.8:
                        v = self._value(c, i)
                        bops.append(("put", key, v))
                        ops.append((FLAG_PUT, key, v))
                    else:
                        bops.append(("delete", key, None))
                        ops.append((FLAG_DELETE, key, b""))
                op = h.invoke(process, "batch", ops=bops)
            if w is None:
                h.complete(op, "fail", error="Unavailable: the writer is recovering")
                return
            try:
                lsn, _waiter = w.submit(ops, block=False)
            except Unavailable as e:
                h.complete(op, "fail", error=f"{type(e).__name__}: {e}"[:200])
                return
            except SixfoldError as e:
                h.complete(op, "indeterminate", error=f"{type(e).__name__}: {e}"[:200])
                self._new_process(c)
                return
            self.pending[c] = _Pending(op, lsn, self.clock.t + WRITE_TIMEOUT_S, w)
            return
        if f == "get":
            key = rng.choice(self.keys)
            op = h.invoke(process, "get", key=key)
            self._read(op, lambda: w.get(key))
        else:
            i = rng.randrange(len(self.keys))
            j = rng.randint(i + 1, len(self.keys))
            start, end = self.keys[i], self.keys[j] if j < len(self.keys) else SCAN_END
            op = h.invoke(process, "scan", start=start, end=end)
            self._read(op, lambda: list(w.scan(start, end)))

    def _read(self, op: int, call) -> None:
        if self.vol.writer is None:
            self.history.complete(op, "fail", error="Unavailable: the writer is recovering")
            return
        try:
            result = call()
        except SixfoldError as e:
            self.history.complete(op, "fail", error=f"{type(e).__name__}: {e}"[:200])
            return
        self.history.complete(op, "ok", result=result)

    def _new_process(self, c: int) -> None:
        self.process[c] += self.clients

    def _complete_writes(self) -> None:
        for c in sorted(self.pending):
            p = self.pending[c]
            w = p.writer
            if w is self.vol.writer and w.ledger.vdl >= p.lsn:
                self.history.complete(p.op, "ok")
            elif w is not self.vol.writer or self.clock.t >= p.deadline or w.fenced:
                self.history.complete(p.op, "indeterminate", error="not durable by the deadline, or the writer crashed")
                self._new_process(c)
            else:
                continue
            del self.pending[c]

    # --- faults -----------------------------------------------------------------------------
    def _apply_due_events(self) -> None:
        while self.events and self.events[0].at_s <= self.clock.t:
            ev = self.events.pop(0)
            self.stats["faults_applied"] += 1
            try:
                apply_event(ev, self.vol, self.faults, on_writer_crash=self._crash_writer,
                            on_replace=self.changes.due, on_replace_done=self.changes.finish_due)
            except SixfoldError as e:
                # E.g. a node the plan expects to exist is not there yet, because a membership
                # change waits for a writer. Recorded, as the threaded nemesis does.
                self._nemesis_error(f"{ev.kind} {','.join(ev.targets)} at {ev.at_s}s: {type(e).__name__}: {e}")

    def _crash_writer(self, ev: FaultEvent) -> None:
        self.stats["writer_crashes"] += 1
        w = self.vol.writer
        if w is not None:
            w.abandon()
        self.vol.writer = None
        self.writer_down_until = self.clock.t + float(ev.param("down_s", 0.05))

    def _nemesis_error(self, why: str) -> None:
        if len(self.stats["nemesis_errors"]) < 20:
            self.stats["nemesis_errors"].append(why)

    def _reopen_writer(self) -> None:
        try:
            self.vol.open_writer()
        except SixfoldError:
            self.vol.writer = None
            self.writer_down_until = self.clock.t + 0.05

    # --- the end ----------------------------------------------------------------------------
    def heal_all(self) -> None:
        heal_everything(self.vol, self.faults)
        while self.vol.writer is None:
            self.clock.advance(0.05)
            self._reopen_writer()

    def settle(self) -> None:
        """Run (without new client operations) until writes are resolved, a membership change
        under way is committed, and segments converge."""
        for i in range(SETTLE_STEPS_MAX):
            self.step(workload=False)
            if i % 200 == 0 and not self.pending and not self.changes.pending and converged(self.vol):
                return

    def final_reads(self) -> None:
        for key in self.keys:
            op = self.history.invoke("final", "get", key=key, final=True)
            self._read(op, lambda key=key: self.vol.writer.get(key))

    def digests(self) -> dict:
        return segment_digests(InProcessTransport(self.vol.registry, "checker"), self.vol.writer)


class MembershipChanges:
    """A plan's membership changes (`replace` / `replace_done`), driven one step at a time.

    The simulation calls `step()` from its loop; the threaded embedded target from a thread of
    its own. Changes run one after the other, in plan order. Each step looks at the *current*
    writer's membership, so a writer that crashed between the steps is carried on by the next
    one: a step it lost (known to too few nodes) is taken again, and the old node is retired only
    once a write quorum knows the change (`MembershipChange.poll`)."""

    ERRORS_MAX = 20

    def __init__(self, vol: EmbeddedVolume) -> None:
        self.vol = vol
        self._queue: deque[dict] = deque()
        self._lock = threading.Lock()  # guards the queue
        self._step_lock = threading.Lock()  # one step at a time (the nemesis and a driver thread)
        self.replaced = 0
        self.errors: list[str] = []

    @property
    def pending(self) -> bool:
        return bool(self._queue)

    def due(self, ev: FaultEvent) -> None:
        """`replace` fell due: queue the change (it starts when a writer is open)."""
        with self._lock:
            self._queue.append({"old": ev.targets[0], "new": ev.param("new"), "change": None, "finish": False})
        self.step()

    def finish_due(self, ev: FaultEvent) -> None:
        """`replace_done` fell due: commit the change once the new node has caught up."""
        with self._lock:
            change = next((c for c in self._queue if (c["old"], c["new"]) == (ev.targets[0], ev.param("new"))), None)
            if change is not None:
                change["finish"] = True
        if change is None:
            self._error(f"replace_done {ev.targets} at {ev.at_s}s matches no change under way")
        self.step()

    def finish_all(self) -> None:
        """The run is over (a threaded nemesis may stop before the plan's last events): let
        every queued change commit once its new node has caught up."""
        with self._lock:
            for c in self._queue:
                c["finish"] = True

    def _error(self, why: str) -> None:
        if len(self.errors) < self.ERRORS_MAX:
            self.errors.append(why)

    def step(self) -> bool:
        """Take the next step of the oldest change if it can be taken now; True once none is left."""
        with self._step_lock:
            return self._step()

    def _step(self) -> bool:
        with self._lock:
            if not self._queue:
                return True
            c = self._queue[0]
        if self.vol.writer is None:
            return False  # the writer is recovering: the change waits for the next one
        old, new = c["old"], c["new"]
        try:
            if c["change"] is None:
                # Plan-driven: the plan says when the change commits, so no automatic revert.
                c["change"] = self.vol.begin_replace(old, new, revert=False)
            elif c["change"].poll(finish=c["finish"]) == "replaced":
                self.replaced += 1
                self._pop(c)
        except InvalidArgument as e:
            self._error(f"replace {old} -> {new}: {e}")
            self._pop(c)
        except SixfoldError:
            pass  # told too few nodes, not yet known to a write quorum, a writer crashing: retry
        return not self._queue

    def _pop(self, c: dict) -> None:
        with self._lock:
            if self._queue and self._queue[0] is c:
                self._queue.popleft()


def apply_event(ev: FaultEvent, vol: EmbeddedVolume, faults: NetworkFaults, *, on_writer_crash,
                on_replace=None, on_replace_done=None) -> None:
    """Apply one plan event to an embedded volume (threads or simulation alike).

    A writer crash and the two steps of a membership change are the caller's to drive (how
    depends on whether threads run), through the `on_*` callbacks."""
    k, targets = ev.kind, ev.targets
    if k == "kill":
        for n in targets:
            vol.stop_node(n)
    elif k == "restart":
        for n in targets:
            vol.start_node(n)
    elif k == "pause":
        for n in targets:
            faults.pause(n)
    elif k == "resume":
        for n in targets:
            faults.resume(n)
    elif k == "partition":
        faults.partition([tuple(g) for g in ev.param("groups", ())])
    elif k == "one_way":
        faults.one_way([tuple(d) for d in ev.param("drops", ())])
    elif k == "heal":
        faults.heal()
    elif k == "az_down":
        # The AZ's nodes as planned: a membership change may since have added one to it.
        for n in targets or [i.id for i in vol.node_infos if i.az == ev.param("az")]:
            vol.stop_node(n)
    elif k == "az_up":
        for n in targets or [i.id for i in vol.node_infos if i.az == ev.param("az")]:
            vol.start_node(n)
    elif k == "corrupt":
        for n in targets:
            corrupt_node(vol, n, ev)
    elif k == "scrub":
        for n in targets:
            node = vol.nodes.get(n)
            if node is not None:
                try:
                    node.scrub_step(1 << 30)
                    node.gossip_once()
                except SixfoldError:
                    pass
    elif k == "writer_crash":
        on_writer_crash(ev)
    elif k == "slow":
        for n in targets:
            faults.slow_ms[n] = float(ev.param("delay_ms", 20))
    elif k == "unslow":
        for n in targets:
            faults.slow_ms.pop(n, None)
    elif k in ("drop", "duplicate", "reorder", "delay"):
        for n in targets:
            faults.set_link_fault(n, k, float(ev.param("probability", 0.1)), float(ev.param("delay_ms", 10)))
    elif k == "clear":
        faults.clear(list(targets) or None)
    elif k == "replace":
        if on_replace is None:
            raise AssertionError("this target cannot replace nodes")
        on_replace(ev)
    elif k == "replace_done":
        if on_replace_done is None:
            raise AssertionError("this target cannot replace nodes")
        on_replace_done(ev)
    else:
        raise AssertionError(f"unknown fault kind {k}")


def corrupt_node(vol: EmbeddedVolume, node_id: str, ev: FaultEvent) -> int | None:
    """Flip the bits the event chooses in one stored record of the node."""
    node = vol.nodes.get(node_id)
    if node is None:
        return None
    store = node.store
    candidates = [(pg, store.max_lsn[pg]) for pg in range(store.geometry.protection_groups) if store.max_lsn[pg] > 0]
    if not candidates:
        return None
    index, bits = pick_corruption(ev, len(candidates), 64)
    pg, lsn = candidates[index]
    hit = None
    for bit in bits:
        hit = store.corrupt(pg, lsn, bit)
    return hit


def heal_everything(vol: EmbeddedVolume, faults: NetworkFaults) -> None:
    """End every fault, including latent ones: a corrupt record that no scrub has found yet would
    otherwise make the replicas look different at the final comparison."""
    faults.clear()
    for n in sorted(faults.paused):
        faults.resume(n)
    faults.release_held()
    for info in list(vol.node_infos):
        if vol.nodes.get(info.id) is None:
            vol.start_node(info.id)
    for info in list(vol.node_infos):
        node = vol.nodes.get(info.id)
        if node is not None:
            try:
                node.scrub_step(1 << 30)
            except SixfoldError:
                pass


def converged(vol: EmbeddedVolume) -> bool:
    w = vol.writer
    if w is None:
        return False
    try:
        states = [vol.nodes[i.id].state() for i in vol.node_infos if vol.nodes.get(i.id) is not None]
    except SixfoldError:
        return False
    if len(states) != len(vol.node_infos):
        return False
    scls = {st.scls for st in states}
    return len(scls) == 1 and all(s >= t for s, t in zip(next(iter(scls)), w.ledger.read_tails))


def segment_digests(transport, writer) -> dict:
    """{pg: {node: digest}} of each segment's live state at VDL (see `_digest`)."""
    return digests_at(transport, writer.ledger.vdl, writer.P, writer.ledger.membership.all_nodes)


def digests_at(transport, vdl: int, protection_groups: int, nodes) -> dict:
    """{pg: {node: digest}} of every segment's live state at `vdl`, read through `transport`."""
    out: dict = {}
    for pg in range(protection_groups):
        per = {}
        for n in nodes:
            try:
                per[n] = _digest(transport, n, pg, vdl)
            except SixfoldError:
                per[n] = None
        out[pg] = per
    return out


def _digest(transport, node: str, pg: int, upto: int) -> str:
    """The segment's live state at `upto`: each key's newest version at or below it that holds a
    value, by key, LSN and value (a segment scan). Not its raw records: version collection
    removes what no read point sees, at each node's own pace, and tombstones once every member
    swept past them, so segments that hold the same state need not hold the same records."""
    epoch = transport.state(node).epoch
    crc, count, start = 0, 0, b""
    for _ in range(1_000_000):
        entries, resume = transport.scan(node, pg, start, None, upto, 0, 10_000, epoch)
        for e in entries:
            if e.value is not None:
                crc = codec.crc32c(struct.pack("<QHI", e.lsn, len(e.key), len(e.value)) + e.key + e.value, crc)
                count += 1
        if resume is None:
            break
        start = resume
    return f"{count}:{crc:08x}"
