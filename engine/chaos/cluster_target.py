"""The `cluster` chaos target: real processes, real signals, faults inside the nodes' gRPC layer.

Theory of operation
-------------------
The run starts its own cluster in the run folder (`RUN/cluster`) with the launcher, drives the
workload through `engine.connect`, and applies the plan:

| plan event            | what happens                                                      |
|-----------------------|-------------------------------------------------------------------|
| kill / restart        | SIGKILL the node process / start it again (same data folder)      |
| pause / resume        | SIGSTOP / SIGCONT                                                 |
| az_down / az_up       | SIGKILL / start the AZ's nodes (as the plan names them)           |
| writer_crash          | SIGKILL the writer endpoint; `down_s` later start it (recovery)   |
| replace / replace_done| the launcher's `replace_node` (the endpoint's ReplaceNode RPC)    |
| corrupt / scrub       | flip bits of a stored record (admin RPC) / make the node scrub    |
| partition / heal      | every node refuses requests from endpoints outside its group (with `network="real"`: nft drop rules between the processes' namespaces, removed by heal) |
| one_way / heal        | `network="real"`: an `engine.cluster.netfaults.OneWay` per pair, nft drops of one direction only (the writer's packets to a node, or a node's to the writer), removed by heal. The gate can only refuse requests, so there each node of a pair refuses the writer's requests, whichever the direction: the node is as lost as a real drop makes it (the budget counts it so), but its records are not stored unheard (counted: `one_way_in_gate`) |
| slow, drop, duplicate, delay, reorder / clear | per-node fault rules in its gRPC server (reorder is approximated by delay jitter) |
| writer_kill / reader_add | SIGKILL whoever is the writer now (the manifest's writer: the first writer endpoint or a promoted reader), never restarted: a reader must take over by itself; `reader_add` waits (bounded) for that, then adds readers back up to the plan's count |
| writer_pause / writer_resume | SIGSTOP the writer (past its 1 s lease: a reader takes over) / SIGCONT that same process, which must step down by itself (exit) if another took over |
| writer_partition / heal | every node refuses the writer *process* (`blocked_sources` `pid:<n>`: the certificate is shared by every reader that may take over; `network="real"`: the writer process's namespace cut off from every other) / lifted; the old writer must then step down |
| reader_kill / reader_restart | SIGKILL a live reader (the plan's slot picks one) / start that one again |

Fault rules are composed here (partition groups plus each node's message faults) and pushed
whole to each node with the `SetFaults` admin RPC, which the nodes never apply to admin callers.

Real network (`RunConfig.network == "real"`, `sixfold chaos --network real`): the cluster is made
with `cluster up --netns` and partitions are real: a plan's groups become an
`engine.cluster.netfaults.Cut` over the processes' namespaces (the plan records the same data
as before), and a plan's one-way drops become `OneWay`s, one direction of one link each. "writer" names the namespace of the writer process of the moment (a promoted
reader's own); a process a plan's groups do not name (a reader) stays on the writer's side;
`writer_partition` cuts the writer's namespace off from every other process. A process that has
no namespace yet when a cut is made (a replacement node still starting) is left uncut. The
machine's own namespace, where the clients run, is never cut. Message faults stay in the gate.

A writer restart and a membership change take a while, so each runs on a thread of its own and the
plan's next events still fall due meanwhile (a partition that heals while the writer is down, say).
`replace` starts `Cluster.replace_node`, which adds the node, has the writer endpoint run both epoch
steps and retires the old node; the endpoint commits the change as soon as the new node has
caught up, and `replace_done` waits (bounded) for it: real processes are slower than the plan's
clock, and later events may name the new node. A new node gets the current fault rules once it
serves. The run waits (bounded) for every change before its final checks.

Writer faults and readers. A plan with `readers` starts that many reader instances (which may
promote themselves: engine.head.failover). Before it applies a writer fault the nemesis waits
(bounded) until the writer runs and a reader is alive to take over; if none is, the fault is
skipped and counted, never applied (the plan's promise: a writer fault always has a candidate).
Each writer fault is recorded (`failovers` in the stats: the old writer's pid, whether and how
fast a reader took over, whether the old writer stepped down), and the runner turns these into
the `failover` verdict (`engine.chaos.checker.check_failovers`): a writer that another
replaced and that still runs `STEP_DOWN_TIMEOUT_S` after it was resumed or reconnected is
invalid, and so is a killed writer that no reader replaced within `TAKEOVER_TIMEOUT_S`. After
a takeover the nemesis adds readers back up to the plan's count (a promoted reader is the writer
now), so later writer faults have candidates. At the end a writer that is down is started only
if no reader took over within the bound (counted: `writer_started_at_end`).

Replica reads: a client reads through one reader instance (`PinnedReaders`): a session is
(client, reader), the scope in which a replica promises that reads never go backwards; a client
whose reader is retired (promoted, removed) moves to another and starts a new session; one whose
reader is down keeps it (its reads fail until the reader is back, then go on at a read point at
least as new). `EndpointReaders` (`replica_reads="endpoint"`) reads through
`engine.connect(folder, role="reader")` instead, one session per client over every reader:
gRPC's round_robin sends consecutive reads to different readers, which a session may then see
go backwards (the README promises monotonic reads from one reader only; see
tests/test_readers.py).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

from engine.chaos.plan import WRITER, WRITER_FAULT_KINDS, FaultEvent, pick_corruption
from engine.errors import InvalidArgument, SixfoldError

log = logging.getLogger("sixfold.chaos")

CONVERGE_TIMEOUT_S = 90.0
#: How long a membership change may take, writer restarts included.
REPLACE_TIMEOUT_S = 120.0
#: Bounds of the writer faults (real processes on a loaded machine; the lease is 1 s): a reader
#: takes over, an old writer steps down, a writer fault waits for a live candidate.
TAKEOVER_TIMEOUT_S = 60.0
STEP_DOWN_TIMEOUT_S = 30.0
CANDIDATE_WAIT_S = 30.0
#: A resumed or reconnected writer that is still the recorded writer this long kept the role
#: (no reader took over: the fault was shorter than the lease and the readers' waits).
KEPT_S = 5.0
POLL_S = 0.1
#: How often the replica-read sessions look at the manifest for readers come and gone.
READERS_REFRESH_S = 0.5


class ClusterNemesis:
    """Applies plan events to a launcher-managed cluster."""

    def __init__(self, cluster, seed: int, protection_groups: int, readers: int = 0, net=None) -> None:
        from engine.transport.convert import PROCESS_SOURCE_PREFIX, FaultRules

        self.cluster = cluster
        #: `engine.cluster.netfaults.NetFaults` of a real-network run, else None (the gate)
        self.net = net
        self.FaultRules = FaultRules
        self.pid_source = PROCESS_SOURCE_PREFIX
        self.seed = seed
        self.P = protection_groups
        self.groups: tuple[tuple[str, ...], ...] = ()
        self.blocked: tuple[str, ...] = ()  # a writer partition: the writer process's pid source
        #: one-way drops in the gate: node -> the sources it refuses (the writer's)
        self.deaf: dict[str, tuple[str, ...]] = {}
        self.one_way_in_gate = 0
        self.message: dict[str, dict] = {}
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []
        self.changes: dict[tuple[str, str], threading.Thread] = {}  # (old, new) -> its thread
        self.errors: list[str] = []
        self.replaced = 0
        self._writer_crashes = 0
        #: the reader instances the plan keeps (a takeover uses one up; the nemesis adds it back)
        self.readers = readers
        #: one record per writer fault (see the module docstring); the one in force, if any
        self.failovers: list[dict] = []
        self._fault: dict | None = None
        self._followups: list[threading.Thread] = []
        self._watches: dict[int, threading.Thread] = {}  # id(record) -> its takeover watch
        self._slots: dict[int, str] = {}  # reader slot -> the reader killed for it
        self._stopped: set[int] = set()  # writer pids paused by a writer_pause, not yet resumed
        self.readers_added = 0
        self.writer_started_at_end = 0
        #: set when the run heals everything: events still due are not applied any more
        self.closing = threading.Event()

    def _push(self, nodes) -> None:
        for n in nodes:
            m = self.message.get(n, {})
            rules = self.FaultRules(
                groups=self.groups,
                blocked_sources=self.blocked + self.deaf.get(n, ()),
                drop_probability=m.get("drop", 0.0),
                duplicate_probability=m.get("duplicate", 0.0),
                delay_ms=int(m.get("delay_ms", 0)),
                delay_jitter_ms=int(m.get("jitter_ms", 0)),
                seed=self.seed,
            )
            try:
                self.cluster.set_faults(n, rules if rules.active else None)
            except SixfoldError:
                pass  # a node that is down gets its rules when it is healed at the end

    def apply(self, ev: FaultEvent) -> None:
        c, k, targets = self.cluster, ev.kind, ev.targets
        if self.closing.is_set():
            return  # the run is healing everything; a late event would undo that
        if k == "replace_done":
            # Real processes are slower than the plan's clock: wait (bounded) for the change, so
            # that later events naming the new node find it a member and the old one gone.
            t = self.changes.get((targets[0], ev.param("new")))
            if t is not None:
                t.join(REPLACE_TIMEOUT_S)
            return
        if k in WRITER_FAULT_KINDS or k in ("reader_add", "writer_resume", "reader_kill", "reader_restart"):
            return self._apply_reader_event(ev)
        with self.lock:
            if k == "kill":
                for n in targets:
                    c.kill(n)
            elif k in ("restart",):
                self._start_nodes(list(targets))
            elif k == "pause":
                for n in targets:
                    c.stop(n)
            elif k == "resume":
                for n in targets:
                    c.cont(n)
            elif k == "az_down":
                for n in targets or c.azs()[ev.param("az")]:
                    c.kill(n)
            elif k == "az_up":
                self._start_nodes(list(targets or c.azs()[ev.param("az")]))
            elif k == "writer_crash":
                if c.state("writer") != "down":  # down already: an earlier crash's restart is late
                    c.kill("writer")
                self._writer_crashes += 1
                self._background(f"writer-restart-{self._writer_crashes}", self._restart_writer,
                                 float(ev.param("down_s", 0.1)), self._writer_crashes)
            elif k == "replace":
                name = f"replace-{targets[0]}"
                self.changes[(targets[0], ev.param("new"))] = self._background(name, self._replace, targets[0], ev.param("new"))
            elif k == "corrupt":
                for n in targets:
                    index, bits = pick_corruption(ev, self.P, 64)
                    for bit in bits:
                        c.corrupt(n, index, None, bit)
            elif k == "scrub":
                for n in targets:
                    c.scrub(n)
            elif k == "partition" and self.net is not None:
                self.net.apply([self._real_cut(ev.param("groups", ()))])
            elif k == "partition":
                self.groups, self.deaf = self._partition_groups(ev.param("groups", ())), {}
                self._push(list(c.node_ids))
            elif k == "one_way" and self.net is not None:
                self.net.apply(self._real_one_way(ev.param("drops", ())))
            elif k == "one_way":
                # A network fault replaces the one in force (the plan's rule); see the table above.
                writer = self._partition_groups(((WRITER,),))[0][0]
                self.groups = ()
                self.deaf = {n: (writer,) for pair in ev.param("drops", ()) for n in pair if n != WRITER}
                self.one_way_in_gate += 1
                self._push(list(c.node_ids))
            elif k == "heal":
                self.groups, self.deaf = (), {}
                healed = self._fault if self._fault is not None and self._fault["kind"] == "writer_partition" else None
                self.blocked = ()
                if self.net is not None:
                    self.net.heal()
                self._push(list(c.node_ids))
                if healed is not None:
                    self._fault = None
                    if not healed.get("skipped"):
                        healed["healed_at"] = time.monotonic()
                        self._followup("step-down", self._step_down_then_restore, healed)
                elif self.readers:
                    self._followup("reader-add", self._restore_readers)  # a takeover the partition caused
            elif k in ("slow", "unslow"):
                for n in targets:
                    m = self.message.setdefault(n, {})
                    m["delay_ms"] = float(ev.param("delay_ms", 20)) if k == "slow" else 0
                self._push(targets)
            elif k in ("drop", "duplicate", "delay", "reorder"):
                for n in targets:
                    m = self.message.setdefault(n, {})
                    p = float(ev.param("probability", 0.1))
                    if k in ("drop", "duplicate"):
                        m[k] = p
                    else:
                        m["jitter_ms"] = float(ev.param("delay_ms", 10))
                self._push(targets)
            elif k == "clear":
                for n in targets or tuple(self.message):
                    self.message.pop(n, None)
                self._push(targets or list(c.node_ids))
            else:
                raise AssertionError(f"unknown fault kind {k}")

    def _start_nodes(self, nodes: list[str]) -> None:
        """Start nodes together and wait until all serve (not one after the other: the plan's
        next events are due meanwhile), then give them the rules in force."""
        c = self.cluster
        for n in nodes:
            c.start(n, wait=False)
        c.wait_serving(nodes)
        self._push(nodes)

    # --- writer faults and readers ------------------------------------------------------------
    def _apply_reader_event(self, ev: FaultEvent) -> None:
        c, k = self.cluster, ev.kind
        if k in WRITER_FAULT_KINDS:
            rec = {"kind": k, "at_s": ev.at_s, "old_pid": None, "took_over": None, "takeover_s": None,
                   "stepped_down": None, "skipped": None}
            self.failovers.append(rec)
            self._fault = rec
            why = self._wait_for_candidate()
            if why and self.closing.is_set():
                self.failovers.remove(rec)  # due as the run ended: not a fault, not a skip
                self._fault = None
                return
            if why:
                rec["skipped"] = why
                log.warning("chaos: %s at %gs skipped: %s", k, ev.at_s, why)
                return
            with self.lock:
                rec["started_at"] = time.monotonic()
                try:
                    if k == "writer_kill":
                        rec["old_pid"] = c.kill("writer")
                    elif k == "writer_pause":
                        rec["old_pid"] = c.stop("writer")
                        self._stopped.add(rec["old_pid"])
                    else:
                        pid = c.pid("writer")
                        if pid is None:
                            raise InvalidArgument("the writer is not running")
                        rec["old_pid"] = pid
                        if self.net is not None:
                            self.net.isolate(self._writer_namespace())
                        else:
                            self.blocked = (f"{self.pid_source}{pid}",)
                            self._push(list(c.node_ids))
                except SixfoldError as e:  # it went down (fenced, say) since it was seen running
                    rec["skipped"] = f"the writer was gone: {type(e).__name__}: {e}"
                    return
            log.warning("chaos: %s of writer pid %s", k, rec["old_pid"])
            self._watches[id(rec)] = self._followup("takeover", self._watch_takeover, rec)
            return
        if k in ("reader_add", "writer_resume"):
            rec, self._fault = self._fault, None
            if rec is None or rec.get("skipped"):
                return
            if k == "writer_resume":
                with self.lock:
                    self._stopped.discard(rec["old_pid"])
                    c.signal_pid(rec["old_pid"], signal.SIGCONT)
                rec["healed_at"] = time.monotonic()
                self._followup("step-down", self._step_down_then_restore, rec)
            else:
                self._followup("reader-add", self._takeover_then_restore, rec)
            return
        slot = int(ev.param("slot", 0))
        with self.lock:
            try:
                if k == "reader_kill":
                    live = [r for r in c.reader_ids if r not in self._slots.values() and c.state(r) == "running"]
                    if len(live) < 2:
                        log.info("chaos: reader_kill slot %d skipped: %d live readers (the last is never killed)", slot, len(live))
                        return
                    self._slots[slot] = live[slot % len(live)]
                    c.kill(self._slots[slot])
                else:
                    rid = self._slots.pop(slot, None)
                    if rid is not None and rid in c.reader_ids and c.state(rid) == "down":
                        c.start(rid, wait=False)
            except SixfoldError as e:
                # The reader changed meanwhile (it exited, or took over and was retired as a
                # reader): nothing to kill or restart.
                log.info("chaos: %s slot %d: %s: %s", k, slot, type(e).__name__, e)

    def _partition_groups(self, groups) -> tuple[tuple[str, ...], ...]:
        """A partition's groups as the nodes apply them. With readers, "writer" means the writer
        *process* of the moment (`pid:<n>`), as a network partition would cut off its host: the
        writer certificate is every reader's too, and a reader that takes over on the other
        side must reach its side (naming the role would cut it off as well)."""
        groups = tuple(tuple(g) for g in groups)
        pid = self.cluster.pid("writer") if self.readers else None
        if pid is None:
            return groups
        name = f"{self.pid_source}{pid}"
        return tuple(tuple(name if e == "writer" else e for e in g) for g in groups)

    def _writer_namespace(self) -> str:
        """The process name whose namespace holds the writer now: "writer", or the promoted
        reader whose address the manifest's writer entry took."""
        address = self.cluster.writer_address
        host = address.rpartition(":")[0]
        for name, entry in self.net.plan.processes.items():
            if entry[2] == host:
                return name
        return "writer"

    def _real_cut(self, groups):
        """A plan partition's groups as a cut of the namespaces (see the module docstring)."""
        from engine.cluster.netfaults import Cut

        writer = self._writer_namespace()
        self.net.refresh()
        known = set(self.net.names)
        # A process with no namespace yet (a replacement still starting) cannot be cut; it joins
        # the writer's side like the processes the plan does not name.
        sides = [{writer if e == "writer" else e for e in g} & known for g in groups]
        named = set().union(*sides) if sides else set()
        for side in sides:
            if writer in side:
                side.update(n for n in self.net.names if n not in named)
        return Cut.of(*sides)

    def _real_one_way(self, drops):
        """A plan's one-way drops as `OneWay`s between the namespaces ("writer": the writer
        process of the moment); a node with no namespace yet is left alone."""
        from engine.cluster.netfaults import OneWay

        writer = self._writer_namespace()
        self.net.refresh()
        known = set(self.net.names)
        named = [tuple(writer if e == WRITER else e for e in pair) for pair in drops]
        return [OneWay(a, b) for a, b in named if a in known and b in known]

    def _live_candidates(self) -> list[str]:
        c = self.cluster
        return [r for r in c.reader_ids if c.state(r) == "running"]

    def _wait_for_candidate(self) -> str:
        """Wait (bounded) until the writer runs and a reader is alive to take over; '' then,
        else why not."""
        for t in list(self._followups):
            t.join(CANDIDATE_WAIT_S)
        deadline = time.monotonic() + CANDIDATE_WAIT_S
        restored = False
        while True:
            if self.closing.is_set():
                return "the run is ending"
            writer = self.cluster.state("writer")
            candidates = self._live_candidates()
            if writer == "running" and candidates:
                return ""
            if not candidates and not restored:
                # A takeover the plan did not model (after a writer crash or a partition) used
                # readers up: add them back now.
                self._restore_readers()
                restored = True
            if time.monotonic() > deadline:
                return f"writer {writer}, live readers {candidates or 'none'} after {CANDIDATE_WAIT_S:g} s"
            time.sleep(POLL_S)

    def _followup(self, name: str, fn, *args) -> None:
        self._followups.append(self._background(name, fn, *args))

    def _new_writer(self, old_pid) -> int | None:
        """The pid of a running writer other than `old_pid`, if the manifest names one."""
        pid = self.cluster.pid("writer")
        if pid is not None and pid != old_pid and self.cluster.state("writer") == "running":
            return pid
        return None

    def _watch_takeover(self, rec: dict) -> None:
        """From the fault on: note when (if) another writer is recorded and runs. A killed writer
        must be replaced within TAKEOVER_TIMEOUT_S; a paused or cut-off one may instead keep
        the role, which its step-down check decides."""
        deadline = rec["started_at"] + TAKEOVER_TIMEOUT_S
        while not rec.get("decided"):
            new = self._new_writer(rec["old_pid"])
            if new is not None:
                rec.update(took_over=True, new_pid=new, takeover_s=round(time.monotonic() - rec["started_at"], 3))
                return
            if time.monotonic() > deadline:
                if rec["kind"] == "writer_kill":
                    rec["took_over"] = False
                return
            time.sleep(POLL_S)

    def _takeover_then_restore(self, rec: dict) -> None:
        """After a writer kill: wait (bounded) for the takeover, then add readers back."""
        watch = self._watches.get(id(rec))
        if watch is not None:
            watch.join(TAKEOVER_TIMEOUT_S)
        self._restore_readers()

    def _step_down_then_restore(self, rec: dict) -> None:
        """After a writer was resumed or reconnected: it exits (another took over), or it stays
        the recorded writer for KEPT_S with no takeover seen (none happened); anything else for
        STEP_DOWN_TIMEOUT_S is a writer that did not step down."""
        c, old = self.cluster, rec["old_pid"]
        deadline = time.monotonic() + STEP_DOWN_TIMEOUT_S
        kept_since = None
        while True:
            now = time.monotonic()
            if not c.pid_alive(old):
                rec["stepped_down"] = True
                break
            if c.pid("writer") == old and not rec.get("took_over"):
                kept_since = kept_since or now
                if now - kept_since >= KEPT_S:
                    rec.update(took_over=False, kept=True)
                    break
            else:
                kept_since = None
            if now > deadline:
                rec["stepped_down"] = False
                log.error("chaos: writer pid %s still runs %g s after it was resumed/reconnected, and the manifest "
                          "names pid %s as the writer", old, STEP_DOWN_TIMEOUT_S, c.pid("writer"))
                break
            time.sleep(POLL_S)
        rec["decided"] = True
        watch = self._watches.get(id(rec))
        if watch is not None:
            watch.join(TAKEOVER_TIMEOUT_S)
        self._restore_readers()

    def _restore_readers(self) -> None:
        """Add reader instances until the plan's count are configured again (a promoted reader is
        retired as a reader). Started without waiting: one is SERVING once a writer streams to it."""
        c = self.cluster
        with self.lock:
            for _ in range(max(0, self.readers - len(c.reader_ids))):
                try:
                    c.add_reader(wait=False)
                    self.readers_added += 1
                except SixfoldError as e:
                    self.errors.append(f"reader add: {type(e).__name__}: {e}")
                    break

    def _background(self, name: str, fn, *args) -> threading.Thread:
        t = threading.Thread(target=self._guarded, args=(name, fn) + args, name=name, daemon=True)
        t.start()
        self.threads.append(t)
        return t

    def _guarded(self, name: str, fn, *args) -> None:
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - a failed fault is reported, the run goes on
            if len(self.errors) < 20:
                self.errors.append(f"{name}: {type(e).__name__}: {e}")

    def _restart_writer(self, down_s: float, crash: int) -> None:
        time.sleep(down_s)
        with self.lock:
            if crash != self._writer_crashes or self.cluster.state("writer") != "down":
                taken = True  # a later crash owns the writer, or it runs already (a reader took over?)
            else:
                taken = False
                self.cluster.start("writer", wait=False)
        if taken and self.readers:
            self._restore_readers()

    def _replace(self, old: str, new: str) -> None:
        deadline = time.monotonic() + REPLACE_TIMEOUT_S
        pushed = []

        def on_change(_change) -> None:
            if not pushed:  # the new node serves now: give it the rules in force
                pushed.append(True)
                with self.lock:
                    self._push(list(self.cluster.node_ids))

        while True:
            try:
                self.cluster.replace_node(old, new, timeout_s=REPLACE_TIMEOUT_S, on_change=on_change)
                self.replaced += 1
                return
            except InvalidArgument:
                raise  # refused outright: asking again would not help
            except SixfoldError as e:
                # The writer endpoint is down or recovering (it runs the change): ask again.
                if time.monotonic() > deadline:
                    raise
                log.info("replace %s -> %s: %s: %s; asking again", old, new, type(e).__name__, e)
                time.sleep(0.5)

    def wait_background(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self.threads)

    def heal_everything(self) -> None:
        c = self.cluster
        self.closing.set()
        with self.lock:
            for pid in sorted(self._stopped):  # a pause whose resume the run did not reach
                c.signal_pid(pid, signal.SIGCONT)
            self._stopped.clear()
            self.groups, self.message, self.blocked, self.deaf = (), {}, (), {}
            if self.net is not None:
                self.net.heal()
            self._push(list(c.node_ids))
        for t in list(self._followups):
            t.join(STEP_DOWN_TIMEOUT_S + TAKEOVER_TIMEOUT_S)
        if self.readers and c.state("writer") == "down" and self._live_candidates():
            # A reader takes over from a writer that is down; start one only if none does.
            deadline = time.monotonic() + TAKEOVER_TIMEOUT_S
            while c.state("writer") == "down" and time.monotonic() < deadline:
                time.sleep(POLL_S)
        with self.lock:
            for name in list(list(c.node_ids)) + ["writer"] + list(c.reader_ids):
                state = c.state(name)
                if state == "paused":
                    c.cont(name)
                elif state == "down":
                    if name == "writer":
                        self.writer_started_at_end += 1
                    c.start(name, wait=name not in c.reader_ids)
            self._push(list(c.node_ids))
            for name in list(c.node_ids):  # latent corruption no scrub has reached yet
                try:
                    c.scrub(name)
                except SixfoldError:
                    pass
        self._restore_readers()

    def stats(self) -> dict:
        return {"failovers": [{k: v for k, v in r.items() if k not in ("started_at", "healed_at", "decided")}
                              for r in self.failovers],
                "readers_added": self.readers_added, "writer_started_at_end": self.writer_started_at_end,
                "one_way_in_gate": self.one_way_in_gate}

    def kill_leftovers(self) -> None:
        """SIGKILL old writers that never stepped down: the manifest no longer names them, so
        `cluster down` would leave them running."""
        for rec in self.failovers:
            pid = rec.get("old_pid")
            if pid and self.cluster.pid_alive(pid) and self.cluster.pid("writer") != pid:
                self.cluster.signal_pid(pid, signal.SIGKILL)


