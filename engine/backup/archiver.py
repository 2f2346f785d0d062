"""The continuous archiver: durable log records to a backup target, and base snapshots.

Theory of operation
-------------------
The archiver runs in the writer's process, beside the `Writer` (the embedded engine and the
writer endpoint start it; a promoted reader's or a standby's new writer endpoint starts its own,
which continues the same archive). It needs from the writer only what a reader instance needs:
`read_point()` (epoch, VDL, every PG's read tail, each member's SCLs) and `wait_vdl`, plus the
transport to the nodes. It never touches the writer's tail or lock, so it cannot slow a commit
down by more than the CPU it uses.

*Rounds.* At most every `round_s`: note the wall clock `w`, take the writer's read point (VDL V),
and fetch from the nodes, for every PG whose read tail moved, the records in (its last archived
LSN, its tail], from a segment the writer knows complete to that tail (same AZ first; another one
if it fails). Only records at or below the VDL are archived: durable, so no recovery can cut them,
and one LSN names one record for ever, so any writer's archiver archives the same bytes. Each
PG's records must continue its chain of backlinks from the last one archived, or the node is
skipped. Everything acknowledged before `w` is at or below V, so once (.., V] is archived the
archive is *complete through* `w`: a restore to any time up to `w` is exact.

*Segments.* Fetched frames collect in memory and are cut into a segment file every `segment_s`
or `segment_bytes`, always at a round's VDL (a CPL: units never span segments). Once the file is
written, `position()` moves to its last LSN, and a new manifest version records the position.
What was fetched but not yet written stays on the nodes: an archiver that dies loses nothing.

*Bases.* A base snapshot is the newest version of every live key at one CPL L: L is the
position right after a segment cut, each PG is scanned at read point L from a segment complete
to its tail, and the versions are written as they are stored (sealed on an encrypted volume) in
parts of at most `base_part_bytes`. It runs in a thread of its own (the log keeps being archived),
and is listed in the manifest only once every part is written. Bases are taken when the archive
is new, every `base_interval_s`, and on demand (`request_base()`, or a request object that
`sixfold backup now` writes into the target's `requests/`).

*Commit times* are the writer's (stamped into each unit's request record when it is given its
LSNs; `engine.core.constants.REQUEST_TIME_BYTES`): a restore to time T keeps exactly the units
with a commit time at or below T. The manifest keeps the newest one archived, and a new writer
raises its floor to it (`Writer.raise_commit_time_floor`), so times never go backwards across
writers (on one host, clocks agree; across hosts a failover may stamp up to the clock offset late).

*Two archivers, one archive.* Manifest versions are created exclusively (`BackupTarget.create`).
An archiver whose version number is taken re-reads the manifest: if a newer epoch wrote it, its
writer was replaced, and it stops (fenced); segments either of them wrote hold the same bytes.

*Retention* (`retention_days`): after every base, the bases older than the newest base at or
before the window's start are dropped from the manifest, then their parts and every segment at
or below that base's LSN are deleted: every restore point in the window keeps what it needs.

Failure policy (logger "sixfold.backup"): an error in a round or a base is logged once per change
of cause, counted (`status()["errors"]`, `last_error`) and retried after a back-off up to 5 s; a
writer that is fenced or closed leaves the archiver idle until the next one is attached.
Version collection keeps what `hold_lsn()` names: the archiver holds it as a registration in the
writer's `read_points` (engine.head.readpoints), renewed every round for HOLD_LEASE_S (an archiver
that stops renewing stops holding collection back). Its host registers a hold at LSN 0 before it
opens the writer and passes it to `attach`, which moves it to the archive's position: a new
writer's first heartbeats would otherwise let the nodes collect what the archive still needs.
"""

from __future__ import annotations

import heapq
import logging
import struct
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from engine import codec
from engine.backup.format import (
    BASES,
    KIND_BASE,
    KIND_SEGMENT,
    MANIFESTS,
    REQUESTS,
    SEGMENTS,
    base_part_name,
    commit_time_of,
    decode_file,
    decode_manifest,
    encode_file,
    encode_manifest,
    file_crc,
    manifest_name,
    parse_base_part_name,
    parse_manifest_name,
    parse_segment_name,
    segment_name,
)
from engine.backup.target import BackupTarget, target_of
from engine.core.constants import FLAG_EXPIRES, FLAG_PUT, FLAG_REQUEST, FRAME_BYTES_MAX, RECORD_HEADER_BYTES
from engine.errors import BackupCorrupt, BackupError, SixfoldError, SnapshotTooOld, StaleEpoch, Unavailable

#: an expiring put's deadline, the first bytes of its stored value (node format 4)
_DEADLINE = struct.Struct("<Q")
log = logging.getLogger("sixfold.backup")

