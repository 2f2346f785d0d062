"""Epoch proofs (engine.security.proofs): in a secure cluster a node adopts truncation ranges and
memberships only as a writer signed them, from the writer's SyncEpoch and from a peer's gossip.
Real certificates (the cluster CA), real LMDB nodes, a real TLS node server; the forged gossip
replies are what a compromised node would send."""

from __future__ import annotations

import datetime
import os

import grpc
import pytest

from engine import codec
from engine.core.constants import FLAG_CPL, FLAG_PUT
from engine.core.types import Geometry, Membership, NodeInfo, TruncationRange
from engine.errors import PermissionDenied
from engine.node.service import StorageNode
from engine.proto import storage_pb2, storage_pb2_grpc
from engine.security.certs import TlsFolder
from engine.security.proofs import EpochSigner, EpochVerifier
from engine.security.tls import TlsConfig, secure_channel
from engine.transport import convert
from engine.transport.grpc_client import VolumeMetadata
from engine.transport.grpc_server import NodeServer
from engine.transport.inprocess import InProcessTransport, Registry

P = 2
VOL = "vol-p"
MEMBERS = ("n1", "n2", "n3", "n4", "n5", "n6")


@pytest.fixture
def pki(tmp_path):
    tf = TlsFolder(tmp_path, VOL)
    tf.ensure({"writer": "writer", "n1": "node", "n2": "node", "n3": "node", "r1": "reader", "admin": "admin"})
    return tmp_path


def tls(folder, ident):
    return TlsConfig.in_cluster(folder, ident, VOL)


def signed(folder, ident, epoch, truncations, membership):
    return EpochSigner.from_tls(tls(folder, ident)).proof(epoch, truncations, membership)


M3 = Membership(3, MEMBERS)
CUT = (TruncationRange(3, 50, 60),)


def test_a_writers_proof_verifies_and_says_what_was_signed(pki):
    proof = signed(pki, "writer", 3, CUT, M3)
    stmt = EpochVerifier.from_tls(tls(pki, "n1")).verify(proof)
    assert (stmt.volume, stmt.epoch, stmt.truncations) == (VOL, 3, ((3, 50, 60),))
    assert stmt.membership == (3, MEMBERS, None)


def test_forged_proofs_are_refused(pki, tmp_path_factory):
    verifier = EpochVerifier.from_tls(tls(pki, "n1"))
    good = signed(pki, "writer", 3, CUT, M3)
    other = tmp_path_factory.mktemp("other")
    TlsFolder(other, VOL).ensure({"writer": "writer"})  # another CA, even naming this volume
    forged = [
        b"",  # none
        b"{not json",
        signed(pki, "n2", 3, CUT, M3),  # a node's certificate: not a writer
        signed(pki, "r1", 3, CUT, M3),  # a reader's
        signed(other, "writer", 3, CUT, M3),  # another cluster's CA
        good.replace(b'"sig": "', b'"sig": "AAAA'),  # a signature that is not the statement's
    ]
    import base64
    import json
    doc = json.loads(good)
    stmt = json.loads(base64.b64decode(doc["statement"]))
    stmt["truncations"] = [[3, 1, 1 << 40]]  # the statement changed after signing
    doc["statement"] = base64.b64encode(json.dumps(stmt, sort_keys=True, separators=(",", ":")).encode()).decode()
    forged.append(json.dumps(doc).encode())
    for proof in forged:
        with pytest.raises(PermissionDenied):
            verifier.verify(proof)
    assert verifier.refused == len(forged)
    with pytest.raises(PermissionDenied, match="another cluster"):
        EpochVerifier(VOL + "-b", verifier._trusted).verify(good)


def test_a_revoked_or_expired_writer_certificate_signs_nothing(pki):
    tf = TlsFolder(pki, VOL)
    past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=1)
    tf.issue("old-writer", "writer", not_after=past)
    with pytest.raises(PermissionDenied, match="validity"):
        EpochVerifier.from_tls(tls(pki, "n1")).verify(signed(pki, "old-writer", 3, CUT, M3))
    proof = signed(pki, "writer", 3, CUT, M3)
    tf.revoke("writer")
    with pytest.raises(PermissionDenied, match="revoked"):
        EpochVerifier.from_tls(tls(pki, "n1")).verify(proof)


