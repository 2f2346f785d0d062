"""A hypothesis state machine drives the embedded cluster (real LMDB) through writes and faults
and checks it against a dict model: no acknowledged write is ever lost, every read returns a
value some linearization allows (an indeterminate write may or may not have happened), and the
engine is available exactly when the paper says it must be.

Faults stay inside the failure budget the protocol promises to survive: at most three segments
impaired at a time (down, wiped and not yet rebuilt, or holding a corrupt record not yet repaired).

Availability, from the model (which nodes are down, which damaged):

* With fewer than four nodes up there is no write quorum: every write raises Unavailable (refused
  before logging, or WriteIndeterminate if the writer had not yet seen a node go). A write
  acknowledged then would be a lie.
* With four or more nodes up and whole (neither down nor damaged), a write quorum can store and
  acknowledge it: a write must not be refused. It may still raise WriteIndeterminate when the
  write timeout passes first (the machine is slow, or a node that came back is still filling the
  hole it left by gossip); then it must commit (`status_of` says "committed" within the generous
  deadline of `tests/waiting.py`), and the model counts it as acknowledged.
* In between (four up, some of them damaged) a write may go either way.

The writer learns that a node came back from its next heartbeat, after a back-off: each fault
step that brings nodes back waits until the writer's links to them are up again, so "up" in the
model means up as the writer sees it.
"""

from __future__ import annotations

import shutil
import tempfile

from hypothesis import HealthCheck, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from waiting import eventually

import engine
from engine.core.constants import WRITE_QUORUM
from engine.core.placement import protection_group_of

KEYS = [b"k%d" % i for i in range(6)]
NODES = ["n1", "n2", "n3", "n4", "n5", "n6"]
AZ_OF = {"n1": "a", "n2": "a", "n3": "b", "n4": "b", "n5": "c", "n6": "c"}
IMPAIRED_MAX = 3
#: Refusals (no quorum) each wait out the write timeout, so it is short; a write that must
#: succeed and meets it first is checked to commit, so a short timeout loses no assertion.
WRITE_TIMEOUT_S = 1.0


