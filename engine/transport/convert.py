"""The one adapter between Sixfold's core values and protobuf, and between its errors and gRPC.

Theory of operation
-------------------
Core values (`engine.core.types`, `engine.head.writer.ReadView`, write units of
`(flags, key, value)`) are small frozen dataclasses and tuples; protobuf messages exist only at
the gRPC boundary. Every conversion lives here, as a `*_to_pb` / `*_from_pb` pair, and
`tests/test_convert.py` checks that each pair round-trips through the wire bytes.

Messages arriving at a server are untrusted: random bytes often parse as a valid protobuf, so
the `*_args_from_pb` functions check the *meaning* of every field (PG in range, key length, LSN
order, a truncation range that is a range, a membership of six distinct nodes...) and raise the
typed error from `engine.errors` before the node sees anything. Every integer is checked against
its bound in `engine.core.constants` (`EPOCH_MAX`, `LSN_VALID_MAX`, `TRUNCATION_LSN_MAX`), or is
documented as clamped by the node (a scan's limit, a fetch's max_bytes): a u64 can hold values
the engine's arithmetic must never see. Frames stay `bytes`: the codec
checks their lengths and CRCs (and raises `CorruptRecord`), so no record is ever a protobuf.

Errors cross the boundary as the gRPC status of their class (`GRPC_STATUS`) plus the class name
in the trailing metadata key `sixfold-error` (two classes may share a status code). A client
raises the same class again with the same message. A failure that did not come from Sixfold
(no such metadata: the peer is down, the deadline passed, the connection broke) becomes
`Unavailable`; for a write that may already have reached the server it becomes
`WriteIndeterminate`, because the write may or may not have been logged.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import grpc

from engine.core.constants import (
    BATCH_OPS_MAX,
    DEADLINE_US_MAX,
    EXPIRES_BYTES,
    FLAG_EXPIRES,
    OP_TTL,
    NAMESPACE_KEYS,
    NAMESPACE_REQUESTS,
    REQUEST_ID_BYTES_MAX,
    EPOCH_MAX,
    FLAG_DELETE,
    FLAG_PUT,
    FRAME_BYTES_MAX,
    KEY_BYTES_MAX,
    LSN_VALID_MAX,
    PROTECTION_GROUPS_MAX,
    REPLICAS,
    TRUNCATION_LSN_MAX,
    VALUE_BYTES_MAX,
)
from engine.core.types import (
    AppendReply,
    FetchReply,
    Membership,
    NodeState,
    ReadPointUpdate,
    ReadReply,
    ReadView,
    RecordHeader,
    RequestStatus,
    SealReply,
    SegmentSummary,
    TruncationRange,
    Unit,
    VersionEntry,
)
from engine.core.conditions import CONDITIONS_MAX, Condition, check_condition
from engine.errors import (
    ALL_ERRORS,
    Compacted,
    EpochBehind,
    InvalidArgument,
    PreconditionFailed,
    PermissionDenied,
    ResourceExhausted,
    SegmentIncomplete,
    SixfoldError,
    Unauthenticated,
    UnknownProtectionGroup,
    Unavailable,
    WriteIndeterminate,
)
from engine.proto import common_pb2, kv_pb2, storage_pb2

#: Trailing metadata key naming the `engine.errors` class of a failed RPC.
ERROR_METADATA_KEY = "sixfold-error"
#: Request metadata key naming the caller ("writer", a node id, "chaos"...), for fault rules.
SOURCE_METADATA_KEY = "sixfold-source"
#: Request metadata key with the calling process's pid, which fault rules may block as the source
#: `pid:<n>` (`blocked_sources`): a label that can only get a request refused, never admitted, so
#: it is read with TLS too (the chaos nemesis cuts off one writer *process*, whose certificate it
#: shares with every reader that may take over).
PROCESS_METADATA_KEY = "sixfold-process"
PROCESS_SOURCE_PREFIX = "pid:"
#: Storage protocol 2: every storage request names its volume in this metadata key; a node refuses
#: a request without it, or for another volume, with WrongVolume.
VOLUME_METADATA_KEY = "sixfold-volume"
#: Largest gRPC message: the largest frame plus room for the other fields.
MESSAGE_BYTES_MAX = FRAME_BYTES_MAX + (4 << 20)
#: Items in one ReadMany / GetMany / Write request.
BATCH_ITEMS_MAX = 10_000
#: A scan bound longer than any key is still a valid bound, but not an unbounded one.
SCAN_BOUND_BYTES_MAX = KEY_BYTES_MAX + 1

ERRORS_BY_NAME: dict[str, type[SixfoldError]] = {cls.__name__: cls for cls in (SixfoldError, *ALL_ERRORS)}
assert all(hasattr(grpc.StatusCode, cls.GRPC_STATUS) for cls in ERRORS_BY_NAME.values())

# A status code without the class name (the error came from gRPC itself, or an old server)
# maps to the class below; codes not listed (UNKNOWN, INTERNAL, UNIMPLEMENTED, ...) mean the
# peer could not do the work: Unavailable.
_DEFAULT_BY_CODE: dict[grpc.StatusCode, type[SixfoldError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.NOT_FOUND: UnknownProtectionGroup,
    # A refusal by gRPC itself (a TLS or auth layer in front of the servicer) is still a refusal.
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    # SnapshotTooOld shares it as a subclass: a bare OUT_OF_RANGE is "cannot answer here".
    grpc.StatusCode.OUT_OF_RANGE: SegmentIncomplete,
    # PreconditionFailed shares it since conditional writes; a bare ABORTED stays what it was.
    grpc.StatusCode.ABORTED: EpochBehind,
}
#: Codes that say "could not reach it or did not hear back" (or gRPC's own failures) when they
#: come without a class name: never a Sixfold decision.
_UNREACHABLE = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
)
for _cls in ALL_ERRORS:  # the codes that only one class uses
    _code = getattr(grpc.StatusCode, _cls.GRPC_STATUS)
    if _code not in _UNREACHABLE and sum(1 for c in ALL_ERRORS if c.GRPC_STATUS == _cls.GRPC_STATUS) == 1:
        _DEFAULT_BY_CODE.setdefault(_code, _cls)
#: Details of an UNAVAILABLE that prove the request never left this process.
_NOT_SENT_HINTS = ("failed to connect", "connection refused", "dns resolution failed", "name resolution", "no address")


# --- errors ---------------------------------------------------------------------------------
def status_code_of(exc: SixfoldError) -> grpc.StatusCode:
    """The gRPC status an error travels as."""
    return getattr(grpc.StatusCode, type(exc).GRPC_STATUS)


def abort(context: grpc.ServicerContext, exc: SixfoldError) -> None:
    """End the RPC with the error's status and class name (raises, as context.abort does)."""
    name = _known_base(exc).__name__
    context.set_trailing_metadata(((ERROR_METADATA_KEY, name),))
    context.abort(status_code_of(exc), f"{name}: {exc}")


def _known_base(exc: SixfoldError) -> type[SixfoldError]:
    for cls in type(exc).__mro__:
        if cls in ERRORS_BY_NAME.values():
            return cls
    return SixfoldError


def _make(cls: type[SixfoldError], message: str, failed=()) -> SixfoldError:
    if cls is PreconditionFailed:
        return cls(message, tuple(failed))
    if cls is Compacted:
        m = re.search(r"oldest position kept: (\d+)", message)
        return cls(message, min(int(m.group(1)), LSN_VALID_MAX) if m else 0)
    return cls(message)


def error_to_pb(exc: SixfoldError) -> common_pb2.ErrorStatus:
    cls = _known_base(exc)
    return common_pb2.ErrorStatus(code=cls.GRPC_STATUS, error=cls.__name__, message=str(exc),
                                  failed=getattr(exc, "failed", ()))


def error_from_pb(status: common_pb2.ErrorStatus) -> SixfoldError:
    """The exception an ErrorStatus describes (unknown names fall back on the code)."""
    cls = ERRORS_BY_NAME.get(status.error)
    if cls is None:
        code = getattr(grpc.StatusCode, status.code, grpc.StatusCode.UNKNOWN)
        cls = _DEFAULT_BY_CODE.get(code, Unavailable)
    if len(status.failed) > CONDITIONS_MAX:
        raise InvalidArgument(f"an error lists {len(status.failed)} failed conditions; a unit has at most {CONDITIONS_MAX}")
    return _make(cls, status.message, status.failed)


