"""Helpers for tests and benchmarks that run real processes: free ports, health waits.

Kept in the package (not in tests/) so that the chaos runner and benchmarks use the same ones.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import subprocess
import sys
import threading
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

import engine
from engine.cluster.supervisor import READY_TIMEOUT_S, port_free

PORT_LOW = 20000
PORT_HIGH = 60000


def free_base_port(count: int = 7, host: str = "127.0.0.1", attempts: int = 200, rng: random.Random | None = None) -> int:
    """A port p such that p .. p+count-1 are all free now, and so are their metrics ports (the
    manifest's default offset above them: a cluster made with `base_port=p` uses both ranges). A
    race with other processes remains, which the launcher reports as a busy port."""
    from engine.cluster.manifest import METRICS_PORT_OFFSET_DEFAULT

    rng = rng or random.Random()
    for _ in range(attempts):
        base = rng.randrange(PORT_LOW, PORT_HIGH - count)
        if all(port_free(host, base + i) and port_free(host, base + METRICS_PORT_OFFSET_DEFAULT + i) for i in range(count)):
            return base
    raise RuntimeError(f"no {count} consecutive free ports found in {attempts} attempts")


@contextlib.contextmanager
def hold_port(host: str, port: int):
    """Listen on host:port for the `with` block, so that a process told to use it finds it busy.

    Bound with SO_REUSEADDR, as the servers and `port_free` bind: a port an earlier test's
    process closed a moment ago may still be in TIME_WAIT, which such a bind ignores and a plain
    bind refuses with EADDRINUSE (a test that failed that way was the blocker's fault, not the
    launcher's)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        s.listen(1)
        yield s


def wait_serving(address: str, timeout_s: float = READY_TIMEOUT_S, proc: subprocess.Popen | None = None, tls=None) -> None:
    """Poll the health service at `address` until SERVING (over mTLS with `tls`, a TlsConfig);
    raise if `proc` dies or time runs out."""
    from engine.security.tls import secure_channel

    deadline = time.monotonic() + timeout_s
    with secure_channel(address, tls, ()) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"process {proc.pid} exited with {proc.returncode} before {address} was SERVING")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{address} not SERVING after {timeout_s} s")
            time.sleep(0.05)


def engine_env() -> dict:
    """Environment for a child `python -m engine` that imports this very package."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(engine.__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def storage_channel(address: str, volume_id: str = "test-volume", **options) -> grpc.Channel:
    """A plaintext channel to a test node whose calls name `volume_id` (storage protocol 2)."""
    from engine.transport.grpc_client import VolumeMetadata

    return grpc.intercept_channel(grpc.insecure_channel(address, **options), VolumeMetadata(volume_id))


def spawn_node(
    data: str, port: int, *, node_id: str = "n1", az: str = "a", volume_id: str = "test-volume", protection_groups: int = 4,
    log_path: str | None = None, durable: bool = False, gossip_interval_s: float = 0.0, allow_fault_injection: bool = True,
) -> subprocess.Popen:
    """Start one `sixfold node serve` process (no peers to gossip with, plaintext on loopback) and
    wait until SERVING. It serves Corrupt and SetFaults unless `allow_fault_injection` is False:
    the single-node protocol tests inject faults."""
    argv = [
        sys.executable, "-m", "engine", "node", "serve", "--id", node_id, "--az", az, "--data", data,
        "--listen", f"127.0.0.1:{port}", "--volume-id", volume_id, "--protection-groups", str(protection_groups),
        "--peers", f"{node_id}=127.0.0.1:{port}", "--gossip-interval-s", str(gossip_interval_s),
    ]
    if not durable:
        argv.append("--no-durable")
    if allow_fault_injection:
        argv.append("--allow-fault-injection")
    log = open(log_path or os.path.join(os.path.dirname(data), f"{node_id}.log"), "ab")
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=engine_env(),
                            start_new_session=True)
    log.close()
    try:
        wait_serving(f"127.0.0.1:{port}", proc=proc)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc


#: how long a load thread may take to notice the stop and finish its last write (a write takes at
#: most the write timeout; the rest is for a loaded machine)
LOAD_STOP_S = 60.0


class Load:
    """A few threads writing unique keys (`PREFIX:thread:n`) under faults; records what was
    acknowledged, what is indeterminate (with its request id) and how many were refused. Use as a
    context manager."""

    def __init__(self, db, prefix: str = "load", threads: int = 3, pause_s: float = 0.0) -> None:
        self.db = db
        self.prefix = prefix
        self.pause_s = pause_s
        self.acked: dict[bytes, bytes] = {}
        self.unknown: dict[bytes, bytes] = {}
        #: key -> request id of each indeterminate write, to ask the engine its fate (`status_of`)
        self.unknown_ids: dict[bytes, bytes] = {}
        self.failed = 0
        self.errors: list[Exception] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, i: int) -> None:
        n = 0
        while not self._stop.is_set():
            key, value = f"{self.prefix}:{i}:{n}".encode(), f"v{i}.{n}".encode()
            n += 1
            try:
                self.db.put(key, value)
                with self._lock:
                    self.acked[key] = value
            except engine.WriteIndeterminate as e:
                with self._lock:
                    self.unknown[key] = value
                    self.unknown_ids[key] = e.request_id
            except engine.Unavailable:
                with self._lock:
                    self.failed += 1
                time.sleep(0.05)
            except Exception as e:  # noqa: BLE001 - reported by check()
                self.errors.append(e)
                return
            if self.pause_s:
                self._stop.wait(self.pause_s)

    def count(self) -> int:
        """Acknowledged writes so far."""
        with self._lock:
            return len(self.acked)

    def not_acknowledged(self) -> int:
        """Writes that were refused or whose fate is unknown, so far."""
        with self._lock:
            return self.failed + len(self.unknown)

    def acknowledge(self, keys) -> None:
        """Count the indeterminate writes of `keys` as acknowledged (they were found committed)."""
        with self._lock:
            for key in keys:
                self.acked[key] = self.unknown.pop(key)
                del self.unknown_ids[key]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(LOAD_STOP_S)
            assert not t.is_alive(), f"a load thread did not finish within {LOAD_STOP_S:g} s of the stop"


def check_all_readable(db, load: Load, *, quorum: bool = False) -> None:
    assert not load.errors, load.errors
    for key, value in load.acked.items():
        assert db.get(key, quorum=quorum) == value, f"acknowledged write {key!r} lost"
    for key, value in load.unknown.items():
        assert db.get(key, quorum=quorum) in (None, value), f"indeterminate write {key!r} has a value nobody wrote"


def acknowledge_committed(db, load: Load) -> None:
    """Count as acknowledged each indeterminate write of `load` that its request id shows
    committed (after a failover, one the old writer logged may or may not have been kept)."""
    load.acknowledge([key for key, rid in list(load.unknown_ids.items()) if db.status_of(rid).state == "committed"])


def check_indeterminate_committed(db, load: Load, timeout_s: float = LOAD_STOP_S) -> None:
    """Every indeterminate write of `load` commits: for a test where a write quorum stayed up (and
    the writer did not change), a logged write must become durable, so a WriteIndeterminate only
    said that the write timeout passed first (a loaded machine). Polls `status_of` until each one
    is committed, then counts them as acknowledged (`check_all_readable` then reads their value)."""
    deadline = time.monotonic() + timeout_s
    while True:
        states = {key: db.status_of(rid).state for key, rid in load.unknown_ids.items()}
        if all(state == "committed" for state in states.values()):
            break
        if time.monotonic() > deadline:
            raise AssertionError(f"indeterminate writes not committed after {timeout_s:g} s: "
                                 f"{ {k: s for k, s in states.items() if s != 'committed'} }")
        time.sleep(0.05)
    load.acknowledge(states)


def put_durably(db, key: bytes, value: bytes, timeout_s: float = LOAD_STOP_S) -> None:
    """`db.put` for a write that must succeed because a write quorum is up: if the write timeout
    passes first (a loaded machine), the write was logged and must still commit, so this asks
    `status_of` until it has (AssertionError after `timeout_s`). A refusal (Unavailable) raises."""
    try:
        db.put(key, value)
        return
    except engine.WriteIndeterminate as e:
        rid, error = e.request_id, e
    deadline = time.monotonic() + timeout_s
    while (state := db.status_of(rid).state) != "committed":
        if time.monotonic() > deadline:
            raise AssertionError(f"a put of {key!r} that timed out ({error}) is still {state} after {timeout_s:g} s")
        time.sleep(0.05)
