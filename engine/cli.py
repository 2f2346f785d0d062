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

Output: aligned tables and plain values for people; `--json` for scripts. Keys and values on the
command line are the bytes given (an argument that is not UTF-8 is taken byte for byte, through
`os.fsencode`), or hex with `--hex`, or base64 with `--base64`; output uses the same encoding. A
put value can come raw from a file or stdin (`--value-file PATH`, `-`), and `get --raw` writes
it back byte for byte.

Exit codes (`EXIT_CODES`, shown by `--help` and in the README): 0 ok, 1 key not found (nothing
else exits 1), 2 usage or bad argument, 3 the engine or the cluster refused or failed (the
message names the error class), 4 `cluster status` found a process that is not SERVING, 5 a
`chaos` check is invalid, 6 a backup file is damaged or missing, 130 interrupted, 141 stdout was closed early (`sixfold scan | head`),
as the shell reports a tool ended by SIGPIPE. A command says "bad usage" by raising
`SystemExit("message")`; `main` prints the message and exits 2. No expected failure ends in a
traceback; an unexpected one (a bug) prints its traceback and exits 3.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import importlib
import importlib.metadata
import os
import sys
import traceback
from collections.abc import Sequence

from engine.core.constants import VALUE_BYTES_MAX
from engine.errors import SixfoldError

EXIT_OK = 0
EXIT_NOT_FOUND = 1
EXIT_USAGE = 2
EXIT_ERROR = 3
EXIT_UNHEALTHY = 4
EXIT_INVALID = 5
EXIT_DAMAGED = 6
EXIT_INTERRUPTED = 130
EXIT_PIPE = 141  # 128 + SIGPIPE

#: Every exit code and what it means: the contract scripts rely on (rendered into `--help`;
#: the README's table says the same, which a test checks).
EXIT_CODES: dict[int, str] = {
    EXIT_OK: "ok",
    EXIT_NOT_FOUND: "key not found (get); nothing else exits 1",
    EXIT_USAGE: "usage or bad argument: unknown option, bad hex or base64, an unreadable --value-file, no cluster named",
    EXIT_ERROR: "the engine or the cluster refused or failed; the message names the error class "
                "(also cluster down on a folder that is no cluster)",
    EXIT_UNHEALTHY: "cluster status, spec health: a process is not SERVING (the status is still printed)",
    EXIT_INVALID: "chaos: a check found the history invalid",
    EXIT_DAMAGED: "backup: a file of the backup is damaged or missing (backup verify found one, or a restore needed one)",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
    EXIT_PIPE: "stdout was closed early (say, piped into head), as for a tool ended by SIGPIPE",
}

#: Modules that add subcommands (see the module docstring). Optional ones may be absent.
COMMAND_MODULES: tuple[str, ...] = (
    "engine.cli", "engine.cluster.commands", "engine.cluster.access", "engine.chaos.cli", "engine.backup.cli",
    "engine.cluster.deploy_cli", "engine.redis.cli",
)
CLUSTER_ENV = "SIXFOLD_CLUSTER"


# Output helpers live in engine.output (shared by every command module); re-exported here.
from engine.output import print_json, table  # noqa: E402


# --- key/value commands ---------------------------------------------------------------------
def add_target_arguments(p: argparse.ArgumentParser) -> None:
    """--cluster DIR / --target HOST:PORT: which cluster a command talks to."""
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--cluster", metavar="DIR", default=os.environ.get(CLUSTER_ENV),
        help=f"cluster folder (with cluster.json) whose writer endpoint to use (default: ${CLUSTER_ENV})",
    )
    g.add_argument("--target", metavar="HOST:PORT", help="address of a writer endpoint, instead of --cluster")
    g.add_argument("--spec", metavar="FILE", help=(
        "a deployment spec (engine.cluster.spec), instead of --cluster: the writer is the candidate it names (the "
        "writer or a reader) that serves as the writer at the highest epoch, followed through a failover"))
    p.add_argument("--cert", metavar="FILE", default=os.environ.get("SIXFOLD_CERT"), help=(
        "with --target on a secure cluster: an identity file (`sixfold certs issue`), the CA bundle ca.pem beside it "
        "(default: $SIXFOLD_CERT; with --cluster the folder's operator certificate is used)"))
    p.add_argument(
        "--token-file", metavar="PATH", default=None,
        help="read the token to authenticate with from PATH (default: $SIXFOLD_TOKEN, else the cluster "
             "folder's operator.token, which `sixfold cluster up` writes for the local operator)",
    )