class PinnedReaders:
    """Replica reads for the workload, one reader instance per session (see the module
    docstring): `session(client)` -> (session id, a Database on that reader, or None)."""

    def __init__(self, cluster, clients: int) -> None:
        self.cluster = cluster
        self.clients = clients
        self._lock = threading.Lock()
        self._dbs: dict[str, object] = {}  # reader id -> its connection (shared by its clients)
        self._pinned: dict[int, tuple[str, str]] = {}  # client -> (session id, reader id)
        self._moves: dict[int, int] = {}
        self._active: list[tuple[str, str]] = []  # (reader id, address)
        self._checked = 0.0

    def _refresh(self) -> None:
        from engine.cluster.manifest import active_readers

        now = time.monotonic()
        if now - self._checked < READERS_REFRESH_S and self._active:
            return
        self._checked = now
        try:
            self._active = [(r["id"], r["address"]) for r in active_readers(self.cluster.manifest)]
        except (SixfoldError, OSError, ValueError):
            pass  # the manifest is being replaced: keep what was read last

    def _connect(self, reader_id: str, address: str):
        import engine
        from engine.security.users import default_token

        db = self._dbs.get(reader_id)
        if db is None:
            db = engine.connect(address, tls=self.cluster.tls(), token=default_token(self.cluster.folder), timeout_s=10,
                                connect_timeout_s=2)
            self._dbs[reader_id] = db
        return db

    def session(self, client: int):
        with self._lock:
            self._refresh()
            ids = [rid for rid, _ in self._active]
            current = self._pinned.get(client)
            if current is None or current[1] not in ids:
                if not ids:
                    return (current[0] if current else f"{client}.0"), None
                moves = self._moves.get(client, -1) + 1
                self._moves[client] = moves
                rid = ids[(client + moves) % len(ids)]
                current = (f"{client}.{moves}", rid)
                self._pinned[client] = current
            address = dict(self._active)[current[1]]
            try:
                return current[0], self._connect(current[1], address)
            except SixfoldError:
                return current[0], None

    def close(self) -> None:
        for db in self._dbs.values():
            try:
                db.close()
            except Exception:  # noqa: BLE001 - closing a dead connection must not fail the run
                pass


