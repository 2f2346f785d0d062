"""Epoch proofs: truncation ranges and memberships signed by the writer that set them.

Theory of operation
-------------------
A node adopts an epoch's truncation ranges and membership from two places: the writer's
`SyncEpoch`, and a peer's `State` during gossip. mTLS keeps `SyncEpoch` to the writer role, but
gossip relays what a peer *says* it was told, and one compromised or confused node must not be
able to spread a truncation that erases acknowledged data, or a membership that hands the volume
to other nodes. So in a secure cluster the writer signs what it sets:

* The **statement** is the canonical JSON of (volume id, epoch, every truncation range, the
  membership): the whole epoch state, not a delta, so any one proof stands alone.
* The **proof** is the statement, the signer's certificate (PEM) and an ECDSA-P256/SHA-256
  signature by the certificate's key (`EpochSigner`: the writer's own TLS identity; a writer
  signs each state once and caches the proof).
* `EpochVerifier.verify(proof)` accepts it only when the certificate was issued by a CA the
  cluster trusts (its signature checks against one of `ca.pem`), is within its validity, is not
  revoked, names this cluster and the **writer role**, and its key signed the statement, which
  names this volume. It returns the statement's epoch, truncations and membership; the node
  adopts exactly those (never the unsigned fields beside the proof), and keeps the proof to hand
  on to its own peers. Verified proofs are cached by their bytes, so a gossip round costs a dict
  lookup.

Where it is checked: a secure node's `SyncEpoch` requires a proof that matches the request
(`engine.transport.grpc_server`); its gossip adopts a peer's truncations or membership only from
a proof that verifies (`StorageNode._gossip_with`), and counts the refusals. An insecure cluster
and the embedded engine (nodes in one process, no network) carry no proofs and check none.

"Signed by a writer of that epoch": only writer-role certificates sign, and one writer holds an
epoch (the epoch rule fences any other), so a proof for epoch E comes from a process allowed to
be the writer. A node cannot forge one: its certificate has the node role.
"""

from __future__ import annotations

import base64
import datetime
import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from engine.errors import InvalidArgument, PermissionDenied

#: A proof larger than this is refused unread (a statement lists ranges; a certificate is ~1 KB).
PROOF_BYTES_MAX = 256 * 1024
PROOF_VERSION = 1
CACHE_MAX = 256
WRITER_ROLE = "writer"


@dataclass(frozen=True)
class EpochStatement:
    """What a proof says (truncations as (epoch, first, last); membership as (epoch, members,
    next_members) or None), ready for the node's own types."""

    volume: str
    epoch: int
    truncations: tuple[tuple[int, int, int], ...]
    membership: tuple[int, tuple[str, ...], tuple[str, ...] | None] | None


