"""The files behind client authentication, without a cluster: the users file's schema, the
token check's reload and cache, the audit log's flood summaries and its appends from many
processes at once, and the manifest's `users_file` field (old manifests still load)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from engine.cluster.manifest import new_manifest, users_file
from engine.cluster.schema import validate_manifest
from engine.cluster.testing import engine_env
from engine.errors import InvalidArgument, PermissionDenied, Unauthenticated, WrongFolder
from engine.security import audit
from engine.security.users import (
    OPERATOR,
    OPERATOR_TOKEN_FILE,
    Authenticator,
    UserStore,
    bearer,
    digest,
    operator_token,
    parse_users,
    role_allows,
)


# --- the users file -------------------------------------------------------------------------
def test_users_file_is_versioned_and_its_check_names_the_bad_field(tmp_path):
    store = UserStore(tmp_path)
    store.add("alice", "read")
    doc = json.loads(open(store.path).read())
    assert doc["format"] == 1 and doc["users"][0]["name"] == "alice"
    cases = {
        "format": {**doc, "format": 2},
        "users": {**doc, "users": {}},
        "users[0].role": {**doc, "users": [{**doc["users"][0], "role": "root"}]},
        "users[0].token_sha256": {**doc, "users": [{**doc["users"][0], "token_sha256": "abc"}]},
        "users[0].name": {**doc, "users": [{**doc["users"][0], "name": "a b"}]},
        "users[1].name": {**doc, "users": [doc["users"][0], {**doc["users"][0], "token_sha256": "0" * 64}]},
    }
    for field, bad in cases.items():
        with pytest.raises(WrongFolder, match=r"format 2" if field == "format" else rf"field '{field}'".replace("[", r"\[")):
            parse_users(json.dumps(bad).encode(), "users.json")
    with pytest.raises(WrongFolder, match="format"):
        parse_users(json.dumps({"users": []}).encode(), "users.json")
    with pytest.raises(WrongFolder, match="not JSON"):
        parse_users(b"{", "users.json")


def test_roles_allow_what_the_issue_says():
    read = {"Get", "GetMany", "Scan", "View", "Status", "StatusOf"}
    for rpc in read | {"Write", "ReplaceNode", "MembershipStatus", "SomeFutureRpc"}:
        assert role_allows("read", rpc) == (rpc in read), rpc
        assert role_allows("write", rpc) == (rpc in read | {"Write"}), rpc
        assert role_allows("admin", rpc), rpc


def test_the_check_reloads_a_changed_file_and_drops_its_cache(tmp_path):
    store = UserStore(tmp_path)
    t_alice, t_bob = store.add("alice", "write"), store.add("bob", "read")
    auth = Authenticator(store.path)
    assert auth.admit("peer1", bearer(t_alice), "Write").name == "alice"
    assert auth.admit("peer1", bearer(t_bob), "Get").name == "bob"
    with pytest.raises(PermissionDenied):
        auth.admit("peer1", bearer(t_bob), "Write")
    store.remove("alice")
    with pytest.raises(Unauthenticated):  # cached for peer1 a moment ago; gone on the next call
        auth.admit("peer1", bearer(t_alice), "Write")
    assert auth.admit("peer1", bearer(t_bob), "Get").name == "bob"
    with pytest.raises(Unauthenticated):
        auth.admit("peer1", (), "Get")
    assert auth.counters()["refused_unauthenticated"] == 2 and auth.counters()["refused_permission"] == 1


def test_users_and_token_files_are_0600_and_the_operator_token_is_kept(tmp_path):
    store = UserStore(tmp_path)
    assert store.ensure_operator() is True
    token = operator_token(tmp_path)
    assert store.ensure_operator() is False and operator_token(tmp_path) == token, "a second `cluster up` keeps it"
    for name in ("users.json", OPERATOR_TOKEN_FILE):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o600, name
    (u,) = store.users()
    assert (u.name, u.role, u.token_sha256) == (OPERATOR, "admin", digest(token))
    store.remove(OPERATOR)  # the operator's user removed: the next `cluster up` makes a new token
    assert store.ensure_operator() is True and operator_token(tmp_path) != token
    with pytest.raises(InvalidArgument):
        store.add(OPERATOR, "read")


# --- the manifest ---------------------------------------------------------------------------
def test_manifest_users_file_field_old_manifests_mean_auth_on(tmp_path):
    m = new_manifest(base_port=7400)
    assert users_file(validate_manifest(m), str(tmp_path)) == str(tmp_path / "users.json")
    old = {k: v for k, v in m.items() if k != "users_file"}  # written before the field existed
    assert users_file(validate_manifest(old), str(tmp_path)) == str(tmp_path / "users.json")
    assert users_file(validate_manifest({**m, "users_file": None}), str(tmp_path)) is None
    for bad in (7, "", "/etc/users.json"):
        with pytest.raises(WrongFolder, match="users_file"):
            validate_manifest({**m, "users_file": bad})


# --- the audit log --------------------------------------------------------------------------
class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_refusals_are_one_line_then_a_summary_per_identity_and_second(tmp_path):
    clock = Clock(1000.0)
    log = audit.AuditLog(tmp_path / "logs" / "audit.jsonl", clock=clock)
    for i in range(500):
        clock.t = 1000.0 + i / 1000  # 500 refusals within second 1000
        log.refused("mallory", "Write", target="kv", result="PermissionDenied")
        log.refused("anonymous", "Get", target="kv", result="Unauthenticated")
    clock.t = 1001.2
    log.refused("mallory", "Write", target="kv", result="PermissionDenied")  # writes the summary of second 1000 first
    log.record("user add", identity="local:op", target="bob")
    log.close()
    lines = audit.tail(log.path, 100)
    by = {who: [e for e in lines if e["identity"] == who] for who in ("mallory", "anonymous")}
    assert [e["count"] for e in by["mallory"]] == [1, 499, 1] and by["mallory"][1]["summary"] is True
    assert by["mallory"][1]["second"] == "1970-01-01T00:16:40.000Z"
    assert [e["count"] for e in by["anonymous"]] == [1, 499]
    assert lines[-1]["action"] == "user add"
    assert stat.S_IMODE(os.stat(log.path).st_mode) == 0o600


WRITER_SCRIPT = """
import sys
from engine.security.audit import AuditLog
log = AuditLog(sys.argv[1])
for i in range(int(sys.argv[3])):
    log.record("test", identity=sys.argv[2], target=str(i), padding="x" * 3000)