#: What one fetch asks a node for (a node answers at most its own FETCH_BYTES_MAX).
FETCH_BYTES = 8 << 20
#: Versions asked per scan call while a base is taken.
SCAN_LIMIT = 4096
#: A base part's frames are cut at this many bytes of records.
BASE_FRAME_BYTES = 4 << 20
BACKOFF_S_MAX = 5.0
#: How long closing waits for a base in progress to finish.
BASE_WAIT_ON_CLOSE_S = 60.0
#: The lease of the archiver's hold on version collection (renewed every round).
HOLD_LEASE_S = 60.0
DAY_US = 86_400 * 1_000_000


@dataclass(frozen=True)
class BackupOptions:
    """How a volume is backed up (`engine.open(..., backup=DIR)`, `--backup DIR`)."""

    #: remove what no restore point of the last N days needs; None: keep everything
    retention_days: float | None = None
    #: a new base snapshot this often (the first when the archive is new; more on demand)
    base_interval_s: float = 86_400.0
    #: a segment is written after this long, or once this many bytes are waiting
    segment_s: float = 2.0
    segment_bytes: int = 32 << 20
    #: rounds start at most this often (each costs a fetch per PG that moved)
    round_s: float = 0.25
    #: with nothing new to archive, the manifest's "complete through" is renewed this often
    idle_publish_s: float = 10.0
    #: requests for a base (`sixfold backup now`) are looked for this often
    request_poll_s: float = 1.0
    #: a base part holds at most this many bytes
    base_part_bytes: int = 64 << 20
    #: manifest versions kept (the newest ones)
    manifests_kept: int = 8

    def __post_init__(self) -> None:
        if self.retention_days is not None and not (isinstance(self.retention_days, (int, float)) and self.retention_days > 0):
            raise BackupError(f"backup retention must be a positive number of days, got {self.retention_days!r}")
        for name in ("base_interval_s", "segment_s", "round_s", "idle_publish_s", "request_poll_s"):
            if not getattr(self, name) > 0:
                raise BackupError(f"backup option {name} must be positive, got {getattr(self, name)!r}")
        if not (1 << 16 <= self.segment_bytes <= FRAME_BYTES_MAX * 4 and 1 << 16 <= self.base_part_bytes <= 1 << 30):
            raise BackupError("segment_bytes / base_part_bytes out of range (64 KiB .. 256 MiB / 1 GiB)")


def _now_us() -> int:
    return time.time_ns() // 1000


def load_current_manifest(target: BackupTarget) -> tuple[dict | None, int, list[str]]:
    """(newest manifest that checks, highest version number present, problems with newer ones).
    (None, 0, []) for an empty target; BackupError for a manifest of a newer format."""
    names = [n for n in target.list(MANIFESTS) if parse_manifest_name(n) is not None]
    highest = max((parse_manifest_name(n) for n in names), default=0)
    problems = []
    for name in reversed(names):
        try:
            m = decode_manifest(name, target.read(name))
        except BackupCorrupt as e:
            problems.append(str(e))
            continue
        if m["seq"] != parse_manifest_name(name):
            problems.append(f"backup manifest {name} says it is version {m['seq']}")
            continue
        return m, highest, problems
    if names:
        raise BackupCorrupt(f"no manifest version in {target.describe()} checks: {'; '.join(problems)}")
    return None, 0, []


class _Base:
    """A base snapshot in progress (its progress is read by status())."""

    def __init__(self, lsn: int, tails: list[int], time_us: int | None, requests: list[str], pgs: int) -> None:
        self.lsn = lsn
        self.tails = tails
        self.time_us = time_us
        self.requests = requests
        self.pgs = pgs
        self.pgs_done = 0
        self.records = 0
        self.bytes = 0
        self.started_us = _now_us()
        self.parts: list[dict] = []

    def progress(self) -> dict:
        return {"lsn": self.lsn, "pgs_done": self.pgs_done, "pgs": self.pgs, "records": self.records,
                "bytes": self.bytes, "fraction": round(self.pgs_done / self.pgs, 4), "started_us": self.started_us}


