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
FLAGS_KNOWN = FLAG_PUT | FLAG_DELETE | FLAG_CPL

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

LSN_MAX = (1 << 64) - 1
PG_MAX = (1 << 32) - 1
#: LSN allocation limit: the writer never runs more than this many LSNs ahead of VDL.
LAL_DEFAULT = 1 << 20

#: Operations in one atomic batch.
BATCH_OPS_MAX = 10_000

#: Default geometry of a new volume.
PROTECTION_GROUPS_DEFAULT = 8
PROTECTION_GROUPS_MAX = 4096
