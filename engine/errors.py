"""Every expected operating error of Sixfold, in one place.

Rules: an error a caller can handle is a subclass of `SixfoldError` defined here, with a
message a person understands (what happened, what was expected, what to do). Each class
maps to exactly one gRPC status code (`GRPC_STATUS`) so the cluster boundary can carry it
and the client can raise the same class again. Programmer errors are not here: they are
`AssertionError`s raised by explicit checks that `python -O` cannot remove.
"""

from __future__ import annotations


class SixfoldError(Exception):
    """Base class of every expected Sixfold error."""

    #: name of the grpc.StatusCode this error travels as (a string keeps this module import-free)
    GRPC_STATUS = "UNKNOWN"


class InvalidArgument(SixfoldError, ValueError):
    """A caller passed a value the engine cannot accept (wrong type, empty or oversized key...).

    Raised before anything is logged: the request changed nothing."""

    GRPC_STATUS = "INVALID_ARGUMENT"


class CorruptRecord(SixfoldError):
    """A frame or stored record failed its length or CRC32C check; it is rejected whole."""

    GRPC_STATUS = "DATA_LOSS"


class Unavailable(SixfoldError):
    """Too few segments (or the endpoint) are reachable to do this now; retry later.

    When raised by a write, the write was *not* logged (it failed before an LSN was assigned)
    unless the exception is the subclass `WriteIndeterminate`."""

    GRPC_STATUS = "UNAVAILABLE"


class WriteIndeterminate(Unavailable):
    """A write was logged but did not become durable within the timeout.

    It may still become durable later (when enough segments return), or be truncated by a
    recovery: treat it as neither done nor undone, and read the key to find out."""

    GRPC_STATUS = "DEADLINE_EXCEEDED"


class StaleEpoch(SixfoldError):
    """A request carried an older volume epoch than the segment has seen: its writer was fenced
    by a newer writer and must stop."""

    GRPC_STATUS = "FAILED_PRECONDITION"


class SegmentIncomplete(SixfoldError):
    """A segment cannot answer at this read point because it lacks part of its chain (SCL below
    what is needed); the caller picks another segment."""

    GRPC_STATUS = "OUT_OF_RANGE"


class SnapshotTooOld(SegmentIncomplete):
    """A read at a read point below what a segment has collected (`engine.node.collection`):
    versions that read could need are gone. The snapshot, scan or reader that held the read
    point released it, let its registration lapse, or was registered with a writer that has
    since been replaced (a new writer does not know the old one's snapshots). Nothing was read;
    take a new snapshot. A subclass of SegmentIncomplete with its status code, so a client of
    a release before collection reads it as "this segment cannot answer here"."""

    GRPC_STATUS = "OUT_OF_RANGE"


class UnknownProtectionGroup(SixfoldError):
    """A request named a protection group this volume does not have."""

    GRPC_STATUS = "NOT_FOUND"


class GeometryMismatch(SixfoldError):
    """The data folder holds a volume of a different geometry than was asked for."""

    GRPC_STATUS = "FAILED_PRECONDITION"


class Closed(SixfoldError):
    """The database or node was closed; open it again."""

    GRPC_STATUS = "CANCELLED"


class NodeNotFound(SixfoldError, KeyError):
    """A node id that is not part of this volume."""

    GRPC_STATUS = "NOT_FOUND"

    def __str__(self) -> str:  # KeyError quotes its argument; a person wants the sentence
        return str(self.args[0]) if self.args else "node not found"


class ResourceExhausted(SixfoldError):
    """A bound was hit (too much in flight, message too large); retry with less."""

    GRPC_STATUS = "RESOURCE_EXHAUSTED"


ALL_ERRORS: tuple[type[SixfoldError], ...] = (
    InvalidArgument,
    CorruptRecord,
    Unavailable,
    WriteIndeterminate,
    StaleEpoch,
    SegmentIncomplete,
    UnknownProtectionGroup,
    GeometryMismatch,
    Closed,
    NodeNotFound,
    ResourceExhausted,
)


class EpochBehind(SixfoldError):
    """A segment was asked to act at an epoch newer than it knows: it must first learn that
    epoch's truncation ranges and membership (the writer or a peer sends them), then retry."""

    GRPC_STATUS = "ABORTED"


class StorageError(SixfoldError):
    """A storage node's disk layer failed in a way that is not corruption (an I/O error, say)."""

    GRPC_STATUS = "INTERNAL"


class StorageFull(SixfoldError):
    """A storage node has no room for this write (its LMDB map or its disk is full).

    The message names the nodes that are full. Deletes still work: every node keeps a reserve
    for them, so a full volume can be emptied. Nothing acknowledged is lost."""

    GRPC_STATUS = "RESOURCE_EXHAUSTED"


class ConflictingRecord(SixfoldError):
    """A frame carried a record at an LSN the segment already holds with other bytes. One LSN
    names one record for ever: the frame is refused whole and nothing of it is written."""

    GRPC_STATUS = "ALREADY_EXISTS"