class EmbeddedCluster(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="sixfold-stateful-")
        self.db = self.open()
        self.P = 4
        #: per key, the values a read may return (None: absent)
        self.possible = {k: {None} for k in KEYS}
        #: indeterminate writes of the current writer, in submission order: [(key, value)]
        self.pending: list[tuple[bytes, bytes | None]] = []
        self.down: set[str] = set()
        self.damaged: set[str] = set()  # wiped or corrupted, until healed
        self.counter = 0
        #: writes that met the write timeout while a whole write quorum was up, then committed
        self.slow_commits = 0

    # --- helpers ----------------------------------------------------------------------------
    def open(self):
        # Collection runs close behind the VDL (collect_delay_s), so reopening meets collected logs.
        return engine.open(self.dir, write_timeout_s=WRITE_TIMEOUT_S, gossip_interval_s=0.02, scrub_interval_s=0.05,
                           protection_groups=4, collect_delay_s=0.02)

    def impaired(self) -> set[str]:
        return self.down | self.damaged

    def up(self) -> set[str]:
        return set(NODES) - self.down

    def quorum_up(self) -> bool:
        """Four of six nodes up: a write can be stored (the membership never changes here)."""
        return len(self.up()) >= WRITE_QUORUM

    def whole_quorum_up(self) -> bool:
        """Four of six nodes up and whole: a write can be acknowledged, so it must be."""
        return len(self.up() - self.damaged) >= WRITE_QUORUM

    def writer_sees_up(self, nodes) -> None:
        """Wait until the writer's links to `nodes` are up again (it learns of a returning node
        from its next heartbeat, after a back-off); until then it would refuse writes a quorum
        could take."""
        nodes = sorted(nodes)
        eventually(lambda: all(self.db.status()["writer"]["links"][n]["up"] for n in nodes),
                   f"the writer to see {', '.join(nodes)} up again")

    def value(self) -> bytes:
        self.counter += 1
        return b"v%d" % self.counter

    def apply_write(self, ops) -> bool:
        """Write `ops` and check the outcome against the model; True when it was acknowledged."""
        up, whole = sorted(self.up()), self.whole_quorum_up()
        try:
            if len(ops) == 1 and ops[0][1] is not None:
                self.db.put(ops[0][0], ops[0][1])
            elif len(ops) == 1:
                self.db.delete(ops[0][0])
            else:
                with self.db.batch() as b:
                    for k, v in ops:
                        b.put(k, v) if v is not None else b.delete(k)
        except engine.WriteIndeterminate as e:
            if whole:
                # A whole write quorum is up: the write was logged and must become durable; the
                # timeout only says the machine (or a catching-up node) was slower than it.
                eventually(lambda: self.db.status_of(e.request_id).state == "committed",
                           f"a write that timed out with {', '.join(up)} up (a whole write quorum) to commit: {e}")
                self.slow_commits += 1
                self.acknowledged(ops)
                return True
            for k, v in ops:
                self.possible[k].add(v)
            self.pending.extend(ops)
            return False
        except engine.Unavailable as e:
            # Refused before logging: nothing happened. Only without a whole write quorum.
            assert not whole, f"a write was refused with {', '.join(up)} up (a whole write quorum, damaged: {sorted(self.damaged)}): {e}"
            return False
        assert self.quorum_up(), f"a write was acknowledged with only {', '.join(up)} up: fewer than {WRITE_QUORUM} hold it"
        self.acknowledged(ops)
        return True

    def acknowledged(self, ops) -> None:
        """`ops` is durable, and so is every earlier write of this writer (lower LSNs)."""
        for k, v in self.pending + list(ops):
            self.possible[k] = {v}
        self.pending = []

    def observe(self, key: bytes, got) -> None:
        assert got in self.possible[key], f"read {key!r} -> {got!r}, allowed {self.possible[key]!r}"
        self.possible[key] = {got} | {v for k, v in self.pending if k == key}

    # --- writes -----------------------------------------------------------------------------
    @rule(key=st.sampled_from(KEYS))
    def put(self, key):
        self.apply_write([(key, self.value())])

    @rule(key=st.sampled_from(KEYS))
    def delete(self, key):
        self.apply_write([(key, None)])

    @rule(keys=st.lists(st.sampled_from(KEYS), min_size=2, max_size=4, unique=True), deletes=st.integers(0, 3))
    def batch(self, keys, deletes):
        self.apply_write([(k, None if i < deletes and i < len(keys) - 1 else self.value()) for i, k in enumerate(keys)])

    @rule(key=st.sampled_from(KEYS), count=st.integers(2, 40))
    def overwrite(self, key, count):
        """One key written again and again: old versions for collection to remove (it stops at
        the first write not acknowledged: each refusal waits out the write timeout)."""
        for _ in range(count):
            if not self.apply_write([(key, self.value())]):
                break

    # --- reads ------------------------------------------------------------------------------
    @precondition(lambda self: len(self.down) <= 3)
    @rule(key=st.sampled_from(KEYS), quorum=st.booleans())
    def get(self, key, quorum):
        try:
            got = self.db.get(key, quorum=quorum)
        except engine.Unavailable:
            assert len(self.impaired()) >= 3, "reads must work with at most AZ+1 impaired"
            return
        self.observe(key, got)

    @precondition(lambda self: len(self.down) <= 3)
    @rule()
    def scan(self):
        try:
            seen = dict(self.db.scan())
        except engine.Unavailable:
            assert len(self.impaired()) >= 3
            return
        for k in KEYS:
            self.observe(k, seen.get(k))

    # --- faults (inside the budget) ---------------------------------------------------------
    @precondition(lambda self: len(self.impaired()) < IMPAIRED_MAX)
    @rule(node=st.sampled_from(NODES))
    def stop_node(self, node):
        if node not in self.down:
            self.db.cluster.stop_node(node)
            self.down.add(node)

    @precondition(lambda self: len(self.impaired()) <= IMPAIRED_MAX - 2)
    @rule(az=st.sampled_from(["a", "b", "c"]))
    def stop_az(self, az):
        nodes = {n for n, a in AZ_OF.items() if a == az}
        if len(self.impaired() | nodes) <= IMPAIRED_MAX:
            self.db.cluster.stop_az(az)
            self.down |= nodes

    @precondition(lambda self: self.down)
    @rule(data=st.data())
    def start_node(self, data):
        node = data.draw(st.sampled_from(sorted(self.down)))
        self.db.cluster.start_node(node)
        self.down.discard(node)
        self.writer_sees_up([node])

    @precondition(lambda self: len(self.impaired()) < IMPAIRED_MAX)
    @rule(node=st.sampled_from(NODES))
    def wipe_node(self, node):
        if node not in self.down:
            self.db.cluster.wipe_node(node)
            self.damaged.add(node)
            self.writer_sees_up([node])  # its restart may have failed an append meanwhile

    @precondition(lambda self: len(self.impaired()) < IMPAIRED_MAX)
    @rule(node=st.sampled_from(NODES), key=st.sampled_from(KEYS), bit=st.integers(0, 2000))
    def corrupt(self, node, key, bit):
        if node not in self.down:
            self.db.cluster.corrupt(node, protection_group_of(key, self.P), None, bit)
            self.damaged.add(node)

    @rule()
    def heal(self):
        for node in sorted(self.down):
            self.db.cluster.start_node(node)
        self.down.clear()
        self.writer_sees_up(NODES)
        self.settle()

    @precondition(lambda self: len(self.down) <= 2)
    @rule()
    def crash_writer(self):
        try:
            self.db.cluster.crash_writer()
        except engine.Unavailable as e:
            # Recovery needs a write quorum of whole segments to seal and re-replicate.
            assert not self.whole_quorum_up(), f"a new writer could not open with {', '.join(sorted(self.up()))} up: {e}"
            self.heal()
            self.db.cluster.crash_writer()
        # The new writer decided the fate of every pending write; the next read of each key tells.
        self.pending = []
        # It starts believing every node up and learns otherwise from its first appends.

    @rule()
    def reopen(self):
        """Close the volume and open it again: every node restarts from its folder (what it
        persisted, not what it held in memory) and a new writer recovers from their summaries."""
        self.db.close()
        self.db = self.open()
        self.down.clear()  # an open starts every node
        self.pending = []  # the new writer decided the fate of every pending write
        self.writer_sees_up(NODES)
        if self.damaged:
            self.settle()

    def settle(self) -> None:
        """Wait until every segment is whole again (the damaged ones rebuilt or repaired)."""
        try:
            self.db.put(b"settle", b"x")  # carries the newest VDL hint to every node
        except engine.Unavailable:
            pass

        def whole():
            st_ = self.db.status()
            scls = {str(n.get("scl")) for n in st_["nodes"] if n["up"]}
            return len(scls) == 1 and all(n["up"] for n in st_["nodes"])

        eventually(whole, "every segment whole again after healing (one SCL for all nodes)")
        self.damaged.clear()

    @invariant()
    def vdl_never_goes_back(self):
        vdl = self.db.status()["vdl"]
        assert vdl >= getattr(self, "_vdl", 0)
        self._vdl = vdl

    def teardown(self):
        note(f"{self.slow_commits} writes met the write timeout with a whole write quorum up, then committed")
        try:
            self.heal()
            for k in KEYS:
                self.observe(k, self.db.get(k))  # no acknowledged write lost
                self.observe(k, self.db.get(k, quorum=True))
        finally:
            self.db.close()
            shutil.rmtree(self.dir, ignore_errors=True)


EmbeddedCluster.TestCase.settings = settings(
    max_examples=8,  # each opens a six-node volume (about 2.5 s): make test's budget
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestEmbeddedCluster = EmbeddedCluster.TestCase
