"""Start and kill etcd members on loopback for a benchmark.

Each member gets its own data folder, client port and peer port, and runs with etcd's defaults
for durability (WAL fsync before a member acknowledges an entry; `--unsafe-no-fsync` is never
passed), heartbeats and elections. Readiness is a linearizable Range answered by every member
(it needs an elected leader). `kill()` SIGKILLs every process this object started, by pid, and
waits for each; call it in a `finally`.

With `tls` (`bench/etcd/tls.py`) every member serves its client and peer URLs over https with
client certificates required (etcd's --cert-file, --key-file, --trusted-ca-file,
--client-cert-auth and their --peer-* twins); readiness, /metrics and the benchmark's clients
then use the client certificate (`channel`).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import urllib.request
import uuid

import grpc

READY_TIMEOUT_S = 30.0
READY_POLL_S = 0.1
KILL_WAIT_S = 5.0
HOST = "127.0.0.1"
PORT_SEARCH_FROM = 23790
PORT_SEARCH_BLOCKS_MAX = 200
INSTALL_HINT = ("etcd is not installed. On Debian/Ubuntu: `sudo apt-get update && sudo apt-get install -y "
                "etcd-server` (etcd 3.4), or put an etcd release binary on PATH.")


def etcd_binary() -> str | None:
    return shutil.which("etcd")


def etcd_version(binary: str) -> str:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    first = out.splitlines()[0] if out else "?"
    return first.replace("etcd Version:", "").strip()


def _port_free(port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def free_ports(count: int, start: int = PORT_SEARCH_FROM) -> list[int]:
    for block in range(PORT_SEARCH_BLOCKS_MAX):
        p = start + block * (count + 4)
        if all(_port_free(p + i) for i in range(count)):
            return [p + i for i in range(count)]
    raise RuntimeError(f"no block of {count} free ports at or above {start}")


class Etcd:
    """`members` etcd processes forming one cluster under `root`."""

    def __init__(self, binary: str, root: str, members: int, stubs, tls=None) -> None:
        assert members in (1, 3, 5), members
        self.tls = tls
        self.scheme = "https" if tls is not None else "http"
        self.binary = binary
        self.root = root
        self.members = members
        self.stubs = stubs
        ports = free_ports(2 * members)
        self.names = [f"m{i + 1}" for i in range(members)]
        self.client_ports = ports[:members]
        self.peer_ports = ports[members:]
        self.procs: list[subprocess.Popen] = []

    @property
    def client_addresses(self) -> list[str]:
        return [f"{HOST}:{p}" for p in self.client_ports]

    def channel(self, address: str, options=None) -> grpc.Channel:
        """A gRPC channel to a member: plaintext, or TLS with the client certificate."""
        if self.tls is None:
            return grpc.insecure_channel(address, options=options or [])
        return grpc.secure_channel(address, self.tls.channel_credentials(), options=options or [])

    def _argv(self, i: int, token: str) -> list[str]:
        u = self.scheme
        cluster = ",".join(f"{n}={u}://{HOST}:{p}" for n, p in zip(self.names, self.peer_ports))
        return [
            self.binary, "--name", self.names[i], "--data-dir", os.path.join(self.root, self.names[i] + ".etcd"),
            "--listen-client-urls", f"{u}://{HOST}:{self.client_ports[i]}",
            "--advertise-client-urls", f"{u}://{HOST}:{self.client_ports[i]}",
            "--listen-peer-urls", f"{u}://{HOST}:{self.peer_ports[i]}",
            "--initial-advertise-peer-urls", f"{u}://{HOST}:{self.peer_ports[i]}",
            "--initial-cluster", cluster, "--initial-cluster-state", "new", "--initial-cluster-token", token,
            "--logger", "zap", "--log-outputs", "stderr", "--log-level", "warn",
        ] + (self.tls.member_flags() if self.tls is not None else [])

    def start(self) -> None:
        os.makedirs(self.root, exist_ok=True)
        token = "bench-" + uuid.uuid4().hex[:12]
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}  # no stray ETCD_* settings
        for i in range(self.members):
            log = open(os.path.join(self.root, self.names[i] + ".log"), "ab")
            try:
                self.procs.append(subprocess.Popen(self._argv(i, token), stdin=subprocess.DEVNULL, stdout=log,
                                                   stderr=subprocess.STDOUT, env=env, start_new_session=True))
            finally:
                log.close()
        self._wait_ready()

    def _log_tail(self, i: int, lines: int = 15) -> str:
        try:
            with open(os.path.join(self.root, self.names[i] + ".log"), "rb") as fh:
                return "\n".join(fh.read().decode(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        pending = set(range(self.members))
        channels = [self.channel(a) for a in self.client_addresses]
        try:
            while pending:
                for i in sorted(pending):
                    if self.procs[i].poll() is not None:
                        raise RuntimeError(f"etcd {self.names[i]} exited with {self.procs[i].returncode}:\n{self._log_tail(i)}")
                    try:
                        self.stubs.grpc.KVStub(channels[i]).Range(self.stubs.pb2.RangeRequest(key=b"ready"), timeout=1.0)
                        pending.discard(i)
                    except grpc.RpcError:
                        pass
                if pending and time.monotonic() > deadline:
                    i = min(pending)
                    raise RuntimeError(f"etcd {self.names[i]} not ready in {READY_TIMEOUT_S:g} s:\n{self._log_tail(i)}")
                if pending:
                    time.sleep(READY_POLL_S)
        finally:
            for ch in channels:
                ch.close()

    def leader_index(self) -> int | None:
        """The member that reports itself leader on its /metrics page (None if none does)."""
        for i, port in enumerate(self.client_ports):
            try:
                ctx = self.tls.ssl_context() if self.tls is not None else None
                with urllib.request.urlopen(f"{self.scheme}://{HOST}:{port}/metrics", timeout=2.0, context=ctx) as r:
                    text = r.read().decode()
            except OSError:
                continue
            if "\netcd_server_is_leader 1" in text:
                return i
        return None

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.kill(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            try:
                p.wait(timeout=KILL_WAIT_S)
            except subprocess.TimeoutExpired:
                pass
