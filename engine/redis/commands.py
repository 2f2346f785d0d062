"""The Redis commands, over a Sixfold `Database`: what each means here, and how it is atomic.

Theory of operation
-------------------
Every command that writes runs as one Sixfold unit and is answered only once that unit is
durable on 4 of 6 segments (the engine's put returns then). A command that reads before it
writes (`INCR`, `SET ... GET`, `GETDEL`, `DEL`'s count, `EXPIRE`, `PERSIST`, `SET KEEPTTL`)
runs in a `Txn`: its reads record the version they saw (`at_version(key, lsn)`, or
`absent(key)`), its writes are logged as one batch under those conditions, and a
conflict (another client wrote one of those keys in between: `PreconditionFailed`) runs the
command again on fresh reads, a bounded number of times. So a read-modify-write is atomic
without a lock: the writer checks the conditions when it orders the batch.

`MULTI`/`EXEC` queue commands and run them all in one `Txn` (one batch, all or nothing), with
each `WATCH`ed key adding `engine.unchanged(key, since=the read point at WATCH)`: if one of
those fails, `EXEC` answers a null array (nothing was written), as Redis does; a conflict on a
key the queued commands only read runs them again. A runtime error in one queued command (`INCR`
of a non-number) is its reply; the others still apply, as in Redis.

Keys and values are Sixfold's: keys 1..480 bytes (an empty or longer key is `ERR`), values up to
1 MiB (an expiring one 8 bytes less). Times to live are the engine's (`ttl_s=`: counted from the
commit time, on the log's clock), deadlines (`EXAT`, `PXAT`) microseconds since the Unix epoch.

Rules of this module: no sockets; a handler takes a `Txn` (or the session) and arguments, and
returns a reply value (`engine.redis.resp`).
"""

from __future__ import annotations

import fnmatch
import re
import threading
from collections import OrderedDict

from engine.core.conditions import absent, at_version
from engine.core.constants import DEADLINE_US_MAX, KEY_BYTES_MAX
from engine.database import TTL_US_MAX, Version
from engine.errors import (
    InvalidArgument,
    PermissionDenied,
    PreconditionFailed,
    ReadOnly,
    SixfoldError,
    StorageFull,
    Unavailable,
    WriteIndeterminate,
)
from engine.redis.resp import OK, Error, Simple
from engine.version import __version__

#: how many times a read-modify-write (or an EXEC) runs again after a conflict
CONFLICT_RETRIES_MAX = 64
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
_INT_RE = re.compile(rb"-?(0|[1-9][0-9]*)\Z")
#: SCAN cursors a server keeps (each maps a number to the key the scan goes on from)
CURSORS_MAX = 100_000
SCAN_COUNT_MAX = 10_000
#: the Redis version the endpoint reports (the command set it follows)
REDIS_VERSION = "7.0.0"


class CommandError(Exception):
    """A command's error reply (syntax, arity, a value that is not a number...)."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


class Conflict(Exception):
    """A Txn's conditions failed: run it again on fresh reads."""


class WatchFailed(Exception):
    """A WATCHed key changed: EXEC answers a null array."""


SYNTAX = "ERR syntax error"
NOT_INTEGER = "ERR value is not an integer or out of range"


def error_reply(e: SixfoldError) -> Error:
    """A Sixfold error as a Redis error reply (a code word, then the engine's message)."""
    msg = str(e)
    if isinstance(e, WriteIndeterminate):
        return Error(f"INDETERMINATE {msg}")
    if isinstance(e, ReadOnly):
        return Error(f"READONLY {msg}")
    if isinstance(e, StorageFull):
        return Error(f"OOM {msg}")
    if isinstance(e, PermissionDenied):
        return Error(f"NOPERM {msg}")
    if isinstance(e, Unavailable):
        return Error(f"TRYAGAIN {msg}")
    return Error(f"ERR {msg}")


def parse_int(b: bytes, error: str = NOT_INTEGER) -> int:
    """A Redis integer argument: canonical decimal, 64-bit."""
    if not _INT_RE.match(b):
        raise CommandError(error)
    n = int(b)
    if not INT64_MIN <= n <= INT64_MAX:
        raise CommandError(error)
    return n


