"""Who is calling, and may they: the identity of a TLS peer and the server-side role policy.

Theory of operation
-------------------
With mutual TLS, every call on a server arrives over a connection whose client certificate a
trusted CA signed. `Guard` is a gRPC server interceptor that, for every call:

1. reads the peer certificate from the call's auth context (`x509_pem_cert`) and turns it into
   an `Identity` (cluster id, role, id, serial, expiry) from its `sixfold://<cluster>/<role>/<id>`
   URI. Parsing is done once per certificate and cached by the certificate's bytes, so a call
   costs a dict lookup and the auth-context read: microseconds.
2. refuses it `Unauthenticated` when the certificate has expired since the connection was made
   or its serial is in the cluster's revocation list (`RevocationList`, re-read when the file
   changes, checked at most every `REVOCATION_CHECK_S`: a `sixfold certs revoke` reaches open
   connections within that, with no restart).
3. refuses it `PermissionDenied` when the certificate belongs to another cluster, or its role
   is not among those the policy (`STORAGE_POLICY`, `KV_POLICY`) lists for the method; a method
   the policy does not name is refused (default deny).

Nothing the caller sends can raise its rights: request metadata is never read here, and the
source that fault rules and logs use is the certificate's id (`Guard.identity`). Refusals are
logged on `sixfold.security` (at most one line per identity and method per second, so a flood
cannot fill the disk; every one is counted) and counted in `Guard.counters()`, which a node's
status carries.

Without TLS (an `--insecure` cluster) there is no guard and no protection: anyone who can reach
a port can call anything. That is what `--insecure` means, and `cluster status` says it.

Rules of this module: standard library, grpc, `cryptography`, `engine.errors` and
`engine.security.certs` only. The caller passes the function that ends a call with an error
(`engine.transport.convert.abort`), so the error mapping stays in one place.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import grpc
from cryptography import x509

from engine.errors import PermissionDenied, SixfoldError, Unauthenticated
from engine.security.certs import URI_SCHEME

log = logging.getLogger("sixfold.security")

NODE, WRITER, READER, ADMIN, CLIENT = "node", "writer", "reader", "admin", "client"
ANY_ROLE = frozenset({NODE, WRITER, READER, ADMIN, CLIENT})

#: Storage service: who may call what. Writes of the log, epochs, truncations and membership come
#: from the writer only; gossip (State, Fetch, RepairAppend) from nodes; segment reads from the
#: writer and readers; the admin reads state and digests (Fetch) and runs scrub and, when the
#: node allows it at all, fault injection.
_STORAGE = "/sixfold.v1.Storage/"
STORAGE_POLICY: dict[str, frozenset[str]] = {
    _STORAGE + "Append": frozenset({WRITER}),
    _STORAGE + "AppendStream": frozenset({WRITER}),
    _STORAGE + "Seal": frozenset({WRITER}),
    _STORAGE + "SyncEpoch": frozenset({WRITER}),
    _STORAGE + "RepairAppend": frozenset({WRITER, NODE}),
    _STORAGE + "Read": frozenset({WRITER, READER}),
    _STORAGE + "ReadMany": frozenset({WRITER, READER}),
    _STORAGE + "ReadManyStream": frozenset({WRITER, READER}),
    _STORAGE + "Scan": frozenset({WRITER, READER}),
    _STORAGE + "Fetch": frozenset({NODE, WRITER, READER, ADMIN}),
    _STORAGE + "State": frozenset({NODE, WRITER, READER, ADMIN}),
    _STORAGE + "Directory": frozenset({NODE, WRITER, READER, ADMIN}),
    _STORAGE + "Scrub": frozenset({ADMIN}),
    _STORAGE + "Corrupt": frozenset({ADMIN}),
    _STORAGE + "SetFaults": frozenset({ADMIN}),
}
#: KV service of the writer endpoint: applications (client) and the operator (admin) read and
#: write; readers read; membership changes are the operator's; anyone of the cluster sees status.
_KV = "/sixfold.v1.KV/"
KV_POLICY: dict[str, frozenset[str]] = {
    _KV + "Write": frozenset({CLIENT, ADMIN}),
    _KV + "WriteStream": frozenset({CLIENT, ADMIN}),
    _KV + "Get": frozenset({CLIENT, ADMIN, READER}),
    _KV + "GetMany": frozenset({CLIENT, ADMIN, READER}),
    _KV + "GetManyStream": frozenset({CLIENT, ADMIN, READER}),
    _KV + "Version": frozenset({CLIENT, ADMIN, READER}),
    _KV + "Watch": frozenset({CLIENT, ADMIN, READER}),
    _KV + "Scan": frozenset({CLIENT, ADMIN, READER}),
    _KV + "View": frozenset({CLIENT, ADMIN, READER}),
    _KV + "HoldReadPoint": frozenset({CLIENT, ADMIN, READER}),
    _KV + "StatusOf": frozenset({CLIENT, ADMIN, READER}),
    _KV + "Status": ANY_ROLE,
    _KV + "Directory": ANY_ROLE,
    _KV + "MembershipStatus": ANY_ROLE,
    _KV + "ReplaceNode": frozenset({ADMIN}),
    # The read point stream: reader instances follow it; the operator may watch it.
    _KV + "WatchReadPoint": frozenset({READER, ADMIN}),
}
#: Every server also serves the standard health service, to any identity of the cluster.
HEALTH_PREFIX = "/grpc.health.v1.Health/"
#: Parsed certificates kept (a cluster has a handful; the bound only stops a slow leak).
CACHE_MAX = 4096
#: 0: every call stats the file (about a microsecond), so a revocation counts from the next call.
REVOCATION_CHECK_S = 0.0
#: At most one log line per identity and method per this many seconds.
LOG_EVERY_S = 1.0


@dataclass(frozen=True)
class Identity:
    """What a peer certificate says (see the module docstring)."""

    cluster: str
    role: str
    id: str
    serial: str  # hex, lower case
    not_after: float  # unix seconds

    def __str__(self) -> str:
        return f"{self.role} {self.id}"


def identity_from_pem(pem: bytes) -> Identity:
    """The identity a certificate names; PermissionDenied when it names none of ours."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    except (ValueError, x509.ExtensionNotFound) as e:
        raise PermissionDenied(f"the peer certificate names no Sixfold identity ({e})") from None
    prefix = URI_SCHEME + "://"
    for uri in uris:
        if uri.startswith(prefix):
            parts = uri[len(prefix):].split("/")
            if len(parts) == 3 and all(parts):
                return Identity(parts[0], parts[1], parts[2], format(cert.serial_number, "x"),
                                cert.not_valid_after_utc.timestamp())
    raise PermissionDenied("the peer certificate names no Sixfold identity (no sixfold:// URI)")


