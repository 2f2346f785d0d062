"""The workload against in-memory fakes of the key-value API: a correct fake's history checks
valid (also when it fails or times out writes), a broken fake's history checks invalid, and a
single-client run is byte-for-byte reproducible from its seed."""

from __future__ import annotations

import random
import threading
import time

import pytest

from engine.chaos.checker import INVALID, VALID, check_all, overall, render_table
from engine.chaos.history import History, dumps_jsonl, pair_ops
from engine.chaos.workload import Progress, Workload, classify_write_error, workload_keys
from engine.errors import InvalidArgument, Unavailable, WriteIndeterminate

SEED = 20240531


class DictDB:
    """The contract in a dict with a lock: every op is atomic, a scan reads one snapshot."""

    def __init__(self) -> None:
        self._d: dict[bytes, bytes] = {}
        self._lock = threading.Lock()

    def put(self, key: bytes, value: bytes) -> None:
        with self._lock:
            self._apply([("put", key, value)])

    def get(self, key: bytes) -> bytes | None:
        with self._lock:
            return self._read(key)

    def delete(self, key: bytes) -> None:
        with self._lock:
            self._apply([("delete", key, None)])

    def batch(self) -> "_Batch":
        return _Batch(self)

    def scan(self, start: bytes, end: bytes):
        with self._lock:
            snapshot = [(k, v) for k, v in sorted(self._d.items()) if start <= k < end]
        return iter(snapshot)

    # Hooks the broken fakes override; called with the lock held.
    def _apply(self, ops) -> None:
        for f, k, v in ops:
            if f == "put":
                self._d[k] = v
            else:
                self._d.pop(k, None)

    def _read(self, key: bytes) -> bytes | None:
        return self._d.get(key)

    def _commit(self, ops) -> None:
        with self._lock:
            self._apply(ops)


class _Batch:
    def __init__(self, db: DictDB) -> None:
        self._db = db
        self._ops: list = []

    def put(self, key: bytes, value: bytes) -> None:
        self._ops.append(("put", key, value))

    def delete(self, key: bytes) -> None:
        self._ops.append(("delete", key, None))

    def __enter__(self) -> "_Batch":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self._db._commit(self._ops)  # all or nothing
        return False


class FlakyDB(DictDB):
    """Correct, but writes fail before applying (Unavailable), or apply-or-not and then raise
    WriteIndeterminate or a timeout, and reads fail sometimes; a seeded coin decides."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self._rng = random.Random(seed)

    def _write(self, ops) -> None:
        with self._lock:
            coin = self._rng.random()
            if coin < 0.08:
                raise Unavailable("fake: no write quorum, nothing logged")
            if coin < 0.16:
                self._apply(ops)
                raise WriteIndeterminate("fake: logged, durable, ack lost")
            if coin < 0.22:
                raise WriteIndeterminate("fake: logged, then truncated")
            if coin < 0.26:
                self._apply(ops)
                raise TimeoutError("fake: applied but the reply timed out")
            if coin < 0.30:
                raise ConnectionError("fake: connection broken before the write arrived")
            self._apply(ops)

    def put(self, key, value):
        self._write([("put", key, value)])

    def delete(self, key):
        self._write([("delete", key, None)])

    def _commit(self, ops):
        self._write(ops)

    def get(self, key):
        with self._lock:
            if self._rng.random() < 0.05:
                raise Unavailable("fake: no read quorum")
            return self._d.get(key)


class LosingDB(DictDB):
    """Broken: acknowledges some puts without applying them."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self._rng = random.Random(seed)

    def _apply(self, ops) -> None:
        if len(ops) == 1 and ops[0][0] == "put" and self._rng.random() < 0.2:
            return
        super()._apply(ops)


