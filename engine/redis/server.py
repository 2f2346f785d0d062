"""The Redis-compatible endpoint: a TCP server speaking RESP2/RESP3 over a Sixfold `Database`.

Theory of operation
-------------------
One thread per connection (bounded by `clients_max`) reads what the socket has, feeds it to a
`hiredis.Reader` (the parser: no hand-written RESP parsing), takes every complete command,
runs them in order and writes all their replies in one `sendall`. Pipelining is therefore
free, and more: a run of consecutive plain `SET key value` in one read goes to the engine as
one atomic batch (one group commit for the whole run; each is answered OK once the batch is
durable, which is a stronger promise than Redis's own, never a weaker one), and a run of plain
`GET key` as one `get_many` (one read point, one batched read per node).

Every write is answered only once the engine's put returned: durable on 4 of 6 segments.
Reads go through the database given: the writer (embedded, or `engine.connect(folder)`), so a
`SET` then a `GET` on one connection sees the `SET`; a server given a reader database
(`engine.connect(folder, role="reader")`) answers reads from reader instances and refuses
writes (`READONLY`), which is the separate read-only port.

AUTH: with an `Authenticator` (the cluster's users file, `engine.security.users`), a
connection must `AUTH` (or `HELLO 3 AUTH user token`) with a Sixfold token before anything but
`AUTH`, `HELLO`, `PING` and `QUIT`; the token's role decides (a `read` user gets `NOPERM` for
writes). The server itself talks to the cluster with its own token (the operator's).

Hostile input: a request larger than `request_bytes_max` (a value of 1 MiB plus room), a
protocol error, or more connections than `clients_max` close the connection with an error
reply; a command's bad argument is an error reply, never a crash of the connection.
"""

from __future__ import annotations

import logging
import os
import socket
import socketserver
import threading

from engine.core.conditions import unchanged
from engine.errors import InvalidArgument, SixfoldError, Unauthenticated
from engine.redis import commands as C
from engine.redis.resp import NULL_ARRAY, OK, PONG, QUEUED, Error, Simple, Verbatim, encode

log = logging.getLogger("sixfold.redis")

#: the largest request a connection may send (one command: a 1 MiB value and its key, with room)
REQUEST_BYTES_MAX = 4 << 20
CLIENTS_MAX = 1_024
RECV_BYTES = 256 << 10
#: commands queued in one MULTI, and keys WATCHed by one connection
QUEUED_MAX = 10_000
WATCHED_MAX = 10_000

try:
    import hiredis
except ImportError:  # pragma: no cover - a clear error when the endpoint is started without it
    hiredis = None


