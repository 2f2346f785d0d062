"""Read points in use: the registrations that hold version collection back (Aurora's PGMRPL).

Theory of operation
-------------------
Storage nodes remove every version of a key older than its newest version at or below the
*collection point* the writer sends with its appends and heartbeats (`engine.node.collection`).
Whatever reads the past must therefore hold its read point here first: embedded and remote
snapshots, scans, reader instances, watches, the backup archiver's position. A registration is
(name, read point, lease): it holds until released, or until its lease runs out without a renewal
(lease None: until released, for holders whose lifetime is an object of this process, such as an
embedded snapshot, released when it is closed or collected). The writer's clock measures leases.

The collection point is the least of the live registrations' read points and the VDL as it was
`collect_delay_s` ago (`VdlHistory`): a linearizable read takes the current VDL as its read
point without registering (that would cost a lock per get), so the point trails the VDL by more
than such a read takes to reach its nodes; one that is slower than that meets SnapshotTooOld and
the read path takes a fresh read point (`engine.head.reads`).

Ordering: a registration must not name a read point below a collection point already handed out
(the nodes may have collected there): `register` raises SnapshotTooOld for it, and `point` and
`register` are ordered by one lock, so a point computed after a registration counts it. A new
writer starts its floor at the highest horizon the nodes report (they may have collected at an
old writer's points), and knows none of the old writer's registrations: an old snapshot then
meets SnapshotTooOld once the nodes collect past it.

Request-id records are kept for a retention window (`request_retention_s`, by the writer's
clock): the request point sent with the collection point is the VDL as it was that long ago, so a
re-send within the window is still recognised from the log; an older one is applied as new.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

from engine.core.constants import LSN_VALID_MAX
from engine.errors import InvalidArgument, ResourceExhausted, SnapshotTooOld

log = logging.getLogger("sixfold.writer")

#: Live registrations one writer holds at most (each is a few hundred bytes).
REGISTRATIONS_MAX = 100_000
#: The longest lease a registration may ask for (renewals are cheap: ask again).
LEASE_S_MAX = 24 * 3600.0
NAME_CHARS_MAX = 128
#: Samples of the VDL kept per history window (a point is at most one step younger than asked).
HISTORY_STEPS = 32


@dataclass
class Registration:
    """One holder of a read point: `lsn` until `expires_at` (None: until released)."""

    name: str
    lsn: int
    lease_s: float | None
    expires_at: float | None


def _check_lease(lease_s) -> float | None:
    if lease_s is None:
        return None
    if isinstance(lease_s, bool) or not isinstance(lease_s, (int, float)) or not 0 < lease_s <= LEASE_S_MAX:
        raise InvalidArgument(f"a read point lease is a number of seconds in (0, {LEASE_S_MAX:g}], got {lease_s!r}")
    return float(lease_s)


def _check_lsn(lsn) -> int:
    if isinstance(lsn, bool) or not isinstance(lsn, int) or not 0 <= lsn <= LSN_VALID_MAX:
        raise InvalidArgument(f"a read point is an LSN in 0..{LSN_VALID_MAX}, got {lsn!r}")
    return lsn


class ReadPointRegistry:
    """The leased registrations of one writer (thread-safe; its lock is taken last, under any
    other, and nothing is called while holding it)."""

    def __init__(self, clock=time.monotonic, registrations_max: int = REGISTRATIONS_MAX) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._regs: dict[int, Registration] = {}
        self._next_id = 1
        self._max = registrations_max
        #: the highest collection point handed out: no registration may name a read point below it
        self.issued = 0
        #: registrations dropped because their lease ran out
        self.lapsed = 0

    def raise_floor(self, lsn: int) -> None:
        """Nodes may have collected up to `lsn` already (a new writer learns it from their state)."""
        with self._lock:
            self.issued = max(self.issued, lsn)

    def register(self, name: str, lsn: int, lease_s: float | None = None) -> int:
        """Hold read point `lsn` for `name` (for `lease_s` seconds, renewable; None: until
        released). Returns the registration's id. SnapshotTooOld when `lsn` is below a point
        already handed out (take a fresh read point); ResourceExhausted when too many are live."""
        if not isinstance(name, str) or not 1 <= len(name) <= NAME_CHARS_MAX:
            raise InvalidArgument(f"a read point registration's name is 1..{NAME_CHARS_MAX} characters, got {name!r}")
        lsn, lease_s = _check_lsn(lsn), _check_lease(lease_s)
        with self._lock:
            now = self._clock()
            self._drop_lapsed_locked(now)
            if lsn < self.issued:
                raise SnapshotTooOld(
                    f"read point {lsn} for {name} is below the collection point {self.issued} already sent to the "
                    "nodes: versions it needs may be gone. Take a fresh read point."
                )
            if len(self._regs) >= self._max:
                raise ResourceExhausted(f"{len(self._regs)} read points are registered; at most {self._max}")
            reg_id = self._next_id
            self._next_id += 1
            self._regs[reg_id] = Registration(name, lsn, lease_s, None if lease_s is None else now + lease_s)
            return reg_id

    def renew(self, reg_id: int, lease_s: float | None = None, lsn: int | None = None) -> Registration:
        """Extend registration `reg_id` by its lease (or a new `lease_s`), optionally moving its
        read point to `lsn` (not below a point already handed out: a backup archiver moves its
        position forward). SnapshotTooOld when it lapsed or was never made with this writer."""
        lease_s = _check_lease(lease_s)
        if lsn is not None:
            lsn = _check_lsn(lsn)
        with self._lock:
            now = self._clock()
            self._drop_lapsed_locked(now)
            reg = self._regs.get(reg_id)
            if reg is None:
                raise SnapshotTooOld(
                    f"read point registration {reg_id!r} is not held by this writer: it lapsed, was released, or was "
                    "made with another writer. Take a fresh read point."
                )
            if lsn is not None:
                if lsn < self.issued:
                    raise SnapshotTooOld(f"read point {lsn} is below the collection point {self.issued} already sent")
                reg.lsn = lsn
            if lease_s is not None:
                reg.lease_s = lease_s
            if reg.lease_s is not None:
                reg.expires_at = now + reg.lease_s
            return Registration(reg.name, reg.lsn, reg.lease_s, reg.expires_at)

    def release(self, reg_id: int) -> bool:
        """Stop holding `reg_id`; False if it was not held (released twice, or lapsed)."""
        with self._lock:
            return self._regs.pop(reg_id, None) is not None

    def point(self, ceiling: int) -> int:
        """The collection point: the least of `ceiling` (the VDL the writer may collect at) and
        every live registration's read point. Lapsed registrations are dropped here."""
        with self._lock:
            self._drop_lapsed_locked(self._clock())
            lowest = min((r.lsn for r in self._regs.values()), default=ceiling)
            point = min(ceiling, lowest)
            self.issued = max(self.issued, point)
            return point

    def _drop_lapsed_locked(self, now: float) -> None:
        gone = [i for i, r in self._regs.items() if r.expires_at is not None and r.expires_at <= now]
        for i in gone:
            r = self._regs.pop(i)
            self.lapsed += 1
            log.info("read point %d of %s (registration %d) lapsed: not renewed within %.3g s", r.lsn, r.name, i, r.lease_s)

    def status(self) -> dict:
        with self._lock:
            self._drop_lapsed_locked(self._clock())
            return {"read_points": len(self._regs), "read_points_lapsed": self.lapsed,
                    "read_point_min": min((r.lsn for r in self._regs.values()), default=0), "collect_lsn": self.issued}


class VdlHistory:
    """The VDL as it was `span_s` ago, from samples at most `span_s / HISTORY_STEPS` apart. Of
    the time before its first sample it knows nothing: until that is `span_s` old it answers
    `young` (None: the first sample, which for a new writer is the VDL it recovered, at or below
    every read point it served; a retention window answers 0: the old writer's records may be
    younger than the window)."""

    def __init__(self, span_s: float, young: int | None = None) -> None:
        self.span_s = span_s
        self._young = young
        self._step_s = span_s / HISTORY_STEPS
        self._samples: deque[tuple[float, int]] = deque()

    def at(self, now: float, vdl: int) -> int:
        """Note the VDL now; return the VDL as it was `span_s` before `now`."""
        if self.span_s <= 0:
            return vdl
        s = self._samples
        if not s or now - s[-1][0] >= self._step_s:
            s.append((now, vdl))
        while len(s) > 1 and s[1][0] <= now - self.span_s:
            s.popleft()
        if self._young is not None and s[0][0] > now - self.span_s:
            return self._young
        return s[0][1]