def error_from_rpc(exc: grpc.RpcError, *, where: str, write: bool = False) -> SixfoldError:
    """Translate a failed call into the Sixfold error to raise.

    `where` names the peer for the message. `write=True` marks a call that may have logged
    something on the server (a KV Write): if its fate is unknown it is WriteIndeterminate."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = (exc.details() if hasattr(exc, "details") else None) or ""
    name = None
    trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    for key, value in trailing or ():
        if key == ERROR_METADATA_KEY:
            name = value
    cls = ERRORS_BY_NAME.get(name) if name else None
    if cls is not None:
        prefix = f"{name}: "
        return _make(cls, details[len(prefix):] if details.startswith(prefix) else details)
    code_name = code.name if code is not None else "UNKNOWN"
    message = f"{where}: {code_name}: {details}".rstrip(": ")
    if code in _UNREACHABLE or code not in _DEFAULT_BY_CODE:
        if write and not (code == grpc.StatusCode.UNAVAILABLE and any(h in details.lower() for h in _NOT_SENT_HINTS)):
            return WriteIndeterminate(f"{message}. The write may or may not have been logged; read the key to find out.")
        return Unavailable(message)
    return _make(_DEFAULT_BY_CODE[code], message)


def unreachable(exc: grpc.RpcError) -> bool:
    """True when a failed call never got a Sixfold answer: the peer is down, paused, too slow,
    or the connection broke (as opposed to a peer that answered with an error)."""
    trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    if any(key == ERROR_METADATA_KEY for key, _v in trailing or ()):
        return False
    return (exc.code() if hasattr(exc, "code") else None) in _UNREACHABLE


def fresh(exc: SixfoldError) -> SixfoldError:
    """A new instance of the same class and message (one error object per raising thread)."""
    return _make(type(exc), str(exc))


# --- small field checks ---------------------------------------------------------------------
def _check_pg(pg: int, protection_groups: int) -> int:
    if not 0 <= pg < protection_groups:
        raise UnknownProtectionGroup(f"protection group {pg} does not exist (this volume has {protection_groups})")
    return pg


def _check_key(key: bytes, what: str = "key") -> bytes:
    if not 1 <= len(key) <= KEY_BYTES_MAX:
        raise InvalidArgument(f"{what} of {len(key)} bytes: keys are 1..{KEY_BYTES_MAX} bytes")
    return key


def check_bounded(value: int, bound: int, what: str) -> int:
    """`value` if it is in 0..bound (see the bounds in engine.core.constants), else InvalidArgument.

    Protobuf integers are never negative nor above their width, but a u64 can hold values that
    the engine's arithmetic (`epoch + 1`, `after_lsn + 1`) must never see."""
    if not 0 <= value <= bound:
        raise InvalidArgument(f"{what} {value} is out of range 0..{bound}")
    return value


def _check_epoch(epoch: int, what: str = "epoch") -> int:
    return check_bounded(epoch, EPOCH_MAX, what)


def _check_lsn(lsn: int, what: str) -> int:
    return check_bounded(lsn, LSN_VALID_MAX, what)


def check_count(n: int, what: str) -> None:
    if n > BATCH_ITEMS_MAX:
        raise ResourceExhausted(f"{n} {what} in one request; at most {BATCH_ITEMS_MAX}")


def _check_bound(b: bytes, what: str) -> bytes:
    if len(b) > SCAN_BOUND_BYTES_MAX:
        raise InvalidArgument(f"scan {what} of {len(b)} bytes: at most {SCAN_BOUND_BYTES_MAX}")
    return b


# --- storage: append ------------------------------------------------------------------------
def append_request_to_pb(epoch: int, frame: bytes, hint_lsn: int, collect_lsn: int = 0,
                         collect_requests_lsn: int = 0) -> storage_pb2.AppendRequest:
    return storage_pb2.AppendRequest(epoch=epoch, frame=frame, hint_lsn=hint_lsn, collect_lsn=collect_lsn,
                                     collect_requests_lsn=collect_requests_lsn)


def append_args_from_pb(req: storage_pb2.AppendRequest) -> tuple[int, bytes, int, int, int]:
    """(epoch, frame, hint_lsn, collect_lsn, collect_requests_lsn). The frame's bytes (and its
    records' LSNs) are checked by the node's decoder; the collection points are bounded here and
    bounded again by the node (never above its SCL nor the VDL it knows)."""
    _check_epoch(req.epoch)
    _check_lsn(req.hint_lsn, "hint_lsn")
    _check_lsn(req.collect_lsn, "collect_lsn")
    _check_lsn(req.collect_requests_lsn, "collect_requests_lsn")
    return req.epoch, repair_append_args_from_pb(req), req.hint_lsn, req.collect_lsn, req.collect_requests_lsn


def repair_append_args_from_pb(req: storage_pb2.AppendRequest | storage_pb2.RepairAppendRequest) -> bytes:
    """The frame of an append, bounded in size (the node's decoder checks its bytes)."""
    if len(req.frame) > FRAME_BYTES_MAX:
        raise ResourceExhausted(f"frame of {len(req.frame)} bytes; frames are at most {FRAME_BYTES_MAX}")
    return req.frame


def append_reply_to_pb(r: AppendReply) -> storage_pb2.AppendReply:
    m = storage_pb2.AppendReply(node=r.node, scls=r.scls, space_low=r.space_low, room_bytes=r.room_bytes)
    if r.extent_bytes is not None:
        m.extent_bytes = r.extent_bytes
    return m


def append_reply_from_pb(m: storage_pb2.AppendReply) -> AppendReply:
    return AppendReply(m.node, tuple(m.scls), m.space_low, m.room_bytes,
                       m.extent_bytes if m.HasField("extent_bytes") else None)


# --- storage: reads -------------------------------------------------------------------------
def read_request_to_pb(
    pg: int, key: bytes, read_point: int, required_lsn: int, epoch: int, namespace: int = NAMESPACE_KEYS
) -> storage_pb2.ReadRequest:
    return storage_pb2.ReadRequest(
        pg=pg, key=key, read_point=read_point, required_lsn=required_lsn, epoch=epoch, namespace=namespace
    )


def read_args_from_pb(req: storage_pb2.ReadRequest, protection_groups: int) -> tuple[int, bytes, int, int, int, int]:
    """(pg, key, read_point, required_lsn, epoch, namespace), validated."""
    _check_pg(req.pg, protection_groups)
    _check_key(req.key)
    _check_read_point(req)
    if req.required_lsn > req.read_point:
        raise InvalidArgument(f"required_lsn {req.required_lsn} is above read_point {req.read_point}")
    if req.namespace not in (NAMESPACE_KEYS, NAMESPACE_REQUESTS):
        raise InvalidArgument(f"read namespace {req.namespace}: 0 (keys) or 1 (request ids)")
    if req.namespace == NAMESPACE_REQUESTS and len(req.key) > REQUEST_ID_BYTES_MAX:
        raise InvalidArgument(f"request id of {len(req.key)} bytes: at most {REQUEST_ID_BYTES_MAX}")
    return req.pg, req.key, req.read_point, req.required_lsn, req.epoch, req.namespace


def _check_read_point(req) -> None:
    _check_lsn(req.read_point, "read_point")
    _check_lsn(req.required_lsn, "required_lsn")
    _check_epoch(req.epoch)


def read_reply_to_pb(r: ReadReply) -> storage_pb2.ReadReply:
    found = r.value is not None
    return storage_pb2.ReadReply(node=r.node, lsn=r.lsn, found=found, value=r.value if found else b"", deleted=r.deleted,
                                 deadline_us=r.deadline_us)


def read_reply_from_pb(m: storage_pb2.ReadReply) -> ReadReply:
    return ReadReply(m.node, m.lsn, m.value if m.found else None, m.deleted, min(m.deadline_us, DEADLINE_US_MAX))


def read_many_request_to_pb(items: Sequence[tuple[int, bytes, int, int, int]]) -> storage_pb2.ReadManyRequest:
    m = storage_pb2.ReadManyRequest()
    add = m.reads.add
    for pg, key, read_point, required_lsn, epoch in items:
        add(pg=pg, key=key, read_point=read_point, required_lsn=required_lsn, epoch=epoch)
    return m


def read_results_to_pb(results: Sequence[ReadReply | SixfoldError]) -> storage_pb2.ReadManyReply:
    out = storage_pb2.ReadManyReply()
    for r in results:
        item = out.results.add()
        if isinstance(r, SixfoldError):
            item.error.CopyFrom(error_to_pb(r))
        else:
            item.reply.CopyFrom(read_reply_to_pb(r))
    return out


