"""Fault-injection runs: a workload against a deployment while a nemesis applies a fault plan.

Theory of operation
-------------------
A run is fully described by its `RunConfig` (target, seed, duration, clients, fault families).
The plan is generated from the seed before anything starts (`engine.chaos.plan`), so the faults
of a run can be printed and replayed. Then, per target:

* `sim`: `engine.chaos.sim.Simulation`, one thread, simulated time: the same seed gives the
  same history, byte for byte.
* `embedded`: the embedded engine with real threads; node faults through the volume, network
  faults through the fault-injecting transport wrapped around every in-process transport; a
  writer restart and the steps of a membership change run on threads beside the nemesis.
* `cluster`: real processes started by the launcher in the run folder; SIGKILL / SIGSTOP /
  SIGCONT through the launcher, corruption through the node's admin RPC, network faults through
  the fault layer in the nodes' and writer's gRPC clients (admin RPC), when available. Only
  this target has reader instances, so only it takes the writer and reader faults
  (`plan.CLUSTER_ONLY_NAMES`); its clients then also read on replicas (`replica_reads`), and
  its writer faults get a verdict of their own (`failover`).

Every run ends the same way: heal everything, wait until the segments converge, read every key
once at full health, digest every segment of every PG up to VDL, and run the checkers. The run
folder gets `plan.json`, `history.jsonl` and `report.json`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field

from engine.chaos.checker import check_all, check_failovers, overall, render_table
from engine.chaos.history import History
from engine.chaos.plan import CLUSTER_ONLY_NAMES, DEFAULT_FAULTS, WRITER_FAULT_KINDS, FaultEvent, FaultPlan, generate_plan
from engine.chaos.workload import DEFAULT_MIX, Workload
from engine.errors import InvalidArgument, SixfoldError
from engine.head import weakening

log = logging.getLogger("sixfold.chaos")

TARGETS = ("sim", "embedded", "cluster")
#: The workload of a run with `cas`: the default mix plus compare-and-sets on the same hot keys.
CAS_MIX = {**DEFAULT_MIX, "cas": 0.30}
#: How a cluster run's clients read on replicas: through one reader per session (what a replica
#: promises to keep monotonic), through the reader endpoint (round_robin over every reader), or not.
REPLICA_READS = ("pinned", "endpoint", "none")
#: Event kinds only the cluster target can apply (it alone has reader instances).
_READER_KINDS = WRITER_FAULT_KINDS | {"reader_add", "writer_resume", "reader_kill", "reader_restart"}
CONVERGE_TIMEOUT_S = 60.0
#: How long a crashed writer keeps trying to reopen (recovery needs a write quorum of every set).
WRITER_REOPEN_S = 30.0
#: How often the embedded target's membership-change driver takes a step.
CHANGE_STEP_S = 0.05
#: Where a cluster run makes its partitions (RunConfig.network).
NETWORKS = ("gate", "real")


@dataclass(frozen=True)
class RunConfig:
    target: str = "sim"
    seed: int = 1
    duration_s: float = 10.0
    clients: int = 4
    keys: int = 8
    faults: tuple[str, ...] = DEFAULT_FAULTS
    unbounded: bool = False
    ops_max: int = 20_000
    protection_groups: int = 4
    check_budget_s: float = 30.0
    #: TEST ONLY: a weakened protocol the checkers must catch ("read-any", "write-quorum-2")
    weaken: str | None = None
    base_port: int = 7600
    #: a hand-written plan (faults as data) instead of one generated from the seed
    plan: FaultPlan | None = None
    #: reader instances of a cluster run (None: the plan's default, 2 with reader faults, else 0)
    readers: int | None = None
    replica_reads: str = "pinned"
    #: where a cluster run's partitions are made: "gate" (inside the nodes' gRPC layer) or
    #: "real" (nft rules in the processes' network namespaces; engine.cluster.netfaults)
    network: str = "gate"
    #: add compare-and-set operations (conditional writes) to the workload: the embedded and
    #: cluster targets (the simulator drives the engine with its own operations)
    cas: bool = False

    def __post_init__(self) -> None:
        assert self.target in TARGETS, self.target
        assert self.network in NETWORKS, self.network
        assert not (self.cas and self.target == "sim"), "the cas workload runs on the embedded and cluster targets"
        assert self.weaken is None or self.weaken in weakening.NAMED, self.weaken
        assert self.replica_reads in REPLICA_READS, self.replica_reads

    def check_target(self) -> None:
        """InvalidArgument if the faults need what the target lacks (reader instances)."""
        named = [f for f in self.faults if f in CLUSTER_ONLY_NAMES]
        if self.network == "real" and self.target != "cluster":
            raise InvalidArgument(f"--network real cuts real packets between processes: --target cluster only, not "
                                  f"{self.target} (its partitions stay in the fault gate)")
        if self.readers is not None and not 0 <= self.readers <= 15:
            raise InvalidArgument(f"readers: 0..15 (a cluster runs at most 15), got {self.readers}")
        if self.target == "cluster":
            if named and self.readers == 0 and self.plan is None:
                raise InvalidArgument(f"{', '.join(named)} need reader instances to take over: readers >= 1")
            return
        planned = self.plan is not None and (self.plan.readers or any(e.kind in _READER_KINDS for e in self.plan.events))
        if named or planned or self.readers:
            raise InvalidArgument(
                f"writer and reader faults ({', '.join(named) or 'in the plan'}) need reader instances: "
                f"--target cluster only, not {self.target}")


@dataclass
class RunResult:
    config: RunConfig
    out_dir: str
    verdicts: list
    counts: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def overall(self) -> str:
        return overall(self.verdicts)

    def report(self) -> dict:
        return {
            "config": asdict(self.config),
            "overall": self.overall,
            "verdicts": [v.to_dict() for v in self.verdicts],
            "counts": self.counts,
            "stats": self.stats,
            "seconds": round(self.seconds, 3),
            "out_dir": self.out_dir,
        }




def _counts(history: History) -> dict:
    c = {"ok": 0, "fail": 0, "indeterminate": 0}
    for e in history.entries():
        if e.type in c:
            c[e.type] += 1
    return c


def run(config: RunConfig, out_dir: str, *, progress=None) -> RunResult:
    """Run one fault-injection run; write plan.json, history.jsonl and report.json to out_dir."""
    config.check_target()
    os.makedirs(out_dir, exist_ok=True)
    # A run starts from an empty volume: data left by an earlier run in this folder would be
    # values this history never wrote.
    for leftover in ("data", "cluster"):
        shutil.rmtree(os.path.join(out_dir, leftover), ignore_errors=True)
    plan = config.plan or generate_plan(config.seed, config.duration_s, config.faults, unbounded=config.unbounded,
                                        readers=config.readers)
    with open(os.path.join(out_dir, "plan.json"), "w") as fh:
        fh.write(plan.to_json())
    t0 = time.monotonic()
    if config.target == "sim":
        history, digests, stats = _run_sim(config, plan, out_dir, progress)
    elif config.target == "embedded":
        history, digests, stats = _run_embedded(config, plan, out_dir, progress)
    else:
        history, digests, stats = _run_cluster(config, plan, out_dir, progress)
    # Simulated time is deterministic; wall-clock times are not, so they are kept only for real runs.
    history.write_jsonl(os.path.join(out_dir, "history.jsonl"), include_time=True)
    verdicts = check_all(history, digests=digests, time_budget_s=config.check_budget_s)
    if stats.get("failovers"):
        verdicts.append(check_failovers(stats["failovers"], liveness=not plan.unbounded))
    result = RunResult(config, out_dir, verdicts, _counts(history), stats, time.monotonic() - t0)
    with open(os.path.join(out_dir, "report.json"), "w") as fh:
        json.dump(result.report(), fh, indent=2, sort_keys=True, default=str)
    return result


# --- sim ------------------------------------------------------------------------------------
def _run_sim(config: RunConfig, plan: FaultPlan, out_dir: str, progress):
    from engine.chaos.sim import Simulation

    sim = Simulation(
        os.path.join(out_dir, "data"), plan, seed=config.seed, clients=config.clients, keys=config.keys,
        ops_max=config.ops_max, protection_groups=config.protection_groups, weakening=weakening.named(config.weaken),
    )
    return sim.run()


# --- embedded -------------------------------------------------------------------------------
class _Nemesis(threading.Thread):
    """Applies the plan's events at their times (relative to `t0`), on its own thread."""

    def __init__(self, plan: FaultPlan, apply, t0: float) -> None:
        super().__init__(name="nemesis", daemon=True)
        self.plan, self.apply, self.t0 = plan, apply, t0
        self.stop = threading.Event()
        self.applied = 0
        self.errors: list[str] = []

    def run(self) -> None:
        for ev in self.plan.events:
            delay = self.t0 + ev.at_s - time.monotonic()
            if delay > 0 and self.stop.wait(delay):
                return
            try:
                self.apply(ev)
            except Exception as e:  # noqa: BLE001 - a failed fault is reported, the run goes on
                self.errors.append(f"{ev.kind} {ev.targets}: {type(e).__name__}: {e}")
            self.applied += 1


