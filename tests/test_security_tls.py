"""A secure cluster refuses the attacks of the Security issue, with the right status, and they change nothing.

Each attack of the issue is replayed from outside against a cluster the launcher started (real
processes, real mutual TLS): a `SyncEpoch` with a truncation range, an `Append` planting a value,
a `Seal` at a higher epoch, `Corrupt` and `SetFaults`, and a metadata source naming itself the
admin, each sent with certificates of this cluster that lack the role (a node's, a reader's).
They are refused PERMISSION_DENIED, and after each one the acknowledged data reads back intact
and the writer still serves at its epoch. Callers without a certificate of this cluster never
reach a handler: plaintext, another cluster's CA, an expired certificate are refused at the
handshake; a certificate revoked by `sixfold certs revoke` is refused UNAUTHENTICATED from its
next call, on the connection it already had. A rotation (`sixfold certs rotate`) keeps the
cluster serving puts before, during and after. One module-scoped cluster carries all of it
(clusters are expensive on a small machine); the rotation test runs last.
"""

from __future__ import annotations

import datetime
import os
import stat
import threading

import grpc
import pytest
from waiting import DEADLINE_S, eventually

import engine
from engine import codec
from engine.cli import main
from engine.cluster import Cluster
from engine.cluster.commands import status_table
from engine.cluster.manifest import load_manifest, new_manifest, save_manifest
from engine.cluster.testing import free_base_port
from engine.core.constants import FLAG_CPL, FLAG_PUT
from engine.core.placement import protection_group_of
from engine.core.types import Geometry, NodeInfo, TruncationRange
from engine import errors
from engine.errors import InvalidArgument
from engine.node.service import StorageNode
from engine.proto import storage_pb2, storage_pb2_grpc
from engine.security.certs import TlsFolder
from engine.security.roles import identity_from_pem
from engine.security.tls import TlsConfig, secure_channel
from engine.transport import convert
from engine.transport.grpc_client import GrpcTransport, VolumeMetadata
from engine.transport.grpc_server import InsecureListen, NodeServer, make_server

P = 2
KEYS = 40
DENIED = grpc.StatusCode.PERMISSION_DENIED


# --- without processes ------------------------------------------------------------------------
def test_a_certificate_names_cluster_role_and_id_and_its_key_file_is_0600(tmp_path):
    tf = TlsFolder(tmp_path, "vol-a")
    tf.ensure({"n1": "node", "writer": "writer", "admin": "admin"})
    for name in ("n1", "writer", "admin", "ca-key"):
        assert stat.S_IMODE(os.stat(tmp_path / "tls" / f"{name}.pem").st_mode) == 0o600, name
    with open(tf.identity_path("n1"), "rb") as fh:
        who = identity_from_pem(fh.read())
    assert (who.cluster, who.role, who.id) == ("vol-a", "node", "n1")
    with pytest.raises(InvalidArgument):
        tf.issue("x", "superuser")


def test_status_warns_30_days_before_a_certificate_expires(tmp_path):
    tf = TlsFolder(tmp_path, "vol-a")
    tf.ensure({"admin": "admin"})
    soon = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=20)
    tf.issue("r1", "reader", not_after=soon)
    warnings = tf.expiring()
    assert len(warnings) == 1 and "r1" in warnings[0] and "expires in" in warnings[0], warnings
    tf.issue("r1", "reader", days=365)
    assert tf.expiring() == []


def test_a_manifest_written_before_tls_existed_loads_as_an_insecure_cluster(tmp_path):
    m = new_manifest(base_port=17400)
    del m["tls"], m["allow_fault_injection"]
    save_manifest(str(tmp_path), m)
    loaded = load_manifest(str(tmp_path))
    assert "tls" not in loaded
    st = {"nodes": [], "writer": {"address": "x", "pid": None, "health": "DOWN"}, "volume_id": "v", "durable": True,
          "security": {"tls": False, "warnings": []}}
    assert "INSECURE" in status_table(st)


def test_plaintext_on_a_non_loopback_address_is_refused():
    with pytest.raises(InsecureListen, match="without TLS"):
        make_server("0.0.0.0:0", 1)


def _node_server(tmp_path, allow_fault_injection):
    tf = TlsFolder(tmp_path, "vol-b")
    tf.ensure({"n1": "node", "admin": "admin", "writer": "writer"})
    ns = NodeServer.bind(
        lambda: StorageNode(str(tmp_path / "n1"), NodeInfo("n1", "a"), Geometry(P), "vol-b", durable=False),
        "127.0.0.1:0", 4, tls=TlsConfig.in_cluster(tmp_path, "n1", "vol-b"), allow_fault_injection=allow_fault_injection,
    )
    ns.start()
    return ns