def check_key(key: bytes) -> bytes:
    if not 1 <= len(key) <= KEY_BYTES_MAX:
        raise CommandError(f"ERR invalid key: keys are 1..{KEY_BYTES_MAX} bytes here, got {len(key)}")
    return key


class Txn:
    """Reads that record what they saw, and writes that become one conditional batch."""

    def __init__(self, db) -> None:
        self.db = db
        self.conditions: list = []
        self._read: dict[bytes, Version | None] = {}
        #: key -> (value or None for a delete, kwargs of the put: ttl_s / expires_at_us)
        self.writes: dict[bytes, tuple[bytes | None, dict]] = {}
        self.clock_us = 0

    def read(self, key: bytes) -> Version | None:
        """The key's live version as this Txn sees it (its own writes first)."""
        check_key(key)
        if key in self.writes:
            value, kw = self.writes[key]
            if value is None:
                return None
            deadline = kw.get("expires_at_us") or (self.clock_us + round(kw["ttl_s"] * 1e6) if "ttl_s" in kw else 0)
            return Version(value, 0, deadline, self.clock_us)
        if key not in self._read:
            v = self.db.version(key)
            self._read[key] = v
            self.conditions.append(absent(key) if v is None else at_version(key, v.lsn))
            if v is not None:
                self.clock_us = max(self.clock_us, v.clock_us)
        return self._read[key]

    def get(self, key: bytes) -> bytes | None:
        v = self.read(key)
        return None if v is None else v.value

    def put(self, key: bytes, value: bytes, **kw) -> None:
        check_key(key)
        self.writes[key] = (value, kw)

    def delete(self, key: bytes) -> None:
        check_key(key)
        self.writes[key] = (None, {})

    def commit(self, extra=()) -> None:
        """Log the writes under the reads' conditions (and `extra`); Conflict if the reads'
        failed, WatchFailed if one of `extra` did. Nothing to write: nothing is logged, and the
        reads are checked by reading every key again: unchanged versions mean every read holds
        at that second read's moment, one point for all (a version never comes back: LSNs only
        grow). `extra` (WATCH's unchanged-since) is checked the same way."""
        if not self.writes:
            for key, seen in self._read.items():
                now = self.db.version(key)
                if (now is None) != (seen is None) or (now is not None and now.lsn != seen.lsn):
                    raise Conflict()
            for c in extra:
                now = self.db.version(c.key)
                if now is not None and now.lsn > c.lsn:
                    raise WatchFailed()
            return
        expect = list(self.conditions) + list(extra)
        try:
            with self.db.batch(expect=expect) as b:
                for key, (value, kw) in self.writes.items():
                    if value is None:
                        b.delete(key)
                    else:
                        b.put(key, value, **kw)
        except PreconditionFailed as e:
            if any(i >= len(self.conditions) for i in e.failed):
                raise WatchFailed() from e
            raise Conflict() from e


# --- handlers over a Txn ------------------------------------------------------------------------
def _ttl_kw(kind: bytes, n: int, cmd: str) -> dict:
    # Redis's own reply for a time it cannot keep (not positive, or past what the engine stores:
    # a time to live of TTL_US_MAX, a deadline of DEADLINE_US_MAX), never the engine's message.
    unit_us = {b"EX": 1_000_000, b"PX": 1_000, b"EXAT": 1_000_000}.get(kind, 1_000)
    if n <= 0 or n > (TTL_US_MAX if kind in (b"EX", b"PX") else DEADLINE_US_MAX) // unit_us:
        raise CommandError(f"ERR invalid expire time in '{cmd}' command")
    if kind == b"EX":
        return {"ttl_s": n}
    if kind == b"PX":
        return {"ttl_s": n / 1000}
    if kind == b"EXAT":
        return {"expires_at_us": n * 1_000_000}
    return {"expires_at_us": n * 1_000}  # PXAT