"""


def test_lines_of_concurrent_processes_never_interleave(tmp_path):
    path = tmp_path / "audit.jsonl"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER_SCRIPT, str(path), f"p{i}", "300"], env=engine_env())
             for i in range(4)]
    for p in procs:
        assert p.wait(timeout=120) == 0
    with open(path) as fh:
        lines = [json.loads(line) for line in fh]  # a torn line would not parse
    for i in range(4):
        assert [e["target"] for e in lines if e["identity"] == f"p{i}"] == [str(n) for n in range(300)]
    assert len(lines) == 1200


def test_audit_tail_reads_the_end(tmp_path):
    log = audit.AuditLog(tmp_path / "a.jsonl")
    for i in range(1000):
        log.record("a", identity="x", target=str(i))
    assert [e["target"] for e in audit.tail(log.path, 3)] == ["997", "998", "999"]
    assert audit.tail(log.path, 0) == [] and audit.tail(tmp_path / "none.jsonl", 5) == []


def test_a_no_auth_manifest_turns_the_token_check_off_and_validates(tmp_path):
    from engine.cluster.manifest import endpoint_config, load_manifest, new_manifest, save_manifest

    m = new_manifest(base_port=17400, tokens=False)
    assert m["users_file"] is None
    save_manifest(str(tmp_path), m)
    assert endpoint_config(load_manifest(str(tmp_path)), str(tmp_path)).users_file is None
    m = new_manifest(base_port=17400)
    assert endpoint_config(m, str(tmp_path)).users_file == os.path.join(str(tmp_path), "users.json")