def _progress_line(config: RunConfig, t0: float, workload: Workload, faults_applied: int) -> str:
    p = workload.progress()
    return (
        f"seed {config.seed} | {time.monotonic() - t0:5.1f} s | ops {p.ok:,} ok / {p.fail:,} failed / "
        f"{p.indeterminate:,} indeterminate | faults {faults_applied}"
    )


def _drive(config: RunConfig, plan: FaultPlan, db, apply, progress, replica=None):
    """Run the workload and the nemesis together; return (workload, history, nemesis).
    `replica`: the sessions' read replicas (the cluster target with readers), or None."""
    history = History(clock_ns=time.monotonic_ns)
    workload = Workload(
        db, history, config.seed, clients=config.clients, keys=config.keys, duration_s=config.duration_s,
        ops_max=config.ops_max, replica=replica, mix=CAS_MIX if config.cas else None,
    )
    t0 = time.monotonic()
    nemesis = _Nemesis(plan, apply, t0)
    nemesis.start()
    workload.start()
    while not workload.join(timeout_s=1.0):
        if progress:
            progress(_progress_line(config, t0, workload, nemesis.applied))
    nemesis.stop.set()
    nemesis.join(timeout=5)
    if progress:
        progress(_progress_line(config, t0, workload, nemesis.applied))
    return workload, history, nemesis