def statement_bytes(volume: str, epoch: int, truncations: Sequence, membership) -> bytes:
    """The canonical statement: truncation ranges sorted, compact JSON, sorted keys."""
    doc = {
        "v": PROOF_VERSION,
        "volume": volume,
        "epoch": int(epoch),
        "truncations": sorted([int(t.epoch), int(t.first), int(t.last)] for t in truncations),
        "membership": None if membership is None else {
            "epoch": int(membership.epoch), "members": list(membership.members),
            "next": None if membership.next_members is None else list(membership.next_members),
        },
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


class EpochSigner:
    """Signs epoch statements with one identity's key (the writer's TLS identity file)."""

    def __init__(self, key_pem: bytes, cert_pem: bytes, volume: str) -> None:
        self._key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(self._key, ec.EllipticCurvePrivateKey):
            raise InvalidArgument("epoch proofs are signed with an EC key (the cluster's certificates are ECDSA P-256)")
        self._cert = cert_pem
        self.volume = volume
        self._last: tuple[bytes, bytes] | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_tls(cls, tls) -> EpochSigner:
        """The signer of a TlsConfig's identity (engine.security.tls); it reloads the identity
        when its files change (a certificate rotation)."""
        signer = cls(*_identity(tls), tls.cluster_id)
        signer._tls, signer._generation = tls, tls.generation()
        return signer

    _tls = None
    _generation = None

    def _reload_if_rotated(self) -> None:
        if self._tls is None:
            return
        gen = self._tls.generation()
        if gen != self._generation:
            key, cert = _identity(self._tls)
            self._key = serialization.load_pem_private_key(key, password=None)
            self._cert, self._generation, self._last = cert, gen, None

    def proof(self, epoch: int, truncations: Sequence, membership) -> bytes:
        self._reload_if_rotated()
        statement = statement_bytes(self.volume, epoch, truncations, membership)
        with self._lock:
            if self._last is not None and self._last[0] == statement:
                return self._last[1]
        sig = self._key.sign(statement, ec.ECDSA(hashes.SHA256()))
        proof = json.dumps({
            "statement": base64.b64encode(statement).decode(),
            "cert": self._cert.decode(),
            "sig": base64.b64encode(sig).decode(),
        }, sort_keys=True).encode()
        with self._lock:
            self._last = (statement, proof)
        return proof


def _identity(tls) -> tuple[bytes, bytes]:
    """(private key PEM, the identity's own certificate PEM) of a TlsConfig."""
    from engine.security.certs import certificates_in

    key, chain, _roots = tls.load()
    return key, certificates_in(chain)[0].public_bytes(serialization.Encoding.PEM)


class EpochVerifier:
    """Checks epoch proofs against a cluster's trusted CAs (see the module docstring)."""

    def __init__(self, volume: str, trusted, revoked=None, clock=None) -> None:
        """`trusted()`: the CA certificates (x509) to accept, read when called (a rotation adds
        one); `revoked`: a container of revoked serials (hex), or None."""
        self.volume = volume
        self._trusted = trusted
        self._revoked = revoked
        self._clock = clock or (lambda: datetime.datetime.now(datetime.timezone.utc))
        self._cache: OrderedDict[bytes, EpochStatement] = OrderedDict()
        self._lock = threading.Lock()
        self.refused = 0

    @classmethod
    def from_tls(cls, tls) -> EpochVerifier:
        from engine.security.certs import certificates_in
        from engine.security.roles import RevocationList

        def trusted():
            with open(tls.bundle_path, "rb") as fh:
                return certificates_in(fh.read())

        return cls(tls.cluster_id, trusted, RevocationList(tls.revoked_path))

    def verify(self, proof: bytes) -> EpochStatement:
        """The statement of a valid proof; PermissionDenied (counted) otherwise."""
        with self._lock:
            hit = self._cache.get(proof)
        if hit is not None:
            return hit
        try:
            statement = self._verify(proof)
        except PermissionDenied:
            self.refused += 1
            raise
        with self._lock:
            self._cache[proof] = statement
            while len(self._cache) > CACHE_MAX:
                self._cache.popitem(last=False)
        return statement

    def _verify(self, proof: bytes) -> EpochStatement:
        if not proof:
            raise PermissionDenied("no epoch proof: a secure node adopts truncations and memberships only when a writer signed them")
        if len(proof) > PROOF_BYTES_MAX:
            raise PermissionDenied(f"epoch proof of {len(proof)} bytes refused unread (at most {PROOF_BYTES_MAX})")
        try:
            doc = json.loads(proof)
            statement = base64.b64decode(doc["statement"], validate=True)
            sig = base64.b64decode(doc["sig"], validate=True)
            cert = x509.load_pem_x509_certificate(doc["cert"].encode())
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise PermissionDenied(f"malformed epoch proof ({type(e).__name__})") from None
        self._check_certificate(cert)
        try:
            cert.public_key().verify(sig, statement, ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, TypeError, ValueError):
            raise PermissionDenied("epoch proof: the signature does not match the statement") from None
        return self._parse(statement)

    def _check_certificate(self, cert: x509.Certificate) -> None:
        from engine.security.roles import identity_from_pem

        issuer = None
        for ca in self._trusted():
            if ca.subject != cert.issuer:
                continue
            try:
                ca.public_key().verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
                issuer = ca
                break
            except (InvalidSignature, TypeError, ValueError):
                continue
        if issuer is None:
            raise PermissionDenied("epoch proof signed by a certificate no trusted CA of this cluster issued")
        now = self._clock()
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise PermissionDenied("epoch proof signed by a certificate outside its validity")
        who = identity_from_pem(cert.public_bytes(serialization.Encoding.PEM))
        if self._revoked is not None and who.serial in self._revoked:
            raise PermissionDenied(f"epoch proof signed by {who}, whose certificate was revoked")
        if who.cluster != self.volume:
            raise PermissionDenied(f"epoch proof signed for another cluster ({who.cluster[:64]!r})")
        if who.role != WRITER_ROLE:
            raise PermissionDenied(f"epoch proof signed by {who}: only a writer may set truncations and memberships")

    def _parse(self, statement: bytes) -> EpochStatement:
        try:
            doc = json.loads(statement)
            if doc["v"] != PROOF_VERSION:
                raise ValueError(f"version {doc['v']!r}")
            volume, epoch = doc["volume"], doc["epoch"]
            truncations = tuple((int(e), int(f), int(l)) for e, f, l in doc["truncations"])
            m = doc["membership"]
            membership = None if m is None else (
                int(m["epoch"]), tuple(str(x) for x in m["members"]),
                None if m["next"] is None else tuple(str(x) for x in m["next"]),
            )
            if type(epoch) is not int or not isinstance(volume, str):
                raise ValueError("epoch or volume of the wrong type")
        except (ValueError, KeyError, TypeError) as e:
            raise PermissionDenied(f"epoch proof with an unreadable statement ({e})") from None
        if volume != self.volume:
            raise PermissionDenied(f"epoch proof for another volume ({volume[:64]!r})")
        return EpochStatement(volume, epoch, truncations, membership)