def test_without_allow_fault_injection_corrupt_and_set_faults_do_not_exist(tmp_path):
    ns = _node_server(tmp_path, allow_fault_injection=False)
    try:
        for identity, code in (("admin", grpc.StatusCode.UNIMPLEMENTED), ("writer", DENIED), ("n1", DENIED)):
            with grpc.intercept_channel(secure_channel(f"127.0.0.1:{ns.port}", TlsConfig.in_cluster(tmp_path, identity, "vol-b")),
                                        VolumeMetadata("vol-b")) as ch:
                stub = storage_pb2_grpc.StorageStub(ch)
                for call, req in ((stub.Corrupt, storage_pb2.CorruptRequest(pg=0)), (stub.SetFaults, storage_pb2.FaultSpec())):
                    with pytest.raises(grpc.RpcError) as e:
                        call(req, timeout=10)
                    assert e.value.code() == code, (identity, e.value.code(), e.value.details())
    finally:
        ns.stop(1)


# --- against a secure cluster of real processes ---------------------------------------------
@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("secure") / "c")
    try:
        c.up(base_port=free_base_port(), protection_groups=P, durable=False, timeout_s=DEADLINE_S,
             allow_fault_injection=True)
        tf = TlsFolder(c.folder, c.manifest["volume_id"])
        tf.issue("r1", "reader")
        db = c.connect(timeout_s=30)
        acked = {f"acked:{i}".encode(): f"value-{i}".encode() for i in range(KEYS)}
        for k, v in acked.items():
            db.put(k, v)
        try:
            yield {"cluster": c, "db": db, "acked": acked, "tls": tf}
        finally:
            db.close()
    finally:
        c.down(timeout_s=10)


def _stub(secure, node: str, identity: str):
    c = secure["cluster"]
    ch = grpc.intercept_channel(secure_channel(c.address(node), c.tls(identity)), VolumeMetadata(c.manifest["volume_id"]))
    return ch, storage_pb2_grpc.StorageStub(ch)


def _refused(call, request, code=DENIED, metadata=()):
    with pytest.raises(grpc.RpcError) as e:
        call(request, timeout=10, metadata=metadata)
    assert e.value.code() == code, (e.value.code(), e.value.details())
    return e.value


def _intact(secure) -> None:
    """Acknowledged data reads back, the writer serves at its epoch, every node is SERVING."""
    c, db = secure["cluster"], secure["db"]
    for k, v in secure["acked"].items():
        assert db.get(k) == v, f"acknowledged {k!r} changed"
        assert db.get(k, quorum=True) == v, f"acknowledged {k!r} changed on a read quorum"
    assert c.health("writer", 5) == "SERVING"
    db.put(b"still:writable", b"yes")
    assert db.get(b"still:writable") == b"yes"
    assert all(c.health(n, 5) == "SERVING" for n in c.node_ids)


def _state(secure, node):
    ch, stub = _stub(secure, node, "admin")
    with ch:
        return stub.State(storage_pb2.StateRequest(), timeout=10)


@pytest.mark.cluster
def test_sync_epoch_with_a_truncation_range_from_a_node_or_reader_is_refused_and_changes_nothing(secure):
    c = secure["cluster"]
    before = {n: _state(secure, n) for n in c.node_ids}
    epoch = secure["db"].status()["epoch"]
    request = convert.sync_epoch_request_to_pb(epoch + 1, (TruncationRange(epoch + 1, 1, 1 << 40),), None)
    for identity in ("n1", "r1", "admin"):
        for node in c.node_ids:
            ch, stub = _stub(secure, node, identity)
            with ch:
                e = _refused(stub.SyncEpoch, request)
                assert dict(e.trailing_metadata())[convert.ERROR_METADATA_KEY] == "PermissionDenied"
    for n in c.node_ids:
        after = _state(secure, n)
        assert after.epoch == before[n].epoch and list(after.scls) >= list(before[n].scls)
    _intact(secure)


@pytest.mark.cluster
def test_an_append_from_a_non_writer_certificate_is_refused(secure):
    c, db = secure["cluster"], secure["db"]
    key = b"acked:0"
    pg = protection_group_of(key, P)
    st = _state(secure, "n1")
    lsn = max(st.scls) + 1
    frame = codec.encode_frame([codec.encode_record(lsn, st.scls[pg], pg, FLAG_PUT | FLAG_CPL, key, b"PLANTED")])
    for identity in ("n2", "r1", "admin"):
        for node in c.node_ids:
            ch, stub = _stub(secure, node, identity)
            with ch:
                _refused(stub.Append, storage_pb2.AppendRequest(epoch=st.epoch, frame=frame, hint_lsn=lsn))
        t = GrpcTransport({"n1": c.address("n1")}, source=identity, tls=c.tls(identity), volume_id=c.manifest["volume_id"])
        try:  # nor on an AppendStream
            with pytest.raises(errors.PermissionDenied):
                t.append("n1", st.epoch, frame, lsn)
        finally:
            t.close()
    assert db.get(key) == secure["acked"][key]
    _intact(secure)


