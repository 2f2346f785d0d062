"""Client users of the KV service: random bearer tokens, stored as SHA-256 digests, with a role.

Theory of operation
-------------------
A user is a name, a role and a token. `UserStore(folder).add(name, role)` draws the token with
`secrets.token_urlsafe(TOKEN_BYTES)` (256 random bits), returns it once (the caller shows it
to a person) and keeps only its SHA-256, hex, in `DIR/users.json`. A slow password hash (bcrypt,
scrypt) would add nothing: it protects guessable secrets, and a 256-bit random token cannot be
guessed, so one SHA-256 is as strong and costs a microsecond. The file is written atomically
(`engine.files.atomic_write`) with mode 0600, under a lock (`DIR/.users.lock`), so concurrent
`sixfold user ...` commands serialize and a reader sees the old file or the new one.

Roles are ordered, each allowing what the one before allows: `read` (Get, GetMany, Scan, View, HoldReadPoint, WatchReadPoint,
Status, StatusOf), `write` (those and Write), `admin` (everything, including ReplaceNode and
MembershipStatus). `RPC_ROLES` is the table; an RPC missing from it needs `admin`, so a new RPC
is closed until someone decides otherwise.

The writer endpoint checks every call with an `Authenticator` over the users file:

1. the token travels in the request metadata as `authorization: Bearer <token>` (`bearer()`);
2. `admit(peer, metadata, rpc)` stats the users file (about a microsecond) and reloads it when
   its inode, mtime or size changed: every save is a rename, so any change gives a new inode,
   and a removed user's token stops working on the next call, with no restart;
3. it hashes the token and looks up the identity in a cache keyed by (peer, digest), filled from
   the file's users; the whole cache belongs to one load of the file and is dropped with it, so a
   reload can never leave an entry of a removed user behind (a thread still holding the old load
   fills the old, discarded cache);
4. the identity's role must allow the RPC: `PermissionDenied` otherwise. A missing, malformed,
   wrong or removed token is `Unauthenticated`. A users file that cannot be read or fails its
   schema check refuses every call (fail closed) and says why, naming the field.

Refusals are counted (`counters()`) and, when an `AuditLog` is given, recorded there (which
summarises floods). The local operator's token is `DIR/operator.token` (0600), made by
`ensure_operator` (what `sixfold cluster up` runs): the CLI and `engine.connect(folder)` read it
when no token is given, so the person who runs the cluster on this machine needs nothing more.

Rules of this module: standard library, `engine.errors`, `engine.files`, `engine.formats` and
`engine.security.audit` only; it knows nothing of gRPC (metadata is a sequence of pairs).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from engine.errors import InvalidArgument, PermissionDenied, Unauthenticated, WrongFolder
from engine.files import atomic_write
from engine.formats import format_of

log = logging.getLogger("sixfold.auth")

USERS_FILE = "users.json"
USERS_LOCK_FILE = ".users.lock"
OPERATOR_TOKEN_FILE = "operator.token"
#: The user `cluster up` makes for whoever runs the cluster on this machine.
OPERATOR = "operator"
#: The users.json format this release writes and reads.
USERS_FORMAT = 1
#: Random bytes per token: 256 bits (the issue asks at least 128).
TOKEN_BYTES = 32
assert TOKEN_BYTES * 8 >= 128
#: A token as clients may pass it: URL-safe base64 (what `token_urlsafe` draws), bounded.
TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{16,512}")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
DIGEST_RE = re.compile(r"[0-9a-f]{64}")
ROLES: tuple[str, ...] = ("read", "write", "admin")
_RANK = {role: i for i, role in enumerate(ROLES)}
#: The least role each KV RPC needs. Not listed: admin.
RPC_ROLES: dict[str, str] = {
    "Get": "read", "GetMany": "read", "Version": "read", "Watch": "read", "Scan": "read", "View": "read", "HoldReadPoint": "read", "Status": "read", "StatusOf": "read",
    # Who is in the cluster (ids, AZs, addresses): what `sixfold status --via` starts from.
    "Directory": "read",
    # Read positions and SCLs (no data): what a reader instance follows; a read user may see them.
    "WatchReadPoint": "read",
    "Write": "write",
    "ReplaceNode": "admin", "MembershipStatus": "admin",
}
assert set(RPC_ROLES.values()) <= set(ROLES)
TOKEN_ENV = "SIXFOLD_TOKEN"
METADATA_KEY = "authorization"
SCHEME = "Bearer"
#: Bounds: a users file larger than this is refused unread; the identity cache is dropped whole
#: when it reaches its bound (peers come and go; a flood of new connections cannot grow it).
USERS_FILE_BYTES_MAX = 8 << 20
CACHE_ENTRIES_MAX = 4096
LOCK_WAIT_S = 30.0


def digest(token: str) -> str:
    """The SHA-256 of a token, hex: what the users file stores."""
    return hashlib.sha256(token.encode("ascii")).hexdigest()


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


def check_token(token: object, where: str = "the token") -> str:
    """`token` if it has the shape of a token, else InvalidArgument (it never leaves this process)."""
    if not isinstance(token, str) or not TOKEN_RE.fullmatch(token):
        shape = f"a {type(token).__name__}" if not isinstance(token, str) else f"{len(token)} characters"
        raise InvalidArgument(
            f"{where} is not a Sixfold token ({shape}): a token is 16..512 characters of A-Z a-z 0-9 _ -, "
            "as `sixfold user add` printed it"
        )
    return token


def check_name(name: object) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidArgument(
            f"user name {name!r}: a name is 1..64 ASCII letters, digits, _ . or -, starting with a letter or digit"
        )
    return name


def check_role(role: object) -> str:
    if role not in _RANK:
        raise InvalidArgument(f"role {role!r}: roles are {', '.join(ROLES)}")
    return role  # type: ignore[return-value]


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """The request metadata that carries `token`."""
    return ((METADATA_KEY, f"{SCHEME} {check_token(token)}"),)


def read_token_file(path: str | os.PathLike) -> str:
    """The token in a file (surrounding whitespace ignored). OSError if it cannot be read,
    InvalidArgument if it holds no token."""
    with open(path, "rb") as fh:
        raw = fh.read(1024)
    try:
        text = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        text = None
    return check_token(text, f"the token in {os.fspath(path)}")


def role_allows(role: str, rpc: str) -> bool:
    return _RANK[role] >= _RANK[RPC_ROLES.get(rpc, "admin")]


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


@dataclass(frozen=True)
class Identity:
    """A caller the endpoint knows: a user's name and role."""

    name: str
    role: str


