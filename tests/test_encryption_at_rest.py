"""Encryption at rest (engine.envelope): envelope keys, sealed values, hashed keys; no plaintext
on disk; a missing, wrong or unwanted key is a clear error; tampering is corruption; the nodes
verify, gossip, rebuild and scrub without the key."""

from __future__ import annotations

import hashlib
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from waiting import eventually

import engine
from engine.envelope import VolumeCipher, load_master_key, new_descriptor, rewrap, unwrap
from engine.errors import CorruptRecord, EncryptionError, InvalidArgument

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
SECRET_KEY = b"customer:4711:ssn"
SECRET_VALUE = b"the-plaintext-that-must-never-reach-the-disk"
SECRET_RID = b"request-id-in-clear?"


def open_db(path, **kw):
    kw.setdefault("write_timeout_s", 10.0)
    kw.setdefault("gossip_interval_s", 0.02)
    kw.setdefault("scrub_interval_s", 0.05)
    return engine.open(path, **kw)


def files_under(path):
    for root, _dirs, names in os.walk(path):
        for n in names:
            yield os.path.join(root, n)


def found_in_files(path, needle: bytes) -> list[str]:
    hits = []
    for f in files_under(path):
        with open(f, "rb") as fh:
            if needle in fh.read():
                hits.append(f)
    return hits


def fill(db):
    db.put(SECRET_KEY, SECRET_VALUE, request_id=SECRET_RID)
    with db.batch() as b:
        for i in range(20):
            b.put(b"k%02d" % i, b"value-%02d" % i)
    db.delete(b"k05")


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain-control", "encrypted"])
def test_no_plaintext_key_value_or_request_id_in_any_file(tmp_path, encrypted):
    """The plain volume is the control: the same grep finds all three there, so the test can fail."""
    path = tmp_path / "v"
    with open_db(path, **({"encryption_key": KEY} if encrypted else {})) as db:
        fill(db)
        assert db.get(SECRET_KEY) == SECRET_VALUE
    for needle in (SECRET_VALUE, SECRET_KEY, SECRET_RID, b"value-07"):
        hits = found_in_files(path, needle)
        if encrypted:
            assert hits == [], f"{needle!r} in the clear in {hits}"
        else:
            assert hits, f"control: {needle!r} should be in a plain volume's files"


def test_an_encrypted_volume_behaves_like_a_plain_one(tmp_path):
    path = tmp_path / "v"
    with open_db(path, encryption_key=KEY) as db:
        fill(db)
        assert db.get(SECRET_KEY) == SECRET_VALUE
        assert db.get(b"k05") is None and db.get(b"missing") is None
        want = [(b"k%02d" % i, b"value-%02d" % i) for i in range(20) if i != 5]
        assert list(db.scan(b"k", b"l")) == want  # key order although the nodes hold hashes
        assert list(db.scan(b"k03", b"k08")) == want[3:7]
        assert list(db.scan()) == sorted(want + [(SECRET_KEY, SECRET_VALUE)])
        assert db.get_many([b"k01", b"k05", SECRET_KEY]) == [b"value-01", None, SECRET_VALUE]
        assert db.get(b"k01", quorum=True) == b"value-01"
        snap = db.snapshot()
        db.put(b"k01", b"newer")
        assert snap.get(b"k01") == b"value-01" and db.get(b"k01") == b"newer"
        assert db.status_of(SECRET_RID).state == "committed"
        db.put(SECRET_KEY, SECRET_VALUE, request_id=SECRET_RID)  # a re-send: applied at most once
        db.cluster.crash_writer()  # recovery re-replicates ciphertext: no key needed below the writer
        assert db.get(SECRET_KEY) == SECRET_VALUE
        assert db.status_of(SECRET_RID).state == "committed"
    with open_db(path, encryption_key=KEY) as db:
        assert db.get(b"k01") == b"newer"
        assert len(list(db.scan())) == 20


def test_missing_wrong_and_unwanted_keys_are_clear_errors_that_change_nothing(tmp_path):
    enc, plain = tmp_path / "enc", tmp_path / "plain"
    with open_db(enc, encryption_key=KEY) as db:
        db.put(b"a", b"1")
    with open_db(plain) as db:
        db.put(b"a", b"1")
    before = {f: open(f, "rb").read() for f in files_under(tmp_path) if not f.endswith("LOCK")}
    with pytest.raises(EncryptionError, match="is encrypted"):
        engine.open(enc)
    with pytest.raises(EncryptionError, match="wrong encryption key"):
        engine.open(enc, encryption_key=OTHER_KEY)
    with pytest.raises(EncryptionError, match="cannot be switched on in place"):
        engine.open(plain, encryption_key=KEY)
    with pytest.raises(InvalidArgument, match="32 bytes"):
        engine.open(tmp_path / "new", encryption_key=b"short")
    after = {f: open(f, "rb").read() for f in files_under(tmp_path) if not f.endswith("LOCK") and "new" not in f}
    assert after == before
    with open_db(enc, encryption_key=KEY) as db:  # the refusals released the folder
        assert db.get(b"a") == b"1"