class EndpointReaders:
    """Replica reads through the reader endpoint (`engine.connect(folder, role="reader")`, gRPC
    round_robin over every reader), one session per client; reconnected when the manifest's
    readers change (promoted ones leave it, added ones join)."""

    def __init__(self, cluster) -> None:
        self.cluster = cluster
        self._lock = threading.Lock()
        self._db = None
        self._readers: tuple = ()
        self._old: list = []
        self._checked = 0.0

    def session(self, client: int):
        import engine
        from engine.cluster.manifest import active_readers

        with self._lock:
            now = time.monotonic()
            if now - self._checked >= READERS_REFRESH_S or self._db is None:
                self._checked = now
                try:
                    readers = tuple(r["address"] for r in active_readers(self.cluster.manifest))
                    if readers and readers != self._readers:
                        db = engine.connect(self.cluster.folder, role="reader", timeout_s=10, connect_timeout_s=2)
                        if self._db is not None:
                            self._old.append(self._db)  # other clients may be inside a call on it
                        self._db, self._readers = db, readers
                except (SixfoldError, OSError, ValueError):
                    pass
            return client, self._db

    def close(self) -> None:
        for db in self._old + ([self._db] if self._db is not None else []):
            try:
                db.close()
            except Exception:  # noqa: BLE001
                pass