class Session:
    """One connection's state: protocol, identity, MULTI queue, WATCHed keys."""

    def __init__(self, server: RedisServer, conn_id: int) -> None:
        self.server = server
        self.db = server.db
        self.id = conn_id
        self.proto = 2
        self.name = b""
        self.identity = None if server.authenticator is not None else "default"
        self.multi: list | None = None
        self.multi_error = False
        self.watched: dict[bytes, int] = {}
        self.closing = False

    # --- dispatch ---------------------------------------------------------------------------
    def execute(self, argv: list) -> object:
        """One command's reply (never raises for a command's own failure)."""
        if not argv or not isinstance(argv, list) or not all(isinstance(a, bytes) for a in argv):
            return Error("ERR Protocol error: expected an array of bulk strings")
        name = argv[0].lower()
        args = argv[1:]
        spec = C.TXN_COMMANDS.get(name)
        session = C.SESSION_COMMANDS.get(name)
        if spec is None and session is None:
            if self.multi is not None:
                self.multi_error = True
            return Error(C.unknown_command(argv))
        arity = spec.arity if spec is not None else session[0]
        if not C.arity_ok(arity, len(argv)):
            if self.multi is not None:
                self.multi_error = True
            return Error(C.wrong_arity(name))
        if self.identity is None and name not in C.BEFORE_AUTH:
            return Error("NOAUTH Authentication required.")
        if spec is not None and spec.writes and not self._may_write():
            return Error(f"NOPERM User {self.identity.name} has no permissions to run the '{name.decode()}' command")
        if self.multi is not None and name not in C.NOT_QUEUED:
            if len(self.multi) >= QUEUED_MAX:
                self.multi_error = True
                return Error(f"ERR a MULTI holds at most {QUEUED_MAX} commands here")
            self.multi.append((name, args))
            return QUEUED
        try:
            if spec is not None:
                return self._run(name, args)
            return getattr(self, "cmd_" + name.decode())(args)
        except C.CommandError as e:
            return Error(e.text)
        except C.WatchFailed:
            return NULL_ARRAY
        except SixfoldError as e:
            return C.error_reply(e)

    def _may_write(self) -> bool:
        ident = self.identity
        if ident is None or ident == "default":
            return True
        from engine.security.users import role_allows

        return role_allows(ident.role, "Write")

    def _run(self, name: bytes, args: list):
        """A Txn command outside MULTI; the plain forms that need no Txn go straight."""
        db = self.db
        if name == b"get":
            return db.get(C.check_key(args[0]))
        if name == b"set" and len(args) == 2:
            db.put(C.check_key(args[0]), args[1])
            return OK
        if name == b"mget":
            return db.get_many([C.check_key(k) for k in args])
        handler = C.TXN_COMMANDS[name].handler
        return C.run_txn(db, [lambda t: handler(t, args)])[0]

    # --- pipelines ----------------------------------------------------------------------------
    def execute_all(self, commands: list) -> list:
        """Replies to commands read together, in order; runs of plain SETs and GETs are batched."""
        out = []
        i, n = 0, len(commands)
        while i < n:
            argv = commands[i]
            kind = self._batchable(argv)
            if kind is None:
                out.append(self.execute(argv))
                i += 1
                continue
            j = i + 1
            while j < n and self._batchable(commands[j]) == kind:
                j += 1
            if j - i == 1:
                out.append(self.execute(argv))
            else:
                out.extend(self._batch(kind, commands[i:j]))
            i = j
        return out

    def _batchable(self, argv) -> str | None:
        if self.multi is not None or self.identity is None or not isinstance(argv, list) or not argv:
            return None
        if len(argv) == 3 and isinstance(argv[0], bytes) and argv[0].lower() == b"set" and self._may_write():
            return "set"
        if len(argv) == 2 and isinstance(argv[0], bytes) and argv[0].lower() == b"get":
            return "get"
        return None

    def _batch(self, kind: str, run: list) -> list:
        keys = [argv[1] for argv in run]
        if not all(isinstance(k, bytes) and 1 <= len(k) <= C.KEY_BYTES_MAX for k in keys) \
                or not all(isinstance(argv[-1], bytes) for argv in run):
            return [self.execute(argv) for argv in run]  # each gets its own answer
        try:
            if kind == "get":
                return self.db.get_many(keys)
            with self.db.batch() as b:
                for argv in run:
                    b.put(argv[1], argv[2])
            return [OK] * len(run)
        except InvalidArgument:  # refused before anything was logged: each gets its own answer
            return [self.execute(argv) for argv in run]
        except SixfoldError as e:
            return [C.error_reply(e)] * len(run)

    # --- connection ---------------------------------------------------------------------------
    def cmd_ping(self, args):
        if len(args) > 1:
            raise C.CommandError(C.wrong_arity(b"ping"))
        if args:
            return args[0]
        return PONG

    def cmd_echo(self, args):
        return args[0]

    def cmd_quit(self, args):
        self.closing = True
        return OK

    def cmd_select(self, args):
        if C.parse_int(args[0]) != 0:
            raise C.CommandError("ERR DB index is out of range")
        return OK

    def cmd_reset(self, args):
        self.multi, self.multi_error, self.watched, self.proto = None, False, {}, 2
        if self.server.authenticator is not None:
            self.identity = None
        return Simple("RESET")

    def _auth(self, user: bytes | None, token: bytes):
        auth = self.server.authenticator
        if auth is None:
            raise C.CommandError(
                "ERR AUTH <password> called without any password configured for the default user. "
                "Are you sure your configuration is correct?")
        try:
            ident = auth.authenticate(self.server.peer_of(self), token.decode("utf-8", "replace"))
        except Unauthenticated:
            raise C.CommandError("WRONGPASS invalid username-password pair or user is disabled.") from None
        if user not in (None, b"default") and user.decode("utf-8", "replace") != ident.name:
            raise C.CommandError("WRONGPASS invalid username-password pair or user is disabled.")
        self.identity = ident

    def cmd_auth(self, args):
        if len(args) > 2:
            raise C.CommandError(C.SYNTAX)
        self._auth(args[0] if len(args) == 2 else None, args[-1])
        return OK

    def cmd_hello(self, args):
        proto = self.proto
        i = 0
        if args:
            try:
                proto = C.parse_int(args[0])
            except C.CommandError:
                raise C.CommandError("ERR Protocol version is not an integer or out of range") from None
            if proto not in (2, 3):
                raise C.CommandError("NOPROTO unsupported protocol version")
            i = 1
        while i < len(args):
            opt = args[i].upper()
            if opt == b"AUTH" and i + 2 < len(args):
                self._auth(args[i + 1], args[i + 2])
                i += 3
            elif opt == b"SETNAME" and i + 1 < len(args):
                self.name = args[i + 1]
                i += 2
            else:
                raise C.CommandError(f"ERR Syntax error in HELLO option '{args[i].decode('utf-8', 'replace')}'")
        if self.identity is None:
            return Error("NOAUTH HELLO must be called with the client already authenticated, otherwise the "
                         "HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and "
                         "select the RESP protocol version at the same time")
        self.proto = proto
        return {"server": "redis", "version": C.REDIS_VERSION, "proto": proto, "id": self.id, "mode": "standalone",
                "role": "master", "modules": []}

    def cmd_client(self, args):
        sub = args[0].upper()
        if sub == b"SETNAME" and len(args) == 2:
            self.name = args[1]
            return OK
        if sub == b"GETNAME" and len(args) == 1:
            return self.name or None
        if sub == b"ID" and len(args) == 1:
            return self.id
        if sub == b"SETINFO" and len(args) == 3:
            return OK
        raise C.CommandError(f"ERR unknown subcommand or wrong number of arguments for '{args[0].decode('utf-8', 'replace')}'. Try CLIENT HELP.")

    def cmd_config(self, args):
        if args[0].upper() == b"GET":
            return {} if self.proto == 3 else []  # no Redis configuration here (redis-benchmark asks)
        raise C.CommandError("ERR CONFIG is not supported by the Sixfold endpoint except CONFIG GET (which has nothing)")

    def cmd_command(self, args):
        names = list(C.TXN_COMMANDS) + list(C.SESSION_COMMANDS)
        if not args:
            return [C.command_info(n) for n in names]
        sub = args[0].upper()
        if sub == b"COUNT":
            return len(names)
        if sub == b"INFO":
            return [C.command_info(n.lower()) for n in args[1:]]
        if sub == b"DOCS":
            return {} if self.proto == 3 else []
        if sub == b"LIST":
            return [n for n in names]
        raise C.CommandError(f"ERR unknown subcommand '{args[0].decode('utf-8', 'replace')}'. Try COMMAND HELP.")

    # --- transactions -------------------------------------------------------------------------
    def cmd_multi(self, args):
        if self.multi is not None:
            raise C.CommandError("ERR MULTI calls can not be nested")
        self.multi, self.multi_error = [], False
        return OK

    def cmd_discard(self, args):
        if self.multi is None:
            raise C.CommandError("ERR DISCARD without MULTI")
        self.multi, self.multi_error, self.watched = None, False, {}
        return OK

    def cmd_watch(self, args):
        if self.multi is not None:
            raise C.CommandError("ERR WATCH inside MULTI is not allowed")
        if len(self.watched) + len(args) > WATCHED_MAX:
            raise C.CommandError(f"ERR a connection watches at most {WATCHED_MAX} keys here")
        point = self.db.read_point()
        for key in args:
            self.watched.setdefault(C.check_key(key), point)
        return OK

    def cmd_unwatch(self, args):
        self.watched = {}
        return OK

    def cmd_exec(self, args):
        if self.multi is None:
            raise C.CommandError("ERR EXEC without MULTI")
        queued, failed, watched = self.multi, self.multi_error, self.watched
        self.multi, self.multi_error, self.watched = None, False, {}
        if failed:
            raise C.CommandError("EXECABORT Transaction discarded because of previous errors.")
        handlers = []
        session_replies = {}
        for i, (name, qargs) in enumerate(queued):
            spec = C.TXN_COMMANDS.get(name)
            if spec is None:  # a session command queued (PING, INFO...): answered in its place
                session_replies[i] = self.execute([name] + qargs)
                continue
            handlers.append((i, lambda t, h=spec.handler, a=qargs: h(t, a)))
        extra = [unchanged(k, p) for k, p in watched.items()]
        if handlers:
            replies = C.run_txn(self.db, [h for _i, h in handlers], extra)
        else:
            replies = []
            if extra:  # only session commands: the watch still decides (a batch that writes nothing)
                self._check_watch(watched)
        out: list = [None] * len(queued)
        for (i, _h), r in zip(handlers, replies):
            out[i] = r
        for i, r in session_replies.items():
            out[i] = r
        return out

    def _check_watch(self, watched: dict[bytes, int]) -> None:
        for key, point in watched.items():
            v = self.db.version(key)
            if v is not None and v.lsn > point:
                raise C.WatchFailed()

    # --- the keyspace -------------------------------------------------------------------------
    def cmd_scan(self, args):
        return C.scan(self.db, self.server.cursors, args)

    def cmd_dbsize(self, args):
        return C.dbsize(self.db)

    def cmd_info(self, args):
        if len(args) > 1:
            raise C.CommandError(C.SYNTAX)
        section = args[0].decode("utf-8", "replace").lower() if args else None
        replicas = None
        if self.server.replicas is not None and section in (None, "all", "everything", "default", "replication", "sixfold"):
            try:
                replicas = self.server.replicas()
            except SixfoldError as e:  # INFO still answers: the facts it could not get say why
                log.warning("INFO could not ask the reader instances: %s", e)
                replicas = [{"id": "?", "error": str(e)}]
        text = C.info_text(self.db, section, {"pid": os.getpid(), "port": self.server.port, "clients": self.server.clients,
                                              "replicas": replicas, "read_only": self.server.read_only})
        return Verbatim(text)


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.server.owner.serve_connection(self.request, self.client_address)


