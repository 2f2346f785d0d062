"""`sixfold chaos`: fault-injection runs from the command line.

    sixfold chaos --target embedded --duration 60 --seed 7 --clients 8 --faults kill,pause,partition,az,az+1,corrupt,writer-crash,slow,net,isolate,replace
    sixfold chaos --target cluster --duration 60 --seed 7      # real processes in a temp folder
    sixfold chaos --target cluster --duration 60 --faults writer-kill,writer-pause,writer-partition,reader-kill
                                                               # failovers: readers take over, nobody restarts the writer
    sixfold chaos --target sim --seed 7                        # deterministic: same seed, same history
    sixfold chaos --target sim --seeds 1-200                   # many seeds; lists the failing ones
    sixfold chaos --target cluster --network real --faults partition,isolate,one-way
                                                               # nft rules in namespaces (Linux, root)

Fault families (--faults): kill, pause, partition, az, az+1, corrupt, writer-crash (kill then
restart the writer), slow, net, isolate, replace, one-way (links between the writer and one to
three nodes drop one way: the writer's messages to a node, or a node's to the writer; every
target applies it, but sim and embedded draw it only when named, so the default plans of
seeds kept from before are unchanged); and for --target cluster only, which runs
reader instances (--readers, default 2): writer-kill (SIGKILL the writer, whoever it is now;
no restart: a reader must take over), writer-pause (SIGSTOP it past its lease; once resumed it
must step down), writer-partition (every node refuses the writer process; once reconnected it
must step down), reader-kill (SIGKILL a reader, restart it later). The default is every family
the target can apply. With readers, clients also read on replicas (--replica-reads): pinned
(each session reads from one reader: monotonic reads are promised), endpoint (through
engine.connect(folder, role="reader"), round_robin over every reader), none.

Exit code 0 when every check is valid (or unknown), 5 when any check is invalid, 2 bad usage
(the codes of every `sixfold` command are in engine.cli.EXIT_CODES; 1 means "key not found" only).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from engine.chaos.plan import DEFAULT_FAULTS, FAULT_NAMES
from engine.chaos.runner import REPLICA_READS, TARGETS, RunConfig, render, run
from engine.errors import InvalidArgument
from engine.head.weakening import NAMED

EXIT_OK, EXIT_USAGE, EXIT_INVALID = 0, 2, 5


def _seeds(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        if "-" in part:
            a, b = part.split("-", 1)
            out.extend(range(int(a), int(b) + 1))
        elif part:
            out.append(int(part))
    if not out or len(out) > 100_000:
        raise argparse.ArgumentTypeError("give seeds like 7, 1-200 or 1,5,9")
    return out


def _faults(text: str) -> tuple[str, ...]:
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [n for n in names if n not in FAULT_NAMES]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown fault(s) {bad}; choose from {', '.join(FAULT_NAMES)}")
    return names


def register(sub) -> None:
    p = sub.add_parser(
        "chaos",
        help="fault-injection run: workload + faults, then check the history",
        description=(
            "Drive a workload of puts, gets, deletes, batches and scans on a few hot keys while a nemesis "
            "kills, pauses, partitions, corrupts and replaces nodes (and, on a cluster, kills, pauses and cuts off the "
            "writer and kills readers, so that readers take over); record every operation; then check the history: "
            "linearizable per key (writer-endpoint operations), no acknowledged write lost, replicas converge, batches "
            "atomic, replica reads monotonic per session and read-after, old writers step down. "
            "Faults stay inside what the protocol promises to survive (at most an AZ plus one node "
            "impaired) unless --unbounded. The run folder gets plan.json, history.jsonl and report.json."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    p.add_argument("--target", choices=TARGETS, default="sim",
                   help="sim: deterministic single-thread simulation; embedded: real threads in this process; "
                   "cluster: real processes and signals (default: sim)")
    p.add_argument("--seed", type=int, default=1, help="seed of the plan and workload (default 1); printed, so a run replays")
    p.add_argument("--seeds", type=_seeds, help="many seeds, e.g. 1-200 (sim is fastest); prints a table and the failing seeds")
    p.add_argument("--duration", type=float, default=None,
                   help="seconds of workload (simulated seconds for sim; default 10, 5 for sim)")
    p.add_argument("--clients", type=int, default=4, help="concurrent clients (default 4)")
    p.add_argument("--keys", type=int, default=8, help="hot keys (default 8)")
    p.add_argument("--faults", type=_faults, default=None,
                   help=f"comma-separated fault families (default: every family for cluster; for sim and embedded all "
                   f"they can apply but one-way): {','.join(FAULT_NAMES)} "
                   "(writer-kill, writer-pause, writer-partition and reader-kill: --target cluster only)")
    p.add_argument("--readers", type=int, default=None,
                   help="reader instances of a cluster run (default 2 when the faults need them, else 0)")
    p.add_argument("--replica-reads", choices=REPLICA_READS, default="pinned",
                   help="how clients of a run with readers read on replicas (default pinned: one reader per session)")
    p.add_argument("--unbounded", action="store_true", help="let faults exceed the failure budget (then only safety is checked)")
    p.add_argument("--ops-max", type=int, default=20_000, help="bound on operations (default 20000)")
    p.add_argument("--cas", action="store_true",
                   help="add compare-and-set operations (conditional writes) to the workload (embedded and cluster targets)")
    p.add_argument("--out", metavar="DIR", help="run folder (default: a new folder under the system temp dir)")
    p.add_argument("--check-budget", type=float, default=30.0, help="seconds the linearizability search may take (then: unknown)")
    p.add_argument("--weaken", choices=tuple(NAMED),
                   help="TEST ONLY: run a deliberately broken protocol; the checks must say invalid")
    p.add_argument("--network", choices=("gate", "real"), default="gate", help=(
        "--target cluster: where partitions are made. gate (default): the nodes refuse requests inside their gRPC "
        "layer (a one-way drop: the node refuses the writer, whichever the direction); real: every process runs in a "
        "network namespace of its own (Linux, root) and a partition or one-way drop is nft drop rules on its real "
        "packets, removed when healed. Message faults (slow, drop, duplicate, delay) stay in the gate"))
    p.add_argument("--base-port", type=int, default=7600, help="first port of the cluster target (default 7600)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_chaos)


def _config(args, seed: int) -> RunConfig:
    duration = args.duration if args.duration is not None else (5.0 if args.target == "sim" else 10.0)
    faults = args.faults if args.faults is not None else (FAULT_NAMES if args.target == "cluster" else DEFAULT_FAULTS)
    return RunConfig(
        target=args.target, seed=seed, duration_s=duration, clients=args.clients, keys=args.keys,
        faults=tuple(faults), unbounded=args.unbounded, ops_max=args.ops_max,
        check_budget_s=args.check_budget, weaken=args.weaken, base_port=args.base_port,
        readers=args.readers, replica_reads=args.replica_reads, network=args.network, cas=args.cas,
    )


def cmd_chaos(args) -> int:
    if args.clients < 1 or args.keys < 1 or (args.duration is not None and args.duration <= 0):
        print("sixfold chaos: --clients, --keys and --duration must be positive", file=sys.stderr)
        return EXIT_USAGE
    try:
        _config(args, args.seed).check_target()
    except InvalidArgument as e:
        print(f"sixfold chaos: {e}", file=sys.stderr)
        return EXIT_USAGE
    root = args.out or tempfile.mkdtemp(prefix=f"sixfold-chaos-{args.target}-")
    if args.seeds:
        return _many(args, root)
    config = _config(args, args.seed)
    live = sys.stderr.isatty() and not args.json

    def progress(line: str) -> None:
        if live:
            print("\r" + line, end="", file=sys.stderr, flush=True)
        elif not args.json:
            print(line, file=sys.stderr, flush=True)

    readers = f", readers {config.readers}" if config.readers is not None else ""
    network = ", network real (nft in namespaces)" if config.network == "real" else ""
    print(f"sixfold chaos: target {config.target}{network}, seed {config.seed}, {config.duration_s:g} s, "
          f"{config.clients} clients, faults {','.join(config.faults)}{readers}; run folder {root}", file=sys.stderr)
    result = run(config, root, progress=progress)
    if live:
        print(file=sys.stderr)
    if args.json:
        print(json.dumps(result.report(), indent=2, sort_keys=True, default=str))
    else:
        c = result.counts
        print(f"seed {config.seed} | {result.seconds:.1f} s | ops {c['ok']:,} ok / {c['fail']:,} failed / "
              f"{c['indeterminate']:,} indeterminate | faults {result.stats.get('faults_applied', 0)}")
        print(render(result))
        print(f"history: {os.path.join(root, 'history.jsonl')}   report: {os.path.join(root, 'report.json')}")
    return EXIT_INVALID if result.overall == "invalid" else EXIT_OK


def _many(args, root: str) -> int:
    rows, failing = [], []
    t0 = time.monotonic()
    for i, seed in enumerate(args.seeds):
        config = _config(args, seed)
        result = run(config, os.path.join(root, f"seed-{seed}"))
        rows.append({"seed": seed, "overall": result.overall, "ops": sum(result.counts.values()),
                     "seconds": round(result.seconds, 2)})
        if result.overall == "invalid":
            failing.append(seed)
        if not args.json:
            print(f"\r[{i + 1}/{len(args.seeds)}] seed {seed}: {result.overall} ({time.monotonic() - t0:.0f} s, "
                  f"{len(failing)} failing)", end="", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps({"runs": rows, "failing": failing, "out_dir": root}, indent=2))
    else:
        print(file=sys.stderr)
        print(f"{'seed':>6}  {'verdict':8} {'ops':>7} {'seconds':>8}")
        for r in rows:
            print(f"{r['seed']:>6}  {r['overall']:8} {r['ops']:>7} {r['seconds']:>8}")
        print(f"{len(rows)} seeds, {len(failing)} failing: {failing if failing else 'none'}   (runs under {root})")
    return EXIT_INVALID if failing else EXIT_OK