def token_from_args(args) -> str | None:
    """The token a command authenticates with: --token-file PATH (an unreadable file or one that
    holds no token is a usage error), else None (connect's default: $SIXFOLD_TOKEN, then the
    folder's operator token)."""
    path = getattr(args, "token_file", None)
    if path is None:
        return None
    from engine.errors import InvalidArgument
    from engine.security.users import read_token_file

    try:
        return read_token_file(path)
    except OSError as e:
        raise SystemExit(f"sixfold {args.command}: cannot read --token-file {path!r}: {e.strerror or e}") from None
    except InvalidArgument as e:
        raise SystemExit(f"sixfold {args.command}: --token-file: {e}") from None


def _connect(args):
    from engine.client import connect

    target = args.target or args.spec or args.cluster
    if not target:
        raise SystemExit(f"sixfold {args.command}: say which cluster: --cluster DIR, --spec FILE, --target HOST:PORT "
                         f"or ${CLUSTER_ENV}")
    if args.spec and not os.path.isfile(args.spec):
        raise SystemExit(f"sixfold {args.command}: --spec {args.spec}: no such file")
    options = {"token": token_from_args(args)}
    if getattr(args, "role", "writer") == "reader":
        if args.target or not (args.cluster or args.spec):
            raise SystemExit(f"sixfold {args.command} --role reader: give --cluster DIR or --spec FILE (it lists the "
                             "readers)")
        options["role"] = "reader"
    if getattr(args, "cert", None):
        from engine.security.tls import TlsConfig

        options["tls"] = TlsConfig.from_file(args.cert)
    return connect(target, **options)


def _mode(args) -> str | None:
    return "hex" if args.hex else "base64" if args.base64 else None


def _bytes(text: str, mode: str | None, what: str = "key") -> bytes:
    """A key or value from the command line: the argument's own bytes (os.fsencode undoes the
    surrogateescape decoding of an argument that is not UTF-8), or hex, or base64."""
    if mode == "hex":
        try:
            return bytes.fromhex(text)
        except ValueError:
            raise SystemExit(f"sixfold: {what} {text!r} is not hex (pairs of 0-9 a-f)") from None
    if mode == "base64":
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise SystemExit(f"sixfold: {what} {text!r} is not base64 (A-Z a-z 0-9 + /, padded with =)") from None
    return os.fsencode(text)


def _text(data: bytes, mode: str | None) -> str:
    """Bytes for output: hex, base64, or text with every byte that is not UTF-8 as a \\xNN escape."""
    if mode == "hex":
        return data.hex()
    if mode == "base64":
        return base64.b64encode(data).decode("ascii")
    return data.decode(errors="backslashreplace")


def _value(args) -> bytes:
    """The value of `put`: the VALUE argument, or the raw bytes of --value-file PATH or of stdin
    (`-`). At most one byte more than the engine takes is read, so an oversized file is refused
    by the engine (exit 3, like an oversized argument) without being read whole."""
    if args.value is not None and args.value_file is not None:
        raise SystemExit("sixfold put: give the value as an argument or with --value-file, not both")
    if args.value is None and args.value_file is None:
        raise SystemExit("sixfold put: give a VALUE, `-` for stdin, or --value-file PATH")
    source = args.value_file if args.value_file is not None else args.value
    if args.value_file is None and source != "-":
        return _bytes(source, _mode(args), "value")
    try:
        if source == "-":
            stdin = getattr(sys.stdin, "buffer", None)
            if stdin is None:
                raise SystemExit("sixfold put: the value is to come from stdin, but there is no stdin")
            return stdin.read(VALUE_BYTES_MAX + 1)
        with open(source, "rb") as fh:
            return fh.read(VALUE_BYTES_MAX + 1)
    except OSError as e:
        where = "stdin" if source == "-" else f"--value-file {source!r}"
        raise SystemExit(f"sixfold put: cannot read {where}: {e.strerror or e}") from None


def cmd_put(args) -> int:
    key, value = _bytes(args.key, _mode(args)), _value(args)
    with _connect(args) as db:
        lsn = db.put(key, value)
    if args.json:
        print_json({"key": _text(key, _mode(args)), "ok": True, "commit": lsn})
    return EXIT_OK


def cmd_delete(args) -> int:
    key = _bytes(args.key, _mode(args))
    with _connect(args) as db:
        lsn = db.delete(key)
    if args.json:
        print_json({"key": _text(key, _mode(args)), "ok": True, "commit": lsn})
    return EXIT_OK