def read_results_from_pb(m: storage_pb2.ReadManyReply) -> list[ReadReply | SixfoldError]:
    return [error_from_pb(r.error) if r.HasField("error") else read_reply_from_pb(r.reply) for r in m.results]


def scan_request_to_pb(
    pg: int, start: bytes, end: bytes | None, read_point: int, required_lsn: int, limit: int, epoch: int
) -> storage_pb2.SegmentScanRequest:
    m = storage_pb2.SegmentScanRequest(pg=pg, start=start, read_point=read_point, required_lsn=required_lsn, limit=limit, epoch=epoch)
    if end is not None:
        m.end = end
    return m


def scan_args_from_pb(req: storage_pb2.SegmentScanRequest, protection_groups: int):
    """(pg, start, end, read_point, required_lsn, limit, epoch), validated (any u32 limit is
    meaningful: the node clamps it to 1..10,000)."""
    _check_pg(req.pg, protection_groups)
    _check_bound(req.start, "start")
    end = _check_bound(req.end, "end") if req.HasField("end") else None
    _check_read_point(req)
    if req.required_lsn > req.read_point:
        raise InvalidArgument(f"required_lsn {req.required_lsn} is above read_point {req.read_point}")
    return req.pg, req.start, end, req.read_point, req.required_lsn, req.limit, req.epoch


def version_entry_to_pb(e: VersionEntry) -> storage_pb2.VersionEntry:
    return storage_pb2.VersionEntry(key=e.key, lsn=e.lsn, deleted=e.value is None, value=e.value or b"", deadline_us=e.deadline_us)


def version_entry_from_pb(m: storage_pb2.VersionEntry) -> VersionEntry:
    return VersionEntry(m.key, m.lsn, None if m.deleted else m.value, min(m.deadline_us, DEADLINE_US_MAX))


def scan_reply_to_pb(entries: Sequence[VersionEntry], resume: bytes | None) -> storage_pb2.SegmentScanReply:
    m = storage_pb2.SegmentScanReply(entries=[version_entry_to_pb(e) for e in entries])
    if resume is not None:
        m.resume = resume
    return m


def scan_reply_from_pb(m: storage_pb2.SegmentScanReply) -> tuple[list[VersionEntry], bytes | None]:
    return [version_entry_from_pb(e) for e in m.entries], (m.resume if m.HasField("resume") else None)


# --- storage: epochs, recovery --------------------------------------------------------------
def truncation_to_pb(t: TruncationRange) -> storage_pb2.TruncationRange:
    return storage_pb2.TruncationRange(epoch=t.epoch, first=t.first, last=t.last)


def truncation_from_pb(m: storage_pb2.TruncationRange) -> TruncationRange:
    if not 1 <= m.first <= m.last:
        raise InvalidArgument(f"truncation range {m.first}..{m.last} is not a range of LSNs (need 1 <= first <= last)")
    return TruncationRange(m.epoch, m.first, m.last)


def membership_to_pb(m: Membership) -> storage_pb2.Membership:
    return storage_pb2.Membership(epoch=m.epoch, members=m.members, next_members=m.next_members or ())


def membership_from_pb(m: storage_pb2.Membership) -> Membership:
    for what, ids in (("members", m.members), ("next_members", m.next_members)):
        if what == "next_members" and not ids:
            continue
        if len(ids) != REPLICAS or len(set(ids)) != REPLICAS or not all(ids):
            raise InvalidArgument(f"membership {what} must be {REPLICAS} distinct node ids, got {list(ids)}")
    return Membership(m.epoch, tuple(m.members), tuple(m.next_members) if m.next_members else None)


_HEADER = struct.Struct("<QQB")


def _pack_headers(headers: Sequence[RecordHeader]) -> bytes:
    return b"".join(_HEADER.pack(h.lsn, h.prev_lsn, h.flags) for h in headers)


def _unpack_headers(raw: bytes) -> tuple[RecordHeader, ...]:
    if len(raw) % _HEADER.size:
        raise InvalidArgument(f"record_headers of {len(raw)} bytes is not a multiple of {_HEADER.size}")
    return tuple(RecordHeader(*t) for t in _HEADER.iter_unpack(raw))


def seal_args_from_pb(req: storage_pb2.SealRequest) -> int:
    """The epoch to seal at, bounded (the node also refuses a step above EPOCH_STEP_MAX)."""
    return _check_epoch(req.epoch)


def scrub_args_from_pb(req: storage_pb2.ScrubRequest) -> int:
    """records_max (0 = one full pass); any u64 is meaningful."""
    return req.records_max


def seal_reply_to_pb(r: SealReply) -> storage_pb2.SealReply:
    return storage_pb2.SealReply(
        node=r.node,
        epoch=r.epoch,
        segments=[
            storage_pb2.SegmentSummary(
                node=s.node, pg=s.pg, scl=s.scl, hint_lsn=s.hint_lsn, last_lsn_at_hint=s.last_lsn_at_hint,
                record_headers=_pack_headers(s.records),
            )
            for s in r.segments
        ],
        truncations=[truncation_to_pb(t) for t in r.truncations],
    )


def seal_reply_from_pb(m: storage_pb2.SealReply) -> SealReply:
    return SealReply(
        m.node,
        m.epoch,
        tuple(
            SegmentSummary(s.node, s.pg, s.scl, s.hint_lsn, s.last_lsn_at_hint, _unpack_headers(s.record_headers))
            for s in m.segments
        ),
        tuple(truncation_from_pb(t) for t in m.truncations),
    )


def sync_epoch_request_to_pb(epoch: int, truncations: Sequence[TruncationRange], membership: Membership | None,
                             proof: bytes = b""):
    m = storage_pb2.SyncEpochRequest(epoch=epoch, truncations=[truncation_to_pb(t) for t in truncations], epoch_proof=proof)
    if membership is not None:
        m.membership.CopyFrom(membership_to_pb(membership))
    return m


def sync_epoch_args_from_pb(req: storage_pb2.SyncEpochRequest):
    """(epoch, truncations, membership), validated."""
    _check_epoch(req.epoch)
    for t in req.truncations:
        _check_epoch(t.epoch, "truncation range epoch")
        check_bounded(t.first, TRUNCATION_LSN_MAX, "truncation range first LSN")
        check_bounded(t.last, TRUNCATION_LSN_MAX, "truncation range last LSN")
    if req.HasField("membership"):
        _check_epoch(req.membership.epoch, "membership epoch")
    truncations = tuple(truncation_from_pb(t) for t in req.truncations)
    for t in truncations:
        if t.epoch > req.epoch:
            raise InvalidArgument(f"truncation range of epoch {t.epoch} is newer than the epoch {req.epoch} being adopted")
    membership = membership_from_pb(req.membership) if req.HasField("membership") else None
    if membership is not None and membership.epoch > req.epoch:
        raise InvalidArgument(f"membership of epoch {membership.epoch} is newer than the epoch {req.epoch} being adopted")
    return req.epoch, truncations, membership


def node_state_to_pb(s: NodeState) -> storage_pb2.NodeState:
    m = storage_pb2.NodeState(
        node=s.node, az=s.az, epoch=s.epoch, scls=s.scls, hint_lsn=s.hint_lsn, records=s.records, bytes=s.bytes,
        corrupt_found=s.corrupt_found, repaired=s.repaired, truncations=[truncation_to_pb(t) for t in s.truncations],
        extra_json=json.dumps(s.extra, sort_keys=True, default=str) if s.extra else "",
        conflicts_refused=s.conflicts_refused, used_bytes=s.used_bytes, capacity_bytes=s.capacity_bytes,
        space_low=s.space_low, room_bytes=s.room_bytes, epoch_proof=s.epoch_proof, lease_age_ms=s.lease_age_ms,
        horizons=s.horizons, swept=s.swept, collected_records=s.collected_records, pages_used=s.pages_used,
        page_bytes=s.page_bytes,
    )
    if s.extent_bytes is not None:
        m.extent_bytes = s.extent_bytes
    if s.membership is not None:
        m.membership.CopyFrom(membership_to_pb(s.membership))
    return m


