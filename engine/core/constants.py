"""Constants of the volume and of the record format, with their relationships checked at import.

Units and qualifiers go last in names (`key_bytes_max`), as in TigerBeetle's style.
"""

from __future__ import annotations

#: Segments per protection group: two per AZ in three AZs.
REPLICAS = 6
#: Acks (segments holding a record) that make it durable.
WRITE_QUORUM = 4
#: Segments a quorum read consults.
READ_QUORUM = 3
AZS = ("a", "b", "c")
NODES_PER_AZ = 2

# A write quorum and a read quorum always share a segment, and two write quorums always share
# a segment, so a read sees every durable write and two writers cannot both succeed.
if not (WRITE_QUORUM + READ_QUORUM > REPLICAS):
    raise AssertionError("WRITE_QUORUM + READ_QUORUM must exceed REPLICAS")
if not (2 * WRITE_QUORUM > REPLICAS):
    raise AssertionError("2 * WRITE_QUORUM must exceed REPLICAS")
if not (len(AZS) * NODES_PER_AZ == REPLICAS):
    raise AssertionError("two segments per AZ in three AZs make six")
# Losing a whole AZ must leave a write quorum; losing an AZ and one more node a read quorum.
if not (REPLICAS - NODES_PER_AZ >= WRITE_QUORUM):
    raise AssertionError("an AZ outage must keep writes going")
if not (REPLICAS - NODES_PER_AZ - 1 >= READ_QUORUM):
    raise AssertionError("AZ+1 must keep reads going")

# Record format (see engine/codec/_python.py for the byte layout).
RECORD_HEADER_BYTES = 36
FRAME_HEADER_BYTES = 16
FRAME_MAGIC = 0x31465853  # b"SXF1" little-endian

FLAG_PUT = 0x01
FLAG_DELETE = 0x02
FLAG_CPL = 0x04
#: A request-id record: `key` is a client-chosen request id, `value` a digest of the unit's
#: operations. The writer logs one with every unit that carries an id, in the same atomic unit,
#: so whether the request committed is in the log itself (a later writer knows it too). Nodes
#: index these records apart from user keys (never visible to get or scan).
FLAG_REQUEST = 0x08
#: An expiring put (node format 4): its value begins with its deadline, EXPIRES_BYTES of u64 LE
#: microseconds since the Unix epoch on the log's clock (the commit times the writer stamps),
#: then the user's value. Only on a PUT; nodes hand the deadline back apart from the value.
FLAG_EXPIRES = 0x10
EXPIRES_BYTES = 8
FLAGS_KNOWN = FLAG_PUT | FLAG_DELETE | FLAG_CPL | FLAG_REQUEST | FLAG_EXPIRES
#: An op (never a record) whose EXPIRES_BYTES prefix is a time to live in microseconds, which the
#: writer turns into a deadline (its commit time + ttl) when it orders the unit.
OP_TTL = 0x100
#: The latest deadline accepted: year 2262 (microseconds that fit a signed 64-bit integer).
DEADLINE_US_MAX = (1 << 63) - 1
#: Read namespaces of a segment: user keys, or request ids.
NAMESPACE_KEYS = 0
NAMESPACE_REQUESTS = 1
REQUEST_ID_BYTES_MAX = 64
#: The value of a request record: a digest of the unit's ops (REQUEST_DIGEST_BYTES), then, since
#: commit times exist, the unit's commit time (REQUEST_TIME_BYTES: u64 LE microseconds since the
#: epoch, stamped by the writer when it gave the unit its LSNs, never going backwards). A value
#: of the digest alone was written by a release before commit times (it has no time).
REQUEST_DIGEST_BYTES = 16
REQUEST_TIME_BYTES = 8

#: LMDB keys are at most 511 bytes; the version index key is pg (4 bytes) + user key.
KEY_BYTES_MAX = 480
VALUE_BYTES_MAX = 1 << 20  # 1 MiB
if not (4 + KEY_BYTES_MAX <= 511):
    raise AssertionError("version index keys must fit LMDB's 511-byte key limit")