class RevocationList:
    """The revoked serials of `path` (certs.REVOKED_FILE), re-read when the file changes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._serials: frozenset[str] = frozenset()
        self._stamp: tuple | None = None
        self._checked = float("-inf")
        self._lock = threading.Lock()
        self.refresh(force=True)

    def refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked < REVOCATION_CHECK_S:
            return
        with self._lock:
            self._checked = now
            try:
                st = os.stat(self.path)
                stamp = (st.st_mtime_ns, st.st_ino, st.st_size)
            except FileNotFoundError:
                stamp = None
            if stamp == self._stamp and not force:
                return
            serials: frozenset[str] = frozenset()
            if stamp is not None:
                try:
                    with open(self.path, "rb") as fh:
                        data = json.loads(fh.read() or b"{}")
                    serials = frozenset(str(s).lower() for s in (data.get("serials") or {}))
                except (OSError, ValueError, AttributeError) as e:
                    # Fail closed would lock everyone out over a typo; keep the last good list and say so.
                    log.error("cannot read the revocation list %s (keeping the previous one): %s", self.path, e)
                    return
            if serials != self._serials:
                log.warning("revocation list %s: %d certificate(s) revoked", self.path, len(serials))
            self._serials, self._stamp = serials, stamp

    def __contains__(self, serial: str) -> bool:
        self.refresh()
        return serial in self._serials


class Guard(grpc.ServerInterceptor):
    """Authenticate and authorise every call of a server (see the module docstring).

    `abort(context, error)` ends a call with a Sixfold error (`convert.abort`)."""

    def __init__(self, cluster_id: str, policy: Mapping[str, frozenset[str]], revocations: RevocationList | None,
                 abort: Callable[[grpc.ServicerContext, SixfoldError], None], *, me: str = "") -> None:
        self.cluster_id = cluster_id
        self.policy = dict(policy)
        self.revocations = revocations
        self._abort = abort
        self.me = me
        self._cache: dict[bytes, Identity | SixfoldError] = {}
        self._lock = threading.Lock()
        self._refused: dict[str, int] = {}
        self._logged_at: dict[tuple[str, str], float] = {}
        self.refused_total = 0
        self.last_refusal = ""

    # --- identity ---------------------------------------------------------------------------
    def identity(self, context: grpc.ServicerContext) -> Identity:
        """The caller's identity (cached per certificate); Unauthenticated without one."""
        pems = context.auth_context().get("x509_pem_cert")
        if not pems:
            raise Unauthenticated("the call carries no client certificate")
        pem = pems[0]
        found = self._cache.get(pem)
        if found is None:
            try:
                found = identity_from_pem(pem)
            except SixfoldError as e:
                found = e
            with self._lock:
                if len(self._cache) >= CACHE_MAX:
                    self._cache.clear()
                self._cache[pem] = found
        if isinstance(found, SixfoldError):
            raise type(found)(str(found))
        return found

    def check(self, context: grpc.ServicerContext, method: str) -> Identity:
        """The caller's identity if it may call `method`; else Unauthenticated/PermissionDenied."""
        who = self.identity(context)
        if who.not_after < time.time():
            raise Unauthenticated(f"the certificate of {who} (serial {who.serial}) has expired")
        if self.revocations is not None and who.serial in self.revocations:
            raise Unauthenticated(f"the certificate of {who} (serial {who.serial}) was revoked")
        if who.cluster != self.cluster_id:
            raise PermissionDenied(f"{who} belongs to cluster {who.cluster}, not to {self.cluster_id}")
        allowed = ANY_ROLE if method.startswith(HEALTH_PREFIX) else self.policy.get(method)
        if allowed is None or who.role not in allowed:
            short = method.rsplit("/", 1)[-1]
            need = " or ".join(sorted(allowed)) if allowed else "no role (not served)"
            raise PermissionDenied(f"{who} may not call {short} on {self.me or 'this server'} (it needs {need})")
        return who

    # --- accounting -------------------------------------------------------------------------
    def _refuse(self, context, method: str, err: SixfoldError) -> None:
        peer = context.peer()
        try:
            who = str(self.identity(context))
        except SixfoldError:
            who = f"unidentified peer {peer}"
        now = time.monotonic()
        with self._lock:
            self.refused_total += 1
            key = f"{who}: {type(err).__name__}"
            self._refused[key] = self._refused.get(key, 0) + 1
            self.last_refusal = f"{method.rsplit('/', 1)[-1]} from {who}: {err}"
            quiet = now - self._logged_at.get((who, method), float("-inf")) < LOG_EVERY_S
            if not quiet:
                self._logged_at[(who, method)] = now
                if len(self._logged_at) > CACHE_MAX:
                    self._logged_at.clear()
        if not quiet:
            log.warning("%s refused %s from %s (%s): %s", self.me or "server", method, who, peer, err)
        self._abort(context, err)

    def counters(self) -> dict:
        """JSON-ready refusal counters (a node's status carries them)."""
        with self._lock:
            return {"refused": self.refused_total, "refused_by": dict(self._refused), "last_refusal": self.last_refusal}

    # --- the interceptor --------------------------------------------------------------------
    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        guard = self

        def wrap(behaviour):
            if behaviour is None:
                return None

            def guarded(request_or_iterator, context):
                try:
                    guard.check(context, method)
                except SixfoldError as e:
                    guard._refuse(context, method, e)
                return behaviour(request_or_iterator, context)

            return guarded

        return handler._replace(
            unary_unary=wrap(handler.unary_unary), unary_stream=wrap(handler.unary_stream),
            stream_unary=wrap(handler.stream_unary), stream_stream=wrap(handler.stream_stream),
        )


__all__ = ["ADMIN", "ANY_ROLE", "CLIENT", "KV_POLICY", "NODE", "READER", "STORAGE_POLICY", "WRITER", "Guard",
           "Identity", "RevocationList", "identity_from_pem"]
