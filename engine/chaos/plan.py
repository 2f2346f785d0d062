"""Fault plans: the nemesis schedule of a fault-injection run, written down as data.

Theory of operation
-------------------
The faults of a run are decided before it starts, from a seed, and written down as a `FaultPlan`:
a time-sorted tuple of `FaultEvent`s, each one "`at_s` seconds into the run, do `kind` to
`targets` with `params`". A runner (the nemesis) replays the plan against a simulated or real
cluster. This module does no I/O, reads no clock and draws randomness only from the seed it is
given, so a plan can be printed, saved as JSON, diffed and replayed exactly: a failure found by a
run is reproduced from its seed (FoundationDB, Jepsen).

Event kinds and what heals them (`HEALED_BY`):

| fault          | targets                      | params                          | healed by |
|----------------|------------------------------|---------------------------------|-----------|
| kill           | nodes (SIGKILL)              |                                 | restart   |
| pause          | nodes (SIGSTOP)              |                                 | resume    |
| partition      | nodes cut off from "writer"  | groups: endpoints per side      | heal      |
| one_way        | nodes whose link to the writer drops one way | drops: (sender, receiver) pairs | heal |
| az_down        | both nodes of the AZ         | az                              | az_up     |
| corrupt        | one node                     | seed, bits (which record/bits)  | scrub     |
| writer_crash   | ("writer",)                  | down_s (crash, then recover)    | itself    |
| slow           | nodes (all their links)      | delay_ms                        | unslow    |
| drop/duplicate/reorder/delay | nodes (all their links) | probability (delay: delay_ms) | clear |
| replace        | (old,): the node replaced    | new: id of the new node         | replace_done |
| writer_kill    | ("writer",) (SIGKILL, no restart) |                            | reader_add |
| writer_pause   | ("writer",) (SIGSTOP)        |                                 | writer_resume |
| writer_partition | ("writer",): every node refuses the writer process |       | heal      |
| reader_kill    | () (SIGKILL a reader)        | slot: which of the live readers | reader_restart |

`replace` is a membership change (Aurora's ABCDEF -> ABCDEF+ABCDEG -> ABCDEG): the new node
joins the old node's AZ as a member of a second quorum set and rebuilds from its peers;
`replace_done` says the change may be committed: the runner does so once the new node has caught
up (the cluster target waits for that, bounded), and the old node is retired: no later event
may name it. While the change is under way
the membership has two quorum sets, and a write needs a write quorum of both.

A partition says who cannot reach whom: `groups` is a tuple of disjoint groups of endpoints that
together name every node and the endpoint "writer"; messages cross no group boundary. A one-way
drop (`one_way`, the family `one-way`) says what is lost in one direction only: `drops` is a
tuple of (sender, receiver) pairs, each between the writer and one of the targets, e.g.
(("writer", "n3"), ("n5", "writer")): n3 hears nothing the writer sends it (its appends are
lost, n3 itself is fine), and what n5 sends the writer is lost (n5 stores the writer's records,
the writer never hears that it did). A new partition or one-way drop replaces the network fault
in force, and `heal` reconnects everything. `clear` with no targets
clears every message fault. `scrub` is the healing half of `corrupt`: the runner makes the node
scrub now (drop the corrupt record and refetch it from peers), so the plan knows when the
corruption stops counting against the budget instead of guessing a scrub interval.

Failure budget. By default a plan stays inside what the protocol promises to survive, so every
failure a run finds is a real bug (TIGER_STYLE): after every event at most `IMPAIRED_MAX` = 3 of
the 6 segments of every quorum set are impaired, where a node is impaired while it is down,
paused, cut off from the writer (by a partition, or by a one-way drop in either direction: a
segment whose acknowledgements the writer never hears is as lost to it as one that never hears
the writer), holding an unrepaired corrupt record, losing messages (`drop`),
or rebuilding as the new node of a membership change (it holds nothing yet). An AZ plus one more
node ("az+1") is exactly 3. During a change both quorum sets count, each against the budget: the
new set has its new node rebuilding, so it has one fault fewer to spare. Message duplication,
reordering, delay and slow links impair nothing: they change timing, never what arrives.

One partition impairs the writer rather than the segments: when the nodes cut off from the
writer include one group that holds a write quorum of every quorum set, those nodes are whole and
reach each other (as after a writer crash); only the writer is cut off, with the minority on its
side. Nothing can become durable there, so the protocol promises that nothing acknowledged is lost
and that reads stay linearizable (they fail instead); the nodes of that group are not counted as
impaired. This is where a weakened write quorum shows (the `isolate` family below).

Writer faults and readers (the cluster target only: `CLUSTER_ONLY_NAMES`). A plan that has
them names `readers`, the reader instances the run starts with; a reader may take over as the
writer (engine.head.failover), so these faults are healed by nobody restarting the writer:
`writer_kill` SIGKILLs whoever is the writer now and a reader must take over by itself;
`writer_pause` SIGSTOPs it past its lease, so that a reader takes over, and `writer_resume`
SIGCONTs it: it must step down by itself; `writer_partition` makes every node refuse the writer
*process* (not the writer role: a promoted reader must reach them), and `heal` lifts it;
`reader_kill` / `reader_restart` kill a live reader and start it again. A takeover uses up a
reader (it is the writer now), so the healing half of each writer fault (`reader_add`,
`writer_resume`, `heal`) also has the runner add readers back up to `readers`. The safety
rule, checked by `validate_plan` and kept by the generator: a writer fault starts only while a
live reader candidate exists (readers, minus those killed, minus one used by a writer fault not
yet healed); the generator keeps at most `readers - 1` readers down at once, and writer faults
never overlap each other, a writer crash or a membership change (each holds the writer). They
impair no segment (the nodes are whole, only the writer is gone), but a takeover needs a write
quorum: while a writer fault is in force, and TAKEOVER_GRACE_S after it, the generator keeps at
most REPLICAS - WRITE_QUORUM (2) segments of each quorum set impaired (no AZ plus a node), and
`validate_plan` refuses a bounded plan whose writer fault meets more.

`unbounded=True` lifts the budget (then only safety can be checked). Either way every fault is
healed by `healed_at_s`, and the last quarter of the run (`TAIL_FRACTION`) is a healing period
with no events, so final checks run at full health.

The generator works in *episodes*: a fault, its healing event and the resources it holds
(a node's process, its links, the partition, the writer, the membership). An episode is accepted
only if no accepted episode holds one of its resources at an overlapping time (so a restart never
revives a node that another episode still wants down) and the budget holds at every instant.
Episodes are drawn in order of their start, so the nodes an episode may name are known: the
first nodes and those added by changes complete before it starts, minus the nodes retired by a
change that began before it. Times are rounded to milliseconds so the JSON round trip is exact.
At equal times healing events sort before faults, which is also the order the budget is computed
in.

Aimed episodes. Random faults rarely line up the way a broken protocol needs to show, so some
families are shapes aimed at a weakness, each inside the budget (Jepsen's targeted nemeses):

* `isolate`: after a quiet lead, the writer is cut off with two nodes (a minority: fewer than a
  write quorum), while the other four still reach each other; clients keep writing; then the
  writer crashes, the minority is lost with it (killed), and a new writer recovers from the
  four. A correct writer acknowledged nothing in the partition; one that acknowledges at two
  segments (`--weaken write-quorum-2`) has acknowledged writes that only the lost minority held.
* `replace`: a membership change, sometimes of a node already dead, sometimes with the "swap":
  the old node, its AZ peer and the new node are cut off while the other four take writes
  (acknowledged on a write quorum of both sets), then the partition flips and the writer reaches
  only those three (the writer is isolated, see above). Three nodes that are not a read quorum of
  either quorum set then hold none of the acknowledged writes: a quorum read must refuse, never
  answer from them. The old node is of the writer's local AZ (the first AZ, "a") at least half
  the time.

`generate_plan` reserves for each aimed family in `faults` a window of its own (with
probability `AIM_PROBABILITY`) at a random time: random episodes that start before the window end
before it, and later ones overlap the aimed episode only as locks and the budget allow. The
aimed families are also drawn at random like any other.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from engine.core.constants import READ_QUORUM, REPLICAS, WRITE_QUORUM
from engine.errors import InvalidArgument

WRITER = "writer"

#: Node ids and their AZs when the caller names none: two nodes in each of three AZs.
DEFAULT_NODES: tuple[tuple[str, str], ...] = (
    ("n1", "a"),
    ("n2", "a"),
    ("n3", "b"),
    ("n4", "b"),
    ("n5", "c"),
    ("n6", "c"),
)

#: Segments that may be impaired at once: an AZ and one more node. Writes may stop there
#: (fewer than WRITE_QUORUM left) but reads and recovery still have a read quorum.
IMPAIRED_MAX = 3
if not (REPLICAS - IMPAIRED_MAX >= READ_QUORUM):
    raise AssertionError("the failure budget must leave a read quorum")
if not (REPLICAS - IMPAIRED_MAX < WRITE_QUORUM <= REPLICAS - (IMPAIRED_MAX - 1)):
    raise AssertionError("the budget is 'AZ+1': one node fewer would keep writes going")

#: fault kind -> the kind that heals it (None: the event heals itself).
HEALED_BY: dict[str, str | None] = {
    "kill": "restart",
    "pause": "resume",
    "partition": "heal",
    "one_way": "heal",
    "az_down": "az_up",
    "corrupt": "scrub",
    "writer_crash": None,
    "slow": "unslow",
    "drop": "clear",
    "duplicate": "clear",
    "reorder": "clear",
    "delay": "clear",
    "replace": "replace_done",
    "writer_kill": "reader_add",
    "writer_pause": "writer_resume",
    "writer_partition": "heal",
    "reader_kill": "reader_restart",
}
HEAL_KINDS: frozenset[str] = frozenset(k for k in HEALED_BY.values() if k is not None)
FAULT_KINDS: frozenset[str] = frozenset(HEALED_BY)
KINDS: frozenset[str] = FAULT_KINDS | HEAL_KINDS
MESSAGE_KINDS: tuple[str, ...] = ("drop", "duplicate", "reorder", "delay")
#: Faults of the writer process that a reader must answer by taking over (see the docstring).
WRITER_FAULT_KINDS: frozenset[str] = frozenset(("writer_kill", "writer_pause", "writer_partition"))

#: Fault names as the CLI spells them (`sixfold chaos --faults kill,az+1,net`).
FAULT_NAMES: tuple[str, ...] = (
    "kill",
    "pause",
    "partition",
    "az",
    "az+1",
    "corrupt",
    "writer-crash",
    "slow",
    "net",
    "isolate",
    "replace",
    "one-way",
    "writer-kill",
    "writer-pause",
    "writer-partition",
    "reader-kill",
)
#: Families that need reader instances and real processes: the cluster target only.
CLUSTER_ONLY_NAMES: tuple[str, ...] = ("writer-kill", "writer-pause", "writer-partition", "reader-kill")
#: Families every target can apply but the in-process targets draw only when named: `one-way`
#: came after the seeds people keep, and a default that grew would give every one of them a new
#: plan (the generator draws a family from the sorted names). The cluster target draws them all.
OPT_IN_NAMES: tuple[str, ...] = ("one-way",)
#: What an in-process run draws from when it names no faults.
DEFAULT_FAULTS: tuple[str, ...] = tuple(n for n in FAULT_NAMES if n not in CLUSTER_ONLY_NAMES + OPT_IN_NAMES)
#: Reader instances a plan with reader families starts with when the caller names none: one may
#: be promoted while the other is killed, and a candidate still remains... until it is added back.
READERS_DEFAULT = 2
#: After a writer fault is healed, a write quorum stays whole this long more (plan seconds), for
#: the takeover and the old writer's step-down, which real processes may finish late.
TAKEOVER_GRACE_S = 5.0
#: The most reader instances a plan may name (engine.head.replica.READERS_MAX; a test keeps
#: them equal: this module imports nothing above engine.core).
READERS_MAX = 15
#: Families placed on purpose before the random episodes (see "Aimed episodes" above).
AIMED_NAMES: tuple[str, ...] = ("isolate", "replace")
#: How often a plan that may have an aimed family gets its aimed episode.
AIM_PROBABILITY: dict[str, float] = {"isolate": 0.9, "replace": 0.6}
#: How many nodes the `isolate` family leaves the writer with: the most that still lack a
#: write quorum (the other side keeps one).
ISOLATE_MINORITY = 2
if not (ISOLATE_MINORITY < WRITE_QUORUM <= REPLICAS - ISOLATE_MINORITY):
    raise AssertionError("the isolated writer's side lacks a write quorum and the other side has one")

#: The run starts with this fraction of quiet time (the workload warms up) and ends with
#: TAIL_FRACTION of healing time (repair catches up before the final reads).
LEAD_FRACTION = 0.05
TAIL_FRACTION = 0.25
#: An episode lasts this fraction of the active window, at least and at most.
EPISODE_FRACTION_MIN = 0.05
EPISODE_FRACTION_MAX = 0.30
#: Mean gap between episode starts, as a fraction of the active window.
GAP_FRACTION_MEAN = 0.08
#: Bounds on the generator's loops: episodes tried, and targets tried per episode.
EPISODES_MAX = 256
ATTEMPTS_MAX = 4
DURATION_S_MAX = 7 * 24 * 3600.0


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise InvalidArgument(message)


def _freeze(value: Any) -> Any:
    """Turn JSON-like parameter values into hashable ones (lists become tuples)."""
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    _require(
        value is None or isinstance(value, (bool, int, float, str)),
        f"a fault parameter must be a number, string, bool or a list of them, not {value!r}",
    )
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


def _ms(t: float) -> float:
    return round(t, 3)


@dataclass(frozen=True)
class FaultEvent:
    """At `at_s` seconds into the run, do `kind` to `targets`.

    `params` is a sorted tuple of (name, value) pairs; a mapping is accepted and normalised, so
    `FaultEvent(1.0, "slow", ("n1",), {"delay_ms": 50})` works. Values are JSON scalars or
    (nested) tuples of them."""

    at_s: float
    kind: str
    targets: tuple[str, ...] = ()
    params: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        _require(self.kind in KINDS, f"unknown fault kind {self.kind!r}; known: {sorted(KINDS)}")
        at_s = float(self.at_s)
        _require(math.isfinite(at_s) and at_s >= 0.0, f"at_s must be a time >= 0, not {self.at_s!r}")
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        _require(all(isinstance(t, str) for t in targets), f"targets must be names: {targets!r}")
        items = self.params.items() if isinstance(self.params, Mapping) else self.params
        params = tuple(sorted((str(k), _freeze(v)) for k, v in items))
        names = [k for k, _ in params]
        _require(len(names) == len(set(names)), f"a parameter is given twice: {names}")
        object.__setattr__(self, "at_s", at_s)
        object.__setattr__(self, "targets", targets)
        object.__setattr__(self, "params", params)

    def param(self, name: str, default: Any = None) -> Any:
        for k, v in self.params:
            if k == name:
                return v
        return default

    def to_dict(self) -> dict[str, Any]:
        return {
            "at_s": self.at_s,
            "kind": self.kind,
            "targets": list(self.targets),
            "params": {k: _thaw(v) for k, v in self.params},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FaultEvent":
        _require(isinstance(d, Mapping), f"a fault event is a JSON object, not {d!r}")
        return cls(
            at_s=d["at_s"],
            kind=d["kind"],
            targets=tuple(d.get("targets", ())),
            params=d.get("params", {}),
        )


def _event_order(event: FaultEvent) -> tuple[float, int]:
    # Healing first at equal times: the budget is computed in this order, and a runner that
    # restarts n1 and kills n2 at the same instant never has both down.
    return (event.at_s, 0 if event.kind in HEAL_KINDS else 1)


@dataclass(frozen=True)
class FaultPlan:
    """A whole run's faults: `events` sorted by time, all within `duration_s`.

    `nodes` maps node id to AZ (a mapping is accepted and normalised to sorted pairs); `faults`
    records the CLI fault names it was generated from; `unbounded` says whether the failure
    budget was lifted (a checker then asserts safety only)."""

    seed: int
    duration_s: float
    events: tuple[FaultEvent, ...] = ()
    nodes: tuple[tuple[str, str], ...] = DEFAULT_NODES
    faults: tuple[str, ...] = ()
    unbounded: bool = False
    #: reader instances the run starts with (the cluster target; writer faults need one)
    readers: int = 0

    def __post_init__(self) -> None:
        _require(isinstance(self.readers, int) and not isinstance(self.readers, bool)
                 and 0 <= self.readers <= READERS_MAX, f"readers must be an int in 0..{READERS_MAX}, not {self.readers!r}")
        duration_s = float(self.duration_s)
        _require(0.0 < duration_s <= DURATION_S_MAX, f"duration_s must be in (0, {DURATION_S_MAX}]")
        nodes_items = self.nodes.items() if isinstance(self.nodes, Mapping) else self.nodes
        nodes = tuple(sorted((str(n), str(az)) for n, az in nodes_items))
        _require(len({n for n, _ in nodes}) == len(nodes), "a node is named twice")
        _require(all(n != WRITER for n, _ in nodes), f"{WRITER!r} is the writer, not a node")
        events = tuple(self.events)
        _require(all(isinstance(e, FaultEvent) for e in events), "events must be FaultEvents")
        _require(
            all(_event_order(a) <= _event_order(b) for a, b in zip(events, events[1:])),
            "events must be sorted by time (healing first at equal times)",
        )
        _require(all(e.at_s <= duration_s for e in events), "an event lies after the end of the run")
        object.__setattr__(self, "duration_s", duration_s)
        object.__setattr__(self, "nodes", nodes)
        object.__setattr__(self, "events", events)
        object.__setattr__(self, "faults", tuple(sorted(self.faults)))
        object.__setattr__(self, "seed", int(self.seed))
        object.__setattr__(self, "unbounded", bool(self.unbounded))

    def node_azs(self) -> dict[str, str]:
        return dict(self.nodes)

    @property
    def healed_at_s(self) -> float:
        """When the last event happens (every fault of a valid plan is healed by then)."""
        last = 0.0
        for e in self.events:
            end = e.at_s + float(e.param("down_s", 0.0)) if e.kind == "writer_crash" else e.at_s
            last = max(last, end)
        return last

    def describe(self) -> str:
        """The plan for people: a header with the seed (to replay it) and one line per event."""
        head = (
            f"fault plan seed={self.seed} duration_s={self.duration_s} faults={','.join(self.faults) or '-'} "
            f"unbounded={self.unbounded} readers={self.readers} events={len(self.events)} max_impaired={max_impaired(self)} "
            f"healed_at_s={self.healed_at_s}"
        )
        lines = [head]
        for e in self.events:
            params = " ".join(f"{k}={v}" for k, v in e.params)
            lines.append(f"  {e.at_s:>10.3f}s {e.kind:<12} {','.join(e.targets) or '-':<20} {params}".rstrip())
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "duration_s": self.duration_s,
            "nodes": dict(self.nodes),
            "faults": list(self.faults),
            "unbounded": self.unbounded,
            "events": [e.to_dict() for e in self.events],
        } | ({"readers": self.readers} if self.readers else {})

    def to_json(self) -> str:
        """Deterministic JSON: sorted keys, so equal plans give equal text."""
        return json.dumps(self.to_dict(), sort_keys=True, indent=1)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FaultPlan":
        _require(isinstance(d, Mapping), "a fault plan is a JSON object")
        return cls(
            seed=d["seed"],
            duration_s=d["duration_s"],
            events=tuple(FaultEvent.from_dict(e) for e in d.get("events", ())),
            nodes=d.get("nodes", dict(DEFAULT_NODES)),
            faults=tuple(d.get("faults", ())),
            unbounded=d.get("unbounded", False),
            readers=d.get("readers", 0),
        )

    @classmethod
    def from_json(cls, text: str) -> "FaultPlan":
        try:
            d = json.loads(text)
        except ValueError as e:
            raise InvalidArgument(f"a fault plan must be JSON: {e}") from None
        return cls.from_dict(d)


# --------------------------------------------------------------------------------------------
# Replay: what is impaired after each event. The same rules serve validation and the generator.


def holds_write_quorum(nodes: Iterable[str], quorum_sets: Iterable[frozenset[str]]) -> bool:
    """True if `nodes` include WRITE_QUORUM members of every quorum set.

    The rule of `engine.core.quorum.has_write_quorum`, over plain sets: a plan may name nodes
    of any count, while a core `Membership` has exactly six."""
    s = set(nodes)
    return all(len(s & q) >= WRITE_QUORUM for q in quorum_sets)


def cut_off(groups: Iterable[Iterable[str]], present: Iterable[str], quorum_sets: Iterable[frozenset[str]]
            ) -> tuple[frozenset[str], bool]:
    """Under a partition: (the nodes it impairs, whether it isolates the writer instead).

    Nodes not on the writer's side are cut off. When one group without the writer holds a write
    quorum of every quorum set, its nodes are whole and reach each other: only the writer is
    cut off (with a minority), and those nodes are not impaired. Nodes a partition does not
    name reach everyone."""
    groups = [set(g) for g in groups]
    if not groups:
        return frozenset(), False
    present = set(present)
    quorum_sets = tuple(quorum_sets)
    named = set().union(*groups)
    writer_side = next((g for g in groups if WRITER in g), set())
    cut = {n for n in present & named if n not in writer_side}
    for g in groups:
        if WRITER not in g and holds_write_quorum(g & present, quorum_sets):
            return frozenset(cut - g), True
    return frozenset(cut), False


def one_way_cut(drops: Iterable[Iterable[str]], present: Iterable[str]) -> frozenset[str]:
    """Under one-way drops: the nodes they impair, every node at either end of a dropped
    direction to or from the writer (see the module docstring's budget)."""
    present = set(present)
    return frozenset(n for pair in drops for n in pair if n != WRITER and n in present)


#: The shapes of network faults (`network_shape`): what issue 15 asks a real-network run to cut.
NETWORK_SHAPES: tuple[str, ...] = ("az", "node", "minority", "writer-minority", "one-way")


def network_shape(event: FaultEvent, azs: Mapping[str, str]) -> str | None:
    """Which network fault a `partition` or `one_way` event is, for people and tests (None for
    other kinds). `azs` maps the nodes that exist at the event to their AZs.

    "one-way"; "node": one node cut off from the writer; "az": one whole AZ cut off, the rest
    with the writer; "minority": a minority of the nodes cut off from a writer that keeps a
    write quorum; "writer-minority": the writer left with fewer nodes than a write quorum (the
    `isolate` family, a swap's second half)."""
    if event.kind == "one_way":
        return "one-way"
    if event.kind != "partition":
        return None
    groups = [set(g) for g in event.param("groups", ())]
    writer_side = next((g for g in groups if WRITER in g), {WRITER})
    cut = {n for n in azs if n not in writer_side}
    if len(cut) == 1:
        return "node"
    cut_azs = {azs[n] for n in cut}
    if len(cut_azs) == 1 and cut == {n for n, az in azs.items() if az in cut_azs}:
        return "az"
    return "writer-minority" if len(azs) - len(cut) < WRITE_QUORUM else "minority"


@dataclass(frozen=True)
class Health:
    at_s: float
    kind: str
    down: frozenset[str]
    paused: frozenset[str]
    isolated: frozenset[str]  # cut off from the writer by a partition or a one-way drop (`cut_off`, `one_way_cut`)
    corrupted: frozenset[str]
    dropping: frozenset[str]
    other_faults: frozenset[str]  # slow, duplicate, reorder, delay: timing only
    writer_down_until_s: float
    #: new nodes of a membership change under way: they hold nothing until they have rebuilt
    rebuilding: frozenset[str] = frozenset()
    #: the membership's quorum sets (two while a change is under way)
    quorum_sets: tuple[frozenset[str], ...] = ()
    #: a partition cuts the writer off with a minority (the other side holds a write quorum)
    writer_isolated: bool = False
    #: every node that exists: members, and the new node of a change under way
    present: frozenset[str] = frozenset()
    #: the writer fault in force ("writer_kill", "writer_pause", "writer_partition") or ""
    writer_fault: str = ""
    #: reader slots killed and not yet restarted
    readers_down: frozenset[int] = frozenset()
    #: live reader candidates: the plan's readers, minus those down, minus one that a writer
    #: fault not yet healed has used up by taking over
    candidates: int = 0

    @property
    def impaired(self) -> frozenset[str]:
        return self.down | self.paused | self.isolated | self.corrupted | self.dropping | self.rebuilding

    @property
    def impaired_max(self) -> int:
        """The most impaired segments of one quorum set: what the budget bounds."""
        impaired = self.impaired
        return max((len(impaired & q) for q in self.quorum_sets), default=len(impaired))

    @property
    def healthy(self) -> bool:
        return not (self.impaired or self.other_faults or self.writer_isolated or self.writer_fault or self.readers_down)


#: the healing event of each writer fault but `heal` (which also heals a partition)
_WRITER_HEALS = {"reader_add": "writer_kill", "writer_resume": "writer_pause"}


def replay(plan: FaultPlan) -> tuple[Health, ...]:
    """Apply the events in order and return the cluster's health after each one."""
    azs = plan.node_azs()
    members: frozenset[str] = frozenset(azs)
    next_members: frozenset[str] | None = None
    present: set[str] = set(azs)
    rebuilding: set[str] = set()
    down: set[str] = set()
    az_down: set[str] = set()
    paused: set[str] = set()
    groups: tuple = ()
    drops: tuple = ()  # one-way drops: (sender, receiver) pairs
    corrupted: set[str] = set()
    message: dict[str, set[str]] = {k: set() for k in MESSAGE_KINDS}
    slowed: set[str] = set()
    writer_down_until_s = 0.0
    writer_fault = ""
    writer_partitioned = False
    readers_down: set[int] = set()
    out: list[Health] = []
    for e in plan.events:
        targets = set(e.targets)
        if e.kind in WRITER_FAULT_KINDS:
            writer_fault = e.kind
            writer_partitioned = writer_partitioned or e.kind == "writer_partition"
        elif e.kind in _WRITER_HEALS:
            if writer_fault == _WRITER_HEALS[e.kind]:
                writer_fault = ""
        elif e.kind == "reader_kill":
            readers_down.add(int(e.param("slot", 0)))
        elif e.kind == "reader_restart":
            readers_down.discard(int(e.param("slot", 0)))
        elif e.kind == "kill":
            down |= targets
        elif e.kind == "restart":
            down -= targets
        elif e.kind == "pause":
            paused |= targets
        elif e.kind == "resume":
            paused -= targets
        elif e.kind in ("az_down", "az_up"):
            # The targets are the AZ's nodes when the event was planned; a plan written by hand
            # may name only the AZ, which then means its nodes at that time.
            nodes = targets or {n for n in present if azs.get(n) == e.param("az")}
            if e.kind == "az_down":
                az_down |= nodes
            else:
                az_down -= nodes
        elif e.kind == "partition":  # a network fault replaces the one in force
            groups, drops = tuple(e.param("groups", ())), ()
        elif e.kind == "one_way":
            groups, drops = (), tuple(e.param("drops", ()))
        elif e.kind == "heal":
            groups, drops = (), ()
            writer_partitioned = False
            if writer_fault == "writer_partition":
                writer_fault = ""
        elif e.kind == "corrupt":
            corrupted |= targets
        elif e.kind == "scrub":
            corrupted -= targets
        elif e.kind in MESSAGE_KINDS:
            message[e.kind] |= targets
        elif e.kind == "clear":
            for s in message.values():
                if targets:
                    s -= targets
                else:
                    s.clear()
        elif e.kind == "slow":
            slowed |= targets
        elif e.kind == "unslow":
            slowed -= targets
        elif e.kind == "writer_crash":
            writer_down_until_s = max(writer_down_until_s, e.at_s + float(e.param("down_s", 0.0)))
        elif e.kind == "replace":
            old, new = (e.targets[0] if e.targets else None), e.param("new")
            if old in azs and isinstance(new, str) and next_members is None:
                azs[new] = azs[old]
                present.add(new)
                rebuilding.add(new)
                next_members = (members - {old}) | {new}
        elif e.kind == "replace_done":
            old, new = (e.targets[0] if e.targets else None), e.param("new")
            if next_members is not None and new in next_members and old in members:
                members, next_members = next_members, None
                rebuilding.discard(new)
                # The old node is retired: whatever was wrong with it no longer matters.
                present.discard(old)
                for s in (down, az_down, paused, corrupted, slowed, *message.values()):
                    s.discard(old)
        else:  # pragma: no cover - FaultEvent validates kinds
            raise AssertionError(f"unhandled kind {e.kind}")
        quorum_sets = (members,) if next_members is None else (members, next_members)
        isolated, writer_isolated = cut_off(groups, present, quorum_sets)
        isolated |= one_way_cut(drops, present)
        others = slowed | message["duplicate"] | message["reorder"] | message["delay"]
        out.append(
            Health(
                at_s=e.at_s,
                kind=e.kind,
                down=frozenset(down | az_down),
                paused=frozenset(paused),
                isolated=isolated,
                corrupted=frozenset(corrupted),
                dropping=frozenset(message["drop"]),
                other_faults=frozenset(others),
                writer_down_until_s=writer_down_until_s,
                rebuilding=frozenset(rebuilding),
                quorum_sets=quorum_sets,
                writer_isolated=writer_isolated or writer_partitioned,
                present=frozenset(present),
                writer_fault=writer_fault,
                readers_down=frozenset(readers_down),
                candidates=plan.readers - len(readers_down) - (1 if writer_fault else 0),
            )
        )
    return tuple(out)


def max_impaired(plan: FaultPlan) -> int:
    """The most segments of one quorum set impaired at any instant of the plan."""
    return max((h.impaired_max for h in replay(plan)), default=0)


def validate_plan(plan: FaultPlan) -> list[str]:
    """Problems with a plan, as sentences; an empty list means the plan is fit to run."""
    problems: list[str] = []
    health = replay(plan)
    present = set(plan.node_azs())  # the nodes that exist before each event
    azs = set(plan.node_azs().values())
    known = set(present)  # every node id ever used: a new node needs a new id
    changing: tuple[str, str] | None = None
    before = Health(0.0, "", *(frozenset(),) * 6, 0.0, candidates=plan.readers)  # before the first event
    for e, h in zip(plan.events, health):
        problems += _reader_problems(plan, e, before)
        before = h
        endpoints = present | {WRITER}
        unknown = [t for t in e.targets if t not in endpoints]
        if unknown:
            problems.append(f"{e.kind} at {e.at_s}s names unknown (or retired) endpoints {unknown}")
        if e.kind == "partition":
            groups = e.param("groups", ())
            named = [m for g in groups for m in g]
            if sorted(named) != sorted(endpoints):
                problems.append(f"partition at {e.at_s}s must name every endpoint exactly once")
        if e.kind == "one_way":
            drops = e.param("drops", ())
            pairs_ok = bool(drops) and all(
                isinstance(d, tuple) and len(d) == 2 and (d[0] == WRITER) != (d[1] == WRITER) for d in drops)
            ends = sorted(n for d in drops for n in d if n != WRITER) if pairs_ok else []
            if not pairs_ok or ends != sorted(set(ends)) or ends != sorted(e.targets):
                problems.append(f"one_way at {e.at_s}s must name (sender, receiver) pairs between the writer and "
                                "each of its targets, one pair per target")
        if e.kind in ("az_down", "az_up") and e.param("az") not in azs:
            problems.append(f"{e.kind} at {e.at_s}s names unknown AZ {e.param('az')!r}")
        if e.kind == "replace":
            new = e.param("new")
            if changing is not None:
                problems.append(f"replace at {e.at_s}s: the change {changing[0]} -> {changing[1]} is still under way")
            elif len(e.targets) != 1 or not isinstance(new, str) or not new or new == WRITER or new in known:
                problems.append(f"replace at {e.at_s}s names one node to replace and a new, unused node id")
            else:
                changing = (e.targets[0], new)
                known.add(new)
        if e.kind == "replace_done":
            if changing != ((e.targets or (None,))[0], e.param("new")):
                problems.append(f"replace_done at {e.at_s}s does not finish the change under way ({changing})")
            changing = None
        present = set(h.present)
    if health and not health[-1].healthy:
        h = health[-1]
        problems.append(
            f"faults are not healed by the end: impaired {sorted(h.impaired)}, "
            f"slow or message faults on {sorted(h.other_faults)}"
            + (", the writer is isolated" if h.writer_isolated else "")
            + (f", writer fault {h.writer_fault} not healed" if h.writer_fault else "")
            + (f", reader slots {sorted(h.readers_down)} down" if h.readers_down else "")
        )
    if plan.healed_at_s >= plan.duration_s and plan.events:
        problems.append("the plan must end with a healing period (events stop before the end)")
    if not plan.unbounded:
        for h in health:
            if h.writer_fault and h.impaired_max > REPLICAS - WRITE_QUORUM:
                problems.append(
                    f"after {h.kind} at {h.at_s}s the writer fault {h.writer_fault} is in force while {h.impaired_max} "
                    f"segments of a quorum set are impaired: no write quorum is whole, so no reader can take over")
                break
        for h in health:
            if h.impaired_max > IMPAIRED_MAX:
                problems.append(
                    f"after {h.kind} at {h.at_s}s {h.impaired_max} segments of a quorum set are impaired "
                    f"({sorted(h.impaired)}), more than the budget of {IMPAIRED_MAX}"
                )
                break
    return problems


def _reader_problems(plan: FaultPlan, e: FaultEvent, before: Health) -> list[str]:
    """What is wrong with a writer or reader event, given the health just before it."""
    k, at = e.kind, e.at_s
    if k in WRITER_FAULT_KINDS:
        if e.targets != (WRITER,):
            return [f"{k} at {at}s targets the writer: ('writer',)"]
        if before.writer_fault:
            return [f"{k} at {at}s: the writer fault {before.writer_fault} is not healed yet"]
        if before.candidates < 1:
            return [f"{k} at {at}s leaves no reader to take over ({plan.readers} readers, "
                    f"slots {sorted(before.readers_down)} down): a writer fault needs a live candidate"]
    elif k in _WRITER_HEALS and before.writer_fault != _WRITER_HEALS[k]:
        return [f"{k} at {at}s heals no {_WRITER_HEALS[k]} (the writer fault in force: {before.writer_fault or 'none'})"]
    elif k in ("reader_kill", "reader_restart"):
        slot = e.param("slot")
        if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < plan.readers:
            return [f"{k} at {at}s names reader slot {slot!r}; the plan has {plan.readers} readers (slots 0..{plan.readers - 1})"]
        if (k == "reader_kill") == (slot in before.readers_down):
            return [f"{k} at {at}s: reader slot {slot} is {'down' if slot in before.readers_down else 'up'} already"]
    return []


def pick_corruption(event: FaultEvent, record_count: int, record_bytes: int) -> tuple[int, tuple[int, ...]]:
    """Which record (index into the node's records in key order) and which bits to flip.

    The plan cannot know what a node stores, so a `corrupt` event carries a seed and the runner
    calls this with what it found: the same plan and the same store corrupt the same bits."""
    if event.kind != "corrupt":
        raise AssertionError(f"pick_corruption wants a corrupt event, not {event.kind}")
    if not (record_count > 0 and record_bytes > 0):
        raise AssertionError("there must be a record with bytes to corrupt")
    rng = random.Random(int(event.param("seed", 0)))
    index = rng.randrange(record_count)
    bits = max(1, int(event.param("bits", 1)))
    offsets = sorted(rng.sample(range(record_bytes * 8), min(bits, record_bytes * 8)))
    return index, tuple(offsets)


# --------------------------------------------------------------------------------------------
# The generator.

#: An aimed episode lasts this fraction of the active window.
AIM_FRACTION_MIN = 0.15
AIM_FRACTION_MAX = 0.30
#: Lock intervals end here at the latest (a retired node is locked for ever).
_FOREVER_S = DURATION_S_MAX + 1.0
#: Per-node resources: a node's process (kill, pause, corruption), its links' message faults,
#: its slowness. A retired or rebuilding node holds all of them.
_NODE_RESOURCES = ("proc", "net", "slow")


@dataclass(frozen=True)
class _Episode:
    events: tuple[FaultEvent, ...]
    locks: tuple[tuple[str, float, float], ...]  # (resource, from_s, to_s), closed interval
    impaired: tuple[tuple[str, float, float], ...] = field(default=())  # (node, from_s, to_s), half-open
    #: a membership change: (from_s, to_s, old, new)
    change: tuple[float, float, str, str] | None = None
    #: (from_s, to_s), half-open: a write quorum of every quorum set must stay whole meanwhile
    #: (a writer fault: a reader can take over only with one)
    quorum: tuple[tuple[float, float], ...] = field(default=())


def _quorum_sets_at(t: float, initial: frozenset[str], changes: list[tuple[float, float, str, str]]) -> tuple[frozenset[str], ...]:
    """The quorum sets at instant `t`, given the changes (which never overlap) sorted by start."""
    current = initial
    for s, e, old, new in changes:
        if s > t:
            break
        following = (current - {old}) | {new}
        if t < e:
            return (current, following)
        current = following
    return (current,)


def _fits(candidate: _Episode, accepted: list[_Episode], budget: int, initial: frozenset[str],
          quorum_budget: int | None = None) -> bool:
    """Locks free and the budget kept at every instant; within an episode's `quorum` windows
    the budget is `quorum_budget` (None: no such windows are kept, as in an unbounded plan)."""
    for resource, s, e in candidate.locks:
        for other in accepted:
            for r2, s2, e2 in other.locks:
                if r2 == resource and s <= e2 and s2 <= e:
                    return False
    intervals = [iv for ep in accepted for iv in ep.impaired] + list(candidate.impaired)
    windows = [w for ep in accepted for w in ep.quorum] + list(candidate.quorum) if quorum_budget is not None else []
    changes = sorted(ep.change for ep in accepted + [candidate] if ep.change is not None)
    # The count of impaired nodes only grows at an interval's start (a change's new node starts
    # rebuilding when the change starts), and the budget only shrinks at a window's start, so
    # checking at every such start checks every instant.
    for p in [p for _, p, _ in intervals] + [p for p, _ in windows]:
        nodes = {n for n, s, e in intervals if s <= p < e}
        limit = min(budget, quorum_budget) if any(s <= p < e for s, e in windows) else budget
        if any(len(nodes & q) > limit for q in _quorum_sets_at(p, initial, changes)):
            return False
    return True


class _Builder:
    """Draws one episode of a named fault from the rng; all choices go through `self.rng`.

    Episodes are built in order of their start, and `changes` holds the membership changes
    accepted so far, so `usable(s)` knows which nodes exist at `s`."""

    def __init__(self, rng: random.Random, nodes: Mapping[str, str], unbounded: bool, readers: int = 0) -> None:
        self.rng = rng
        self.readers = readers
        self.initial = frozenset(nodes)
        self.az_of = dict(nodes)
        self.azs = sorted(set(nodes.values()))
        self.unbounded = unbounded
        self.changes: list[tuple[float, float, str, str]] = []

    def accept(self, episode: _Episode) -> None:
        if episode.change is not None:
            s, e, old, new = episode.change
            self.changes.append(episode.change)
            self.az_of[new] = self.az_of[old]

    def present(self, s: float) -> list[str]:
        """Nodes that exist at `s`: members, and a change's new node while it rebuilds."""
        out = set(self.initial)
        for cs, ce, old, new in self.changes:
            if cs <= s:
                out.add(new)
            if ce <= s:
                out.discard(old)
        return sorted(out)

    def usable(self, s: float) -> list[str]:
        """Nodes an episode starting at `s` may name: not retired, not rebuilding, not about to
        be retired by a change that began before `s`."""
        out = set(self.initial)
        for cs, ce, old, new in self.changes:
            if cs <= s:
                out.discard(old)
            if ce <= s:
                out.add(new)
        return sorted(out)

    def az_nodes(self, az: str, s: float) -> list[str] | None:
        """The AZ's nodes at `s`, or None while a change involves it (it is not a whole AZ)."""
        usable = [n for n in self.usable(s) if self.az_of[n] == az]
        present = [n for n in self.present(s) if self.az_of[n] == az]
        return usable if usable == present and usable else None

    def steady(self, s: float) -> list[str] | None:
        """The nodes at `s` if no change is under way (then every node that exists is usable)."""
        usable = self.usable(s)
        return usable if usable == self.present(s) else None

    def new_id(self) -> str:
        used = set(self.initial) | {new for _, _, _, new in self.changes}
        k = 1
        while f"n{k}" in used:
            k += 1
        return f"n{k}"

    def count(self, bounded_choices: tuple[int, ...], unbounded_max: int, available: int) -> int:
        if self.unbounded:
            return self.rng.randint(1, min(unbounded_max, available))
        return min(self.rng.choice(bounded_choices), available)

    def pair(self, fault: str, heal: str, targets: list[str], s: float, e: float, impairs: bool,
             params: Mapping[str, Any] | None = None, lock: str = "proc",
             heal_params: Mapping[str, Any] | None = None) -> _Episode:
        ts = tuple(sorted(targets))
        return _Episode(
            events=(FaultEvent(s, fault, ts, params or {}), FaultEvent(e, heal, ts, heal_params or {})),
            locks=tuple((f"{lock}:{t}", s, e) for t in ts),
            impaired=tuple((t, s, e) for t in ts) if impairs else (),
        )

    def build(self, name: str, s: float, e: float) -> _Episode | None:
        rng = self.rng
        nodes = self.usable(s)
        if not nodes:
            return None
        if name in ("kill", "pause"):
            targets = rng.sample(nodes, self.count((1, 1, 1, 2, 3), 5, len(nodes)))
            heal = "restart" if name == "kill" else "resume"
            return self.pair(name, heal, targets, s, e, impairs=True)
        if name == "partition":
            return self.partition(s, e)
        if name == "one-way":
            return self.one_way(s, e)
        if name == "az":
            az = rng.choice(self.azs)
            members = self.az_nodes(az, s)
            if members is None:
                return None
            params = {"az": az}
            return self.pair("az_down", "az_up", members, s, e, True, params, heal_params=params)
        if name == "az+1":
            return self.az_plus_one(s, e)
        if name == "corrupt":
            node = rng.choice(nodes)
            params = {"seed": rng.getrandbits(32), "bits": rng.randint(1, 3)}
            return self.pair("corrupt", "scrub", [node], s, e, True, params)
        if name == "writer-crash":
            down_s = _ms(rng.uniform(0.1, 0.5) * (e - s))
            if down_s <= 0.0:
                return None
            event = FaultEvent(s, "writer_crash", (WRITER,), {"down_s": down_s})
            return _Episode(events=(event,), locks=((WRITER, s, e),))
        if name == "slow":
            node = rng.choice(nodes)
            params = {"delay_ms": rng.choice((5, 20, 50, 200))}
            return self.pair("slow", "unslow", [node], s, e, False, params, lock="slow")
        if name == "net":
            kind = rng.choice(MESSAGE_KINDS)
            targets = rng.sample(nodes, self.count((1, 1, 2), 4, len(nodes)))
            params: dict[str, Any] = {"probability": _ms(rng.uniform(0.05, 0.5))}
            if kind == "delay":
                params["delay_ms"] = rng.choice((5, 20, 50, 200))
            # Only a lost message can leave a segment behind; the others change timing only.
            return self.pair(kind, "clear", targets, s, e, kind == "drop", params, lock="net")
        if name in ("writer-kill", "writer-pause", "writer-partition"):
            return self.writer_fault(name, s, e)
        if name == "reader-kill":
            # At most readers - 1 slots, so one reader is always alive to take over (`fits` keeps
            # slots from overlapping); the runner maps a slot to one of the readers alive then.
            if self.readers < 2:
                return None
            slot = rng.randrange(self.readers - 1)
            return _Episode(
                events=(FaultEvent(s, "reader_kill", (), {"slot": slot}), FaultEvent(e, "reader_restart", (), {"slot": slot})),
                locks=((f"reader:{slot}", s, e),),
            )
        if name == "isolate":
            return self.isolate(s, e)
        if name == "replace":
            return self.replace(s, e)
        raise AssertionError(f"no builder for fault {name!r}")

    def writer_fault(self, name: str, s: float, e: float) -> _Episode | None:
        """A fault of the writer process that a reader must answer by taking over. It holds the
        writer (no other writer fault, crash or aimed episode meanwhile), the membership (the
        writer runs a change: the cluster target lets one finish first) and, for the partition,
        the partition (one set of partition rules at a time)."""
        if self.readers < 1:
            return None
        kind = name.replace("-", "_")
        heal = {"writer_kill": "reader_add", "writer_pause": "writer_resume", "writer_partition": "heal"}[kind]
        locks = [(WRITER, s, e), ("membership", s, e)]
        if kind == "writer_partition":
            locks.append(("partition", s, e))
        return _Episode(events=(FaultEvent(s, kind, (WRITER,)), FaultEvent(e, heal, ())), locks=tuple(locks),
                        quorum=((s, _ms(e + TAKEOVER_GRACE_S)),))

    def partition(self, s: float, e: float) -> _Episode | None:
        rng = self.rng
        nodes = self.steady(s)
        if nodes is None:
            return None  # a partition names every node that exists; none is joining or leaving
        shape = rng.choice(("minority", "az", "split"))
        if shape == "az":
            az = rng.choice(self.azs)
            isolated = [n for n in nodes if self.az_of[n] == az]
        elif shape == "split":
            # The writer keeps only half the nodes (3 of 6 when bounded, fewer when not).
            keep = rng.randint(0, 2) if self.unbounded else max(0, len(nodes) - IMPAIRED_MAX)
            isolated = sorted(set(nodes) - set(rng.sample(nodes, min(keep, len(nodes)))))
        else:
            isolated = sorted(rng.sample(nodes, self.count((1, 1, 2, 3), 6, len(nodes))))
        if not isolated:
            return None
        writer_side = tuple(sorted([WRITER] + [n for n in nodes if n not in isolated]))
        if rng.random() < 0.5:
            other_sides = (tuple(isolated),)  # the cut-off nodes still reach each other
        else:
            other_sides = tuple((n,) for n in isolated)  # every cut-off node alone
        groups = (writer_side,) + other_sides
        quorum_sets = (frozenset(nodes),)
        impaired, _ = cut_off(groups, nodes, quorum_sets)
        return _Episode(
            events=(
                FaultEvent(s, "partition", tuple(isolated), {"groups": groups}),
                FaultEvent(e, "heal", ()),
            ),
            locks=(("partition", s, e),),
            impaired=tuple((n, s, e) for n in sorted(impaired)),
        )

    def one_way(self, s: float, e: float) -> _Episode | None:
        """Links between the writer and one to three nodes drop one way, each in a direction
        of its own: what the writer sends a node is lost, or what a node sends the writer. Each
        such node is impaired (the budget), so with an AZ down only one more may be named; the
        network rules are one set at a time (the partition lock)."""
        rng = self.rng
        nodes = self.usable(s)
        targets = sorted(rng.sample(nodes, self.count((1, 1, 2, 3), 6, len(nodes))))
        if not targets:
            return None
        drops = tuple((WRITER, n) if rng.random() < 0.5 else (n, WRITER) for n in targets)
        return _Episode(
            events=(FaultEvent(s, "one_way", tuple(targets), {"drops": drops}), FaultEvent(e, "heal", ())),
            locks=(("partition", s, e),) + tuple((f"net:{n}", s, e) for n in targets),
            impaired=tuple((n, s, e) for n in targets),
        )

    def az_plus_one(self, s: float, e: float) -> _Episode | None:
        rng = self.rng
        az = rng.choice(self.azs)
        nodes = self.az_nodes(az, s)
        if nodes is None:
            return None
        others = [n for n in self.usable(s) if n not in nodes]
        if not others:
            return None
        extra = rng.choice(others)
        # The extra node fails after the AZ and comes back before it, so for a while exactly
        # three segments are gone: writes stop, reads and recovery go on.
        span = e - s
        s2 = _ms(s + rng.uniform(0.1, 0.3) * span)
        e2 = _ms(e - rng.uniform(0.1, 0.3) * span)
        if not (s < s2 < e2 < e):
            return None
        heal, fault = ("restart", "kill") if rng.random() < 0.5 else ("resume", "pause")
        return _Episode(
            events=(
                FaultEvent(s, "az_down", tuple(nodes), {"az": az}),
                FaultEvent(s2, fault, (extra,)),
                FaultEvent(e2, heal, (extra,)),
                FaultEvent(e, "az_up", tuple(nodes), {"az": az}),
            ),
            locks=tuple((f"proc:{n}", s, e) for n in nodes + [extra]),
            impaired=tuple((n, s, e) for n in nodes) + ((extra, s2, e2),),
        )

    def isolate(self, s: float, e: float) -> _Episode | None:
        """The writer cut off with a minority while clients write; then the writer crashes and
        the minority is lost with it; a new writer recovers from the others (see the module
        docstring). It holds every resource: nothing else may happen meanwhile, so the new
        writer surely recovers from exactly the other nodes."""
        rng = self.rng
        nodes = self.steady(s)
        if nodes is None or len(nodes) < WRITE_QUORUM + ISOLATE_MINORITY:
            return None
        minority = tuple(sorted(rng.sample(nodes, ISOLATE_MINORITY)))
        rest = tuple(n for n in nodes if n not in minority)
        span = e - s
        # A quiet lead first (every resource is held, so nothing happens): a writer that an
        # earlier fault left recovering comes back, and nodes that were down catch up, so the
        # writer and the minority can take writes when the partition comes.
        cut_s = _ms(s + rng.uniform(0.2, 0.3) * span)
        crash_s = _ms(cut_s + rng.uniform(0.3, 0.4) * span)
        down_s = _ms(rng.uniform(0.05, 0.1) * span)
        # The partition heals while the writer is down, so the new writer reaches the others,
        # and the minority comes back only well after the new writer has opened.
        heal_s = _ms(crash_s + down_s / 2)
        if not (s < cut_s < crash_s < heal_s < crash_s + down_s < e - down_s):
            return None
        return _Episode(
            events=(
                FaultEvent(cut_s, "partition", rest, {"groups": ((WRITER,) + minority, rest)}),
                FaultEvent(crash_s, "writer_crash", (WRITER,), {"down_s": down_s}),
                FaultEvent(crash_s, "kill", minority),
                FaultEvent(heal_s, "heal", ()),
                FaultEvent(e, "restart", minority),
            ),
            locks=tuple((f"{r}:{n}", s, e) for n in nodes for r in _NODE_RESOURCES)
            + (("partition", s, e), (WRITER, s, e), ("membership", s, e)),
            impaired=tuple((n, crash_s, e) for n in minority),
        )

    def replace(self, s: float, e: float) -> _Episode | None:
        """A membership change: `old` is replaced by a new node of its AZ (see the module
        docstring for the three variants: plain, of a dead node, and with the swap)."""
        rng = self.rng
        nodes = self.steady(s)
        if nodes is None:
            return None
        local = [n for n in nodes if self.az_of[n] == self.azs[0]]
        old = rng.choice(local) if local and rng.random() < 0.5 else rng.choice(nodes)
        new = self.new_id()
        az = self.az_of[old]
        variant = rng.choices(("plain", "dead", "swap"), (0.35, 0.25, 0.40))[0]
        peers = [n for n in nodes if self.az_of[n] == az and n != old]
        others = tuple(n for n in nodes if self.az_of[n] != az)
        if variant == "swap" and not (peers and holds_write_quorum(others, (frozenset(nodes),))):
            variant = "plain"
        span = e - s
        params = {"new": new}
        events = [FaultEvent(s, "replace", (old,), params)]
        impaired = [(new, s, e)]
        if variant == "dead":
            events.insert(0, FaultEvent(s, "kill", (old,)))  # killed first, never restarted
            impaired.append((old, s, e))
        elif variant == "swap":
            peer = rng.choice(peers)
            a_s = _ms(s + 0.05 * span)
            b_s = _ms(s + rng.uniform(0.35, 0.5) * span)
            heal_s = _ms(b_s + rng.uniform(0.1, 0.2) * span)
            if not (s < a_s < b_s < heal_s < e):
                return None
            trio = tuple(sorted((old, peer, new)))
            events += [
                # The four others take the writes (a write quorum of both sets) ...
                FaultEvent(a_s, "partition", trio, {"groups": ((WRITER,) + others, trio)}),
                # ... then the writer reaches only the three that missed them.
                FaultEvent(b_s, "partition", others, {"groups": ((WRITER,) + trio, others)}),
                FaultEvent(heal_s, "heal", ()),
            ]
            impaired += [(old, a_s, b_s), (peer, a_s, b_s)]
        events.append(FaultEvent(e, "replace_done", (old,), params))
        locks = [(f"{r}:{old}", s, _FOREVER_S) for r in _NODE_RESOURCES]
        locks += [(f"{r}:{new}", s, e) for r in _NODE_RESOURCES]
        locks += [("membership", s, e), ("partition", s, e)]
        return _Episode(events=tuple(events), locks=tuple(locks), impaired=tuple(impaired), change=(s, e, old, new))


def _aimed_windows(rng: random.Random, wanted: list[str], lead_s: float, active_s: float) -> list[tuple[float, float, str]]:
    """Non-overlapping windows for the aimed families in `wanted`, sorted by start."""
    windows: list[tuple[float, float, str]] = []
    for name in AIMED_NAMES:
        if name not in wanted or rng.random() >= AIM_PROBABILITY[name]:
            continue
        for _ in range(ATTEMPTS_MAX):
            length = rng.uniform(AIM_FRACTION_MIN, AIM_FRACTION_MAX) * active_s
            start = lead_s + rng.uniform(0.0, active_s - length)
            s, e = _ms(start), _ms(start + length)
            if e - s >= 0.002 and all(e < s2 or e2 < s for s2, e2, _ in windows):
                windows.append((s, e, name))
                break
    return sorted(windows)


def generate_plan(
    seed: int,
    duration_s: float,
    faults: Iterable[str],
    nodes: Mapping[str, str] | None = None,
    unbounded: bool = False,
    readers: int | None = None,
) -> FaultPlan:
    """A timed sequence of faults, the same for the same arguments.

    `faults` names fault families as the CLI does (`FAULT_NAMES`). Unless `unbounded`, at most
    `IMPAIRED_MAX` segments of each quorum set are impaired at any instant; either way every
    fault is healed before the last `TAIL_FRACTION` of the run. `readers`: the reader instances
    the run starts with (default: READERS_DEFAULT when a family of CLUSTER_ONLY_NAMES is asked
    for, else 0); writer faults need at least one, reader kills two."""
    wanted = sorted(set(faults))
    unknown = [f for f in wanted if f not in FAULT_NAMES]
    _require(not unknown, f"unknown fault names {unknown}; known: {list(FAULT_NAMES)}")
    if readers is None:
        readers = READERS_DEFAULT if any(f in CLUSTER_ONLY_NAMES for f in wanted) else 0
    _require(isinstance(readers, int) and 0 <= readers <= READERS_MAX, f"readers must be in 0..{READERS_MAX}")
    _require(readers >= 1 or not any(f in CLUSTER_ONLY_NAMES for f in wanted),
             f"{[f for f in wanted if f in CLUSTER_ONLY_NAMES]} need reader instances (readers >= 1)")
    node_map = dict(DEFAULT_NODES) if nodes is None else {str(n): str(a) for n, a in nodes.items()}
    _require(len(node_map) >= 1, "a plan needs nodes")
    _require(WRITER not in node_map, f"{WRITER!r} is the writer, not a node")
    duration_s = float(duration_s)
    _require(0.0 < duration_s <= DURATION_S_MAX, f"duration_s must be in (0, {DURATION_S_MAX}]")

    rng = random.Random(seed)
    lead_s = duration_s * LEAD_FRACTION
    # Rounded down, so the healing period is never shorter than promised.
    faults_end_s = math.floor(duration_s * (1.0 - TAIL_FRACTION) * 1000.0) / 1000.0
    active_s = faults_end_s - lead_s
    budget = len(node_map) if unbounded else IMPAIRED_MAX
    builder = _Builder(rng, node_map, unbounded, readers)
    initial = frozenset(node_map)
    accepted: list[_Episode] = []

    quorum_budget = None if unbounded else REPLICAS - WRITE_QUORUM

    def offer(episode: _Episode | None) -> bool:
        if episode is not None and _fits(episode, accepted, budget, initial, quorum_budget):
            accepted.append(episode)
            builder.accept(episode)
            return True
        return False

    # The aimed windows are reserved: a random episode that starts before one ends before it,
    # and the aimed episode is built when the walk in time order reaches its start.
    aims = _aimed_windows(rng, wanted, lead_s, active_s) if active_s > 0 else []
    t = lead_s
    for _ in range(EPISODES_MAX if wanted else 0):
        t += rng.expovariate(1.0 / (GAP_FRACTION_MEAN * active_s))
        while aims and aims[0][0] <= t:
            a_s, a_e, a_name = aims.pop(0)
            for _ in range(ATTEMPTS_MAX):
                if offer(builder.build(a_name, a_s, a_e)):
                    break
        if t >= faults_end_s:
            break
        name = rng.choice(wanted)
        for _ in range(ATTEMPTS_MAX):
            length = rng.uniform(EPISODE_FRACTION_MIN, EPISODE_FRACTION_MAX) * active_s
            end = min(t + length, faults_end_s)
            if aims:
                end = min(end, aims[0][0] - 0.002)
            s, e = _ms(t), _ms(end)
            if e - s < 0.002:
                break
            if offer(builder.build(name, s, e)):
                break
    for a_s, a_e, a_name in aims:  # the walk ended early (EPISODES_MAX)
        for _ in range(ATTEMPTS_MAX):
            if offer(builder.build(a_name, a_s, a_e)):
                break

    keyed = [
        (_event_order(ev), n, i, ev)
        for n, ep in enumerate(accepted)
        for i, ev in enumerate(ep.events)
    ]
    keyed.sort(key=lambda x: x[:3])
    return FaultPlan(
        seed=seed,
        duration_s=duration_s,
        events=tuple(ev for *_, ev in keyed),
        nodes=tuple(sorted(node_map.items())),
        faults=tuple(wanted),
        unbounded=unbounded,
        readers=readers,
    )