if not (KEY_BYTES_MAX < (1 << 16)):
    raise AssertionError("key_len is a u16 in the record header")

#: A frame (one flush, or one repair chunk) is bounded so that it fits one gRPC message.
FRAME_BYTES_MAX = 64 << 20
FRAME_RECORDS_MAX = 1 << 20
if not (FRAME_BYTES_MAX >= FRAME_HEADER_BYTES + RECORD_HEADER_BYTES + KEY_BYTES_MAX + VALUE_BYTES_MAX):
    raise AssertionError("the largest record must fit in a frame")

#: Widths of the wire and record fields: protobuf uint64/uint32, the record header's u64/u32.
U64_MAX = (1 << 64) - 1
U32_MAX = (1 << 32) - 1
#: The record format's LSN field is a u64 (the codec accepts any value it can hold); what a
#: volume *uses* is bounded far lower by LSN_VALID_MAX below.
LSN_MAX = U64_MAX
PG_MAX = U32_MAX
#: LSN allocation limit: the writer never runs more than this many LSNs ahead of VDL.
LAL_DEFAULT = 1 << 20
#: The largest LAL a writer may be configured with.
LAL_MAX = 1 << 32

# Bounded integers. Every u64 a request carries is checked against one of the bounds below at
# the boundary (engine.transport.convert for gRPC, SegmentStore for in-process callers), so no
# arithmetic the engine does on a stored value can overflow a u64: `epoch + 1` (a writer's
# seal), `hint + 1` and `after_lsn + 1` (seek keys), `lsn + LAL` (a truncation range's end),
# `last + 1` (the next LSN after a recovery). The bounds are 2^62, far below 2^64, so that even
# a sum of a bounded value and another bound stays below 2^63: it also fits a signed 64-bit
# integer (JSON readers, a C `long long`). 2^62 LSNs last 14,000 years at ten million records a
# second; epochs advance by one per writer recovery or membership step.
#: The highest LSN of a record a segment accepts (and of a hint, read point or fetch bound).
LSN_VALID_MAX = 1 << 62
#: The highest end of a truncation range: recovery may cut one LAL beyond the highest record.
TRUNCATION_LSN_MAX = LSN_VALID_MAX + LAL_MAX
#: The highest epoch a segment adopts (Seal, SyncEpoch, a membership's epoch).
EPOCH_MAX = 1 << 62
#: The largest step a single Seal or SyncEpoch may raise a segment's epoch by. Legitimate
#: writers step by one (a node that was down for a while may skip a few thousand); without this
#: bound one request at EPOCH_MAX would leave no epoch for the next writer, and the volume would
#: be bricked. With it, exhausting the epochs takes 2^30 accepted requests.
EPOCH_STEP_MAX = 1 << 32
if not (LAL_DEFAULT <= LAL_MAX):
    raise AssertionError("the default LAL must be a valid LAL")
if not (TRUNCATION_LSN_MAX + 1 < (1 << 63)):
    raise AssertionError("a truncation range's end + 1 (the next LSN) must fit a signed 64-bit integer")
if not (LSN_VALID_MAX + LAL_MAX + 1 < (1 << 63) and LSN_VALID_MAX + 1 <= U64_MAX):
    raise AssertionError("lsn + LAL and after_lsn + 1 must never overflow a u64")
if not (EPOCH_MAX + EPOCH_STEP_MAX < (1 << 63)):
    raise AssertionError("epoch + 1 (and one step) must never overflow a u64")
if not (EPOCH_STEP_MAX < EPOCH_MAX):
    raise AssertionError("a single step must not reach EPOCH_MAX from 0")

#: Operations in one atomic batch.
BATCH_OPS_MAX = 10_000

#: Default geometry of a new volume.
PROTECTION_GROUPS_DEFAULT = 8
PROTECTION_GROUPS_MAX = 4096