class Archiver:
    """One volume's continuous archiver into one target (see the module docstring)."""

    def __init__(
        self,
        target,
        *,
        volume_id: str,
        protection_groups: int,
        encryption: dict | None = None,
        options: BackupOptions = BackupOptions(),
        background: bool = True,
        wall_clock_us: Callable[[], int] = _now_us,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.target: BackupTarget = target_of(target)
        self.volume_id = volume_id
        self.P = protection_groups
        self.encryption = encryption
        self.options = options
        self._background = background
        self._wall = wall_clock_us
        self._clock = clock
        self._writer = None
        #: (writer, registration) holding version collection at `hold_lsn()` (engine.head.readpoints)
        self._hold: tuple[object, int] | None = None
        self._lock = threading.RLock()  # the manifest, the position, the writer
        self._wake = threading.Condition(self._lock)
        self._m: dict | None = None  # the manifest as last published
        self._highest_seq = 0
        self._fenced: str | None = None
        self._closed = False
        self._thread: threading.Thread | None = None
        self._step_lock = threading.Lock()  # one round at a time (the loop's, or close's last one)
        self._abort_base = False
        self._base: _Base | None = None
        self._base_thread: threading.Thread | None = None
        self._base_wanted: list[str] = []  # request ids waiting for a base
        self._base_now = False
        # The log: durable in the target through `_pos`; fetched (in `_frames`) through `_fetched`.
        self._pos = 0
        self._pg_pos: list[int] = [0] * protection_groups
        self._fetched = 0
        self._pg_fetched: list[int] = [0] * protection_groups
        self._frames: list[bytes] = []
        self._frames_bytes = 0
        self._frames_records = 0
        self._frames_since = 0.0
        self._first_time: int | None = None
        self._time_us: int | None = None  # the newest commit time archived (fetched)
        self._pos_time_us: int | None = None  # ... and written
        self._complete_us = 0  # fetched: complete through this wall time
        self._pos_complete_us = 0  # written
        self._epoch = 0
        self._last_round = float("-inf")
        self._last_publish = float("-inf")
        self._last_request_poll = float("-inf")
        self._backoff_s = 0.0
        self._logged = ""
        self.stats = {"segments_written": 0, "bytes_written": 0, "records_archived": 0, "bases_written": 0,
                      "files_pruned": 0, "errors": 0}
        self.last_error = ""

    # --- lifecycle --------------------------------------------------------------------------
    def attach(self, writer, hold: int | None = None) -> None:
        """Archive for `writer` (just opened) from now on: claim the archive at its epoch, take
        the archive's position, and raise the writer's commit-time floor to the archive's
        newest time. Call before the writer serves writes. `hold`: the registration its host made
        at LSN 0 before opening the writer (see the module docstring); it becomes the archiver's
        hold on version collection. Raises BackupError (another volume's archive, a newer
        format, a newer writer's archive) and BackupCorrupt (a manifest that does not check)."""
        with self._lock:
            self._writer = None
            self._release_hold()
            try:
                u = writer.read_point()
                self._claim(writer, u)
            except BaseException:
                if hold is not None:
                    writer.read_points.release(hold)
                raise
            if hold is not None:
                self._hold = (writer, hold)
            self._renew_hold(writer)
            self._writer = writer
            self._wake.notify_all()
        if self._pos_time_us is not None:
            writer.raise_commit_time_floor(self._pos_time_us + 1)

    def detach(self) -> None:
        """The writer goes away (closed or crashed): stop using it. What was fetched but not
        written is dropped (it is on the nodes; the next writer's round fetches it again)."""
        with self._lock:
            self._writer = None
            self._drop_fetched()
            self._release_hold()

    def _renew_hold(self, writer) -> None:
        """Hold version collection at `hold_lsn()` on `writer` for HOLD_LEASE_S more."""
        points = writer.read_points
        lsn = self.hold_lsn()
        held = self._hold
        if held is not None and held[0] is writer:
            try:
                points.renew(held[1], lease_s=HOLD_LEASE_S, lsn=max(lsn, points.issued))
                return
            except SnapshotTooOld as e:  # it lapsed: the archiver did not renew for HOLD_LEASE_S
                log.warning("backup: the hold on version collection lapsed (%s); holding again", e)
        if lsn < points.issued:
            log.error("backup: the nodes may have collected past the archive's position %d (collection point %d): "
                      "records it still needs may be gone", lsn, points.issued)
        self._hold = (writer, points.register("backup archiver", max(lsn, points.issued), HOLD_LEASE_S))

    def _release_hold(self) -> None:
        held, self._hold = self._hold, None
        if held is not None:
            held[0].read_points.release(held[1])

    def start(self) -> None:
        if self._background and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="backup-archiver", daemon=True)
            self._thread.start()

    def close(self, flush: bool = True) -> None:
        """Stop; with `flush`, first write what was fetched (a clean close leaves the archive
        complete through the writer's last VDL) and wait for a base in progress."""
        if flush and self._writer is not None and not self._fenced:
            try:
                self.step(force_segment=True)
            except SixfoldError as e:
                log.warning("backup: the last round before closing failed: %s: %s", type(e).__name__, e)
        with self._lock:
            self._closed = True
            self._wake.notify_all()
        for t in (self._thread, self._base_thread):
            if t is not None and t is not threading.current_thread():
                t.join(timeout=BASE_WAIT_ON_CLOSE_S)
        self._abort_base = True  # a base still running after the wait gives up (the next open retakes it)
        if self._base_thread is not None and self._base_thread is not threading.current_thread():
            self._base_thread.join(timeout=10)
        with self._lock:
            self._writer = None
            self._release_hold()

    # --- what callers may ask ---------------------------------------------------------------
    def position(self) -> int:
        """The highest LSN archived (durable in the target): every record at or below it is in
        a segment (or, below the oldest base, no longer needed)."""
        return self._pos

    def hold_lsn(self) -> int:
        """The lowest read point the archiver still needs the nodes to keep: its position, or
        the read point of a base in progress if lower. Version collection must keep every
        version visible at a read point at or above it."""
        b = self._base
        return min(self._pos, b.lsn) if b is not None else self._pos

    def request_base(self, request_id: str | None = None) -> str:
        """Take a base snapshot as soon as possible; returns the request's id (the base's
        manifest entry lists it once written)."""
        rid = request_id or uuid.uuid4().hex
        with self._lock:
            self._base_wanted.append(rid)
            self._base_now = True
            self._wake.notify_all()
        return rid

    def base_of_request(self, request_id: str) -> dict | None:
        """The manifest entry of the base taken for `request_id`, once it is written."""
        with self._lock:
            for b in (self._m or {}).get("bases", ()):
                if request_id in b.get("requests", ()):
                    return b
        return None

    def status(self) -> dict:
        m = self._m or {}
        bases = m.get("bases", [])
        b = self._base
        w = self._writer
        ledger = getattr(w, "ledger", None)
        vdl = ledger.vdl if ledger is not None else None
        state = ("fenced" if self._fenced else "stopped" if self._closed else "idle" if w is None
                 else "base" if b is not None else "archiving")
        return {
            "target": self.target.describe(),
            "state": state,
            "fenced": self._fenced,
            "position": self._pos,
            "lag_lsns": max(0, vdl - self._pos) if vdl is not None else 0,
            "position_time_us": self._pos_time_us,
            "complete_through_us": self._pos_complete_us,
            "bases": len(bases),
            "last_base_lsn": bases[-1]["lsn"] if bases else None,
            "last_base_time_us": bases[-1]["time_us"] if bases else None,
            "base_in_progress": b.progress() if b is not None else None,
            "retention_days": self.options.retention_days,
            "last_error": self.last_error,
            **self.stats,
        }

    # --- the loop ---------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._lock:
                if self._closed or self._fenced:
                    return
                w = self._writer
            try:
                moved = self.step()
                self._backoff_s = 0.0
            except Exception as e:  # noqa: BLE001 - counted, logged once per cause, retried
                self._fault(e)
                with self._lock:
                    self._wake.wait(self._backoff_s)
                continue
            if moved:
                continue
            if w is None:
                with self._lock:
                    if self._writer is None and not self._closed:
                        self._wake.wait(self.options.round_s)
                continue
            # Wait for the VDL to move (or a cut, a publish or a request to fall due).
            wait_s = self.options.round_s
            try:
                w.wait_vdl(self._fetched, wait_s)
            except SixfoldError:
                pass
            left = self._last_round + self.options.round_s - self._clock()
            if left > 0:
                with self._lock:
                    self._wake.wait(left)

    def record_error(self, e: BaseException) -> None:
        """Count and log an error met outside the archiver's own threads (a failed attach), so
        that status shows it."""
        self._fault(e)

    def _fault(self, e: BaseException) -> None:
        expected = isinstance(e, SixfoldError)
        text = f"{type(e).__name__}: {e}"
        self.stats["errors"] += 1
        self.last_error = text
        cause = type(e).__name__ if expected else text
        if cause != self._logged:
            self._logged = cause
            if expected:
                log.warning("backup to %s: %s (retrying)", self.target.describe(), text)
            else:
                log.error("backup to %s: unexpected %s (counted; retrying)", self.target.describe(), text, exc_info=e)
        self._backoff_s = min(BACKOFF_S_MAX, max(0.05, self._backoff_s * 2))

    def step(self, *, force_segment: bool = False) -> bool:
        """One round: fetch what became durable, cut a segment when due, publish, take a base
        when due. Returns True if the position moved. Without background threads (tests) the
        base runs inside this call."""
        with self._step_lock:
            return self._step(force_segment)

    def _step(self, force_segment: bool) -> bool:
        with self._lock:
            w = self._writer
            if w is None or self._fenced or self._closed and not force_segment:
                return False
        now = self._clock()
        if now - self._last_request_poll >= self.options.request_poll_s:
            self._last_request_poll = now
            self._poll_requests()
        w_us = self._wall()
        try:
            u = w.read_point()
        except (Unavailable, StaleEpoch):
            return False  # the writer stopped or was fenced: idle until the next one is attached
        with self._lock:
            if self._writer is w:
                self._renew_hold(w)
        self._last_round = now
        self._epoch = max(self._epoch, u.epoch)
        if u.vdl > self._fetched:
            self._fetch_round(w, u)
        self._complete_us = max(self._complete_us, w_us)
        moved = False
        due = self._frames and (force_segment or self._frames_bytes >= self.options.segment_bytes
                                or now - self._frames_since >= self.options.segment_s)
        base_due = self._base is None and (self._base_now or self._base_due())
        if self._frames and (due or base_due):
            self._cut_segment()
            moved = True
        elif not self._frames and self._fetched == self._pos and self._complete_us > self._pos_complete_us and (
                force_segment or now - self._last_publish >= self.options.idle_publish_s):
            with self._lock:
                self._pos_complete_us = self._complete_us
                self._publish()
        if base_due and not self._frames:
            self._start_base(w)
        return moved

    def _base_due(self) -> bool:
        m = self._m
        if m is None:
            return False
        if not m["bases"]:
            return True
        return self._wall() - m["bases"][-1]["written_us"] >= self.options.base_interval_s * 1_000_000

    # --- claiming the archive ---------------------------------------------------------------
    def _claim(self, writer, u) -> None:
        m, highest, problems = load_current_manifest(self.target)
        for p in problems:
            log.error("backup: %s (a newer manifest version is damaged; continuing from the newest that checks)", p)
        self._highest_seq = highest
        self._drop_fetched()
        if m is None:
            if self.target.list(SEGMENTS) or self.target.list(BASES):
                raise BackupCorrupt(f"{self.target.describe()} holds backup files but no manifest: not an archive "
                                    "this release can continue (restore from it, or back up to another target)")
            self._epoch = u.epoch
            self._pos = self._fetched = u.vdl
            self._pg_pos = list(u.tails)
            self._pg_fetched = list(u.tails)
            self._pos_time_us = self._time_us = self._first_base_time(writer, u)
            self._pos_complete_us = self._complete_us = 0
            self._m = {"seq": 0, "volume_id": self.volume_id, "protection_groups": self.P, "encryption": self.encryption,
                       "epoch": u.epoch, "written_us": self._wall(), "bases": [], "retention_days": self.options.retention_days,
                       "position": {}}
            self._publish()
            log.info("backup: new archive in %s for volume %s at LSN %d", self.target.describe(), self.volume_id, u.vdl)
            return
        if m["volume_id"] != self.volume_id:
            raise BackupError(f"{self.target.describe()} holds the archive of another volume ({m['volume_id']}); this "
                              f"volume is {self.volume_id}: back it up to another target")
        if m["protection_groups"] != self.P:
            raise BackupError(f"the archive in {self.target.describe()} has {m['protection_groups']} protection groups, "
                              f"this volume {self.P}")
        if m["epoch"] > u.epoch:
            raise StaleEpoch(f"the archive in {self.target.describe()} is written by a newer writer (epoch {m['epoch']}); "
                             f"this writer is at epoch {u.epoch}")
        pos = m["position"]
        self._m = m
        self._epoch = u.epoch
        self._pos, self._pg_pos = pos["lsn"], list(pos["pg_last"])
        self._pos_time_us, self._pos_complete_us = pos["time_us"], pos["complete_through_us"]
        self._adopt_later_segments()
        if self._pos > u.vdl:
            raise BackupError(f"the archive in {self.target.describe()} reaches LSN {self._pos}, above this volume's VDL "
                              f"{u.vdl}: it is not this volume's history")
        self._drop_fetched()
        self._publish()  # claims the archive at this epoch
        log.info("backup: continuing the archive in %s at LSN %d (epoch %d)", self.target.describe(), self._pos, u.epoch)

    def _adopt_later_segments(self) -> None:
        """Segments written after the manifest's position (a crash between a segment and its
        manifest version) continue it if they check; one that does not is removed, with the
        ones after it (their records are still on the nodes and are fetched again)."""
        later = sorted((parse_segment_name(n), n) for n in self.target.list(SEGMENTS) if parse_segment_name(n))
        for (after, last), name in later:
            if last <= self._pos:
                continue
            if after != self._pos:
                log.error("backup: segment %s does not continue the archive's position %d; removed", name, self._pos)
                self.target.delete(name)
                continue
            try:
                meta, _body = decode_file(name, self.target.read(name), KIND_SEGMENT, self.volume_id)
                if meta["pg_after"] != self._pg_pos:
                    raise BackupCorrupt(f"backup file {name}: its chain does not continue the archive's")
            except BackupCorrupt as e:
                log.error("backup: %s; removed (its records are fetched again from the nodes)", e)
                self.target.delete(name)
                continue
            self._pos, self._pg_pos = meta["last_lsn"], list(meta["pg_last"])
            if meta["last_time_us"] is not None:
                self._pos_time_us = meta["last_time_us"]
            self._pos_complete_us = max(self._pos_complete_us, meta["complete_through_us"])

    def _first_base_time(self, writer, u) -> int | None:
        """The commit time of the unit at the VDL (a new archive's first restore point): its
        request record's, if it has one; else the wall clock now (close: see ARCHITECTURE). An
        empty volume's is now: no restore point lies before the archive began."""
        if u.vdl == 0:
            return self._wall()
        for pg, tail in enumerate(u.tails):
            if tail != u.vdl:
                continue
            times: list[int] = []
            self._fetch_pg(writer, u, pg, u.vdl - 1, u.vdl, check_chain=False, times=times)
            if times:
                return times[-1]
        return self._wall()

    # --- the log ----------------------------------------------------------------------------
    def _drop_fetched(self) -> None:
        self._frames, self._frames_bytes, self._frames_records = [], 0, 0
        self._fetched, self._pg_fetched = self._pos, list(self._pg_pos)
        self._time_us, self._complete_us, self._first_time = self._pos_time_us, self._pos_complete_us, None

    def _sources(self, writer, u, pg: int, tail: int) -> list[str]:
        az = {n.id: n.az for n in writer.nodes}
        local = getattr(writer.options, "local_az", "a")
        ok = [n for n, scls, up in u.members if up and scls[pg] is not None and scls[pg] >= tail]
        return sorted(ok, key=lambda n: (az.get(n) != local, n))

    def _fetch_pg(self, writer, u, pg: int, after: int, tail: int, *, check_chain: bool = True,
                  times: list[int] | None = None) -> tuple[list[bytes], int]:
        """(frames, record count) of `pg`'s records in (after, tail], its chain checked, from the
        first complete segment that gives them whole; their commit times are added to `times`.
        Unavailable if none does."""
        tried = []
        for n in self._sources(writer, u, pg, tail):
            frames, last, ok, found, count = [], after, True, [], 0
            try:
                while last < tail:
                    frame = writer.transport.fetch(n, pg, last, FETCH_BYTES, tail).frame
                    items = codec.index_frame(frame)
                    if not items:
                        ok = False
                        break
                    for it in items:
                        if check_chain and it.prev_lsn != last:
                            raise BackupCorrupt(f"node {n} pg {pg}: record {it.lsn} links to {it.prev_lsn}, the archive's "
                                                f"chain is at {last}")
                        last = it.lsn
                        if it.flags & FLAG_REQUEST:
                            t = commit_time_of(it.flags, _value_of(it.record))
                            if t is not None:
                                found.append(t)
                    frames.append(frame)
                    count += len(items)
            except SixfoldError as e:
                tried.append(f"{n}: {type(e).__name__}: {e}")
                continue
            if ok and last == tail:
                if times is not None:
                    times += found
                return frames, count
            tried.append(f"{n}: gave records up to {last} of {tail}")
        raise Unavailable(f"backup could not fetch PG {pg}'s records ({after}, {tail}] from a complete segment "
                          f"({'; '.join(tried) or 'none is known complete'})")

    def _fetch_round(self, writer, u) -> None:
        frames: list[bytes] = []
        pg_last = list(self._pg_fetched)
        count = 0
        size = 0
        times: list[int] = []
        for pg in range(self.P):
            tail = u.tails[pg]
            if tail <= pg_last[pg]:
                continue
            got, n = self._fetch_pg(writer, u, pg, pg_last[pg], tail, times=times)
            count += n
            size += sum(len(f) for f in got)
            frames += got
            pg_last[pg] = tail
        if not frames:  # nothing to archive in (fetched, VDL]
            self._fetched = u.vdl
            if not self._frames:
                self._pos = u.vdl
            return
        if not self._frames:
            self._frames_since = self._clock()
        self._frames += frames
        self._frames_bytes += size
        self._frames_records += count
        self._fetched, self._pg_fetched = u.vdl, pg_last
        if times:
            newest = max(times)
            if self._first_time is None:
                self._first_time = max(min(times), self._time_us or 0)
            self._time_us = max(self._time_us or 0, newest)

    def _cut_segment(self) -> None:
        """Write what was fetched as one segment file, then publish the new position."""
        after, last = self._pos, self._fetched
        meta = {"volume_id": self.volume_id, "after_lsn": after, "last_lsn": last, "pg_after": list(self._pg_pos),
                "pg_last": list(self._pg_fetched), "records": self._frames_records, "epoch": self._epoch,
                "first_time_us": self._first_time, "last_time_us": self._time_us if self._first_time is not None else None,
                "complete_through_us": self._complete_us}
        data = encode_file(KIND_SEGMENT, meta, self._frames)
        self.target.write(segment_name(after, last), data)
        with self._lock:
            self._pos, self._pg_pos = last, list(self._pg_fetched)
            self._pos_time_us = self._time_us
            self._pos_complete_us = self._complete_us
            self.stats["segments_written"] += 1
            self.stats["bytes_written"] += len(data)
            self.stats["records_archived"] += self._frames_records
            self._frames, self._frames_bytes, self._frames_records, self._first_time = [], 0, 0, None
            self._publish()

    # --- the manifest -----------------------------------------------------------------------
    def _publish(self) -> None:
        """Create the next manifest version (caller holds the lock). If the number is taken, the
        archive moved under us: a newer writer's archiver fences this one."""
        m = dict(self._m)
        m.update(seq=max(self._highest_seq, m["seq"]) + 1, epoch=self._epoch, written_us=self._wall(),
                 retention_days=self.options.retention_days,
                 position={"lsn": self._pos, "pg_last": list(self._pg_pos), "time_us": self._pos_time_us,
                           "complete_through_us": self._pos_complete_us})
        if not self.target.create(manifest_name(m["seq"]), encode_manifest(m)):
            current, highest, _problems = load_current_manifest(self.target)
            self._highest_seq = highest
            if current is not None and current["epoch"] > self._epoch:
                self._fenced = (f"the archive is written by a newer writer (epoch {current['epoch']}, this one "
                                f"{self._epoch}): this archiver stopped")
                log.warning("backup: %s", self._fenced)
                raise StaleEpoch(self._fenced)
            if current is not None:  # an archiver of this epoch or an older one: merge its bases in
                known = {b["lsn"] for b in m["bases"]}
                m["bases"] = sorted(m["bases"] + [b for b in current["bases"] if b["lsn"] not in known], key=lambda b: b["lsn"])
            m["seq"] = highest + 1
            if not self.target.create(manifest_name(m["seq"]), encode_manifest(m)):
                raise Unavailable(f"backup: manifest version {m['seq']} was taken again; retrying")
        self._m = m
        self._highest_seq = m["seq"]
        self._last_publish = self._clock()
        self._prune_manifests()

    def _prune_manifests(self) -> None:
        names = [n for n in self.target.list(MANIFESTS) if parse_manifest_name(n) is not None]
        for name in names[:-self.options.manifests_kept]:
            self.target.delete(name)

    def _poll_requests(self) -> None:
        for name in self.target.list(REQUESTS):
            rid = name[len(REQUESTS):].removesuffix(".json")
            with self._lock:
                if rid not in self._base_wanted and (self._base is None or rid not in self._base.requests):
                    self._base_wanted.append(rid)
                    self._base_now = True

    # --- bases ------------------------------------------------------------------------------
    def _start_base(self, writer) -> None:
        with self._lock:
            if self._base is not None or self._m is None:
                return
            b = _Base(self._pos, list(self._pg_pos), self._pos_time_us, list(self._base_wanted), self.P)
            self._base_wanted = []
            self._base_now = False
            self._base = b
        log.info("backup: base snapshot at LSN %d started", b.lsn)
        if self._background:
            self._base_thread = threading.Thread(target=self._base_body, args=(writer, b), name="backup-base", daemon=True)
            self._base_thread.start()
        else:
            self._base_body(writer, b)

    def _base_body(self, writer, b: _Base) -> None:
        try:
            self._take_base(writer, b)
        except Exception as e:  # noqa: BLE001 - counted and logged; the next round starts another
            with self._lock:
                self._base_wanted = b.requests + self._base_wanted
                self._base_now = bool(self._base_wanted)
            self._fault(e)
        finally:
            with self._lock:
                self._base = None

    def _take_base(self, writer, b: _Base) -> None:
        part_frames: list[bytes] = []
        part_bytes = part_records = 0
        chunk: list[tuple[int, bytes]] = []
        chunk_bytes = 0

        def cut_frame() -> None:
            nonlocal chunk, chunk_bytes, part_bytes
            if chunk:
                chunk.sort()
                frame = codec.encode_frame([r for _lsn, r in chunk])
                part_frames.append(frame)
                part_bytes += len(frame)
                chunk, chunk_bytes = [], 0

        def cut_part() -> None:
            nonlocal part_frames, part_bytes, part_records
            cut_frame()
            if not part_frames and b.parts:
                return
            name = base_part_name(b.lsn, len(b.parts))
            data = encode_file(KIND_BASE, {"volume_id": self.volume_id, "lsn": b.lsn, "part": len(b.parts),
                                           "records": part_records}, part_frames)
            self.target.write(name, data)
            b.parts.append({"name": name, "bytes": len(data), "crc32c": file_crc(data), "records": part_records})
            self.stats["bytes_written"] += len(data)
            part_frames, part_bytes, part_records = [], 0, 0

        for pg in range(self.P):
            start = b""
            while True:
                if self._abort_base:
                    raise Unavailable("the archiver closed before the base was complete; the next open takes it again")
                entries, resume = self._scan(writer, pg, start, b.lsn, b.tails[pg])
                for e in entries:
                    if e.value is None:
                        continue
                    if e.deadline_us:  # an expiring version keeps its deadline (node format 4)
                        rec = codec.encode_record(e.lsn, 0, pg, FLAG_PUT | FLAG_EXPIRES, e.key, _DEADLINE.pack(e.deadline_us) + e.value)
                    else:
                        rec = codec.encode_record(e.lsn, 0, pg, FLAG_PUT, e.key, e.value)
                    chunk.append((e.lsn, rec))
                    chunk_bytes += len(rec)
                    part_records += 1
                    b.records += 1
                    b.bytes += len(rec)
                    if chunk_bytes >= BASE_FRAME_BYTES:
                        cut_frame()
                        if part_bytes >= self.options.base_part_bytes:
                            cut_part()
                if resume is None:
                    break
                start = resume
            b.pgs_done += 1
        cut_part()
        entry = {"lsn": b.lsn, "time_us": b.time_us, "pg_tails": b.tails, "parts": b.parts, "records": b.records,
                 "bytes": sum(p["bytes"] for p in b.parts), "written_us": self._wall(), "requests": b.requests}
        with self._lock:
            self._m = dict(self._m, bases=sorted([x for x in self._m["bases"] if x["lsn"] != b.lsn] + [entry],
                                                 key=lambda x: x["lsn"]))
            self._publish()
            self.stats["bases_written"] += 1
        for rid in b.requests:
            self.target.delete(f"{REQUESTS}{rid}.json")
        log.info("backup: base snapshot at LSN %d written: %d records in %d part(s), %.1f s", b.lsn, b.records,
                 len(b.parts), (_now_us() - b.started_us) / 1e6)
        self._prune()

    def _scan(self, writer, pg: int, start: bytes, read_point: int, tail: int):
        """One page of `pg`'s newest versions at `read_point`, from a segment complete to `tail`."""
        u = writer.read_point()
        tried = []
        for n in self._sources(writer, u, pg, tail):
            try:
                return writer.transport.scan(n, pg, start, None, read_point, tail, SCAN_LIMIT, u.epoch)
            except SixfoldError as e:
                tried.append(f"{n}: {type(e).__name__}: {e}")
        raise Unavailable(f"backup could not scan PG {pg} at LSN {read_point} ({'; '.join(tried) or 'no complete segment'})")

    # --- retention --------------------------------------------------------------------------
    def _prune(self) -> None:
        """Remove what no restore point in the retention window needs (see the module docstring)."""
        days = self.options.retention_days
        if days is None:
            return
        horizon_us = self._wall() - int(days * DAY_US)
        with self._lock:
            bases = self._m["bases"]
            older = [b for b in bases if (b["time_us"] if b["time_us"] is not None else b["written_us"]) <= horizon_us]
            if not older:
                return
            keep = older[-1]
            dropped = [b for b in bases if b["lsn"] < keep["lsn"]]
            if dropped:
                self._m = dict(self._m, bases=[b for b in bases if b["lsn"] >= keep["lsn"]])
                self._publish()
            kept_parts = {p["name"] for b in self._m["bases"] for p in b["parts"]}
            in_progress = self._base.lsn if self._base is not None else None
        removed = 0
        for name in self.target.list(BASES):
            parsed = parse_base_part_name(name)
            if parsed is not None and name not in kept_parts and parsed[0] != in_progress and parsed[0] < keep["lsn"]:
                self.target.delete(name)
                removed += 1
        for name in self.target.list(SEGMENTS):
            parsed = parse_segment_name(name)
            if parsed is not None and parsed[1] <= keep["lsn"]:
                self.target.delete(name)
                removed += 1
        if removed:
            self.stats["files_pruned"] += removed
            log.info("backup: retention (%g days) removed %d file(s) below LSN %d", days, removed, keep["lsn"])


def _value_of(record: bytes) -> bytes:
    """The value of an encoded record (its CRC was checked by the frame's decoding)."""
    key_len = int.from_bytes(record[30:32], "little")
    return bytes(record[RECORD_HEADER_BYTES + key_len:])


def merged_records(frames: list[bytes]) -> list[codec.Record]:
    """The records of a segment's frames (one PG each) in LSN order."""
    return list(heapq.merge(*(codec.decode_frame(f) for f in frames), key=lambda r: r.lsn))