class StaleDB(DictDB):
    """Broken: a get sometimes answers with the key's previous value."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self._rng = random.Random(seed)
        self._previous: dict[bytes, bytes | None] = {}

    def _apply(self, ops) -> None:
        for _, k, _ in ops:
            self._previous[k] = self._d.get(k)
        super()._apply(ops)

    def _read(self, key):
        if key in self._previous and self._rng.random() < 0.2:
            return self._previous[key]
        return self._d.get(key)


def run(db, seed: int = SEED, clients: int = 4, ops_max: int = 1500, **kw) -> tuple[History, Workload]:
    history = History()
    w = Workload(db, history, seed=seed, clients=clients, keys=6, ops_max=ops_max, duration_s=60, **kw)
    w.run(join_timeout_s=60)
    w.final_reads()
    return history, w


def test_correct_fake_history_is_valid():
    history, w = run(DictDB())
    vs = check_all(history)
    assert overall(vs) == VALID, f"seed={SEED}\n" + render_table(vs)
    p = w.progress()
    assert p.invoked == 1500 and p.ok == 1500 and p.fail == p.indeterminate == 0
    ops = pair_ops(history.entries())
    assert {o.f for o in ops} == {"put", "get", "delete", "batch", "scan"}
    values = [o.value for o in ops if o.f == "put"] + [v for o in ops if o.f == "batch" for _, _, v in o.ops if v]
    assert len(values) == len(set(values)), "every written value is unique"


def test_flaky_fake_with_indeterminate_writes_is_valid():
    history, w = run(FlakyDB(SEED), ops_max=2000)
    vs = check_all(history)
    assert overall(vs) == VALID, f"seed={SEED}\n" + render_table(vs)
    p = w.progress()
    assert p.fail > 0 and p.indeterminate > 0 and p.completed == 2000
    ops = pair_ops(history.entries())
    types = {(o.f, o.type) for o in ops}
    assert ("put", "indeterminate") in types and ("put", "fail") in types and ("get", "fail") in types
    # After an indeterminate op the client continues as a new process.
    assert max(o.process for o in ops if isinstance(o.process, int)) >= 4


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_losing_fake_is_caught(seed):
    history, _ = run(LosingDB(seed), seed=seed, clients=1, ops_max=600)
    vs = check_all(history)
    assert overall(vs) == INVALID, f"seed={seed}\n" + render_table(vs)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_stale_fake_is_caught(seed):
    history, _ = run(StaleDB(seed), seed=seed, clients=1, ops_max=600)
    vs = check_all(history)
    lin = next(v for v in vs if v.name == "linearizable")
    assert lin.result == INVALID, f"seed={seed}\n" + render_table(vs)


def test_losing_fake_under_concurrency_is_caught():
    history, _ = run(LosingDB(SEED), ops_max=2000)
    assert overall(check_all(history)) == INVALID


def test_single_client_run_is_byte_identical_per_seed():
    def once(seed: int) -> str:
        history, _ = run(FlakyDB(seed), seed=seed, clients=1, ops_max=300)
        return dumps_jsonl(history.entries())

    assert once(7) == once(7)
    assert once(7) != once(8)


def test_final_reads_read_every_key_once_flagged_final():
    history, w = run(DictDB(), clients=2, ops_max=200)
    finals = [o for o in pair_ops(history.entries()) if o.final]
    assert [o.key for o in finals] == list(workload_keys(6))
    assert all(o.f == "get" and o.type == "ok" and o.process == "final" for o in finals)


def test_final_reads_retry_a_failed_read():
    class FailingOnce(DictDB):
        calls = 0

        def get(self, key):
            self.calls += 1
            if self.calls == 1:
                raise Unavailable("fake")
            return super().get(key)

    history = History()
    w = Workload(FailingOnce(), history, seed=1, clients=1, keys=2, ops_max=0)
    w.run()
    got = w.final_reads(attempts=2)
    assert got == {b"k000": None, b"k001": None}
    assert [o.type for o in pair_ops(history.entries())] == ["fail", "ok", "ok"]


def test_progress_callback_and_stop():
    seen: list[Progress] = []
    history = History()
    w = Workload(DictDB(), history, seed=SEED, clients=3, keys=4, ops_max=10**9, duration_s=3600,
                 progress=seen.append, progress_every_ops=50)
    w.start()
    deadline = time.monotonic() + 10
    while not seen and time.monotonic() < deadline:
        time.sleep(0.001)
    w.stop()
    assert w.join(timeout_s=10)
    assert seen and seen[0].completed >= 50
    assert w.progress().completed == w.progress().invoked < 10**9
    assert history.outstanding() == 0


def test_duration_bound_uses_the_injected_clock():
    now = [0.0]

    def clock() -> float:
        now[0] += 0.01  # every look at the clock is 10 ms later
        return now[0]

    history = History()
    w = Workload(DictDB(), history, seed=SEED, clients=1, keys=4, ops_max=10**6, duration_s=1.0, clock_s=clock)
    p = w.run(join_timeout_s=10)
    assert 0 < p.invoked < 200


def test_errors_are_classified_as_the_api_promises():
    assert classify_write_error(Unavailable("x")) == "fail"
    assert classify_write_error(WriteIndeterminate("x")) == "indeterminate"
    assert classify_write_error(TimeoutError()) == "indeterminate"
    assert classify_write_error(ConnectionError()) == "indeterminate"
    assert classify_write_error(InvalidArgument("x")) == "indeterminate"  # not promised: be safe


def test_torn_batch_from_a_broken_engine_is_caught():
    """A batch that becomes visible one key at a time, seen by a scan in between."""
    db = DictDB()
    history = History()
    w = Workload(db, history, seed=SEED, clients=1, keys=4, ops_max=0)
    db.put(b"k000", b"old0")
    db.put(b"k001", b"old1")
    for k, v in ((b"k000", b"old0"), (b"k001", b"old1")):
        history.complete(history.invoke("setup", "put", key=k, value=v), "ok")
    b = history.invoke("c1", "batch", ops=[("put", b"k000", b"new0"), ("put", b"k001", b"new1")])
    db.put(b"k000", b"new0")  # the broken engine exposes the first half...
    s = history.invoke("c2", "scan", start=b"k000", end=b"\xff")
    history.complete(s, "ok", result=list(db.scan(b"k000", b"\xff")))
    db.put(b"k001", b"new1")  # ...and only then the second
    history.complete(b, "ok")
    w.final_reads()
    vs = check_all(history)
    atomic = next(v for v in vs if v.name == "batches-atomic")
    assert atomic.result == INVALID, render_table(vs)


def test_a_call_that_never_returns_cannot_hang_the_run():
    release = threading.Event()

    class HangingDB(DictDB):
        def put(self, key, value):
            release.wait(30)  # a partitioned engine that never answers
            super().put(key, value)

    history = History()
    w = Workload(HangingDB(), history, seed=SEED, clients=2, keys=3, ops_max=100, duration_s=0.2,
                 mix={"put": 1.0})
    t0 = time.monotonic()
    w.run(join_timeout_s=0.5)
    assert time.monotonic() - t0 < 5
    ops = pair_ops(history.entries())
    assert ops and all(o.type == "indeterminate" and o.completion is None for o in ops)
    release.set()
    assert w.join(timeout_s=10)


# --- replica reads ------------------------------------------------------------------------------

class LogDB(DictDB):
    """Correct, with a log: every write unit gets the next commit position (returned, and kept
    as `last_commit`), so a replica can read the state at any position."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[list] = []  # position p (1-based) -> the ops of unit p
        self.last_commit: int | None = None

    def _apply(self, ops) -> int:
        super()._apply(ops)
        self.log.append(list(ops))
        self.last_commit = len(self.log)
        return self.last_commit

    def put(self, key, value) -> int:
        with self._lock:
            return self._apply([("put", key, value)])

    def delete(self, key) -> int:
        with self._lock:
            return self._apply([("delete", key, None)])

    def batch(self) -> "_LogBatch":
        return _LogBatch(self)

    def state_at(self, position: int) -> dict[bytes, bytes]:
        with self._lock:
            units = self.log[:position]
        d: dict[bytes, bytes] = {}
        for ops in units:
            for f, k, v in ops:
                if f == "put":
                    d[k] = v
                else:
                    d.pop(k, None)
        return d