def cmd_get(args) -> int:
    mode = _mode(args)
    if args.raw and (args.json or mode):
        raise SystemExit("sixfold get: --raw writes the value's bytes as they are; leave out --json, --hex and --base64")
    key = _bytes(args.key, mode)
    with _connect(args) as db:
        value = db.get(key, quorum=args.quorum, after=args.after)
    if args.json:
        print_json({"key": _text(key, mode), "found": value is not None, "value": None if value is None else _text(value, mode)})
    elif value is not None and args.raw:
        sys.stdout.flush()
        sys.stdout.buffer.write(value)
    elif value is not None:
        print(_text(value, mode))
    else:
        print(f"sixfold: key '{_text(key, mode)}' not found", file=sys.stderr)
    return EXIT_OK if value is not None else EXIT_NOT_FOUND


def cmd_watch(args) -> int:
    mode = _mode(args)
    if args.count < 0 or (args.start is not None and args.start < 0):
        raise SystemExit("sixfold watch: --count and --from are 0 or more")
    prefix = _bytes(args.prefix, mode, "prefix") if args.prefix else b""
    shown = 0
    with _connect(args) as db:
        for change in db.watch(prefix, start=args.start):
            if args.json:
                print_json({"position": change.position, "key": _text(change.key, mode), "deleted": change.value is None,
                            "value": None if change.value is None else _text(change.value, mode)})
            else:
                shown_value = "<deleted>" if change.value is None else _text(change.value, mode)
                print(f"{change.position}\t{_text(change.key, mode)}\t{shown_value}", flush=True)
            shown += 1
            if args.count and shown >= args.count:
                break
    return EXIT_OK


def cmd_scan(args) -> int:
    mode = _mode(args)
    if args.limit < 0:
        raise SystemExit(f"sixfold scan: --limit must be 0 (no limit) or more, got {args.limit}")
    start = _bytes(args.start, mode, "start key") if args.start else b""
    end = _bytes(args.end, mode, "end key") if args.end else None
    out = []
    with _connect(args) as db:
        for i, (k, v) in enumerate(db.scan(start, end, quorum=args.quorum, after=args.after)):
            if args.limit and i >= args.limit:
                break
            if args.json:
                out.append({"key": _text(k, mode), "value": _text(v, mode)})
            else:
                print(f"{_text(k, mode)}\t{_text(v, mode)}")
    if args.json:
        print_json(out)
    return EXIT_OK


def cmd_status(args) -> int:
    """The one status view (engine.cluster.overview): with --cluster every process the folder
    names (asked directly, so it answers with the writer down), with --via every process the
    process at that address knows (asked directly too), with --target the nodes as that writer
    endpoint sees them; then the writer's view of the volume."""
    from engine.cluster import overview

    rows = None
    if args.via:
        if args.target:
            raise SystemExit("sixfold status: give --via HOST:PORT or --target HOST:PORT, not both")
        from engine.cluster.status import status_via

        tls = None
        if args.cert:
            from engine.security.tls import TlsConfig

            tls = TlsConfig.from_file(args.cert)
        from engine.security.users import TOKEN_ENV

        view = status_via(args.via, tls=tls, token=token_from_args(args) or os.environ.get(TOKEN_ENV))
        rows = view["processes"] if not args.detail else overview.from_launcher(view, detail=True)
        # The volume as the writer the directory names sees it, as --target would ask it.
        args.target, args.cluster = view["writer"].get("address") or args.via, None
    elif args.spec and not args.target:  # every process the spec names, asked directly
        from engine.cluster.commands import with_processes
        from engine.cluster.launcher import Cluster

        if not os.path.isfile(args.spec):
            raise SystemExit(f"sixfold status: --spec {args.spec}: no such file")
        path = os.path.abspath(args.spec)
        rows = with_processes(Cluster(os.path.dirname(path), manifest_file=path).status(), args.detail)["processes"]
    elif args.cluster and not args.target:
        from engine.cluster.commands import with_processes
        from engine.cluster.launcher import Cluster

        rows = with_processes(Cluster(args.cluster).status(), args.detail)["processes"]
    try:
        with _connect(args) as db:
            st = db.status()
    except SixfoldError as e:
        if rows is None:
            raise
        # The writer endpoint does not answer: the processes still show, and the exit code says so.
        if args.json:
            print_json({"processes": rows, "writer_error": f"{type(e).__name__}: {e}"})
        else:
            print(overview.table(rows, detail=args.detail))
            print(f"sixfold: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_ERROR
    if rows is None:
        rows = overview.from_writer(st, args.target, detail=args.detail)
    st["processes"] = rows
    if args.json:
        print_json(st)
        return EXIT_OK
    print(overview.table(rows, detail=args.detail))
    for n in st["nodes"]:
        if n.get("storage_warning"):
            print(f"warning: {n['storage_warning']}")
    print(f"volume {st['volume_id']}  vdl {st['vdl']}  epoch {st['epoch']}  protection groups {st['protection_groups']}  "
          f"durable {st['durable']}  encrypted {st.get('encrypted', False)}  codec {st['codec']}")
    b = st.get("backup")
    if b is not None:  # engine.backup.archiver
        base = b["base_in_progress"]
        print(f"backup {b['state']} to {b['target']}: archived through LSN {b['position']} (lag {b['lag_lsns']}), "
              f"{b['bases']} base(s)" + (f", base at LSN {base['lsn']} {base['fraction']:.0%} done" if base else "")
              + (f"; last error: {b['last_error']}" if b["last_error"] else ""))
    return EXIT_OK


def _read_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--role", choices=("writer", "reader"), default="writer", help=(
        "reader: read from the cluster's reader instances (the reader endpoint, load-balanced; --cluster only) "
        "instead of the writer endpoint"))
    p.add_argument("--after", type=int, default=None, metavar="LSN", help=(
        "read-your-writes: read at a read point that covers this commit position (`put --json` prints it as "
        "\"commit\"); a reader waits for it, bounded, else ReplicaBehind (exit 3)"))