def _node(folder, node_id, verifier):
    n = StorageNode(str(folder / node_id), NodeInfo(node_id, "a"), Geometry(P), VOL, durable=False)
    n.verifier = verifier
    return n


def _acked(n, epoch, upto):
    prev, recs = 0, []
    for lsn in range(1, upto + 1):
        recs.append(codec.encode_record(lsn, prev, 0, FLAG_PUT | FLAG_CPL, b"k%d" % lsn, b"v%d" % lsn))
        prev = lsn
    n.append(epoch, codec.encode_frame(recs), upto)


def test_gossip_adopts_only_what_a_writer_signed_and_hands_the_proof_on(pki, tmp_path):
    reg = Registry()
    nodes = {i: _node(tmp_path, i, EpochVerifier.from_tls(tls(pki, i))) for i in ("n1", "n2", "n3")}
    try:
        m2 = Membership(2, MEMBERS)
        for n in nodes.values():
            reg.set(n.id, n)
            n.seal(2)
            if n.id != "n2":  # n2 holds no proof at all: what it says is unsigned
                n.sync_epoch(2, (), m2, signed(pki, "writer", 2, (), m2), 2)
        _acked(nodes["n1"], 2, 10)
        # n2 is compromised: it holds a range that erases everything, and a membership handing
        # the volume to other nodes, with no proof of them.
        nodes["n2"].store.sync_epoch(2, (TruncationRange(2, 11, 1 << 40),), Membership(9, ("x1", "x2", "x3", "x4", "x5", "x6")))
        n1 = nodes["n1"]
        n1.attach(InProcessTransport(reg, "n1"), lambda: ["n1", "n2"])
        n1.gossip_once()
        assert n1.state().truncations == () and n1.state().membership == m2
        assert n1.state().extra["unsigned_gossip_refused"] >= 1
        # The real writer's epoch 3 (a recovery cut 50..60) reaches n2 only; n1 learns it from n2's
        # proof (the statement, not n2's unsigned fields), and n3 from n1.
        proof3 = signed(pki, "writer", 3, CUT, M3)
        nodes["n2"].sync_epoch(2, CUT, M3, proof3, 3)
        n1.gossip_once()
        assert n1.state().truncations == CUT and n1.state().membership == M3
        assert n1.state().epoch_proof == proof3
        n3 = nodes["n3"]
        n3.attach(InProcessTransport(reg, "n3"), lambda: ["n3", "n1"])
        n3.gossip_once()
        assert n3.state().truncations == CUT and n3.state().membership == M3
        assert n1.read(0, b"k7", 10, 0, 2).value == b"v7"  # nothing acknowledged was cut
    finally:
        for n in nodes.values():
            n.close()


def test_a_secure_node_takes_a_sync_epoch_only_with_a_matching_writer_proof(pki, tmp_path):
    ns = NodeServer.bind(lambda: _node(tmp_path, "n1", None), "127.0.0.1:0", 4, tls=tls(pki, "n1"), me="n1")
    ns.node.verifier = EpochVerifier.from_tls(tls(pki, "n1"))
    ns.start()
    try:
        ch = grpc.intercept_channel(secure_channel(f"127.0.0.1:{ns.port}", tls(pki, "writer")), VolumeMetadata(VOL))
        stub = storage_pb2_grpc.StorageStub(ch)
        stub.Seal(storage_pb2.SealRequest(epoch=3), timeout=10)
        good = signed(pki, "writer", 3, CUT, M3)
        for proof in (b"", signed(pki, "writer", 3, (TruncationRange(3, 1, 1 << 40),), M3), signed(pki, "n2", 3, CUT, M3)):
            req = convert.sync_epoch_request_to_pb(3, CUT, M3, proof)  # the fields say one thing...
            with pytest.raises(grpc.RpcError) as e:
                stub.SyncEpoch(req, timeout=10)
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED, e.value.details()
        assert ns.node.state().truncations == ()
        reply = stub.SyncEpoch(convert.sync_epoch_request_to_pb(3, CUT, M3, good), timeout=10)
        assert convert.node_state_from_pb(reply).truncations == CUT
        assert ns.node.state().epoch_proof == good
        ch.close()
    finally:
        ns.stop(1)