class _LogBatch(_Batch):
    lsn = None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            with self._db._lock:
                self.lsn = self._db._apply(self._ops)
        return False


class Replica:
    """A read replica of a LogDB: each session reads at a position behind the log that never
    goes back (`monotonic`) and covers `after=` (`honours_after`); broken variants drop one."""

    def __init__(self, db: LogDB, seed: int, *, monotonic: bool = True, honours_after: bool = True) -> None:
        self.db, self.monotonic, self.honours_after = db, monotonic, honours_after
        self._rng = random.Random(seed)
        self._points: dict[int, int] = {}
        self._lock = threading.Lock()

    def session(self, client: int):
        return client, _ReplicaView(self, client)

    def point(self, client: int, after: int | None) -> int:
        with self._lock:
            newest = len(self.db.log)
            low = self._points.get(client, 0) if self.monotonic else 0
            if after is not None and self.honours_after:
                low = max(low, after)
            p = self._rng.randint(min(low, newest), newest)
            self._points[client] = max(self._points.get(client, 0), p)
            return p


class _ReplicaView:
    def __init__(self, replica: Replica, client: int) -> None:
        self.replica, self.client = replica, client

    def get(self, key, after=None):
        return self.replica.db.state_at(self.replica.point(self.client, after)).get(key)

    def scan(self, start, end, after=None):
        d = self.replica.db.state_at(self.replica.point(self.client, after))
        return iter([(k, v) for k, v in sorted(d.items()) if start <= k < end])