def register(sub) -> None:
    """The key/value commands: put, get, delete, scan, status."""
    common = argparse.ArgumentParser(add_help=False)
    add_target_arguments(common)
    encoding = common.add_mutually_exclusive_group()
    encoding.add_argument("--hex", action="store_true", help="keys and values are hex on the command line and in the output")
    encoding.add_argument("--base64", action="store_true",
                          help="keys and values are base64 on the command line and in the output (binary data)")
    common.add_argument("--json", action="store_true", help="print JSON for scripts")

    p = sub.add_parser("put", parents=[common], help="write a key", description=(
        "Store VALUE under KEY. KEY and VALUE are the bytes of the arguments (text, or bytes that are not UTF-8 as "
        "given), or hex with --hex, or base64 with --base64. VALUE `-` reads the value's raw bytes from stdin, and "
        "--value-file PATH from a file (`-`: stdin), up to the 1 MiB limit; --hex and --base64 do not apply to "
        "those. Returns once the write is durable on 4 of 6 segments."))
    p.add_argument("key")
    p.add_argument("value", nargs="?", default=None, help="the value; `-` reads it from stdin")
    p.add_argument("--value-file", metavar="PATH", default=None, help="read the value's raw bytes from PATH (`-`: stdin)")
    p.set_defaults(func=cmd_put)

    p = sub.add_parser("get", parents=[common], help="read a key", description=(
        "Print the value of KEY (linearizable: it reflects every write acknowledged before), followed by a newline; "
        "bytes that are not UTF-8 print as \\xNN escapes unless --raw, --hex or --base64. "
        "Exit code 1 when the key does not exist (and only then)."))
    p.add_argument("key")
    p.add_argument("--quorum", action="store_true", help="read from 3 of 6 segments instead of one known complete")
    _read_arguments(p)
    p.add_argument("--raw", action="store_true", help="write the value's bytes exactly as stored, with no newline "
                   "(for binary values: sixfold get --raw KEY > FILE)")
    p.set_defaults(func=cmd_get)

    p = sub.add_parser("delete", parents=[common], help="delete a key", description=(
        "Remove KEY (a tombstone); returns once durable. Deleting a missing key is fine."))
    p.add_argument("key")
    p.set_defaults(func=cmd_delete)

    p = sub.add_parser("scan", parents=[common], help="list keys in a range", description=(
        "Print key<TAB>value for every key with START <= key < END, in key order, all at one read point."))
    p.add_argument("start", nargs="?", default="", help="first key (default: the beginning)")
    p.add_argument("end", nargs="?", default=None, help="end key, excluded (default: the end)")
    p.add_argument("--limit", type=int, default=0, help="print at most this many pairs (0: all)")
    p.add_argument("--quorum", action="store_true", help="quorum reads")
    _read_arguments(p)
    p.set_defaults(func=cmd_scan)

    p = sub.add_parser("watch", parents=[common], help="print committed changes under a prefix as they commit", description=(
        "Print position<TAB>key<TAB>value (or <deleted>) for every committed change of a key starting with PREFIX, "
        "in commit order, as they commit, until Ctrl-C (or --count changes). --from POSITION resumes after a "
        "commit position (the first column of an earlier watch, or 0 for the volume's beginning): changes older "
        "than the writer keeps in memory are read from the nodes' logs, and the watch holds version collection "
        "back while it runs. A position the nodes may have collected past (no watch held it), or a watch that "
        "falls more than 4,000,000 LSNs behind, is refused Compacted (exit 3), naming the oldest position kept."))
    p.add_argument("prefix", nargs="?", default="", help="only keys that start with it (default: all)")
    p.add_argument("--from", "--start", dest="start", type=int, default=None, metavar="POSITION",
                   help="the changes after this commit position (default: from now)")
    p.add_argument("--count", type=int, default=0, help="stop after this many changes (0: never)")
    p.set_defaults(func=cmd_watch)

    p = sub.add_parser("status", parents=[common], help="every process of the cluster, and the volume", description=(
        "The one status view: every process (node, writer, reader) with its AZ, address, role, health, epoch, lag, "
        "storage used, repair progress and the faults in force (real network cuts, a pause), then the volume as "
        "the writer sees it (VDL, epoch, backups). With --cluster DIR or --spec FILE every process the folder or "
        "spec names is asked directly, so the table shows even with the writer down (a spec's reader that took over "
        "shows as the writer, the spec's writer entry as a candidate); with --via HOST:PORT, the address of any one "
        "process of the cluster (node, writer or reader), that process names the others and each is asked "
        "directly (one that does not answer shows UNREACHABLE), no folder needed; with --target HOST:PORT the nodes "
        "are those that writer endpoint reaches. The same table as `cluster status` and `node rebuild-status`, and "
        "the same `processes` in the JSON. Exit code 3 (after the table) when the writer endpoint does not answer."))
    p.add_argument("--detail", action="store_true", help="per protection group detail: each node's SCL, PGCL and lag")
    p.add_argument("--via", metavar="HOST:PORT", default=None, help=(
        "the address of one reachable process of the cluster (any node, the writer or a reader): it names the others "
        "and all are asked directly. A secure cluster needs --cert (an identity of its CA) and, for the writer and "
        "readers, a token (--token-file or $SIXFOLD_TOKEN)"))
    p.set_defaults(func=cmd_status)


