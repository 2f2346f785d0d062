"""Encryption at rest: envelope keys and the sealing of records (AES-256-GCM, `cryptography`).

Theory of operation
-------------------
*Envelope encryption*, as a KMS does it: a volume created encrypted gets a random 256-bit **data
key**, stored only **wrapped** (AES-GCM under the caller's 256-bit **master key**, the volume id as
associated data) in the volume's descriptor (`volume.json` or `cluster.json`, field
"encryption"). Opening needs the master key to unwrap it: no key is `EncryptionError` ("this volume
is encrypted"), a wrong one fails the wrap's tag and is `EncryptionError` ("wrong key"). Rotating
the master key re-wraps the data key and touches no record (`rewrap`).

Two sub-keys are derived from the data key (HKDF-SHA256, distinct labels):

* the **sealing key**: a put's stored value is `nonce (12 random bytes) || AES-GCM(u16 key length
  || key || value)`, with associated data binding volume id, PG, LSN and index key. A record moved
  to another LSN, PG, key or volume, or changed in any bit, fails its tag, which the read path
  counts as corruption (`CorruptRecord`). The record's CRC covers the ciphertext, so nodes verify,
  scrub, gossip and repair without the key.
* the **index key**: a key is stored as its keyed hash, BLAKE2b-256 keyed with the index key (a
  PRF, as HMAC-SHA256 is, at a third of its cost here), so neither
  values nor keys appear on disk in the clear. The PG is that of the hashed key. A point read hashes
  the key and finds it directly; the plaintext key inside the sealed value is checked on the way
  out. Request ids are hashed the same way and a unit's digest is keyed. The price: the nodes know
  no key order, so a scan of an encrypted volume reads every live version of the volume at its
  read point, opens them and returns the keys in [start, end) in order (`engine.head.reads`): a
  scan costs the whole volume. Deletes store no value (a tombstone has nothing to hide).

The data key never leaves the process that opened the volume (the embedded engine, or the writer
endpoint of a cluster); nodes see only ciphertext and hashes.

Key files: `write_key_file` writes a new master key as base64 text to a file created 0600 (never
over an existing one); `read_key_file` reads one back (EncryptionError naming the path when it
cannot be read, InvalidArgument when it holds no key; neither ever echoes the material). The key
file is the operator's secret: whoever reads it and the volume's files reads the data.

Random 96-bit nonces: NIST's limit of 2^32 seals per key is far beyond what a volume here logs.
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from engine.errors import CorruptRecord, EncryptionError, InvalidArgument

SCHEME = "aes-256-gcm+blake2b/1"
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
#: Bytes a sealed value adds to the value, besides the plaintext key it carries.
SEAL_OVERHEAD_BYTES = NONCE_BYTES + 2 + TAG_BYTES
#: Bytes of an index key (a keyed hash).
INDEX_KEY_BYTES = 32

_AD = struct.Struct(">IQ")


def load_master_key(material) -> bytes:
    """A master key from `material`: 32 raw bytes, or text holding 32 bytes in base64 or hex
    (what `sixfold key new` writes). InvalidArgument otherwise (never echoes the material)."""
    if isinstance(material, (bytes, bytearray, memoryview)):
        raw = bytes(material)
        if len(raw) == KEY_BYTES:
            return raw
        try:
            material = raw.decode("ascii")
        except UnicodeDecodeError:
            raise InvalidArgument(f"an encryption key is {KEY_BYTES} bytes (or their base64 or hex); got {len(raw)} bytes") from None
    if not isinstance(material, str):
        raise InvalidArgument(f"an encryption key is bytes or text, not {type(material).__name__}")
    text = material.strip()
    for decode in (bytes.fromhex, lambda t: base64.b64decode(t, validate=True)):
        try:
            raw = decode(text)
        except ValueError:
            continue
        if len(raw) == KEY_BYTES:
            return raw
    raise InvalidArgument(f"an encryption key is {KEY_BYTES} bytes, or their base64 or hex ({2 * KEY_BYTES} hex digits)")


def new_master_key_text() -> str:
    """A fresh master key as base64 text (for a key file)."""
    return base64.b64encode(os.urandom(KEY_BYTES)).decode("ascii")


#: Permission bits a key file must not have (group or others may read or write it).
KEY_FILE_LOOSE_BITS = 0o077


def write_key_file(path: str | os.PathLike) -> str:
    """Write a new master key (`new_master_key_text`) to `path`, created mode 0600; refuses
    (FileExistsError) to replace a file that exists. Returns the absolute path."""
    path = os.path.abspath(os.fspath(path))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.write(fd, (new_master_key_text() + "\n").encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def read_key_file(path: str | os.PathLike) -> bytes:
    """The master key held by the key file at `path`. EncryptionError when it cannot be read,
    InvalidArgument when it holds no key (see `load_master_key`)."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as fh:
            material = fh.read(4096)
    except OSError as e:
        raise EncryptionError(f"cannot read the key file {path}: {e.strerror or e}") from None
    try:
        return load_master_key(material)
    except InvalidArgument as e:
        raise InvalidArgument(f"the key file {path} holds no encryption key: {e}") from None


