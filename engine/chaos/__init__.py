"""Fault-injection runs (Jepsen, Porcupine and FoundationDB style): plans, workload, history, checks.

- `plan`: faults as data (`FaultPlan`, `FaultEvent`, `generate_plan`), inside the failure budget
  the protocol promises to survive unless asked otherwise, with episodes aimed at the weaknesses
  a broken protocol would have (`isolate`, `replace`).
- `history`: the thread-safe recorder of every operation (`History`) and `history.jsonl`.
- `workload`: client threads driving the key-value API with unique values (`Workload`).
- `checker`: linearizability per key, no acknowledged write lost, batches atomic, replicas
  converge (`check_all`, `render_table`).

Nothing here opens sockets or starts processes; a runner wires these to a cluster.
"""

from engine.chaos.checker import (
    Verdict,
    check_all,
    check_batches_atomic,
    check_linearizable,
    check_no_lost_writes,
    check_replicas_converge,
    overall,
    render_table,
    verdicts_to_json,
)
from engine.chaos.history import Entry, History, Op, pair_ops, read_jsonl, write_jsonl
from engine.chaos.plan import FAULT_NAMES, FaultEvent, FaultPlan, generate_plan, validate_plan
from engine.chaos.workload import Progress, Workload

__all__ = [
    "Entry",
    "FAULT_NAMES",
    "FaultEvent",
    "FaultPlan",
    "History",
    "Op",
    "Progress",
    "Verdict",
    "Workload",
    "check_all",
    "check_batches_atomic",
    "check_linearizable",
    "check_no_lost_writes",
    "check_replicas_converge",
    "generate_plan",
    "overall",
    "pair_ops",
    "read_jsonl",
    "render_table",
    "validate_plan",
    "verdicts_to_json",
    "write_jsonl",
]