# --- entry point ----------------------------------------------------------------------------
def version() -> str:
    """This package's version, from its metadata (the source tree's when it is not installed)."""
    try:
        return importlib.metadata.version("sixfold")
    except importlib.metadata.PackageNotFoundError:
        import engine

        return engine.__version__


def exit_codes_text() -> str:
    return "exit codes:\n" + "\n".join(f"  {code:<3}  {meaning}" for code, meaning in EXIT_CODES.items())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sixfold",
        description="Sixfold: an Aurora-style quorum storage engine. Run a six-node cluster on this machine "
        "and read and write it.",
        epilog="Run `sixfold COMMAND --help` for the options of each command.\n\n" + exit_codes_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
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


def _text_streams_never_fail() -> None:
    """Output never ends in a UnicodeEncodeError: a character the terminal's encoding cannot
    show (say, a surrogate from an argument that is not UTF-8, echoed in a message) is escaped."""
    for stream in (sys.stdout, sys.stderr):
        if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
            try:
                stream.reconfigure(errors="backslashreplace")
            except (ValueError, OSError):
                pass


def _stdout_closed() -> int:
    """stdout's reader went away (`| head`): stop quietly. Point stdout at /dev/null, so that
    the interpreter's last flush of what is still buffered does not fail again at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass  # stdout is no file (a test's capture): nothing will flush it at exit
    return EXIT_PIPE


def main(argv: Sequence[str] | None = None) -> int:
    """Run one `sixfold` command; returns its exit code (see EXIT_CODES). `--help`, `--version`
    and argparse's usage errors raise SystemExit as argparse does (codes 0 and 2)."""
    _text_streams_never_fail()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = int(args.func(args) or EXIT_OK)
        sys.stdout.flush()  # a closed pipe shows here, where it is handled, not at exit
        return code
    except SystemExit as e:
        if isinstance(e.code, str):  # a command's "bad usage" (see the module docstring)
            print(e.code, file=sys.stderr)
            return EXIT_USAGE
        raise
    except BrokenPipeError:
        return _stdout_closed()
    except SixfoldError as e:
        print(f"sixfold: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except OSError as e:  # the machine said no (a folder that cannot be created, a full disk...)
        print(f"sixfold: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_ERROR
    except Exception:  # noqa: BLE001 - a bug: show it whole, and keep exit code 1 for "not found"
        traceback.print_exc()
        print("sixfold: internal error (a bug in sixfold; the traceback above says where)", file=sys.stderr)
        return EXIT_ERROR
