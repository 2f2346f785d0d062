"""Fault-injection runs (Jepsen, Porcupine and FoundationDB style): plans, workload, history, checks.

- `plan`: faults as data (`FaultPlan`, `FaultEvent`, `generate_plan`), inside the failure budget
  the protocol promises to survive unless asked otherwise, with episodes aimed at the weaknesses
  a broken protocol would have (`isolate`, `replace`); `network_shape` names what a partition or
  one-way drop cuts.
- `history`: the thread-safe recorder of every operation (`History`) and `history.jsonl`.
- `workload`: client threads driving the key-value API with unique values (`Workload`).
- `checker`: linearizability per key, no acknowledged write lost, batches atomic, replicas
  converge; replica reads written, monotonic per session and read-after; failovers
  (`check_all`, `check_failovers`, `render_table`).

Nothing here opens sockets or starts processes; a runner wires these to a cluster.
"""

from engine.chaos.checker import (
    Verdict,
    check_all,
    check_batches_atomic,
    check_failovers,
    check_linearizable,
    check_no_lost_writes,
    check_replica_reads,
    check_replicas_converge,
    overall,
    render_table,
    verdicts_to_json,
)
from engine.chaos.history import Entry, History, Op, pair_ops, read_jsonl, write_jsonl
from engine.chaos.plan import (
    CLUSTER_ONLY_NAMES,
    DEFAULT_FAULTS,
    FAULT_NAMES,
    NETWORK_SHAPES,
    OPT_IN_NAMES,
    FaultEvent,
    FaultPlan,
    generate_plan,
    network_shape,
    validate_plan,
)
from engine.chaos.workload import Progress, Workload

__all__ = [
    "CLUSTER_ONLY_NAMES",
    "DEFAULT_FAULTS",
    "Entry",
    "FAULT_NAMES",
    "FaultEvent",
    "FaultPlan",
    "History",
    "NETWORK_SHAPES",
    "OPT_IN_NAMES",
    "Op",
    "Progress",
    "Verdict",
    "Workload",
    "check_all",
    "check_batches_atomic",
    "check_failovers",
    "check_linearizable",
    "check_no_lost_writes",
    "check_replica_reads",
    "check_replicas_converge",
    "generate_plan",
    "network_shape",
    "overall",
    "pair_ops",
    "read_jsonl",
    "render_table",
    "validate_plan",
    "verdicts_to_json",
    "write_jsonl",
]
