"""Embedded deployment: six storage nodes and the writer in this process, over the in-process
transport. Same node and head code as the cluster.

Layout on disk::

    PATH/LOCK               the owner's flock (engine.ownership); holds the owner's pid
    PATH/volume.json        format, volume id, geometry and node placement
    PATH/az-a/n1, az-a/n2   one LMDB environment per node
    PATH/az-b/n3, az-b/n4
    PATH/az-c/n5, az-c/n6

Theory of operation of an open
------------------------------
1. *Look before touching*: `check_volume_folder` lists PATH and refuses (WrongFolder, nothing
   written) a folder holding another kind of data: a cluster folder (cluster.json), a storage
   node's folder (an LMDB data.mdb at the top) or a folder of unknown files. A missing or empty
   folder becomes a new volume.
2. *One owner*: the open takes `engine.ownership.hold(PATH, "embedded volume")` before it reads or
   creates volume.json, and keeps it until `close()` (a failed open releases it; the kernel drops
   it when the process ends). LMDB would let a second process write the same files, and nothing
   in the protocol could fence it, so a second open raises FolderInUse naming the holder.
3. *Formats*: volume.json records `"format": VOLUME_FORMAT`. A newer format is refused with a
   message naming it; a volume.json without the field (format 0: format 1 before the field) is
   upgraded in place when nothing else is missing.
4. *The storage maximum* (`max_storage_bytes`): given, it is checked (a size, at most the
   filesystem), the nodes open with it (each refuses one below the data it holds, before
   writing anything), and only then volume.json records it; not given, the recorded one holds
   (a volume.json without the field, as every volume before it: the default, 32 GiB per node).
5. The nodes and the writer start; the writer's recovery makes the volume readable.

The volume's metrics (`engine.metrics`, `db.metrics()`) have a registry of their own: the
writer and every node are read at scrape time, and the backend methods below observe put and
get latency and count the errors they raise.
"""

from __future__ import annotations

import functools
import gc
import itertools
import json
import logging
import math
import os
import struct
import random
import shutil
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from engine import codec
from engine.core.constants import DEADLINE_US_MAX, FLAG_CPL, FLAG_EXPIRES, FLAG_PUT, LAL_DEFAULT, LSN_VALID_MAX, RECORD_HEADER_BYTES
from engine.core.placement import protection_group_of
from engine.core.types import Geometry, NodeInfo, default_nodes
from engine.formats import format_of
from engine.envelope import VolumeCipher, descriptor_problems, load_master_key, new_descriptor, rewrap, unwrap
from engine.errors import EncryptionError, GeometryMismatch, InvalidArgument, NodeNotFound, ReplicaBehind, SixfoldError, Unavailable, WrongFolder
from engine.files import TMP_SUFFIX, atomic_write
from engine.head.membership import MembershipChange
from engine.head.weakening import SAFE, Weakening
from engine.head.reads import check_key
from engine.head.watch import WATCH_HOLD_LSNS_DEFAULT, WatchCursor
from engine.head.writer import CHANGES_MAX, Writer, WriterOptions, check_value, node_status
from engine.database import Change
from engine.metrics import Metrics
from engine.node.service import GOSSIP_INTERVAL_S, SCRUB_INTERVAL_S, StorageNode
from engine.sizes import check_fits_filesystem, check_storage_bytes
from engine.ownership import LOCK_FILE, hold
from engine.transport.inprocess import InProcessTransport, Registry

log = logging.getLogger("sixfold.embedded")

VOLUME_FILE = "volume.json"
#: changes a watch takes from the writer per call, and how long it waits for more between calls
WATCH_CHUNK = 1_000
_DEADLINE = struct.Struct("<Q")
_U64BE = struct.Struct(">Q")
WATCH_POLL_S = 0.5
#: The volume.json format this release writes and reads. Format 0 is the same file without a
#: "format" field; it is upgraded in place on open. Every change of the file's meaning gets the
#: next number and an upgrade path here (tests/test_formats.py opens the kept fixture volumes).
#: The newest volume.json format this release reads. 1: a plain volume (0: the same, before the
#: field). 2: an encrypted volume (an "encryption" field holding its wrapped data key): an older
#: release, which knows no encryption, must refuse it rather than serve ciphertext as values.
VOLUME_FORMAT = 2
PLAIN_VOLUME_FORMAT = 1
ENCRYPTED_VOLUME_FORMAT = 2
#: What marks a cluster folder: `engine.cluster.manifest.MANIFEST_FILE` (not imported: the
#: cluster package loads the launcher and gRPC, which an embedded open does not need).
MANIFEST_FILE = "cluster.json"
#: What a storage node's folder holds at its top (its LMDB environment).
NODE_DATA_FILE = "data.mdb"
#: What a folder may hold and still be a new volume: the lock of an open that failed before it
#: wrote volume.json, and the temporary file of a volume.json write that did not finish.
NEW_VOLUME_LEFTOVERS = frozenset({LOCK_FILE, VOLUME_FILE + TMP_SUFFIX})
#: How many unknown names a WrongFolder message lists.
NAMES_SHOWN_MAX = 5
#: The bulk path's frames: about this many bytes, at most this many records each.
BULK_CHUNK_BYTES = 16 << 20
BULK_RECORDS_MAX = 65_536
#: The largest interval or timeout an option takes, in seconds (a year): beyond it a number is
#: more likely a unit mistake than a wish.
SECONDS_OPTION_MAX = 365 * 24 * 3600.0


