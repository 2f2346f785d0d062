"""Storage full, end to end, with real parts only (finding 6 of issue 8, its acceptance).

No transport wrapper plays the nodes here: the nodes are real LMDB environments with a small map,
or real `sixfold node serve --cluster` processes with a small map or a small file size limit
(RLIMIT_FSIZE, a size-limited file), behind the real writer endpoint and `engine.connect`.

What is shown:

* filling the volume ends in `StorageFull` (the class itself: not Unavailable, not
  WriteIndeterminate), refused before anything was logged, and its message names the nodes that
  are full or low on space;
* every acknowledged write reads back, before and after deletes, and after the volume (or every
  process of the cluster) is closed and opened again;
* deletes still work on a full volume (each node keeps a reserve for them), also after a unit
  bigger than the room left was refused;
* a full node is neither dead nor "unreachable": its process lives and is SERVING, the writer's
  link to it is up, and status shows each node's used and capacity bytes and `space_low`.

With `cluster up --max-storage` (storage that grows to a maximum, issue 12 item 2) the same
fill runs on the launcher's own cluster: the maximum is recorded in cluster.json, `cluster status`
shows each node's use, maximum and a warning, a restart keeps the maximum, one below the data is
refused (nothing changed), and a larger one lets the writes resume.

What does *not* hold, by design of this release: deleting does not give the room back (LMDB never
shrinks its file and a delete is a tombstone; old versions stay until version GC, a later
issue), so puts stay refused after deletes until a node gets more capacity (a larger map, here).
"""

from __future__ import annotations

import json
import os
import random
import resource
import subprocess
import sys
import time

import pytest

import engine
from engine import codec
from engine.cluster import Cluster
from engine.cluster.manifest import WRITER, active_nodes, load_manifest, locked, new_manifest, node_entry, save_manifest
from engine.cluster.testing import engine_env, free_base_port, wait_serving
from engine.core.admission import record_cost_bytes
from engine.core.constants import FLAG_CPL, FLAG_PUT, KEY_BYTES_MAX, VALUE_BYTES_MAX
from engine.core.types import Geometry, NodeInfo
from engine.errors import StorageFull
from engine.node.service import StorageNode

NODES = ("n1", "n2", "n3", "n4", "n5", "n6")
P = 2
MAP_BYTES = 4 << 20
#: More puts than fit in MAP_BYTES: the fill loops are bounded by this, never by time.
PUTS_MAX = 1500
VALUE_BYTES = 8000
SMALL_VALUE_BYTES = 16
BIG_VALUE_BYTES = 1 << 20
WAIT_S = 60.0