@dataclass(frozen=True)
class User:
    name: str
    role: str
    token_sha256: str
    created: str = ""

    def public(self) -> dict:
        """What `sixfold user list` shows (never the digest: it is no secret, but nobody needs it)."""
        return {"name": self.name, "role": self.role, "created": self.created}


# --- the users file -------------------------------------------------------------------------
def parse_users(raw: bytes, where: str) -> list[User]:
    """The users of a users file's bytes; WrongFolder naming the file and the first bad field."""

    def bad(field: str, expected: str, value=None, missing: bool = False) -> WrongFolder:
        found = "it is missing" if missing else f"got {value!r}"[:80]
        return WrongFolder(f"{where} is not a valid users file: field {field!r} must be {expected}, {found} "
                           "(fix it, or restore it from a backup; `sixfold user add` rewrites it)")

    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise WrongFolder(f"{where} is not a valid users file: it is not JSON ({e})") from None
    if not isinstance(doc, dict):
        raise bad("(the whole file)", "an object", doc)
    if "format" not in doc:
        raise bad("format", f"the integer {USERS_FORMAT}", missing=True)
    format_of(doc, USERS_FORMAT, where, "users file was written", WrongFolder)
    users = doc.get("users")
    if not isinstance(users, list):
        raise bad("users", "a list of user objects", users, missing="users" not in doc)
    out: list[User] = []
    names: set[str] = set()
    digests: set[str] = set()
    for i, u in enumerate(users):
        field = f"users[{i}]"
        if not isinstance(u, dict):
            raise bad(field, "an object", u)
        for key, rule, expected in (
            ("name", NAME_RE, "a user name (1..64 of A-Z a-z 0-9 _ . -)"),
            ("token_sha256", DIGEST_RE, "64 lower-case hex digits (a SHA-256)"),
        ):
            if key not in u:
                raise bad(f"{field}.{key}", expected, missing=True)
            if not isinstance(u[key], str) or not rule.fullmatch(u[key]):
                raise bad(f"{field}.{key}", expected, u[key])
        if u.get("role") not in _RANK:
            raise bad(f"{field}.role", f"one of {', '.join(ROLES)}", u.get("role"), missing="role" not in u)
        created = u.get("created", "")
        if not isinstance(created, str):
            raise bad(f"{field}.created", "a string", created)
        if u["name"] in names:
            raise bad(f"{field}.name", "unique", u["name"])
        if u["token_sha256"] in digests:
            raise bad(f"{field}.token_sha256", "unique", u["token_sha256"])
        names.add(u["name"])
        digests.add(u["token_sha256"])
        out.append(User(u["name"], u["role"], u["token_sha256"], created))
    return out


