"""`sixfold backup now|list|verify` and `sixfold restore`.

    sixfold backup now --backup ./bk                     a base snapshot by the archiver that runs
    sixfold backup now --backup ./bk --volume ./vol      ... of a closed embedded volume (opens it)
    sixfold backup list --backup ./bk                    bases, the restore window, the log
    sixfold backup verify --backup ./bk                  read back and check every file
    sixfold restore --backup ./bk --to-time 2026-12-02T05:40:00Z --into ./vol2
    sixfold restore --backup ./bk --to-lsn 123456 --into ./c2 --cluster

A volume is backed up by the process that runs its writer: `engine.open(path, backup=DIR)`, or a
cluster started with `sixfold cluster up --backup DIR`. `backup now` without --volume asks that
archiver for a base through the target itself (a request object in DIR/requests/), so it works
whoever runs it, and waits until the base is listed. Progress goes to stderr.

Exit codes (engine.cli.EXIT_CODES): 0 ok, 2 bad usage, 3 refused or failed (outside the restore
window, no archiver answering, a destination that is not empty...), 6 a file of the backup is
damaged or missing (`verify` found one, or a restore or `backup now` needed one).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import uuid

from engine.errors import BackupCorrupt
from engine.output import ProgressLine as Progress, print_json, table

EXIT_OK, EXIT_USAGE, EXIT_ERROR, EXIT_DAMAGED = 0, 2, 3, 6
#: `backup now` without --volume: how long to wait for an archiver to take up the request.
PICKUP_WAIT_S = 30.0


def parse_time(text: str) -> float:
    """A restore time: ISO 8601 (`2026-12-02T05:40:00Z`, `...+01:00`; without an offset: UTC),
    or seconds since the epoch (`@1796189770.5` or `1796189770.5`). Returns seconds."""
    t = text.strip()
    try:
        return float(t[1:] if t.startswith("@") else t)
    except ValueError:
        pass
    try:
        dt = datetime.datetime.fromisoformat(t.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise SystemExit(f"sixfold restore: --to-time {text!r} is not a time: give ISO 8601 (2026-12-02T05:40:00Z) "
                         "or seconds since the epoch (@1796189770.5)") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=datetime.timezone.utc)
    return dt.timestamp()


def fmt_time(us) -> str:
    from engine.backup.restore import fmt_time as f

    return f(us)


def _damaged(e: BackupCorrupt) -> int:
    print(f"sixfold: BackupCorrupt: {e}", file=sys.stderr)
    return EXIT_DAMAGED


# --- backup now -------------------------------------------------------------------------------
def cmd_backup_now(args) -> int:
    try:
        if args.volume:
            return _now_embedded(args)
        return _now_by_request(args)
    except BackupCorrupt as e:
        return _damaged(e)


def _now_embedded(args) -> int:
    from engine.embedded import EmbeddedOptions, EmbeddedVolume
    from engine.envelope import read_key_file

    key = read_key_file(args.key_file) if args.key_file else None
    progress = Progress("backup", quiet=args.json)
    v = EmbeddedVolume(args.volume, EmbeddedOptions(backup=args.backup, encryption_key=key))
    try:
        a = v.archiver
        rid = a.request_base()
        deadline = time.monotonic() + args.timeout
        while a.base_of_request(rid) is None:
            st = a.status()
            if st["fenced"] or time.monotonic() >= deadline:
                raise SystemExit(f"sixfold backup now: the base did not finish ({st['fenced'] or st['last_error'] or 'timeout'})")
            progress({"phase": "base", **(st["base_in_progress"] or {"position": st["position"]})})
            time.sleep(0.2)
        base = a.base_of_request(rid)
    finally:
        v.close()
    progress.end()
    return _report_base(args, base)


def _now_by_request(args) -> int:
    from engine.backup.archiver import load_current_manifest
    from engine.backup.format import REQUESTS
    from engine.backup.target import target_of

    target = target_of(args.backup)
    m, _, _ = load_current_manifest(target)
    if m is None:
        raise SystemExit(f"sixfold backup now: {args.backup} holds no archive yet: back a volume up into it first "
                         "(engine.open(path, backup=DIR), cluster up --backup DIR), or give --volume PATH")
    rid = uuid.uuid4().hex
    asked_us = time.time_ns() // 1000
    target.write(f"{REQUESTS}{rid}.json", json.dumps({"id": rid, "written_us": asked_us}).encode())
    progress = Progress("backup", quiet=args.json)
    t0 = time.monotonic()
    try:
        while True:
            m, _, _ = load_current_manifest(target)
            base = next((b for b in m["bases"] if rid in b.get("requests", ())), None)
            if base is not None:
                break
            waited = time.monotonic() - t0
            # A running archiver publishes a manifest version at least every idle_publish_s.
            alive = m["written_us"] >= asked_us
            if waited >= args.timeout or (not alive and waited >= min(PICKUP_WAIT_S, args.timeout)):
                target.delete(f"{REQUESTS}{rid}.json")
                raise SystemExit(f"sixfold backup now: no archiver answered within {waited:.0f} s: is the volume open "
                                 "with a backup (engine.open(path, backup=DIR), cluster up --backup DIR)? For a closed "
                                 "embedded volume give --volume PATH")
            progress({"phase": "waiting for the base", "archived": m["position"]["lsn"]})
            time.sleep(0.5)
    finally:
        progress.end()
    return _report_base(args, base)


def _report_base(args, base: dict) -> int:
    if args.json:
        print_json(base)
    else:
        print(f"base snapshot at LSN {base['lsn']} ({fmt_time(base['time_us'])}): {base['records']} records, "
              f"{base['bytes']} bytes in {len(base['parts'])} part(s)")
    return EXIT_OK


# --- list -----------------------------------------------------------------------------------
def cmd_backup_list(args) -> int:
    from engine.backup.restore import Archive

    try:
        a = Archive(args.backup)
        w = a.window()
    except BackupCorrupt as e:
        return _damaged(e)
    m = a.manifest
    seg_bytes = 0
    for (_after, _last), name in a.segments:
        try:
            seg_bytes += os.path.getsize(os.path.join(a.target.describe(), name))
        except OSError:
            pass
    out = {"volume_id": a.volume_id, "protection_groups": a.P, "encrypted": m["encryption"] is not None,
           "epoch": m["epoch"], "manifest": m["seq"], "retention_days": m["retention_days"],
           "position": m["position"]["lsn"], "window": w, "segments": len(a.segments),
           "segments_first_lsn": a.segments[0][0][0] if a.segments else None,
           "segments_last_lsn": a.segments[-1][0][1] if a.segments else None, "segment_bytes": seg_bytes,
           "bases": [{k: b[k] for k in ("lsn", "time_us", "records", "bytes", "written_us")} | {"parts": len(b["parts"])}
                     for b in a.bases],
           "manifest_problems": a.manifest_problems}
    if args.json:
        print_json(out)
        return EXIT_OK
    print(f"backup of volume {a.volume_id} ({a.P} protection groups{', encrypted' if out['encrypted'] else ''}) in "
          f"{a.target.describe()}, manifest {m['seq']} (writer epoch {m['epoch']})")
    rows = [[b["lsn"], fmt_time(b["time_us"]), b["records"], b["bytes"], len(b["parts"]), fmt_time(b["written_us"])]
            for b in a.bases]
    print(table(rows, ["base lsn", "restore point time", "records", "bytes", "parts", "taken"]))
    print(f"log: {len(a.segments)} segment(s), LSN {out['segments_first_lsn']}..{out['segments_last_lsn']}, {seg_bytes} bytes")
    if w["oldest_lsn"] is None:
        print("restore window: none yet (no base snapshot)")
    else:
        print(f"restore window: LSN {w['oldest_lsn']} ({fmt_time(w['oldest_time_us'])}) .. LSN {w['latest_lsn']} "
              f"({fmt_time(w['latest_time_us'])})")
    for p in a.manifest_problems:
        print(f"warning: {p}", file=sys.stderr)
    return EXIT_OK


# --- verify ---------------------------------------------------------------------------------
def cmd_backup_verify(args) -> int:
    from engine.backup.restore import verify

    progress = Progress("verify", quiet=args.json)
    try:
        r = verify(args.backup, progress=progress)
    finally:
        progress.end()
    if args.json:
        print_json(r)
    else:
        print(f"{r['files']} file(s), {r['bytes']} bytes checked: " + ("all good" if r["ok"] else f"{len(r['problems'])} problem(s)"))
        for p in r["problems"]:
            print(f"  {p}")
    return EXIT_OK if r["ok"] else EXIT_DAMAGED


# --- restore --------------------------------------------------------------------------------
def cmd_restore(args) -> int:
    from engine.backup.restore import restore
    from engine.envelope import read_key_file

    if args.to_time is not None and args.to_lsn is not None:
        raise SystemExit("sixfold restore: give --to-time or --to-lsn, not both")
    key = read_key_file(args.key_file) if args.key_file else None
    new_key = read_key_file(args.into_key_file) if args.into_key_file else None
    progress = Progress("restore", quiet=args.json)
    try:
        r = restore(args.backup, args.into, to_time=None if args.to_time is None else parse_time(args.to_time),
                    to_lsn=args.to_lsn, key=key, new_key=new_key, cluster=args.cluster, base_port=args.base_port,
                    key_file=args.into_key_file or args.key_file, progress=progress)
    except BackupCorrupt as e:
        progress.end()
        return _damaged(e)
    progress.end()
    if args.json:
        print_json(r)
        return EXIT_OK
    print(f"restored {r['keys']} keys ({r['live_bytes']} bytes) into {r['path']} as volume {r['volume_id']}"
          f"{' (encrypted)' if r['encrypted'] else ''}: cut at LSN {r['cut_lsn']} ({fmt_time(r['cut_time_us'])}), "
          f"from the base at LSN {r['base_lsn']}; {r['seconds']} s, {r['mb_per_s']} MB/s")
    if r["cluster"]:
        print(f"start it with: sixfold cluster up --cluster {r['path']}")
    else:
        print(f"open it with engine.open({r['path']!r})")
    return EXIT_OK


def register(sub) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--backup", metavar="DIR", required=True, help="the backup folder")
    common.add_argument("--json", action="store_true", help="print JSON for scripts")
    p = sub.add_parser("backup", help="backups: a base snapshot now, list, verify", description=(
        "Backups of a volume: its durable log archived continuously plus base snapshots, in a folder. A volume is "
        "backed up by the process running its writer (engine.open(path, backup=DIR), cluster up --backup DIR)."),
        epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    fsub = p.add_subparsers(dest="backup_command", metavar="COMMAND", required=True)
    q = fsub.add_parser("now", parents=[common], help="take a base snapshot now and wait for it", description=(
        "Ask the archiver of the volume backed up into --backup for a base snapshot (it takes it at its archived "
        "position, a CPL) and wait until it is listed. With --volume PATH: open that closed embedded volume with the "
        "backup, take the base, close it. Progress on stderr."))
    q.add_argument("--volume", metavar="PATH", help="a closed embedded volume to open for the base")
    q.add_argument("--key-file", metavar="F", help="the master key of an encrypted --volume")
    q.add_argument("--timeout", type=float, default=3600.0, metavar="S", help="give up after S seconds (default 3600)")
    q.set_defaults(func=cmd_backup_now)
    q = fsub.add_parser("list", parents=[common], help="the bases, the restore window and the log", description=(
        "Show the archive: its volume, every base snapshot (LSN, the time it restores to, size), the log segments "
        "and the restore window (the oldest and newest points a restore may cut at)."))
    q.set_defaults(func=cmd_backup_list)
    q = fsub.add_parser("verify", parents=[common], help="read back and check every file", description=(
        "Read every file of the archive and check it: header, CRCs, format, volume id, every record's CRC, and that "
        "the log is one chain of backlinks from the oldest base on. Exit code 6 when a file is damaged or missing."))
    q.set_defaults(func=cmd_backup_verify)

    p = sub.add_parser("restore", parents=[common], help="a new volume from a backup, to a time or an LSN", description=(
        "Build a new volume (a new volume id) at --into (missing or empty) holding exactly the acknowledged writes up "
        "to --to-time T or --to-lsn L (atomic batches whole; the newest point without either). It opens as an "
        "embedded volume (engine.open(INTO)), or with --cluster as a stopped cluster (sixfold cluster up --cluster "
        "INTO). An encrypted backup needs --key-file (the volume's master key); --into-key-file encrypts the new "
        "volume under another key (a plain backup restored so becomes encrypted). Progress on stderr."),
        epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--into", metavar="NEW", required=True, help="the new volume's folder")
    p.add_argument("--to-time", metavar="T", help="ISO 8601 (2026-12-02T05:40:00Z; no offset: UTC) or @SECONDS")
    p.add_argument("--to-lsn", metavar="L", type=int, help="cut at the last CPL at or below LSN L")
    p.add_argument("--key-file", metavar="F", help="the backed-up volume's master key (an encrypted backup)")
    p.add_argument("--into-key-file", metavar="F", help="encrypt the new volume under this master key "
                   "(default: --key-file's, with a new data key)")
    p.add_argument("--cluster", action="store_true", help="lay the new volume out as a cluster folder")
    p.add_argument("--base-port", type=int, default=None, help="with --cluster: the cluster's base port (default 7400)")
    p.set_defaults(func=cmd_restore)