def value_of(i: int, size: int = VALUE_BYTES) -> bytes:
    """A value that differs per key, so a mixed-up read shows."""
    stem = b"%06d;" % i
    return (stem * (size // len(stem) + 1))[:size]


def settled(db) -> bool:
    """Every node acknowledged everything logged: the writer's view of their room is fresh."""
    w = db.status()["writer"]
    return all(link["sent_lsn"] >= w["next_lsn"] - 1 for link in w["links"].values())


def fill(db, acked: dict, prefix: bytes, value_bytes: int = VALUE_BYTES, puts_max: int = PUTS_MAX) -> StorageFull:
    """Put distinct keys until a put is refused; every acknowledged put goes into `acked`.
    Returns the refusal (the test fails on any other error, or if nothing is refused).

    The writer counts what it logged against a node's room until the node's reply says it
    stored it, so near the limit a put may be refused while the slowest nodes' replies are still
    on their way: a refused put is tried again once every node acknowledged everything, and only
    a second refusal ends the fill."""
    for i in range(puts_max):
        key = prefix + b"%06d" % i
        try:
            db.put(key, value_of(i, value_bytes))
        except StorageFull:
            wait_for(lambda: settled(db), "every node acknowledged everything logged")
            try:
                db.put(key, value_of(i, value_bytes))
            except StorageFull as e:
                assert db.get(key) is None, "a refused put must not be there"
                return e
        acked[key] = value_of(i, value_bytes)
    raise AssertionError(f"{puts_max} puts of {value_bytes} bytes fitted in nodes of {MAP_BYTES} bytes")


def fill_up(db, acked: dict) -> StorageFull:
    """Fill with puts of VALUE_BYTES until one is refused, then with small ones until one is: a
    put is refused once it does not fit, so smaller ones may still fit for a while. Returns the
    last refusal."""
    refused = fill(db, acked, b"k")
    assert type(refused) is StorageFull and names_nodes(str(refused)) and "Nothing was logged" in str(refused), str(refused)
    assert len(acked) * VALUE_BYTES > MAP_BYTES // 3, f"only {len(acked)} puts of {VALUE_BYTES} bytes fitted"
    return fill(db, acked, b"s", SMALL_VALUE_BYTES)


def names_nodes(message: str, nodes=NODES) -> bool:
    return all(f" {n}" in message or f"{n}," in message or f"{n})" in message for n in nodes)


def wait_for(predicate, what: str, timeout_s: float = WAIT_S):
    deadline = time.monotonic() + timeout_s
    while True:
        got = predicate()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:g} s: {what}")
        time.sleep(0.05)


def put_fits(db, key: bytes, value: bytes) -> bool:
    """True when the put was admitted (and acknowledged); False when refused StorageFull."""
    try:
        db.put(key, value)
        return True
    except StorageFull:
        return False


def check_reads(db, acked: dict, deleted: set = frozenset()) -> None:
    """Every acknowledged write reads back (a deleted key is gone), one segment and by quorum."""
    for key, value in acked.items():
        want = None if key in deleted else value
        assert db.get(key) == want, f"acknowledged write {key!r} lost or wrong"
    for key in list(acked)[:: max(1, len(acked) // 20)]:
        assert db.get(key, quorum=True) == (None if key in deleted else acked[key])
    assert dict(db.scan()) == {k: v for k, v in acked.items() if k not in deleted}


def space_of(st: dict) -> dict:
    """Per node (used, capacity, space_low) from a status; a node is low exactly when it has no
    room left above its reserve."""
    for n in st["nodes"]:
        assert n["space_low"] == (n["room_bytes"] == 0) and n["used_bytes"] + n["room_bytes"] <= n["capacity_bytes"], n
    return {n["id"]: (n["used_bytes"], n["capacity_bytes"], n["space_low"]) for n in st["nodes"]}


def no_write_quorum_has_room(st: dict) -> bool:
    """Fewer than four nodes are above their reserve (nodes differ by a page or so)."""
    return sum(not low for _u, _c, low in space_of(st).values()) < 4


def delete_half(db, acked: dict) -> set:
    deleted = set(list(acked)[::2])
    for key in sorted(deleted):
        db.delete(key)  # must not raise: deletes draw on the nodes' reserve
    return deleted


# --- embedded ---------------------------------------------------------------------------------
def open_embedded(path, map_bytes: int = MAP_BYTES, **options):
    return engine.open(path, map_bytes=map_bytes, durable=False, protection_groups=P, gossip_interval_s=0.05, **options)


def test_an_embedded_volume_fills_refuses_puts_naming_the_nodes_keeps_deletes_and_every_ack(tmp_path):
    path = tmp_path / "v"
    acked: dict[bytes, bytes] = {}
    with open_embedded(path) as db:
        refused = fill_up(db, acked)
        assert type(refused) is engine.StorageFull is StorageFull  # the class a caller catches
        message = str(refused)
        assert names_nodes(message) and "Nothing was logged" in message and "deletes still work" in message, message
        st = db.status()
        for node_id, (used, capacity, low) in space_of(st).items():
            assert capacity == MAP_BYTES and 0 < used <= capacity, (node_id, used, capacity, low)
        assert no_write_quorum_has_room(st), space_of(st)
        w = st["writer"]
        assert w["admission"] == "deletes-only" and w["room_bytes"] == 0, (w["admission"], w["room_bytes"])
        assert all(link["up"] and not link["full"] for link in w["links"].values()), w["links"]
        assert [n for n, link in w["links"].items() if link["space_low"]] == [n for n, (_u, _c, low) in space_of(st).items() if low]
        next_lsn = w["next_lsn"]
        with pytest.raises(StorageFull):
            db.put(b"refused", b"x")
        assert db.status()["writer"]["next_lsn"] == next_lsn, "a refused put logged something"
        check_reads(db, acked)

        deleted = delete_half(db, acked)
        with db.batch() as b:  # a delete-only batch is admitted too
            b.delete(b"k999998").delete(b"k999999")
        check_reads(db, acked, deleted)
        # Deleting gives room back: collection removes the deleted keys' versions, and the pages
        # LMDB freed count as room again, so small puts are admitted once they are freed...
        wait_for(lambda: put_fits(db, b"after-deletes", b"x"), "the deletes to give room back")
        acked[b"after-deletes"] = b"x"
        # ...while a value larger than a page, which needs consecutive pages beyond the file's
        # end, is refused before it is logged (logged, it could never be stored, and every later
        # record would wait behind it). Collection goes on giving room back meanwhile: wait until
        # a write quorum has room for the value, so that only its one piece is missing.
        wait_for(lambda: db.status()["writer"]["room_bytes"] >= BIG_VALUE_BYTES * 5 // 4,  # its need, and a margin
                 "collection to give back room for the large value")
        with pytest.raises(StorageFull, match="in one piece"):
            db.put(b"big-after-deletes", b"B" * BIG_VALUE_BYTES)
        check_reads(db, acked, deleted)

    with open_embedded(path) as db:  # reopened as it was: nothing lost, deletes work
        check_reads(db, acked, deleted)
        db.delete(sorted(set(acked) - deleted)[0])
        deleted.add(sorted(set(acked) - deleted)[0])
        check_reads(db, acked, deleted)

    with open_embedded(path, map_bytes=4 * MAP_BYTES) as db:  # more capacity: puts are admitted again
        assert not any(low for _u, _c, low in space_of(db.status()).values())
        wait_for(lambda: db.status()["writer"]["admission"] == "all", "admission back to all")
        db.put(b"after-growing", b"room again")
        assert db.get(b"after-growing") == b"room again"
        check_reads(db, {**acked, b"after-growing": b"room again"}, deleted)


def test_a_unit_bigger_than_the_room_left_is_refused_whole_and_deletes_still_work(tmp_path):
    """One put may be most of a small node's room: a unit that cannot fit on a write quorum must
    be refused before it is logged. Logged, it could never become durable, and every later
    record (deletes too) would wait behind it: the volume would be stuck until reopened."""
    with open_embedded(tmp_path / "v", write_timeout_s=2.0) as db:
        big = b"B" * BIG_VALUE_BYTES
        db.put(b"a", big)
        db.put(b"b", big)
        w = db.status()["writer"]
        assert w["admission"] == "all", "not low yet: the node's room is above its reserve"
        next_lsn = w["next_lsn"]
        with pytest.raises(StorageFull) as got:
            with db.batch() as b:
                for i in range(3):
                    b.put(b"big%d" % i, big)
        assert type(got.value) is StorageFull and names_nodes(str(got.value)), str(got.value)
        assert db.status()["writer"]["next_lsn"] == next_lsn, "the refused unit was logged"
        assert [db.get(b"big%d" % i) for i in range(3)] == [None] * 3
        db.delete(b"a")
        assert (db.get(b"a"), db.get(b"b")) == (None, big)
        db.put(b"small", b"still fits")
        assert db.get(b"small") == b"still fits"
        assert not any(link["full"] for link in db.status()["writer"]["links"].values())


def test_a_writer_opened_on_a_full_volume_knows_it_before_its_first_append(tmp_path):
    """The writer learns each node's space from its state when it opens, not only from the
    replies to later appends: a put on a full volume is refused at once after an open, so an
    application that opens, puts and closes again cannot eat the reserve kept for deletes."""
    path = tmp_path / "v"
    acked: dict[bytes, bytes] = {}
    with open_embedded(path) as db:
        fill_up(db, acked)
    # No background threads: nothing is sent to any node before the put below asks.
    with open_embedded(path, background=False, write_timeout_s=1.0) as db:
        w = db.status()["writer"]
        assert w["admission"] == "deletes-only", w["admission"]
        assert sum(not link["space_low"] for link in w["links"].values()) < 4, w["links"]
        next_lsn = w["next_lsn"]
        with pytest.raises(StorageFull):
            db.put(b"after-reopen", b"x")
        assert db.status()["writer"]["next_lsn"] == next_lsn


# --- cluster ----------------------------------------------------------------------------------
class LimitedCluster:
    """A real cluster whose node processes run with limits the launcher does not set: the
    launcher's own command line (`sixfold node serve --cluster DIR --id ID`) plus extra options
    (`--map-bytes`, `--reserve-bytes`), and optionally a file size limit (RLIMIT_FSIZE, set in
    the child before it execs). Their pids go into the manifest, so the launcher (status, health,
    down) and `engine.connect` treat them as its own. The writer endpoint is the launcher's."""

    def __init__(self, folder, node_args: dict | None = None, file_bytes_max: int | None = None) -> None:
        self.folder = str(folder)
        self.node_args = node_args or {}
        self.file_bytes_max = file_bytes_max
        self.procs: dict[str, subprocess.Popen] = {}
        # A hand-made insecure cluster without client tokens: this test is about storage, not access.
        save_manifest(self.folder, new_manifest(base_port=free_base_port(), protection_groups=P, durable=False,
                                                gossip_interval_s=0.5, tokens=False))
        self.cluster = Cluster(self.folder)

    def _limit(self) -> None:
        soft = self.file_bytes_max
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    def start(self) -> None:
        m = load_manifest(self.folder)
        for n in active_nodes(m):
            argv = [sys.executable, "-m", "engine", "node", "serve", "--cluster", self.folder, "--id", n["id"],
                    "--listen", n["address"], *self.node_args.get(n["id"], ())]
            log_path = os.path.join(self.folder, n["log"])
            os.makedirs(os.path.dirname(log_path), exist_ok=True)
            with open(log_path, "ab") as log:
                self.procs[n["id"]] = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=engine_env(),
                    cwd=self.folder, start_new_session=True, close_fds=True,
                    preexec_fn=self._limit if self.file_bytes_max else None,
                )
        with locked(self.folder):
            m = load_manifest(self.folder)
            for node_id, proc in self.procs.items():
                node_entry(m, node_id)["pid"] = proc.pid
            save_manifest(self.folder, m)
        for n in active_nodes(m):
            wait_serving(n["address"], timeout_s=WAIT_S, proc=self.procs[n["id"]])
        self.cluster.start(WRITER, timeout_s=WAIT_S)

    def alive(self) -> dict:
        return {node_id: proc.poll() is None for node_id, proc in self.procs.items()}

    def stop(self) -> None:
        self.cluster.down(timeout_s=10)
        for proc in self.procs.values():
            proc.wait(10)

    def log(self, name: str) -> str:
        with open(os.path.join(self.folder, "logs", f"{name}.log"), errors="replace") as fh:
            return fh.read()

    def check_logs(self) -> None:
        """No process met an unexpected error (a traceback), and no node answered INTERNAL."""
        for name in (*NODES, WRITER):
            text = self.log(name)
            assert "Traceback" not in text and "INTERNAL" not in text, f"{name}: {text[-3000:]}"


class LaunchedCluster(LimitedCluster):
    """The launcher's own cluster, made and restarted by `sixfold cluster up` (in this process),
    the first time with `--max-storage` (and whatever `up_args` add)."""

    def __init__(self, folder, up_args: tuple = ()) -> None:
        self.folder, self.up_args, self.procs = str(folder), tuple(up_args), {}
        self.base_port = free_base_port()
        self.cluster = Cluster(self.folder)

    def up(self, *args: str) -> int:
        from engine.cli import main

        return main(["cluster", "up", "--cluster", self.folder, "--insecure", "--no-auth", "--no-durable",
                     "--protection-groups", str(P), "--gossip-interval-s", "0.5", "--base-port", str(self.base_port),
                     "--timeout-s", str(WAIT_S), *args])

    def start(self) -> None:
        assert self.up(*self.up_args) == 0
        self.up_args = ()

    def alive(self) -> dict:
        return {n: self.cluster.state(n) == "running" for n in NODES}

    def stop(self) -> None:
        self.cluster.down(timeout_s=10)


@pytest.fixture
def limited(tmp_path):
    made = []

    def make(launched: tuple | None = None, **kwargs) -> LimitedCluster:
        folder = tmp_path / f"c{len(made)}"
        c = LaunchedCluster(folder, launched) if launched is not None else LimitedCluster(folder, **kwargs)
        made.append(c)
        c.start()
        return c

    yield make
    for c in made:
        c.stop()


def check_serving_and_reachable(c: LimitedCluster, db) -> dict:
    """Every node process lives and is SERVING; the writer reaches every node. Returns status."""
    assert all(c.alive().values()), c.alive()
    assert {n: c.cluster.health(n) for n in NODES} == {n: "SERVING" for n in NODES}
    st = db.status()
    links = st["writer"]["links"]
    assert all(links[n]["up"] for n in NODES), {n: (l["up"], l["error"]) for n, l in links.items()}
    assert all(node["up"] and "error" not in node for node in st["nodes"]), st["nodes"]
    launcher = c.cluster.status()
    assert all(n["health"] == "SERVING" and "error" not in n for n in launcher["nodes"]), launcher["nodes"]
    return st


@pytest.mark.cluster
# The file-size limit (LMDB's map full) runs with the soak (25 s): make test keeps it in
# process (test_node_storage_full, test_writer_storage_full) and the max-storage run here.
@pytest.mark.parametrize("limit", ["max-storage", pytest.param("file-size", marks=pytest.mark.soak)])
def test_a_cluster_fills_through_grpc_refuses_with_storage_full_and_keeps_every_ack(limited, limit, capsys):
    if limit == "max-storage":
        c = limited(launched=("--max-storage", "4MiB"))
        assert load_manifest(c.folder)["max_storage_bytes"] == MAP_BYTES
    else:
        c = limited(file_bytes_max=MAP_BYTES)
    acked: dict[bytes, bytes] = {}
    with engine.connect(c.folder) as db:
        big = b"B" * BIG_VALUE_BYTES
        db.put(b"big-a", big)
        acked[b"big-a"] = big
        with pytest.raises(StorageFull) as got:  # more than the room left: refused, not logged
            with db.batch() as b:
                for i in range(3):
                    b.put(b"big%d" % i, big)
        assert names_nodes(str(got.value)), str(got.value)
        refused = fill_up(db, acked)
        assert type(refused) is StorageFull, repr(refused)
        message = str(refused)
        assert names_nodes(message) and "Nothing was logged" in message, message
        st = check_serving_and_reachable(c, db)
        for node_id, (used, capacity, low) in space_of(st).items():
            assert capacity == MAP_BYTES and 0 < used <= capacity, (node_id, used, capacity, low)
        assert no_write_quorum_has_room(st), space_of(st)
        assert st["writer"]["admission"] == "deletes-only" and st["writer"]["room_bytes"] == 0
        check_reads(db, acked)
        if limit == "max-storage":
            for n in st["nodes"]:  # the writer endpoint's status, through kv.proto
                assert n["max_storage_bytes"] == MAP_BYTES and n["storage_warning"].startswith(f"node {n['id']} uses"), n
            check_status_shows_the_maximum(c, capsys)

        deleted = delete_half(db, acked)
        with pytest.raises(StorageFull):
            with db.batch() as b:
                b.put(b"big", b"B" * BIG_VALUE_BYTES)
        check_reads(db, acked, deleted)
        check_serving_and_reachable(c, db)
    if limit == "file-size":
        for n in active_nodes(c.cluster.manifest):
            assert os.path.getsize(os.path.join(c.folder, n["data"], "data.mdb")) <= MAP_BYTES

    c.stop()  # every process, then all of them again: recovery keeps every acknowledged write
    c.start()
    with engine.connect(c.folder) as db:
        check_reads(db, acked, deleted)
        # The deletes gave room back (collection): small puts fit; a value larger than a page
        # still does not, in one piece.
        wait_for(lambda: put_fits(db, b"after-restart", b"x"), "room given back by the deletes")
        acked[b"after-restart"] = b"x"
        with pytest.raises(StorageFull):
            db.put(b"big-after-restart", b"B" * BIG_VALUE_BYTES)
        db.delete(sorted(set(acked) - deleted)[0])
        deleted.add(sorted(set(acked) - deleted)[0])
        check_serving_and_reachable(c, db)
    if limit == "max-storage":
        grow_the_maximum(c, capsys, acked, deleted)
    c.check_logs()


def check_status_shows_the_maximum(c: LaunchedCluster, capsys) -> None:
    """`sixfold cluster status` and `sixfold status`: used, capacity, percent and maximum per node,
    and a warning line for each node at 80% or more (or on its reserve)."""
    from engine.cli import main

    for argv in (["cluster", "status", "--cluster", c.folder], ["status", "--cluster", c.folder]):
        capsys.readouterr()
        assert main(argv) == 0, argv
        out = capsys.readouterr().out
        header = next(line for line in out.splitlines() if line.startswith("process"))  # the one status view
        assert header.split()[-4:] == ["used", "capacity", "use%", "maximum"], header
        rows = [line.split() for line in out.splitlines() if line.split()[:1] and line.split()[0] in NODES]
        assert len(rows) == len(NODES) and all(r[-2:] == ["4", "MiB"] and r[-3].endswith("%") for r in rows), out
        for n in NODES:
            assert f"warning: node {n} uses" in out, out
    capsys.readouterr()
    assert main(["cluster", "status", "--cluster", c.folder, "--json"]) == 0
    nodes = json.loads(capsys.readouterr().out)["nodes"]
    assert all(n["max_storage_bytes"] == MAP_BYTES and n["map_bytes"] <= MAP_BYTES and n["storage_warning"] for n in nodes)


def grow_the_maximum(c: LaunchedCluster, capsys, acked: dict, deleted: set) -> None:
    """A maximum below the data is refused (exit 3, the manifest unchanged); a larger one, at the
    next start, lets the writes resume with every acknowledged write still there."""
    c.stop()
    recorded = open(os.path.join(c.folder, "cluster.json"), "rb").read()
    capsys.readouterr()
    assert c.up("--max-storage", "1MiB") == 3
    err = capsys.readouterr().err
    assert "below it" in err and "nothing was changed" in err, err
    assert open(os.path.join(c.folder, "cluster.json"), "rb").read() == recorded
    assert not any(c.alive().values()), "a refused `cluster up` started nothing"
    assert c.up("--max-storage", "16MiB") == 0
    assert load_manifest(c.folder)["max_storage_bytes"] == 4 * MAP_BYTES
    with engine.connect(c.folder) as db:
        wait_for(lambda: db.status()["writer"]["admission"] == "all", "admission back to all")
        more = {b"grown%04d" % i: value_of(i) for i in range(100)}
        for key, value in more.items():
            db.put(key, value)
        acked.update(more)
        check_reads(db, acked, deleted)
        assert all(n["max_storage_bytes"] == 4 * MAP_BYTES for n in db.status()["nodes"])


@pytest.mark.cluster
def test_nodes_that_really_fill_up_stay_reachable_and_the_others_carry_the_writes(limited):
    """n1 and n2 keep no reserve (`--reserve-bytes 0`) in a small map: they fill to the last page
    and refuse appends with StorageFull over gRPC (RESOURCE_EXHAUSTED). They are full, not
    unreachable: SERVING, their links up, shown as full; the other four, with room, are a write
    quorum, so every put is still acknowledged, and reads work."""
    small = ("--map-bytes", str(MAP_BYTES // 2), "--reserve-bytes", "0")
    c = limited(node_args={"n1": small, "n2": small})
    acked: dict[bytes, bytes] = {}
    with engine.connect(c.folder) as db:

        seen_full: set[str] = set()

        def both_full() -> bool:
            # A full node's link may show "full" only between its refusals and its next accepted
            # append (a heartbeat, a small record), so what was seen is kept across samples.
            links = db.status()["writer"]["links"]
            seen_full.update(n for n in ("n1", "n2") if links[n]["full"])
            return seen_full == {"n1", "n2"}

        for i in range(PUTS_MAX):
            key = b"k%06d" % i
            db.put(key, value_of(i))  # never refused: n3..n6 have room
            acked[key] = value_of(i)
            if i % 5 == 0 and both_full():
                break
        assert both_full(), f"n1 and n2 never filled up (seen full: {sorted(seen_full)})"
        for i in range(PUTS_MAX, PUTS_MAX + 50):
            key = b"k%06d" % i
            db.put(key, value_of(i))
            acked[key] = value_of(i)
        links = wait_for(lambda: (lambda links: links if [n for n in NODES if links[n]["full"]] == ["n1", "n2"] else None)(
            db.status()["writer"]["links"]), "n1 and n2, and only they, shown full")
        assert "StorageFull" in links["n1"]["error"] and "is full" in links["n1"]["error"], links["n1"]
        st = check_serving_and_reachable(c, db)
        assert st["writer"]["admission"] == "all"
        space = space_of(st)
        assert space["n1"][1] == MAP_BYTES // 2 and space["n3"][1] > MAP_BYTES
        check_reads(db, acked)
        deleted = delete_half(db, acked)
        check_reads(db, acked, deleted)
        check_serving_and_reachable(c, db)
    for n in ("n1", "n2"):
        assert "is full" in c.log(n)
    c.check_logs()



# --- the cost a writer counts per record, against a real LMDB environment ----------------------
@pytest.mark.parametrize("key_bytes, value_bytes", [
    (1, 0), (KEY_BYTES_MAX, 0), (8, 100), (8, 2020), (8, 2044), (8, 4060), (8, VALUE_BYTES), (KEY_BYTES_MAX, 3000),
    (8, VALUE_BYTES_MAX),
])
def test_the_cost_the_writer_counts_bounds_what_a_node_takes(tmp_path, key_bytes, value_bytes):
    """`record_cost_bytes` is what admission counts per record on each node: a real node's
    high-water mark grows by no more than the sum, whether records come one per frame or many
    (random keys, two PGs, as the writer sends them), but for the pages that copy-on-write keeps
    until a transaction commits (both tables' leaves, of the last two transactions), which is
    what a node's reserve is for besides deletes."""
    rng = random.Random(f"{key_bytes}:{value_bytes}")
    for per_frame in (1,) if value_bytes == VALUE_BYTES_MAX else (1, 64):
        node = StorageNode(str(tmp_path / f"n{per_frame}"), NodeInfo("n1", "a"), Geometry(P), "vol", durable=False,
                           map_bytes=1 << 30)
        try:
            used_before = node.handle("state").used_bytes
            count = max(64, min(512, (8 << 20) // (value_bytes + 100))) // per_frame * per_frame
            prev, cost = [0] * P, 0
            for first in range(1, count + 1, per_frame):
                records = []
                for lsn in range(first, first + per_frame):
                    key = rng.randbytes(key_bytes)
                    records.append(codec.encode_record(lsn, prev[lsn % P], lsn % P, FLAG_PUT | FLAG_CPL, key, b"v" * value_bytes))
                    prev[lsn % P] = lsn
                    cost += record_cost_bytes(key_bytes, value_bytes)
                node.handle("append", 0, codec.encode_frame(records), first + per_frame - 1)
            grown = node.handle("state").used_bytes - used_before
            copy_on_write = 2 * 2 * per_frame * resource.getpagesize()
            assert grown <= cost + copy_on_write, (
                f"{count} records, {per_frame} per frame: LMDB grew by {grown} bytes; the cost counted {cost}"
            )
        finally:
            node.close()


def test_node_serve_takes_its_map_and_reserve_in_bytes_and_refuses_other_values(tmp_path, capsys):
    """`sixfold node serve --map-bytes N --reserve-bytes N` (what the cluster tests above start
    nodes with) and `--max-storage SIZE`. A value that is not a size, or out of range, is a usage
    error (exit 2) naming the problem; a maximum above the filesystem is refused (exit 3);
    nothing is started or created. The real command first, then (quicker) in this process."""
    from engine.cli import main

    command = ["node", "serve", "--cluster", str(tmp_path / "none"), "--id", "n1"]
    for bad, words in ((["--map-bytes", "4MiB"], "--map-bytes"), (["--map-bytes", "4096"], "below the least"),
                       (["--reserve-bytes", "-1"], "--reserve-bytes")):
        done = subprocess.run([sys.executable, "-m", "engine", *command, *bad],
                              capture_output=True, text=True, env=engine_env(), timeout=60)
        assert done.returncode == 2 and words in done.stderr, (bad, done.returncode, done.stderr)
    fs = os.statvfs(tmp_path)
    for bad, code, words in ((["--max-storage", "10G"], 2, "ambiguous"), (["--max-storage", "0"], 2, "out of range"),
                             (["--max-storage", "-1GiB"], 2, "--max-storage"),
                             (["--max-storage", "4MiB", "--map-bytes", str(8 << 20)], 2, "older spelling"),
                             (["--max-storage", str(fs.f_blocks * fs.f_frsize + (1 << 30))], 3, "filesystem")):
        capsys.readouterr()
        try:
            got = main([*command, *bad])
        except SystemExit as e:  # argparse's usage errors
            got = e.code
        assert got == code and words in capsys.readouterr().err, (bad, got)
    assert not (tmp_path / "none").exists()