class _TCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


class RedisServer:
    """A RESP endpoint over `db` on host:port (port 0: any free port; see `.port`)."""

    def __init__(self, db, host: str = "127.0.0.1", port: int = 6380, *, authenticator=None,
                 clients_max: int = CLIENTS_MAX, request_bytes_max: int = REQUEST_BYTES_MAX,
                 replicas=None, read_only: bool = False) -> None:
        if hiredis is None:
            raise SixfoldError("the Redis endpoint needs the hiredis package (pip install 'sixfold[redis]')")
        self.db = db
        self.authenticator = authenticator
        #: INFO's replication facts: `replicas()` lists what each reader instance says of itself
        #: (`engine.client.reader_statuses`); `read_only` marks the port served by the readers
        self.replicas = replicas
        self.read_only = read_only
        self.clients_max = clients_max
        self.request_bytes_max = request_bytes_max
        self.cursors = C.Cursors()
        self._lock = threading.Lock()
        self.clients = 0
        self._next_id = 1
        self._peers: dict[int, str] = {}
        self.stats = {"connections": 0, "commands": 0, "refused_connections": 0, "protocol_errors": 0}
        self._tcp = _TCPServer((host, port), _Handler)
        self._tcp.owner = self
        self.host, self.port = self._tcp.server_address[:2]
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> RedisServer:
        self._thread = threading.Thread(target=self._tcp.serve_forever, name=f"redis:{self.port}", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._tcp.serve_forever()

    def stop(self) -> None:
        self._tcp.shutdown()
        self._tcp.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def peer_of(self, session: Session) -> str:
        return self._peers.get(session.id, "redis")

    def serve_connection(self, sock: socket.socket, address) -> None:
        with self._lock:
            if self.clients >= self.clients_max:
                self.stats["refused_connections"] += 1
                refuse = True
            else:
                refuse = False
                self.clients += 1
                self.stats["connections"] += 1
                conn_id = self._next_id
                self._next_id += 1
        if refuse:
            try:
                sock.sendall(b"-ERR max number of clients reached\r\n")
            finally:
                sock.close()
            return
        self._peers[conn_id] = f"redis:{address[0]}:{address[1]}" if isinstance(address, tuple) else "redis"
        try:
            self._loop(sock, Session(self, conn_id))
        except OSError:
            pass  # the client went away
        finally:
            self._peers.pop(conn_id, None)
            with self._lock:
                self.clients -= 1
            try:
                sock.close()
            except OSError:
                pass

    def _loop(self, sock: socket.socket, session: Session) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = hiredis.Reader()
        pending = 0  # bytes fed since the last whole command (a bound on one request's size)
        while not session.closing:
            data = sock.recv(RECV_BYTES)
            if not data:
                return
            commands = []
            # An inline command (telnet): a line that does not start an array, with nothing of a
            # RESP request buffered before it (a request split across reads continues mid-way).
            while data and data[:1] != b"*" and not reader.has_data():
                line, nl, rest = data.partition(b"\n")
                if not nl:
                    break  # half a line: hiredis gets it, and says it is not RESP
                words = line.strip().split()
                if words:
                    commands.append(words)
                data = rest
            reader.feed(data)
            pending += len(data)
            try:
                while True:
                    req = reader.gets()
                    if req is False:
                        break
                    commands.append(req)
                    pending = 0  # what is left buffered is less than one read
            except hiredis.ProtocolError as e:
                self.stats["protocol_errors"] += 1
                replies = session.execute_all([c for c in commands if c]) if commands else []
                sock.sendall(b"".join(encode(r, session.proto) for r in replies)
                             + encode(Error(f"ERR Protocol error: {e}"), session.proto))
                return
            if pending > self.request_bytes_max:
                sock.sendall(encode(Error(f"ERR Protocol error: a request of more than {self.request_bytes_max} bytes"), session.proto))
                return
            if not commands:
                continue
            self.stats["commands"] += len(commands)
            replies = session.execute_all([c for c in commands if c])
            out = []
            for r in replies:
                out.append(encode(r, session.proto))
            sock.sendall(b"".join(out))
