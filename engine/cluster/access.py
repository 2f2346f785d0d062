"""`sixfold user add|list|remove` and `sixfold audit tail`: who may use a cluster, and what was done.

Registered by `engine.cli` (see COMMAND_MODULES there). The users live in the cluster folder's
users file (the manifest's `users_file`, `users.json` by default; `engine.security.users`), the
audit log in `DIR/logs/audit.jsonl` (`engine.security.audit`). Changing users is an
administrative action, so `user add` and `user remove` are recorded in the audit log, whether
they succeed or not. These commands work on the folder directly (they need no running process):
a removed user's token stops working on the writer endpoint's next call, which re-reads the file.

Exit codes are the CLI's: 0 ok, 2 usage (a bad name or role, no --cluster), 3 refused (the
folder is no cluster, the user exists already or does not exist, an unreadable users file).
"""

from __future__ import annotations

import argparse
import os
import sys

from engine.cluster.manifest import MANIFEST_FILE, load_manifest, users_file
from engine.errors import InvalidArgument
from engine.output import print_json, table
from engine.security import audit
from engine.security.users import ROLES, TOKEN_BYTES, UserStore, check_name


def _folder(args) -> str:
    if not args.cluster:
        raise SystemExit(f"sixfold {args.command}: say which cluster folder with --cluster DIR")  # exit 2
    return os.path.abspath(args.cluster)


def store(folder: str) -> UserStore:
    """The users of a cluster folder (ClusterError, exit 3, when it is no cluster)."""
    manifest = load_manifest(folder)
    path = users_file(manifest, folder)
    if path is None:
        print(f"sixfold: note: client authentication is off for {folder} (its cluster.json has \"users_file\": null); "
              "users are kept but not checked", file=sys.stderr)
        path = os.path.join(folder, "users.json")
    return UserStore(folder, path)


def _cluster_folder(args) -> str | None:
    """Where an action on `args` is recorded: its folder, when that is a cluster."""
    folder = os.path.abspath(args.cluster) if getattr(args, "cluster", None) else None
    return folder if folder is not None and os.path.exists(os.path.join(folder, MANIFEST_FILE)) else None


def audited(action: str, func, target_of=None):
    """`func` recorded in the cluster folder's audit log (`engine.security.audit.audited`)."""
    return audit.audited(action, func, folder_of=_cluster_folder, target_of=target_of)


def cmd_user_add(args) -> int:
    s = store(_folder(args))
    token = s.add(args.name, args.role)
    if args.json:
        print_json({"name": args.name, "role": args.role, "token": token})
    else:
        print(f"user {args.name!r} (role {args.role}) added. Its token follows, shown this once: only its SHA-256 is "
              f"kept. Pass it with --token-file, $SIXFOLD_TOKEN or engine.connect(..., token=...).", file=sys.stderr)
        print(token)
    return 0


def cmd_user_list(args) -> int:
    users = [u.public() for u in store(_folder(args)).users()]
    if args.json:
        print_json(users)
    else:
        print(table([[u["name"], u["role"], u["created"]] for u in users], ["name", "role", "created"]))
    return 0


def cmd_user_remove(args) -> int:
    gone = store(_folder(args)).remove(args.name)
    if args.json:
        print_json({"name": gone.name, "role": gone.role, "removed": True})
    else:
        print(f"user {gone.name!r} (role {gone.role}) removed; its token stops working on the endpoint's next call")
    return 0


def cmd_audit_tail(args) -> int:
    if args.n < 0:
        raise SystemExit(f"sixfold audit tail: -n must be 0 or more, got {args.n}")
    folder = _folder(args)
    load_manifest(folder)  # exit 3 for a folder that is no cluster
    lines = audit.tail(audit.audit_path(folder), args.n)
    if args.json:
        print_json(lines)
        return 0
    rows = []
    for e in lines:
        if "unreadable" in e:
            rows.append([None, None, "(unreadable line)", e["unreadable"][:60], None, None])
            continue
        count = e.get("count")
        rows.append([e.get("time"), e.get("identity"), e.get("action"), e.get("target"), e.get("result"),
                     f"{count} (summary)" if e.get("summary") else count])
    print(table(rows, ["time", "identity", "action", "target", "result", "count"]))
    return 0


def _name(text: str) -> str:
    try:
        return check_name(text)
    except InvalidArgument as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def register(sub) -> None:
    target = argparse.ArgumentParser(add_help=False)
    target.add_argument("--cluster", metavar="DIR", default=os.environ.get("SIXFOLD_CLUSTER"),
                        help="the cluster folder (default: $SIXFOLD_CLUSTER)")
    target.add_argument("--json", action="store_true", help="print JSON for scripts")

    p = sub.add_parser("user", help="add, list and remove the users who may use the cluster", description=(
        "Clients of the writer endpoint authenticate with a token; each user has one, and a role: read (get, scan, "
        "status), write (and put, delete), admin (and node replace). The users file keeps only each token's SHA-256."))
    usub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    a = usub.add_parser("add", parents=[target], help="add a user and print its new token once", description=(
        f"Add user NAME with ROLE and print its token ({TOKEN_BYTES * 8} random bits) on stdout, once: only its "
        "SHA-256 is stored. Recorded in the audit log."))
    a.add_argument("name", type=_name, help="the user's name (1..64 of A-Z a-z 0-9 _ . -)")
    a.add_argument("--role", choices=ROLES, required=True, help="what the user may do")
    a.set_defaults(func=audited("user add", cmd_user_add, lambda args: args.name))
    a = usub.add_parser("list", parents=[target], help="list the users and their roles", description=(
        "Show every user's name, role and creation time (never a token)."))
    a.set_defaults(func=cmd_user_list)
    a = usub.add_parser("remove", parents=[target], help="remove a user: its token stops working at once", description=(
        "Remove user NAME. The writer endpoint re-reads the users file on its next call, so the token stops working "
        "at once, without a restart. Recorded in the audit log."))
    a.add_argument("name", type=_name, help="the user to remove")
    a.set_defaults(func=audited("user remove", cmd_user_remove, lambda args: args.name))

    p = sub.add_parser("audit", help="show the audit log", description=(
        "The audit log (DIR/logs/audit.jsonl) has one JSON line per administrative action (user add/remove, cluster "
        "up/down, node and writer control, node replace and wipe, writer start and stop) and per refused request; "
        "a flood of refusals is one line per identity and second plus a summary line with the count."))
    asub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    a = asub.add_parser("tail", parents=[target], help="show the last lines of the audit log")
    a.add_argument("-n", type=int, default=20, help="how many lines (default 20)")
    a.set_defaults(func=cmd_audit_tail)


__all__ = ["audited", "register", "store"]