def key_file_is_private(path: str | os.PathLike) -> bool:
    """False when group or others may read or write the key file (as ssh refuses such keys, a
    caller warns)."""
    try:
        return not os.stat(path).st_mode & KEY_FILE_LOOSE_BITS
    except OSError:
        return False


def _wrap(master: bytes, data_key: bytes, volume_id: str) -> str:
    nonce = os.urandom(NONCE_BYTES)
    return base64.b64encode(nonce + AESGCM(master).encrypt(nonce, data_key, volume_id.encode())).decode("ascii")


def new_descriptor(master_key: bytes, volume_id: str) -> dict:
    """The "encryption" field of a new encrypted volume: a fresh data key, wrapped."""
    return {"scheme": SCHEME, "wrapped_key": _wrap(master_key, os.urandom(KEY_BYTES), volume_id)}


def descriptor_problems(d) -> list[str]:
    """What keeps `d` from being an "encryption" field (for the volume/manifest schema checks)."""
    if not isinstance(d, dict):
        return [f"encryption must be an object, not {type(d).__name__}"]
    problems = []
    if d.get("scheme") != SCHEME:
        problems.append(f"encryption.scheme {d.get('scheme')!r} is not {SCHEME!r}")
    w = d.get("wrapped_key")
    try:
        raw = base64.b64decode(w, validate=True) if isinstance(w, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != NONCE_BYTES + KEY_BYTES + TAG_BYTES:
        problems.append("encryption.wrapped_key is not a wrapped 32-byte key (base64)")
    return problems


def unwrap(descriptor: dict, master_key: bytes, volume_id: str) -> bytes:
    """The data key. EncryptionError if `master_key` is not the volume's."""
    raw = base64.b64decode(descriptor["wrapped_key"])
    try:
        return AESGCM(master_key).decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], volume_id.encode())
    except InvalidTag:
        raise EncryptionError("wrong encryption key: it does not unwrap this volume's data key") from None


def rewrap(descriptor: dict, old_master: bytes, new_master: bytes, volume_id: str) -> dict:
    """The descriptor with the same data key wrapped under `new_master` (key rotation)."""
    return {"scheme": SCHEME, "wrapped_key": _wrap(new_master, unwrap(descriptor, old_master, volume_id), volume_id)}


def _subkey(data_key: bytes, label: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=b"sixfold " + label).derive(data_key)


class VolumeCipher:
    """Seals and opens one volume's records, hashes its keys (see the module docstring)."""

    def __init__(self, data_key: bytes, volume_id: str) -> None:
        self._aead = AESGCM(_subkey(data_key, b"seal"))
        self._index = _subkey(data_key, b"index")
        self._volume = volume_id.encode()
        self.failures = 0  # tags that failed: counted as corruption

    def index_key(self, key: bytes) -> bytes:
        return hashlib.blake2b(key, key=self._index, digest_size=INDEX_KEY_BYTES).digest()

    def digest_key(self) -> bytes:
        """The key of a unit's ops digest (a keyed BLAKE2b: a plain one would confirm guesses)."""
        return hashlib.sha256(self._index + b"digest").digest()

    def _ad(self, pg: int, lsn: int, ik: bytes) -> bytes:
        return self._volume + _AD.pack(pg, lsn) + ik

    def seal(self, pg: int, lsn: int, ik: bytes, key: bytes, value: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, len(key).to_bytes(2, "big") + key + value, self._ad(pg, lsn, ik))

    def open(self, pg: int, lsn: int, ik: bytes, sealed: bytes) -> tuple[bytes, bytes]:
        """(key, value) of a sealed value; CorruptRecord if it fails its tag or is malformed."""
        try:
            if len(sealed) < SEAL_OVERHEAD_BYTES:
                raise InvalidTag
            plain = self._aead.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], self._ad(pg, lsn, ik))
            n = int.from_bytes(plain[:2], "big")
            if len(plain) < 2 + n:
                raise InvalidTag
        except InvalidTag:
            self.failures += 1
            raise CorruptRecord(f"record at LSN {lsn} of PG {pg} failed its encryption tag (tampered, or not of this volume)") from None
        return plain[2:2 + n], plain[2 + n:]
