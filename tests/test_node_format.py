"""A node folder records its format version (`NODE_FORMAT`) in its identity. A folder written
before versions existed (no `format` key) is upgraded in place on open, and says so in the log;
a folder of a newer format is refused with WrongFolder naming what is needed, and is left as it
was; a node folder of another volume keeps raising GeometryMismatch."""

from __future__ import annotations

import json
import logging
import os

import lmdb
import pytest

from engine import codec
from engine.core.constants import FLAG_CPL, FLAG_PUT
from engine.core.types import Geometry
from engine.errors import GeometryMismatch, WrongFolder
from engine.node.store import NODE_FORMAT, SegmentStore

P = 2


def open_store(path, volume_id="vol-1", protection_groups=P):
    return SegmentStore(str(path), "n1", "a", Geometry(protection_groups), volume_id, durable=False)


def identity(path) -> dict:
    env = lmdb.open(str(path), max_dbs=4, readonly=True, lock=False)
    try:
        with env.begin(db=env.open_db(b"meta", create=False)) as txn:
            return json.loads(txn.get(b"volume"))
    finally:
        env.close()


def write_identity(path, ident: dict) -> None:
    """Rewrite the folder's identity as another release would have written it."""
    env = lmdb.open(str(path), max_dbs=4)
    try:
        meta = env.open_db(b"meta")
        with env.begin(write=True) as txn:
            txn.put(b"volume", json.dumps(ident, sort_keys=True).encode(), db=meta)
    finally:
        env.close()


@pytest.fixture
def written(tmp_path):
    """A node folder with a record in it, as this release writes it."""
    path = tmp_path / "n1"
    s = open_store(path)
    s.sync_epoch(3, ())
    s.append(3, codec.encode_frame([codec.encode_record(1, 0, 1, FLAG_PUT | FLAG_CPL, b"k", b"v")]), 1)
    s.close()
    return path


def test_a_new_folder_records_the_format(written):
    assert identity(written) == {"volume_id": "vol-1", "node": "n1", "protection_groups": P, "format": NODE_FORMAT}
    assert NODE_FORMAT == 4


def test_a_folder_written_before_formats_is_upgraded_in_place(written, caplog):
    old = {"volume_id": "vol-1", "node": "n1", "protection_groups": P}  # no format key: the first release
    write_identity(written, old)
    with caplog.at_level(logging.INFO, logger="sixfold.store"):
        s = open_store(written)
    try:
        assert s.epoch == 3 and s.read(1, b"k", 1, 1, s.epoch).value == b"v"
    finally:
        s.close()
    assert identity(written) == dict(old, format=NODE_FORMAT)
    lines = [r.getMessage() for r in caplog.records if r.name == "sixfold.store" and "upgraded" in r.getMessage()]
    assert len(lines) == 1 and str(written) in lines[0] and f"format {NODE_FORMAT}" in lines[0], lines
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sixfold.store"):
        open_store(written).close()  # upgraded once: no second upgrade
    assert not [r for r in caplog.records if "upgraded" in r.getMessage()]


def test_a_newer_format_is_refused_and_left_as_it_was(written):
    newer = {"volume_id": "vol-1", "node": "n1", "protection_groups": P, "format": NODE_FORMAT + 1}
    write_identity(written, newer)
    size = os.path.getsize(written / "data.mdb")
    with pytest.raises(WrongFolder) as e:
        open_store(written)
    message = str(e.value)
    assert f"format {NODE_FORMAT + 1}" in message and "release" in message and str(written) in message
    assert identity(written) == newer and os.path.getsize(written / "data.mdb") == size
    write_identity(written, dict(newer, format=NODE_FORMAT))
    open_store(written).close()


@pytest.mark.parametrize("fmt", ["1", -1, 1.5, None])
def test_a_format_that_is_not_a_version_is_refused(written, fmt):
    write_identity(written, {"volume_id": "vol-1", "node": "n1", "protection_groups": P, "format": fmt})
    with pytest.raises(WrongFolder, match="format"):
        open_store(written)


@pytest.mark.parametrize("with_format", [True, False])
def test_a_folder_of_another_volume_is_still_a_geometry_mismatch(written, with_format):
    ident = {"volume_id": "vol-1", "node": "n1", "protection_groups": P}
    if with_format:
        ident["format"] = NODE_FORMAT
    write_identity(written, ident)
    with pytest.raises(GeometryMismatch):
        open_store(written, volume_id="vol-2")
    with pytest.raises(GeometryMismatch):
        open_store(written, protection_groups=P + 1)
    assert identity(written) == ident, "a refused open must not upgrade the folder"