def replica_verdicts(history) -> dict[str, str]:
    return {v.name: v.result for v in check_all(history)}


def test_a_lagging_but_correct_replica_is_valid_and_recorded_with_its_sessions():
    db = LogDB()
    history, w = run(db, clients=3, ops_max=1200, replica=Replica(db, SEED))
    verdicts = replica_verdicts(history)
    assert overall(check_all(history)) == VALID, render_table(check_all(history))
    assert verdicts["replica-reads-monotonic"] == VALID and verdicts["replica-read-after"] == VALID
    ops = pair_ops(history.entries())
    replica = [op for op in ops if op.replica]
    # (a thread that starts late may find every slot taken by the others: the fake is fast)
    assert len(replica) > 200 and {op.session for op in replica} <= {0, 1, 2}
    assert any(op.after for op in replica) and any(op.after is None for op in replica)
    assert any(op.f == "scan" for op in replica) and any(op.f == "get" for op in replica)
    writes = [op for op in ops if op.f in ("put", "delete", "batch") and op.type == "ok"]
    assert writes and all(op.commit is not None and op.session in (0, 1, 2) for op in writes)
    assert "replica_fraction" in w.describe()


@pytest.mark.parametrize("seed", [1, 2])
def test_a_replica_that_goes_backwards_is_caught(seed):
    db = LogDB()
    history, _ = run(db, seed=seed, clients=3, ops_max=1200, replica=Replica(db, seed, monotonic=False))
    assert replica_verdicts(history)["replica-reads-monotonic"] == INVALID


@pytest.mark.parametrize("seed", [1, 2])
def test_a_replica_that_ignores_after_is_caught(seed):
    db = LogDB()
    history, _ = run(db, seed=seed, clients=3, ops_max=1200, replica=Replica(db, seed, honours_after=False))
    assert replica_verdicts(history)["replica-read-after"] == INVALID


def test_without_a_replica_the_draws_are_unchanged():
    a, _ = run(DictDB(), clients=1, ops_max=300)
    b, _ = run(DictDB(), clients=1, ops_max=300, replica_fraction=0.9)  # no replica: the fraction is unused
    assert dumps_jsonl(a.entries(), include_time=False) == dumps_jsonl(b.entries(), include_time=False)