def node_state_from_pb(m: storage_pb2.NodeState) -> NodeState:
    """A node's state (a peer's, for gossip): the collection LSNs bounded like every LSN."""
    for what, lsns in (("horizons", m.horizons), ("swept", m.swept)):
        if len(lsns) > PROTECTION_GROUPS_MAX:
            raise InvalidArgument(f"node state with {len(lsns)} {what}: at most {PROTECTION_GROUPS_MAX}")
        for lsn in lsns:
            _check_lsn(lsn, what)
    return NodeState(
        node=m.node, az=m.az, epoch=m.epoch, scls=tuple(m.scls), hint_lsn=m.hint_lsn, records=m.records, bytes=m.bytes,
        corrupt_found=m.corrupt_found, repaired=m.repaired,
        truncations=tuple(truncation_from_pb(t) for t in m.truncations),
        membership=membership_from_pb(m.membership) if m.HasField("membership") else None,
        extra=json.loads(m.extra_json) if m.extra_json else {},
        conflicts_refused=m.conflicts_refused, used_bytes=m.used_bytes, capacity_bytes=m.capacity_bytes,
        space_low=m.space_low, room_bytes=m.room_bytes, epoch_proof=m.epoch_proof, lease_age_ms=m.lease_age_ms,
        horizons=tuple(m.horizons), swept=tuple(m.swept), collected_records=m.collected_records, pages_used=m.pages_used,
        page_bytes=m.page_bytes, extent_bytes=m.extent_bytes if m.HasField("extent_bytes") else None,
    )


def fetch_request_to_pb(pg: int, after_lsn: int, max_bytes: int, upto_lsn: int | None) -> storage_pb2.FetchRequest:
    m = storage_pb2.FetchRequest(pg=pg, after_lsn=after_lsn, max_bytes=max_bytes)
    if upto_lsn is not None:
        m.upto_lsn = upto_lsn
    return m


def fetch_reply_to_pb(r: FetchReply) -> storage_pb2.FetchReply:
    return storage_pb2.FetchReply(frame=r.frame, more=r.more, complete_lsn=r.complete_lsn, horizon_lsn=r.horizon_lsn)


def fetch_reply_from_pb(m: storage_pb2.FetchReply) -> FetchReply:
    """The reply of a peer, bounded like every LSN (the receiver bounds the claim again by the
    fetch it asked for and the VDL it knows)."""
    _check_lsn(m.complete_lsn, "complete_lsn")
    _check_lsn(m.horizon_lsn, "horizon_lsn")
    return FetchReply(m.frame, m.more, m.complete_lsn, m.horizon_lsn)


def fetch_args_from_pb(req: storage_pb2.FetchRequest, protection_groups: int):
    """(pg, after_lsn, max_bytes, upto_lsn), validated (any u64 max_bytes is meaningful: the
    node clamps it to 1 .. 8 MiB)."""
    _check_pg(req.pg, protection_groups)
    _check_lsn(req.after_lsn, "after_lsn")
    upto = _check_lsn(req.upto_lsn, "upto_lsn") if req.HasField("upto_lsn") else None
    if upto is not None and upto < req.after_lsn:
        raise InvalidArgument(f"fetch range ({req.after_lsn}, {upto}] is empty: upto_lsn is below after_lsn")
    return req.pg, req.after_lsn, req.max_bytes, upto


def corrupt_request_to_pb(pg: int, lsn: int | None, bit: int) -> storage_pb2.CorruptRequest:
    m = storage_pb2.CorruptRequest(pg=pg, bit=bit)
    if lsn is not None:
        m.lsn = lsn
    return m


def corrupt_args_from_pb(req: storage_pb2.CorruptRequest, protection_groups: int):
    """(pg, lsn or None, bit), validated (any u64 bit is meaningful: it is taken modulo the
    record's length)."""
    _check_pg(req.pg, protection_groups)
    if req.HasField("lsn") and req.lsn == 0:
        raise InvalidArgument("lsn 0 names no record (LSNs start at 1)")
    if req.HasField("lsn"):
        _check_lsn(req.lsn, "lsn")
    return req.pg, (req.lsn if req.HasField("lsn") else None), req.bit


# --- fault rules ----------------------------------------------------------------------------
@dataclass(frozen=True)
class FaultRules:
    """Transport faults a node applies to the requests it receives (see FaultSpec in
    storage.proto). The default value is "no faults"."""

    groups: tuple[tuple[str, ...], ...] = ()
    blocked_sources: tuple[str, ...] = ()
    drop_probability: float = 0.0
    duplicate_probability: float = 0.0
    delay_ms: int = 0
    delay_jitter_ms: int = 0
    seed: int = 0

    @property
    def active(self) -> bool:
        return self != FaultRules(seed=self.seed)


DELAY_MS_MAX = 60_000


def fault_rules_to_pb(r: FaultRules) -> storage_pb2.FaultSpec:
    return storage_pb2.FaultSpec(
        groups=[storage_pb2.EndpointGroup(endpoints=g) for g in r.groups],
        blocked_sources=r.blocked_sources,
        drop_probability=r.drop_probability,
        duplicate_probability=r.duplicate_probability,
        delay_ms=r.delay_ms,
        delay_jitter_ms=r.delay_jitter_ms,
        seed=r.seed,
    )


def fault_rules_from_pb(m: storage_pb2.FaultSpec) -> FaultRules:
    for name in ("drop_probability", "duplicate_probability"):
        p = getattr(m, name)
        if not 0.0 <= p <= 1.0:  # also refuses NaN
            raise InvalidArgument(f"{name} {p} is not a probability in 0..1")
    for name in ("delay_ms", "delay_jitter_ms"):
        if getattr(m, name) > DELAY_MS_MAX:
            raise InvalidArgument(f"{name} {getattr(m, name)} exceeds {DELAY_MS_MAX}")
    groups = tuple(tuple(g.endpoints) for g in m.groups)
    seen = [e for g in groups for e in g]
    if len(seen) != len(set(seen)):
        raise InvalidArgument(f"partition groups must be disjoint, got {[list(g) for g in groups]}")
    return FaultRules(
        groups=groups,
        blocked_sources=tuple(m.blocked_sources),
        drop_probability=m.drop_probability,
        duplicate_probability=m.duplicate_probability,
        delay_ms=m.delay_ms,
        delay_jitter_ms=m.delay_jitter_ms,
        seed=m.seed,
    )


# --- KV: writes -----------------------------------------------------------------------------
Op = tuple[int, bytes, bytes]


def unit_to_pb(unit: Unit | Sequence[Op]) -> kv_pb2.Unit:
    if not isinstance(unit, Unit):
        unit = Unit(tuple(unit))
    return kv_pb2.Unit(
        ops=[kv_pb2.Op(flags=f, key=k, value=v) for f, k, v in unit.ops], request_id=unit.request_id or b"", resend=unit.resend,
        conditions=[condition_to_pb(c) for c in unit.conditions],
    )


def condition_to_pb(c: Condition) -> kv_pb2.Condition:
    return kv_pb2.Condition(key=c.key, kind=c.kind, value=c.value, lsn=c.lsn)


def condition_from_pb(m: kv_pb2.Condition) -> Condition:
    """A condition, validated (InvalidArgument: its unit is refused, nothing logged)."""
    return check_condition(Condition(m.key, m.kind, m.value, m.lsn))


def write_request_to_pb(units: Sequence[Unit | Sequence[Op]]) -> kv_pb2.WriteRequest:
    # `add(...)` builds each message in place: about twice as fast as nested constructors,
    # and this runs for every write a client sends.
    m = kv_pb2.WriteRequest()
    add_unit = m.units.add
    for unit in units:
        if isinstance(unit, Unit):
            u = add_unit(request_id=unit.request_id or b"", resend=unit.resend)
            ops = unit.ops
            if unit.conditions:
                u.conditions.extend(condition_to_pb(c) for c in unit.conditions)
        else:
            u, ops = add_unit(), unit
        add_op = u.ops.add
        for f, k, v in ops:
            add_op(flags=f, key=k, value=v)
    return m


def unit_from_pb(m: kv_pb2.Unit) -> Unit:
    """A unit, validated (InvalidArgument: the unit is refused, nothing logged)."""
    rid = m.request_id
    if len(rid) > REQUEST_ID_BYTES_MAX:
        raise InvalidArgument(f"request id of {len(rid)} bytes: request ids are 1..{REQUEST_ID_BYTES_MAX} bytes")
    if m.resend and not rid:
        raise InvalidArgument("a re-sent unit names its request id")
    if len(m.conditions) > CONDITIONS_MAX:
        raise InvalidArgument(f"a unit carries at most {CONDITIONS_MAX} conditions, got {len(m.conditions)}")
    return Unit(_unit_ops_from_pb(m), rid or None, m.resend, tuple(condition_from_pb(c) for c in m.conditions))


