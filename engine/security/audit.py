"""The audit log: one JSON line per administrative action and per refused request.

Theory of operation
-------------------
A cluster's audit log is `DIR/logs/audit.jsonl`. Every line is one JSON object with at least

    time      UTC, ISO 8601 with milliseconds ("2026-12-01T10:00:00.123Z")
    identity  who: a user name, "anonymous" (no token), "unknown-token", or "local:<os user>"
              for a command run on this machine
    action    what: "user add", "cluster up", "node replace", or the refused RPC ("Write")
    target    on what: a user, a node, the cluster folder, "kv"
    result    "ok", or the error class ("Unauthenticated", "PermissionDenied", "ClusterError")

plus `pid`, and for refusals `count` (and `peer`, and `summary: true` on a summary line).

Any process may write it: the CLI records the admin commands it runs, the writer endpoint the
requests it refuses. Each line is appended by one `write()` on a descriptor opened with
O_APPEND, so lines of concurrent processes never interleave (the kernel appends each write
whole at the end of the file); the file is created 0600.

Refusals are summarised when they flood, per identity and second of wall time: the first
refusal of an identity in a second is written as it comes (`count: 1`); the others of that
second are only counted, and written as one summary line (`count: N`, `summary: true`) when
the second is over, at the identity's next refusal, by the next `flush` (the endpoint runs a
flusher thread, `start_flusher`) or at `close`. So the sum of `count` over the refusal lines is
the number of refusals, and a flood of any size costs at most two lines per identity and second.
Identities are bounded (the users, plus "anonymous" and "unknown-token": a wrong token never
names itself), so the summary table is too.

Rules of this module: standard library only; it knows nothing of users, gRPC or clusters.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable

log = logging.getLogger("sixfold.audit")

AUDIT_FILE = os.path.join("logs", "audit.jsonl")
#: A field longer than this is cut (a line stays far below what one write() appends whole).
FIELD_CHARS_MAX = 512
#: How much of the end of the file `tail` reads at most.
TAIL_BYTES_MAX = 16 << 20
FLUSH_INTERVAL_S = 0.5


def audit_path(folder: str | os.PathLike) -> str:
    return os.path.join(os.path.abspath(os.fspath(folder)), AUDIT_FILE)


def utc_text(t: float) -> str:
    ms = int(round((t - int(t)) * 1000))
    if ms == 1000:
        t, ms = int(t) + 1, 0
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(int(t))) + f".{ms:03d}Z"


def local_identity() -> str:
    """Who runs this command on this machine: "local:<os user>"."""
    try:
        return f"local:{getpass.getuser()}"
    except (KeyError, OSError):
        return f"local:uid-{os.getuid()}"


def _cut(value):
    if isinstance(value, str) and len(value) > FIELD_CHARS_MAX:
        return value[: FIELD_CHARS_MAX - 3] + "..."
    return value


class AuditLog:
    """Appends audit lines to one file (see the module docstring). Thread-safe."""

    def __init__(self, path: str | os.PathLike, *, clock: Callable[[], float] = time.time) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.clock = clock
        self._lock = threading.Lock()
        #: identity -> [second, refusals of that second not yet written, last action, result, target]
        self._flood: dict[str, list] = {}
        self._stop = threading.Event()
        self._flusher: threading.Thread | None = None
        self.lines_written = 0

    # --- writing ----------------------------------------------------------------------------
    def _append(self, entry: dict) -> None:
        line = (json.dumps({k: _cut(v) for k, v in entry.items()}, sort_keys=False, ensure_ascii=True) + "\n").encode()
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            written = os.write(fd, line)  # one write: appended whole (see the module docstring)
            if written != len(line):
                raise OSError(f"the audit log took {written} of {len(line)} bytes (disk full?)")
        finally:
            os.close(fd)
        self.lines_written += 1

    def record(self, action: str, *, identity: str, target: str = "", result: str = "ok", **details) -> None:
        """One administrative action, written at once."""
        now = self.clock()
        with self._lock:
            self._flush_locked(now)
            self._append({"time": utc_text(now), "identity": identity, "action": action, "target": target,
                          "result": result, "pid": os.getpid(), **details})

    def refused(self, identity: str, action: str, *, target: str = "", result: str = "refused", **details) -> None:
        """One refused request; floods are summarised per identity and second."""
        now = self.clock()
        second = int(now)
        with self._lock:
            self._flush_locked(now)
            entry = self._flood.get(identity)
            if entry is not None and entry[0] == second:
                entry[1] += 1
                entry[2:] = [action, result, target]
                return
            self._flood[identity] = [second, 0, action, result, target]
            self._append({"time": utc_text(now), "identity": identity, "action": action, "target": target,
                          "result": result, "pid": os.getpid(), "count": 1, **details})

    def _flush_locked(self, now: float | None) -> None:
        """Write the summary of every second that is over (every second, with now=None)."""
        current = None if now is None else int(now)
        for identity in list(self._flood):
            second, count, action, result, target = self._flood[identity]
            if current is not None and second >= current:
                continue
            del self._flood[identity]
            if count:
                self._append({"time": utc_text(second + 1), "identity": identity, "action": action, "target": target,
                              "result": result, "pid": os.getpid(), "count": count, "summary": True,
                              "second": utc_text(second)})

    def flush(self) -> None:
        """Write the summaries of the seconds that are over."""
        with self._lock:
            self._flush_locked(self.clock())

    # --- the flusher ------------------------------------------------------------------------
    def start_flusher(self, interval_s: float = FLUSH_INTERVAL_S) -> None:
        """A daemon thread that writes each summary soon after its second ends."""
        if self._flusher is not None:
            return

        def run() -> None:
            while not self._stop.wait(interval_s):
                try:
                    self.flush()
                except OSError as e:
                    log.warning("could not write the audit log %s: %s", self.path, e)

        self._flusher = threading.Thread(target=run, name="audit-flusher", daemon=True)
        self._flusher.start()

    def close(self) -> None:
        """Stop the flusher and write every pending summary."""
        self._stop.set()
        if self._flusher is not None:
            self._flusher.join(5.0)
        with self._lock:
            self._flush_locked(None)


def record(folder: str | os.PathLike, action: str, *, target: str = "", result: str = "ok",
           identity: str | None = None, **details) -> None:
    """Write one administrative action to a cluster folder's audit log (the CLI's helper)."""
    AuditLog(audit_path(folder)).record(action, identity=identity or local_identity(), target=target, result=result,
                                        **details)


def audited(action: str, func: Callable, *, folder_of: Callable, target_of: Callable | None = None) -> Callable:
    """A command function (`func(args) -> exit code`) that records `action` in the audit log of
    `folder_of(args)` (None: no log, e.g. a folder that is no cluster) once it ran: result "ok",
    "exit N", or the class of the exception it raised. A usage error (SystemExit) did nothing
    and is not recorded. A log that cannot be written never fails the command: it says so."""

    def run(args) -> int:
        target = target_of(args) if target_of is not None else ""
        try:
            code = func(args)
        except SystemExit:
            raise
        except BaseException as e:
            _record_quietly(folder_of(args), action, target or "", type(e).__name__)
            raise
        _record_quietly(folder_of(args), action, target or "", "ok" if not code else f"exit {code}")
        return code

    run.__doc__ = func.__doc__
    return run


def _record_quietly(folder, action: str, target: str, result: str) -> None:
    if folder is None:
        return
    try:
        record(folder, action, target=target, result=result)
    except OSError as e:
        log.warning("could not write the audit log of %s: %s", folder, e)
        print(f"sixfold: warning: could not write the audit log of {folder}: {e}", file=sys.stderr)


def tail(path: str | os.PathLike, n: int = 20) -> list[dict]:
    """The last `n` lines of an audit log, oldest first; a line that is not JSON comes back as
    {"unreadable": text}. No file: no lines."""
    assert n >= 0
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        return []
    with fh:
        fh.seek(0, os.SEEK_END)
        end = fh.tell()
        pos, data = end, b""
        while pos > 0 and data.count(b"\n") <= n and end - pos < TAIL_BYTES_MAX:
            step = min(65536, pos)
            pos -= step
            fh.seek(pos)
            data = fh.read(step) + data
    lines = data.splitlines()
    if pos > 0 and lines:
        lines = lines[1:]  # the first line read may be cut
    out = []
    for raw in lines[-n:] if n else []:
        try:
            entry = json.loads(raw)
            out.append(entry if isinstance(entry, dict) else {"unreadable": raw.decode(errors="replace")})
        except ValueError:
            out.append({"unreadable": raw.decode(errors="replace")})
    return out


__all__ = ["AUDIT_FILE", "AuditLog", "audit_path", "audited", "local_identity", "record", "tail", "utc_text"]