@pytest.mark.cluster
def test_a_seal_at_a_higher_epoch_from_a_non_writer_is_refused_and_the_writer_is_not_fenced(secure):
    c, db = secure["cluster"], secure["db"]
    epoch = db.status()["epoch"]
    for identity in ("n3", "r1", "admin"):
        for node in c.node_ids:
            ch, stub = _stub(secure, node, identity)
            with ch:
                _refused(stub.Seal, storage_pb2.SealRequest(epoch=epoch + 100))
    assert all(_state(secure, n).epoch == epoch for n in c.node_ids)
    assert db.status()["epoch"] == epoch
    _intact(secure)


@pytest.mark.cluster
def test_corrupt_and_set_faults_are_for_the_admin_only_and_metadata_raises_nothing(secure):
    c = secure["cluster"]
    admin = {("sixfold-source", "admin")}
    for identity in ("n1", "writer", "r1"):
        for node in c.node_ids:
            ch, stub = _stub(secure, node, identity)
            with ch:
                _refused(stub.Corrupt, storage_pb2.CorruptRequest(pg=0, lsn=1, bit=3), metadata=tuple(admin))
                _refused(stub.SetFaults, convert.fault_rules_to_pb(convert.FaultRules(drop_probability=1.0)),
                         metadata=tuple(admin))
    # The admin's fault rule blocks the reader; the reader naming itself "admin" in metadata is
    # still blocked: the source is the certificate's id, and only the admin role is unfaulted.
    c.set_faults("n1", convert.FaultRules(blocked_sources=("r1",)))
    try:
        ch, stub = _stub(secure, "n1", "r1")
        with ch:
            _refused(stub.State, storage_pb2.StateRequest(), grpc.StatusCode.UNAVAILABLE, metadata=tuple(admin))
        assert _state(secure, "n1").node == "n1"  # the admin itself passes
    finally:
        c.set_faults("n1", None)
    ch, stub = _stub(secure, "n1", "r1")
    with ch:
        assert stub.State(storage_pb2.StateRequest(), timeout=10).node == "n1"
    _intact(secure)


@pytest.mark.cluster
def test_refusals_are_counted_in_the_node_status(secure):
    ch, stub = _stub(secure, "n4", "r1")
    with ch:
        _refused(stub.Seal, storage_pb2.SealRequest(epoch=1 << 30))
    st = secure["cluster"].status()
    n4 = next(n for n in st["nodes"] if n["id"] == "n4")
    assert n4["security"]["refused"] >= 1 and "Seal from reader r1" in n4["security"]["last_refusal"]
    assert st["security"]["tls"] is True


@pytest.mark.cluster
def test_the_kv_service_refuses_a_reader_write_and_a_plaintext_client(secure):
    c = secure["cluster"]
    from engine.security.users import operator_token

    # a reader certificate: even with the operator's admin token, the certificate's role decides
    reader = engine.connect(c.writer_address, tls=c.tls("r1"), timeout_s=10, token=operator_token(c.folder))
    try:
        assert reader.get(b"acked:1") == secure["acked"][b"acked:1"]
        with pytest.raises(engine.PermissionDenied):
            reader.put(b"acked:1", b"overwritten")
    finally:
        reader.close()
    with pytest.raises(engine.Unavailable):
        engine.connect(c.writer_address, connect_timeout_s=1)
    _intact(secure)


