"""Sixfold: an Aurora-style quorum storage engine.

    import engine
    with engine.open("./data") as db:        # six storage nodes in three AZs, in this process
        db.put(b"user:1", b"alice")
        db.get(b"user:1")

`engine.open(path, **options)` opens (or creates) an embedded volume; `engine.connect(target)`
talks to a running cluster's writer endpoint with the same API. Errors are in `engine.errors`
and re-exported here.

An embedded volume has one owner: `engine.open` holds the folder's lock until `close()` (or until
the `Database` is garbage collected, or the process ends), and a second open, from this process
or another, raises `FolderInUse` naming the holder.
"""

from __future__ import annotations

import os

from engine import errors
from engine.core.conditions import Condition, absent, at_version, equals, exists, unchanged
from engine.database import Batch, Change, Database, Snapshot, Version
from engine.errors import (
    BackupCorrupt,
    BackupError,
    Closed,
    Compacted,
    CorruptRecord,
    EncryptionError,
    FolderInUse,
    GeometryMismatch,
    InvalidArgument,
    NodeNotFound,
    PermissionDenied,
    PreconditionFailed,
    ReadOnly,
    ReplicaBehind,
    ResourceExhausted,
    SegmentIncomplete,
    SixfoldError,
    SnapshotTooOld,
    StaleEpoch,
    StorageError,
    StorageFull,
    Unauthenticated,
    Unavailable,
    WriteIndeterminate,
    WrongFolder,
)
from engine.core.types import RequestStatus

from engine.version import __version__


def open(path: str | os.PathLike, **options) -> Database:  # noqa: A001 - the natural name
    """Open or create an embedded volume at `path` (a missing or empty folder gets a new one).

    Options: protection_groups (new volumes; default 8; reopening with another number is a
    GeometryMismatch), durable (default True: each segment fsyncs before it acks),
    write_timeout_s (default 5), gossip_interval_s, scrub_interval_s, local_az, seed,
    encryption_key (32 bytes, or their base64 or hex: a new volume is created encrypted; an
    encrypted volume needs it on every open, see `engine.envelope`), max_storage_bytes (the most
    each node's data may take, in bytes (`engine.sizes.parse_size("10GiB")` reads units);
    recorded in the volume, so later opens keep it; default 32 GiB; `map_bytes` is its older
    name). At the maximum, puts raise StorageFull naming the nodes while deletes still work; a
    maximum below the data a node holds, out of 1 MiB..2^62 or above the filesystem's size is
    an InvalidArgument, and nothing is changed. backup (a folder, or an
    `engine.backup.target.BackupTarget`: archive the volume continuously, see `engine.restore`),
    backup_retention_days, backup_options (`engine.backup.archiver.BackupOptions`).
    Watches (`engine.head.watch`): watch_memory_changes (the changes the writer keeps in memory;
    older ones are read from the nodes' logs; default 262,144), watch_hold_lsns (how far behind
    the VDL a watch may hold version collection back before it gets Compacted; default
    4,000,000), resume_grace_s (after a writer crash, how long the new writer collects nothing
    new, so a watch that was behind goes on; default 0).

    Raises FolderInUse if another open holds `path` (this process or another one: the error
    names its pid), and WrongFolder, touching nothing, if `path` holds another kind of data (a
    cluster folder: use `engine.connect(path)`; a storage node's folder; unknown files) or a
    volume of a newer format than this release reads; EncryptionError for an encrypted volume
    opened without its key or with another one, or a key given for a plain volume.
    """
    from engine.cache import CachedBackend, cache_options
    from engine.embedded import ClusterControl, EmbeddedOptions, EmbeddedVolume

    cache = cache_options(options.pop("cache", None))  # a read cache, as engine.connect's (engine.cache)
    known = set(EmbeddedOptions.__dataclass_fields__)
    unknown = set(options) - known
    if unknown:
        raise InvalidArgument(f"unknown option(s) {sorted(unknown)}; known: {sorted(known | {'cache'})}")
    volume = EmbeddedVolume(path, EmbeddedOptions(**options))
    return Database(volume if cache is None else CachedBackend(volume, cache), ClusterControl(volume))


