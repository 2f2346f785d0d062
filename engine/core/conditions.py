"""Preconditions of a conditional write: what they are, and whether one holds.

Theory of operation
-------------------
A unit (a batch) may carry conditions on keys; the writer checks them at the moment it orders
the unit, under its lock, and logs the unit only if every one holds (`engine.head.writer`). This
module decides, from values alone, whether one condition holds against a key's current version:
the LSN of its newest version (0: never written), its value (None: deleted or never written)
and that version's expiry deadline (0: none) against the log's time (`now_us`, the commit time
the writer stamps on the unit). A version whose deadline is at or before the log's time is no
value: the key is absent, whatever the segments still hold.

Kinds (their numbers travel in `kv.proto`'s `Condition.kind`):

    EXISTS     the key has a live value
    ABSENT     it has none (never written, deleted, or expired)
    EQUALS     its live value is exactly `value`
    UNCHANGED  no version newer than commit position `lsn`: the newest version's LSN <= `lsn`
               (an expired version still counts as a change: it was written)
    VERSION    the newest version is the one at LSN `lsn` exactly (0: never written); what the
               expiry step deletes under, so it never deletes a newer value

Rules of this module: no I/O, no clocks; values in, values out.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.core.constants import KEY_BYTES_MAX, LSN_VALID_MAX, VALUE_BYTES_MAX
from engine.errors import InvalidArgument

EXISTS = 1
ABSENT = 2
EQUALS = 3
UNCHANGED = 4
VERSION = 5
KIND_NAMES = {EXISTS: "exists", ABSENT: "absent", EQUALS: "equals", UNCHANGED: "unchanged", VERSION: "version"}
#: kinds that carry a position in `lsn`
_POSITION_KINDS = (UNCHANGED, VERSION)
#: Conditions in one unit (each costs the writer a dict lookup under its lock, and at most one
#: read before it when its key was not written recently).
CONDITIONS_MAX = 1_000


@dataclass(frozen=True)
class Condition:
    """One precondition on `key`: `kind` (above), `value` for EQUALS, `lsn` for UNCHANGED."""

    key: bytes
    kind: int
    value: bytes = b""
    lsn: int = 0

    def describe(self) -> str:
        if self.kind == EQUALS:
            return f"{self.key!r} equals a value of {len(self.value)} bytes"
        if self.kind == UNCHANGED:
            return f"{self.key!r} unchanged since position {self.lsn}"
        if self.kind == VERSION:
            return f"{self.key!r} at version {self.lsn}"
        return f"{self.key!r} {KIND_NAMES.get(self.kind, '?')}"


def check_condition(c) -> Condition:
    """A condition from a caller, checked (InvalidArgument: the unit is refused, nothing logged)."""
    if not isinstance(c, Condition):
        raise InvalidArgument(f"a condition is an engine.Condition (engine.exists(key), ...), got {type(c).__name__}")
    if not isinstance(c.key, bytes) or not 1 <= len(c.key) <= KEY_BYTES_MAX:
        raise InvalidArgument(f"a condition's key is 1..{KEY_BYTES_MAX} bytes")
    if c.kind not in KIND_NAMES:
        raise InvalidArgument(f"condition kind {c.kind!r}: one of {sorted(KIND_NAMES)} ({', '.join(KIND_NAMES.values())})")
    if not isinstance(c.value, bytes) or len(c.value) > VALUE_BYTES_MAX or (c.value and c.kind != EQUALS):
        raise InvalidArgument(f"a condition's value is bytes (at most {VALUE_BYTES_MAX}), and only EQUALS has one")
    if isinstance(c.lsn, bool) or not isinstance(c.lsn, int) or not 0 <= c.lsn <= LSN_VALID_MAX or (c.lsn and c.kind not in _POSITION_KINDS):
        raise InvalidArgument(f"a condition's position is an int in 0..{LSN_VALID_MAX}, and only UNCHANGED and VERSION have one")
    return c


def check_conditions(conditions) -> tuple[Condition, ...]:
    out = tuple(check_condition(c) for c in conditions)
    if len(out) > CONDITIONS_MAX:
        raise InvalidArgument(f"a unit carries at most {CONDITIONS_MAX} conditions, got {len(out)}")
    return out


def live(value: bytes | None, deadline_us: int, now_us: int) -> bool:
    """Whether a version is a value at log time `now_us`: not deleted, not expired."""
    return value is not None and (deadline_us == 0 or deadline_us > now_us)


def holds(c: Condition, lsn: int, value: bytes | None, deadline_us: int, now_us: int) -> bool:
    """Whether `c` holds against the key's newest version (lsn, value, deadline) at `now_us`."""
    kind = c.kind
    if kind == UNCHANGED:
        return lsn <= c.lsn
    if kind == VERSION:
        return lsn == c.lsn
    alive = live(value, deadline_us, now_us)
    if kind == EXISTS:
        return alive
    if kind == ABSENT:
        return not alive
    return alive and value == c.value


def found(lsn: int, value: bytes | None, deadline_us: int, now_us: int) -> str:
    """What a failed condition met, for its message."""
    if lsn == 0:
        return "never written"
    if value is None:
        return f"deleted (at LSN {lsn})"
    if not live(value, deadline_us, now_us):
        return f"expired (written at LSN {lsn})"
    return f"a value of {len(value)} bytes (written at LSN {lsn})"


# Helpers that read naturally at a call site: db.batch(expect=[absent(b"k")]).
def exists(key: bytes) -> Condition:
    return Condition(key, EXISTS)


def absent(key: bytes) -> Condition:
    return Condition(key, ABSENT)


def equals(key: bytes, value: bytes) -> Condition:
    return Condition(key, EQUALS, value)


def unchanged(key: bytes, since: int) -> Condition:
    return Condition(key, UNCHANGED, lsn=since)


def at_version(key: bytes, lsn: int) -> Condition:
    return Condition(key, VERSION, lsn=lsn)