def cmd_set(t: Txn, args):
    key, value = check_key(args[0]), args[1]
    expiry: dict | None = None
    keepttl = get = False
    cond = None
    i = 2
    while i < len(args):
        opt = args[i].upper()
        if opt in (b"EX", b"PX", b"EXAT", b"PXAT") and i + 1 < len(args) and expiry is None and not keepttl:
            n = parse_int(args[i + 1])
            if opt in (b"EXAT", b"PXAT") and n > (INT64_MAX // 1_000_000 if opt == b"EXAT" else INT64_MAX // 1000):
                raise CommandError("ERR invalid expire time in 'set' command")
            expiry = _ttl_kw(opt, n, "set")
            i += 2
        elif opt in (b"NX", b"XX") and cond is None:
            cond, i = opt, i + 1
        elif opt == b"GET" and not get:
            get, i = True, i + 1
        elif opt == b"KEEPTTL" and expiry is None and not keepttl:
            keepttl, i = True, i + 1
        else:
            raise CommandError(SYNTAX)
    old = t.read(key) if (cond or get or keepttl) else None
    exists = old is not None
    if (cond == b"NX" and exists) or (cond == b"XX" and not exists):
        return old.value if get and old is not None else None
    kw = expiry or {}
    if keepttl and old is not None and old.deadline_us:
        kw = {"expires_at_us": old.deadline_us}
    t.put(key, value, **kw)
    if get:
        return None if old is None else old.value
    return OK


def cmd_get(t: Txn, args):
    return t.get(args[0])


def cmd_getdel(t: Txn, args):
    old = t.get(args[0])
    if old is not None:
        t.delete(args[0])
    return old


def cmd_del(t: Txn, args):
    n = 0
    for key in args:
        if t.read(key) is not None:
            n += 1
            t.delete(key)
    return n


def cmd_exists(t: Txn, args):
    return sum(1 for key in args if t.read(key) is not None)


def cmd_mget(t: Txn, args):
    return [t.get(key) for key in args]


def cmd_mset(t: Txn, args):
    if len(args) % 2:
        raise CommandError("ERR wrong number of arguments for 'mset' command")
    for k, v in zip(args[::2], args[1::2]):
        t.put(k, v)
    return OK


def _incr(t: Txn, key: bytes, by: int):
    v = t.read(key)
    current = 0 if v is None else parse_int(v.value)
    n = current + by
    if not INT64_MIN <= n <= INT64_MAX:
        raise CommandError("ERR increment or decrement would overflow")
    # Redis keeps a key's time to live across INCR.
    t.put(key, b"%d" % n, **({"expires_at_us": v.deadline_us} if v is not None and v.deadline_us else {}))
    return n


def cmd_incr(t, args):
    return _incr(t, args[0], 1)


def cmd_decr(t, args):
    return _incr(t, args[0], -1)


def cmd_incrby(t, args):
    return _incr(t, args[0], parse_int(args[1]))


def cmd_decrby(t, args):
    by = parse_int(args[1])
    if by == INT64_MIN:
        raise CommandError("ERR decrement would overflow")
    return _incr(t, args[0], -by)


def _expire(t: Txn, args, unit_us: int, cmd: str, absolute: bool = False):
    key = args[0]
    n = parse_int(args[1])
    flag = args[2].upper() if len(args) > 2 else None
    if len(args) > 3 or flag not in (None, b"NX", b"XX", b"GT", b"LT"):
        raise CommandError(SYNTAX if len(args) <= 3 else f"ERR wrong number of arguments for '{cmd}' command")
    v = t.read(key)
    if v is None:
        return 0
    if abs(n) > INT64_MAX // unit_us or (not absolute and n * unit_us > TTL_US_MAX) \
            or (absolute and n * unit_us > DEADLINE_US_MAX):
        raise CommandError(f"ERR invalid expire time in '{cmd}' command")
    deadline = n * unit_us if absolute else v.clock_us + n * unit_us
    current = v.deadline_us
    if (flag == b"NX" and current) or (flag == b"XX" and not current) \
            or (flag == b"GT" and (not current or deadline <= current)) or (flag == b"LT" and current and deadline >= current):
        return 0
    if deadline <= v.clock_us:  # a time in the past deletes the key, as in Redis
        t.delete(key)
        return 1
    if absolute:
        t.put(key, v.value, expires_at_us=deadline)
    else:
        t.put(key, v.value, ttl_s=n * unit_us / 1e6)  # counted from the commit, on the log's clock
    return 1


def cmd_expire(t, args):
    return _expire(t, args, 1_000_000, "expire")


def cmd_pexpire(t, args):
    return _expire(t, args, 1_000, "pexpire")


def cmd_expireat(t, args):
    return _expire(t, args, 1_000_000, "expireat", absolute=True)


def cmd_pexpireat(t, args):
    return _expire(t, args, 1_000, "pexpireat", absolute=True)


def _ttl(t: Txn, key: bytes, unit_us: int) -> int:
    v = t.read(key)
    if v is None:
        return -2
    if not v.deadline_us:
        return -1
    left_us = max(0, v.deadline_us - v.clock_us)
    return (left_us + unit_us // 2) // unit_us


def cmd_ttl(t, args):
    return _ttl(t, args[0], 1_000_000)


def cmd_pttl(t, args):
    return _ttl(t, args[0], 1_000)


def cmd_persist(t: Txn, args):
    v = t.read(args[0])
    if v is None or not v.deadline_us:
        return 0
    t.put(args[0], v.value)
    return 1


def cmd_strlen(t, args):
    v = t.get(args[0])
    return 0 if v is None else len(v)


def cmd_append(t: Txn, args):
    v = t.read(args[0])
    value = (b"" if v is None else v.value) + args[1]
    t.put(args[0], value, **({"expires_at_us": v.deadline_us} if v is not None and v.deadline_us else {}))
    return len(value)


def cmd_setnx(t: Txn, args):
    if t.read(args[0]) is not None:
        return 0
    t.put(args[0], args[1])
    return 1


def cmd_getset(t: Txn, args):
    old = t.get(args[0])
    t.put(args[0], args[1])
    return old


def cmd_setex(t: Txn, args):
    t.put(check_key(args[0]), args[2], **_ttl_kw(b"EX", parse_int(args[1]), "setex"))
    return OK


def cmd_psetex(t: Txn, args):
    t.put(check_key(args[0]), args[2], **_ttl_kw(b"PX", parse_int(args[1]), "psetex"))
    return OK


class Spec:
    """A command: its handler, Redis's arity (n: exactly n words with the name; -n: at least n),
    whether it writes, and its COMMAND flags and key positions."""

    __slots__ = ("name", "handler", "arity", "writes", "flags", "first", "last", "step")

    def __init__(self, name, handler, arity, writes, flags, first=1, last=1, step=1):
        self.name, self.handler, self.arity, self.writes = name, handler, arity, writes
        self.flags, self.first, self.last, self.step = flags, first, last, step


def _spec(name, handler, arity, writes, first=1, last=1, step=1, flags=()):
    base = ("write", "denyoom") if writes else ("readonly", "fast")
    return Spec(name, handler, arity, writes, tuple(base) + tuple(flags), first, last, step)


#: Commands that run in a Txn (their reads are checked when they write).
TXN_COMMANDS: dict[bytes, Spec] = {s.name.encode(): s for s in (
    _spec("get", cmd_get, 2, False),
    _spec("set", cmd_set, -3, True),
    _spec("getdel", cmd_getdel, 2, True),
    _spec("getset", cmd_getset, 3, True),
    _spec("setnx", cmd_setnx, 3, True),
    _spec("setex", cmd_setex, 4, True),
    _spec("psetex", cmd_psetex, 4, True),
    _spec("del", cmd_del, -2, True, 1, -1),
    _spec("unlink", cmd_del, -2, True, 1, -1),
    _spec("exists", cmd_exists, -2, False, 1, -1),
    _spec("mget", cmd_mget, -2, False, 1, -1),
    _spec("mset", cmd_mset, -3, True, 1, -1, 2),
    _spec("incr", cmd_incr, 2, True),
    _spec("decr", cmd_decr, 2, True),
    _spec("incrby", cmd_incrby, 3, True),
    _spec("decrby", cmd_decrby, 3, True),
    _spec("append", cmd_append, 3, True),
    _spec("strlen", cmd_strlen, 2, False),
    _spec("expire", cmd_expire, -3, True),
    _spec("pexpire", cmd_pexpire, -3, True),
    _spec("expireat", cmd_expireat, -3, True),
    _spec("pexpireat", cmd_pexpireat, -3, True),
    _spec("ttl", cmd_ttl, 2, False),
    _spec("pttl", cmd_pttl, 2, False),
    _spec("persist", cmd_persist, 2, True),
)}

#: Commands the session answers itself (connection state, the server, whole-keyspace reads).
SESSION_COMMANDS: dict[bytes, tuple[int, tuple[str, ...]]] = {
    b"ping": (-1, ("fast",)), b"echo": (2, ("fast",)), b"hello": (-1, ("noscript", "loading", "stale", "fast")),
    b"auth": (-2, ("noscript", "loading", "stale", "fast")), b"quit": (-1, ("fast",)), b"select": (2, ("fast",)),
    b"multi": (1, ("fast",)), b"exec": (1, ("noscript",)), b"discard": (1, ("fast",)), b"watch": (-2, ("fast",)),
    b"unwatch": (1, ("fast",)), b"scan": (-2, ("readonly",)), b"dbsize": (1, ("readonly", "fast")),
    b"info": (-1, ("loading", "stale")), b"command": (-1, ("loading", "stale")), b"client": (-2, ("loading", "stale")),
    b"config": (-2, ("admin", "loading", "stale")), b"reset": (1, ("fast",)),
}
#: Session commands that may not be queued in MULTI (Redis runs them at once or refuses them).
NOT_QUEUED = {b"multi", b"exec", b"discard", b"watch", b"quit", b"reset", b"hello", b"auth"}
#: What a connection may send before AUTH when the endpoint needs it.
BEFORE_AUTH = {b"auth", b"hello", b"quit", b"ping"}


def arity_ok(arity: int, n: int) -> bool:
    return n == arity if arity > 0 else n >= -arity


def wrong_arity(name: bytes) -> str:
    return f"ERR wrong number of arguments for '{name.decode('utf-8', 'replace').lower()}' command"


def unknown_command(argv) -> str:
    name = argv[0].decode("utf-8", "replace")
    rest = " ".join(f"'{a.decode('utf-8', 'replace')[:128]}'" for a in argv[1:])
    return f"ERR unknown command '{name[:128]}', with args beginning with: {rest}" + (" " if rest else "")


def command_info(name: bytes) -> list | None:
    """COMMAND INFO's entry: [name, arity, flags, first key, last key, step, acl categories]."""
    s = TXN_COMMANDS.get(name)
    if s is not None:
        return [name, s.arity, [Simple(f) for f in s.flags], s.first, s.last, s.step, []]
    if name in SESSION_COMMANDS:
        arity, flags = SESSION_COMMANDS[name]
        first = 1 if name == b"watch" else 0
        return [name, arity, [Simple(f) for f in flags], first, -1 if first else 0, 1 if first else 0, []]
    return None


def run_txn(db, handlers, extra=()) -> list:
    """Run handlers (each `f(txn) -> reply`) in one Txn, again on a conflict; their replies.
    WatchFailed if a condition of `extra` failed."""
    for _ in range(CONFLICT_RETRIES_MAX):
        t = Txn(db)
        replies = []
        for h in handlers:
            try:
                replies.append(h(t))
            except CommandError as e:
                replies.append(Error(e.text))
            except InvalidArgument as e:
                replies.append(Error(f"ERR {e}"))
        try:
            t.commit(extra)
        except Conflict:
            continue
        return replies
    raise CommandError("TRYAGAIN the keys of this command changed under it too often; nothing was written")


def glob_match(pattern: bytes, key: bytes) -> bool:
    return fnmatch.fnmatchcase(key, pattern)


class Cursors:
    """SCAN cursors shared by a server's connections: a number names the key a scan goes on
    from. Bounded: the oldest are forgotten (a forgotten cursor is an error, never a restart)."""

    def __init__(self, max_entries: int = CURSORS_MAX) -> None:
        self._lock = threading.Lock()
        self._next = 1
        self._map: OrderedDict[int, bytes] = OrderedDict()
        self._max = max_entries

    def new(self, resume: bytes) -> int:
        with self._lock:
            n = self._next
            self._next += 1
            self._map[n] = resume
            while len(self._map) > self._max:
                self._map.popitem(last=False)
            return n

    def get(self, n: int) -> bytes | None:
        with self._lock:
            return self._map.get(n)


def scan(db, cursors: Cursors, args) -> list:
    cursor = parse_int(args[0], "ERR invalid cursor")
    pattern, count, i = None, 10, 1
    while i < len(args):
        opt = args[i].upper()
        if opt == b"MATCH" and i + 1 < len(args):
            pattern, i = args[i + 1], i + 2
        elif opt == b"COUNT" and i + 1 < len(args):
            count = parse_int(args[i + 1])
            if count < 1:
                raise CommandError(SYNTAX)
            count, i = min(count, SCAN_COUNT_MAX), i + 2
        elif opt == b"TYPE" and i + 1 < len(args):
            if args[i + 1].lower() != b"string":
                return [b"0", []]  # every Sixfold key is a string
            i += 2
        else:
            raise CommandError(SYNTAX)
    if cursor == 0:
        start = b""
    else:
        start = cursors.get(cursor)
        if start is None:
            raise CommandError("ERR invalid cursor")
    keys, resume = [], None
    it = db.scan(start)
    try:
        for n, (key, _value) in enumerate(it):
            if n == count:
                resume = key
                break
            if pattern is None or glob_match(pattern, key):
                keys.append(key)
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()
    return [b"0" if resume is None else b"%d" % cursors.new(resume), keys]


def dbsize(db) -> int:
    it = db.scan()
    try:
        return sum(1 for _ in it)
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()


def info_text(db, section: str | None, extra: dict[str, object]) -> str:
    """INFO: Redis's sections a client looks for, and Sixfold's own facts."""
    st = db.status()
    nodes = st.get("nodes", [])
    up = sum(1 for n in nodes if n.get("up"))
    lag = max((max((n.get("lag") or {0: 0}).values(), default=0) for n in nodes if n.get("up")), default=0)
    # The reader instances, as each says of itself (`extra["replicas"]`, engine.client.reader_statuses),
    # else as a reader's own status says (the read-only port's connection is to the readers).
    readers = extra.get("replicas")
    if readers is None:
        readers = [dict(st["reader"], id="this")] if isinstance(st.get("reader"), dict) else []
    answered = [r for r in readers if "error" not in r]
    reader_lag = max((r.get("lag_lsns", 0) or 0 for r in answered), default=0)
    reader_lag_ms = max((r.get("lag_ms", 0.0) or 0.0 for r in answered), default=0.0)
    replication: dict[str, object] = {"role": "slave" if extra.get("read_only") else "master"}
    if extra.get("read_only"):
        connected = any(r.get("connected") for r in answered)
        replication.update(master_link_status="up" if connected else "down", slave_read_only=1,
                           slave_repl_offset=max((r.get("read_point", 0) for r in answered), default=0))
    else:
        replication.update(connected_slaves=sum(1 for r in answered if r.get("connected")),
                           master_repl_offset=st.get("vdl", 0))
        for i, r in enumerate(readers):
            host, _, port = str(r.get("address", "")).rpartition(":")
            if "error" in r:
                replication[f"slave{i}"] = f"ip={host},port={port},state=unreachable,offset=0,lag=-1,id={r.get('id', '?')}"
            else:
                state = "online" if r.get("connected") else "disconnected"
                replication[f"slave{i}"] = (f"ip={host},port={port},state={state},offset={r.get('read_point', 0)},"
                                            f"lag={int((r.get('lag_ms', 0.0) or 0.0) // 1000)},id={r.get('id', '?')},"
                                            f"lag_lsns={r.get('lag_lsns', 0)},lag_ms={r.get('lag_ms', 0.0)}")
    sections: dict[str, dict[str, object]] = {
        "server": {"redis_version": REDIS_VERSION, "redis_mode": "standalone", "sixfold_version": __version__,
                   "process_id": extra.get("pid", 0), "tcp_port": extra.get("port", 0), "os": "sixfold"},
        "clients": {"connected_clients": extra.get("clients", 0)},
        "persistence": {"loading": 0, "aof_enabled": 1, "durability": "4 of 6 segments before every reply"},
        "replication": replication,
        "sixfold": {"vdl": st.get("vdl", 0), "epoch": st.get("epoch", 0), "nodes": len(nodes), "nodes_up": up,
                    "segment_lag_lsns_max": lag, "readers": len(readers), "readers_answering": len(answered),
                    "replica_lag_lsns_max": reader_lag, "replica_lag_ms_max": reader_lag_ms,
                    "protection_groups": st.get("protection_groups", 0), "encrypted": int(bool(st.get("encrypted")))},
        "keyspace": {},
    }
    wanted = [section] if section and section not in ("all", "everything", "default") else list(sections)
    out = []
    for name in wanted:
        fields = sections.get(name)
        if fields is None:
            continue
        out.append(f"# {name.capitalize()}")
        out.extend(f"{k}:{v}" for k, v in fields.items())
        out.append("")
    return "\r\n".join(out)