def _unit_ops_from_pb(m: kv_pb2.Unit) -> tuple[Op, ...]:
    ops = m.ops
    if not 1 <= len(ops) <= BATCH_OPS_MAX:
        raise InvalidArgument(f"a unit holds 1..{BATCH_OPS_MAX} operations, got {len(ops)}")
    out = []
    for op in ops:
        flags, key, value = op.flags, op.key, op.value
        if flags & FLAG_EXPIRES and flags in _EXPIRING_PUT_FLAGS:
            _check_expiring(flags, key, value)
            out.append((flags, key, value))
            continue
        if not (flags == FLAG_PUT or (flags == FLAG_DELETE and not value)) or not 1 <= len(key) <= KEY_BYTES_MAX \
                or len(value) > VALUE_BYTES_MAX:
            if flags not in (FLAG_PUT, FLAG_DELETE):
                raise InvalidArgument(f"op flags {flags:#x}: use 1 (PUT) or 2 (DELETE)")
            if flags == FLAG_DELETE and value:
                raise InvalidArgument("a DELETE carries no value")
            _check_key(key)
            raise InvalidArgument(f"value of {len(value)} bytes: values are at most {VALUE_BYTES_MAX} bytes")
        out.append((flags, key, value))
    return tuple(out)


_EXPIRING_PUT_FLAGS = (FLAG_PUT | FLAG_EXPIRES, FLAG_PUT | FLAG_EXPIRES | OP_TTL)
_U64LE = struct.Struct("<Q")


def _check_expiring(flags: int, key: bytes, value: bytes) -> None:
    """An expiring put's op: a key, a deadline (or ttl) prefix in bounds, a value that fits."""
    _check_key(key)
    if not EXPIRES_BYTES <= len(value) <= VALUE_BYTES_MAX:
        raise InvalidArgument(f"an expiring put's value is its {EXPIRES_BYTES}-byte deadline then at most "
                              f"{VALUE_BYTES_MAX - EXPIRES_BYTES} bytes, got {len(value)} bytes")
    t = _U64LE.unpack_from(value)[0]
    bound = DEADLINE_US_MAX // 2 if flags & OP_TTL else DEADLINE_US_MAX
    if not 1 <= t <= bound:
        raise InvalidArgument(f"an expiring put's {'time to live' if flags & OP_TTL else 'deadline'} is 1..{bound} microseconds, got {t}")


def watch_args_of_pb(m: kv_pb2.WatchRequest) -> tuple[bytes, int | None]:
    """(prefix, start or None), in bounds."""
    if len(m.prefix) > KEY_BYTES_MAX:
        raise InvalidArgument(f"a watch prefix is at most {KEY_BYTES_MAX} bytes, got {len(m.prefix)}")
    return m.prefix, (_check_lsn(m.start, "watch start") if m.HasField("start") else None)


def watch_batch_to_pb(changes, position: int) -> kv_pb2.WatchBatch:
    m = kv_pb2.WatchBatch(position=position)
    add = m.changes.add
    for cpl, key, value in changes:
        add(key=key, value=value or b"", deleted=value is None, position=cpl)
    return m


def watch_batch_from_pb(m: kv_pb2.WatchBatch) -> tuple[list[tuple[int, bytes, bytes | None]], int]:
    _check_lsn(m.position, "watch position")
    out = []
    for c in m.changes:
        _check_lsn(c.position, "change position")
        out.append((c.position, c.key, None if c.deleted else c.value))
    return out, m.position


def version_key_from_pb(m: kv_pb2.VersionRequest) -> bytes:
    return _check_key(m.key)


def version_reply_to_pb(lsn: int, value: bytes | None, deadline_us: int, clock_us: int) -> kv_pb2.VersionReply:
    if value is None or lsn == 0:
        return kv_pb2.VersionReply(clock_us=clock_us)
    return kv_pb2.VersionReply(found=True, value=value, lsn=lsn, deadline_us=deadline_us, clock_us=clock_us)


def version_reply_from_pb(m: kv_pb2.VersionReply) -> tuple[int, bytes | None, int, int]:
    """(lsn, value or None, deadline, clock), in bounds."""
    _check_lsn(m.lsn, "version lsn")
    if m.found and m.lsn == 0:
        raise InvalidArgument("a version that is found has an LSN")
    return (m.lsn, m.value, min(m.deadline_us, DEADLINE_US_MAX), min(m.clock_us, DEADLINE_US_MAX)) if m.found \
        else (0, None, 0, min(m.clock_us, DEADLINE_US_MAX))


def write_results_to_pb(results: Sequence[int | SixfoldError]) -> kv_pb2.WriteReply:
    out = kv_pb2.WriteReply()
    add = out.results.add
    for r in results:
        if isinstance(r, SixfoldError):
            add(error=error_to_pb(r))
        else:
            add(lsn=r)
    return out


def write_results_from_pb(m: kv_pb2.WriteReply) -> list[int | SixfoldError]:
    return [error_from_pb(r.error) if r.HasField("error") else r.lsn for r in m.results]


REQUEST_STATES = ("committed", "pending", "not_committed")


def request_status_to_pb(r: RequestStatus) -> kv_pb2.RequestStatusReply:
    return kv_pb2.RequestStatusReply(request_id=r.request_id, state=r.state, lsn=r.lsn)


def request_status_from_pb(m: kv_pb2.RequestStatusReply) -> RequestStatus:
    if m.state not in REQUEST_STATES:
        raise InvalidArgument(f"request state {m.state!r}: one of {', '.join(REQUEST_STATES)}")
    return RequestStatus(m.request_id, m.state, m.lsn)


def status_of_args_from_pb(m: kv_pb2.StatusOfRequest) -> bytes:
    if not 1 <= len(m.request_id) <= REQUEST_ID_BYTES_MAX:
        raise InvalidArgument(f"request id of {len(m.request_id)} bytes: request ids are 1..{REQUEST_ID_BYTES_MAX} bytes")
    return m.request_id


# --- KV: reads ------------------------------------------------------------------------------
def read_view_to_pb(v: ReadView) -> common_pb2.ReadView:
    return common_pb2.ReadView(read_point=v.read_point, tails=v.tails)


def read_view_from_pb(m: common_pb2.ReadView, protection_groups: int | None = None) -> ReadView:
    """A ReadView; with `protection_groups`, also checks it has one tail per PG, none above the
    read point."""
    tails = tuple(m.tails)
    if protection_groups is not None and len(tails) != protection_groups:
        raise InvalidArgument(f"read view has {len(tails)} tails; this volume has {protection_groups} protection groups")
    if any(t > m.read_point for t in tails):
        raise InvalidArgument(f"read view tails {max(tails)} above its read point {m.read_point}")
    return ReadView(m.read_point, tails)


#: Bounds of a held read point's lease (engine.head.readpoints.LEASE_S_MAX), and the default.
HOLD_LEASE_MS_MAX = 86_400_000
HOLD_LEASE_MS_DEFAULT = 30_000


def hold_request_to_pb(registration: int = 0, lease_ms: int = 0, release: bool = False) -> kv_pb2.HoldReadPointRequest:
    return kv_pb2.HoldReadPointRequest(registration=registration, lease_ms=lease_ms, release=release)


def hold_args_from_pb(req: kv_pb2.HoldReadPointRequest) -> tuple[int, float, bool]:
    """(registration, lease in seconds, release), bounded (lease 0: the default)."""
    check_bounded(req.registration, LSN_VALID_MAX, "registration")
    lease_ms = check_bounded(req.lease_ms, HOLD_LEASE_MS_MAX, "lease_ms") or HOLD_LEASE_MS_DEFAULT
    if req.release and not req.registration:
        raise InvalidArgument("release names no registration")
    return req.registration, lease_ms / 1000, req.release


def hold_reply_to_pb(view: ReadView | None, registration: int, lease_s: float) -> kv_pb2.HoldReadPointReply:
    m = kv_pb2.HoldReadPointReply(registration=registration, lease_ms=int(round(lease_s * 1000)))
    if view is not None:
        m.view.CopyFrom(read_view_to_pb(view))
    return m


def hold_reply_from_pb(m: kv_pb2.HoldReadPointReply) -> tuple[ReadView | None, int, float]:
    return (read_view_from_pb(m.view) if m.HasField("view") else None), m.registration, m.lease_ms / 1000


def get_request_to_pb(key: bytes, quorum: bool, view: ReadView | None, after: int = 0) -> kv_pb2.GetRequest:
    m = kv_pb2.GetRequest(key=key, quorum=quorum, after=after)
    if view is not None:
        m.view.CopyFrom(read_view_to_pb(view))
    return m