def _converged(db) -> bool:
    try:
        st = db.status()
    except SixfoldError:
        return False
    scls = {str(n.get("scl")) for n in st["nodes"]}
    return all(n.get("up") for n in st["nodes"]) and len(scls) == 1


def run_cluster(config, plan, out_dir: str, progress, drive):
    from engine.chaos.sim import digests_at
    from engine.cluster.launcher import Cluster
    from engine.node.service import wait_until

    folder = os.path.join(out_dir, "cluster")
    cluster = Cluster(folder)
    real = getattr(config, "network", "gate") == "real"
    try:
        cluster.up(base_port=config.base_port, protection_groups=config.protection_groups, write_timeout_s=1.0,
                   gossip_interval_s=0.5,
                   allow_fault_injection=True,  # the nemesis corrupts records and sets fault rules (as the admin)
                   readers=plan.readers or None, netns=real)
    except BaseException:
        cluster.down()  # a half-made namespaced cluster leaves nothing behind
        raise
    net = None
    if real:
        from engine.cluster.netfaults import NetFaults

        net = NetFaults(folder)
    nemesis = ClusterNemesis(cluster, config.seed, config.protection_groups, readers=plan.readers, net=net)
    db = cluster.connect()
    replica = None
    if plan.readers and config.replica_reads == "pinned":
        replica = PinnedReaders(cluster, config.clients)
    elif plan.readers and config.replica_reads == "endpoint":
        replica = EndpointReaders(cluster)
    try:
        workload, history, nem = drive(config, plan, db, nemesis.apply, progress, replica=replica)
        nemesis.closing.set()  # events still due (the nemesis thread may be waiting) are not applied
        nemesis.wait_background(REPLACE_TIMEOUT_S)
        nemesis.heal_everything()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                db.put(b"\xff-settle", b"x")  # carries the newest VDL hint to every node
                break
            except SixfoldError:
                time.sleep(0.2)
        wait_until(lambda: _converged(db), CONVERGE_TIMEOUT_S, 0.2)
        workload.final_reads()
        st = db.status()
        # The digests are segment scans (live state at the VDL), which the nodes allow a writer or
        # a reader, not the operator's admin identity: the checker reads as the writer identity.
        transport = cluster.transport("checker", identity=WRITER)
        try:
            digests = digests_at(transport, st["vdl"], st["protection_groups"], [n["id"] for n in st["nodes"]])
        finally:
            transport.close()
        stats = {"faults_applied": nem.applied, "nemesis_errors": (nem.errors + nemesis.errors)[:20],
                 "replaced": nemesis.replaced, **(nemesis.stats() if plan.readers else {})}
        if nemesis.one_way_in_gate:
            stats["one_way_in_gate"] = nemesis.one_way_in_gate
        if net is not None:  # partitions made of nft rules on real packets
            stats.update(network="real", nft_cuts=net.cuts_applied)
    finally:
        try:
            if replica is not None:
                replica.close()
            db.close()
        finally:
            try:
                nemesis.kill_leftovers()
            finally:
                cluster.down()
    return history, digests, stats