@dataclass(frozen=True)
class EmbeddedOptions:
    protection_groups: int | None = None  # None: what the volume has, or the default for a new one
    durable: bool = True
    write_timeout_s: float = 5.0
    gossip_interval_s: float = GOSSIP_INTERVAL_S
    scrub_interval_s: float = SCRUB_INTERVAL_S
    #: the most each node's data may take (its LMDB map grows up to it): recorded in volume.json,
    #: so later opens keep it; None: what the volume records, else the default (32 GiB)
    max_storage_bytes: int | None = None
    #: the older name of max_storage_bytes (the map was fixed at it)
    map_bytes: int | None = None
    local_az: str = "a"
    seed: int = 0
    #: LSN allocation limit: at most this many LSNs in flight beyond VDL (back-pressure)
    lal: int = LAL_DEFAULT
    #: the master key of an encrypted volume (engine.envelope; 32 bytes or their base64/hex):
    #: given when the volume is created, it makes it encrypted; needed on every later open
    encryption_key: bytes | str | None = field(default=None, repr=False, compare=False)
    #: False: no background threads at all (no senders, gossip or scrub); a simulator drives the
    #: steps (`Writer.send_once`, `StorageNode.gossip_once`, `scrub_step`) itself
    background: bool = True
    #: version collection (engine.head.readpoints): how far the collection point trails the VDL,
    #: and how long request-id records are kept for re-sends
    collect_delay_s: float = 0.1
    request_retention_s: float = 60.0
    #: watches (engine.head.watch): the changes the writer keeps in memory for them (a watch from
    #: further back reads the nodes' logs), and how far behind the VDL, in LSNs, a watch may hold
    #: version collection back before it gets Compacted
    watch_memory_changes: int = CHANGES_MAX
    watch_hold_lsns: int = WATCH_HOLD_LSNS_DEFAULT
    #: after a writer (re)opens, how long it collects nothing above what the nodes had already
    #: collected, so that watches behind at a writer crash go on from the nodes' logs (0: none;
    #: a cluster's writer endpoint holds 10 s, engine.head.endpoint.RESUME_GRACE_S)
    resume_grace_s: float = 0.0
    #: back the volume up continuously into this folder (or `engine.backup.target.BackupTarget`):
    #: `engine.backup.archiver`; None: no backups
    backup: object | None = None
    #: remove backups no restore point of the last N days needs (None: keep everything)
    backup_retention_days: float | None = None
    #: the archiver's other settings (`engine.backup.archiver.BackupOptions`; its retention_days
    #: is overridden by backup_retention_days when that is given)
    backup_options: object | None = None

    def __post_init__(self) -> None:
        """Every number is checked here, before the open touches anything: a bad one is an
        InvalidArgument naming it, never a writer that fences itself at its first write."""
        for name, low, high in (("lal", 1, LSN_VALID_MAX), ("watch_memory_changes", 1, 1 << 32),
                                ("watch_hold_lsns", 0, LSN_VALID_MAX), ("seed", -(1 << 63), (1 << 64) - 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise InvalidArgument(f"{name}= is an int in {low}..{high}, got {value!r}")
        for name, positive in (("write_timeout_s", True), ("gossip_interval_s", False), ("scrub_interval_s", False),
                               ("collect_delay_s", False), ("request_retention_s", False), ("resume_grace_s", False)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not (0 < value if positive else 0 <= value) or value > SECONDS_OPTION_MAX:
                raise InvalidArgument(f"{name}= is a number of seconds in {'(0' if positive else '[0'}, "
                                      f"{SECONDS_OPTION_MAX:g}], got {value!r}")
        if self.backup_retention_days is not None:
            days = self.backup_retention_days
            if isinstance(days, bool) or not isinstance(days, (int, float)) or not math.isfinite(days) or not 0 < days <= 36_500:
                raise InvalidArgument(f"backup_retention_days= is a number of days in (0, 36500], got {days!r}")


def check_volume_folder(path: str) -> None:
    """Refuse a folder that holds another kind of data than an embedded volume (WrongFolder).

    Reads only the folder's listing: a refused open writes nothing. A missing or empty folder, or
    one holding a volume.json, passes (volume.json itself is checked under the lock)."""
    try:
        names = sorted(os.listdir(path))
    except FileNotFoundError:
        return
    except NotADirectoryError:
        raise WrongFolder(f"{path} is a file, not a folder; engine.open takes a volume folder (or a new path)") from None
    if MANIFEST_FILE in names:
        raise WrongFolder(
            f"{path} is a Sixfold cluster folder ({MANIFEST_FILE} found): its volume is served by the "
            f"cluster's processes, not opened in this one. Use engine.connect({path!r}) "
            f"(start the cluster with `sixfold cluster up --cluster {path}`)."
        )
    if NODE_DATA_FILE in names:
        volume = os.path.dirname(os.path.dirname(os.path.abspath(path)))
        where = (
            f"the volume is {volume}: open that with engine.open({volume!r})"
            if os.path.exists(os.path.join(volume, VOLUME_FILE))
            else "open the volume folder that holds it, or serve it with `sixfold node serve`"
        )
        raise WrongFolder(
            f"{path} is a storage node's folder (an LMDB {NODE_DATA_FILE} at its top): one segment of "
            f"each protection group, not a volume; {where}."
        )
    if VOLUME_FILE in names:
        return
    other = [n for n in names if n not in NEW_VOLUME_LEFTOVERS]
    if other:
        shown = ", ".join(other[:NAMES_SHOWN_MAX])
        if len(other) > NAMES_SHOWN_MAX:
            shown += f" and {len(other) - NAMES_SHOWN_MAX} more"
        raise WrongFolder(
            f"{path} holds files that are not a Sixfold volume ({shown}) and no {VOLUME_FILE}. "
            "engine.open creates a new volume only in a missing or empty folder: pick another path, "
            "or empty this one."
        )


def _volume_problems(vol: dict, fmt: int) -> list[str]:
    """What keeps `vol` (of format `fmt`) from being a volume file."""
    problems = []
    if fmt == ENCRYPTED_VOLUME_FORMAT:
        problems += descriptor_problems(vol.get("encryption"))
    elif "encryption" in vol:
        problems.append(f"an encryption field in a format-{fmt} (plain) volume file")
    if not isinstance(vol.get("volume_id"), str) or not vol.get("volume_id"):
        problems.append("no volume_id")
    pgs = vol.get("protection_groups")
    if type(pgs) is not int:
        problems.append("no protection_groups")
    else:
        try:
            Geometry(pgs)
        except InvalidArgument as e:
            problems.append(str(e))
    if "max_storage_bytes" in vol:  # absent in every volume written before the field (the default)
        try:
            check_storage_bytes(vol["max_storage_bytes"])
        except InvalidArgument as e:
            problems.append(str(e))
    nodes = vol.get("nodes")
    if not isinstance(nodes, list) or not nodes:
        problems.append("no nodes")
    elif not all(isinstance(n, dict) and isinstance(n.get("id"), str) and isinstance(n.get("az"), str) for n in nodes):
        problems.append("a node entry without id or az")
    return problems


def read_volume_file(path: str) -> dict:
    """PATH/volume.json, checked, and upgraded in place from an older format. The caller holds
    the folder's lock. WrongFolder when unreadable, invalid or of a newer format."""
    f = os.path.join(path, VOLUME_FILE)
    try:
        with open(f) as fh:
            vol = json.load(fh)
    except ValueError as e:
        raise WrongFolder(f"{f} is not a readable volume file ({e}); restore it from a backup, or open another path") from None
    if not isinstance(vol, dict):
        raise WrongFolder(f"{f} is not a volume file (it holds a JSON {type(vol).__name__}, not an object)")
    fmt = format_of(vol, VOLUME_FORMAT, f, "volume was written", WrongFolder)
    problems = _volume_problems(vol, fmt)
    if problems:
        raise WrongFolder(f"{f} is not a valid format-{fmt} volume file: {'; '.join(problems)}")
    if fmt < PLAIN_VOLUME_FORMAT:
        # Format 0 is format 1 without the field: writing the field is the whole upgrade.
        vol["format"] = PLAIN_VOLUME_FORMAT
        write_volume_file(path, vol)
        log.info("upgraded %s from format %d to format %d", f, fmt, PLAIN_VOLUME_FORMAT)
    return vol


def write_volume_file(path: str, vol: dict) -> None:
    """Replace PATH/volume.json atomically and durably (`engine.files.atomic_write`: temporary
    file, fsync, rename, fsync of the folder: the rename is not durable before the folder is)."""
    atomic_write(os.path.join(path, VOLUME_FILE), json.dumps(vol, indent=2, sort_keys=True).encode())


def volume_cipher(vol: dict, master_key: bytes | None, where: str) -> VolumeCipher | None:
    """The cipher of an opened volume, or None for a plain one; EncryptionError when the key is
    missing, wrong, or given for a plain volume (encryption is chosen at creation)."""
    d = vol.get("encryption")
    if d is None:
        if master_key is not None:
            raise EncryptionError(
                f"{where} is not encrypted, and encryption is chosen when a volume is created: it cannot be "
                "switched on in place. Open it without an encryption key, or copy its data into a new "
                "encrypted volume (restore a backup into one, once backups exist)."
            )
        return None
    if master_key is None:
        raise EncryptionError(f"{where} is encrypted: open it with its encryption key (encryption_key=..., --key-file)")
    return VolumeCipher(unwrap(d, master_key, vol["volume_id"]), vol["volume_id"])


def rotate_volume_key(path: str | os.PathLike, old_key, new_key) -> None:
    """Re-wrap an embedded volume's data key under `new_key` (no record changes). The volume
    must not be open (FolderInUse); EncryptionError if `old_key` is not its key."""
    path = os.fspath(path)
    old, new = load_master_key(old_key), load_master_key(new_key)
    owner = hold(path, "embedded volume (key rotation)")
    try:
        if not os.path.exists(os.path.join(path, VOLUME_FILE)):
            raise WrongFolder(f"{path} holds no volume ({VOLUME_FILE} not found)")
        vol = read_volume_file(path)
        if vol.get("encryption") is None:
            raise EncryptionError(f"{path} is not encrypted: there is no key to rotate")
        vol["encryption"] = rewrap(vol["encryption"], old, new, vol["volume_id"])
        write_volume_file(path, vol)
        log.info("re-wrapped the data key of %s under a new master key", path)
    finally:
        owner.release()


def load_or_create_volume(path: str, protection_groups: int | None, seed: int | None = None,
                          master_key: bytes | None = None) -> dict:
    """Read PATH/volume.json, or write it for a new volume (encrypted if `master_key` is given;
    the caller holds the folder's lock). GeometryMismatch if it disagrees with
    `protection_groups`; WrongFolder if it is unreadable; EncryptionError (see volume_cipher)."""
    os.makedirs(path, exist_ok=True)
    if os.path.exists(os.path.join(path, VOLUME_FILE)):
        vol = read_volume_file(path)
        if protection_groups is not None and protection_groups != vol["protection_groups"]:
            raise GeometryMismatch(
                f"{path} holds a volume with {vol['protection_groups']} protection groups; "
                f"asked for {protection_groups}. Open it without protection_groups, or use another path."
            )
        volume_cipher(vol, master_key, path)  # refuses a missing or wrong key before anything starts
        return vol
    geometry = Geometry(protection_groups) if protection_groups is not None else Geometry()
    vid = uuid.UUID(int=random.Random(seed).getrandbits(128), version=4) if seed is not None else uuid.uuid4()
    vol = {
        "format": PLAIN_VOLUME_FORMAT if master_key is None else ENCRYPTED_VOLUME_FORMAT,
        "volume_id": str(vid),
        "protection_groups": geometry.protection_groups,
        "nodes": [{"id": n.id, "az": n.az} for n in default_nodes()],
    }
    if master_key is not None:
        vol["encryption"] = new_descriptor(master_key, vol["volume_id"])
    write_volume_file(path, vol)
    return vol


class EmbeddedVolume:
    """The backend of `engine.open`: nodes, registry, writer; also the `db.cluster` controls."""

    def __init__(
        self, path: str, options: EmbeddedOptions = EmbeddedOptions(), *, transport_wrapper=None, clock=None,
        weakening: Weakening = SAFE, wall_clock_us=None,
    ) -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise InvalidArgument(f"path must be a str or os.PathLike, got {type(path).__name__}")
        self.path = os.fspath(path)
        self.options = options
        #: TEST ONLY (engine.head.weakening): never set by engine.open
        self.weakening = weakening
        self.registry = Registry()
        self.nodes: dict[str, StorageNode | None] = {}
        self._wrap = transport_wrapper or (lambda t: t)
        self._clock = clock
        #: TEST ONLY: the wall clock of commit times and backups (microseconds); default: the
        #: simulated `clock` when given, else the real one
        self._wall_us = wall_clock_us or ((lambda: int(clock() * 1_000_000)) if clock is not None else None)
        self._lock = threading.RLock()
        self.writer: Writer | None = None
        self.archiver = None
        #: this volume's metrics (engine.metrics; `db.metrics()`): a registry of its own, so that
        #: volumes opened side by side in one process never share a series
        self.metrics = Metrics()
        self.metrics.watch_writer(lambda: self.writer)
        self.metrics.watch_nodes(lambda: [(i.id, self.nodes.get(i.id)) for i in self.node_infos])
        check_volume_folder(self.path)  # refuses before anything is written
        given = self._given_maximum(options)
        self._owner = hold(self.path, "embedded volume")
        try:
            master = None if options.encryption_key is None else load_master_key(options.encryption_key)
            vol = load_or_create_volume(self.path, options.protection_groups, None if options.background else options.seed, master)
            self.cipher = volume_cipher(vol, master, self.path)
            self.volume_id = vol["volume_id"]
            self.geometry = Geometry(vol["protection_groups"])
            self.node_infos = [NodeInfo(n["id"], n["az"]) for n in vol["nodes"] if not n.get("retired")]
            self._retired: set[str] = {n["id"] for n in vol["nodes"] if n.get("retired")}
            self._request_rng: random.Random | None = None
            # New request ids: 8 random bytes drawn once per open, then a counter (big-endian).
            # Consecutive ids sort next to each other, so a flush's request records land in a
            # few pages of the request index instead of one random page each (bench/embedded.py).
            self._request_prefix = os.urandom(8)
            self._request_counter = itertools.count(1)
            #: the most each node's data may take (None: the nodes' default)
            self.max_storage_bytes = given if given is not None else vol.get("max_storage_bytes")
            self.archiver = self._make_archiver(vol)
            for info in self.node_infos:
                self.registry.set(info.id, None)
            for info in self.node_infos:  # all opened before any gossips: none finds a peer not yet up
                self._start(info, background=False)
            for info in self.node_infos:
                self._start_background(info.id)
            if given is not None and given != vol.get("max_storage_bytes"):
                # Recorded once every node took it (a node refuses a maximum below its data).
                vol = read_volume_file(self.path)
                vol["max_storage_bytes"] = given
                write_volume_file(self.path, vol)
                log.info("%s: the storage maximum is now %d bytes per node", self.path, given)
            self.open_writer()
            if self.archiver is not None:
                self.archiver.start()
        except BaseException:
            if self.writer is not None:
                self.writer.abandon()
            self._shutdown_nodes()
            self._owner.release()
            raise

    def _given_maximum(self, options: EmbeddedOptions) -> int | None:
        """The maximum this open sets (checked: a size, at most the filesystem), or None."""
        given, older = options.max_storage_bytes, options.map_bytes
        if given is not None and older is not None and given != older:
            raise InvalidArgument(f"map_bytes {older} and max_storage_bytes {given} disagree; map_bytes is the older "
                                  "name of max_storage_bytes: give one")
        given = given if given is not None else older
        if given is None:
            return None
        check_storage_bytes(given)
        check_fits_filesystem(given, self.path)
        return given
    # --- backups (engine.backup.archiver) -----------------------------------------------------
    def _make_archiver(self, vol: dict):
        o = self.options
        if o.backup is None:
            return None
        from dataclasses import replace

        from engine.backup.archiver import Archiver, BackupOptions

        bo = o.backup_options or BackupOptions()
        if o.backup_retention_days is not None:
            bo = replace(bo, retention_days=o.backup_retention_days)
        extra = {"clock": self._clock} if self._clock is not None else {}
        if self._wall_us is not None:
            extra["wall_clock_us"] = self._wall_us
        return Archiver(o.backup, volume_id=self.volume_id, protection_groups=self.geometry.protection_groups,
                        encryption=vol.get("encryption"), options=bo, background=o.background, **extra)

    # --- the bulk path (a restore fills a new volume so) ------------------------------------
    def bulk_load(self, pairs, *, chunk_bytes: int = BULK_CHUNK_BYTES, progress=None) -> int:
        # `pairs`: (key, value), or (key, value, deadline) for an expiring put (engine.head.expiry).
        """Fill this new, empty volume with `pairs` ((key, value), each key once), faster than
        writes can: the writer is closed, each chunk of about `chunk_bytes` of pairs is sorted by
        protection group and key and given consecutive LSNs in that order, encoded once (sealed
        under this volume's key when encrypted), and appended as one frame (its last record a CPL)
        to every member at the writer's epoch through the nodes' own append (their checks, CRCs
        and SCLs), all six before the next frame. The order is for LMDB: a frame's log keys
        (`pg | lsn`) and version keys (`pg | key`) then arrive in ascending runs, which fill pages
        instead of splitting them in half (half the pages, and half the bytes written). Then a
        writer opens again, and its recovery finds every record durable. Returns the VDL.
        InvalidArgument if the volume holds anything; the node's error if an append fails (the
        volume is then incomplete: a restore throws it away)."""
        with self._lock:
            w = self._w
            if w.ledger.vdl != 0 or w.ledger.next_lsn != 1:
                raise InvalidArgument(f"bulk_load fills a new, empty volume only; {self.path} holds records")
            epoch, members = w.epoch, list(w.ledger.membership.all_nodes)
            w.close()
            self.writer = None
            transport = InProcessTransport(self.registry, "writer")
            P, cipher = self.geometry.protection_groups, self.cipher
            prev = [0] * P
            chunk: list[tuple[int, bytes, bytes, bytes]] = []  # (pg, index key, key, value), unsorted
            size = lsn = durable = 0

            in_flight: list = []  # the appends of the frame before: the next one is encoded meanwhile
            in_flight_lsn = 0

            def settle() -> None:
                nonlocal in_flight, durable
                for f in in_flight:
                    f.result()  # raises the node's error
                if in_flight:
                    durable = in_flight_lsn
                    if progress is not None:
                        progress(durable)
                in_flight = []

            def ship() -> None:
                nonlocal chunk, size, in_flight, in_flight_lsn, lsn
                chunk.sort(key=lambda c: (c[0], c[1]))  # each key once: no two entries tie
                records = []
                for i, (pg, ik, key, value, deadline) in enumerate(chunk):
                    lsn += 1
                    sealed = value if cipher is None else cipher.seal(pg, lsn, ik, key, value)
                    flags = FLAG_PUT | FLAG_CPL if i == len(chunk) - 1 else FLAG_PUT
                    if deadline:  # an expiring put keeps its deadline, outside the seal (node format 4)
                        flags |= FLAG_EXPIRES
                        sealed = _DEADLINE.pack(deadline) + sealed
                    records.append(codec.encode_record(lsn, prev[pg], pg, flags, ik, sealed))
                    prev[pg] = lsn
                frame = codec.encode_frame(records)
                items = codec.index_frame(frame)  # once for all six (each would index it again)
                settle()  # all six hold the frame before: only then is it durable, the hint of this one
                # The six appends at once: LMDB writes and fsyncs without the GIL.
                in_flight = [pool.submit(append, n, frame, durable, items) for n in members]
                in_flight_lsn, chunk, size = lsn, [], 0

            def append(node: str, frame: bytes, hint: int, items) -> None:
                target = self.registry.get(node)
                if target is None:
                    raise Unavailable(f"node {node} is down: the bulk load stops")
                target.handle("append", epoch, frame, hint, 0, 0, items)

            pool = ThreadPoolExecutor(max_workers=len(members), thread_name_prefix="bulk-load")
            # Millions of short-lived, acyclic objects: the cyclic collector would walk them all
            # again and again (15% of a restore's time); it is paused for the load, then resumed.
            collecting = gc.isenabled()
            gc.disable()
            try:
                for pair in pairs:
                    key, value = pair[0], pair[1]
                    deadline = pair[2] if len(pair) > 2 else 0
                    check_key(key)
                    check_value(value)
                    if not (type(deadline) is int and 0 <= deadline <= DEADLINE_US_MAX):
                        raise InvalidArgument(f"a deadline is an int in 0..{DEADLINE_US_MAX} microseconds, got {deadline!r}")
                    ik = key if cipher is None else cipher.index_key(key)
                    chunk.append((protection_group_of(ik, P), ik, key, value, deadline))
                    size += RECORD_HEADER_BYTES + len(ik) + len(value)
                    if size >= chunk_bytes or len(chunk) >= BULK_RECORDS_MAX:
                        ship()
                if chunk:
                    ship()
                settle()
            finally:
                pool.shutdown()
                if collecting:
                    gc.enable()
            for n in members:  # every node learns that all of it is durable (a small seal summary)
                transport.append(n, epoch, codec.encode_frame([]), lsn)
            self.open_writer()
            if self.writer.ledger.vdl != lsn:
                raise SixfoldError(f"bulk load wrote {lsn} records, but the volume recovered to VDL {self.writer.ledger.vdl}")
            return lsn

    def backup_now(self, timeout_s: float = 3600.0) -> dict:
        """Take a base snapshot now and wait for it (bounded); returns the archiver's status."""
        a = self.archiver
        if a is None:
            raise InvalidArgument(f"{self.path} is not backed up: open it with backup=DIR")
        rid = a.request_base()
        deadline = time.monotonic() + timeout_s
        while True:
            if not self.options.background:
                a.step()
            st = a.status()
            if a.base_of_request(rid) is not None:
                return st
            if st["fenced"] or time.monotonic() >= deadline:
                raise Unavailable(f"the base snapshot did not finish within {timeout_s:g} s "
                                  f"(backup: {st['fenced'] or st['last_error'] or 'no error'})")
            time.sleep(0.05)

    # --- nodes ------------------------------------------------------------------------------
    def _info(self, node_id: str) -> NodeInfo:
        for info in self.node_infos:
            if info.id == node_id:
                return info
        raise NodeNotFound(f"no node {node_id!r}; this volume has {', '.join(i.id for i in self.node_infos)}")

    def node_path(self, info: NodeInfo) -> str:
        return os.path.join(self.path, f"az-{info.az}", info.id)

    def _start(self, info: NodeInfo, background: bool = True) -> None:
        o = self.options
        node = StorageNode(
            self.node_path(info), info, self.geometry, self.volume_id, durable=o.durable,
            max_storage_bytes=self.max_storage_bytes,
            seed=o.seed + int.from_bytes(info.id.encode(), "little") % 1000,
        )
        node.attach(self._wrap(InProcessTransport(self.registry, info.id)), self._peer_ids)
        self.nodes[info.id] = node
        self.registry.set(info.id, node)
        if background:
            self._start_background(info.id)

    def _start_background(self, node_id: str) -> None:
        o, node = self.options, self.nodes.get(node_id)
        if node is not None and o.background and o.gossip_interval_s > 0:
            node.start_background(o.gossip_interval_s, o.scrub_interval_s)

    def _peer_ids(self) -> list[str]:
        w = self.writer
        if w is not None and w.ledger is not None:
            return list(w.ledger.membership.all_nodes)
        return [i.id for i in self.node_infos]

    def open_writer(self) -> None:
        """Open a writer (recovery at a new epoch) if none is open; the simulator's way back
        after a writer crash (`crash_writer` does both halves at once)."""
        o = self.options
        w = Writer(
            self._wrap(InProcessTransport(self.registry, "writer")),
            self.node_infos,
            self.geometry,
            WriterOptions(write_timeout_s=o.write_timeout_s, local_az=o.local_az, lal=o.lal,
                          collect_delay_s=o.collect_delay_s, request_retention_s=o.request_retention_s,
                          changes_max=o.watch_memory_changes, watch_hold_lsns=o.watch_hold_lsns,
                          resume_grace_s=o.resume_grace_s),
            background=o.background,
            weakening=self.weakening,
            cipher=self.cipher,
            metrics=self.metrics,
            **({"clock": self._clock} if self._clock is not None else {}),
            **({"wall_clock_us": self._wall_us} if self._wall_us is not None else {}),
        )
        # The archiver's hold on version collection, before the writer's first heartbeat (engine.backup.archiver)
        hold = w.read_points.register("backup archiver", 0) if self.archiver is not None else None
        w.open()
        if self.archiver is not None:
            try:
                self.archiver.attach(w, hold)  # before any write: its commit times continue the archive's
            except BaseException:
                w.abandon()
                raise
        self.writer = w

    def stop_node(self, node_id: str) -> None:
        """Stop a node as a crash would (its LMDB folder stays)."""
        with self._lock:
            self._info(node_id)
            node = self.nodes.get(node_id)
            self.registry.set(node_id, None)
            self.nodes[node_id] = None
            if node is not None:
                node.close()

    def start_node(self, node_id: str) -> None:
        with self._lock:
            info = self._info(node_id)
            if self.nodes.get(node_id) is None:
                self._start(info)

    def stop_az(self, az: str) -> None:
        for info in self._az(az):
            self.stop_node(info.id)

    def start_az(self, az: str) -> None:
        for info in self._az(az):
            self.start_node(info.id)

    def _az(self, az: str) -> list[NodeInfo]:
        found = [i for i in self.node_infos if i.az == az]
        if not found:
            raise InvalidArgument(f"no AZ {az!r}; AZs are {', '.join(sorted({i.az for i in self.node_infos}))}")
        return found

    def wipe_node(self, node_id: str) -> None:
        """Stop a node, delete its data folder, start it empty: it rebuilds from its peers."""
        with self._lock:
            info = self._info(node_id)
            self.stop_node(node_id)
            shutil.rmtree(self.node_path(info), ignore_errors=True)
            self._start(info)

    def corrupt(self, node_id: str, pg: int, lsn: int | None = None, bit: int = 0) -> int | None:
        """Flip a bit of a stored record on a node (fault injection). Returns the LSN hit."""
        node = self.nodes.get(node_id)
        if node is None:
            raise SixfoldError(f"node {node_id} is down")
        return node.corrupt(pg, lsn, bit)

    def crash_writer(self) -> None:
        """Kill the writer as a crash would, then open a new one (recovery at a new epoch)."""
        with self._lock:
            old = self.writer
            if old is not None:
                old.abandon()
            if self.archiver is not None:
                self.archiver.detach()
            self.writer = None
            self.open_writer()

    def replace_node(self, old: str, new: str, timeout_s: float = 120.0, progress=None) -> dict:
        """Replace node `old` (say, failed for good) by a new node `new` in the same AZ, without
        stopping writes (the one driver: `engine.head.membership.MembershipChange`): epoch step 1
        adds `new` as a second quorum set; once `new` holds every PG's durable chain, epoch step 2
        drops `old`, which is retired once a write quorum knows it. If `old` was down and comes
        back before that, the change is reverted. Returns a summary; `progress(fraction)` is
        called while `new` rebuilds. A refused change leaves no new node behind."""
        c = self.begin_replace(old, new, timeout_s=timeout_s)
        phase = c.run(progress=progress)
        if phase == "failed":
            raise SixfoldError(f"replacing {old} by {new} failed: {c.error}")
        w = self._w
        return {"replaced": phase == "replaced", "reverted": phase == "reverted", "seconds": c.seconds, "epoch": w.epoch}

    def begin_replace(self, old: str, new: str, *, timeout_s: float = 120.0, revert: bool = True) -> MembershipChange:
        """Start replacing `old` by `new` (epoch step 1 done when it returns) and return the
        change; `poll()` it (a simulator, one step at a time) or `run()` it to the end."""
        known = {i.id: i for i in self.node_infos}
        # the new node's AZ is the old one's (asked again once done, only the new one is left)
        az = (known.get(old) or known.get(new) or self._info(old)).az
        change = MembershipChange(self, old, new, az, timeout_s=timeout_s, revert=revert,
                                  **({"clock": self._clock} if self._clock is not None else {}))
        return change.begin()

    # The ChangeHost of engine.head.membership:
    def current_writer(self) -> Writer | None:
        return self.writer

    def add_node(self, info: NodeInfo, address: str | None) -> bool:
        """Start a new node `info` (its folder in its AZ); False if it runs already."""
        with self._lock:
            if info.id in self._retired:
                raise InvalidArgument(f"node {info.id} was retired from this volume; pick a new node id")
            if any(i.id == info.id for i in self.node_infos):
                return False
            if not info.id or not info.id.replace("-", "").replace("_", "").isalnum():
                raise InvalidArgument(f"node id {info.id!r}: use letters, digits, - or _")
            self.node_infos.append(info)
            if self.writer is not None:
                self.writer.nodes = tuple(self.node_infos)
            self._save_nodes()
            self.registry.set(info.id, None)
            self._start(info)
            return True

    def retire_node(self, node_id: str) -> None:
        """Stop `node_id` and record it retired (it left the volume, or never joined it)."""
        with self._lock:
            self.stop_node(node_id)
            self.node_infos = [i for i in self.node_infos if i.id != node_id]
            self._retired.add(node_id)
            if self.writer is not None:
                self.writer.nodes = tuple(self.node_infos)
            self._save_nodes()

    def _save_nodes(self) -> None:
        vol = read_volume_file(self.path)
        known = {n["id"]: n for n in vol["nodes"]}
        for i in self.node_infos:
            known.setdefault(i.id, {"id": i.id, "az": i.az})
        for n in known.values():
            if n["id"] in self._retired:
                n["retired"] = True
        vol["nodes"] = list(known.values())
        write_volume_file(self.path, vol)

    def node_list(self) -> list[dict]:
        return [{"id": i.id, "az": i.az, "up": self.nodes.get(i.id) is not None} for i in self.node_infos]

    # --- backend protocol (for Database) ----------------------------------------------------
    @property
    def _w(self) -> Writer:
        w = self.writer
        if w is None:
            raise Unavailable("the writer is recovering; retry")
        return w

    # Put and get latency and the errors callers get are observed here, at the API boundary
    # (engine.metrics): one observe() per call, the error path only for errors.
    def write(self, ops, *, request_id=None, resend=False, conditions=()):
        m = self.metrics
        return m.timed(m.observe_put, lambda: self._w.write(ops, request_id=request_id, resend=resend, conditions=conditions))

    def request_status(self, request_id):
        return self._w.request_status(request_id)

    def watch(self, prefix, start):
        """Changes from the writer's memory of them, or from the nodes' logs when `start` is
        older (`engine.head.watch.WatchCursor`, which holds version collection back while the
        watch lives), following the writer across a crash (from where the last one left off).
        The position is held when this returns (a write made after it is never collected away
        under the watch), not at the first change asked for."""
        changes = self._watch(prefix, start)
        next(changes)  # up to its first yield: the cursor holds the position
        return changes

    def _watch(self, prefix, start):
        position = self._w.view().read_point if start is None else start
        w = cursor = None
        try:
            w = self._w
            cursor = WatchCursor(w, position)
            yield None  # ready (see watch)
            while True:
                if w is not self._w:
                    cursor.close()
                    w = self._w
                    cursor = WatchCursor(w, position)
                try:
                    changes, nxt = cursor.next(WATCH_CHUNK)
                except Unavailable:
                    if w is self.writer:
                        raise
                    continue  # a new writer took over: go on with it
                for cpl, key, value in changes:
                    if key.startswith(prefix):
                        yield Change(key, value, cpl)
                if nxt == position:
                    w.wait_vdl(position, WATCH_POLL_S)
                position = nxt
        finally:
            if cursor is not None:
                cursor.close()

    def version(self, key):
        """(lsn, value, deadline, clock) of the key's newest live version; lsn 0 for none."""
        w = self._w
        lsn, value, deadline = w.reads.version(key)
        if value is None or (deadline and deadline <= w.log_time_us()):
            return 0, None, 0, w.clock_us()
        return lsn, value, deadline, w.clock_us()

    def new_request_id(self) -> bytes:
        """16 bytes, unique: 8 random ones drawn when the volume opened, then a count of the ids
        it gave since (an in-process caller needs uniqueness, not secrecy: nothing outside this
        process can send under an id). Drawn from the volume's seed when a simulator drives it
        (no background threads), so that a seeded run logs the very same records every time."""
        if self.options.background:
            return self._request_prefix + _U64BE.pack(next(self._request_counter))
        if self._request_rng is None:
            self._request_rng = random.Random(f"request-ids:{self.options.seed}")
        return self._request_rng.randbytes(16)

    def get(self, key, *, quorum=False, view=None, after=0):
        def call():
            self.wait_after(after)
            return self._w.get(key, quorum=quorum, view=view)

        m = self.metrics
        return m.timed(m.observe_get, call)

    def get_many(self, gets, *, after=0):
        t0 = time.perf_counter()
        try:
            self.wait_after(after)
            results = self._w.reads.get_many(gets)
        except SixfoldError as e:
            self.metrics.count_error(e)
            raise
        self.metrics.observe_each(self.metrics.observe_get, results, time.perf_counter() - t0)
        return results

    def scan(self, start, end, *, quorum=False, view=None, after=0):
        try:
            self.wait_after(after)
            return self._w.scan(start, end, quorum=quorum, view=view)
        except SixfoldError as e:
            self.metrics.count_error(e)
            raise

    def wait_after(self, after: int) -> None:
        """Read-your-writes (`after=`): the embedded writer's read point is its VDL, which covers
        every write it acknowledged, so this returns at once; a position it has not reached
        (another volume's, say) waits up to the write timeout, then ReplicaBehind."""
        if not after:
            return
        w = self._w
        timeout_s = self.options.write_timeout_s
        if w.ledger.vdl < after and w.wait_vdl(after - 1, timeout_s) < after:
            raise ReplicaBehind(f"the volume's VDL {w.ledger.vdl} did not reach LSN {after} within {timeout_s:g} s "
                                "(was that position given by this volume?)")

    def view(self):
        return self._w.view()

    def open_snapshot(self):
        """A view held against version collection until the returned function is called."""
        w = self._w
        view, reg = w.open_snapshot("snapshot")
        return view, functools.partial(w.read_points.release, reg)

    def status(self) -> dict:
        w = self._w.status()
        vdl = w["vdl"]
        nodes = []
        for info in self.node_infos:
            node = self.nodes.get(info.id)
            entry = {"id": info.id, "az": info.az, "up": node is not None}
            if node is not None:
                try:
                    st = node.state()
                except SixfoldError:
                    st = None
                if st is not None:
                    entry.update(node_status(st, w["pgcl"]))
            nodes.append(entry)
        return {
            "volume_id": self.volume_id,
            "protection_groups": self.geometry.protection_groups,
            "codec": codec.IMPLEMENTATION,
            "durable": self.options.durable,
            "encrypted": self.cipher is not None,
            "vdl": vdl,
            "epoch": w["epoch"],
            "nodes": nodes,
            "writer": w,
            **({"backup": self.archiver.status()} if self.archiver is not None else {}),
        }

    def _shutdown_nodes(self) -> None:
        for node in list(self.nodes.values()):  # all told first: no gossip finds a peer gone
            if node is not None:
                node.stop_background()
        for node_id, node in list(self.nodes.items()):
            if node is not None:
                node.close()
            self.nodes[node_id] = None
            self.registry.set(node_id, None)

    def close(self) -> None:
        with self._lock:
            try:
                if self.archiver is not None:
                    self.archiver.close(flush=self.writer is not None)
                if self.writer is not None:
                    self.writer.close()
            finally:
                self._shutdown_nodes()
            # Last, and only once every node closed its files: if closing failed, the folder
            # stays held until this process ends rather than be shared with a second owner.
            self._owner.release()


class ClusterControl:
    """`db.cluster` of an embedded database: node and AZ controls for demos, tests and chaos."""

    def __init__(self, volume: EmbeddedVolume) -> None:
        self._v = volume

    @property
    def nodes(self) -> list[dict]:
        return self._v.node_list()

    def stop_node(self, node_id: str) -> None:
        self._v.stop_node(node_id)

    def start_node(self, node_id: str) -> None:
        self._v.start_node(node_id)

    def stop_az(self, az: str) -> None:
        self._v.stop_az(az)

    def start_az(self, az: str) -> None:
        self._v.start_az(az)

    def wipe_node(self, node_id: str) -> None:
        self._v.wipe_node(node_id)

    def corrupt(self, node_id: str, pg: int, lsn: int | None = None, bit: int = 0) -> int | None:
        return self._v.corrupt(node_id, pg, lsn, bit)

    def crash_writer(self) -> None:
        self._v.crash_writer()

    def backup_now(self, timeout_s: float = 3600.0) -> dict:
        """A base snapshot of a volume opened with backup=DIR, now; waits for it."""
        return self._v.backup_now(timeout_s)

    def replace_node(self, old: str, new: str, timeout_s: float = 120.0, progress=None) -> dict:
        return self._v.replace_node(old, new, timeout_s, progress)