def test_key_rotation_rewraps_the_data_key_only(tmp_path):
    path = tmp_path / "v"
    with open_db(path, encryption_key=KEY) as db:
        fill(db)

    def digest_of_node_files():
        return {f: hashlib.sha256(open(f, "rb").read()).hexdigest() for f in files_under(path) if f.endswith("data.mdb")}

    before = digest_of_node_files()
    with pytest.raises(EncryptionError):
        engine.rotate_encryption_key(path, OTHER_KEY, KEY)
    engine.rotate_encryption_key(path, KEY, OTHER_KEY.hex())
    assert digest_of_node_files() == before, "no record was touched"
    with pytest.raises(EncryptionError, match="wrong encryption key"):
        engine.open(path, encryption_key=KEY)
    with open_db(path, encryption_key=OTHER_KEY) as db:
        assert db.get(SECRET_KEY) == SECRET_VALUE


def test_nodes_rebuild_and_scrub_without_the_key(tmp_path):
    with open_db(tmp_path / "v", encryption_key=KEY) as db:
        fill(db)
        db.cluster.wipe_node("n3")  # rebuilds by gossip from peers that hold only ciphertext
        db.put(b"poke", b"1")
        def n3_caught_up():
            n3 = next(n for n in db.status()["nodes"] if n["id"] == "n3")
            return "lag" in n3 and not any(n3["lag"].values())

        eventually(n3_caught_up, "n3 rebuilt by gossip")
        for n in ("n1", "n2", "n4"):  # n3 with n5, n6: a read quorum; n3 must hold its share
            db.cluster.stop_node(n)
        assert db.get(SECRET_KEY, quorum=True) == SECRET_VALUE
        assert [k for k, _v in db.scan(b"k", b"l", quorum=True)] == [b"k%02d" % i for i in range(20) if i != 5]


def test_tampered_sealed_value_is_corruption_not_a_value():
    c = VolumeCipher(os.urandom(32), "vol-1")
    ik = c.index_key(b"k")
    sealed = c.seal(3, 100, ik, b"k", b"v1")
    assert c.open(3, 100, ik, sealed) == (b"k", b"v1")
    for pg, lsn, ik2, blob in [
        (3, 101, ik, sealed),  # moved to another LSN (a rolled-back version replayed as newer)
        (4, 100, ik, sealed),  # to another PG
        (3, 100, c.index_key(b"other"), sealed),  # under another key
        (3, 100, ik, sealed[:-1] + bytes([sealed[-1] ^ 1])),  # one bit flipped
        (3, 100, ik, sealed[:10]),  # cut short
    ]:
        with pytest.raises(CorruptRecord):
            c.open(pg, lsn, ik2, blob)
    other_volume = VolumeCipher(os.urandom(32), "vol-2")
    with pytest.raises(CorruptRecord):
        other_volume.open(3, 100, ik, sealed)
    assert c.failures == 5


def test_status_says_encrypted_and_counts_failed_tags(tmp_path):
    with open_db(tmp_path / "v", encryption_key=KEY) as db:
        db.put(b"a", b"1")
        st = db.status()
        assert st["encrypted"] is True and st["writer"]["stats"]["tag_failures"] == 0
    with open_db(tmp_path / "p") as db:
        assert db.status()["encrypted"] is False and "tag_failures" not in db.status()["writer"]["stats"]


@settings(max_examples=200, deadline=None)
@given(key=st.binary(min_size=1, max_size=480), value=st.binary(max_size=2000),
       pg=st.integers(0, 2**32 - 1), lsn=st.integers(1, 2**62))
def test_seal_open_round_trip(key, value, pg, lsn):
    c = VolumeCipher(b"\x07" * 32, "vol")
    ik = c.index_key(key)
    assert len(ik) == 32
    assert c.open(pg, lsn, ik, c.seal(pg, lsn, ik, key, value)) == (key, value)


def test_envelope_wrap_unwrap_rewrap():
    d = new_descriptor(KEY, "vol")
    dk = unwrap(d, KEY, "vol")
    with pytest.raises(EncryptionError):
        unwrap(d, OTHER_KEY, "vol")
    with pytest.raises(EncryptionError):
        unwrap(d, KEY, "another-volume")  # the volume id is the wrap's associated data
    d2 = rewrap(d, KEY, OTHER_KEY, "vol")
    assert unwrap(d2, OTHER_KEY, "vol") == dk and d2["wrapped_key"] != d["wrapped_key"]


@pytest.mark.parametrize("material", [KEY, KEY.hex(), KEY.hex().encode(), __import__("base64").b64encode(KEY).decode()])
def test_master_key_forms(material):
    assert load_master_key(material) == KEY


@pytest.mark.parametrize("material", [b"", b"x" * 31, "zz" * 32, 42, "not a key"])
def test_bad_master_keys_are_refused_without_echoing_them(material):
    with pytest.raises(InvalidArgument) as e:
        load_master_key(material)
    assert "not a key" not in str(e.value)


def test_the_key_is_not_in_the_options_repr(tmp_path):
    from engine.embedded import EmbeddedOptions

    assert KEY.hex() not in repr(EmbeddedOptions(encryption_key=KEY.hex()))