def get_args_from_pb(m: kv_pb2.GetRequest, protection_groups: int) -> tuple[bytes, bool, ReadView | None]:
    _check_key(m.key)
    return m.key, m.quorum, read_view_from_pb(m.view, protection_groups) if m.HasField("view") else None


def after_from_pb(m) -> int:
    """The `after` commit position of a GetRequest or ScanRequest (0: none), in bounds."""
    return _check_lsn(m.after, "after")


def get_reply_to_pb(value: bytes | None) -> kv_pb2.GetReply:
    return kv_pb2.GetReply(found=value is not None, value=value or b"")


def get_reply_from_pb(m: kv_pb2.GetReply) -> bytes | None:
    return m.value if m.found else None


def get_results_to_pb(results: Sequence[bytes | None | SixfoldError]) -> kv_pb2.GetManyReply:
    out = kv_pb2.GetManyReply()
    add = out.results.add
    for r in results:
        if r is None:
            add()
        elif isinstance(r, SixfoldError):
            add(error=error_to_pb(r))
        else:
            add(found=True, value=r)
    return out


def get_results_from_pb(m: kv_pb2.GetManyReply) -> list[bytes | None | SixfoldError]:
    return [error_from_pb(r.error) if r.HasField("error") else (r.value if r.found else None) for r in m.results]


def kv_scan_request_to_pb(start: bytes, end: bytes | None, quorum: bool, view: ReadView | None,
                          after: int = 0) -> kv_pb2.ScanRequest:
    m = kv_pb2.ScanRequest(start=start, quorum=quorum, after=after)
    if end is not None:
        m.end = end
    if view is not None:
        m.view.CopyFrom(read_view_to_pb(view))
    return m


def kv_scan_args_from_pb(m: kv_pb2.ScanRequest, protection_groups: int):
    """(start, end, quorum, view), validated."""
    start = _check_bound(m.start, "start")
    end = _check_bound(m.end, "end") if m.HasField("end") else None
    view = read_view_from_pb(m.view, protection_groups) if m.HasField("view") else None
    return start, end, m.quorum, view


def scan_chunk_to_pb(pairs: Sequence[tuple[bytes, bytes]]) -> kv_pb2.ScanChunk:
    return kv_pb2.ScanChunk(pairs=[kv_pb2.KeyValue(key=k, value=v) for k, v in pairs])


def scan_chunk_from_pb(m: kv_pb2.ScanChunk) -> list[tuple[bytes, bytes]]:
    return [(p.key, p.value) for p in m.pairs]


# --- KV: the read point replicated to reader instances -------------------------------------
#: WatchReadPoint's coalescing bound and heartbeat (milliseconds): defaults and clamps.
WATCH_MIN_INTERVAL_MS = (5, 1, 1000)
WATCH_HEARTBEAT_MS = (100, 10, 5000)


def watch_args_from_pb(m: kv_pb2.WatchReadPointRequest) -> tuple[float, float]:
    """(min_interval_s, heartbeat_s), defaults for 0, clamped to their ranges."""
    def pick(v: int, spec: tuple[int, int, int]) -> float:
        default, low, high = spec
        return (default if v == 0 else min(high, max(low, v))) / 1000.0

    return pick(m.min_interval_ms, WATCH_MIN_INTERVAL_MS), pick(m.heartbeat_ms, WATCH_HEARTBEAT_MS)


def read_point_update_to_pb(u: ReadPointUpdate) -> kv_pb2.ReadPointUpdate:
    ms = u.membership
    m = kv_pb2.ReadPointUpdate(
        epoch=u.epoch, vdl=u.vdl, tails=u.tails, sent_at=u.sent_at, committed_at=u.committed_at, log_time_us=u.log_time_us,
        membership=kv_pb2.WriterMembership(epoch=ms.epoch, members=ms.members, next_members=ms.next_members or ()),
    )
    add = m.members.add
    for node, scls, up in u.members:
        add(node=node, scl=[-1 if s is None else s for s in scls], up=up)
    return m


def read_point_update_from_pb(m: kv_pb2.ReadPointUpdate, protection_groups: int) -> ReadPointUpdate:
    """A ReadPointUpdate, checked: one tail per PG, none above the VDL, LSNs and the epoch in
    bounds, a membership of six distinct nodes, one SCL per PG for each listed member."""
    check_bounded(m.epoch, EPOCH_MAX, "read point epoch")
    _check_lsn(m.vdl, "read point VDL")
    view = read_view_from_pb(common_pb2.ReadView(read_point=m.vdl, tails=m.tails), protection_groups)
    membership = membership_from_pb(storage_pb2.Membership(
        epoch=m.membership.epoch, members=m.membership.members, next_members=m.membership.next_members))
    known = set(membership.all_nodes)
    members = []
    for e in m.members:
        if e.node not in known:
            raise InvalidArgument(f"read point names node {e.node!r}, which is not a member")
        if len(e.scl) != protection_groups or any(not -1 <= s <= LSN_VALID_MAX for s in e.scl):
            raise InvalidArgument(f"read point SCLs of {e.node} must be {protection_groups} LSNs (or -1)")
        members.append((e.node, tuple(None if s < 0 else s for s in e.scl), e.up))
    for name, t in (("sent_at", m.sent_at), ("committed_at", m.committed_at)):
        if not (t == t) or abs(t) > 1e11:  # NaN or absurd
            raise InvalidArgument(f"read point {name} {t} is not a time")
    return ReadPointUpdate(m.epoch, view.read_point, view.tails, membership, tuple(members), m.sent_at, m.committed_at,
                           min(m.log_time_us, DEADLINE_US_MAX))


_READER_KEYS = frozenset(kv_pb2.ReaderStatus.DESCRIPTOR.fields_by_name)


def _reader_status_to_pb(r: dict) -> kv_pb2.ReaderStatus:
    return kv_pb2.ReaderStatus(**_exactly(r, _READER_KEYS, "reader"))


def _reader_status_from_pb(m: kv_pb2.ReaderStatus) -> dict:
    return {name: getattr(m, name) for name in sorted(_READER_KEYS)}


# The volume status travels typed (`StatusReply` in kv.proto) and is a dict on both sides: the
# endpoint builds it (`WriterEndpoint.status`, `Writer.status`, `node_status`) and `db.status()`
# returns it. A key the message does not carry is a programmer error, refused loudly rather than
# dropped: the fix is a field in kv.proto (the writer's `stats` are a map, so a new counter needs
# none).
_STATUS_KEYS = frozenset({"volume_id", "protection_groups", "codec", "durable", "encrypted", "vdl", "epoch", "nodes",
                          "writer", "endpoint", "membership_change"})
#: optional: only a backed-up volume's status carries it
_STATUS_OPTIONAL_KEYS = frozenset({"backup"})
_NODE_KEYS = frozenset({"id", "az", "address", "up"})
_NODE_REPORT_KEYS = frozenset({"scl", "lag", "epoch", "records", "bytes", "corrupt_found", "repaired", "rebuild"})
#: optional: carried when node_status has them
_NODE_SPACE_KEYS = ("used_bytes", "capacity_bytes", "space_low", "room_bytes", "max_storage_bytes", "storage_warning",
                    "collected_records", "pages_used", "pages_bytes", "horizon_lsn")
_WRITER_KEYS = frozenset({"epoch", "vdl", "vcl", "next_lsn", "pgcl", "in_flight", "fenced", "admission", "membership",
                          "links", "recovery", "stats", "room_bytes"})
_MEMBERSHIP_KEYS = frozenset({"epoch", "members", "next_members"})
_LINK_KEYS = frozenset({"up", "full", "space_low", "room_bytes", "error", "errors", "last_error", "sent_lsn"})
_RECOVERY_KEYS = frozenset({"epoch", "vdl", "vcl", "base", "truncated", "sealed", "replicated_records", "seconds"})
_ENDPOINT_KEYS = frozenset({"pid", "opened_at"})
_AUTH_KEYS = frozenset({"users_file", "users", "error", "reloads", "refused_unauthenticated", "refused_permission"})


def _exactly(d: dict, keys: frozenset, where: str, optional: frozenset = frozenset()) -> dict:
    """`d`, checked to have every key of `keys`, any of `optional`, and nothing else."""
    unknown, missing = set(d) - keys - optional, keys - set(d)
    problems = []
    if unknown:
        problems.append(f"keys StatusReply does not carry: {', '.join(sorted(map(str, unknown)))} "
                        "(add them to kv.proto and engine.transport.convert)")
    if missing:
        problems.append(f"keys missing: {', '.join(sorted(missing))}")
    if problems:
        raise AssertionError(f"status {where or 'reply'}: {'; '.join(problems)}")
    return d


