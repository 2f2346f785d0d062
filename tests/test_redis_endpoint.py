"""The Redis-compatible endpoint (issue 14, items 4 and 6) driven by real clients: redis-py for
every command, error shapes, pipelining and MULTI/EXEC/WATCH; redis-cli where it is installed
(the test skips, saying so, where it is not); and a live cluster whose writer and a node are
killed under a Redis-client load, with nothing acknowledged lost."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time

import pytest
from waiting import eventually

redis = pytest.importorskip("redis", reason="redis-py is not installed (pip install -e '.[test]')")
pytest.importorskip("hiredis", reason="hiredis is not installed (pip install -e '.[test]')")

import engine  # noqa: E402
from engine.redis import RedisServer  # noqa: E402
from engine.security.users import Authenticator, UserStore  # noqa: E402

REDIS_CLI = shutil.which("redis-cli")
needs_cli = pytest.mark.skipif(REDIS_CLI is None, reason="redis-cli is absent: apt-get install -y redis-tools")


@pytest.fixture
def server(db):
    s = RedisServer(db, port=0).start()
    try:
        yield s
    finally:
        s.stop()


class Raw:
    """One connection that sends commands and parses replies with hiredis, as they come (no
    client library between: the exact reply shapes)."""

    def __init__(self, port: int) -> None:
        import hiredis

        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.reader = hiredis.Reader(replyError=lambda m: ("error", m))

    def __call__(self, *args):
        parts = [a if isinstance(a, bytes) else str(a).encode() for a in args]
        self.sock.sendall(b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts))
        while (reply := self.reader.gets()) is False:
            self.reader.feed(self.sock.recv(1 << 16))
        return reply

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw(server):
    c = Raw(server.port)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def r(server):
    c = redis.Redis(port=server.port, socket_timeout=30)
    try:
        yield c
    finally:
        c.close()


def test_ping_echo_select_and_quit(r, raw, server):
    assert r.ping() is True and r.echo("hi") == b"hi"
    assert raw("PING") == b"PONG" and raw("PING", "x") == b"x"
    assert raw("SELECT", 0) == b"OK" and raw("SELECT", 1) == ("error", "ERR DB index is out of range")
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"*1\r\n$4\r\nQUIT\r\n")
        assert s.recv(100) == b"+OK\r\n" and s.recv(100) == b"", "QUIT answers OK, then closes"


def test_set_and_get_with_every_option(r, db):
    assert r.set("k", "v") is True and r.get("k") == b"v" and db.get(b"k") == b"v"
    assert r.set("k", "w", nx=True) is None and r.get("k") == b"v"
    assert r.set("new", "n", xx=True) is None and r.get("new") is None
    assert r.set("k", "x", xx=True) is True and r.get("k") == b"x"
    assert r.set("k", "y", get=True) == b"x" and r.set("none", "z", get=True) is None
    assert r.set("k", "y2", nx=True, get=True) == b"y", "NX GET answers the old value and sets nothing"
    assert r.get("k") == b"y"
    assert r.set("e", "1", ex=100) and 99 <= r.ttl("e") <= 100
    assert r.set("p", "1", px=100_000) and 99_000 <= r.pttl("p") <= 100_000
    at = int(time.time()) + 1000
    assert r.set("a", "1", exat=at) and 998 <= r.ttl("a") <= 1000
    assert r.set("pa", "1", pxat=at * 1000) and 998_000 <= r.pttl("pa") <= 1_000_000
    assert r.set("a", "2", keepttl=True) and 998 <= r.ttl("a") <= 1000 and r.get("a") == b"2"
    assert r.set("a", "3") and r.ttl("a") == -1, "a plain SET clears the time to live"
    for bad in (("k", "v", "EX", "0"), ("k", "v", "EX", "x"), ("k", "v", "NX", "XX"), ("k", "v", "EX", "1", "PX", "1"),
                ("k", "v", "KEEPTTL", "EX", "1"), ("k", "v", "BOGUS")):
        with pytest.raises(redis.ResponseError):
            r.execute_command("SET", *bad)
    assert r.get("k") == b"y"


def test_getdel_del_exists_mget_mset(r):
    r.mset({"a": "1", "b": "2", "c": "3"})
    assert r.mget("a", "b", "nope", "c") == [b"1", b"2", None, b"3"]
    assert r.exists("a", "b", "nope", "a") == 3
    assert r.getdel("a") == b"1" and r.get("a") is None and r.getdel("a") is None
    assert r.delete("b", "c", "nope") == 2 and r.exists("b", "c") == 0
    with pytest.raises(redis.ResponseError, match="wrong number of arguments for 'mset'"):
        r.execute_command("MSET", "a", "1", "b")


def test_counters(r):
    assert r.incr("n") == 1 and r.incrby("n", 41) == 42 and r.decr("n") == 41 and r.decrby("n", 40) == 1
    r.set("s", "abc")
    with pytest.raises(redis.ResponseError, match="value is not an integer or out of range"):
        r.incr("s")
    r.set("big", str(2**63 - 1))
    with pytest.raises(redis.ResponseError, match="increment or decrement would overflow"):
        r.incr("big")
    with pytest.raises(redis.ResponseError, match="value is not an integer"):
        r.incrby("n", "1.5")
    r.set("t", "5", ex=1000)
    assert r.incr("t") == 6 and r.ttl("t") > 990, "INCR keeps the time to live"


def test_concurrent_incr_loses_no_increment(server):
    def worker() -> None:
        c = redis.Redis(port=server.port, socket_timeout=60)
        for _ in range(25):
            c.incr("ctr")
        c.close()

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert redis.Redis(port=server.port).get("ctr") == b"100"


def test_expire_ttl_persist_and_expiry(r):
    assert r.ttl("nope") == -2 and r.pttl("nope") == -2 and r.expire("nope", 10) is False
    r.set("k", "v")
    assert r.ttl("k") == -1 and r.persist("k") is False
    assert r.expire("k", 100) is True and 99 <= r.ttl("k") <= 100
    assert r.pexpire("k", 50_000) is True and 49_000 <= r.pttl("k") <= 50_000
    assert r.expire("k", 10, nx=True) is False and r.expire("k", 10, gt=True) is False and r.expire("k", 10, lt=True) is True
    assert r.persist("k") is True and r.ttl("k") == -1
    assert r.expireat("k", int(time.time()) + 500) and 498 <= r.ttl("k") <= 500
    r.set("gone", "v")
    assert r.expire("gone", -1) is True and r.get("gone") is None, "a time in the past deletes the key"
    r.set("short", "v", px=150)
    eventually(lambda: r.get("short") is None, what="the key expired")
    assert r.ttl("short") == -2 and r.exists("short") == 0


@pytest.mark.parametrize("command", [
    ("SET", "k", "v", "PX", str((1 << 63) - 1)), ("SET", "k", "v", "EX", str(5 * 10**12)),
    ("SET", "k", "v", "EXAT", str(10**13)), ("SET", "k", "v", "EX", "0"), ("SET", "k", "v", "PX", "-5"),
    ("EXPIRE", "k", str(5 * 10**12)), ("PEXPIRE", "k", str((1 << 63) - 1)), ("EXPIREAT", "k", str(10**13)),
])
def test_a_time_the_engine_cannot_keep_gets_redis_s_own_error(r, command):
    """The engine keeps a time to live up to 2^62 us and a deadline up to 2^63 - 1 us; past
    those Redis's reply, never the engine's own message, and the key keeps what it had."""
    r.set("k", "kept")
    with pytest.raises(redis.ResponseError, match=rf"^invalid expire time in '{command[0].lower()}' command$"):
        r.execute_command(*command)
    assert r.get("k") == b"kept" and r.ttl("k") == -1


def test_scan_match_count_and_dbsize(r):
    for i in range(30):
        r.set(f"user:{i:02d}", i)
    for i in range(5):
        r.set(f"item:{i}", i)
    assert r.dbsize() == 35
    assert sorted(r.scan_iter(match="user:1*", count=7)) == [f"user:1{i}".encode() for i in range(10)]
    cursor, first = r.scan(0, count=10)
    assert cursor != 0 and len(first) == 10
    seen, cursor = list(first), cursor
    while cursor:
        cursor, keys = r.scan(cursor, count=10)
        seen += keys
    assert sorted(seen) == sorted(r.scan_iter()) and len(seen) == 35
    with pytest.raises(redis.ResponseError, match="invalid cursor"):
        r.scan(987654321)


def test_info_command_and_hello(r, raw, server):
    info = r.info("sixfold")
    assert info["nodes"] == 6 and info["nodes_up"] == 6 and info["vdl"] >= 0 and "epoch" in info
    assert r.info()["redis_version"]
    assert raw("COMMAND", "COUNT") >= 20 and r.command_count() >= 20
    (get,) = raw("COMMAND", "INFO", "get")
    assert get[0] == b"get" and get[1] == 2
    assert {c[0] for c in raw("COMMAND")} >= {b"get", b"set", b"multi", b"scan"}
    hello = r.execute_command("HELLO", "2")
    assert dict(zip(hello[::2], hello[1::2]))[b"proto"] == 2
    r3 = redis.Redis(port=server.port, protocol=3)
    assert r3.set("k", "v") and r3.get("k") == b"v" and r3.get("nope") is None
    assert r3.execute_command("HELLO", 3)[b"proto"] == 3
    with pytest.raises(redis.ResponseError, match="NOPROTO"):
        r.execute_command("HELLO", "4")


def test_unknown_commands_and_wrong_arity_have_redis_error_shapes(server):
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"*3\r\n$3\r\nFOO\r\n$1\r\na\r\n$1\r\nb\r\n*1\r\n$3\r\nGET\r\n*2\r\n$3\r\nGET\r\n$0\r\n\r\n")
        reply = b""
        while reply.count(b"\r\n") < 3:
            reply += s.recv(1000)
    lines = reply.split(b"\r\n")
    assert lines[0] == b"-ERR unknown command 'FOO', with args beginning with: 'a' 'b' "
    assert lines[1] == b"-ERR wrong number of arguments for 'get' command"
    assert lines[2].startswith(b"-ERR invalid key"), "an empty key is not a Sixfold key"


def test_a_protocol_error_or_an_oversized_request_closes_the_connection(server):
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"*1\r\n$x\r\n")
        assert s.recv(1000).startswith(b"-ERR Protocol error")
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$%d\r\n" % (8 << 20))
        try:
            for _ in range(6):
                s.sendall(b"x" * (1 << 20))
        except OSError:
            pass
        assert s.recv(1000).startswith(b"-ERR Protocol error: a request of more than")


def test_pipelining_in_order_with_batched_sets_and_gets(r, db):
    p = r.pipeline(transaction=False)
    for i in range(200):
        p.set(f"k{i}", i)
    p.get("k7")
    p.incr("k7")
    for i in range(200):
        p.get(f"k{i}")
    p.set("", "bad")  # one bad command inside a run gets its own error, the rest their answers
    p.set("after", "ok")
    out = p.execute(raise_on_error=False)
    assert out[:200] == [True] * 200 and out[200:202] == [b"7", 8]
    assert out[202:402] == [str(i).encode() if i != 7 else b"8" for i in range(200)]
    assert isinstance(out[402], redis.ResponseError) and out[403] is True
    assert db.get(b"k199") == b"199" and db.get(b"after") == b"ok"


def test_multi_exec_discard_and_a_conflicting_watch(r, server):
    with r.pipeline() as p:
        p.multi()
        p.set("a", "1").incr("n").get("a").mget("a", "n")
        assert p.execute() == [True, 1, b"1", [b"1", b"1"]]
    other = redis.Redis(port=server.port)
    with r.pipeline() as p:
        p.watch("a")
        assert p.get("a") == b"1"
        other.set("a", "changed")  # another client writes the watched key
        p.multi()
        p.set("a", "mine")
        with pytest.raises(redis.WatchError):
            p.execute()
    assert r.get("a") == b"changed"
    with r.pipeline() as p:
        p.watch("a")
        p.multi()
        p.set("a", "mine")
        assert p.execute() == [True]
    assert r.get("a") == b"mine"
    raw = Raw(server.port)
    assert raw("MULTI") == b"OK" and raw("SET", "d", "1") == b"QUEUED" and raw("MULTI")[0] == "error"
    assert raw("DISCARD") == b"OK" and r.get("d") is None
    assert raw("EXEC") == ("error", "ERR EXEC without MULTI") and raw("DISCARD") == ("error", "ERR DISCARD without MULTI")
    assert raw("MULTI") == b"OK" and raw("NOPE")[0] == "error" and raw("SET", "d", "1") == b"QUEUED"
    assert raw("EXEC") == ("error", "EXECABORT Transaction discarded because of previous errors.")
    assert r.get("d") is None
    assert raw("MULTI") == b"OK" and raw("WATCH", "x") == ("error", "ERR WATCH inside MULTI is not allowed")
    assert raw("PING") == b"QUEUED" and raw("EXEC") == [b"PONG"]
    raw.close()
    r.set("s", "text")
    with r.pipeline() as p:  # a runtime error is its command's reply; the others apply
        p.multi()
        p.incr("s").set("t", "1")
        out = p.execute(raise_on_error=False)
    assert isinstance(out[0], redis.ResponseError) and out[1] is True and r.get("t") == b"1"


def test_auth_with_a_sixfold_token_and_roles(db, tmp_path):
    users = UserStore(tmp_path / "users")
    writer_token, reader_token = users.add("app", "write"), users.add("viewer", "read")
    s = RedisServer(db, port=0, authenticator=Authenticator(users.path)).start()
    try:
        anon = redis.Redis(port=s.port)
        with pytest.raises(redis.AuthenticationError):
            anon.get("k")
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=s.port, password="wrong").get("k")
        app = redis.Redis(port=s.port, password=writer_token)
        assert app.set("k", "v") and app.get("k") == b"v"
        assert redis.Redis(port=s.port, username="app", password=writer_token).get("k") == b"v"
        viewer = redis.Redis(port=s.port, password=reader_token)
        assert viewer.get("k") == b"v"
        with pytest.raises(redis.ResponseError, match="has no permissions to run the 'set' command"):
            viewer.set("k", "w")
        r3 = redis.Redis(port=s.port, protocol=3, username="app", password=writer_token)  # HELLO 3 AUTH
        assert r3.get("k") == b"v"
    finally:
        s.stop()


@needs_cli
def test_redis_cli_runs_every_kind_of_command(server):
    def cli(*args: str, stdin: str | None = None) -> str:
        out = subprocess.run([REDIS_CLI, "-p", str(server.port), *args], input=stdin, capture_output=True, text=True,
                             timeout=60, check=True)
        return out.stdout[:-1] if out.stdout.endswith("\n") else out.stdout

    assert cli("PING") == "PONG"
    assert cli("SET", "k", "v", "EX", "100") == "OK" and cli("GET", "k") == "v"
    assert 99 <= int(cli("TTL", "k")) <= 100
    assert cli("INCR", "n") == "1" and cli("MSET", "a", "1", "b", "2") == "OK"
    assert cli("MGET", "a", "b", "zz") == "1\n2\n", "a nil prints as an empty line, as redis-server's does"
    assert sorted(cli("--scan", "--pattern", "*").splitlines()) == ["a", "b", "k", "n"]
    assert cli("DBSIZE") == "4" and "nodes_up:6" in cli("INFO", "sixfold")
    assert "unknown command" in cli("NOSUCH", "x")
    assert "wrong number of arguments" in cli("GET")
    assert cli(stdin="MULTI\nSET t 1\nINCR t\nEXEC\n").splitlines()[-2:] == ["OK", "2"]
    assert int(cli("COMMAND", "COUNT")) >= 20
    assert "proto" in cli("-3", "HELLO", "3")


# --- a live cluster ------------------------------------------------------------------------------
@pytest.mark.cluster
def test_a_cluster_behind_redis_clients_loses_nothing_acknowledged_when_its_writer_and_a_node_are_killed(tmp_path):
    from engine.cluster import Cluster
    from engine.cluster.testing import free_base_port
    from engine.redis.cli import start_background, stop_background

    c = Cluster(tmp_path / "c")
    port = _free_port()
    try:
        c.up(base_port=free_base_port(), protection_groups=2, timeout_s=60, no_auth=True)
        start_background(c.folder, port)
        acked: dict[bytes, bytes] = {}
        lock = threading.Lock()
        errors: list[str] = []
        stop = threading.Event()

        def client(n: int) -> None:
            cl = redis.Redis(port=port, socket_timeout=30)
            for i in range(400):
                if stop.is_set():
                    break
                key, value = f"c{n}:{i % 20}".encode(), f"{n}-{i}".encode()
                try:
                    cl.set(key, value)
                except (redis.ResponseError, redis.ConnectionError, redis.TimeoutError) as e:
                    errors.append(str(e))  # not acknowledged: it may or may not have applied
                    with lock:
                        acked.pop(key, None)  # the key's last acknowledged value is no longer known
                    continue
                with lock:
                    acked[key] = value

        threads = [threading.Thread(target=client, args=(n,)) for n in range(3)]
        for t in threads:
            t.start()
        eventually(lambda: len(acked) >= 20, timeout_s=60, what="the load is running")
        c.crash_writer()  # SIGKILL the writer endpoint; the cluster starts a new one
        eventually(lambda: len(acked) >= 40, timeout_s=60, what="writes go on after the writer's crash")
        c.stop_node("n3")
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join(timeout=120)
        c.start_node("n3")
        check = redis.Redis(port=port, socket_timeout=30)
        assert check.info("sixfold")["nodes"] == 6
        with lock:
            final = dict(acked)
        lost = {k: v for k, v in final.items() if check.get(k) != v}
        assert not lost, f"acknowledged SETs lost: {lost}"
        assert len(final) >= 40
    finally:
        stop_background(c.folder)
        c.down(timeout_s=10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.cluster
def test_cluster_up_with_a_redis_port_serves_it_and_cluster_down_stops_it(tmp_path, capsys):
    from engine.cli import main
    from engine.cluster.testing import free_base_port
    from engine.redis.cli import ping

    folder, port = str(tmp_path / "c"), _free_port()
    try:
        assert main(["cluster", "up", "--cluster", folder, "--base-port", str(free_base_port()), "--protection-groups", "2",
                     "--redis-port", str(port)]) == 0
        assert f"Redis endpoint (writer) on 127.0.0.1:{port}" in capsys.readouterr().err
        token = open(os.path.join(folder, "operator.token")).read().strip()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port).set("k", "v")  # the cluster checks tokens, so does its Redis endpoint
        c = redis.Redis(port=port, password=token)
        assert c.set("k", "v") and c.get("k") == b"v"
        with engine.connect(folder) as db:
            assert db.get(b"k") == b"v", "the Redis endpoint writes the cluster's keys"
    finally:
        main(["cluster", "down", "--cluster", folder])
    assert not ping("127.0.0.1", port)


@pytest.mark.cluster
def test_the_read_only_port_reads_from_the_readers_and_refuses_writes(tmp_path):
    from engine.cluster import Cluster
    from engine.cluster.manifest import active_readers, load_manifest
    from engine.cluster.testing import free_base_port
    from engine.redis.cli import start_background, stop_background

    c = Cluster(tmp_path / "c")
    main_port, read_port = _free_port(), _free_port()
    try:
        c.up(base_port=free_base_port(), protection_groups=2, timeout_s=60, no_auth=True, readers=1)
        start_background(c.folder, main_port)
        start_background(c.folder, read_port, reader=True)
        w, r = redis.Redis(port=main_port), redis.Redis(port=read_port)
        assert w.set("k", "v", ex=100) and w.get("k") == b"v"
        eventually(lambda: r.get("k") == b"v", what="the reader caught up")
        assert 90 < r.ttl("k") <= 100
        with pytest.raises(redis.exceptions.ReadOnlyError):  # redis-py's class for the READONLY code
            r.set("k", "w")
        assert w.get("k") == b"v"
        # INFO names the reader as a replica, with its own lag (it was always 0 readers before).
        (reader,) = active_readers(load_manifest(c.folder))
        main_info = w.info("replication")
        assert main_info["role"] == "master" and main_info["connected_slaves"] == 1, main_info
        assert main_info["slave0"]["state"] == "online" and main_info["slave0"]["id"] == reader["id"], main_info
        assert main_info["slave0"]["port"] == int(reader["address"].rpartition(":")[2])
        eventually(lambda: w.info("sixfold")["readers_answering"] == 1 and w.info("sixfold")["replica_lag_lsns_max"] == 0,
                   what="the reader's lag, as it says, to reach 0 once writes stop")
        assert w.info("sixfold")["readers"] == 1
        read_info = r.info("replication")
        assert read_info["role"] == "slave" and read_info["master_link_status"] == "up", read_info
        assert read_info["slave_repl_offset"] >= main_info["slave0"]["offset"] > 0
    finally:
        stop_background(c.folder)
        c.down(timeout_s=10)


def test_a_request_split_across_reads_and_inline_commands(server):
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        for part in (b"*3\r\n$3\r\nSET\r\n$1", b"\r\nk\r\n$1\r", b"\nv\r\n"):
            s.sendall(part)
            time.sleep(0.05)  # each part arrives in a read of its own
        assert s.recv(100) == b"+OK\r\n"
        s.sendall(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n*1\r\n$4\r")  # a whole GET, then half a PING
        time.sleep(0.05)
        s.sendall(b"\nPING\r\n")  # the rest of the PING: a continuation, not an inline command
        reply = b""
        while not reply.endswith(b"+PONG\r\n"):
            reply += s.recv(100)
        assert reply == b"$1\r\nv\r\n+PONG\r\n"
        s.sendall(b"PING\r\nECHO hi\r\n")  # inline commands, as telnet sends them
        reply = b""
        while reply.count(b"\r\n") < 3:
            reply += s.recv(100)
        assert reply == b"+PONG\r\n$2\r\nhi\r\n"
