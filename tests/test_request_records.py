"""Request-id records on a segment (flag REQUEST): indexed apart from user keys, readable in the
request namespace at a read point, cut by truncation like any record, and absent from folders
of older formats (node format 1 -> 2 adds the empty `requests` table)."""

from __future__ import annotations

import json

import lmdb
import pytest

from engine import codec
from engine.core.constants import FLAG_CPL, FLAG_PUT, FLAG_REQUEST, NAMESPACE_REQUESTS
from engine.core.types import Geometry, TruncationRange
from engine.errors import InvalidArgument
from engine.node.store import NODE_FORMAT, SegmentStore

P = 2
RID = b"req-0001"


def rec(lsn, prev, pg, key, value=b"v", flags=FLAG_PUT):
    return codec.encode_record(lsn, prev, pg, flags, key, value)


def open_store(path):
    return SegmentStore(str(path), "n1", "a", Geometry(P), "vol-1", durable=False)


@pytest.fixture
def store(tmp_path):
    s = open_store(tmp_path / "n1")
    s.sync_epoch(1, ())
    yield s
    s.close()


def unit(store, lsn, prev_key, prev_req, key=b"k", value=b"v", rid=RID):
    """A unit of one put and its request record (CPL last), both in PG 0."""
    store.append(1, codec.encode_frame([rec(lsn, prev_key, 0, key, value), rec(lsn + 1, lsn, 0, rid, b"digest", FLAG_PUT | FLAG_REQUEST | FLAG_CPL)]), 0)


def test_a_request_record_is_found_in_its_namespace_only(store):
    unit(store, 1, 0, 0)
    found = store.read(0, RID, 2, 2, 1, NAMESPACE_REQUESTS)
    assert found.lsn == 2 and found.value == b"digest"
    assert store.read(0, RID, 1, 0, 1, NAMESPACE_REQUESTS).lsn == 0  # not at a read point below it
    assert store.read(0, RID, 2, 2, 1).lsn == 0  # not a user key
    entries, _resume = store.scan(0, b"", None, 2, 2, 100, 1)
    assert [(e.key, e.value) for e in entries] == [(b"k", b"v")]
    assert store.scls[0] == 2  # the request record is on the PG's chain like any record


def test_a_truncated_request_record_is_gone(store):
    unit(store, 1, 0, 0)
    store.sync_epoch(2, (TruncationRange(2, 1, 10),))
    assert store.read(0, RID, 2, 0, 2, NAMESPACE_REQUESTS).lsn == 0
    with store.env.begin() as txn:
        assert txn.stat(store._requests)["entries"] == 0


def test_an_unknown_namespace_is_refused(store):
    with pytest.raises(InvalidArgument, match="namespace"):
        store.read(0, RID, 0, 0, 1, 7)


def test_a_format_1_folder_is_upgraded_to_an_empty_requests_table(tmp_path):
    s = open_store(tmp_path / "n1")
    s.sync_epoch(1, ())
    s.append(1, codec.encode_frame([rec(1, 0, 0, b"k", b"v", FLAG_PUT | FLAG_CPL)]), 0)
    s.close()
    # Make the folder what release format 1 wrote: no requests table, identity format 1.
    env = lmdb.open(str(tmp_path / "n1"), max_dbs=8)
    with env.begin(write=True) as txn:
        txn.drop(env.open_db(b"requests", txn=txn), delete=True)
        meta = env.open_db(b"meta", txn=txn)
        ident = json.loads(txn.get(b"volume", db=meta))
        txn.put(b"volume", json.dumps(dict(ident, format=1), sort_keys=True).encode(), db=meta)
    env.close()
    s = open_store(tmp_path / "n1")
    try:
        assert NODE_FORMAT >= 2  # and every later format reads it (3: version collection)
        assert s.read(0, b"k", 1, 1, 1).value == b"v"
        assert s.read(0, RID, 1, 1, 1, NAMESPACE_REQUESTS).lsn == 0
        with s.env.begin() as txn:
            assert json.loads(txn.get(b"volume", db=s._meta))["format"] == NODE_FORMAT
    finally:
        s.close()