@pytest.mark.cluster
def test_plaintext_another_clusters_ca_and_an_expired_certificate_are_refused_at_the_handshake(secure, tmp_path):
    c, tf = secure["cluster"], secure["tls"]
    address = c.address("n1")
    with grpc.insecure_channel(address) as ch:
        _refused(storage_pb2_grpc.StorageStub(ch).State, storage_pb2.StateRequest(), grpc.StatusCode.UNAVAILABLE)
    # A writer certificate of another cluster (its own CA), presented by a client that trusts ours.
    other = TlsFolder(tmp_path / "other", c.manifest["volume_id"])  # even the same cluster id does not help
    other.ensure({"writer": "writer"})
    key, chain, _roots = TlsConfig(other.path, "writer", "x").load()
    with open(tf.bundle_path, "rb") as fh:
        ours = fh.read()
    creds = grpc.ssl_channel_credentials(root_certificates=ours, private_key=key, certificate_chain=chain)
    with grpc.secure_channel(address, creds) as ch:
        _refused(storage_pb2_grpc.StorageStub(ch).Seal, storage_pb2.SealRequest(epoch=1 << 20), grpc.StatusCode.UNAVAILABLE)
    # An expired writer certificate of this very CA.
    tf.issue("writer-expired", "writer", not_after=datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=1))
    ch, stub = _stub(secure, "n1", "writer-expired")
    with ch:
        _refused(stub.Seal, storage_pb2.SealRequest(epoch=1 << 20), grpc.StatusCode.UNAVAILABLE)
    _intact(secure)


@pytest.mark.cluster
def test_a_revoked_certificate_is_refused_from_its_next_call_on_an_open_connection(secure, capsys):
    c, tf = secure["cluster"], secure["tls"]
    tf.issue("r2", "reader")
    ch, stub = _stub(secure, "n2", "r2")
    with ch:
        assert stub.State(storage_pb2.StateRequest(), timeout=10).node == "n2"
        assert main(["certs", "revoke", "r2", "--cluster", c.folder]) == 0
        e = _refused(stub.State, storage_pb2.StateRequest(), grpc.StatusCode.UNAUTHENTICATED)
        assert "revoked" in e.details()
    ch, stub = _stub(secure, "n5", "r2")  # a new connection, another node
    with ch:
        _refused(stub.State, storage_pb2.StateRequest(), grpc.StatusCode.UNAUTHENTICATED)
    _intact(secure)


@pytest.mark.cluster
def test_a_writer_certificate_revoked_with_its_append_stream_open_is_refused_from_its_next_append(secure, capsys):
    """The role is checked for every request on a stream, not only when it opens."""
    c, tf = secure["cluster"], secure["tls"]
    tf.issue("w9", "writer")
    t = GrpcTransport({"n3": c.address("n3")}, source="w9", tls=c.tls("w9"), volume_id=c.manifest["volume_id"])
    try:
        epoch = _state(secure, "n3").epoch
        assert t.append("n3", epoch, codec.encode_frame([]), 0).node == "n3"  # a heartbeat, on the stream
        assert _state(secure, "n3").extra_json and "append_streams" in _state(secure, "n3").extra_json
        assert main(["certs", "revoke", "w9", "--cluster", c.folder]) == 0
        with pytest.raises(errors.Unauthenticated, match="revoked"):
            t.append("n3", epoch, codec.encode_frame([]), 0)
    finally:
        t.close()
    _intact(secure)


@pytest.mark.cluster
def test_rotation_keeps_the_cluster_serving_puts_before_during_and_after(secure, capsys):
    c, db = secure["cluster"], secure["db"]
    old_ca = secure["tls"].trusted()[0].serial_number
    done = threading.Event()
    acked: dict[bytes, bytes] = {}
    failures: list[Exception] = []

    def load() -> None:
        i = 0
        while not done.is_set() and i < 100_000:
            k, v = f"rot:{i}".encode(), f"r{i}".encode()
            try:
                db.put(k, v)
                acked[k] = v
            except engine.SixfoldError as e:
                failures.append(e)
            i += 1
            done.wait(0.01)

    t = threading.Thread(target=load, daemon=True)
    t.start()
    try:
        eventually(lambda: len(acked) >= 20, "puts before the rotation")
        assert main(["certs", "rotate", "--cluster", c.folder]) == 0
        during = len(acked)
        eventually(lambda: len(acked) >= during + 20, "puts after the rotation")
    finally:
        done.set()
        t.join(DEADLINE_S)
    assert not failures, failures[:3]
    # Every server now presents a certificate of the new CA; the old one is still trusted.
    new_ca = secure["tls"].ca()[0].serial_number
    assert new_ca != old_ca and len(secure["tls"].trusted()) == 2
    assert main(["certs", "rotate", "--finish", "--cluster", c.folder]) == 0
    assert [ca.serial_number for ca in secure["tls"].trusted()] == [new_ca]
    fresh = c.connect(timeout_s=30)  # a new connection, new certificates only
    try:
        for k, v in {**secure["acked"], **acked}.items():
            assert fresh.get(k) == v, k
        fresh.put(b"after:finish", b"ok")
    finally:
        fresh.close()
    st = c.status()
    assert all(n["health"] == "SERVING" for n in st["nodes"]) and st["writer"]["health"] == "SERVING"
    _intact(secure)