def rotate_encryption_key(path: str | os.PathLike, old_key, new_key) -> None:
    """Re-wrap the data key of the encrypted embedded volume at `path` under `new_key` (the
    records are not touched). The volume must be closed; EncryptionError if `old_key` is wrong."""
    from engine.embedded import rotate_volume_key

    rotate_volume_key(path, old_key, new_key)


def restore(backup, into: str | os.PathLike, **options) -> dict:
    """Build a new volume at `into` (a missing or empty folder) from the backup archive `backup`
    (a folder, or an `engine.backup.target.BackupTarget`), holding exactly the acknowledged
    writes up to `to_time` (a datetime or seconds since the epoch) or `to_lsn`, atomic batches
    whole; the newest restore point without either. The new volume has a new volume id; open it
    with `engine.open(into)`, or, with `cluster=True`, start it with `sixfold cluster up`.
    Options: to_time, to_lsn, key (the backed-up volume's master key, if it was encrypted),
    new_key (encrypt the new volume under this master key; default: `key`), cluster, base_port,
    key_file (an encrypted cluster's key file), protection_groups, progress (called with a dict).
    Returns what was restored. BackupError (outside the restore window, a non-empty `into`),
    BackupCorrupt (a file the restore needs failed its check), EncryptionError."""
    from engine.backup.restore import restore as _restore

    return _restore(backup, into, **options)


def codec_implementation() -> str:
    """Which segment codec twin is loaded: "cython" or "python"."""
    from engine import codec

    return codec.IMPLEMENTATION


def connect(target: str | os.PathLike, **options) -> Database:
    """Connect to a cluster's writer endpoint: a cluster folder (with cluster.json), a deployment
    spec file (`engine.cluster.spec`; its writer is found by asking the writer candidates it
    names, and followed through a failover) or host:port.

    With a cluster folder, `db.cluster` is an `engine.cluster.Cluster` for node control.
    `role="reader"` (a cluster folder only): the reader endpoint instead, reads load-balanced over
    the cluster's reader instances, writes refused ReadOnly; `after=` on a read gives
    read-your-writes (see `engine.database`).
    `token=` is the caller's token; without it, $SIXFOLD_TOKEN, else the cluster folder's
    operator token (`DIR/operator.token`, made by `sixfold cluster up`)."""
    from engine.client import connect as _connect, resolve_manifest

    db = _connect(target, **options)
    _address, folder, manifest_file = resolve_manifest(target)
    if folder is not None and os.path.basename(manifest_file) == "cluster.json":
        # a cluster folder (or its cluster.json): node and AZ controls as `db.cluster`
        from engine.cluster.launcher import Cluster

        db.cluster = Cluster(folder)
    return db


__all__ = [
    "BackupCorrupt",
    "BackupError",
    "Batch",
    "Change",
    "Closed",
    "Compacted",
    "Condition",
    "CorruptRecord",
    "Database",
    "EncryptionError",
    "FolderInUse",
    "GeometryMismatch",
    "InvalidArgument",
    "NodeNotFound",
    "PermissionDenied",
    "PreconditionFailed",
    "ReadOnly",
    "ReplicaBehind",
    "RequestStatus",
    "ResourceExhausted",
    "SegmentIncomplete",
    "SixfoldError",
    "Snapshot",
    "SnapshotTooOld",
    "StaleEpoch",
    "StorageError",
    "StorageFull",
    "Unauthenticated",
    "Unavailable",
    "Version",
    "WriteIndeterminate",
    "WrongFolder",
    "absent",
    "at_version",
    "codec_implementation",
    "connect",
    "equals",
    "errors",
    "exists",
    "open",
    "restore",
    "rotate_encryption_key",
    "unchanged",
]