def _per_pg(values: dict, where: str) -> list[int]:
    """A {pg: value} map as the list indexed by PG (it has every PG from 0)."""
    if sorted(values) != list(range(len(values))):
        raise AssertionError(f"status {where} has PGs {sorted(values)}, not 0..{len(values) - 1}")
    return [values[pg] for pg in range(len(values))]


def _node_status_to_pb(n: dict) -> kv_pb2.NodeStatus:
    where = f"node {n.get('id')!r}"
    reported = "scl" in n  # the node answered: engine.head.writer.node_status's keys are there
    _exactly(n, _NODE_KEYS | (_NODE_REPORT_KEYS if reported else frozenset()), where,
             optional=frozenset({"error", *(_NODE_SPACE_KEYS if reported else ())}))
    m = kv_pb2.NodeStatus(id=n["id"], az=n["az"], up=n["up"])
    if n["address"] is not None:
        m.address = n["address"]
    if "error" in n:
        m.error = n["error"]
    if reported:
        r = m.report
        r.SetInParent()
        r.scl.extend(_per_pg(n["scl"], f"{where} scl"))
        r.lag.extend(_per_pg(n["lag"], f"{where} lag"))
        r.epoch, r.records, r.bytes = n["epoch"], n["records"], n["bytes"]
        r.corrupt_found, r.repaired = n["corrupt_found"], n["repaired"]
        if n["rebuild"] is not None:
            # The node's own report (NodeState.extra, JSON from another process): its known keys
            # are taken and anything else is left out, so a node's extra key cannot fail the
            # endpoint's status.
            rebuild = n["rebuild"]
            r.rebuild.CopyFrom(kv_pb2.NodeRebuild(active=bool(rebuild.get("active", False)),
                                                  fetched_records=int(rebuild.get("fetched_records", 0))))
        for name in _NODE_SPACE_KEYS:
            if name in n:
                setattr(r, name, n[name])
    return m


def _node_status_from_pb(m: kv_pb2.NodeStatus) -> dict:
    n = {"id": m.id, "az": m.az, "address": m.address if m.HasField("address") else None, "up": m.up}
    if m.HasField("error"):
        n["error"] = m.error
    if m.HasField("report"):
        r = m.report
        n.update(
            scl=dict(enumerate(r.scl)), lag=dict(enumerate(r.lag)), epoch=r.epoch, records=r.records, bytes=r.bytes,
            corrupt_found=r.corrupt_found, repaired=r.repaired,
            rebuild={"active": r.rebuild.active, "fetched_records": r.rebuild.fetched_records} if r.HasField("rebuild") else None,
        )
        for name in _NODE_SPACE_KEYS:
            if r.HasField(name):
                n[name] = getattr(r, name)
    return n


def _writer_status_to_pb(w: dict) -> kv_pb2.WriterStatus:
    _exactly(w, _WRITER_KEYS, "writer")
    ms = _exactly(w["membership"], _MEMBERSHIP_KEYS, "writer membership")
    m = kv_pb2.WriterStatus(
        epoch=w["epoch"], vdl=w["vdl"], vcl=w["vcl"], next_lsn=w["next_lsn"], pgcl=w["pgcl"], in_flight=w["in_flight"],
        admission=w["admission"], stats=w["stats"], room_bytes=w["room_bytes"],
        membership=kv_pb2.WriterMembership(epoch=ms["epoch"], members=ms["members"], next_members=ms["next_members"] or ()),
    )
    if w["fenced"] is not None:
        m.fenced = w["fenced"]
    for node_id, link in w["links"].items():
        _exactly(link, _LINK_KEYS, f"writer link {node_id}")
        m.links[node_id].CopyFrom(kv_pb2.LinkStatus(**link))
    if w["recovery"]:
        rec = _exactly(w["recovery"], _RECOVERY_KEYS, "writer recovery")
        m.recovery.CopyFrom(kv_pb2.RecoveryStatus(
            epoch=rec["epoch"], vdl=rec["vdl"], vcl=rec["vcl"], base=rec["base"], sealed=rec["sealed"],
            replicated_records=rec["replicated_records"], seconds=rec["seconds"],
        ))
        if rec["truncated"] is not None:
            first, last = rec["truncated"]
            m.recovery.truncated.CopyFrom(kv_pb2.LsnRange(first=first, last=last))
    return m


def _writer_status_from_pb(m: kv_pb2.WriterStatus) -> dict:
    recovery = {}
    if m.HasField("recovery"):
        r = m.recovery
        recovery = {"epoch": r.epoch, "vdl": r.vdl, "vcl": r.vcl, "base": r.base,
                    "truncated": [r.truncated.first, r.truncated.last] if r.HasField("truncated") else None,
                    "sealed": list(r.sealed), "replicated_records": r.replicated_records, "seconds": r.seconds}
    return {
        "epoch": m.epoch,
        "vdl": m.vdl,
        "vcl": m.vcl,
        "next_lsn": m.next_lsn,
        "pgcl": list(m.pgcl),
        "in_flight": m.in_flight,
        "fenced": m.fenced if m.HasField("fenced") else None,
        "admission": m.admission,
        "room_bytes": m.room_bytes,
        "membership": {"epoch": m.membership.epoch, "members": list(m.membership.members),
                       "next_members": list(m.membership.next_members) or None},
        "links": {
            node_id: {"up": l.up, "full": l.full, "space_low": l.space_low, "room_bytes": l.room_bytes,
                      "error": l.error, "errors": l.errors,
                      "last_error": l.last_error, "sent_lsn": l.sent_lsn}
            for node_id, l in sorted(m.links.items())
        },
        "recovery": recovery,
        "stats": dict(sorted(m.stats.items())),
    }


def status_to_pb(status: dict) -> kv_pb2.StatusReply:
    """The endpoint's status dict (`WriterEndpoint.status`, or a reader instance's with "reader"
    in place of "writer") as a typed reply."""
    reader = "reader" in status
    _exactly(status, (_STATUS_KEYS - {"writer"}) | {"reader"} if reader else _STATUS_KEYS, "", _STATUS_OPTIONAL_KEYS)
    ep = _exactly(status["endpoint"], _ENDPOINT_KEYS, "endpoint", optional=frozenset({"auth"}))
    m = kv_pb2.StatusReply(
        volume_id=status["volume_id"], protection_groups=status["protection_groups"], codec=status["codec"],
        durable=status["durable"], encrypted=status["encrypted"], vdl=status["vdl"], epoch=status["epoch"],
        nodes=[_node_status_to_pb(n) for n in status["nodes"]],
        endpoint=kv_pb2.EndpointStatus(pid=ep["pid"]),
        membership_change=membership_change_to_pb(MembershipChange(**status["membership_change"])),
    )
    if reader:
        m.reader.CopyFrom(_reader_status_to_pb(status["reader"]))
    else:
        m.writer.CopyFrom(_writer_status_to_pb(status["writer"]))
    if ep["opened_at"] is not None:
        m.endpoint.opened_at = ep["opened_at"]
    if ep.get("auth") is not None:
        m.endpoint.auth.CopyFrom(kv_pb2.AuthStatus(**_exactly(ep["auth"], _AUTH_KEYS, "endpoint.auth")))
    if status.get("backup") is not None:
        m.backup.CopyFrom(_backup_status_to_pb(status["backup"]))
    return m


_BACKUP_KEYS = frozenset(kv_pb2.BackupStatus.DESCRIPTOR.fields_by_name)
_BASE_PROGRESS_KEYS = frozenset(kv_pb2.BackupBaseProgress.DESCRIPTOR.fields_by_name)


def _backup_status_to_pb(b: dict) -> kv_pb2.BackupStatus:
    b = _exactly(b, _BACKUP_KEYS, "backup")
    fields = {k: v for k, v in b.items() if v is not None and k != "base_in_progress"}
    m = kv_pb2.BackupStatus(**fields)
    if b["base_in_progress"] is not None:
        m.base_in_progress.CopyFrom(kv_pb2.BackupBaseProgress(**_exactly(b["base_in_progress"], _BASE_PROGRESS_KEYS,
                                                                         "backup.base_in_progress")))
    return m


