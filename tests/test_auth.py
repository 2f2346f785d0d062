"""Client authentication of the KV service, against real processes (issue 10, parts 5 and 7).

One cluster (six node processes and a writer endpoint, started by `Cluster.up` as `sixfold cluster
up` does) serves the module. Users are added and removed with the real `sixfold user ...`
command, calls go over real gRPC: through `engine.connect`, and raw through a `KV` stub where
the status code and the metadata themselves are the point. A test per promise:

* a missing, wrong, malformed or removed token is refused `Unauthenticated` (status
  UNAUTHENTICATED), a role that is not enough `PermissionDenied` (PERMISSION_DENIED), and the
  refused write changed nothing;
* a removed user's token stops working on the next call, the endpoint still the same process;
* the printed token has 256 random bits and is stored nowhere in the cluster folder, only its
  SHA-256, in a 0600 file;
* the local operator needs no token argument; $SIXFOLD_TOKEN and --token-file work;
* user add/remove and refusals are in the audit log, and a flood of 1,000 refusals is a
  bounded number of lines whose counts add up to 1,000.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import subprocess
import sys
import time

import grpc
import pytest
from waiting import eventually

import engine
from engine.cluster import Cluster
from engine.cluster.testing import engine_env, free_base_port
from engine.proto import kv_pb2, kv_pb2_grpc
from engine.security import audit
from engine.security.users import OPERATOR_TOKEN_FILE, USERS_FILE, bearer

pytestmark = pytest.mark.cluster

CLI_TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("auth") / "c")
    try:
        # Tokens are checked whether or not TLS is on; plaintext (--insecure) keeps these tests about
        # tokens alone (tests/test_cluster_api.py checks a token is needed beside a certificate).
        c.up(base_port=free_base_port(), protection_groups=2, durable=False, timeout_s=60, insecure=True)
        yield c
    finally:
        c.down(timeout_s=10)


@pytest.fixture(autouse=True)
def no_token_env(monkeypatch):
    """No test inherits a token from the shell that runs the suite."""
    monkeypatch.delenv("SIXFOLD_TOKEN", raising=False)


def sixfold(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    e = engine_env()
    e.pop("SIXFOLD_TOKEN", None)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "engine", *argv], capture_output=True, text=True, env=e,
                          timeout=CLI_TIMEOUT_S)


def add_user(cluster, name: str, role: str) -> str:
    r = sixfold("user", "add", name, "--role", role, "--cluster", cluster.folder)
    assert r.returncode == 0, r.stderr
    token = r.stdout.strip()
    assert token and "\n" not in token, r.stdout
    return token


def remove_user(cluster, name: str) -> None:
    r = sixfold("user", "remove", name, "--cluster", cluster.folder)
    assert r.returncode == 0, r.stderr


def stub_call(cluster, rpc: str, request, metadata=()):
    """One raw KV call; returns (status code, error class name from the trailing metadata)."""
    with grpc.insecure_channel(cluster.writer_address) as ch:
        try:
            reply = getattr(kv_pb2_grpc.KVStub(ch), rpc)(request, timeout=30, metadata=metadata)
            if rpc == "Scan":  # a stream: its status comes with its end
                list(reply)
            return grpc.StatusCode.OK, None
        except grpc.RpcError as e:
            name = dict(e.trailing_metadata() or ()).get("sixfold-error")
            return e.code(), name


def operator_db(cluster):
    return engine.connect(cluster.folder)


def audit_lines(cluster) -> list[dict]:
    with open(audit.audit_path(cluster.folder)) as fh:
        return [json.loads(line) for line in fh]


# --- tokens: what is printed, what is stored ------------------------------------------------
def test_printed_token_has_256_bits_and_only_its_sha256_is_stored(cluster):
    token = add_user(cluster, "stored", "read")
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    assert len(raw) * 8 >= 256 > 128, f"{len(raw) * 8} bits"
    with open(os.path.join(cluster.folder, USERS_FILE)) as fh:
        users = {u["name"]: u for u in json.load(fh)["users"]}
    assert users["stored"]["token_sha256"] == hashlib.sha256(token.encode()).hexdigest()
    for name in (USERS_FILE, OPERATOR_TOKEN_FILE):
        mode = stat.S_IMODE(os.stat(os.path.join(cluster.folder, name)).st_mode)
        assert mode == 0o600, f"{name} has mode {oct(mode)}"
    # The token itself is nowhere in the folder: not in the users file, the manifest, the logs,
    # the audit log, nor the nodes' data.
    needle = token.encode()
    found = []
    for root, _dirs, files in os.walk(cluster.folder):
        for f in files:
            path = os.path.join(root, f)
            with open(path, "rb") as fh:
                if needle in fh.read():
                    found.append(path)
    assert not found, f"the token is stored in {found}"
    # and the token works (so the search looked for the right thing)
    with engine.connect(cluster.writer_address, token=token) as db:
        assert db.get(b"auth:never") is None


def test_user_list_shows_names_and_roles_never_a_token(cluster):
    token = add_user(cluster, "lister", "write")
    r = sixfold("user", "list", "--cluster", cluster.folder, "--json")
    assert r.returncode == 0, r.stderr
    users = {u["name"]: u for u in json.loads(r.stdout)}
    assert users["lister"]["role"] == "write" and users["operator"]["role"] == "admin"
    assert token not in r.stdout and "token_sha256" not in r.stdout
    r = sixfold("user", "add", "lister", "--role", "read", "--cluster", cluster.folder)
    assert r.returncode == 3 and "InvalidArgument" in r.stderr, (r.returncode, r.stderr)
    r = sixfold("user", "add", "bad name", "--role", "read", "--cluster", cluster.folder)
    assert r.returncode == 2, (r.returncode, r.stderr)
    r = sixfold("user", "add", "x", "--role", "root", "--cluster", cluster.folder)
    assert r.returncode == 2, (r.returncode, r.stderr)
    r = sixfold("user", "remove", "nobody", "--cluster", cluster.folder)
    assert r.returncode == 3 and "no user 'nobody'" in r.stderr, (r.returncode, r.stderr)


# --- refusals -------------------------------------------------------------------------------
def test_missing_wrong_and_malformed_tokens_are_unauthenticated(cluster):
    request = kv_pb2.GetRequest(key=b"auth:k")
    wrong = base64.urlsafe_b64encode(os.urandom(32)).decode().rstrip("=")
    for metadata in ((), bearer(wrong), (("authorization", "Basic dXNlcjpwYXNz"),), (("authorization", "Bearer"),)):
        assert stub_call(cluster, "Get", request, metadata) == (grpc.StatusCode.UNAUTHENTICATED, "Unauthenticated"), metadata
    # Every RPC is guarded, the streaming Scan too.
    for rpc, req in (("Write", kv_pb2.WriteRequest()), ("Scan", kv_pb2.ScanRequest()), ("Status", kv_pb2.StatusRequest()),
                     ("MembershipStatus", kv_pb2.MembershipStatusRequest()), ("View", kv_pb2.ViewRequest())):
        assert stub_call(cluster, rpc, req) == (grpc.StatusCode.UNAUTHENTICATED, "Unauthenticated"), rpc
    # The client raises the same typed error.
    with engine.connect(cluster.writer_address) as db:  # host:port, no token anywhere
        with pytest.raises(engine.Unauthenticated):
            db.get(b"auth:k")
        with pytest.raises(engine.Unauthenticated):
            db.put(b"auth:k", b"v")
        with pytest.raises(engine.Unauthenticated):
            list(db.scan(b"", None))
    with engine.connect(cluster.writer_address, token=wrong) as db:
        with pytest.raises(engine.Unauthenticated):
            db.get(b"auth:k")
    with pytest.raises(engine.InvalidArgument):  # not even the shape of a token: refused before sending
        engine.connect(cluster.writer_address, token="not a token\n")


def test_read_role_cannot_write_and_nothing_is_written(cluster):
    token = add_user(cluster, "reader", "read")
    with operator_db(cluster) as admin:
        admin.put(b"auth:kept", b"original")
    with engine.connect(cluster.writer_address, token=token) as db:
        assert db.get(b"auth:kept") == b"original"
        assert list(db.scan(b"auth:kept", b"auth:kepu")) == [(b"auth:kept", b"original")]
        assert db.status()["volume_id"] == cluster.manifest["volume_id"]
        with pytest.raises(engine.PermissionDenied):
            db.put(b"auth:kept", b"overwritten")
        with pytest.raises(engine.PermissionDenied):
            db.put(b"auth:new", b"v")
        with pytest.raises(engine.PermissionDenied):
            db.delete(b"auth:kept")
    request = kv_pb2.WriteRequest()
    request.units.add().ops.add(flags=1, key=b"auth:raw", value=b"v")
    assert stub_call(cluster, "Write", request, bearer(token)) == (grpc.StatusCode.PERMISSION_DENIED, "PermissionDenied")
    with operator_db(cluster) as admin:  # read back as admin: nothing of the refused writes is there
        assert admin.get(b"auth:kept", quorum=True) == b"original"
        assert admin.get(b"auth:new", quorum=True) is None
        assert admin.get(b"auth:raw", quorum=True) is None


def test_only_admin_may_use_membership_rpcs(cluster):
    writer_token = add_user(cluster, "writer-role", "write")
    request = kv_pb2.MembershipStatusRequest()
    assert stub_call(cluster, "MembershipStatus", request, bearer(writer_token)) == (
        grpc.StatusCode.PERMISSION_DENIED, "PermissionDenied")
    assert stub_call(cluster, "ReplaceNode", kv_pb2.ReplaceNodeRequest(), bearer(writer_token)) == (
        grpc.StatusCode.PERMISSION_DENIED, "PermissionDenied")
    with engine.connect(cluster.writer_address, token=writer_token) as db:
        db.put(b"auth:by-writer", b"w")  # the write role writes
        assert db.get(b"auth:by-writer") == b"w"
    operator = open(os.path.join(cluster.folder, OPERATOR_TOKEN_FILE)).read().strip()
    assert stub_call(cluster, "MembershipStatus", request, bearer(operator)) == (grpc.StatusCode.OK, None)
    # The launcher's own admin calls carry the operator's token: status shows the writer's VDL.
    st = cluster.status()
    assert st["writer"]["health"] == "SERVING" and "error" not in st["writer"] and st["writer"]["vdl"] >= 1, st["writer"]


def test_a_removed_users_token_stops_working_without_a_restart(cluster):
    pid = cluster.pid("writer")
    token = add_user(cluster, "leaver", "write")
    with engine.connect(cluster.writer_address, token=token) as db:
        db.put(b"auth:leaver", b"1")
        assert db.get(b"auth:leaver") == b"1"  # identity now cached for this connection
        remove_user(cluster, "leaver")
        with pytest.raises(engine.Unauthenticated):
            db.get(b"auth:leaver")
        with pytest.raises(engine.Unauthenticated):
            db.put(b"auth:leaver", b"2")
    assert stub_call(cluster, "Get", kv_pb2.GetRequest(key=b"auth:leaver"), bearer(token))[0] == grpc.StatusCode.UNAUTHENTICATED
    assert cluster.pid("writer") == pid, "the writer endpoint was restarted"
    with operator_db(cluster) as admin:
        assert admin.get(b"auth:leaver") == b"1"


# --- where the token comes from -------------------------------------------------------------
def test_the_local_operator_needs_no_token_argument(cluster):
    with engine.connect(cluster.folder) as db:
        db.put(b"auth:operator", b"yes")
        assert db.get(b"auth:operator") == b"yes"
    r = sixfold("get", "auth:operator", "--cluster", cluster.folder)
    assert (r.returncode, r.stdout) == (0, "yes\n"), r.stderr
    # Not the folder but its address: the operator token is not found, and the call is refused.
    r = sixfold("get", "auth:operator", "--target", cluster.writer_address)
    assert r.returncode == 3 and "Unauthenticated" in r.stderr, (r.returncode, r.stderr)


def test_sixfold_token_and_token_file(cluster, tmp_path, monkeypatch):
    write_token = add_user(cluster, "env-writer", "write")
    read_token = add_user(cluster, "file-reader", "read")
    env = {"SIXFOLD_TOKEN": write_token}
    r = sixfold("put", "auth:env", "from-env", "--target", cluster.writer_address, env=env)
    assert r.returncode == 0, r.stderr
    token_file = tmp_path / "reader.token"
    token_file.write_text(read_token + "\n")
    r = sixfold("get", "auth:env", "--target", cluster.writer_address, "--token-file", str(token_file))
    assert (r.returncode, r.stdout) == (0, "from-env\n"), r.stderr
    # --token-file wins over $SIXFOLD_TOKEN, and over the operator's token of --cluster.
    r = sixfold("put", "auth:env", "x", "--cluster", cluster.folder, "--token-file", str(token_file), env=env)
    assert r.returncode == 3 and "PermissionDenied" in r.stderr, (r.returncode, r.stderr)
    r = sixfold("put", "auth:env", "x", "--cluster", cluster.folder, "--token-file", str(tmp_path / "missing"))
    assert r.returncode == 2 and "--token-file" in r.stderr, (r.returncode, r.stderr)
    # $SIXFOLD_TOKEN also wins over the folder's operator token in engine.connect.
    monkeypatch.setenv("SIXFOLD_TOKEN", read_token)
    with engine.connect(cluster.folder) as db:
        assert db.get(b"auth:env") == b"from-env"
        with pytest.raises(engine.PermissionDenied):
            db.put(b"auth:env", b"y")


# --- the audit log --------------------------------------------------------------------------
def test_user_changes_and_refusals_are_audited(cluster):
    token = add_user(cluster, "audited", "read")
    remove_user(cluster, "audited")
    with engine.connect(cluster.writer_address, token=token) as db:
        with pytest.raises(engine.Unauthenticated):
            db.get(b"auth:a")
    lines = audit_lines(cluster)
    added = [e for e in lines if e["action"] == "user add" and e["target"] == "audited"]
    removed = [e for e in lines if e["action"] == "user remove" and e["target"] == "audited"]
    assert len(added) == 1 and added[0]["result"] == "ok" and added[0]["identity"].startswith("local:"), added
    assert len(removed) == 1 and removed[0]["result"] == "ok", removed
    assert all(set(e) >= {"time", "identity", "action", "target", "result"} for e in lines)
    assert any(e["action"] == "cluster up" or e["action"] == "writer start" for e in lines), lines[:3]
    eventually(lambda: any(e["identity"] == "unknown-token" and e["result"] == "Unauthenticated"
                           and e["time"] >= removed[0]["time"] for e in audit_lines(cluster)),
               "the refusal of the removed token in the audit log")
    r = sixfold("audit", "tail", "-n", "5", "--cluster", cluster.folder, "--json")
    assert r.returncode == 0 and len(json.loads(r.stdout)) == 5, r.stderr
    r = sixfold("audit", "tail", "--cluster", cluster.folder)
    assert r.returncode == 0 and "user remove" in r.stdout and "audited" in r.stdout, r.stdout


def test_a_flood_of_refusals_is_summarised_with_the_right_count(cluster):
    token = add_user(cluster, "flooder", "read")
    request = kv_pb2.WriteRequest()
    request.units.add().ops.add(flags=1, key=b"auth:flood", value=b"v")
    calls = 1000
    started = time.time()
    with grpc.insecure_channel(cluster.writer_address) as ch:
        write = kv_pb2_grpc.KVStub(ch).Write
        refused = 0
        for _ in range(calls):
            try:
                write(request, timeout=30, metadata=bearer(token))
            except grpc.RpcError as e:
                refused += e.code() == grpc.StatusCode.PERMISSION_DENIED
    seconds = time.time() - started
    assert refused == calls

    def flooder_lines():
        mine = [e for e in audit_lines(cluster) if e["identity"] == "flooder" and e["action"] == "Write"]
        return mine if sum(e["count"] for e in mine) == calls else None

    mine = eventually(flooder_lines, f"audit lines of the flooder counting {calls} refusals (summaries written)")
    # At most one first line and one summary per second the flood lasted (and the ones it touched).
    assert len(mine) <= 2 * (int(seconds) + 2), (len(mine), seconds)
    assert len(mine) < calls // 10
    assert all(e["result"] == "PermissionDenied" for e in mine)
    assert any(e.get("summary") and e["count"] > 1 for e in mine), mine
    with operator_db(cluster) as admin:
        assert admin.get(b"auth:flood", quorum=True) is None
        counted = admin.status()["endpoint"]["auth"]
    assert counted["refused_permission"] >= calls and counted["error"] == "", counted
    assert cluster.status()["writer"]["auth"]["refused_permission"] >= calls
    r = sixfold("cluster", "status", "--cluster", cluster.folder)
    assert r.returncode == 0 and "client tokens:" in r.stdout and "without the role" in r.stdout, r.stdout


def test_a_broken_users_file_refuses_everyone_and_says_which_field(cluster):
    """Fail closed: an edited users file that fails its schema check admits nobody (the message
    names the field) until it is fixed; then the same connection works again."""
    path = os.path.join(cluster.folder, USERS_FILE)
    good = open(path, "rb").read()
    doc = json.loads(good)
    doc["users"][0]["role"] = "superuser"
    with engine.connect(cluster.folder) as db:
        db.get(b"auth:x")
        try:
            with open(path + ".edit", "w") as fh:
                json.dump(doc, fh)
            os.replace(path + ".edit", path)
            with pytest.raises(engine.Unauthenticated, match=r"users\[0\]\.role"):
                db.get(b"auth:x")
        finally:
            with open(path + ".edit", "wb") as fh:
                fh.write(good)
            os.chmod(path + ".edit", 0o600)
            os.replace(path + ".edit", path)
        assert db.get(b"auth:x") is None