def render_users(users: Sequence[User]) -> bytes:
    doc = {"format": USERS_FORMAT, "users": [
        {"name": u.name, "role": u.role, "token_sha256": u.token_sha256, "created": u.created} for u in users
    ]}
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


class UserStore:
    """The users of a cluster folder (see the module docstring)."""

    def __init__(self, folder: str | os.PathLike, users_file: str | os.PathLike | None = None) -> None:
        self.folder = os.path.abspath(os.fspath(folder))
        self.path = os.path.join(self.folder, os.fspath(users_file or USERS_FILE))

    def users(self) -> list[User]:
        """Every user, in the order they were added (none when there is no users file)."""
        try:
            with open(self.path, "rb") as fh:
                raw = fh.read(USERS_FILE_BYTES_MAX + 1)
        except FileNotFoundError:
            return []
        if len(raw) > USERS_FILE_BYTES_MAX:
            raise WrongFolder(f"{self.path} is larger than {USERS_FILE_BYTES_MAX} bytes: not a users file")
        return parse_users(raw, self.path)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        os.makedirs(self.folder, exist_ok=True)
        fd = os.open(os.path.join(self.folder, USERS_LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            deadline = time.monotonic() + LOCK_WAIT_S
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as e:
                    if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        raise
                if time.monotonic() >= deadline:
                    raise InvalidArgument(f"another command has held {self.folder}/{USERS_LOCK_FILE} for "
                                          f"{LOCK_WAIT_S:g} s; try again once it is done")
                time.sleep(0.02)
            yield
        finally:
            os.close(fd)

    def _save(self, users: Sequence[User]) -> None:
        atomic_write(self.path, render_users(users), mode=0o600)

    def add(self, name: str, role: str) -> str:
        """Add a user; returns its token (shown once: only its digest is kept)."""
        check_name(name)
        check_role(role)
        with self._locked():
            users = self.users()
            if any(u.name == name for u in users):
                raise InvalidArgument(f"there is a user {name!r} already; remove it first to give it a new token")
            token = new_token()
            users.append(User(name, role, digest(token), _utc(time.time())))
            self._save(users)
        return token

    def remove(self, name: str) -> User:
        """Remove a user: its token stops working on the endpoint's next call. Returns it."""
        check_name(name)
        with self._locked():
            users = self.users()
            gone = next((u for u in users if u.name == name), None)
            if gone is None:
                known = ", ".join(u.name for u in users) or "none"
                raise InvalidArgument(f"no user {name!r} in {self.path} (users: {known})")
            self._save([u for u in users if u.name != name])
        return gone

    def ensure_operator(self) -> bool:
        """Make sure the local operator has an admin user whose token is in DIR/operator.token
        (0600); returns True when it made (or replaced) one. A token file that no longer matches
        (its user was removed, the file lost or edited) gets a new token."""
        token_path = os.path.join(self.folder, OPERATOR_TOKEN_FILE)
        with self._locked():
            users = self.users()
            try:
                token = read_token_file(token_path)
            except (OSError, InvalidArgument):
                token = None
            op = next((u for u in users if u.name == OPERATOR), None)
            if token is not None and op is not None and op.role == "admin" and op.token_sha256 == digest(token):
                return False
            token = new_token()
            users = [u for u in users if u.name != OPERATOR]
            users.insert(0, User(OPERATOR, "admin", digest(token), _utc(time.time())))
            # The token file first: if we crash between the two, the old users file still
            # stands and the next `cluster up` tries again.
            atomic_write(token_path, (token + "\n").encode(), mode=0o600)
            self._save(users)
        log.info("made the operator's admin token %s", token_path)
        return True


def operator_token(folder: str | os.PathLike) -> str | None:
    """The local operator's token of a cluster folder, if this process can read it."""
    try:
        return read_token_file(os.path.join(os.fspath(folder), OPERATOR_TOKEN_FILE))
    except (OSError, InvalidArgument):
        return None


def default_token(folder: str | os.PathLike | None) -> str | None:
    """The token a client uses when none is given: $SIXFOLD_TOKEN, else the folder's operator
    token (a cluster folder on this machine), else None."""
    env = os.environ.get(TOKEN_ENV)
    if env:
        return check_token(env.strip(), f"${TOKEN_ENV}")
    return operator_token(folder) if folder is not None else None


# --- the check on the endpoint --------------------------------------------------------------
class _Load:
    """One load of the users file: its signature, its users by digest, and the identity cache
    that belongs to it (dropped with it)."""

    __slots__ = ("signature", "by_digest", "cache", "error")

    def __init__(self, signature, by_digest: dict[str, Identity], error: str = "") -> None:
        self.signature = signature
        self.by_digest = by_digest
        self.cache: dict[tuple[str, str], Identity] = {}
        self.error = error


def token_of(metadata: Sequence[tuple[str, str]] | None) -> str | None:
    """The bearer token in request metadata ("" for a malformed one, None for none)."""
    for key, value in metadata or ():
        if key == METADATA_KEY:
            scheme, _, token = value.partition(" ")
            if scheme.lower() != "bearer" or not TOKEN_RE.fullmatch(token := token.strip()):
                return ""
            return token
    return None


class Authenticator:
    """Checks the bearer token and role of each KV call against a users file (see the module
    docstring). Thread-safe; `admit` is the one entry point."""

    def __init__(self, users_path: str | os.PathLike, audit=None) -> None:
        self.path = os.path.abspath(os.fspath(users_path))
        self.audit = audit
        self._lock = threading.Lock()
        self._load = _Load(None, {}, "not loaded yet")
        self._refused_lock = threading.Lock()
        self.refused_unauthenticated = 0
        self.refused_permission = 0
        self.reloads = 0

    def _signature(self):
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _current(self) -> _Load:
        load = self._load
        if self._signature() == load.signature and load.signature is not None:
            return load
        with self._lock:
            load = self._load
            sig = self._signature()
            if sig != load.signature or sig is None:
                load = self._read()
                self._load = load
        return load

    def _read(self) -> _Load:
        """Load the users file (fail closed: a file that cannot be read admits nobody)."""
        self.reloads += 1
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return _Load(None, {}, f"there is no users file {self.path} (`sixfold user add` or `sixfold cluster up` makes it)")
        except OSError as e:
            return self._broken(None, f"cannot read {self.path}: {e}")
        try:
            st = os.fstat(fd)  # the signature of the very file read, even if it is replaced meanwhile
            sig = (st.st_ino, st.st_mtime_ns, st.st_size)
            if st.st_size > USERS_FILE_BYTES_MAX:
                return self._broken(sig, f"{self.path} is larger than {USERS_FILE_BYTES_MAX} bytes")
            chunks = []
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
        finally:
            os.close(fd)
        try:
            users = parse_users(b"".join(chunks), self.path)
        except WrongFolder as e:
            return self._broken(sig, str(e))
        log.info("loaded %d users from %s", len(users), self.path)
        return _Load(sig, {u.token_sha256: Identity(u.name, u.role) for u in users})

    @staticmethod
    def _broken(sig, why: str) -> _Load:
        log.error("every KV call is refused until the users file is fixed: %s", why)
        return _Load(sig, {}, why)

    def authenticate(self, peer: str, token: str | None) -> Identity:
        """The identity a token names; Unauthenticated if none does."""
        if not token:
            raise Unauthenticated(
                "this endpoint needs a token" + (" (the authorization metadata is malformed)" if token == "" else "")
                + ": pass engine.connect(..., token=...), $SIXFOLD_TOKEN or --token-file (the local operator's "
                "token is DIR/operator.token of the cluster folder)"
            )
        load = self._current()
        key = (peer, digest(token))
        ident = load.cache.get(key)
        if ident is not None:
            return ident
        ident = load.by_digest.get(key[1])
        if ident is None:
            if load.error:
                raise Unauthenticated(f"no token is accepted now: {load.error}")
            raise Unauthenticated("the token is not valid (wrong, or its user was removed); ask an admin for one")
        if len(load.cache) >= CACHE_ENTRIES_MAX:
            load.cache.clear()
        load.cache[key] = ident
        return ident

    @staticmethod
    def authorize(identity: Identity, rpc: str) -> None:
        if not role_allows(identity.role, rpc):
            need = RPC_ROLES.get(rpc, "admin")
            raise PermissionDenied(
                f"user {identity.name!r} has role {identity.role!r}; {rpc} needs role {need!r} or above"
            )

    def admit(self, peer: str, metadata, rpc: str) -> Identity:
        """The caller's identity if it may make `rpc`; Unauthenticated or PermissionDenied
        otherwise (counted, and recorded in the audit log)."""
        token = token_of(metadata)
        try:
            identity = self.authenticate(peer, token)
        except Unauthenticated as e:
            self._refused("anonymous" if token is None else "unknown-token", rpc, peer, e)
            raise
        try:
            self.authorize(identity, rpc)
        except PermissionDenied as e:
            self._refused(identity.name, rpc, peer, e)
            raise
        return identity

    def _refused(self, who: str, rpc: str, peer: str, err: Exception) -> None:
        with self._refused_lock:
            if isinstance(err, Unauthenticated):
                self.refused_unauthenticated += 1
            else:
                self.refused_permission += 1
        if self.audit is not None:
            try:
                self.audit.refused(who, rpc, target="kv", result=type(err).__name__, peer=peer)
            except OSError as e:  # the audit log's disk failed: the refusal stands, say so once per call
                log.warning("could not write the audit log: %s", e)

    def counters(self) -> dict:
        load = self._load
        return {"users": len(load.by_digest), "users_file": self.path, "error": load.error, "reloads": self.reloads,
                "refused_unauthenticated": self.refused_unauthenticated, "refused_permission": self.refused_permission}


__all__ = [
    "CACHE_ENTRIES_MAX", "METADATA_KEY", "OPERATOR", "OPERATOR_TOKEN_FILE", "ROLES", "RPC_ROLES", "TOKEN_BYTES",
    "TOKEN_ENV", "USERS_FILE", "Authenticator", "Identity", "User", "UserStore", "bearer", "check_name", "check_role",
    "check_token", "default_token", "digest", "operator_token", "parse_users", "read_token_file", "role_allows",
    "token_of",
]