def _backup_status_from_pb(m: kv_pb2.BackupStatus) -> dict:
    out = {}
    for f in m.DESCRIPTOR.fields:
        if f.name == "base_in_progress":
            out[f.name] = ({k: getattr(m.base_in_progress, k) for k in sorted(_BASE_PROGRESS_KEYS)}
                           if m.HasField("base_in_progress") else None)
        elif f.has_presence and f.message_type is None:
            out[f.name] = getattr(m, f.name) if m.HasField(f.name) else None
        else:
            out[f.name] = getattr(m, f.name)
    return out


def status_from_pb(m: kv_pb2.StatusReply) -> dict:
    """The status dict, as the endpoint built it (lists where it had tuples, as JSON would)."""
    change = asdict(membership_change_from_pb(m.membership_change))
    change.update(members=list(change["members"]), next_members=list(change["next_members"]))
    return {
        "volume_id": m.volume_id,
        "protection_groups": m.protection_groups,
        "codec": m.codec,
        "durable": m.durable,
        "encrypted": m.encrypted,
        "vdl": m.vdl,
        "epoch": m.epoch,
        "nodes": [_node_status_from_pb(n) for n in m.nodes],
        **({"reader": _reader_status_from_pb(m.reader)} if m.HasField("reader") else {"writer": _writer_status_from_pb(m.writer)}),
        "endpoint": {"pid": m.endpoint.pid, "opened_at": m.endpoint.opened_at if m.endpoint.HasField("opened_at") else None,
                     **({"auth": {k: getattr(m.endpoint.auth, k) for k in sorted(_AUTH_KEYS)}}
                        if m.endpoint.HasField("auth") else {})},
        "membership_change": change,
        **({"backup": _backup_status_from_pb(m.backup)} if m.HasField("backup") else {}),
    }


# --- KV: membership change (admin) ----------------------------------------------------------
#: Phases of a membership change, in the order a successful one goes through them.
MEMBERSHIP_PHASES = ("idle", "rebuilding", "replaced", "reverted", "failed")
NODE_ID_BYTES_MAX = 64


@dataclass(frozen=True)
class MembershipChange:
    """A membership change (replace `old` by `new`) as the writer endpoint sees it; see
    `MembershipChange` in kv.proto for the meaning of each field."""

    phase: str = "idle"
    old: str = ""
    new: str = ""
    fraction: float = 0.0
    fetched_records: int = 0
    lag: int = 0
    epoch: int = 0
    members: tuple[str, ...] = ()
    next_members: tuple[str, ...] = ()
    seconds: float = 0.0
    error: str = ""  # "ClassName: message" when phase is "failed"

    def __post_init__(self) -> None:
        assert self.phase in MEMBERSHIP_PHASES, self.phase
        assert 0.0 <= self.fraction <= 1.0, self.fraction


def check_node_id(node_id: str, what: str = "node id") -> str:
    """A node id a manifest and a membership can hold: 1..64 letters, digits, - or _."""
    if not isinstance(node_id, str) or not 1 <= len(node_id) <= NODE_ID_BYTES_MAX or not node_id.replace("-", "").replace("_", "").isalnum() \
            or not node_id.isascii():
        raise InvalidArgument(f"{what} {node_id!r}: use 1..{NODE_ID_BYTES_MAX} ASCII letters, digits, - or _")
    return node_id


def replace_node_request_to_pb(old: str, new: str, new_address: str, new_az: str, timeout_s: float = 0.0) -> kv_pb2.ReplaceNodeRequest:
    return kv_pb2.ReplaceNodeRequest(old=old, new=new, new_address=new_address, new_az=new_az, timeout_s=timeout_s)


def replace_node_args_from_pb(m: kv_pb2.ReplaceNodeRequest) -> tuple[str, str, str, str, float]:
    """(old, new, new_address, new_az, timeout_s), validated; timeout 0 stays 0 (the default)."""
    check_node_id(m.old, "old node id")
    check_node_id(m.new, "new node id")
    if m.old == m.new:
        raise InvalidArgument(f"cannot replace {m.old} by itself")
    host, sep, port = m.new_address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise InvalidArgument(f"new_address {m.new_address!r} is not host:port")
    check_node_id(m.new_az, "AZ")
    if not 0.0 <= m.timeout_s <= 86_400.0:  # also refuses NaN
        raise InvalidArgument(f"timeout_s {m.timeout_s} is not in 0..86400")
    return m.old, m.new, m.new_address, m.new_az, m.timeout_s


def membership_change_to_pb(c: MembershipChange) -> kv_pb2.MembershipChange:
    m = kv_pb2.MembershipChange(
        phase=c.phase, old=c.old, new=c.new, fraction=c.fraction, fetched_records=c.fetched_records, lag=c.lag,
        epoch=c.epoch, members=c.members, next_members=c.next_members, seconds=c.seconds,
    )
    if c.error:
        name, _, message = c.error.partition(": ")
        cls = ERRORS_BY_NAME.get(name, SixfoldError)
        m.error.CopyFrom(common_pb2.ErrorStatus(code=cls.GRPC_STATUS, error=cls.__name__, message=message if name in ERRORS_BY_NAME else c.error))
    return m


def membership_change_from_pb(m: kv_pb2.MembershipChange) -> MembershipChange:
    if m.phase not in MEMBERSHIP_PHASES:
        raise InvalidArgument(f"membership change phase {m.phase!r} is not one of {', '.join(MEMBERSHIP_PHASES)}")
    error = ""
    if m.HasField("error"):
        error = f"{m.error.error}: {m.error.message}" if m.error.error else m.error.message
    return MembershipChange(
        phase=m.phase, old=m.old, new=m.new, fraction=min(1.0, max(0.0, m.fraction)), fetched_records=m.fetched_records,
        lag=m.lag, epoch=m.epoch, members=tuple(m.members), next_members=tuple(m.next_members), seconds=m.seconds, error=error,
    )


def error_text(exc: SixfoldError) -> str:
    """"ClassName: message" with the nearest class a client knows (MembershipChange.error)."""
    return f"{_known_base(exc).__name__}: {exc}"


# --- Directory: who a process knows (common.proto DirectoryReply) --------------------------
#: Roles a known process may have, and the bounds on a reply a hostile peer could send.
PROCESS_ROLES = ("node", "writer", "reader")
DIRECTORY_PROCESSES_MAX = 4096
_NAME_BYTES_MAX = 64
_ADDRESS_BYTES_MAX = 261  # a DNS name (253) and ":65535"


@dataclass(frozen=True)
class KnownProcess:
    """One process of a cluster as another process knows it: id, role, AZ, host:port."""

    id: str
    role: str
    az: str
    address: str


@dataclass(frozen=True)
class Directory:
    """Who a process knows (`Storage.Directory`, `KV.Directory`): its volume, its own id and
    every process it knows, itself included."""

    volume_id: str
    me: str
    processes: tuple[KnownProcess, ...] = ()


def directory_to_pb(d: Directory) -> common_pb2.DirectoryReply:
    return common_pb2.DirectoryReply(
        volume_id=d.volume_id, me=d.me,
        processes=[common_pb2.KnownProcess(id=p.id, role=p.role, az=p.az, address=p.address)
                   for p in d.processes[:DIRECTORY_PROCESSES_MAX]])


def directory_from_pb(m: common_pb2.DirectoryReply) -> Directory:
    """The reply as values; InvalidArgument for one no process of this release sends (too many
    processes, an unknown role, names or addresses out of bounds), so a caller never trusts
    what it cannot bound."""
    if len(m.processes) > DIRECTORY_PROCESSES_MAX:
        raise InvalidArgument(f"a directory of {len(m.processes)} processes (at most {DIRECTORY_PROCESSES_MAX})")
    out = []
    for p in m.processes:
        if p.role not in PROCESS_ROLES:
            raise InvalidArgument(f"a directory names process {p.id[:_NAME_BYTES_MAX]!r} with unknown role {p.role[:16]!r}")
        if not (0 < len(p.id) <= _NAME_BYTES_MAX and len(p.az) <= _NAME_BYTES_MAX and len(p.address) <= _ADDRESS_BYTES_MAX):
            raise InvalidArgument("a directory names a process by an empty or overlong id, AZ or address")
        out.append(KnownProcess(p.id, p.role, p.az, p.address))
    if len(m.volume_id) > _ADDRESS_BYTES_MAX or len(m.me) > _NAME_BYTES_MAX:
        raise InvalidArgument("a directory's volume id or own id is overlong")
    return Directory(m.volume_id, m.me, tuple(out))