def _run_embedded(config: RunConfig, plan: FaultPlan, out_dir: str, progress):
    from engine.chaos.sim import MembershipChanges, apply_event, converged, heal_everything, segment_digests
    from engine.database import Database
    from engine.embedded import ClusterControl, EmbeddedOptions, EmbeddedVolume
    from engine.node.service import wait_until
    from engine.transport.faults import FaultyTransport, NetworkFaults
    from engine.transport.inprocess import InProcessTransport

    faults = NetworkFaults(seed=config.seed)
    vol = EmbeddedVolume(
        os.path.join(out_dir, "data"),
        EmbeddedOptions(
            protection_groups=config.protection_groups, write_timeout_s=1.0, gossip_interval_s=0.05,
            scrub_interval_s=0.2, seed=config.seed,
        ),
        transport_wrapper=lambda t: FaultyTransport(t, faults),
        weakening=weakening.named(config.weaken),
    )
    db = Database(vol, ClusterControl(vol))
    writer_lock = threading.Lock()
    crashes = [0]  # how many writer crashes so far: a reopen belongs to the latest one
    reopeners: list[threading.Thread] = []
    changes = MembershipChanges(vol)
    stop_changes = threading.Event()

    def reopen_writer(crash: int | None = None) -> None:
        deadline = time.monotonic() + WRITER_REOPEN_S
        while time.monotonic() < deadline:
            with writer_lock:
                if vol.writer is not None or (crash is not None and crash != crashes[0]):
                    return  # open already, or a later crash owns the writer now
                try:
                    vol.crash_writer()  # there is no writer: this opens one (recovery)
                    return
                except SixfoldError as e:
                    log.info("writer reopen failed, retrying: %s: %s", type(e).__name__, e)
            time.sleep(0.1)

    def crash_then_reopen(w, down_s: float, crash: int) -> None:
        t0 = time.monotonic()
        if w is not None:
            # Stopping the old writer's threads may take a while (a sender in its back-off):
            # it stops on a thread of its own, and a writer it has not yet stopped is fenced by
            # the new one's epoch, as a crashed process that had not quite died would be.
            threading.Thread(target=w.abandon, name="writer-abandon", daemon=True).start()
        time.sleep(max(0.0, down_s - (time.monotonic() - t0)))
        reopen_writer(crash)

    def on_writer_crash(ev: FaultEvent) -> None:
        # The writer stops serving now; a new one opens after down_s on a thread of its own, so
        # the plan's next events (a partition healing, say) still fall due while it is down.
        with writer_lock:
            crashes[0] += 1
            w, vol.writer = vol.writer, None
            crash = crashes[0]
        t = threading.Thread(target=crash_then_reopen, args=(w, float(ev.param("down_s", 0.1)), crash),
                             name=f"writer-crash-{crash}", daemon=True)
        t.start()
        reopeners.append(t)

    def drive_changes() -> None:
        while not stop_changes.wait(CHANGE_STEP_S):
            changes.step()

    def apply(ev: FaultEvent) -> None:
        apply_event(ev, vol, faults, on_writer_crash=on_writer_crash, on_replace=changes.due,
                    on_replace_done=changes.finish_due)

    driver = threading.Thread(target=drive_changes, name="membership-changes", daemon=True)
    driver.start()
    try:
        workload, history, nemesis = _drive(config, plan, db, apply, progress)
        changes.finish_all()  # the workload may end (ops_max) before the plan's replace_done
        heal_everything(vol, faults)
        for t in reopeners:
            t.join(WRITER_REOPEN_S)
        if vol.writer is None:
            reopen_writer()
        wait_until(lambda: not changes.pending, CONVERGE_TIMEOUT_S, 0.1)
        stop_changes.set()
        driver.join(timeout=10)
        if vol.writer is not None:
            try:
                vol.writer.put(b"\xff-settle", b"x")  # carries the newest VDL hint everywhere
            except SixfoldError:
                pass
        wait_until(lambda: converged(vol), CONVERGE_TIMEOUT_S, 0.1)
        workload.final_reads()
        digests = segment_digests(InProcessTransport(vol.registry, "checker"), vol.writer)
        stats = {"faults_applied": nemesis.applied, "nemesis_errors": (nemesis.errors + changes.errors)[:20],
                 "faults": dict(faults.counts), "replaced": changes.replaced,
                 "changes_unfinished": changes.pending}
    finally:
        stop_changes.set()
        vol.close()
    return history, digests, stats


# --- cluster --------------------------------------------------------------------------------
def _run_cluster(config: RunConfig, plan: FaultPlan, out_dir: str, progress):
    from engine.chaos.cluster_target import run_cluster

    return run_cluster(config, plan, out_dir, progress, _drive)


def render(result: RunResult) -> str:
    return render_table(result.verdicts)