class FolderInUse(SixfoldError):
    """A volume or node folder is held by another open (this process or another one).

    One folder has one owner: a second open changes nothing and names the holder's pid."""

    GRPC_STATUS = "FAILED_PRECONDITION"

    def __init__(self, message: str, *, folder: str = "", holder_pid: int | None = None) -> None:
        super().__init__(message)
        self.folder = folder
        self.holder_pid = holder_pid


class WrongFolder(SixfoldError):
    """A folder holds another kind of data than was asked for (a cluster folder opened as an
    embedded volume, a node folder of another volume, unknown files) or a format this release
    cannot read. The message says what was found and what to do."""

    GRPC_STATUS = "FAILED_PRECONDITION"


class Unauthenticated(SixfoldError):
    """The caller did not prove who it is: no credentials, a token no user holds (wrong, or
    removed since), or a certificate this cluster does not trust. Nothing was done; pass a valid
    token (`engine.connect(..., token=...)`, `$SIXFOLD_TOKEN`, `--token-file`)."""

    GRPC_STATUS = "UNAUTHENTICATED"


class PermissionDenied(SixfoldError):
    """The caller is known, but its role does not allow this request (a `read` user asked to
    write, say). Nothing was done; ask an admin for a user with the role it needs."""

    GRPC_STATUS = "PERMISSION_DENIED"


class WrongVolume(SixfoldError):
    """A storage request named another volume than the node's, or none: refused, nothing done
    (a frame, seal or truncation meant for another volume never lands here)."""

    GRPC_STATUS = "FAILED_PRECONDITION"


class EncryptionError(SixfoldError):
    """An encrypted volume opened without its key or with another one, or a key given for a
    volume that is not encrypted (encryption is chosen at creation). The message says which."""

    GRPC_STATUS = "FAILED_PRECONDITION"


class ReadOnly(SixfoldError):
    """A write (or an admin change) was sent to a reader instance: a read replica serves reads
    only. Nothing was logged. Send writes to the writer endpoint (`engine.connect(folder)`).

    Not InvalidArgument (the same request is valid on the writer), not PermissionDenied (the
    caller's role may well allow writes), not Unavailable (retrying here never succeeds): the
    target is in the wrong state for the request, hence FAILED_PRECONDITION."""

    GRPC_STATUS = "FAILED_PRECONDITION"


class ReplicaBehind(Unavailable):
    """A read with `after=LSN` (read-your-writes) could not be served in time: this replica's
    read point did not reach that commit position within the bound (its writer is down or far
    ahead). Nothing was read; retry, or read from the writer endpoint."""


class PreconditionFailed(SixfoldError):
    """A conditional write's preconditions did not hold when the writer ordered it (a key that
    should exist, be absent, hold a value or be unchanged since a commit position did not):
    nothing of the unit was logged. `failed` lists the indices of the conditions that failed, in
    the order they were given; the message names each key and what was expected and found.
    Read again and decide; sending the same unit again fails the same way while nothing changes.

    Its own gRPC status would be FAILED_PRECONDITION, which StaleEpoch already travels as; it
    travels as ABORTED (the operation lost a race, as etcd's and Spanner's do) with its class
    name, and the failed indices in the error's `failed` field."""

    GRPC_STATUS = "ABORTED"

    def __init__(self, message: str = "", failed: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.failed = tuple(failed)


class Compacted(SixfoldError):
    """A watch asked for changes from a position older than what is still kept for watchers:
    the changes after it cannot all be given, so none are (never a silent gap). `oldest` is the
    oldest position a watch may resume from now; read the keys afresh (a scan), then watch from
    a position at or above it.

    OUT_OF_RANGE with its class name (the code SegmentIncomplete and SnapshotTooOld share)."""

    GRPC_STATUS = "OUT_OF_RANGE"

    def __init__(self, message: str = "", oldest: int = 0) -> None:
        super().__init__(message)
        self.oldest = oldest


class BackupError(SixfoldError):
    """A backup cannot do what was asked: the target holds another volume's archive or one of a
    newer format, the time or LSN asked for lies outside the restore window (the message names
    the window), the restore's destination is not empty, or the archive is being written by a
    newer writer. Nothing was changed."""

    GRPC_STATUS = "FAILED_PRECONDITION"


class BackupCorrupt(BackupError):
    """A file of a backup failed its check (CRC, length, format, volume id, or the chain of
    records it must continue): the message names the file and what is wrong. A restore that
    needs it refuses to run; `sixfold backup verify` lists every such file. (Its gRPC status is
    its parent's: DATA_LOSS without a class name must keep meaning CorruptRecord.)"""


ALL_ERRORS = ALL_ERRORS + (
    EpochBehind, StorageError, StorageFull, ConflictingRecord, FolderInUse, WrongFolder, Unauthenticated, PermissionDenied,
    EncryptionError, WrongVolume, ReadOnly, ReplicaBehind, BackupError, BackupCorrupt, SnapshotTooOld,
    PreconditionFailed, Compacted,
)
