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
| partition / heal      | every node refuses requests from endpoints outside its group      |
| slow, drop, duplicate, delay, reorder / clear | per-node fault rules in its gRPC server (reorder is approximated by delay jitter) |

Fault rules are composed here (partition groups plus each node's message faults) and pushed
whole to each node with the `SetFaults` admin RPC, which the nodes never apply to admin callers.

A writer restart and a membership change take a while, so each runs on a thread of its own and the
plan's next events still fall due meanwhile (a partition that heals while the writer is down, say).
`replace` starts `Cluster.replace_node`, which adds the node, has the writer endpoint run both epoch
steps and retires the old node; the endpoint commits the change as soon as the new node has
caught up, and `replace_done` waits (bounded) for it: real processes are slower than the plan's
clock, and later events may name the new node. A new node gets the current fault rules once it
serves. The run waits (bounded) for every change before its final checks.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from engine.chaos.plan import FaultEvent, pick_corruption
from engine.errors import InvalidArgument, SixfoldError

log = logging.getLogger("sixfold.chaos")

CONVERGE_TIMEOUT_S = 90.0
#: How long a membership change may take, writer restarts included.
REPLACE_TIMEOUT_S = 120.0


class ClusterNemesis:
    """Applies plan events to a launcher-managed cluster."""

    def __init__(self, cluster, seed: int, protection_groups: int) -> None:
        from engine.transport.convert import FaultRules

        self.cluster = cluster
        self.FaultRules = FaultRules
        self.seed = seed
        self.P = protection_groups
        self.groups: tuple[tuple[str, ...], ...] = ()
        self.message: dict[str, dict] = {}
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []
        self.changes: dict[tuple[str, str], threading.Thread] = {}  # (old, new) -> its thread
        self.errors: list[str] = []
        self.replaced = 0
        self._writer_crashes = 0

    def _push(self, nodes) -> None:
        for n in nodes:
            m = self.message.get(n, {})
            rules = self.FaultRules(
                groups=self.groups,
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
        if k == "replace_done":
            # Real processes are slower than the plan's clock: wait (bounded) for the change, so
            # that later events naming the new node find it a member and the old one gone.
            t = self.changes.get((targets[0], ev.param("new")))
            if t is not None:
                t.join(REPLACE_TIMEOUT_S)
            return
        with self.lock:
            if k == "kill":
                for n in targets:
                    c.kill(n)
            elif k in ("restart",):
                for n in targets:
                    c.start(n)
                self._push(targets)
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
                nodes = list(targets or c.azs()[ev.param("az")])
                for n in nodes:
                    c.start(n)
                self._push(nodes)
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
            elif k == "partition":
                self.groups = tuple(tuple(g) for g in ev.param("groups", ()))
                self._push(list(c.node_ids))
            elif k == "heal":
                self.groups = ()
                self._push(list(c.node_ids))
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
                return  # a later crash owns the writer, or it runs already
            self.cluster.start("writer", wait=False)

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
        with self.lock:
            for name in list(list(c.node_ids)) + ["writer"]:
                state = c.state(name)
                if state == "paused":
                    c.cont(name)
                elif state == "down":
                    c.start(name)
            self.groups, self.message = (), {}
            self._push(list(c.node_ids))
            for name in list(c.node_ids):  # latent corruption no scrub has reached yet
                try:
                    c.scrub(name)
                except SixfoldError:
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
    cluster.up(base_port=config.base_port, protection_groups=config.protection_groups, write_timeout_s=1.0, gossip_interval_s=0.5,
               allow_fault_injection=True)  # the nemesis corrupts records and sets fault rules (as the admin)
    nemesis = ClusterNemesis(cluster, config.seed, config.protection_groups)
    db = cluster.connect()
    try:
        workload, history, nem = drive(config, plan, db, nemesis.apply, progress)
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
        transport = cluster.transport("checker")
        try:
            digests = digests_at(transport, st["vdl"], st["protection_groups"], [n["id"] for n in st["nodes"]])
        finally:
            transport.close()
        stats = {"faults_applied": nem.applied, "nemesis_errors": (nem.errors + nemesis.errors)[:20],
                 "replaced": nemesis.replaced}
    finally:
        try:
            db.close()
        finally:
            cluster.down()
    return history, digests, stats
