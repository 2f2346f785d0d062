"""The `sixfold` command: run a cluster on this machine and use it from the shell.

    sixfold cluster up --cluster ./c1        start six storage nodes and a writer endpoint
    sixfold put --cluster ./c1 user:1 alice  write a key
    sixfold get --cluster ./c1 user:1        read it back
    sixfold node kill --cluster ./c1 n3      crash a node (also stop, cont, start)
    sixfold cluster down --cluster ./c1      stop everything (the data stays)

Subcommands come from modules listed in `COMMAND_MODULES`; each has a function
`register(subparsers)` that adds its parsers and sets `func` (called with the parsed arguments,
returns an exit code). A module listed there that does not exist (yet) is skipped, so a new
command family (e.g. `engine.chaos.cli` for `sixfold chaos`) plugs in by adding one module.

Output: aligned tables and plain values for people; `--json` for scripts. Exit codes: 0 done,
1 key not found (`get`), 2 bad usage, 3 the engine refused (the message names the error class).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Sequence

from engine.errors import SixfoldError

EXIT_OK = 0
EXIT_NOT_FOUND = 1
EXIT_USAGE = 2
EXIT_ERROR = 3

#: Modules that add subcommands (see the module docstring). Optional ones may be absent.
COMMAND_MODULES: tuple[str, ...] = ("engine.cli", "engine.cluster.commands", "engine.chaos.cli")
CLUSTER_ENV = "SIXFOLD_CLUSTER"


# --- output helpers (shared by command modules) ---------------------------------------------
def table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> str:
    """Rows as aligned columns under headers."""
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def print_json(obj) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


# --- key/value commands ---------------------------------------------------------------------
def add_target_arguments(p: argparse.ArgumentParser) -> None:
    """--cluster DIR / --target HOST:PORT: which cluster a command talks to."""
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--cluster", metavar="DIR", default=os.environ.get(CLUSTER_ENV),
        help=f"cluster folder (with cluster.json) whose writer endpoint to use (default: ${CLUSTER_ENV})",
    )
    g.add_argument("--target", metavar="HOST:PORT", help="address of a writer endpoint, instead of --cluster")


def _connect(args):
    from engine.client import connect

    target = args.target or args.cluster
    if not target:
        raise SystemExit(f"sixfold {args.command}: say which cluster: --cluster DIR, --target HOST:PORT or ${CLUSTER_ENV}")
    return connect(target)


def _bytes(text: str, hex_mode: bool) -> bytes:
    if hex_mode:
        try:
            return bytes.fromhex(text)
        except ValueError:
            raise SystemExit(f"sixfold: {text!r} is not hex") from None
    return text.encode()


def _text(data: bytes, hex_mode: bool) -> str:
    return data.hex() if hex_mode else data.decode(errors="backslashreplace")


def cmd_put(args) -> int:
    with _connect(args) as db:
        db.put(_bytes(args.key, args.hex), _bytes(args.value, args.hex))
    if args.json:
        print_json({"key": args.key, "ok": True})
    return EXIT_OK


def cmd_delete(args) -> int:
    with _connect(args) as db:
        db.delete(_bytes(args.key, args.hex))
    if args.json:
        print_json({"key": args.key, "ok": True})
    return EXIT_OK


def cmd_get(args) -> int:
    with _connect(args) as db:
        value = db.get(_bytes(args.key, args.hex), quorum=args.quorum)
    if args.json:
        print_json({"key": args.key, "found": value is not None, "value": None if value is None else _text(value, args.hex)})
    elif value is not None:
        print(_text(value, args.hex))
    else:
        print(f"sixfold: key {args.key!r} not found", file=sys.stderr)
    return EXIT_OK if value is not None else EXIT_NOT_FOUND


def cmd_scan(args) -> int:
    start = _bytes(args.start, args.hex) if args.start else b""
    end = _bytes(args.end, args.hex) if args.end else None
    out = []
    with _connect(args) as db:
        for i, (k, v) in enumerate(db.scan(start, end, quorum=args.quorum)):
            if args.limit and i >= args.limit:
                break
            if args.json:
                out.append({"key": _text(k, args.hex), "value": _text(v, args.hex)})
            else:
                print(f"{_text(k, args.hex)}\t{_text(v, args.hex)}")
    if args.json:
        print_json(out)
    return EXIT_OK


def cmd_status(args) -> int:
    with _connect(args) as db:
        st = db.status()
    if args.json:
        print_json(st)
        return EXIT_OK
    rows = []
    for n in st["nodes"]:
        scl = n.get("scl") or {}
        rows.append([n["id"], n["az"], n.get("address"), "up" if n.get("up") else "DOWN", n.get("epoch"),
                     f"{min(scl.values())}..{max(scl.values())}" if scl else None, n.get("records"),
                     max((n.get("lag") or {0: 0}).values())])
    print(table(rows, ["node", "az", "address", "state", "epoch", "scl(min..max)", "records", "lag"]))
    print(f"volume {st['volume_id']}  vdl {st['vdl']}  epoch {st['epoch']}  protection groups {st['protection_groups']}  "
          f"durable {st['durable']}  codec {st['codec']}")
    return EXIT_OK


def register(sub) -> None:
    """The key/value commands: put, get, delete, scan, status."""
    common = argparse.ArgumentParser(add_help=False)
    add_target_arguments(common)
    common.add_argument("--hex", action="store_true", help="keys and values are hex on the command line and in the output")
    common.add_argument("--json", action="store_true", help="print JSON for scripts")

    p = sub.add_parser("put", parents=[common], help="write a key", description=(
        "Store VALUE under KEY (UTF-8 text, or hex with --hex). Returns once the write is durable on 4 of 6 segments."))
    p.add_argument("key")
    p.add_argument("value")
    p.set_defaults(func=cmd_put)

    p = sub.add_parser("get", parents=[common], help="read a key", description=(
        "Print the value of KEY (linearizable: it reflects every write acknowledged before). "
        "Exit code 1 when the key does not exist."))
    p.add_argument("key")
    p.add_argument("--quorum", action="store_true", help="read from 3 of 6 segments instead of one known complete")
    p.set_defaults(func=cmd_get)

    p = sub.add_parser("delete", parents=[common], help="delete a key", description=(
        "Remove KEY (a tombstone); returns once durable. Deleting a missing key is fine."))
    p.add_argument("key")
    p.set_defaults(func=cmd_delete)

    p = sub.add_parser("scan", parents=[common], help="list keys in a range", description=(
        "Print key<TAB>value for every key with START <= key < END, in key order, all at one read point."))
    p.add_argument("start", nargs="?", default="", help="first key (default: the beginning)")
    p.add_argument("end", nargs="?", default=None, help="end key, excluded (default: the end)")
    p.add_argument("--limit", type=int, default=0, help="print at most this many pairs")
    p.add_argument("--quorum", action="store_true", help="quorum reads")
    p.set_defaults(func=cmd_scan)

    p = sub.add_parser("status", parents=[common], help="volume status from the writer endpoint", description=(
        "Show the volume as the writer sees it: VDL, epoch, and every node's SCLs and lag."))
    p.set_defaults(func=cmd_status)


# --- entry point ----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sixfold",
        description="Sixfold: an Aurora-style quorum storage engine. Run a six-node cluster on this machine "
        "and read and write it.",
        epilog="Run `sixfold COMMAND --help` for the options of each command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = sys.modules[__name__] if name == __name__ or name == "engine.cli" else importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is not None and name.startswith(e.name):
                continue  # an optional command family that is not installed (yet)
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or EXIT_OK)
    except SixfoldError as e:
        print(f"sixfold: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
